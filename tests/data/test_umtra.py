"""Tests of UMTRA task sampling: shapes, labels, one source image per class, MAML trains on it."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized

import metajax as mj
from metajax.data import augment as aug
from metajax.data import umtra
from metajax.data import sample_meta_batch

C, M, SIZE = 6, 3, 8


def _constant_pool() -> np.ndarray:
  """Image (c, m) is the constant c * M + m + 1 (out of C * M + 1): its value names its source.
  Affine transforms with `mode="nearest"` keep a constant image constant."""
  ids = np.arange(1, C * M + 1, dtype=np.float32).reshape(C, M) / (C * M + 1)
  return np.broadcast_to(ids[:, :, None, None, None], (C, M, SIZE, SIZE, 1)).copy()


class UmtraTest(chex.TestCase):

  @parameterized.parameters((5, 1, 1), (3, 2, 4))
  def test_shapes_labels_and_one_source_per_class(self, ways, shots, queries):
    pool = _constant_pool()
    sample = umtra.make_umtra_sampler(
      pool, ways, shots=shots, queries=queries,
      augment=aug.make_affine_augment(mode="nearest"),
      support_augment=aug.make_affine_augment(mode="nearest"))
    task = jax.jit(sample)(jax.random.key(0), pool)
    chex.assert_shape([task.support_x, task.query_x],
                      [(ways * shots, SIZE, SIZE, 1), (ways * queries, SIZE, SIZE, 1)])
    chex.assert_type([task.support_x, task.support_y], [jnp.float32, jnp.int32])
    np.testing.assert_array_equal(task.support_y, np.repeat(np.arange(ways), shots))
    np.testing.assert_array_equal(task.query_y, np.repeat(np.arange(ways), queries))
    support = np.asarray(task.support_x).reshape(ways, shots, -1)
    query = np.asarray(task.query_x).reshape(ways, queries, -1)
    source = support[:, 0, 0]  # [ways]: the id of each class's source image
    np.testing.assert_allclose(support, np.broadcast_to(source[:, None, None], support.shape),
                               rtol=1e-6)
    np.testing.assert_allclose(query, np.broadcast_to(source[:, None, None], query.shape),
                               rtol=1e-6)
    self.assertLen(np.unique(source), ways)  # distinct images, one per class

  def test_query_is_an_augmentation_of_the_support_image(self):
    pool = jax.random.uniform(jax.random.key(1), (C, M, SIZE, SIZE, 1))
    sample = umtra.make_umtra_sampler(pool, 4, queries=2, augment=aug.make_affine_augment())
    task = jax.jit(sample)(jax.random.key(2), pool)
    flat = np.asarray(pool).reshape(C * M, -1)
    for x in np.asarray(task.support_x).reshape(4, -1):  # the support images are pool images
      self.assertTrue(np.any(np.all(flat == x, axis=1)))
    self.assertFalse(np.allclose(task.query_x[0], task.support_x[0]))
    self.assertFalse(np.allclose(task.query_x[0], task.query_x[1]))  # fresh views

  def test_uint8_pool_and_validation(self):
    pool = (_constant_pool() * 255).astype(np.uint8)
    sample = umtra.make_umtra_sampler(pool, 2, augment=aug.identity_augment)
    task = sample(jax.random.key(3), pool)
    self.assertLessEqual(float(task.support_x.max()), 1.0)
    np.testing.assert_array_equal(task.support_x, task.query_x)  # identity augmentations
    with self.assertRaisesRegex(ValueError, "ways=19"):
      umtra.make_umtra_sampler(pool, C * M + 1, augment=aug.identity_augment)
    with self.assertRaisesRegex(ValueError, "queries"):
      umtra.make_umtra_sampler(pool, 2, queries=0, augment=aug.identity_augment)

  def test_maml_with_zeroing_meta_trains_on_umtra_tasks(self):
    pool = jax.random.uniform(jax.random.key(4), (C, M, SIZE, SIZE, 1))
    sample = umtra.make_umtra_sampler(pool, 3, queries=2, augment=aug.make_affine_augment())
    tasks = jax.jit(lambda k: sample_meta_batch(sample, k, pool, num_tasks=4))(jax.random.key(5))
    model = mj.mlp(3, hidden=(16,), input_shape=(SIZE, SIZE, 1))
    learner = mj.with_zeroing(mj.MAML(model.apply, mj.cross_entropy, inner_lr=0.5))
    meta_step = mj.make_meta_step(learner, optax.adam(1e-2))
    state = meta_step.init(model.init(jax.random.key(6)))
    losses = []
    for _ in range(3):
      state, metrics = meta_step.step(state, tasks)
      losses.append(float(metrics["outer/loss"]))
    self.assertLess(losses[-1], losses[0])


if __name__ == "__main__":
  pytest.main([__file__])
