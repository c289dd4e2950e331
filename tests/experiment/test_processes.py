"""train.py over two processes through `jax.distributed` on 127.0.0.1 (CPU, gloo collectives, one
device each): each process samples its own rows of the meta-batch, and the final parameters are
those of one process with two devices bit for bit (the same partitioned program) and of one device
up to float32 rounding of the mean over tasks; the primary alone writes, prints and evaluates, and
a resumed two-process run continues exactly."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from metajax.experiment import build, checkpoint, metrics, train

REPO = Path(__file__).resolve().parents[2]
CONFIG = "--config=experiments/configs/sinusoid.py:smoke"  # meta-batch 4, 4 steps, eval at 2
# the launcher of the library-level multi-process test (tests/platform/test_distributed.py)
_spec = importlib.util.spec_from_file_location(
  "distributed_launch", REPO / "tests/platform/distributed_launch.py")
launch = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(launch)
# one device as the tests of test_devices.py compare (float32 in both)
RTOL, ATOL = 1e-5, 1e-6


def _train(workdir: Path, *flags: str) -> list[str]:
  return [sys.executable, "experiments/train.py", CONFIG, f"--workdir={workdir}", *flags]


def _two_processes(workdirs: tuple[Path, Path], *flags: str, status: int = 0) -> list[str]:
  port = launch.free_port()
  envs = [launch.cpu_env(METAJAX_COORDINATOR=f"127.0.0.1:{port}", METAJAX_NUM_PROCESSES="2",
                         METAJAX_PROCESS_ID=str(i)) for i in range(2)]
  return launch.run_processes([_train(w, *flags) for w in workdirs], envs, cwd=str(REPO),
                              status=status)


# the resumed half in calls of two steps (stacked meta-batches), the first in calls of one
STACKED = ("--config.log_every=2", "--config.checkpoint_every=2", "--config.eval_every=2")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Two processes for 2 steps (the non-primary given a workdir of its own), resumed by two
  processes sharing the primary's workdir to the config's 4 steps in one call; one process with
  two forced CPU devices and one with one device, likewise."""
  root = tmp_path_factory.mktemp("processes")
  two, other = root / "two", root / "other"
  first = _two_processes((two, other), "--config.num_steps=2")
  resumed = _two_processes((two, two), *STACKED)
  envs = [launch.cpu_env(XLA_FLAGS="--xla_force_host_platform_device_count=2"), launch.cpu_env()]
  launch.run_processes([_train(root / "one2", "--config.num_steps=2"),
                        _train(root / "one1", "--config.num_steps=2")], envs, cwd=str(REPO))
  one = launch.run_processes([_train(root / "one2", *STACKED), _train(root / "one1", *STACKED)],
                             envs, cwd=str(REPO))
  return {"root": root, "first": first, "resumed": resumed, "one2": one[0], "one1": one[1]}


def _params(workdir: Path) -> tuple[int, list[np.ndarray]]:
  state, _, step = checkpoint.read_latest(workdir / train.CHECKPOINT_DIR)
  return step, jax.tree.leaves(state["meta"]["params"])


def _test_lines(output: str) -> list[str]:
  """The printed test evaluation, without its duration."""
  lines = output.splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith("test at step"))
  return [re.sub(r", [0-9.]+ s\)", ")", lines[start]), *lines[start + 1:start + 3]]


@pytest.mark.slow  # three launches of train.py (two processes each), with their compilations
def test_two_processes_give_the_parameters_of_one(runs):
  root = runs["root"]
  step, two = _params(root / "two")
  assert step == 4
  for name in ("one2", "one1"):
    assert _params(root / name)[0] == 4
  assert ("split over 2 devices of 2 processes (2 each, sampled by the process that holds them)"
          in runs["first"][0]), runs["first"][0]
  assert "split over 2 devices (2 each); parameters replicated" in runs["one2"], runs["one2"]
  assert "resuming from checkpoint step 2" in runs["resumed"][0], runs["resumed"][0]
  assert "first step (compilation" in runs["first"][0], runs["first"][0]
  assert "first 2 steps (one call)" in runs["resumed"][0], runs["resumed"][0]
  _, one2 = _params(root / "one2")
  _, one1 = _params(root / "one1")
  assert len(two) == len(one2) == len(one1) > 0
  for a, b, c in zip(two, one2, one1):
    np.testing.assert_array_equal(a, b)  # the same program, over processes or local devices
    np.testing.assert_allclose(a, c, rtol=RTOL, atol=ATOL)
  earlier = jax.tree.leaves(checkpoint.read(root / "two" / train.CHECKPOINT_DIR, 2)[0]["meta"]
                            ["params"])
  assert any(not np.allclose(a, e) for a, e in zip(two, earlier))  # the resumed run trained
  # the primary's evaluation prints and records what one process does
  assert _test_lines(runs["resumed"][0]) == _test_lines(runs["one2"])
  results = {name: json.loads((root / name / train.RESULTS_FILE).read_text())
             for name in ("two", "one2")}
  assert any(k.startswith("test/") for k in results["two"]), results
  assert results["two"] == results["one2"]  # the logged averages and every evaluation
  records = {name: [{k: v for k, v in r.items() if k != "time"}
                    for r in metrics.read_metrics(root / name / metrics.METRICS_FILE)]
             for name in ("two", "one2")}
  assert records["two"] == records["one2"]


@pytest.mark.slow  # shares the launches of the test above
def test_a_non_primary_process_writes_and_prints_nothing(runs):
  root = runs["root"]
  assert not (root / "other").exists()  # its own --workdir was never created
  for output in (runs["first"][1], runs["resumed"][1]):  # the resumed one shared the workdir
    for line in ("training maml", "step 1/", "test at step", "results:", "resuming from"):
      assert line not in output, output
  assert "step 2/2" in runs["first"][0] and "results:" in runs["resumed"][0]
  # the primary's files are those of a one-process run
  names = lambda w: sorted(p.name for p in (root / w).iterdir() if p.name != "versions.json")
  assert names("two") == names("one2")


@pytest.mark.slow  # a third two-process launch, into the first tests' workdir
def test_an_error_of_the_primary_stops_every_process(runs):
  root = runs["root"]
  files = lambda: {p.name: p.stat().st_mtime_ns for p in (root / "two").iterdir()
                   if p.name != ".lock"}  # the lock records its holder
  before = files()
  outputs = _two_processes((root / "two", root / "other"), "--config.inner_lr=0.5", status=1)
  for output in outputs:  # the non-primary does not wait for a primary that has stopped
    assert "holds a checkpoint of a different run" in output, output
  assert files() == before
  assert not (root / "other").exists()


def test_a_meta_batch_the_processes_cannot_share_is_refused(monkeypatch):
  config = build.load_config_file(f"{REPO / 'experiments/configs/sinusoid.py'}:smoke")
  config.meta_batch_size = 3
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  with pytest.raises(build.ConfigError, match="meta_batch_size=3 cannot be split evenly over 2 "
                                              "processes; use a multiple of 2"):
    train.task_mesh(config)
