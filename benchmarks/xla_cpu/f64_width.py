r"""Reproducer: XLA:CPU computes a wrong float64 Hessian-vector product at 48+ channels.

Standalone (JAX only, no metajax), for XLA's bug tracker. The function is one 3x3 convolution
(1 -> C channels, SAME, `lax.conv_general_dilated`) -> BatchNorm with batch statistics (the plain
formula) -> optional ReLU -> 2x2 max-pool (reshape + `jnp.max`) -> linear head -> softmax
cross-entropy, on 5 images of 8x8. Printed: for its Hessian-vector product along the parameters
themselves (`jax.jvp` of `jax.grad`, what second-order MAML needs), max |compiled - op by op| /
max |op by op| with `jax.jit` (fusion emitters on, the default), with
`xla_cpu_use_fusion_emitters=False` and with `xla_disable_hlo_passes=algsimp`, in float64 and float32 (both against the float64 op-by-op
product, run under `jax.disable_jit()`).

  python benchmarks/xla_cpu/f64_width.py [--channels=16,32,48,64]

On jax/jaxlib 0.10.2 (2-core AMD EPYC, 2026-11-30), float64: right (< 1e-15) at 16 and 32
channels; at 48 and 64 NaN with ReLU and 0.67-0.77 off without it, under either emitter
setting. With `XLA_FLAGS=--xla_disable_hlo_passes=fusion` every float64 cell at 48 and 64 equals
the op-by-op product exactly, and so does every float64 cell with `algsimp` disabled (2026-11-30:
4.3e-16 to 6.6e-16; what `metajax.platform.xla.jit` now compiles with). float32 is right at every width (2e-7 to 5e-7, rounding). The
gradient alone (no second order) is right in float64; so is the product without the BatchNorm,
or without the max-pool (variants of this script).
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp


def problem(channels: int, relu: bool):
  """-> (loss(params), params) in float64."""
  n, size, ways = 5, 8, 5
  k = jax.random.split(jax.random.key(0), 3)
  x = jax.random.uniform(k[0], (n, size, size, 1), jnp.float64)
  y = jnp.arange(n) % ways
  params = {"w": jax.random.normal(k[1], (3, 3, 1, channels), jnp.float64) / 3,
            "b": jnp.zeros(channels, jnp.float64), "scale": jnp.ones(channels, jnp.float64),
            "shift": jnp.zeros(channels, jnp.float64),
            "head": jax.random.normal(k[2], ((size // 2) ** 2 * channels, ways), jnp.float64) / 100}

  def loss(p):
    h = jax.lax.conv_general_dilated(x.astype(p["w"].dtype), p["w"], (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC")) + p["b"]
    mean = jnp.mean(h, axis=(0, 1, 2))
    var = jnp.mean(jnp.square(h - mean), axis=(0, 1, 2))
    h = (h - mean) * jax.lax.rsqrt(var + 1e-5) * p["scale"] + p["shift"]
    if relu:
      h = jax.nn.relu(h)
    h = jnp.max(h.reshape(n, size // 2, 2, size // 2, 2, channels), axis=(2, 4))
    logits = h.reshape(n, -1) @ p["head"]
    return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, y[:, None], 1)[:, 0])

  return loss, params


def rel(got, ref) -> float:
  scale = max(float(jnp.max(jnp.abs(r))) for r in jax.tree.leaves(ref))
  return max(float(jnp.max(jnp.abs(g.astype(r.dtype) - r)))
             for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref))) / scale


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--channels", default="16,32,48,64")
  args = p.parse_args(argv)
  jax.config.update("jax_enable_x64", True)  # a script's process: nothing else shares it
  print(f"{'channels':>8s} {'relu':>5s} | float64: {'emitters on':>11s} {'off':>8s} "
        f"{'no algsimp':>10s} | float32: {'on':>8s} {'off':>8s} {'no algsimp':>10s}")
  for channels in map(int, args.channels.split(",")):
    for relu in (False, True):
      loss, params = problem(channels, relu)
      hvp = lambda q, loss=loss: jax.jvp(jax.grad(loss), (q,), (q,))[1]  # noqa: E731
      with jax.disable_jit():
        ref = hvp(params)
      p32 = jax.tree.map(lambda a: a.astype(jnp.float32), params)
      cells = [rel(jax.jit(hvp, compiler_options=opts)(q), ref) for q in (params, p32)
               for opts in (None, {"xla_cpu_use_fusion_emitters": False},
                            {"xla_disable_hlo_passes": "algsimp"})]
      print(f"{channels:8d} {str(relu):>5s} |          {cells[0]:11.1e} {cells[1]:8.1e} "
            f"{cells[2]:10.1e} |          {cells[3]:8.1e} {cells[4]:8.1e} {cells[5]:10.1e}",
            flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
