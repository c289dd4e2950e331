"""Smoke test of benchmarks/bench.py's quick path on tiny shapes (the driver, one worker run
in-process, the table, the atomic JSON and the memory plot)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

import metajax

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"


@pytest.fixture(scope="module")
def bench():
  spec = importlib.util.spec_from_file_location("metajax_bench", BENCH)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


def test_quick_path_tiny(bench, tmp_path, monkeypatch, capsys):
  # Run the workers in-process (a subprocess per workload is what the real run does; here it
  # would only add interpreter start-up time).
  envs = []

  def in_process(spec, env, timeout=0):
    envs.append(env)
    return bench.run_step_worker(spec)

  monkeypatch.setattr(bench, "_run_subprocess", in_process)
  out = tmp_path / "r" / "quick.json"
  rc = bench.main(["--quick", "--tiny", "--workloads=WPFO", "--nobaseline", "--nodata",
                   "--torch_python=", "--reps=2", "--warmup=0", f"--json={out}"])
  assert rc == 0
  results = json.loads(out.read_text())
  r = results["workloads"]["WPFO"]
  assert len(r["times"]) == 2 and r["median_s"] > 0
  # Timed as the training loop runs: the config's steps per call, in one compiled scan.
  assert r["steps_per_call"] == results["meta"]["steps_per_call"] == 5
  assert r["compile_steps_s"] > 0
  assert r["compile_s"] > 0 and r["flops"] > 0 and r["xla_temp_mb"] > 0
  assert r["final_loss"] == pytest.approx(r["final_loss"])  # finite
  # The default is the library's "auto", and the result says what it became here.
  assert results["meta"]["task_map"] == "auto"
  assert r["task_map"] == metajax.resolve_task_map("auto")
  assert len(results["meta"]["load_start"]) == 3
  # The subprocess environment is the one recorded, and --hugepages=auto adds the tunable only
  # where metajax.platform.runtime says it helps on this machine.
  recorded = results["meta"]["glibc_tunables"]
  assert envs and all(e.get("GLIBC_TUNABLES", "") == recorded for e in envs)
  assert recorded == bench.runtime.hugepage_environ(os.environ).get("GLIBC_TUNABLES", "")
  assert not list(out.parent.glob("*.tmp"))  # atomic write left no temporary behind
  table = capsys.readouterr().out
  assert "WPFO" in table and "load average" in table


@pytest.mark.slow  # 50 s: two lowerings of a 5-step second-order workload
def test_flop_count_unrolls_the_inner_loop(bench):
  """XLA counts a while loop's body once: the FLOP count lowers a twin with every scan unrolled,
  so it must grow by the same amount with each inner step (it did not while metajax passed its
  own `unroll=`)."""
  flops = []
  for steps in (1, 2, 3):
    spec = {"conv": "default", **bench.TINY, "inner_steps": steps}
    _, state, tasks, twin, _ = bench.build_workload(bench.WORKLOADS["W5"], spec)
    flops.append(bench._count_flops_unrolled(twin, state, tasks))
  # Each step adds about one step's FLOPs (with the bug: nothing). Not exactly the same amount:
  # the HLO of the steps' second-order terms differs by a few kFLOP out of ~77 MFLOP here.
  assert flops[1] - flops[0] > 0.1 * flops[0]
  assert flops[2] - flops[1] == pytest.approx(flops[1] - flops[0], rel=1e-3)


@pytest.mark.slow  # 50 s: a tiny benchmark run through the workers
def test_preload_goes_to_every_worker(bench, tmp_path, monkeypatch):
  envs = []

  def in_process(spec, env, timeout=0):
    envs.append(env)
    return bench.run_step_worker(spec)

  monkeypatch.setattr(bench, "_run_subprocess", in_process)
  with pytest.raises(SystemExit):
    bench.main(["--preload=/no/such/libmalloc.so", "--tiny", "--workloads=WPFO"])
  lib = tmp_path / "libfake.so"
  lib.write_bytes(b"")  # only recorded here: the workers run in this process
  out = tmp_path / "r.json"
  assert bench.main(["--quick", "--tiny", "--workloads=WPFO", "--nobaseline", "--nodata",
                     "--torch_python=", "--reps=1", "--warmup=0", f"--preload={lib}",
                     f"--json={out}"]) == 0
  assert envs and all(e["LD_PRELOAD"] == str(lib) and e["METAJAX_HUGEPAGES"] == "0" and
                      "hugetlb" not in e.get("GLIBC_TUNABLES", "") for e in envs)
  assert json.loads(out.read_text())["meta"]["preload"] == str(lib)


def test_table_and_memory_plot(bench, tmp_path):
  run = {"median_s": 2.0, "min_s": 1.5, "times": [2.0, 1.5, 2.5], "lower_s": 1.0, "compile_s": 3.0,
         "flops": 4e9, "gflops_per_s": 2.0, "exec_peak_mb": 10.0, "xla_temp_mb": 9.0,
         "rss_peak_mb": 700.0, "load_before": [5.0, 5.0, 5.0], "load_after": [6.0, 6.0, 6.0],
         "task_map": "map"}
  results = {"workloads": {"W1": run, "FB5": {**run, "median_s": 1.0},
                           "W5": {"error": "exit 1: boom"}},
             "torch": {"workloads": {"W1": {"higher": {"median_s": 4.0},
                                            "func": {"median_s": 5.0}}}}}
  table = bench.format_table(results)
  assert "2.00x" in table  # W1 vs its fwd+bwd baseline
  assert "0.50" in table  # metajax / best peer
  assert "ERROR" in table
  # The fastest peer sets the ratio and the peer memory column, an inexact one is marked "*"
  # (and still counts: a faster wrong peer only makes the ratio harder for metajax).
  results["torch"] = {"workloads": {"W1": {"higher": {"median_s": 4.0, "peak_rss_mb": 600.0},
                                           "l2l": {"median_s": 3.2, "peak_rss_mb": 512.0},
                                           "func": {"median_s": 2.5, "peak_rss_mb": 900.0}}},
                      "check": {"W1": {"higher": 0.0, "l2l": 1e-15, "func": 9e-3}}}
  row = next(line for line in bench.format_table(results).splitlines()
             if line.startswith("W1 "))
  cells = [c.strip() for c in row.split("|")]
  assert cells[4] == "map"  # how the step mapped its tasks ("auto" resolved)
  assert cells[12:17] == ["4.000", "3.200", "2.500*", "900", "0.80"]
  assert "W1 func 9.0e-03" in bench.format_table(results)
  mem = {"meta_batch": 4, "runs": [
    {**run, "spec": {"inner_steps": s, "remat": remat}} for s in (1, 2) for remat in (False, True)
  ]}
  png = tmp_path / "memory.png"
  bench.plot_memory(mem, png)
  assert png.stat().st_size > 1000
  assert "remat" in bench.format_memory(mem)


def test_profile_step_groups_xla_ops_by_kind(tmp_path, monkeypatch):
  """The profiler summary sums XLA op events by name without the numeric suffix and leaves out
  Python frames and the executor's own spans."""
  import gzip

  path = BENCH.parent / "profile_step.py"
  spec = importlib.util.spec_from_file_location("metajax_profile_step", path)
  module = importlib.util.module_from_spec(spec)
  monkeypatch.setenv("XLA_FLAGS", "")  # the module appends its flag at import
  spec.loader.exec_module(module)
  events = [{"ph": "X", "name": "ynn_fusion.3", "dur": 2500},
            {"ph": "X", "name": "ynn_fusion", "dur": 500},
            {"ph": "X", "name": "pad_slice_fusion.12", "dur": 1000},
            {"ph": "X", "name": "ThunkExecutor::Execute", "dur": 9000},
            {"ph": "X", "name": "$api.py:2479 block_until_ready", "dur": 9000},
            {"ph": "X", "name": "PjitFunction(step)", "dur": 9000},
            {"ph": "i", "name": "ynn_fusion.4", "dur": 7000}]
  (tmp_path / "plugins").mkdir()
  with gzip.open(tmp_path / "plugins" / "host.trace.json.gz", "wt") as f:
    json.dump({"traceEvents": events}, f)
  total, count = module.op_kind_times(tmp_path)
  assert total == {"ynn_fusion": 3.0, "pad_slice_fusion": 1.0}
  assert count == {"ynn_fusion": 2, "pad_slice_fusion": 1}
  assert "--xla_cpu_enable_xprof_traceme=true" in module.os.environ["XLA_FLAGS"]
  with pytest.raises(FileNotFoundError, match="trace"):
    module.op_kind_times(tmp_path / "plugins" / "none")


