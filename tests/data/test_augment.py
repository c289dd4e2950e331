"""Tests of the affine augmentations: exact limiting cases, shapes, range, jit."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from metajax.data import augment as aug

F32_TOL = 1e-5


def _image(key, shape=(12, 10, 2)):
  return jax.random.uniform(key, shape)


class ApplyAffineTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters((12, 10, 2), (7, 9))
  def test_identity_params_give_the_identity(self, *shape):
    image = _image(jax.random.key(0), shape)
    out = self.variant(aug.apply_affine)(image, aug.identity_affine())
    np.testing.assert_array_equal(out, image)

  def test_rotation_by_a_right_angle_is_rot90(self):
    image = _image(jax.random.key(1), (9, 9, 1))
    params = aug.identity_affine()._replace(rotation=jnp.float32(math.pi / 2))
    out = aug.apply_affine(image, params)
    np.testing.assert_allclose(out, np.rot90(np.asarray(image), k=-1, axes=(0, 1)), atol=F32_TOL)

  @parameterized.parameters((1, 0), (0, 2), (-2, 1))
  def test_integer_translation_is_a_zero_filled_shift(self, dy, dx):
    image = np.asarray(_image(jax.random.key(2), (8, 8, 1)))
    params = aug.identity_affine()._replace(translate_y=jnp.float32(dy),
                                            translate_x=jnp.float32(dx))
    expected = np.zeros_like(image)
    src = image[max(0, -dy):8 - max(0, dy), max(0, -dx):8 - max(0, dx)]
    expected[max(0, dy):max(0, dy) + src.shape[0], max(0, dx):max(0, dx) + src.shape[1]] = src
    np.testing.assert_allclose(aug.apply_affine(image, params), expected, atol=F32_TOL)

  def test_scale_keeps_the_centre_pixel(self):
    image = _image(jax.random.key(3), (9, 9, 1))
    params = aug.identity_affine()._replace(scale=jnp.float32(1.1))
    np.testing.assert_allclose(aug.apply_affine(image, params)[4, 4], image[4, 4], atol=F32_TOL)

  def test_rejects_bad_inputs(self):
    with self.assertRaisesRegex(ValueError, "floating point"):
      aug.apply_affine(jnp.zeros((4, 4, 1), jnp.uint8), aug.identity_affine())
    with self.assertRaisesRegex(ValueError, "one image"):
      aug.apply_affine(jnp.zeros((2, 4, 4, 1)), aug.identity_affine())
    with self.assertRaisesRegex(ValueError, "scale_range"):
      aug.make_affine_augment(scale_range=(0.0, 1.0))
    with self.assertRaisesRegex(ValueError, "max_rotation"):
      aug.make_affine_augment(max_rotation=-1.0)


class RandomAugmentTest(chex.TestCase):

  def test_shape_dtype_range(self):
    augment = aug.make_affine_augment(max_shear=0.1)
    images = _image(jax.random.key(4), (6, 28, 28, 1))
    out = jax.jit(lambda k, x: aug.augment_batch(augment, k, x))(jax.random.key(5), images)
    chex.assert_shape(out, images.shape)
    chex.assert_type(out, jnp.float32)
    self.assertGreaterEqual(float(out.min()), 0.0)
    self.assertLessEqual(float(out.max()), 1.0)
    self.assertFalse(np.allclose(out, images))  # it does transform
    self.assertFalse(np.allclose(out[0], out[1]))  # each image has its own transform

  def test_jit_equals_no_jit_and_key_determines_output(self):
    augment = aug.make_affine_augment()
    image = _image(jax.random.key(6), (28, 28, 1))
    key = jax.random.key(7)
    np.testing.assert_allclose(jax.jit(augment)(key, image), augment(key, image), atol=F32_TOL)
    self.assertFalse(np.allclose(augment(jax.random.key(8), image), augment(key, image)))

  def test_sampled_params_in_range(self):
    params = jax.jit(jax.vmap(aug.sample_affine))(jax.random.split(jax.random.key(9), 500))
    self.assertLessEqual(float(jnp.max(jnp.abs(params.rotation))), aug.MAX_ROTATION)
    self.assertGreaterEqual(float(params.scale.min()), 0.9)
    self.assertLessEqual(float(params.scale.max()), 1.1)
    for t in (params.translate_y, params.translate_x):
      self.assertLessEqual(float(jnp.max(jnp.abs(t))), 2.0)
    np.testing.assert_array_equal(params.shear, 0.0)

  def test_zero_ranges_give_the_identity(self):
    augment = aug.make_affine_augment(max_rotation=0.0, scale_range=(1.0, 1.0),
                                      max_translation=0.0)
    image = _image(jax.random.key(10), (10, 10, 1))
    np.testing.assert_array_equal(augment(jax.random.key(11), image), image)
    np.testing.assert_array_equal(aug.identity_augment(jax.random.key(11), image), image)


if __name__ == "__main__":
  pytest.main([__file__])
