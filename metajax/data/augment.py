"""Image augmentations as pure, jittable functions of a PRNG key.

Small random affine transforms suit Omniglot characters (a rotated, slightly scaled or shifted
character is still the same character): rotation within +-15 degrees, scale in [0.9, 1.1],
translation within +-2 pixels and, optionally, shear. An augmentation is

    augment(key, image [H, W, C]) -> image [H, W, C]

built in two pure halves: `sample_affine(key, ...) -> AffineParams` draws the transform and
`apply_affine(image, params)` resamples the image by bilinear interpolation
(`jax.scipy.ndimage.map_coordinates`, order 1). Pixels that come from outside the image get
`cval` (0: Omniglot's background in metajax pools, strokes are 1 on 0). `augment_batch` vmaps an
augmentation over a batch with one key per image.

    augment = make_affine_augment()                      # Omniglot defaults
    views = augment_batch(augment, key, images)          # [B, H, W, C] -> [B, H, W, C]
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from metajax.types import Array, ArrayLike, PRNGKey

# augment(key, image [H, W, C]) -> image [H, W, C]
Augment = Callable[[PRNGKey, Array], Array]

MAX_ROTATION = math.radians(15.0)
SCALE_RANGE = (0.9, 1.1)
MAX_TRANSLATION = 2.0
MAX_SHEAR = 0.0


class AffineParams(NamedTuple):
  """One affine transform about the image centre (scalars, or `[B]` for a batch).

  The forward map sends input pixel q (row, col) to `R(rotation) Sh(shear) scale (q - c) + c + t`,
  with c the image centre and t = (translate_y, translate_x): a positive rotation turns the
  content clockwise as displayed (row axis pointing down; pi/2 is `np.rot90(image, k=-1)`), a
  positive translate_y moves it down, a scale above 1 enlarges it.

  Attributes:
    rotation: angle in radians.
    scale: isotropic zoom factor (> 0).
    shear: shear factor (x' = x + shear * y before rotating), 0 for none.
    translate_y: shift along the row axis, in pixels.
    translate_x: shift along the column axis, in pixels.
  """

  rotation: Array
  scale: Array
  shear: Array
  translate_y: Array
  translate_x: Array


def identity_affine(dtype: jnp.dtype = jnp.float32) -> AffineParams:
  """The transform that leaves every image exactly unchanged."""
  zero, one = jnp.zeros((), dtype), jnp.ones((), dtype)
  return AffineParams(rotation=zero, scale=one, shear=zero, translate_y=zero, translate_x=zero)


def sample_affine(
  key: PRNGKey,
  *,
  max_rotation: float = MAX_ROTATION,
  scale_range: tuple[float, float] = SCALE_RANGE,
  max_translation: float = MAX_TRANSLATION,
  max_shear: float = MAX_SHEAR,
  dtype: jnp.dtype = jnp.float32,
) -> AffineParams:
  """Draws rotation ~ U[-max_rotation, max_rotation] (radians), scale ~ U[scale_range],
  shear ~ U[-max_shear, max_shear], translations ~ U[-max_translation, max_translation] (pixels,
  continuous: the image is interpolated)."""
  low, high = scale_range
  if not 0.0 < low <= high:
    raise ValueError(f"scale_range must be (low, high) with 0 < low <= high, got {scale_range}")
  for name, value in (("max_rotation", max_rotation), ("max_translation", max_translation),
                      ("max_shear", max_shear)):
    if value < 0:
      raise ValueError(f"{name} must be >= 0, got {value}")
  k_rot, k_scale, k_shear, k_t = jax.random.split(key, 4)
  sym = lambda k, m, shape=(): jax.random.uniform(k, shape, dtype, -m, m)  # noqa: E731
  ty, tx = sym(k_t, max_translation, (2,))
  return AffineParams(rotation=sym(k_rot, max_rotation),
                      scale=jax.random.uniform(k_scale, (), dtype, low, high),
                      shear=sym(k_shear, max_shear), translate_y=ty, translate_x=tx)


def _inverse_matrix(params: AffineParams) -> Array:
  """The inverse of the 2x2 linear part `R Sh scale` in (row, col) coordinates, in closed form."""
  cos, sin = jnp.cos(params.rotation), jnp.sin(params.rotation)
  # Forward in (x=col, y=row) coordinates: [x', y'] = R [[s, s*h], [0, s]] [x, y]; in (row, col)
  # the same map is P M P with P the swap. Its inverse: (1/s) Sh^-1 R^-1.
  inv_rot = jnp.array([[cos, sin], [-sin, cos]])  # R^-1 acting on (x, y), R = [[c, -s], [s, c]]
  inv_shear = jnp.array([[1.0, -params.shear], [0.0, 1.0]]).astype(cos.dtype)
  inv_xy = inv_shear @ inv_rot / params.scale  # acts on (x, y)
  swap = jnp.array([[0.0, 1.0], [1.0, 0.0]], inv_xy.dtype)
  return swap @ inv_xy @ swap  # acts on (row, col)


def apply_affine(image: ArrayLike, params: AffineParams, *, cval: float = 0.0,
                 mode: str = "constant") -> Array:
  """Resamples one image under an affine transform (bilinear interpolation).

  Output pixel p takes the input's value at `T^-1(p) = M^-1 (p - c - t) + c`; with the identity
  transform these are exactly the integer pixel positions, so the image is returned unchanged.

  Args:
    image: `[H, W, C]` (or `[H, W]`) floating point.
    params: the transform (scalars), e.g. from `sample_affine` or `identity_affine`.
    cval: value of pixels sampled from outside the image when `mode="constant"`.
    mode: `map_coordinates`' boundary mode ("constant", "nearest", "reflect", "mirror", "wrap").

  Returns:
    The transformed image, same shape and dtype. For values in [lo, hi] with cval in [lo, hi]
    the result stays in [lo, hi] (bilinear interpolation takes convex combinations).
  """
  image = jnp.asarray(image)
  if image.ndim not in (2, 3):
    raise ValueError(f"apply_affine takes one image [H, W] or [H, W, C], got shape {image.shape}")
  if not jnp.issubdtype(image.dtype, jnp.floating):
    raise ValueError(f"apply_affine needs a floating point image, got {image.dtype}")
  h, w = image.shape[:2]
  dtype = image.dtype
  rows, cols = jnp.meshgrid(jnp.arange(h, dtype=dtype), jnp.arange(w, dtype=dtype), indexing="ij")
  centre = jnp.array([(h - 1) / 2.0, (w - 1) / 2.0], dtype)
  shift = jnp.stack([params.translate_y, params.translate_x]).astype(dtype)
  out = jnp.stack([rows.ravel(), cols.ravel()])  # 2P
  src = _inverse_matrix(params).astype(dtype) @ (out - (centre + shift)[:, None]) + centre[:, None]
  src = src.reshape(2, h, w)

  def resample(channel: Array) -> Array:
    return jax.scipy.ndimage.map_coordinates(channel, [src[0], src[1]], order=1, mode=mode,
                                             cval=cval)

  if image.ndim == 2:
    return resample(image)
  return jax.vmap(resample, in_axes=-1, out_axes=-1)(image)


def make_affine_augment(
  *,
  max_rotation: float = MAX_ROTATION,
  scale_range: tuple[float, float] = SCALE_RANGE,
  max_translation: float = MAX_TRANSLATION,
  max_shear: float = MAX_SHEAR,
  cval: float = 0.0,
  mode: str = "constant",
) -> Augment:
  """Returns `augment(key, image) -> image`: a random affine transform, `sample_affine` then
  `apply_affine` (defaults: Omniglot-sensible, rotation +-15 degrees, scale 0.9-1.1,
  translation +-2 px, no shear, background 0)."""
  # Validate now, with a dummy key, rather than at the first traced call.
  sample_affine(jax.random.key(0), max_rotation=max_rotation, scale_range=scale_range,
                max_translation=max_translation, max_shear=max_shear)

  def augment(key: PRNGKey, image: Array) -> Array:
    image = jnp.asarray(image)
    params = sample_affine(key, max_rotation=max_rotation, scale_range=scale_range,
                           max_translation=max_translation, max_shear=max_shear,
                           dtype=image.dtype)
    return apply_affine(image, params, cval=cval, mode=mode)

  return augment


def identity_augment(key: PRNGKey, image: Array) -> Array:
  """The augmentation that returns its image unchanged (ignores the key)."""
  del key
  return jnp.asarray(image)


def augment_batch(augment: Augment, key: PRNGKey, images: ArrayLike) -> Array:
  """Applies `augment` to each image of `[B, H, W, C]` with its own key (`split(key, B)`)."""
  images = jnp.asarray(images)
  keys = jax.random.split(key, images.shape[0])
  return jax.vmap(augment)(keys, images)


__all__ = [
  "AffineParams",
  "Augment",
  "apply_affine",
  "augment_batch",
  "identity_affine",
  "identity_augment",
  "make_affine_augment",
  "sample_affine",
]
