"""Tests of metajax.data.samplers: episode sampling as a pure, jittable function of a key."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from metajax.data import (
  ClassPool,
  concatenate_pools,
  make_episode_sampler,
  random_subset,
  sample_episode,
  sample_meta_batch,
)
from metajax.types import Task

NUM_CLASSES, PER_CLASS = 12, 7


def _coded_pool(num_classes: int = NUM_CLASSES, per_class: int = PER_CLASS) -> np.ndarray:
  """A `[C, M, 2, 2, 1]` float pool whose image (c, m) is filled with code c * 100 + m."""
  codes = np.arange(num_classes)[:, None] * 100 + np.arange(per_class)[None, :]
  return np.broadcast_to(codes[:, :, None, None, None], (num_classes, per_class, 2, 2, 1)).astype(
    np.float32
  )


def _codes(x: np.ndarray) -> np.ndarray:
  """The (class, image) code of each image in `[..., 2, 2, 1]`."""
  return np.asarray(x)[..., 0, 0, 0].astype(np.int64)


def _check_episode(task: Task, ways: int, shots: int, queries: int) -> None:
  support = _codes(task.support_x)
  query = _codes(task.query_x)
  support_y, query_y = np.asarray(task.support_y), np.asarray(task.query_y)
  # Labels in range, each exactly shots / queries times.
  np.testing.assert_array_equal(np.bincount(support_y, minlength=ways), [shots] * ways)
  np.testing.assert_array_equal(np.bincount(query_y, minlength=ways), [queries] * ways)
  # No image twice in an episode; support and query disjoint.
  everything = np.concatenate([support, query])
  assert len(set(everything.tolist())) == len(everything)
  assert not set(support.tolist()) & set(query.tolist())
  # One class per label, distinct classes for distinct labels, shared by support and query.
  label_class = {}
  for codes, labels in ((support, support_y), (query, query_y)):
    for code, label in zip(codes, labels):
      assert label_class.setdefault(int(label), int(code) // 100) == int(code) // 100
  assert len(set(label_class.values())) == ways


class EpisodeSamplerTest(chex.TestCase):
  # Under jit only: eager equality is test_deterministic_and_jit_equals_eager, and op-by-op
  # sampling of new shapes costs seconds of per-primitive compilation on CPU.
  @chex.variants(with_jit=True)
  @parameterized.parameters((5, 1, 3), (3, 2, 5), (12, 1, 6))  # (12, 1, 6): all classes and images
  def test_episode_properties(self, ways, shots, queries):
    images = jnp.asarray(_coded_pool())
    sample = make_episode_sampler(images, ways, shots, queries)
    batch = self.variant(lambda key, images: sample_meta_batch(sample, key, images, num_tasks=8))(
      jax.random.key(1), images
    )
    chex.assert_shape(batch.support_x, (8, ways * shots, 2, 2, 1))
    chex.assert_shape(batch.query_x, (8, ways * queries, 2, 2, 1))
    chex.assert_type(batch.support_x, jnp.float32)
    chex.assert_type([batch.support_y, batch.query_y], jnp.int32)
    for i in range(8):
      _check_episode(jax.tree.map(lambda x, i=i: x[i], batch), ways, shots, queries)

  def test_deterministic_and_jit_equals_eager(self):
    images = jnp.asarray(_coded_pool())
    sample = make_episode_sampler(images, 5, 2, 3)
    key = jax.random.key(42)
    eager = sample(key, images)
    again = sample(key, images)
    jitted = jax.jit(sample)(key, images)
    chex.assert_trees_all_equal(eager, again)
    chex.assert_trees_all_equal(eager, jitted)
    # Label-major layout.
    np.testing.assert_array_equal(eager.support_y, [0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    np.testing.assert_array_equal(eager.query_y, np.repeat(np.arange(5), 3))
    other = sample(jax.random.key(43), images)
    assert not np.array_equal(eager.support_x, other.support_x)

  def test_meta_batch_equals_loop_over_split_keys(self):
    images = jnp.asarray(_coded_pool())
    sample = make_episode_sampler(images, 5, 2, 3)  # the shapes of the eager test above
    key = jax.random.key(7)
    batch = jax.jit(sample_meta_batch, static_argnums=0, static_argnames="num_tasks")(
      sample, key, images, num_tasks=6
    )
    chex.assert_shape(batch.support_x, (6, 10, 2, 2, 1))
    chex.assert_shape(batch.query_y, (6, 15))
    for i, subkey in enumerate(jax.random.split(key, 6)):
      chex.assert_trees_all_equal(jax.tree.map(lambda x, i=i: x[i], batch), sample(subkey, images))
    # Tasks differ across the batch.
    assert len({tuple(_codes(batch.support_x[i]).tolist()) for i in range(6)}) > 1

  def test_classes_and_label_assignment_are_uniformly_random(self):
    images = jnp.asarray(_coded_pool(num_classes=3, per_class=2))
    sample = make_episode_sampler(images, 2, 1, 1)
    batch = jax.jit(lambda key, images: sample_meta_batch(sample, key, images, num_tasks=600))(
      jax.random.key(0), images
    )
    label0_class = _codes(batch.support_x[:, 0]) // 100  # the class that got label 0
    label1_class = _codes(batch.support_x[:, 1]) // 100
    pairs = np.stack([label0_class, label1_class], 1)
    counts = {tuple(p): n for p, n in zip(*np.unique(pairs, axis=0, return_counts=True))}
    assert set(counts) == {(a, b) for a in range(3) for b in range(3) if a != b}
    assert min(counts.values()) > 600 / 6 * 0.6  # six ordered pairs, roughly equally often
    # Each image of a class is the support image about equally often.
    per_image = np.bincount(_codes(batch.support_x[:, 0]) % 100, minlength=2)
    assert per_image.min() > 0.35 * per_image.sum()

  def test_uint8_pool_is_scaled(self):
    pool = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 2, 2, 1) * 10
    sample = jax.jit(sample_episode, static_argnames=("ways", "shots", "queries", "dtype"))
    task = sample(jax.random.key(0), pool, ways=2, shots=1, queries=2)
    chex.assert_type(task.support_x, jnp.float32)
    values = np.concatenate([np.ravel(task.support_x), np.ravel(task.query_x)])
    assert set(np.round(values * 255).astype(int)) <= set(np.ravel(pool).tolist())
    assert values.max() <= 1.0
    bf16 = sample(jax.random.key(0), pool, ways=2, shots=1, queries=2, dtype=jnp.bfloat16)
    chex.assert_type(bf16.query_x, jnp.bfloat16)

  def test_class_pool_argument(self):
    pool = ClassPool(_coded_pool(), np.array([f"c{i}" for i in range(NUM_CLASSES)]))
    sample = make_episode_sampler(pool, 5, 1, 1)
    _check_episode(jax.jit(sample)(jax.random.key(0), pool.images), 5, 1, 1)
    assert len(pool) == NUM_CLASSES and pool.images_per_class == PER_CLASS
    both = concatenate_pools([pool, pool.take([0, 1])])
    assert both.num_classes == NUM_CLASSES + 2


def test_random_subset_is_uniform_over_ordered_subsets():
  draws = jax.jit(jax.vmap(lambda key: random_subset(key, 5, 2)))(
    jax.random.split(jax.random.key(0), 40_000)
  )
  pairs, counts = np.unique(np.asarray(draws), axis=0, return_counts=True)
  assert len(pairs) == 20 and np.all(pairs[:, 0] != pairs[:, 1])  # all 5 * 4 ordered pairs
  # Each has probability 1/20: 2000 expected, standard deviation ~44.
  assert np.all(np.abs(counts - 2000) < 250)
  full = jax.jit(random_subset, static_argnums=(1, 2))(jax.random.key(1), 9, 9)
  np.testing.assert_array_equal(np.sort(full), np.arange(9))
  with pytest.raises(ValueError, match="0 <= k <= n, got k=4, n=3"):
    random_subset(jax.random.key(0), 3, 4)


class BadEpisodeSpecTest(parameterized.TestCase):
  @parameterized.parameters(
    (13, 1, 1, r"ways=13 is more than the 12 classes in this pool; allowed: 1 <= ways <= 12"),
    (5, 4, 4, r"shots \+ queries = 4 \+ 4 = 8 is more than the 7 images per class"),
    (0, 1, 1, r"ways must be an int >= 1, got 0"),
    (5, 0, 1, r"shots must be an int >= 1, got 0"),
    (5, 1, 0, r"queries must be an int >= 1, got 0"),
    (-2, 1, 1, r"ways must be an int >= 1, got -2"),
  )
  def test_value_errors(self, ways, shots, queries, message):
    images = _coded_pool()
    with self.assertRaisesRegex(ValueError, message):
      make_episode_sampler(images, ways, shots, queries)
    with self.assertRaisesRegex(ValueError, message):
      sample_episode(jax.random.key(0), images, ways=ways, shots=shots, queries=queries)

  def test_type_errors(self):
    with self.assertRaisesRegex(TypeError, r"shots must be an int, got 1.5"):
      make_episode_sampler(_coded_pool(), 5, 1.5, 1)
    with self.assertRaisesRegex(ValueError, r"ways must be an int >= 1, got True"):
      make_episode_sampler(_coded_pool(), True, 1, 1)

  def test_shape_accepted_and_pool_rank_checked(self):
    make_episode_sampler((10, 20, 28, 28, 1), 5, 1, 19)
    with self.assertRaisesRegex(
      ValueError, r"\[classes, images_per_class, \.\.\.\], got shape \(10,\)"
    ):
      make_episode_sampler(np.zeros(10), 5, 1, 1)

  def test_smaller_pool_at_call_time_fails_under_jit(self):
    sample = make_episode_sampler(_coded_pool(), 10, 1, 1)
    with self.assertRaisesRegex(ValueError, r"ways=10 is more than the 4 classes"):
      jax.jit(sample)(jax.random.key(0), jnp.asarray(_coded_pool(num_classes=4)))

  @parameterized.parameters(
    (0, ValueError, r"num_tasks must be an int >= 1, got 0"),
    (-3, ValueError, r"num_tasks must be an int >= 1, got -3"),
    (2.0, TypeError, r"num_tasks must be an int, got 2.0 \(float\)"),
    ("4", TypeError, r"num_tasks must be an int, got '4' \(str\)"),
  )
  def test_num_tasks(self, num_tasks, error, message):
    calls = []

    def sample(key, images):
      calls.append(key)
      return make_episode_sampler(_coded_pool(), 2, 1, 1)(key, images)

    with self.assertRaisesRegex(error, message):
      sample_meta_batch(sample, jax.random.key(0), _coded_pool(), num_tasks=num_tasks)
    self.assertEqual(calls, [])  # refused before anything was traced

  @parameterized.parameters(
    ("5", TypeError, r"ways must be an int, got '5' \(str\)"),
    (5.0, TypeError, r"ways must be an int, got 5.0 \(float\)"),
    (None, TypeError, r"ways must be an int, got None \(NoneType\)"),
  )
  def test_ways_of_another_type(self, ways, error, message):
    with self.assertRaisesRegex(error, message):
      make_episode_sampler(_coded_pool(), ways, 1, 1)
    with self.assertRaisesRegex(error, message):
      sample_episode(jax.random.key(0), _coded_pool(), ways=ways, shots=1, queries=1)

  def test_image_dtype_must_be_floating(self):
    message = (r"dtype must be a floating dtype \(e.g. jnp.float32\), got int32 \(images are "
               r"sampled as floats in \[0, 1\]\)")
    with self.assertRaisesRegex(TypeError, message):
      make_episode_sampler(_coded_pool(), 2, 1, 1, dtype=jnp.int32)
    with self.assertRaisesRegex(TypeError, message):
      sample_episode(jax.random.key(0), _coded_pool(), ways=2, shots=1, queries=1,
                     dtype=jnp.int32)
    with self.assertRaisesRegex(TypeError, r"dtype must be a floating dtype \(e.g. "
                                r"jnp.float32\), got 'pixels'"):
      make_episode_sampler(_coded_pool(), 2, 1, 1, dtype="pixels")
    task = make_episode_sampler(_coded_pool(), 2, 1, 1, dtype=jnp.bfloat16)(
      jax.random.key(0), _coded_pool())
    self.assertEqual(task.support_x.dtype, jnp.bfloat16)


def test_real_omniglot_episodes(omniglot_finn):
  """20-way episodes from Finn's rotated training split of the real data."""
  train = omniglot_finn["train"]
  images = jax.device_put(train.images)
  ways, shots, queries = 20, 1, 5
  sample = make_episode_sampler(train, ways, shots, queries)
  batch = jax.jit(lambda key, images: sample_meta_batch(sample, key, images, num_tasks=4))(
    jax.random.key(0), images
  )
  chex.assert_shape(batch.support_x, (4, ways * shots, 28, 28, 1))
  chex.assert_shape(batch.query_x, (4, ways * queries, 28, 28, 1))
  chex.assert_type(batch.support_y, jnp.int32)
  for t in range(4):
    support = np.asarray(batch.support_x[t])
    query = np.asarray(batch.query_x[t])
    # No two identical images in an episode (the Braille duplicate aside, which is 1 in 32,460).
    flat = np.concatenate([support, query]).reshape(ways * (shots + queries), -1)
    assert len(np.unique(flat, axis=0)) >= flat.shape[0] - 1
  with pytest.raises(ValueError, match="ways=101 is more than the 100 classes"):
    make_episode_sampler(omniglot_finn["val"], 101, 1, 1)
  with pytest.raises(
    ValueError, match=r"shots \+ queries = 5 \+ 16 = 21 is more than the 20 images"
  ):
    make_episode_sampler(train, 5, 5, 16)
