"""Tests of metajax.data.sinusoid (Finn et al. 2017 sinusoid regression)."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from metajax.data import (
  SinusoidParams,
  make_sinusoid_sampler,
  sample_meta_batch,
  sample_sinusoid,
  sample_sinusoid_params,
  sinusoid,
  sinusoid_task,
)

ATOL = 1e-5


class SinusoidTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters((10, 10), (5, 20), (1, 1))
  def test_shapes_and_closed_form(self, shots, queries):
    sample = self.variant(make_sinusoid_sampler(shots, queries))
    task = sample(jax.random.key(0))
    chex.assert_shape([task.support_x, task.support_y], (shots, 1))
    chex.assert_shape([task.query_x, task.query_y], (queries, 1))
    chex.assert_type([task.support_x, task.support_y, task.query_x, task.query_y], jnp.float32)
    _, params = sample_sinusoid(jax.random.key(0), shots=shots, queries=queries)
    for x, y in ((task.support_x, task.support_y), (task.query_x, task.query_y)):
      np.testing.assert_allclose(
        y, params.amplitude * np.sin(np.asarray(x) - params.phase), atol=ATOL
      )

  def test_sampler_matches_sample_sinusoid(self):
    key = jax.random.key(3)
    task, params = sample_sinusoid(key, shots=5, queries=7)
    chex.assert_trees_all_equal(make_sinusoid_sampler(5, 7)(key), task)
    chex.assert_trees_all_equal(sinusoid(task.query_x, params), task.query_y)

  def test_ranges_over_many_tasks(self):
    sample = make_sinusoid_sampler(10, 10)
    batch = jax.jit(lambda key: sample_meta_batch(sample, key, num_tasks=2000))(jax.random.key(1))
    chex.assert_shape(batch.support_x, (2000, 10, 1))
    x = np.concatenate([np.ravel(batch.support_x), np.ravel(batch.query_x)])
    assert -5.0 <= x.min() < -4.9 and 4.9 < x.max() <= 5.0
    keys = jax.random.split(jax.random.key(1), 2000)
    params = jax.vmap(lambda k: sample_sinusoid(k, shots=10, queries=10)[1])(keys)
    assert 0.1 <= params.amplitude.min() < 0.2 and 4.9 < params.amplitude.max() <= 5.0
    assert 0.0 <= params.phase.min() < 0.05 and math.pi - 0.05 < params.phase.max() <= math.pi
    # The vmapped parameters are those of the meta-batch's tasks.
    np.testing.assert_allclose(
      batch.support_y,
      params.amplitude[:, None, None] * np.sin(batch.support_x - params.phase[:, None, None]),
      atol=ATOL,
    )
    # |y| <= amplitude, and tasks differ.
    assert np.all(np.abs(batch.query_y[..., 0]) <= params.amplitude[:, None] + ATOL)
    assert len(np.unique(np.round(params.amplitude, 4))) > 1900

  def test_params_and_task_with_custom_ranges(self):
    params = sample_sinusoid_params(
      jax.random.key(0), amplitude_range=(2.0, 2.0), phase_range=(0.5, 0.5)
    )
    np.testing.assert_allclose([params.amplitude, params.phase], [2.0, 0.5])
    task = sinusoid_task(
      jax.random.key(1),
      SinusoidParams(jnp.float32(1.0), jnp.float32(0.0)),
      shots=3,
      queries=2,
      input_range=(0.0, 1.0),
    )
    assert np.all((0.0 <= task.support_x) & (task.support_x <= 1.0))
    np.testing.assert_allclose(task.support_y, np.sin(task.support_x), atol=ATOL)

  def test_support_and_query_points_are_independent_draws(self):
    task = make_sinusoid_sampler(4, 4)(jax.random.key(5))
    assert not np.array_equal(task.support_x, task.query_x)

  def test_bad_input(self):
    with self.assertRaisesRegex(ValueError, r"shots must be an int >= 1, got 0"):
      make_sinusoid_sampler(0, 5)
    with self.assertRaisesRegex(ValueError, r"queries must be an int >= 1, got -1"):
      make_sinusoid_sampler(5, -1)
    with self.assertRaisesRegex(ValueError, r"amplitude_range=\(5.0, 0.1\) must be \(low, high\)"):
      make_sinusoid_sampler(5, 5, amplitude_range=(5.0, 0.1))
    with self.assertRaisesRegex(TypeError, r"shots must be an int, got 2.5"):
      sinusoid_task(jax.random.key(0), SinusoidParams(1.0, 0.0), shots=2.5, queries=1)
