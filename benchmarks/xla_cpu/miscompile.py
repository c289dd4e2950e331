r"""Reproducer: XLA:CPU miscompiles second-order meta-gradients of a small Conv-4 (jaxlib 0.10.2).

Each case computes MAML's second-order meta-gradient (16x16 Conv-4 with 4 filters, plain-SGD inner
loop in `lax.scan`, metajax's `adapt` written out) eagerly (op by op) and under `jit`, twice: plain
`jax.jit` and `metajax.platform.xla.jit` (which compiles with `xla_disable_hlo_passes=algsimp`). Printed:
the largest absolute difference to the eager gradient, relative to its largest entry. Finite
differences side with eager (`tests/platform/test_xla.py`).

Cases:
  unroll    8 tasks, 2 inner steps, ReLU; the inner loop rolled (metajax's default) and unrolled
            (`lax.scan(..., unroll=True)`, what `make_meta_step` compiles for up to 5 steps). With `--norm=plain` (BatchNorm differentiated
            through its formula, as metajax once did) unrolled under plain `jax.jit` is
            wrong (1e-1 in float32, 4e-2 in float64); with metajax's BatchNorm (`--norm=fused`,
            `metajax.nn.norm`) the same case is right, but `--tasks=2 --activation=softplus
            --dtype=float64` was wrong under `metajax.platform.xla.jit` while it turned the emitters off
            (2.4e-3); with `algsimp` off (its option now) every case of the sweep
            is right.
  max_pool  2 tasks, 1 inner step, softplus, with metajax's max-pool and with the derivative it
            had before (`jnp.max`'s: the tangent averaged over the entries equal to the max).
            That one compares the pooled input with the max again; XLA:CPU recomputes a fused
            input with different rounding for the two, so entries stop matching and the rolled,
            plain-jit gradient is wrong. metajax's max-pool routes the tangent through one argmax.
`--net=mlp` / `--net=kao` run the unroll case on an MLP / Kao et al.'s net (no pooling);
`--activation` swaps the case's nonlinearity, `--tasks` its number of tasks.

  python benchmarks/xla_cpu/miscompile.py [--case=unroll|max_pool] [--dtype=float32|float64]
      [--net=conv4|kao|mlp] [--activation=relu|softplus] [--norm=fused|plain] [--tasks=N]
"""

from __future__ import annotations

import argparse
import contextlib
import sys


def _jnp_max_pool(x):
  """2x2 max-pool differentiated by `jnp.max`'s own rule (metajax's before the argmax fix)."""
  import jax.numpy as jnp

  *lead, h, w, c = x.shape
  x = x[..., : h // 2 * 2, : w // 2 * 2, :].reshape(*lead, h // 2, 2, w // 2, 2, c)
  return jnp.max(x, axis=(-4, -2))


@contextlib.contextmanager
def _pool(fn):
  """Traces metajax's Conv-4 with `fn` as its max-pool (this script's process only)."""
  from metajax.nn import models

  old, models.max_pool_2x2 = models.max_pool_2x2, fn
  try:
    yield
  finally:
    models.max_pool_2x2 = old


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--case", default="unroll", choices=["unroll", "max_pool"])
  p.add_argument("--dtype", default=None, choices=["float32", "float64"],
                 help="default: float32 for unroll, float64 for max_pool")
  p.add_argument("--net", default="conv4", choices=["conv4", "kao", "mlp"])
  p.add_argument("--activation", default=None, choices=["relu", "softplus"],
                 help="default: relu for unroll, softplus for max_pool")
  p.add_argument("--norm", default="fused", choices=["fused", "plain"],
                 help="the models' BatchNorm derivative (metajax.nn.norm's, or the plain formula's)")
  p.add_argument("--tasks", type=int, default=None, help="default: 8 for unroll, 2 for max_pool")
  args = p.parse_args(argv)
  dtype_name = args.dtype or ("float32" if args.case == "unroll" else "float64")

  import jax
  import jax.numpy as jnp
  import numpy as np

  import metajax as mj

  if dtype_name == "float64":  # a script's process: nothing else shares the setting
    jax.config.update("jax_enable_x64", True)
  dtype = jnp.dtype(dtype_name)

  steps, num_tasks, act = (2, 8, "relu") if args.case == "unroll" else (1, 2, "softplus")
  num_tasks = args.tasks or num_tasks
  act = {"relu": jax.nn.relu, "softplus": jax.nn.softplus}[args.activation or act]
  fused = args.norm == "fused"
  model, shape = {
    "conv4": (mj.conv4(3, filters=4, input_shape=(16, 16, 1), activation=act, fused_norm=fused),
              (16, 16, 1)),
    "kao": (mj.kao_conv(3, filters=4, activation=act, fused_norm=fused), (28, 28, 1)),
    "mlp": (mj.mlp(3, hidden=(8,), input_shape=(256,), activation=act), (256,))}[args.net]
  k1, k2 = jax.random.split(jax.random.key(1))
  tasks = mj.Task(jax.random.normal(k1, (num_tasks, 3, *shape), dtype),
                  jnp.tile(jnp.arange(3), (num_tasks, 1)),
                  jax.random.normal(k2, (num_tasks, 6, *shape), dtype),
                  jnp.tile(jnp.arange(3).repeat(2), (num_tasks, 1)))
  loss_fn = mj.make_loss_fn(model.apply, mj.cross_entropy)
  params = jax.tree.map(lambda a: a.astype(dtype), model.init(jax.random.key(0)))

  def meta_grad(unroll: bool, pool=None):
    def task_loss(p, task):  # metajax.adapt's plain-SGD inner loop, second order
      def step(q, _):
        g = jax.grad(loss_fn)(q, task.support_x, task.support_y)
        return jax.tree.map(lambda w, gw: w - 0.1 * gw, q, g), None

      q, _ = jax.lax.scan(step, p, None, length=steps, unroll=unroll)
      return loss_fn(q, task.query_x, task.query_y)

    grad = jax.grad(lambda p: jnp.mean(jax.vmap(task_loss, (None, 0))(p, tasks)))
    if pool is None:
      return grad

    def grad_with_pool(p):  # eager runs trace on every call: the pool must be set for each
      with _pool(pool):
        return grad(p)

    return grad_with_pool

  if args.case == "unroll":
    variants = {"rolled ": meta_grad(False), "unrolled ": meta_grad(True)}
  else:
    variants = {"argmax-pool ": meta_grad(False), "jnp.max-pool ": meta_grad(False, _jnp_max_pool)}

  print(f"{args.case} {args.net} {dtype_name} {args.norm} BatchNorm, {num_tasks} tasks: "
        "max |g - g_eager| / max |g_eager|")
  for name, grad in variants.items():
    ref = jax.tree.leaves(grad(params))  # this variant's own eager gradient
    scale = max(float(np.max(np.abs(np.asarray(a)))) for a in ref)
    for how, fn in (("eager", grad), ("jax.jit", jax.jit(grad)),
                    ("metajax.platform.xla.jit", mj.platform.xla.jit(grad))):
      g = jax.tree.leaves(fn(params))
      diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(ref, g))
      print(f"  {name}{how:16s} {diff / scale:.2e}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
