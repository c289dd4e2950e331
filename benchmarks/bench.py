"""metajax benchmark suite: seconds per outer step, compile time, memory and FLOP rate.

Every number comes from the library's default path: `metajax.conv4` / `metajax.kao_conv`,
`metajax.MAML`, `metajax.make_meta_step` (the jitted step it builds is lowered and compiled
ahead of time, and that exact executable is timed). Inputs are synthetic, with exactly the
workloads' shapes, so only compute is measured (the data path is measured separately).

Workloads (Omniglot 28x28x1, Conv-4 with 64 filters unless said; outer optimiser Adam 1e-3):
  W1     second-order MAML, 5-way 1-shot, 15 queries/class, meta-batch 32, 1 inner step, lr 0.4
  W5     W1 with 5 inner steps
  WFO    W1 first-order
  WANIL  W1 head-only inner loop (adapt_mask=metajax.head_mask)
  W20    20-way 1-shot, 5 queries/class, meta-batch 16, 5 inner steps, lr 0.1
  WP     Kao et al.'s net (metajax.kao_conv), 5-way 1-shot, 15 queries, meta-batch 32, 2 inner
         steps, lr 0.4, second order;  WPFO: the same first order
  M1     mini-ImageNet (84x84x3, Conv-4 with 32 filters): second-order 5-way 1-shot, 15
         queries, meta-batch 4, 5 inner steps, lr 0.01 (Finn et al.'s and Kao et al.'s setting);
  M5     the same 5-shot, meta-batch 2;  M1FO / M5FO: first order.  `--workloads=mini`: all four
         (not in the default set: run them with `--workloads=mini`)
  WR     ResNet-12 (metajax.resnet12) at the Omniglot configs' widths 16-32-64-128: W1's
         second-order 5-way 1-shot, meta-batch 32, 1 inner step of 0.4
  MR1    mini-ImageNet ResNet-12 at the standard widths 64-160-320-640 (12.4M params): M1's
         second-order 5-way 1-shot, meta-batch 4, 5 inner steps of 0.01.  `--workloads=resnet`:
         both (not in the default set; MR1 is a much larger program than WR)
  FB5 / FB20 / FBP / FBM1 / FBM5 / FBR / FBMR1  the baselines: a plain forward+backward (+ Adam) of the same network over
         the same images (every task's support+query images, BatchNorm per task as in MAML)

What is measured, per workload, each in its own fresh subprocess:
  * s/step: median (and min) of `--reps` timed outer steps after `--warmup` untimed ones
    (defaults 10 and 2; `--quick`: 3 and 1, on W1, WFO and WP unless `--workloads` is given).
    As the training loop runs them, K = `--steps_per_call` (default: the config default, 5)
    steps run in one compiled call (`MetaStep.steps`, a lax.scan over K stacked meta-batches;
    the baselines alike): then ceil(reps / K) calls (at least 2) are timed after ceil(warmup /
    K), and each call's time / K is one entry of `times`. Each call is `block_until_ready`-ed.
    `--steps_per_call=1` times single-step calls (one compiled call per outer step).
  * compile: `jit(...).lower(...)` and `.compile()` wall times (seconds).
  * GFLOP: XLA `cost_analysis()["flops"]`. XLA counts the body of a while loop once, whatever its
    trip count, so the inner-loop `lax.scan` of W5/W20/WP would be under-counted. We count on a
    second lowering of the same step with every `lax.scan` unrolled (`unroll=True`), using the
    *unoptimised* HLO's cost analysis (no second compile needed), with the task axis vmapped
    (FLOPs do not depend on --task_map). The compiled program's own count (loop bodies once) is
    in the JSON as `flops_compiled_loop_once`. GFLOP/s = GFLOP / median s/step.
  * memory: `exec_peak_mb` = peak RSS while the compiled step runs (warm-up and timed steps)
    minus the RSS just before the first run (Linux `/proc/self/clear_refs` resets the high-water
    mark after compilation, so compiler memory is excluded); `rss_peak_mb` = the whole subprocess's peak RSS (`getrusage`, compile included);
    `xla_temp_mb` = `compiled.memory_analysis().temp_size_in_bytes`, exact for the program.
  * the load average (`os.getloadavg()`) before and after each workload: on a shared machine the
    times are inflated, so read them with it.

Other modes (they add to the table; with one of them, the default workloads run only if
`--workloads` is given):
  --data         episodes/s of the jitted `sample_meta_batch` (32 tasks, 5-way 1-shot 15 queries)
                 from the real Omniglot pools ($METAJAX_OMNIGLOT_DIR, default
                 ../shared/data/omniglot from the repository root), "finn" meta-train split.
                 On by default when the main workloads run (off with --nodata).
  --memory       peak memory of W1-like second-order runs with --memory_steps inner steps
                 (default 1,5,10,20), with and without `remat=True`; JSON + PNG.
                 `--memory_workload=WIM`: the same sweep of implicit MAML (`metajax.IMAML`,
                 memory flat in the inner steps).
  --devices=N    the task-sharded step (`metajax.platform.sharding`) in a subprocess with
                 XLA_FLAGS=--xla_force_host_platform_device_count=N, checked against the
                 one-device step (loss and updated params). On a 2-core CPU N fake devices share
                 the same 2 cores: this shows correctness and overhead, not speedup.
  --torch_python=PATH   runs benchmarks/torch_peers.py with that interpreter (a venv with
                 torch==2.13.0 and higher) on --torch_workloads (default: all) and reports
                 metajax/peer ratios. Default: $METAJAX_TORCH_PYTHON, else /tmp/torchvenv if it
                 exists, else this interpreter if it can import torch, else no peers.

Usage:
  python benchmarks/bench.py --quick --json=benchmarks/results/quick.json
  python benchmarks/bench.py --workloads=W1,W5 --conv=lax --task_map=4
  python benchmarks/bench.py --memory --memory_meta_batch=32 --json=benchmarks/results/memory32.json
  python benchmarks/bench.py --devices=4 --workloads=W1
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import importlib.util
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from metajax.platform import cpu, runtime, xla

REPO = Path(__file__).resolve().parents[1]
RESULT_PREFIX = "BENCH_RESULT "
_MINI = (84, 84, 3)


@dataclasses.dataclass(frozen=True)
class Workload:
  net: str  # "conv4" | "kao" | "resnet12"
  ways: int
  shots: int
  queries: int
  meta_batch: int
  inner_steps: int  # 0 for the plain forward+backward baselines
  inner_lr: float
  mode: str  # "second" | "first" | "anil" | "imaml" | "mamlpp" | "fwdbwd"
  baseline: str | None = None
  description: str = ""
  image: tuple[int, int, int] = (28, 28, 1)  # (H, W, C) of one image
  filters: int = 64  # conv4 / kao
  widths: tuple[int, int, int, int] = (64, 160, 320, 640)  # resnet12's four blocks


WORKLOADS = {
  "W1": Workload("conv4", 5, 1, 15, 32, 1, 0.4, "second", "FB5", "2nd-order MAML 5w1s, 1 step"),
  "W5": Workload("conv4", 5, 1, 15, 32, 5, 0.4, "second", "FB5", "2nd-order MAML 5w1s, 5 steps"),
  "WFO": Workload("conv4", 5, 1, 15, 32, 1, 0.4, "first", "FB5", "first-order MAML 5w1s"),
  "WANIL": Workload("conv4", 5, 1, 15, 32, 1, 0.4, "anil", "FB5", "ANIL (head-only inner loop)"),
  "W20": Workload("conv4", 20, 1, 5, 16, 5, 0.1, "second", "FB20", "2nd-order 20w1s, 5 steps"),
  "WP": Workload("kao", 5, 1, 15, 32, 2, 0.4, "second", "FBP", "Kao net, 2nd order, 2 steps"),
  "WPFO": Workload("kao", 5, 1, 15, 32, 2, 0.4, "first", "FBP", "Kao net, first order, 2 steps"),
  # Implicit MAML (lambda 1, 5 CG steps): not among the defaults (the PyTorch peers have no
  # counterpart); `--workloads=WIM`, and `--memory --memory_workload=WIM` for memory against steps.
  "WIM": Workload("conv4", 5, 1, 15, 32, 5, 0.4, "imaml", "FB5", "iMAML 5w1s, 5 steps, 5 CG steps"),
  # MAML++ (multi-step loss, per-layer per-step lrs, per-step BatchNorm, second order): not among
  # the defaults either (no PyTorch peer); `--workloads=WPP`.
  "WPP": Workload("conv4", 5, 1, 15, 32, 5, 0.4, "mamlpp", "FB5", "MAML++ 5w1s, 5 steps"),
  "FB5": Workload("conv4", 5, 1, 15, 32, 0, 0.0, "fwdbwd", None, "fwd+bwd Conv-4, 32x80 images"),
  "FB20": Workload("conv4", 20, 1, 5, 16, 0, 0.0, "fwdbwd", None, "fwd+bwd Conv-4, 16x120 images"),
  "FBP": Workload("kao", 5, 1, 15, 32, 0, 0.0, "fwdbwd", None, "fwd+bwd Kao net, 32x80 images"),
  **{name: Workload("conv4", 5, shots, 15, batch, steps, 0.01, mode, base, text, _MINI, 32)
     for name, shots, batch, steps, mode, base, text in [
       ("M1", 1, 4, 5, "second", "FBM1", "mini-ImageNet 2nd-order 5w1s, 5 steps"),
       ("M1FO", 1, 4, 5, "first", "FBM1", "mini-ImageNet first-order 5w1s, 5 steps"),
       ("M5", 5, 2, 5, "second", "FBM5", "mini-ImageNet 2nd-order 5w5s, 5 steps"),
       ("M5FO", 5, 2, 5, "first", "FBM5", "mini-ImageNet first-order 5w5s, 5 steps"),
       ("FBM1", 1, 4, 0, "fwdbwd", None, "fwd+bwd Conv-4/32, 4x80 84x84x3 images"),
       ("FBM5", 5, 2, 0, "fwdbwd", None, "fwd+bwd Conv-4/32, 2x100 84x84x3 images")]},
  # ResNet-12: at the Omniglot configs' narrow widths, and at the standard widths on 84x84x3.
  "WR": Workload("resnet12", 5, 1, 15, 32, 1, 0.4, "second", "FBR",
                 "ResNet-12/16-128 2nd-order 5w1s, 1 step", widths=(16, 32, 64, 128)),
  "FBR": Workload("resnet12", 5, 1, 15, 32, 0, 0.0, "fwdbwd", None,
                  "fwd+bwd ResNet-12/16-128, 32x80 images", widths=(16, 32, 64, 128)),
  "MR1": Workload("resnet12", 5, 1, 15, 4, 5, 0.01, "second", "FBMR1",
                  "mini-ImageNet ResNet-12 2nd-order 5w1s, 5 steps", _MINI),
  "FBMR1": Workload("resnet12", 5, 1, 15, 4, 0, 0.0, "fwdbwd", None,
                    "fwd+bwd ResNet-12, 4x80 84x84x3 images", _MINI),
}
DEFAULT_WORKLOADS = ["W1", "W5", "WFO", "WANIL", "W20", "WP", "WPFO"]
MINI_WORKLOADS = ["M1", "M1FO", "M5", "M5FO"]  # --workloads=mini
RESNET_WORKLOADS = ["WR", "MR1"]  # --workloads=resnet
GROUPS = {"mini": MINI_WORKLOADS, "resnet": RESNET_WORKLOADS}
# --quick without --workloads: one second-order, one first-order and Kao et al.'s workload (with
# their baselines and peers) fit in 5 minutes on a 2-core CPU; all seven take ~20.
QUICK_WORKLOADS = ["W1", "WFO", "WP"]
# The workloads the PyTorch peers implement (torch_peers.WORKLOADS), the --torch_workloads default.
PEER_WORKLOADS = [*DEFAULT_WORKLOADS, *MINI_WORKLOADS, *RESNET_WORKLOADS]
TINY = dict(filters=8, widths=(4, 4, 8, 8), meta_batch=4, queries=2)  # --tiny: smoke-test shapes


# ============================================================================ worker (subprocess)
def _proc_status() -> dict[str, int]:
  """VmRSS / VmHWM of this process in kB (Linux), {} elsewhere."""
  try:
    with open("/proc/self/status") as f:
      return {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f)
              if k in ("VmRSS", "VmHWM")}
  except OSError:
    return {}


def _reset_peak_rss() -> bool:
  """Resets the peak-RSS high-water mark (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def _maxrss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux


def _synthetic_tasks(w: Workload, meta_batch: int, queries: int, seed: int = 0):
  import jax
  import jax.numpy as jnp

  import metajax

  kx, kq = jax.random.split(jax.random.key(seed))
  ns, nq = w.ways * w.shots, w.ways * queries
  labels = jnp.arange(w.ways, dtype=jnp.int32)
  return metajax.Task(
    support_x=jax.random.uniform(kx, (meta_batch, ns, *w.image), jnp.float32),
    support_y=jnp.tile(jnp.repeat(labels, w.shots), (meta_batch, 1)),
    query_x=jax.random.uniform(kq, (meta_batch, nq, *w.image), jnp.float32),
    query_y=jnp.tile(jnp.repeat(labels, queries), (meta_batch, 1)),
  )


def _conv_fn(name: str):
  import jax

  import metajax

  return {"default": None, "lax": jax.lax.conv_general_dilated,
          "im2col": metajax.nn.conv.conv_general_dilated_im2col}[name]


def _parse_task_map(value: str):
  if value in ("auto", "vmap", "map"):
    return value
  if not value.isdigit() or int(value) < 1:
    raise ValueError(f"--task_map must be auto, vmap, map or a positive int, got {value!r}")
  return int(value)


def _remat(value):
  """--remat / spec value -> metajax.MAML's remat (bool, or a jax.checkpoint_policies policy)."""
  import jax

  if value in (False, True):
    return value
  if value in ("off", "on"):
    return value == "on"
  policy = getattr(jax.checkpoint_policies, value, None)
  if policy is None or value.startswith("_"):
    raise ValueError(f"--remat must be off, on or a jax.checkpoint_policies name, got {value!r}")
  return policy


def build_workload(w: Workload, spec: dict):
  """-> (the library's MetaStep, init state, tasks, a vmap/unrolled twin for FLOP counting)."""

  import jax
  import jax.numpy as jnp
  import optax

  import metajax
  import metajax.platform.sharding  # not re-exported by metajax/__init__

  filters = spec.get("filters", w.filters)
  meta_batch = spec.get("meta_batch") or w.meta_batch
  queries = spec.get("queries") or w.queries
  inner_steps = spec.get("inner_steps") or w.inner_steps
  task_map = _parse_task_map(spec.get("task_map", "auto"))
  common = dict(conv_fn=_conv_fn(spec.get("conv", "default")),
                fused_norm=spec.get("norm", "fused") == "fused", input_shape=w.image)
  if w.net == "resnet12":
    model = metajax.resnet12(w.ways, widths=tuple(spec.get("widths") or w.widths), **common)
  else:
    net = metajax.conv4 if w.net == "conv4" else metajax.kao_conv
    model = net(w.ways, filters=filters, **common)
  params = model.init(jax.random.key(0))
  tasks = _synthetic_tasks(w, meta_batch, queries)
  optimizer = optax.adam(1e-3)

  if w.mode == "fwdbwd":
    # The same network over the same images, no inner loop: per task, one batch of its
    # support+query images (BatchNorm statistics per task, as in MAML), then Adam.
    def task_loss(p, task):
      x = jnp.concatenate([task.support_x, task.query_x])
      y = jnp.concatenate([task.support_y, task.query_y])
      return metajax.cross_entropy(model.apply(p, x), y)

    def make_step(tm):
      def step(state, tasks):
        p, opt_state = state

        def loss_fn(p):
          return jnp.mean(metajax.map_tasks(functools.partial(task_loss, p), tasks, tm))

        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, opt_state = optimizer.update(grads, opt_state, p)
        return (optax.apply_updates(p, updates), opt_state), {"outer/loss": loss}

      return step

    state = (jax.tree.map(jnp.array, params), optimizer.init(params))
    # Compiled as the library compiles its steps (metajax.compile_step: metajax.platform.xla.jit and
    # the same K-steps-per-call scan), for a like-for-like ratio.
    # "auto" is the meta-step's choice; the baseline stays one vmapped batch unless told.
    task_map = "vmap" if task_map == "auto" else task_map
    compiled = metajax.compile_step(lambda p: None, make_step(task_map))
    twin = jax.jit(make_step("vmap"))
    return compiled, state, tasks, twin, {"steps": compiled, "task_map": task_map}

  if w.mode == "imaml":
    learner = metajax.IMAML(model.apply, metajax.cross_entropy, num_inner_steps=inner_steps,
                            inner_lr=w.inner_lr, lam=1.0, cg_steps=5)
  elif w.mode == "mamlpp":  # every option on, the multi-step loss at its first epoch's weights
    learner = metajax.MAML(
      model.apply, metajax.cross_entropy, num_inner_steps=inner_steps, inner_lr=w.inner_lr,
      learn_inner_lr="step", per_step_params=metajax.norm_mask,
      step_loss_weights=metajax.multi_step_loss_weights(inner_steps, 10))
  else:
    learner = metajax.MAML(
      model.apply, metajax.cross_entropy, num_inner_steps=inner_steps, inner_lr=w.inner_lr,
      first_order=(w.mode == "first"),
      adapt_mask=metajax.head_mask if w.mode == "anil" else None,
      remat=_remat(spec.get("remat", False)),
      **({} if spec.get("unroll") is None else {"unroll": spec["unroll"] or True}))
  shardings = None
  mesh = None
  if spec.get("devices", 1) > 1:
    mesh = metajax.platform.sharding.task_mesh()
    shardings = metajax.platform.sharding.meta_step_shardings(mesh)
  meta_step = metajax.make_meta_step(learner, optimizer, task_map=task_map, shardings=shardings)
  state = meta_step.init(params)
  if mesh is not None:
    state = metajax.platform.sharding.replicate(state, mesh)
    tasks = metajax.platform.sharding.shard_tasks(tasks, mesh)
  # FLOP-counting twin: the same pure update (`MetaStep.update`, no input checks) with tasks
  # vmapped, jitted here only to be lowered.
  twin = jax.jit(metajax.make_meta_step(learner, optimizer, task_map="vmap", jit=False).update)
  extra = {"meta_step": meta_step, "learner": learner, "optimizer": optimizer, "params": params,
           "mesh": mesh, "steps": None if mesh is not None else meta_step,
           "task_map": metajax.resolve_task_map(task_map, sharded=mesh is not None)}
  return meta_step, state, tasks, twin, extra


def _count_flops_unrolled(twin, state, tasks) -> float | None:
  """FLOPs of the step with every lax.scan unrolled (unoptimised HLO cost analysis)."""
  import jax

  orig_scan = jax.lax.scan
  # metajax.inner calls jax.lax.scan with its own `unroll=`: override it, not just default it.
  jax.lax.scan = lambda *a, **k: orig_scan(*a, **{**k, "unroll": True})
  try:
    lowered = twin.lower(state, tasks)
  finally:
    jax.lax.scan = orig_scan
  cost = lowered.cost_analysis()
  if isinstance(cost, list):
    cost = cost[0]
  return float(cost["flops"]) if cost and "flops" in cost else None


def _compiled_flops(compiled) -> float | None:
  try:
    cost = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 - not every backend implements it
    return None
  if isinstance(cost, list):
    cost = cost[0] if cost else None
  return float(cost["flops"]) if cost and "flops" in cost else None


def _device_check(extra, tasks_host, w: Workload, spec: dict, sharded_state_after) -> dict:
  """Runs the one-device (unsharded) step from the same init and compares with the sharded one."""
  import jax
  import numpy as np

  import metajax

  # The sharded step's own mapping ("auto" is "vmap" there), so that only sharding differs.
  meta_step = metajax.make_meta_step(extra["learner"], extra["optimizer"],
                                     task_map=extra["task_map"])
  state = meta_step.init(extra["params"])
  state, metrics = meta_step.step(state, tasks_host)
  ref = jax.tree.map(np.asarray, state.params)
  got = jax.tree.map(np.asarray, sharded_state_after.params)
  diffs = [float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got))]
  # Adam's first update is ~ meta_lr * sign(grad): a gradient entry near 0 whose rounding differs
  # between the sharded and the one-device sum can flip sign, moving that param by up to
  # 2 * meta_lr = 2e-3. The gradient norm compares the gradients themselves.
  return {"one_device_loss": float(metrics["outer/loss"]),
          "one_device_grad_norm": float(metrics["outer/grad_norm"]),
          "max_abs_param_diff_after_1_step": max(diffs)}


