"""Tests of metajax.analysis.gradient_noise and a smoke run of experiments/gradient_noise.py."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized

import metajax as mj
from metajax.analysis import gradient_noise as gn
from metajax.analysis import theory

ROOT = Path(__file__).resolve().parents[2]
WAYS, SHOTS, QUERIES, DIM = 3, 2, 3, 4
INNER_LR = 0.5
COSINE_ATOL = 1e-5  # float32: cos(g, g) computed as <g, g> / (|g| |g|)
CE_NOISE_RTOL = 1e-5  # float32: the CE noise with zeroing is round-off of sum_i q_i = 1
NORM_RTOL = 1e-5  # float32: the same gradient computed two ways

_MLP = mj.mlp(WAYS, hidden=(8,), input_shape=(DIM,))


def _sample_tasks(key, means, *, num_tasks):
  """Gaussian blobs: `means` `[C, DIM]` class centres; each task picks WAYS of them."""

  def one(key):
    class_key, support_key, query_key = jax.random.split(key, 3)
    classes = jax.random.choice(class_key, means.shape[0], (WAYS,), replace=False)
    support_y, query_y = jnp.repeat(jnp.arange(WAYS), SHOTS), jnp.repeat(jnp.arange(WAYS), QUERIES)
    noise = lambda k, y: 0.5 * jax.random.normal(k, (y.shape[0], DIM))  # noqa: E731
    return mj.Task(means[classes[support_y]] + noise(support_key, support_y), support_y,
                   means[classes[query_y]] + noise(query_key, query_y), query_y)

  return jax.vmap(one)(jax.random.split(key, num_tasks))


def _problem(seed=0):
  key = jax.random.key(seed)
  keys = jax.random.split(key, 5)
  means = 2.0 * jax.random.normal(keys[0], (10, DIM))
  fixed = [_sample_tasks(k, means, num_tasks=4) for k in keys[1:4]]
  return means, _MLP.init(keys[4]), fixed


def _run(variant, *, loss="mse_onehot", num_steps=3, measure_every=2, seed=0):
  means, params, fixed = _problem(seed)
  sample = lambda key, means: _sample_tasks(key, means, num_tasks=2)  # noqa: E731
  return list(gn.measure_during_training(
    _MLP, variant, params, sample, means, jax.random.key(7), *fixed, loss=loss,
    inner_lr=INNER_LR, meta_optimizer=optax.adam(1e-2), num_steps=num_steps,
    measure_every=measure_every))


class MeasureDuringTrainingTest(chex.TestCase):

  def test_series_and_noise_of_the_variants(self):
    """MSE: with zeroing the noise is exactly 0 and the cosine 1 at every step; without, the
    random head makes noise. Every series has one entry per measurement step. (fo_zero, one
    compilation more, is checked at one point by MeasureTest.)"""
    series = {name: gn.to_series(_run(gn.VARIANTS[name])) for name in ("fo", "so", "so_zero")}
    for name, columns in series.items():
      self.assertEqual(columns["step"], [0, 2, 3], msg=name)
      for key in (*gn.GRADIENT_KEYS, *gn.FEATURE_KEYS, *gn.ACCURACY_KEYS):
        self.assertLen(columns[key], 3, msg=f"{name} {key}")
        self.assertTrue(all(math.isfinite(v) for v in columns[key]), msg=f"{name} {key}")
      self.assertIsNone(columns["train/loss"][0])  # no training before step 0
      self.assertTrue(all(v > 0 for v in columns["train/loss"][1:]))
      if gn.VARIANTS[name].zeroing:
        self.assertEqual(columns["noise_norm"], [0.0] * 3, msg=name)
        np.testing.assert_allclose(columns["cosine"], 1.0, atol=COSINE_ATOL, err_msg=name)
      else:
        self.assertTrue(all(v > 0 for v in columns["noise_norm"]), msg=name)
        self.assertTrue(all(v < 1 - COSINE_ATOL for v in columns["cosine"]), msg=name)
      self.assertTrue(all(0 <= v <= 1 for v in columns["accuracy"]), msg=name)
      self.assertGreater(columns["total_norm"][0], 0.0)
    # same init, same tasks: the variants differ at step 0 only through the gradient
    for key in (*gn.FEATURE_KEYS, "accuracy"):
      self.assertEqual(series["fo"][key][0], series["so"][key][0])
    self.assertNotEqual(series["fo"]["noise_norm"][0], series["so"]["noise_norm"][0])
    table = gn.format_summary(series)
    for name in series:
      self.assertIn(name, table)
    fig = gn.plot_series(series, title="test")
    self.assertLen(fig.axes, len(gn.PANELS))
    self.assertLen(fig.axes[0].lines, len(series))
    self.assertLen(fig.axes[2].lines, 2 * len(series))  # same and different class


class MeasureTest(chex.TestCase):

  @parameterized.parameters("so", "fo_zero")
  def test_total_norm_is_the_learners_gradient_norm(self, name):
    """`measure` decomposes the gradient of the very learner that `anil_learner` builds; with
    zeroing and cross-entropy the noise is round-off."""
    _, params, (grad_tasks, feature_tasks, eval_tasks) = _problem(1)
    variant = gn.VARIANTS[name]
    out = jax.jit(lambda p: gn.measure(_MLP, variant, p, grad_tasks, feature_tasks, eval_tasks,
                                       loss="cross_entropy", inner_lr=INNER_LR))(params)
    learner = gn.anil_learner(_MLP.apply, variant, loss="cross_entropy", inner_lr=INNER_LR)
    grads = jax.grad(mj.meta_loss)(params, grad_tasks, learner)
    encoder = optax.tree.norm({k: v for k, v in grads.items() if k != "head"})
    np.testing.assert_allclose(out["total_norm"], encoder, rtol=NORM_RTOL)
    np.testing.assert_allclose(out["noise_fraction"], out["noise_norm"] / out["total_norm"],
                               rtol=NORM_RTOL)
    accuracy = mj.evaluate_tasks(learner, params, eval_tasks)["accuracy_after"]
    np.testing.assert_allclose(out["accuracy"], jnp.mean(accuracy), rtol=NORM_RTOL)
    if variant.zeroing:
      self.assertLess(out["noise_norm"], CE_NOISE_RTOL * out["total_norm"])
      np.testing.assert_allclose(out["cosine"], 1.0, atol=COSINE_ATOL)
    else:
      self.assertLess(out["cosine"], 1 - COSINE_ATOL)

  def test_task_feature_similarity_against_loop(self):
    _, params, (_, tasks, _) = _problem(2)
    out = gn.task_feature_similarity(_MLP.features, params, tasks)
    per_task = []
    for i in range(tasks.support_x.shape[0]):
      task = jax.tree.map(lambda x, i=i: x[i], tasks)
      features = jnp.concatenate([_MLP.features(params, task.support_x),
                                  _MLP.features(params, task.query_x)])
      per_task.append(theory.feature_similarity(
        features, jnp.concatenate([task.support_y, task.query_y])))
    for key in gn.FEATURE_KEYS:
      np.testing.assert_allclose(out[key], np.mean([t[key] for t in per_task]), rtol=NORM_RTOL)


class HelpersTest(parameterized.TestCase):

  @parameterized.parameters((5, 2, [0, 2, 4, 5]), (4, 2, [0, 2, 4]), (0, 3, [0]), (2, 10, [0, 2]))
  def test_measurement_steps(self, num_steps, every, expected):
    self.assertEqual(gn.measurement_steps(num_steps, every), expected)

  def test_bad_arguments(self):
    with self.assertRaisesRegex(ValueError, "measure_every"):
      gn.measurement_steps(3, 0)
    for names in (["fo", "bogus"], [], ["so", "so"]):
      with self.assertRaisesRegex(ValueError, "fo, so, fo_zero, so_zero"):
        gn.get_variants(names)
    self.assertEqual(list(gn.get_variants(["so_zero", "fo"])), ["so_zero", "fo"])

  def test_to_series_is_strict_json(self):
    series = gn.to_series([{"step": 0, "a": float("nan")}, {"step": 1, "a": 2.0, "b": 1.0}])
    self.assertEqual(series, {"step": [0, 1], "a": [None, 2.0], "b": [None, 1.0]})
    json.dumps(series, allow_nan=False)


@pytest.mark.slow  # about a minute: the binary's two compilations on real Omniglot
def test_binary_smoke(tmp_path, omniglot_dir, omniglot_pool, omniglot_cache_dir):
  """The binary end to end on the real Omniglot (smoke sizes; one variant, as each costs two
  compilations: the variants themselves are checked on the MLP above)."""
  del omniglot_pool  # warms the session cache that the subprocess reads
  env = {**os.environ, "METAJAX_CACHE_DIR": str(omniglot_cache_dir)}
  result = subprocess.run(
    [sys.executable, str(ROOT / "experiments" / "gradient_noise.py"), f"--workdir={tmp_path}",
     f"--data_dir={omniglot_dir}", "--smoke", "--variants=so"],
    capture_output=True, text=True, env=env, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  results = json.loads((tmp_path / "gradient_noise.json").read_text())
  assert list(results["series"]) == ["so"] and results["config"]["num_steps"] == 2
  columns = results["series"]["so"]
  assert columns["step"] == [0, 1, 2]
  for key in (*gn.GRADIENT_KEYS, *gn.FEATURE_KEYS, "accuracy", "train/loss"):
    assert len(columns[key]) == 3, key
  assert 0 < columns["noise_norm"][-1] and columns["cosine"][-1] < 1
  assert (tmp_path / "gradient_noise.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert "cosine" in result.stdout and "so " in result.stdout
