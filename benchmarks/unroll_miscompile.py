r"""Reproducer: XLA:CPU miscompiles MAML's second-order Conv-4 meta-gradient with an unrolled loop.

The same meta-gradient (2 inner steps, 8 tasks of a tiny Conv-4) computed four ways: the inner
loop rolled (`lax.scan`, metajax's path) or unrolled (`benchmarks/patches/scan_unroll.patch`'s
change), each eagerly and under `jit`. Printed: the largest absolute difference to the rolled
eager gradient, relative to its largest entry. On jax/jaxlib 0.10.2, XLA:CPU, the unrolled jitted
gradient is off by ~1e-1 (float32) / ~4e-2 (float64) while the three others agree to rounding;
with `XLA_FLAGS=--xla_cpu_use_fusion_emitters=false` all four agree. `--net=mlp` and `--net=kao`
(no max-pool, VALID strided convolutions) agree everywhere.

  python benchmarks/unroll_miscompile.py [--dtype=float64] [--net=conv4|kao|mlp]
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
  p.add_argument("--net", default="conv4", choices=["conv4", "kao", "mlp"])
  args = p.parse_args(argv)

  import jax
  import jax.numpy as jnp
  import numpy as np

  import metajax as mj

  if args.dtype == "float64":  # a script's process: nothing else shares the setting
    jax.config.update("jax_enable_x64", True)
  dtype = jnp.dtype(args.dtype)
  model, shape = {"conv4": (mj.conv4(3, filters=4, input_shape=(16, 16, 1)), (16, 16, 1)),
                  "kao": (mj.kao_conv(3, filters=4), (28, 28, 1)),
                  "mlp": (mj.mlp(3, hidden=(8,), input_shape=(256,)), (256,))}[args.net]
  params = jax.tree.map(lambda a: a.astype(dtype), model.init(jax.random.key(0)))
  k1, k2 = jax.random.split(jax.random.key(1))
  tasks = mj.Task(jax.random.normal(k1, (8, 3, *shape), dtype), jnp.tile(jnp.arange(3), (8, 1)),
                  jax.random.normal(k2, (8, 6, *shape), dtype),
                  jnp.tile(jnp.arange(3).repeat(2), (8, 1)))

  loss_fn = mj.make_loss_fn(model.apply, mj.cross_entropy)

  def meta_grad(unroll: bool, use_jit: bool):
    def task_loss(p, task):  # metajax.adapt's plain-SGD inner loop, 2 steps, second order
      def step(q, _):
        g = jax.grad(loss_fn)(q, task.support_x, task.support_y)
        return jax.tree.map(lambda w, gw: w - 0.1 * gw, q, g), None

      q, _ = jax.lax.scan(step, p, None, length=2, unroll=unroll)
      return loss_fn(q, task.query_x, task.query_y)

    grad = jax.grad(lambda p: jnp.mean(jax.vmap(task_loss, (None, 0))(p, tasks)))
    return (jax.jit(grad) if use_jit else grad)(params)

  ref = meta_grad(False, False)
  scale = max(float(np.max(np.abs(np.asarray(a)))) for a in jax.tree.leaves(ref))
  print(f"{args.net} {args.dtype}: max |g - g_rolled_eager| / max |g_rolled_eager|")
  for unroll in (False, True):
    for use_jit in (False, True):
      g = meta_grad(unroll, use_jit)
      diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                 for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(g)))
      print(f"  {'unrolled' if unroll else 'rolled':8s} {'jit' if use_jit else 'eager':5s} "
            f"{diff / scale:.2e}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
