r"""metajax's MAML meta-gradient against PyTorch autograd, on the same parameters and tasks.

An independent check of the exact (second-order) meta-gradient on a real workload, for results
that look wrong (docs/RESULTS.md: the second-order 1-shot run). For a config of
`experiments/train.py` (Conv-4 or Kao et al.'s network, MAML with plain SGD inner steps), it
takes the initial parameters of `--config.seed` or a run's checkpoint (`--workdir`, `--step`),
samples `--tasks` training tasks from the config's data, and computes the mean query loss and
its gradient in float64 with `metajax.meta_loss` (compiled with `metajax.platform.xla.jit`, and op by op)
and with `benchmarks/torch_peers.py --meta_grad` (plain `torch.autograd`, a loop over tasks).
Prints, per parameter, |g| and max |g_jax - g_torch| (relative to the largest entry of the whole
torch gradient) for metajax op by op (its arithmetic) and compiled (what runs); exits 1 when
either is above `--rtol` / `--compiled_rtol`. In float64 the compiled column is wrong for a
Conv-4 of 48+ filters on CPU (`xla_cpu/f64_width.py`); `--compiled_dtype=float32` checks the
float32 program that training runs instead.

  python benchmarks/torch_crosscheck.py \
    --config=experiments/configs/omniglot.py:kao5way1shot --config.algorithm=maml \
    --config.data_dir=../shared/data/omniglot --tasks=8 --torch_python=/tmp/torchvenv/bin/python

It also prints the per-task gradient norms, second and first order: MAML's second-order terms
can be heavy-tailed over tasks (docs/RESULTS.md).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

import metajax as mj
from metajax.experiment import build, train
from metajax.platform import xla
from metajax.experiment import checkpoint as ckpt_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiments/train.py's config.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Take the parameters from this run's checkpoint "
                               "(its config.json replaces --config).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest; 0: the run's "
                             "initial parameters).")
_TASKS = flags.DEFINE_integer("tasks", 8, "Training tasks in the meta-batch.", lower_bound=1)
_TASK_SEED = flags.DEFINE_integer("task_seed", 0, "Seed of the sampled tasks.")
_TORCH_PYTHON = flags.DEFINE_string("torch_python", "/tmp/torchvenv/bin/python",
                                    "An interpreter with torch (see benchmarks/torch_peers.py).")
_RTOL = flags.DEFINE_float("rtol", 1e-9, "Largest accepted max |diff| / max |g|, op by op.")
_COMPILED_DTYPE = flags.DEFINE_enum("compiled_dtype", "float64", ["float64", "float32"],
                                    "dtype of the compiled gradient (float32: what training runs).")
_COMPILED_RTOL = flags.DEFINE_float("compiled_rtol", 1e-9, "The same for the compiled gradient "
                                    "(float32 rounding is ~1e-6).")

_SUPPORTED = {"conv4": ("conv4", 4), "kao_conv": ("kao", 3)}  # net name, torch layers per block


def _torch_name(path: tuple[str, ...], per_block: int, norm_offset: int) -> str:
  """metajax's `("encoder", "conv2", "kernel")` -> torch_peers' `"encoder.6.weight"`."""
  if path[0] == "head":
    return "head." + {"kernel": "weight", "bias": "bias"}[path[1]]
  block = int(path[1][-1])
  if path[1].startswith("conv"):
    return f"encoder.{per_block * block}." + {"kernel": "weight", "bias": "bias"}[path[2]]
  return f"encoder.{per_block * block + norm_offset}." + {"scale": "weight", "bias": "bias"}[path[2]]


def _to_torch_layout(name: str, a: np.ndarray) -> np.ndarray:
  if name.endswith("weight") and a.ndim == 4:
    return a.transpose(3, 2, 0, 1)  # HWIO -> OIHW
  return a.T if name.endswith("weight") else a  # Dense [in, out] -> Linear [out, in]


def _to32(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float32 if a.dtype.kind == "f" else a.dtype), tree)


def _flat(tree) -> dict[tuple[str, ...], np.ndarray]:
  return {tuple(k.key for k in path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _params_and_config(config):
  params = None
  if _WORKDIR.value:
    try:  # step 0: the run's initial parameters, rebuilt from its config's seed below
      config, _, _, params, step = train.restore_learner(
        _WORKDIR.value, step=None if _STEP.value == 0 else _STEP.value)
    except ckpt_lib.CheckpointError as e:
      raise app.UsageError(str(e)) from e
    if _STEP.value != 0:
      print(f"parameters of {_WORKDIR.value} at step {step}")
  if config.model not in _SUPPORTED or config.algorithm != "maml" or config.zeroing:
    raise app.UsageError(f"supported: --config.algorithm=maml without zeroing, model in "
                         f"{sorted(_SUPPORTED)}; got algorithm {config.algorithm!r}, model "
                         f"{config.model!r}, zeroing {config.zeroing}")
  model = build.build_model(config)
  if params is None or _STEP.value == 0:
    params = model.init(jax.random.split(jax.random.key(config.seed))[0])  # as train.py's
  return config, model, params


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if _CONFIG.value is None and not _WORKDIR.value:
    raise app.UsageError("give --config or --workdir")
  config, model, params = _params_and_config(_CONFIG.value)
  net, per_block = _SUPPORTED[config.model]
  learner = build.build_learner(config, model)
  if learner.optimizer is not None or learner.adapt_mask is not None or learner.params_transforms:
    raise app.UsageError(f"the torch side runs plain SGD on every parameter; got {learner}")
  source = build.train_task_source(config, build.load_task_sources(config, ("train",))["train"])
  tasks = build.sample_tasks(source, jax.random.split(jax.random.key(_TASK_SEED.value),
                                                      _TASKS.value))
  norm_offset = 1 if net == "conv4" else 2
  names = {path: _torch_name(path, per_block, norm_offset) for path in _flat(params)}

  with jax.enable_x64(True):
    p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
    t64 = jax.tree.map(lambda a: a.astype(jnp.float64) if a.dtype.kind == "f" else a, tasks)
    results = {}  # first_order -> (loss, compiled gradient, op-by-op gradient)
    for first_order in (False, True):
      lrn = dataclasses.replace(learner, first_order=first_order)
      fun = jax.value_and_grad(lambda p, lrn=lrn: mj.meta_loss(p, t64, lrn))
      if _COMPILED_DTYPE.value == "float64":
        loss, compiled = xla.jit(fun)(p64)
      with jax.disable_jit():
        eager = fun(p64)[1]
      with jax.enable_x64(False):  # float32, what training runs
        p32, t32 = _to32(p64), _to32(t64)
        if _COMPILED_DTYPE.value == "float32":
          loss, compiled = xla.jit(lambda p, t, lrn=lrn: jax.value_and_grad(
            lambda q: mj.meta_loss(q, t, lrn))(p))(p32, t32)
        per_task = xla.jit(jax.vmap(lambda t, lrn=lrn: jax.grad(lambda p: mj.meta_loss(
          p, jax.tree.map(lambda a: a[None], t), lrn))(p32)))(t32)
      results[first_order] = (loss, compiled, eager)
      norms = np.sqrt(sum(np.sum(np.square(g), axis=tuple(range(1, g.ndim)))
                          for g in _flat(per_task).values()))
      mean_norm = np.sqrt(sum(np.sum(np.square(g)) for g in _flat(eager).values()))
      print(f"{'first' if first_order else 'second'} order: per-task |g| median "
            f"{np.median(norms):.4g}, max {norms.max():.4g} (float32); |g| of the mean "
            f"{mean_norm:.4g}", flush=True)

  failed = False
  with tempfile.TemporaryDirectory() as tmp:
    for first_order, (loss, compiled, eager) in results.items():
      inp, out = os.path.join(tmp, "in.npz"), os.path.join(tmp, "out.npz")
      nchw = lambda a: np.asarray(a).transpose(0, 1, 4, 2, 3)  # noqa: E731
      np.savez(inp, net=net, ways=config.ways, steps=config.num_inner_steps,
               inner_lr=config.inner_lr, first_order=first_order,
               support_x=nchw(t64.support_x), support_y=np.asarray(t64.support_y),
               query_x=nchw(t64.query_x), query_y=np.asarray(t64.query_y),
               **{f"param/{n}": _to_torch_layout(n, np.asarray(_flat(p64)[path]))
                  for path, n in names.items()})
      script = Path(__file__).with_name("torch_peers.py")
      proc = subprocess.run([_TORCH_PYTHON.value, str(script), f"--meta_grad={inp},{out}"],
                            capture_output=True, text=True)
      if proc.returncode:
        sys.exit(f"error: {script.name} --meta_grad failed:\n{proc.stderr[-3000:]}")
      z = np.load(out)
      order = "first" if first_order else "second"
      print(f"\n{order} order: mean query loss jax {float(loss):.12f} "
            f"torch {float(z['loss']):.12f}; max |g_jax - g_torch| over the parameter / max "
            f"|g_torch| over all (a BatchNorm'd conv's bias has a zero gradient: rounding only)")
      print(f"  {'parameter':24s} {'|g|':>12s} {'op by op':>10s} {'compiled':>10s}")
      eager = _flat(eager)
      scale = max(np.max(np.abs(z[f"grad/{n}"])) for n in names.values())
      for path, g in _flat(compiled).items():
        want = z[f"grad/{names[path]}"]
        diffs = [np.max(np.abs(_to_torch_layout(names[path], x) - want)) / scale
                 for x in (eager[path], g)]
        failed |= not (diffs[0] <= _RTOL.value and diffs[1] <= _COMPILED_RTOL.value)  # NaN too
        name = "/".join(path).removeprefix("encoder/")
        print(f"  {name:24s} {np.linalg.norm(want):12.5g} {diffs[0]:10.1e} {diffs[1]:10.1e}")
  if failed:
    sys.exit(f"error: a parameter's gradient differs by more than --rtol={_RTOL.value} (op by "
             f"op) or --compiled_rtol={_COMPILED_RTOL.value} (compiled)")


if __name__ == "__main__":
  app.run(main)