def run_step_worker(spec: dict) -> dict:
  import jax
  import numpy as np

  w = WORKLOADS[spec["workload"]]
  if spec.get("tiny"):
    spec = {**TINY, **spec}
  out: dict = {"workload": spec["workload"], "spec": spec, "load_before": os.getloadavg(),
               "devices": jax.device_count(), "backend": jax.default_backend()}
  meta_step, state, tasks, twin, extra = build_workload(w, spec)
  out["task_map"] = extra["task_map"]  # what "auto" became
  jax.block_until_ready((state, tasks))
  rss_before_compile = _proc_status().get("VmRSS", 0) / 1024.0

  t0 = time.perf_counter()
  lowered = meta_step.lower(state, tasks)  # exactly the program `meta_step.step` runs
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  out["lower_s"], out["compile_s"] = t1 - t0, t2 - t1
  out["flops_compiled_loop_once"] = _compiled_flops(compiled)
  try:
    out["flops"] = _count_flops_unrolled(twin, state, tasks)
    out["flops_method"] = "unoptimised HLO cost_analysis, every lax.scan unrolled, tasks vmapped"
  except Exception as e:  # noqa: BLE001
    out["flops"], out["flops_method"] = out["flops_compiled_loop_once"], f"compiled ({e!r})"
  try:
    mem = compiled.memory_analysis()
    out["xla_temp_mb"] = mem.temp_size_in_bytes / 2**20
    out["xla_argument_mb"] = mem.argument_size_in_bytes / 2**20
    out["xla_output_mb"] = mem.output_size_in_bytes / 2**20
  except Exception:  # noqa: BLE001
    out["xla_temp_mb"] = None

  # K outer steps per call, as the training loop runs them (`MetaStep.steps`): the K meta-batches
  # are the same synthetic one, stacked; times are per step (call time / K).
  k = spec.get("steps_per_call", 1)
  multi = (extra or {}).get("steps")
  if k > 1 and multi is None:
    k, out["steps_per_call_note"] = 1, "no multi-step path for this mode: one step per call"
  out["steps_per_call"] = k
  if k > 1:
    tasks = jax.tree.map(lambda x: jax.numpy.stack([x] * k), tasks)
    t3 = time.perf_counter()
    compiled = multi.lower(state, tasks, stacked=True).compile()
    out["compile_steps_s"] = time.perf_counter() - t3
    calls, warm_calls = max(2, -(-spec["reps"] // k)), -(-spec["warmup"] // k)
  else:
    calls, warm_calls = spec["reps"], spec["warmup"]

  def loss_of(metrics, index):  # metrics of a K-step call are stacked: take the first/last step
    return float(np.asarray(metrics["outer/loss"]).reshape(-1)[index])

  first_loss = None
  tasks_host = jax.tree.map(np.asarray, tasks) if spec.get("devices", 1) > 1 else None
  # Peak memory of execution: the high-water mark is reset after compilation, before the first
  # run (the allocator keeps the step's buffers afterwards, so a reset after the warm-up would
  # miss them).
  rss_before = _proc_status().get("VmRSS", 0) / 1024.0
  out["peak_reset"] = _reset_peak_rss()
  for i in range(warm_calls):
    state, metrics = compiled(state, tasks)
    jax.block_until_ready((state, metrics))
    if i == 0:
      first_loss = loss_of(metrics, 0)
      if tasks_host is not None:
        out["device_check"] = _device_check(extra, tasks_host, w, spec, state)
        out["device_check"]["sharded_loss"] = first_loss
        out["device_check"]["sharded_grad_norm"] = float(metrics["outer/grad_norm"])
  times = []
  for i in range(calls):
    t = time.perf_counter()
    state, metrics = compiled(state, tasks)
    jax.block_until_ready((state, metrics))
    times.append((time.perf_counter() - t) / k)
    if first_loss is None:
      first_loss = loss_of(metrics, 0)
  hwm = _proc_status().get("VmHWM", 0) / 1024.0
  out["times"] = times
  out["median_s"] = statistics.median(times)
  out["min_s"] = min(times)
  out["first_loss"] = first_loss
  out["final_loss"] = loss_of(metrics, -1)
  out["exec_peak_mb"] = (hwm - rss_before) if out["peak_reset"] else None
  out["device_peak_mb"] = _device_peak_mb()
  if tasks_host is not None:
    out["exec_peak_note"] = "includes the one-device reference step of the device check"
  out["rss_before_compile_mb"] = rss_before_compile
  out["rss_peak_mb"] = _maxrss_mb()
  out["gflops_per_s"] = (out["flops"] / out["median_s"] / 1e9) if out.get("flops") else None
  out["load_after"] = os.getloadavg()
  return out


def _device_peak_mb() -> float | None:
  """The accelerator allocator's peak bytes in use (GPU, TPU); None on CPU, which reports none."""
  import jax

  try:
    stats = jax.devices()[0].memory_stats() or {}
  except Exception:  # noqa: BLE001 - not every backend implements it
    stats = {}
  peak = stats.get("peak_bytes_in_use")
  return peak / 2**20 if peak is not None else None


def run_data_worker(spec: dict) -> dict:
  import jax
  import jax.numpy as jnp

  from metajax import data

  out: dict = {"load_before": os.getloadavg()}
  data_dir = os.environ.get(data.OMNIGLOT_DIR_ENV) or str(REPO.parent / "shared/data/omniglot")
  t = time.perf_counter()
  pool = data.load_omniglot(data_dir)
  out["load_omniglot_s"] = time.perf_counter() - t  # cached after the first run ever
  train = data.omniglot_split(pool, "finn")["train"]
  images = jax.device_put(jnp.asarray(train.images))
  out["pool_shape"] = list(train.images.shape)
  num_tasks = spec.get("num_tasks", 32)
  sampler = data.make_episode_sampler(train, 5, 1, 15)
  fn = jax.jit(lambda key, images: data.sample_meta_batch(sampler, key, images,
                                                          num_tasks=num_tasks))
  root = jax.random.key(0)
  t = time.perf_counter()
  jax.block_until_ready(fn(root, images))
  out["compile_s"] = time.perf_counter() - t
  times = []
  for i in range(spec.get("reps", 50)):
    t = time.perf_counter()
    jax.block_until_ready(fn(jax.random.fold_in(root, i + 1), images))
    times.append(time.perf_counter() - t)
  out["times"] = times
  out["median_s"] = statistics.median(times)
  out["episodes_per_s"] = num_tasks / out["median_s"]
  out["num_tasks"] = num_tasks
  out["load_after"] = os.getloadavg()
  return out


def worker_main(spec: dict) -> None:
  result = run_data_worker(spec) if spec.get("kind") == "data" else run_step_worker(spec)
  print(RESULT_PREFIX + json.dumps(result), flush=True)


# ============================================================================ driver
def _run_subprocess(spec: dict, env: dict, timeout: float = 3600) -> dict:
  cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
  t = time.perf_counter()
  try:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return {"error": f"timed out after {timeout:.0f} s", "spec": spec}
  for line in reversed(proc.stdout.splitlines()):
    if line.startswith(RESULT_PREFIX):
      result = json.loads(line[len(RESULT_PREFIX):])
      result["wall_s"] = time.perf_counter() - t
      return result
  return {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-2000:]}", "spec": spec}


def _torch_python(flag: str | None) -> str | None:
  if flag is not None:
    return flag or None  # --torch_python= disables
  env = os.environ.get("METAJAX_TORCH_PYTHON")
  if env:
    return env
  if Path("/tmp/torchvenv/bin/python").exists():
    return "/tmp/torchvenv/bin/python"
  try:
    import importlib.util

    if importlib.util.find_spec("torch") is not None:
      return sys.executable
  except ImportError:
    pass
  return None


PEER_IMPLS = ("higher", "l2l", "func")  # torch_peers.IMPLS, the table's column order
PEER_CHECK_RTOL = 1e-10  # a peer whose float64 meta-update is further off is marked "*"


def _run_torch(python: str, workloads: list[str], reps: int, warmup: int, tiny: bool, env: dict,
               timeout: float = 3600, device: str = "cpu") -> dict:
  """torch_peers.py once per (workload, peer), each in a fresh process (as metajax's workloads),
  so a peer's peak memory is its own; then every peer's exactness check, in one process."""
  script = Path(__file__).resolve().parent / "torch_peers.py"
  result: dict = {"workloads": {}}
  for name in workloads:
    for impl in PEER_IMPLS:
      with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
      cmd = [python, str(script), f"--workloads={name}", f"--impls={impl}", f"--reps={reps}",
             f"--warmup={warmup}", f"--json={path}", f"--device={device}"] + (
               ["--tiny"] if tiny else [])
      proc = None
      try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        with open(path) as f:
          one = json.load(f)
        result["meta"] = one["meta"]
        r = one["workloads"][name][impl]
      except subprocess.TimeoutExpired:
        r = {"error": f"timed out after {timeout:.0f} s"}
      except (OSError, json.JSONDecodeError, KeyError) as e:
        r = {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-2000:]}" if proc else
             f"{type(e).__name__}: {e}"}
      finally:
        if os.path.exists(path):
          os.unlink(path)
      result["workloads"].setdefault(name, {})[impl] = r
  try:  # each peer's meta-update against plain autograd's (float64, tiny shapes, seconds)
    proc = subprocess.run([python, str(script), f"--workloads={','.join(workloads)}", "--check"],
                          env=env, capture_output=True, text=True, timeout=timeout)
    result["check"] = {line.split(":")[0]: {kv.split()[0]: float(kv.split()[1])
                                            for kv in line.split(":", 1)[1].split(",")}
                       for line in proc.stdout.splitlines() if ":" in line}
  except (subprocess.TimeoutExpired, ValueError, IndexError) as e:
    result["check"] = {}
    result["check_error"] = f"{type(e).__name__}: {e}"
  return result


