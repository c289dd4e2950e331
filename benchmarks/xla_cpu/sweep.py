r"""Sweep: which (inner loop, XLA:CPU emitter setting) pairs give right second-order meta-gradients.

For each configuration (network, activation, tasks, inner steps, BatchNorm derivative), the float64
meta-gradient of `metajax.meta_loss` (the library's `MAML`, second order) is computed op by op
(the reference) and then jitted four ways: the inner loop rolled / unrolled (`MAML.unroll`), each
under `jax.jit` (XLA:CPU's fusion emitters on) and `metajax.platform.xla.jit` (off). A cell is the largest
absolute difference to the reference relative to its largest entry; float64 rounding gives
~1e-15, so anything above `--tol` (1e-9) is a wrong program. `benchmarks/xla_cpu/miscompile.py`
prints single cases; this counts how often each pair is wrong.

  python benchmarks/xla_cpu/sweep.py [--nets=conv4,kao] [--tasks=1,2,4,8] [--steps=2,3,5]
      [--activations=relu,softplus] [--norms=fused] [--json=PATH]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time

PAIRS = (("rolled", "jax.jit"), ("rolled", "xla.jit"), ("unrolled", "jax.jit"),
         ("unrolled", "xla.jit"))


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--nets", default="conv4,kao")
  p.add_argument("--tasks", default="1,2,4,8")
  p.add_argument("--steps", default="2,3,5")
  p.add_argument("--activations", default="relu,softplus")
  p.add_argument("--norms", default="fused", help="fused and/or plain (metajax.nn.norm)")
  p.add_argument("--filters", type=int, default=4)
  p.add_argument("--tol", type=float, default=1e-9)
  p.add_argument("--json", default=None, help="write every cell there (atomically)")
  args = p.parse_args(argv)

  import jax

  jax.config.update("jax_enable_x64", True)  # a script's process: nothing else shares it
  import jax.numpy as jnp
  import numpy as np

  import metajax as mj

  acts = {"relu": jax.nn.relu, "softplus": jax.nn.softplus}

  def problem(net, act, fused, num_tasks, seed):
    if net == "conv4":
      model = mj.conv4(3, filters=args.filters, input_shape=(16, 16, 1), activation=acts[act],
                       fused_norm=fused)
      shape = (16, 16, 1)
    else:
      model = mj.kao_conv(3, filters=args.filters, activation=acts[act], fused_norm=fused)
      shape = (28, 28, 1)
    k0, k1, k2 = jax.random.split(jax.random.key(seed), 3)
    tasks = mj.Task(jax.random.normal(k1, (num_tasks, 3, *shape), jnp.float64),
                    jnp.tile(jnp.arange(3), (num_tasks, 1)),
                    jax.random.normal(k2, (num_tasks, 6, *shape), jnp.float64),
                    jnp.tile(jnp.arange(3).repeat(2), (num_tasks, 1)))
    params = jax.tree.map(lambda a: a.astype(jnp.float64), model.init(k0))
    return model, params, tasks

  def rel(got, ref):
    scale = max(float(np.max(np.abs(np.asarray(a)))) for a in jax.tree.leaves(ref))
    return max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
               for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref))) / scale

  configs = list(itertools.product(args.nets.split(","), args.activations.split(","),
                                   args.norms.split(","), map(int, args.tasks.split(",")),
                                   map(int, args.steps.split(","))))
  print(f"{len(configs)} configurations, float64; cells: max |g - g_eager| / max |g_eager|, "
        f"'!' above {args.tol:g}")
  print(f"{'net':6s} {'act':8s} {'norm':5s} {'tasks':>5s} {'steps':>5s} "
        + " ".join(f"{r + ' ' + j:>17s}" for r, j in PAIRS))
  cells, t0 = [], time.perf_counter()
  for i, (net, act, norm, num_tasks, steps) in enumerate(configs):
    model, params, tasks = problem(net, act, norm == "fused", num_tasks, seed=i)

    def grad_fn(unroll):
      learner = mj.MAML(model.apply, mj.cross_entropy, num_inner_steps=steps, inner_lr=0.1,
                        unroll=unroll)
      return jax.grad(lambda p: mj.meta_loss(p, tasks, learner))

    ref = grad_fn(1)(params)  # op by op
    row = {}
    for loop, how in PAIRS:
      fn = grad_fn(True if loop == "unrolled" else 1)
      jitted = jax.jit(fn) if how == "jax.jit" else mj.platform.xla.jit(fn)
      row[f"{loop} {how}"] = rel(jitted(params), ref)
    cells.append({"net": net, "activation": act, "norm": norm, "tasks": num_tasks,
                  "steps": steps, "seed": i, **row})
    print(f"{net:6s} {act:8s} {norm:5s} {num_tasks:5d} {steps:5d} "
          + " ".join(f"{v:16.1e}{'!' if v > args.tol else ' '}" for v in row.values()),
          flush=True)
  wrong = {k: sum(c[k] > args.tol for c in cells) for k in (f"{r} {j}" for r, j in PAIRS)}
  print(f"wrong ({time.perf_counter() - t0:.0f} s): "
        + ", ".join(f"{k} {n}/{len(cells)}" for k, n in wrong.items()))
  if args.json:
    d = os.path.dirname(os.path.abspath(args.json))
    with tempfile.NamedTemporaryFile("w", dir=d, delete=False, suffix=".tmp") as f:
      json.dump({"command": " ".join(["python", *sys.argv]), "jax": jax.__version__,
                 "tol": args.tol, "wrong": wrong, "cells": cells}, f, indent=1)
    os.chmod(f.name, 0o644)  # NamedTemporaryFile makes it private
    os.replace(f.name, args.json)
  return 0


if __name__ == "__main__":
  sys.exit(main())
