r"""Minimal reproducer: XLA:CPU computes a wrong one-step MAML meta-gradient under `jax.jit`.

Standalone (JAX only, no metajax), float64, for XLA's bug tracker. The network is one 3x3 conv
(SAME, no bias) -> BatchNorm with batch statistics -> 2x2 max-pool -> linear head, on 4x4x1
images, 2 channels, 3 classes; 2 tasks of 3 support and 3 query images. The meta-loss is the
mean over tasks (`vmap`) of the query loss after one plain gradient step on the support set; its
gradient with respect to the shared parameters is computed

  * eagerly, op by op (`jax.disable_jit()`), and checked against central finite differences;
  * under `jax.jit`, with XLA:CPU's fusion emitters on (the default) and off;
  * under `jax.jit` with `xla_disable_hlo_passes=algsimp`;
  * the same, with the inner step inside a one-iteration `lax.scan` (as `metajax.adapt` does).

Printed: max |g - g_eager| / max |g_eager| for each. On jax/jaxlib 0.10.2 (2-core AMD EPYC,
2026-11-30; eager agrees with central differences to 1e-8 relative):

  case                        loop-free: on / off / no algsimp   in lax.scan: on / off / no algsimp
  defaults                    2.6e-16 / 1.4e-2 / 3.1e-16         4.8e-16 / 3.7e-16 / 3.7e-16
  --size=8                    9.6e-2  / 9.6e-2 / 5.3e-16         9.6e-2  / 8.7e-16 / 4.8e-16
  --tasks=8                   1.2e-1  / 1.3e-1 / 4.9e-16         1.2e-1  / 4.9e-16 / 6.1e-16
  --pool=max                  2.5e-16 / 3.5e-2 / 3.1e-16         5.4e-16 / 3.9e-2  / 3.7e-16
  --pool=reduce_window, --tasks=1: right (< 1e-15) in every column

So disabling `algsimp` makes every case right; the loop-free gradient is wrong under either
emitter setting; inside the loop it is wrong with the emitters on (`--size=8`, `--tasks=8`) or
with `jnp.max`'s derivative. (metajax once relied on the one combination of the other
columns that was right in every case: the inner step in a rolled `lax.scan`, the emitters off,
the max-pool differentiated through one argmax; it now compiles with `algsimp` disabled, which
also fixes the unrolled loop and float64 at 48+ channels, `metajax.platform.xla`.) The loop-free
gradient without the conv, or without the BatchNorm, was right too (the defaults and `--size=8`,
either emitter setting; variants of this script). It is not rounding at
a kink: there is no activation, and the smallest gap between the two largest entries of any
pooling window is printed (1.7e-3 at the defaults).

  python benchmarks/xla_cpu/minimal.py [--tasks=2] [--size=4] [--channels=2]
      [--pool=argmax|max|reduce_window] [--json=PATH]

`--json` also writes the numbers (the versions, the directional derivatives, every cell) to PATH;
`tests/platform/test_xla.py` runs `--size=8` that way under the installed jaxlib, so CI tells the
day a jaxlib compiles it right without the option.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--tasks", type=int, default=2)
  p.add_argument("--size", type=int, default=4, help="image height and width (even)")
  p.add_argument("--channels", type=int, default=2)
  p.add_argument("--pool", default="argmax", choices=["argmax", "max", "reduce_window"],
                 help="max-pool derivative: through one argmax (metajax's), jnp.max's own "
                      "rule, or lax.reduce_window's")
  p.add_argument("--json", default=None, help="also write the numbers there")
  args = p.parse_args(argv)

  import json

  import jax
  import jaxlib

  jax.config.update("jax_enable_x64", True)  # a script's process: nothing else shares it
  import jax.numpy as jnp
  import numpy as np

  @jax.custom_jvp
  def window_max(w):
    return jnp.max(w, axis=-2)

  @window_max.defjvp
  def _window_max_jvp(primals, tangents):
    (w,), (t,) = primals, tangents
    onehot = jax.nn.one_hot(jnp.argmax(w, axis=-2), w.shape[-2], axis=-2, dtype=t.dtype)
    return jnp.max(w, axis=-2), jnp.sum(t * onehot, axis=-2)

  def windows(x):  # [n, h, w, c] -> [n, h/2, w/2, 4, c]
    n, h, w, c = x.shape
    return jnp.moveaxis(x.reshape(n, h // 2, 2, w // 2, 2, c), 2, 3).reshape(
      n, h // 2, w // 2, 4, c)

  def pool(x):
    if args.pool == "reduce_window":
      return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    return window_max(windows(x)) if args.pool == "argmax" else jnp.max(windows(x), axis=-2)

  def normed(params, x):
    x = jax.lax.conv_general_dilated(x, params["kernel"], (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
    return (x - mean) / jnp.sqrt(var + 1e-5) * params["scale"] + params["bias"]

  def loss(params, x, y):
    logits = pool(normed(params, x)).reshape(x.shape[0], -1) @ params["head"]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))

  def inner_step(params, x, y):
    return jax.tree.map(lambda w, g: w - 0.1 * g, params, jax.grad(loss)(params, x, y))

  def task_loss(params, sx, sy, qx, qy):
    return loss(inner_step(params, sx, sy), qx, qy)

  def task_loss_scan(params, sx, sy, qx, qy):
    adapted, _ = jax.lax.scan(lambda q, _: (inner_step(q, sx, sy), None), params, None, length=1)
    return loss(adapted, qx, qy)

  def meta_loss(task_fn):
    return lambda params, *tasks: jnp.mean(jax.vmap(task_fn, (None, 0, 0, 0, 0))(params, *tasks))

  c, s, t = args.channels, args.size, args.tasks
  keys = jax.random.split(jax.random.key(0), 4)
  params = {"kernel": jax.random.normal(keys[0], (3, 3, 1, c)) / 3, "scale": jnp.ones(c),
            "bias": jnp.zeros(c),
            "head": jax.random.normal(keys[1], ((s // 2) ** 2 * c, 3)) / np.sqrt((s // 2) ** 2 * c)}
  labels = jnp.tile(jnp.arange(3), (t, 1))
  tasks = (jax.random.normal(keys[2], (t, 3, s, s, 1)), labels,
           jax.random.normal(keys[3], (t, 3, s, s, 1)), labels)

  def leaves(tree):
    return [np.asarray(a) for a in jax.tree.leaves(tree)]

  def rel(got, ref):
    return (max(float(np.max(np.abs(a - b))) for a, b in zip(got, ref))
            / max(float(np.max(np.abs(b))) for b in ref))

  gaps = []
  for i in range(t):  # the support pass at the initial params, one task at a time
    top = jnp.sort(windows(normed(params, tasks[0][i])), axis=-2)
    gaps.append(float(jnp.min(top[..., -1, :] - top[..., -2, :])))
  print(f"jax {jax.__version__}, jaxlib {jaxlib.__version__}; {t} tasks, {s}x{s} images, "
        f"{c} channels, pool {args.pool}; smallest top-2 gap of a pooling window (support, "
        f"initial params): {min(gaps):.1e}")

  grad = jax.grad(meta_loss(task_loss))
  with jax.disable_jit():
    ref = leaves(grad(params, *tasks))
  direction = [np.asarray(jax.random.normal(jax.random.key(10 + i), a.shape))
               for i, a in enumerate(ref)]
  treedef = jax.tree.structure(params)
  h = 1e-5
  with jax.disable_jit():
    f = meta_loss(task_loss)
    plus = f(jax.tree.map(lambda a, d: a + h * d, params, jax.tree.unflatten(treedef, direction)),
             *tasks)
    minus = f(jax.tree.map(lambda a, d: a - h * d, params, jax.tree.unflatten(treedef, direction)),
              *tasks)
  fd = float((plus - minus) / (2 * h))
  eager_dd = sum(float(np.vdot(g, d)) for g, d in zip(ref, direction))
  print(f"directional derivative: central differences {fd:.10f}, eager gradient {eager_dd:.10f}")

  print("max |g - g_eager| / max |g_eager|:")
  print(f"  {'formulation':22s} {'emitters on':>12s} {'emitters off':>13s} {'no algsimp':>11s}")
  columns = {"emitters on": {}, "emitters off": {"xla_cpu_use_fusion_emitters": False},
             "no algsimp": {"xla_disable_hlo_passes": "algsimp"}}
  cells = {}
  for name, task_fn in (("loop-free", task_loss), ("lax.scan, 1 iteration", task_loss_scan)):
    row = {}
    for column, options in columns.items():
      fn = jax.jit(jax.grad(meta_loss(task_fn)), compiler_options=options or None)
      row[column] = rel(leaves(fn(params, *tasks)), ref)
    cells[name] = row
    print(f"  {name:22s} {row['emitters on']:12.1e} {row['emitters off']:13.1e} "
          f"{row['no algsimp']:11.1e}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"jax": jax.__version__, "jaxlib": jaxlib.__version__, "args": vars(args),
                 "central_differences": fd, "eager": eager_dd, "smallest_gap": min(gaps),
                 "cells": cells}, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