def write_json_atomic(path: str | os.PathLike, payload: dict) -> None:
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
  try:
    with os.fdopen(fd, "w") as f:
      json.dump(payload, f, indent=1, sort_keys=True)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def _machine() -> dict:
  """The CPU model, its vector ISA features and family, and the XLA options the timed programs
  run under (workers inherit `METAJAX_XLA_CPU_TUNING` from this process)."""
  import jax
  import jaxlib

  host = cpu.cpu_info()
  return {"cpu": host.model, "cores": host.cores, "python": platform.python_version(),
          "jax": jax.__version__, "jaxlib": jaxlib.__version__, "platform": platform.platform(),
          "isa": host.isa, "family": host.family, "tuning": xla.parse_tuning(None),
          "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "compiler_options": xla.compiler_options("cpu")}


def _fmt(x, spec=".2f", missing="-"):
  return missing if x is None else format(x, spec)


def _load_str(r: dict) -> str:
  lb, la = r.get("load_before"), r.get("load_after")
  return f"{lb[0]:.1f}/{la[0]:.1f}" if lb and la else "-"


def format_table(results: dict) -> str:
  rows = []
  header = ["workload", "s/step med", "min", "n", "tasks", "compile s", "GFLOP", "GFLOP/s", "vs fwd+bwd",
            "exec peak MB", "XLA temp MB", "rss peak MB", "higher", "l2l", "torch.func",
            "peer rss MB", "jax/peer", "load 1m"]
  torch = results.get("torch", {}).get("workloads", {})
  check = results.get("torch", {}).get("check", {})

  def peer(name, impl):  # "*": the peer's meta-update is not MAML's (--check, float64)
    t = torch.get(name, {}).get(impl, {}).get("median_s")
    inexact = check.get(name, {}).get(impl, 0.0) > PEER_CHECK_RTOL
    return t, _fmt(t, ".3f") + ("*" if t is not None and inexact else "")
  for name, r in results.get("workloads", {}).items():
    if "error" in r:
      rows.append([name, "ERROR: " + r["error"].splitlines()[-1][:80]] + [""] * (len(header) - 2))
      continue
    base = results["workloads"].get(WORKLOADS[name].baseline or "", {})
    vs = (f"{r['median_s'] / base['median_s']:.2f}x" if base.get("median_s") else "-")
    cells = {impl: peer(name, impl) for impl in PEER_IMPLS}
    best = min([t for t, _ in cells.values() if t], default=None)
    fastest = next((impl for impl, (t, _) in cells.items() if t == best), None)
    peer_rss = torch.get(name, {}).get(fastest, {}).get("peak_rss_mb") if fastest else None
    rows.append([
      name, _fmt(r["median_s"], ".3f"), _fmt(r["min_s"], ".3f"), str(len(r["times"])),
      str(r.get("task_map", "-")),
      _fmt(r["lower_s"] + r["compile_s"], ".1f"), _fmt(r["flops"] / 1e9 if r.get("flops") else None,
                                                        ".1f"),
      _fmt(r.get("gflops_per_s"), ".1f"), vs, _fmt(r.get("exec_peak_mb"), ".0f"),
      _fmt(r.get("xla_temp_mb"), ".0f"), _fmt(r.get("rss_peak_mb"), ".0f"),
      *(cell for _, cell in cells.values()), _fmt(peer_rss, ".0f"),
      f"{r['median_s'] / best:.2f}" if best else "-", _load_str(r)])
  widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h)
            for i, h in enumerate(header)]
  lines = [" | ".join(h.ljust(wd) for h, wd in zip(header, widths))]
  lines.append("-+-".join("-" * wd for wd in widths))
  lines += [" | ".join(c.ljust(wd) for c, wd in zip(row, widths)) for row in rows]
  d = results.get("data")
  if d:
    if "error" in d:
      lines.append(f"\ndata path: ERROR {d['error'][-300:]}")
    else:
      lines.append(f"\ndata path: {d['episodes_per_s']:.0f} episodes/s (jitted sample_meta_batch "
                   f"of {d['num_tasks']} 5w1s15q tasks from the finn train pool "
                   f"{d['pool_shape']}, median {d['median_s'] * 1e3:.1f} ms of "
                   f"{len(d['times'])}; load_omniglot {d['load_omniglot_s']:.1f} s; load "
                   f"{_load_str(d)})")
  for name, r in results.get("devices", {}).items():
    if "error" in r:
      lines.append(f"devices {name}: ERROR {r['error'][-300:]}")
      continue
    one = results.get("workloads", {}).get(name.split("@")[0], {})
    chk = r.get("device_check", {})
    lines.append(f"devices {name}: {r['median_s']:.3f} s/step (min {r['min_s']:.3f}, n "
                 f"{len(r['times'])}) on {r['devices']} forced host devices"
                 + (f" vs {one['median_s']:.3f} on 1" if one.get("median_s") else "")
                 + f"; loss sharded {chk.get('sharded_loss', float('nan')):.6f} vs one device "
                 f"{chk.get('one_device_loss', float('nan')):.6f}, grad norm "
                 f"{chk.get('sharded_grad_norm', float('nan')):.6f} vs "
                 f"{chk.get('one_device_grad_norm', float('nan')):.6f}, max |param diff| after 1 step "
                 f"{chk.get('max_abs_param_diff_after_1_step', float('nan')):.2e}; load "
                 f"{_load_str(r)}")
  if any(v > PEER_CHECK_RTOL for d in check.values() for v in d.values()):
    lines.append(f"*: that peer's meta-update differs from plain torch.autograd's by more than "
                 f"{PEER_CHECK_RTOL:g} (relative, float64, `torch_peers.py --check`): "
                 + "; ".join(f"{n} {i} {v:.1e}" for n, d in check.items() for i, v in d.items()
                             if v > PEER_CHECK_RTOL))
  if results.get("torch", {}).get("error"):
    lines.append(f"torch peers: ERROR {results['torch']['error'][-300:]}")
  return "\n".join(lines)