def test_page_faults_script_reports_each_call(capsys):
  """benchmarks/page_faults.py runs its jitted conv fwd+bwd and prints one row per timed call with
  the environment it measured (tiny batch: this checks the script, not the machine)."""
  path = BENCH.parent / "page_faults.py"
  spec = importlib.util.spec_from_file_location("metajax_page_faults", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  assert module.main(["--reps=2", "--batch=2"]) == 0
  out = capsys.readouterr().out.strip().splitlines()
  assert out[0].startswith("conv fwd+bwd: GLIBC_TUNABLES=") and "minor faults" in out[1]
  rows = [line.split() for line in out[2:]]
  assert [r[0] for r in rows] == ["0", "1"]
  assert all(float(r[1]) > 0 and int(r[2]) >= 0 for r in rows)


def _reproducer():
  path = BENCH.parent / "xla_cpu/miscompile.py"
  spec = importlib.util.spec_from_file_location("metajax_xla_cpu_miscompile", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.slow  # 45 s: four compilations and the op-by-op references
def test_miscompile_reproducer_runs(capsys):
  """benchmarks/xla_cpu/miscompile.py prints eager / jax.jit / metajax.platform.xla.jit rows; on the MLP
  (which XLA compiles correctly either way) they all agree with the eager gradient."""
  assert _reproducer().main(["--net=mlp"]) == 0
  rows = capsys.readouterr().out.strip().splitlines()[1:]
  assert [r.split()[:2] for r in rows] == [[k, h] for k in ("rolled", "unrolled")
                                          for h in ("eager", "jax.jit", "metajax.platform.xla.jit")]
  assert all(float(r.split()[2]) < 1e-5 for r in rows)


@pytest.mark.slow
def test_miscompile_sweep_one_configuration(tmp_path, capsys):
  """benchmarks/xla_cpu/sweep.py on one configuration: one row of four float64 cells, the rolled
  ones right (the library's default), and the JSON with the same cells."""
  path = BENCH.parent / "xla_cpu/sweep.py"
  spec = importlib.util.spec_from_file_location("metajax_xla_cpu_sweep", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  out = tmp_path / "sweep.json"
  import jax

  x64 = jax.config.jax_enable_x64
  try:  # the script turns float64 on for its process; this test's worker gets it back as it was
    assert module.main(["--nets=conv4", "--tasks=2", "--steps=2", "--activations=softplus",
                        "--filters=2", f"--json={out}"]) == 0
  finally:
    jax.config.update("jax_enable_x64", x64)
  cells = json.loads(out.read_text())["cells"]
  assert len(cells) == 1 and cells[0]["tasks"] == 2 and cells[0]["steps"] == 2
  assert cells[0]["rolled jax.jit"] < 1e-9 and cells[0]["rolled xla.jit"] < 1e-9
  assert "wrong (" in capsys.readouterr().out


@pytest.mark.slow
def test_miscompile_reproducer_max_pool_case(capsys):
  """The max-pool case prints both pools' rows; metajax's (argmax) pool is right under both jits
  in float64. (The jnp.max-pool rows are XLA's bug, not asserted: a newer jaxlib may fix it.)"""
  assert _reproducer().main(["--case=max_pool"]) == 0
  rows = [r.split() for r in capsys.readouterr().out.strip().splitlines()[1:]]
  assert [r[:2] for r in rows] == [[k, h] for k in ("argmax-pool", "jnp.max-pool")
                                  for h in ("eager", "jax.jit", "metajax.platform.xla.jit")]
  assert all(float(r[2]) < 1e-12 for r in rows[:3])
  assert float(rows[3][2]) == 0.0 and float(rows[5][2]) < 1e-12


def test_resnet12_workloads_build_at_their_widths(bench):
  """WR (the Omniglot configs' widths) and MR1 (the standard widths on 84x84x3) with their
  baselines: the model each builds, at tiny and full widths (built, not compiled)."""
  assert bench.GROUPS["resnet"] == ["WR", "MR1"]
  assert {bench.WORKLOADS[n].baseline for n in bench.GROUPS["resnet"]} == {"FBR", "FBMR1"}
  assert not set(bench.GROUPS["resnet"]) & set(bench.DEFAULT_WORKLOADS)
  for name, widths, image in [("WR", (16, 32, 64, 128), (28, 28, 1)),
                              ("MR1", (64, 160, 320, 640), (84, 84, 3))]:
    w = bench.WORKLOADS[name]
    assert (w.net, w.widths, w.image) == ("resnet12", widths, image)
    assert bench.WORKLOADS[w.baseline].widths == widths
  for name in ("WR", "FBR"):
    _, state, tasks, _, _ = bench.build_workload(bench.WORKLOADS[name],
                                                 {"conv": "default", **bench.TINY})
    assert tasks.support_x.shape == (bench.TINY["meta_batch"], 5, 28, 28, 1)
    params = state.params if name == "WR" else state[0]
    # --tiny's widths reach the model: the head maps widths[-1] features to the 5 ways.
    assert [leaf.shape for leaf in jax.tree.leaves(params["head"])] == [
      (5,), (bench.TINY["widths"][-1], 5)]


@pytest.mark.slow  # ~90 s on a loaded 2-core CPU: compiles a second-order ResNet-12 step
def test_resnet12_workload_runs_tiny(bench, tmp_path, monkeypatch):
  monkeypatch.setattr(bench, "_run_subprocess", lambda spec, env, timeout=0:
                      bench.run_step_worker(spec))
  out = tmp_path / "resnet.json"
  assert bench.main(["--quick", "--tiny", "--workloads=WR", "--nobaseline", "--nodata",
                     "--torch_python=", "--reps=1", "--warmup=0", "--steps_per_call=1",
                     f"--json={out}"]) == 0
  r = json.loads(out.read_text())["workloads"]["WR"]
  assert r["median_s"] > 0 and r["flops"] > 0
  assert r["final_loss"] == pytest.approx(r["final_loss"])  # finite


def _peer_tables() -> dict:
  """torch_peers.py's module-level literal tables, read without importing torch."""
  import ast

  names = ("WORKLOADS", "KAO_NET", "RESNET12_WIDTHS", "SHAPES", "OMNIGLOT_SHAPE")
  tree = ast.parse((BENCH.parent / "torch_peers.py").read_text())
  return {t.id: ast.literal_eval(node.value) for node in tree.body
          if isinstance(node, ast.Assign) for t in node.targets
          if isinstance(t, ast.Name) and t.id in names}


def test_peer_workloads_match_the_benchmarks(bench):
  """Every workload a peer runs by default has the benchmark's shapes, step and network, so the
  ratio compares the same meta-update."""
  tables = _peer_tables()
  names = bench.PEER_WORKLOADS
  assert set(names) == set(tables["WORKLOADS"]), set(names) ^ set(tables["WORKLOADS"])
  for name in names:
    w = bench.WORKLOADS[name]
    assert tables["WORKLOADS"][name] == (w.ways, w.shots, w.queries, w.meta_batch,
                                         w.inner_steps, w.inner_lr, w.mode), name
    net = ("kao" if name in tables["KAO_NET"]
           else "resnet12" if name in tables["RESNET12_WIDTHS"] else "conv4")
    assert net == w.net, name
    channels, side, filters = tables["SHAPES"].get(name, tables["OMNIGLOT_SHAPE"])
    assert (side, side, channels) == w.image, name
    if net == "resnet12":
      assert tables["RESNET12_WIDTHS"][name] == w.widths, name
    else:
      assert filters == w.filters, name
