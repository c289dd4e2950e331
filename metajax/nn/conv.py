"""Fast convolution and pooling primitives for meta-learning on CPU.

Why this module exists: MAML vmaps a model over tasks with *per-task* adapted weights. Under
`vmap`, `lax.conv_general_dilated` with a batched kernel becomes a grouped convolution
(`feature_group_count = num_tasks`), and its first and second derivatives become more grouped
convolutions with swapped dimension numbers. XLA:CPU runs those slowly (a few GFLOP/s on the
second-order meta-step; `benchmarks/bench.py --conv=lax` times it). `reduce_window` max-pooling
differentiates through `select_and_scatter`, whose own derivative is slow too.

Here a convolution is written as *patches + matmul*: the padded input is cut into
`prod(kernel_size)` statically shifted (strided) slices, concatenated along the feature axis and
contracted with the reshaped kernel by one `dot_general`. Every derivative of that is again made of
slices, pads, concatenations and dots, and under `vmap` with per-task kernels the dot becomes a
*batched matmul*, which XLA:CPU runs at matmul speed. Max-pooling 2x2 is a reshape + max, with
a derivative through one argmax per window.

Both are drop-in replacements:

  nn.Conv(64, (3, 3), conv_general_dilated=metajax.nn.conv.conv_general_dilated_im2col)
  metajax.nn.conv.max_pool_2x2(x)  # == nn.max_pool(x, (2, 2), (2, 2), 'VALID')

`default_conv_impl(backend)` says which convolution to use on a backend (the im2col one on CPU;
`lax.conv_general_dilated` on GPU/TPU where cuDNN / the TPU convolution emitter are faster).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array
ArrayLike = jax.typing.ArrayLike

# The signature of `lax.conv_general_dilated`, which flax.linen.Conv's `conv_general_dilated`
# field expects.
ConvFn = Callable[..., Array]

__all__ = [
  "ConvFn",
  "conv_general_dilated_im2col",
  "default_conv_impl",
  "max_pool_2x2",
]


def _normalize_dilation(dilation: Sequence[int] | None, ndim: int) -> tuple[int, ...]:
  if dilation is None:
    return (1,) * ndim
  dilation = tuple(int(d) for d in dilation)
  if len(dilation) != ndim:
    raise ValueError(f"dilation {dilation} must have one entry per spatial dim ({ndim}).")
  return dilation


def conv_general_dilated_im2col(
  lhs: ArrayLike,
  rhs: ArrayLike,
  window_strides: Sequence[int],
  padding: str | Sequence[tuple[int, int]],
  lhs_dilation: Sequence[int] | None = None,
  rhs_dilation: Sequence[int] | None = None,
  dimension_numbers: Any = None,
  feature_group_count: int = 1,
  batch_group_count: int = 1,
  precision: Any = None,
  preferred_element_type: Any = None,
) -> Array:
  """`lax.conv_general_dilated` computed as shifted slices (im2col) + one `dot_general`.

  Same signature and semantics as `lax.conv_general_dilated` (so it can be passed as
  `flax.linen.Conv(conv_general_dilated=...)`), for any number of spatial dimensions, any
  `dimension_numbers` (NHWC/HWIO is the native layout; others are transposed to it), strides,
  `'SAME'`/`'SAME_LOWER'`/`'VALID'` or explicit `[(lo, hi), ...]` padding (negative allowed) and
  kernel (`rhs`) dilation.

  The patches are `prod(kernel_size)` strided static slices of the padded input, concatenated in
  `(kernel offsets..., in_features)` order, i.e. `[N, *out_spatial, K * C]`, and contracted with
  the kernel reshaped to `[K * C, F]`. All derivatives (to any order) are slices, pads and dots; under
  `vmap` over per-example kernels the dot is a batched matmul rather than a grouped convolution.

  Args:
    lhs: input, e.g. `[N, H, W, C]` for NHWC dimension numbers.
    rhs: kernel, e.g. `[KH, KW, C, F]` for HWIO.
    window_strides: one stride per spatial dimension.
    padding: `'SAME'`, `'SAME_LOWER'`, `'VALID'` or a sequence of `(low, high)` pairs.
    lhs_dilation: input (transposed-conv) dilation; only `None` or all ones is supported.
    rhs_dilation: kernel (atrous) dilation, or `None` for none.
    dimension_numbers: as `lax.conv_general_dilated` (`None` means NCHW/OIHW, as there; flax
      passes the numeric form of NHWC/HWIO).
    feature_group_count: must be 1.
    batch_group_count: must be 1.
    precision: passed to `dot_general` (e.g. `lax.Precision.HIGHEST`).
    preferred_element_type: passed to `dot_general`.

  Returns:
    The convolution, with the layout given by `dimension_numbers` (e.g. `[N, OH, OW, F]`).

  Raises:
    NotImplementedError: for `feature_group_count != 1`, `batch_group_count != 1`, or
      `lhs_dilation` other than ones.
  """
  lhs = jnp.asarray(lhs)
  rhs = jnp.asarray(rhs)
  if feature_group_count != 1 or batch_group_count != 1:
    raise NotImplementedError(
      "conv_general_dilated_im2col supports only feature_group_count=1 and batch_group_count=1 "
      f"(got {feature_group_count}, {batch_group_count}); use lax.conv_general_dilated."
    )
  nsp = lhs.ndim - 2
  if lhs_dilation is not None and any(int(d) != 1 for d in lhs_dilation):
    raise NotImplementedError(
      f"conv_general_dilated_im2col does not support lhs_dilation={tuple(lhs_dilation)} "
      "(transposed convolution); use lax.conv_general_dilated."
    )
  rhs_dilation = _normalize_dilation(rhs_dilation, nsp)
  strides = tuple(int(s) for s in window_strides)
  if len(strides) != nsp:
    raise ValueError(f"window_strides {strides} must have one entry per spatial dim ({nsp}).")

  dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  # Bring everything to N, spatial..., C  /  spatial..., I, O  (no-ops for NHWC / HWIO).
  lhs_perm = (dn.lhs_spec[0], *dn.lhs_spec[2:], dn.lhs_spec[1])
  rhs_perm = (*dn.rhs_spec[2:], dn.rhs_spec[1], dn.rhs_spec[0])
  x = jnp.transpose(lhs, lhs_perm) if lhs_perm != tuple(range(lhs.ndim)) else lhs
  w = jnp.transpose(rhs, rhs_perm) if rhs_perm != tuple(range(rhs.ndim)) else rhs

  n, *in_spatial, c = x.shape
  *kernel, c_in, f = w.shape
  if c_in != c:
    raise ValueError(f"input features {c} != kernel input features {c_in}.")
  eff_kernel = [(k - 1) * d + 1 for k, d in zip(kernel, rhs_dilation)]

  if isinstance(padding, str):
    pads = lax.padtype_to_pads(in_spatial, eff_kernel, strides, padding)
  else:
    pads = [(int(lo), int(hi)) for lo, hi in padding]
    if len(pads) != nsp:
      raise ValueError(f"padding {padding} must have one pair per spatial dim ({nsp}).")
  if any(lo != 0 or hi != 0 for lo, hi in pads):
    x = lax.pad(x, jnp.array(0, x.dtype), [(0, 0, 0), *[(lo, hi, 0) for lo, hi in pads], (0, 0, 0)])
  padded = x.shape[1:-1]
  out_spatial = [(p - ek) // s + 1 for p, ek, s in zip(padded, eff_kernel, strides)]
  if any(o <= 0 for o in out_spatial):
    raise ValueError(f"empty output: padded input {padded}, kernel {eff_kernel}, strides {strides}.")

  k_total = math.prod(kernel)
  if k_total == 1 and all(s == 1 for s in strides):
    patches = x  # 1x1 convolution: the input is the patch matrix.
  else:
    cols = []
    for offsets in itertools.product(*[range(k) for k in kernel]):
      start = [0, *[o * d for o, d in zip(offsets, rhs_dilation)], 0]
      limit = [n, *[st + (o - 1) * s + 1 for st, o, s in zip(start[1:-1], out_spatial, strides)], c]
      cols.append(lax.slice(x, start, limit, [1, *strides, 1]))
    patches = cols[0] if len(cols) == 1 else lax.concatenate(cols, nsp + 1)  # [N, *out, K*C]

  w2 = w.reshape(k_total * c, f)  # [K*C, F], (offsets..., c) row order matches the concat.
  y = lax.dot_general(
    patches,
    w2,
    (((nsp + 1,), (0,)), ((), ())),
    precision=precision,
    preferred_element_type=preferred_element_type,
  )  # [N, *out, F]
  out_perm = (dn.out_spec[0], *dn.out_spec[2:], dn.out_spec[1])
  if out_perm != tuple(range(y.ndim)):
    y = jnp.transpose(y, tuple(int(i) for i in np.argsort(out_perm)))
  return y


def max_pool_2x2(x: ArrayLike) -> Array:
  """2x2 max-pooling with stride 2 and VALID (floor) semantics, on NHWC input.

  Equal to `flax.linen.max_pool(x, (2, 2), strides=(2, 2), padding='VALID')` (odd trailing rows
  and columns are dropped), but written as reshape + max, so its derivatives are
  compares/selects and reshapes instead of `select_and_scatter` (whose own derivative XLA handles
  slowly). The derivative routes each window's tangent through the first of its maxima (row
  major), found by one `argmax`, as `reduce_window`'s does. Why not `jnp.max`'s own rule (the
  tangent averaged over every entry equal to the max): it compares the input with the max again,
  and XLA:CPU may recompute a fused input with different rounding for the two, so that no entry
  matches and the gradient is wrong (`benchmarks/xla_cpu/miscompile.py --case=max_pool`).

  Args:
    x: `[..., H, W, C]` array (any leading batch dimensions).

  Returns:
    `[..., H // 2, W // 2, C]` array.
  """
  x = jnp.asarray(x)
  *lead, h, w, c = x.shape
  ho, wo = h // 2, w // 2
  if ho == 0 or wo == 0:
    raise ValueError(f"max_pool_2x2 needs H, W >= 2, got {(h, w)}.")
  if (h, w) != (2 * ho, 2 * wo):
    x = x[..., : 2 * ho, : 2 * wo, :]
  # [..., ho, 2, wo, 2, c] -> [..., ho, wo, 4, c]: the window on one axis, for max and argmax.
  x = jnp.moveaxis(x.reshape(*lead, ho, 2, wo, 2, c), -4, -3).reshape(*lead, ho, wo, 4, c)
  return _window_max(x)


@jax.custom_jvp
def _window_max(w: Array) -> Array:
  """Max over axis -2, differentiated through the first argmax (see `max_pool_2x2`)."""
  return jnp.max(w, axis=-2)


@_window_max.defjvp
def _window_max_jvp(primals, tangents):
  (w,), (t,) = primals, tangents
  first = jnp.argmax(w, axis=-2)  # one reduction: the tangent and its transpose agree on it
  onehot = (first[..., None, :] == jnp.arange(w.shape[-2])[:, None]).astype(t.dtype)
  return jnp.max(w, axis=-2), jnp.sum(t * onehot, axis=-2)


def default_conv_impl(backend: str | None = None) -> ConvFn:
  """The fastest convolution for meta-learning on `backend` (default: `jax.default_backend()`).

  Returns `conv_general_dilated_im2col` on CPU and `lax.conv_general_dilated` elsewhere (GPU/TPU
  have fast native grouped and batched convolutions). Both have the `lax.conv_general_dilated`
  signature, so the result can be given to `flax.linen.Conv(conv_general_dilated=...)`.
  """
  backend = backend or jax.default_backend()
  if backend == "cpu":
    return conv_general_dilated_im2col
  return lax.conv_general_dilated