def format_memory(mem: dict) -> str:
  lines = ["inner steps | remat | exec peak MB | XLA temp MB | rss peak MB | s/step | load"]
  for r in mem.get("runs", []):
    if "error" in r:
      lines.append(f"{r['spec'].get('inner_steps')} | {r['spec'].get('remat')} | ERROR "
                   f"{r['error'][-200:]}")
      continue
    s = r["spec"]
    lines.append(f"{s['inner_steps']} | {s['remat']} | {_fmt(r.get('exec_peak_mb'), '.0f')} | "
                 f"{_fmt(r.get('xla_temp_mb'), '.0f')} | {_fmt(r.get('rss_peak_mb'), '.0f')} | "
                 f"{r['median_s']:.2f} | {_load_str(r)}")
  return "\n".join(lines)


def plot_memory(mem: dict, path: str | os.PathLike) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for remat, style in ((False, "o-"), (True, "s--")):
    runs = sorted((r for r in mem["runs"] if "error" not in r and r["spec"]["remat"] == remat),
                  key=lambda r: r["spec"]["inner_steps"])
    steps = [r["spec"]["inner_steps"] for r in runs]
    label = "remat=True" if remat else "remat=False"
    axes[0].plot(steps, [r.get("exec_peak_mb") or 0 for r in runs], style, label=label)
    axes[1].plot(steps, [r.get("xla_temp_mb") or 0 for r in runs], style, label=label)
  axes[0].set_title("peak RSS during the step (MB)")
  axes[1].set_title("XLA temp buffers, memory_analysis (MB)")
  for ax in axes:
    ax.set_xlabel("inner steps")
    ax.grid(alpha=0.3)
    ax.legend()
  algorithm = "implicit MAML" if mem.get("workload") == "WIM" else "second-order MAML"
  fig.suptitle(f"{algorithm}, Conv-4 5w1s15q, meta-batch {mem['meta_batch']} "
               f"(load {mem.get('load', '?')})", fontsize=10)
  fig.tight_layout()
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--worker", help=argparse.SUPPRESS)
  p.add_argument("--quick", action="store_true",
                 help="3 timed steps after 1 warm-up (default 10 after 2), 20 data reps, and "
                      f"workloads {','.join(QUICK_WORKLOADS)} unless --workloads is given")
  p.add_argument("--workloads", default=None,
                 help=f"comma list from {','.join(WORKLOADS)} or the groups "
                      f"{','.join(GROUPS)} (default {','.join(DEFAULT_WORKLOADS)}; "
                      f"with --quick {','.join(QUICK_WORKLOADS)})")
  p.add_argument("--json", default=None, help="write all results there (atomically)")
  p.add_argument("--reps", type=int, default=None)
  p.add_argument("--warmup", type=int, default=None)
  p.add_argument("--conv", default="default", choices=["default", "lax", "im2col"],
                 help="default: the library's choice for the backend (im2col on CPU)")
  p.add_argument("--norm", default="fused", choices=["fused", "plain"],
                 help="BatchNorm differentiated through metajax.nn.norm's JVP rule (the library's "
                      "default) or through its plain formula, for the A/B")
  p.add_argument("--unroll", type=int, default=None,
                 help="metajax.MAML's unroll (inner steps per loop iteration; 0: all); default: "
                      "the library's")
  p.add_argument("--remat", default="off",
                 help="metajax.MAML's remat: off, on (recompute each inner step in the backward "
                      "pass) or the name of a jax.checkpoint_policies policy (e.g. dots_saveable)")
  p.add_argument("--task_map", default="auto",
                 help="auto (the library's default) | vmap | map | k (chunks of k tasks)")
  p.add_argument("--steps_per_call", type=int, default=None,
                 help="outer steps per compiled call (MetaStep.steps, as the training loop runs "
                      "them; the baselines alike); default: the training config's default; 1: "
                      "one step per call")
  p.add_argument("--nobaseline", action="store_true", help="skip the fwd+bwd baselines")
  p.add_argument("--nodata", action="store_true", help="skip the data-path benchmark")
  p.add_argument("--data", action="store_true", help="run the data-path benchmark")
  p.add_argument("--torch_python", default=None,
                 help="interpreter with torch for the peers ('' disables; default: auto)")
  p.add_argument("--torch_device", default="cpu",
                 help="where the PyTorch peers run: cpu, or cuda beside metajax on a GPU")
  p.add_argument("--torch_workloads", default=",".join(PEER_WORKLOADS))
  p.add_argument("--memory", action="store_true", help="the inner-steps x remat memory sweep")
  p.add_argument("--memory_steps", default="1,5,10,20")
  p.add_argument("--memory_meta_batch", type=int, default=32)
  p.add_argument("--memory_workload", default="W1", choices=("W1", "WIM"),
                 help="the sweep's workload: W1 (second-order MAML, with and without remat) or "
                      "WIM (implicit MAML, nothing to rematerialise)")
  p.add_argument("--memory_png", default=None, help="default: next to --json, else benchmarks/results")
  p.add_argument("--devices", type=int, default=1, help="N > 1: the task-sharded step on N devices")
  p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # smoke-test shapes
  p.add_argument("--timeout", type=float, default=3600, help="per subprocess, seconds")
  p.add_argument("--hugepages", default="auto", choices=["auto", "off"],
                 help="auto: every subprocess (metajax and the torch peers alike) runs with "
                      "glibc's huge-page malloc where metajax.platform.runtime says it helps, as the "
                      "binaries do; off: without it, for the A/B")
  p.add_argument("--cpu_tuning", default=None,
                 help="XLA:CPU speed options for metajax's programs: auto (the host's CPU family, "
                      "the default), off, or a family of metajax.platform.xla.CPU_TUNING; "
                      "default: $METAJAX_XLA_CPU_TUNING, else auto")
  p.add_argument("--preload", default=None,
                 help="a malloc library for every subprocess, metajax's and the peers' alike "
                      "(LD_PRELOAD, e.g. libtcmalloc_minimal.so.4), for an allocator A/B; with "
                      "it the glibc huge-page tunable is left out")
  args = p.parse_args(argv)
  if args.preload and not Path(args.preload).is_file():
    p.error(f"--preload={args.preload!r}: no such file")

  if args.worker:
    worker_main(json.loads(args.worker))
    return 0

  if args.steps_per_call is None:  # the training config's default
    spec = importlib.util.spec_from_file_location(
      "metajax_default_config", REPO / "experiments" / "configs" / "default.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args.steps_per_call = module.get_config().steps_per_call
  if args.steps_per_call < 1:
    p.error(f"--steps_per_call={args.steps_per_call}: must be >= 1")
  reps = args.reps if args.reps is not None else (3 if args.quick else 10)
  warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
  extra_mode = args.memory or args.devices > 1
  if args.workloads is None:
    names = [] if extra_mode else list(QUICK_WORKLOADS if args.quick else DEFAULT_WORKLOADS)
  else:
    names = [m for n in args.workloads.split(",") if n
             for m in GROUPS.get(n, [n])]
  unknown = [n for n in names if n not in WORKLOADS]
  if unknown:
    p.error(f"unknown workloads {unknown}; choose from {list(WORKLOADS)}")
  _parse_task_map(args.task_map)
  run_names = list(names)
  if not args.nobaseline:
    for n in names:
      b = WORKLOADS[n].baseline
      if b and b not in run_names:
        run_names.append(b)

  env = (runtime.without_hugepage_tunable(os.environ) if args.hugepages == "off" or args.preload
         else runtime.hugepage_environ(os.environ))
  if args.preload:  # METAJAX_HUGEPAGES=0: the workers must not re-execute with glibc's tunable
    env = {**env, "LD_PRELOAD": args.preload, "METAJAX_HUGEPAGES": "0"}
  if args.cpu_tuning is not None:  # the workers and _machine() read it from the environment
    os.environ[xla.TUNING_ENV] = env[xla.TUNING_ENV] = xla.parse_tuning(args.cpu_tuning)
  common = {"conv": args.conv, "norm": args.norm, "unroll": args.unroll, "remat": args.remat,
            "task_map": args.task_map,
            "reps": reps, "warmup": warmup, "tiny": args.tiny,
            "steps_per_call": args.steps_per_call,
}
  results: dict = {
    "meta": {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
             "command": " ".join(shlex.quote(a) for a in ["python", *sys.argv]),
             "machine": _machine(), "load_start": os.getloadavg(), "reps": reps,
             "warmup": warmup, "quick": args.quick, "conv": args.conv, "norm": args.norm,
             "steps_per_call": args.steps_per_call,
             "remat": args.remat,
             "task_map": args.task_map, "tiny": args.tiny,
             "hugepages": args.hugepages,
             "glibc_tunables": env.get("GLIBC_TUNABLES", ""), "preload": args.preload,
             "thp_mode": runtime.thp_mode(),
             "timing": "median of `reps` outer steps after `warmup` untimed ones, each in its own "
                       "subprocess; times inflated when the load average exceeds the core count"},
    "workloads": {},
  }

  def save():
    results["meta"]["load_end"] = os.getloadavg()
    if args.json:
      write_json_atomic(args.json, results)

  def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.1f}] {msg}", flush=True)

  for name in run_names:
    log(f"{name} ...")
    r = _run_subprocess({**common, "workload": name}, env, timeout=args.timeout)
    results["workloads"][name] = r
    log(f"{name}: " + (r["error"][-300:] if "error" in r else
                       f"{r['median_s']:.3f} s/step, compile {r['compile_s']:.1f} s"))
    save()

  if (names and not args.nodata) or args.data:
    log("data path ...")
    results["data"] = _run_subprocess({"kind": "data", "reps": 20 if args.quick else 100,
                                       "num_tasks": 32}, env, timeout=args.timeout)
    save()

  torch_python = _torch_python(args.torch_python)
  torch_names = [n for n in args.torch_workloads.split(",") if n in names]
  if torch_python and torch_names:
    log(f"torch peers {torch_names} with {torch_python} ...")
    results["torch"] = _run_torch(torch_python, torch_names, reps, warmup, args.tiny, env,
                                  timeout=args.timeout, device=args.torch_device)
    save()
  elif names:
    results["torch"] = {"skipped": "no interpreter with torch (see --torch_python)"}

  if args.devices > 1:
    results["devices"] = {}
    flag = f"--xla_force_host_platform_device_count={args.devices}"
    dev_env = {**env, "XLA_FLAGS": f"{env.get('XLA_FLAGS', '')} {flag}".strip()}
    for name in (names or ["W1"]):
      if WORKLOADS[name].mode == "fwdbwd":
        continue
      log(f"{name} on {args.devices} devices ...")
      r = _run_subprocess({**common, "workload": name, "devices": args.devices,
                           "warmup": max(warmup, 1)}, dev_env, timeout=args.timeout)
      results["devices"][f"{name}@{args.devices}"] = r
      save()

  if args.memory:
    steps = [int(s) for s in args.memory_steps.split(",") if s]
    mem = {"meta_batch": args.memory_meta_batch, "runs": [], "load": f"{os.getloadavg()[0]:.1f}",
           "workload": args.memory_workload,
           "note": "exec_peak_mb: peak RSS during the steps minus RSS before them; xla_temp_mb: "
                   "compiled.memory_analysis().temp_size_in_bytes"}
    for remat in (False, True) if args.memory_workload == "W1" else (False,):
      for s in steps:
        log(f"memory: {s} inner steps, remat={remat} ...")
        mem["runs"].append(_run_subprocess(
          {**common, "workload": args.memory_workload, "inner_steps": s, "remat": remat,
           "meta_batch": args.memory_meta_batch, "reps": 1 if args.quick else min(reps, 3),
           "warmup": 0, "steps_per_call": 1}, env, timeout=args.timeout))
        results["memory"] = mem
        save()
    png = args.memory_png or str((Path(args.json).parent if args.json else REPO / "benchmarks" /
                                  "results") / "memory.png")
    plot_memory(mem, png)
    mem["png"] = png
    save()

  print()
  machine = results["meta"]["machine"]
  print(f"metajax benchmarks, {results['meta']['date']}, {machine['cpu']} "
        f"({machine['cores']} cores; {' '.join(machine['isa']) or 'ISA unknown'}; family "
        f"{machine.get('family', '?')}), jax {machine['jax']}, jaxlib {machine['jaxlib']}; XLA "
        f"options {machine['compiler_options']} (tuning {machine.get('tuning', '?')})"
        + (f", XLA_FLAGS={machine['xla_flags']}" if machine["xla_flags"] else ""))
  peers_meta = results.get("torch", {}).get("meta", {})
  if peers_meta:
    print("peers: torch " + str(peers_meta.get("torch")) + ", higher "
          + str(peers_meta.get("higher")) + ", learn2learn " + str(peers_meta.get("learn2learn"))
          + f", {peers_meta.get('threads')} threads; peer rss MB = the fastest peer's resident "
          "high-water mark during its run")
  print(f"load average at start {results['meta']['load_start'][0]:.1f}, end "
        f"{os.getloadavg()[0]:.1f}; " + (
          f"s/step = median of {reps} after {warmup} warm-up" if args.steps_per_call == 1 else
          f"{args.steps_per_call} steps per compiled call: s/step = median over "
          f"{max(2, -(-reps // args.steps_per_call))} calls (n) of call time / "
          f"{args.steps_per_call}, after {-(-warmup // args.steps_per_call)} warm-up call(s)")
        + "; 'load 1m' = 1-minute load before/after the workload (times are inflated when > "
        "cores)")
  print(format_table(results))
  if args.memory:
    print()
    print(format_memory(results["memory"]))
    print(f"plot: {results['memory']['png']}")
  save()
  failed = [n for n, r in results["workloads"].items() if "error" in r]
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
