"""Batch normalisation with the current batch's statistics, with a compact derivative.

MAML normalises every task's activations with that task's own batch statistics (no running
averages; Finn et al. 2017). `batch_stat_norm` computes exactly that, `(x - mean) / sqrt(var + eps)
* scale + bias` over every axis but the last, and gives it a hand-written JVP (`jax.custom_jvp`):

  xhat  = (x - mean) * inv,   inv = 1 / sqrt(var + eps)
  dxhat = inv * (dx - mean(dx) - xhat * mean(dx * xhat))
  dy    = scale * dxhat + dscale * xhat + dbias

This tangent map is linear in `(dx, dscale, dbias)` and written with `xhat` and `inv` only, so
JAX's transpose of it (reverse mode) is the textbook fused backward,
`dx = scale * inv * (g - mean(g) - xhat * mean(g * xhat))`, whose two sums also give
`dbias = sum(g)` and `dscale = sum(g * xhat)`, instead of the chain of cotangents through `var`
and `mean` that autodiff of the forward formula builds (more reductions and full-size
intermediates). Because it is a JVP rule, every transform works:
`jax.grad` to any order (second-order MAML differentiates the rule itself, which is plain JAX),
`jax.jvp`, `jax.jacfwd`, forward-over-reverse Hessian-vector products.

`fused=False` differentiates the forward formula instead (the reference the tests compare with).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from metajax.types import Array

__all__ = ["batch_stat_norm"]


def _normalize(x: Array, epsilon: float) -> tuple[Array, Array]:
  """-> (xhat, 1 / sqrt(var + eps)), statistics over every axis but the last."""
  axes = tuple(range(x.ndim - 1))
  mean = jnp.mean(x, axis=axes, keepdims=True)
  # E[(x - mean)^2] rather than E[x^2] - mean^2: it stays >= 0 in float32.
  var = jnp.mean(jnp.square(x - mean), axis=axes, keepdims=True)
  inv = jax.lax.rsqrt(var + epsilon)
  return (x - mean) * inv, inv


def _plain(x: Array, scale: Array, bias: Array, epsilon: float) -> Array:
  xhat, _ = _normalize(x, epsilon)
  return xhat * scale + bias


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def _fused(x: Array, scale: Array, bias: Array, epsilon: float) -> Array:
  return _plain(x, scale, bias, epsilon)


@_fused.defjvp
def _fused_jvp(epsilon, primals, tangents):
  x, scale, bias = primals
  dx, dscale, dbias = tangents
  xhat, inv = _normalize(x, epsilon)
  axes = tuple(range(x.ndim - 1))
  # scale * dxhat, with every per-channel factor applied to the [1, ..., C] means before they
  # broadcast: transposed, the means become sum(g) and sum(g * xhat), the very sums that give
  # dbias and dscale, so XLA computes two reductions for all three cotangents.
  c = scale * inv
  dy = (c * dx - c * jnp.mean(dx, axis=axes, keepdims=True)
        - xhat * (c * jnp.mean(dx * xhat, axis=axes, keepdims=True)))
  return xhat * scale + bias, dy + xhat * dscale + dbias


def batch_stat_norm(x: Array, scale: Array, bias: Array, epsilon: float = 1e-5, *,
                    fused: bool = True) -> Array:
  """Normalises `x` with its own batch statistics, then scales and shifts per channel.

  Args:
    x: `[..., C]`; mean and variance are taken over every axis but the last.
    scale: `[C]`.
    bias: `[C]`.
    epsilon: added to the variance.
    fused: differentiate through the compact JVP rule (faster; every transform). False: the
      forward formula differentiated by JAX (the same values within rounding).

  Returns:
    `(x - mean) / sqrt(var + epsilon) * scale + bias`, the shape of `x`.
  """
  if x.ndim < 2:
    raise ValueError(f"batch_stat_norm needs x of rank >= 2 ([batch..., C]), got shape {x.shape}")
  if scale.shape != x.shape[-1:] or bias.shape != x.shape[-1:]:
    raise ValueError(f"scale {scale.shape} and bias {bias.shape} must both be ({x.shape[-1]},), "
                     f"the last axis of x {x.shape}")
  if fused:
    return _fused(x, scale, bias, float(epsilon))
  return _plain(x, scale, bias, float(epsilon))
