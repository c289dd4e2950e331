"""Tests of Relation Networks: scores in (0, 1) and the loss against a hand-computed squared error,
the masked BatchNorm, class maps, the convolutional relation module, class-order invariance,
fewer ways, the episodic meta-step and evaluation."""

from __future__ import annotations

import dataclasses

import chex
import jax
import numpy as np
import optax
import pytest

import metajax as mj
from tests.algorithms import metric_problem
from metajax.algorithms import relation
from metajax.nn import models

F64_TOL = 1e-10
F32_TOL = 1e-5
WAYS, SHOTS, QUERIES, DIM, WIDTH = 3, 2, 4, 5, 8
MAP_SHAPE = (2, 2, 2)  # WIDTH features read as 2x2 maps of 2 channels


_features, _np_features = metric_problem.features, metric_problem.np_features
_first = metric_problem.first


def _problem(seed, num_tasks=2, dtype=np.float32, separation=0.0):
  return metric_problem.problem(seed, ways=WAYS, shots=SHOTS, queries=QUERIES, dim=DIM,
                                width=WIDTH, num_tasks=num_tasks, dtype=dtype,
                                separation=separation)


def _learner(num_classes=WAYS, feature_shape=(WIDTH,), **kwargs):
  module = relation.relation_module(feature_shape, filters=4, hidden=3)
  return relation.RelationNet(_features, num_classes=num_classes, relation=module, **kwargs)


def _predict(learner, meta_params, task):
  return learner.apply_fn(learner.adapt(meta_params, task.support_x, task.support_y),
                          task.query_x)


class RelationNetTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_scores_in_unit_interval_and_loss_is_the_squared_error(self):
    with jax.enable_x64(True):
      params, tasks = _problem(0, dtype=np.float64)
      task = _first(tasks)
      learner = _learner()
      meta_params = learner.init(params)

      def run(p, t):
        adapted = learner.adapt(p, t.support_x, t.support_y)
        logits = learner.apply_fn(adapted, t.query_x)
        return adapted["class_maps"], jax.nn.sigmoid(logits), learner.loss(logits, t.query_y)

      class_maps, scores, loss = self.variant(run)(meta_params, task)
      scores = np.asarray(scores)
      self.assertTrue(np.all((scores > 0) & (scores < 1)))
      # By hand: class maps are sums of support features; every (class, query) pair goes through
      # the relation module as one batch.
      fs = _np_features(params, task.support_x)
      fq = _np_features(params, task.query_x)
      maps = np.stack([fs[task.support_y == c].sum(axis=0) for c in range(WAYS)])
      np.testing.assert_allclose(class_maps, maps, rtol=F64_TOL)
      pairs = np.concatenate([np.broadcast_to(maps[None], (len(fq), WAYS, WIDTH)),
                              np.broadcast_to(fq[:, None], (len(fq), WAYS, WIDTH))], axis=-1)
      pairs = pairs.reshape(-1, 1, 1, 2 * WIDTH)  # flat features: 1x1 maps
      logits = jax.jit(learner.relation.apply)(meta_params["relation"], pairs,
                                               np.ones(len(pairs)))
      expected_scores = 1 / (1 + np.exp(-np.asarray(logits).reshape(len(fq), WAYS)))
      np.testing.assert_allclose(scores, expected_scores, rtol=F64_TOL, atol=F64_TOL)
      expected_loss = np.mean(np.sum((expected_scores - np.eye(WAYS)[task.query_y]) ** 2, -1))
      np.testing.assert_allclose(loss, expected_loss, rtol=F64_TOL)

  def test_masked_batch_norm_is_batch_norm_of_the_weighted_examples(self):
    x = np.random.default_rng(1).normal(size=(5, 2, 2, 3)).astype(np.float32)
    scale, bias = np.array([1.0, 2.0, 0.5], np.float32), np.array([0.0, 1.0, -1.0], np.float32)
    weights = np.array([1, 0, 1, 1, 0], np.float32)
    norm = jax.jit(relation.masked_batch_norm)
    full, masked = norm(x, np.ones(5), scale, bias), norm(x, weights, scale, bias)
    expected_full = jax.jit(models.BatchStatNorm(fused=False).apply)(
      {"params": {"scale": scale, "bias": bias}}, x)
    np.testing.assert_allclose(full, expected_full, rtol=F32_TOL, atol=F32_TOL)
    kept = x[weights == 1]
    mean, var = kept.mean(axis=(0, 1, 2)), kept.var(axis=(0, 1, 2))
    np.testing.assert_allclose(masked, (x - mean) / np.sqrt(var + 1e-5) * scale + bias,
                               rtol=F32_TOL, atol=F32_TOL)

  def test_class_maps_sum_or_mean_and_absent_classes(self):
    emb, labels = np.array([[1.0, 0.0], [3.0, 2.0], [5.0, 5.0]]), np.array([0, 0, 2])
    summed = _learner(num_classes=4, feature_shape=(2,))
    mean = _learner(num_classes=4, feature_shape=(2,), class_pool="mean")
    maps, present = summed.class_maps(emb, labels)
    np.testing.assert_allclose(maps, [[4.0, 2.0], [0.0, 0.0], [5.0, 5.0], [0.0, 0.0]])
    np.testing.assert_array_equal(present, [True, False, True, False])
    np.testing.assert_allclose(mean.class_maps(emb, labels)[0][0], [2.0, 1.0])
    with self.assertRaisesRegex(ValueError, "class_pool"):
      _learner(class_pool="max")
    with self.assertRaisesRegex(ValueError, "feature_shape"):
      relation.relation_module((2, 3))

  def test_permuting_classes_permutes_conv_module_predictions(self):
    params, tasks = _problem(2)
    task = _first(tasks)
    perm = np.array([1, 2, 0])
    relabelled = task._replace(support_y=perm[task.support_y], query_y=perm[task.query_y])
    learner = _learner(feature_shape=MAP_SHAPE)  # two conv blocks: 2x2 maps pooled to 1x1
    meta_params = learner.init(params)
    run = jax.jit(lambda p, t: (_predict(learner, p, t), learner.task_loss(p, t)[0]))
    (logits, loss), (logits_perm, loss_perm) = run(meta_params, task), run(meta_params, relabelled)
    np.testing.assert_allclose(logits_perm[:, perm], logits, rtol=F32_TOL, atol=F32_TOL)
    np.testing.assert_allclose(loss_perm, loss, rtol=F32_TOL)

  def test_higher_way_learner_equals_exact_way_learner_on_fewer_ways(self):
    params, tasks = _problem(3)
    task = _first(tasks)
    exact, wide = _learner(), _learner(num_classes=WAYS + 3)
    meta_params = wide.init(params)

    @jax.jit
    def run(p):
      (wide_loss, metrics), grads = jax.value_and_grad(wide.task_loss, has_aux=True)(p, task)
      return _predict(wide, p, task), _predict(exact, p, task), wide_loss, metrics, grads

    wide_logits, exact_logits, wide_loss, metrics, grads = run(meta_params)
    np.testing.assert_array_equal(wide_logits[:, WAYS:], -np.inf)
    # The absent classes' pairs are out of the batch statistics: the same scores exactly.
    np.testing.assert_allclose(wide_logits[:, :WAYS], exact_logits, rtol=F32_TOL, atol=F32_TOL)
    exact_scores = 1 / (1 + np.exp(-np.asarray(exact_logits)))
    expected_loss = np.mean(np.sum((exact_scores - np.eye(WAYS)[task.query_y]) ** 2, -1))
    np.testing.assert_allclose(wide_loss, expected_loss, rtol=F32_TOL)
    self.assertEqual(set(metrics), {"inner/support_loss_before", "outer/query_loss",
                                    "outer/query_accuracy"})
    self.assertTrue(np.isfinite(metrics["inner/support_loss_before"]))
    self.assertTrue(all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads)))

  def test_meta_step_trains_and_evaluation_starts_at_chance(self):
    params, tasks = _problem(4, num_tasks=4, separation=1.5)
    learner = _learner()
    meta_step = mj.make_meta_step(learner, optax.adam(1e-2))
    state = meta_step.init(params)
    losses = []
    for _ in range(6):
      state, metrics = meta_step.step(state, tasks)
      losses.append(float(metrics["outer/loss"]))
      self.assertTrue(np.isfinite(float(metrics["outer/grad_norm"])))
    self.assertLess(losses[-1], losses[0])
    chex.assert_trees_all_equal(state.params["params"]["head"], params["head"])  # unused
    per_task = jax.jit(lambda p: mj.evaluate_tasks(learner, p, tasks))(state.params)
    # Before: one pair compared N times, every score equal, so always class 0.
    np.testing.assert_allclose(per_task["accuracy_before"], 1.0 / WAYS)
    self.assertGreater(float(per_task["accuracy_after"].mean()), 1.0 / WAYS)

  def test_init_is_a_function_of_the_seed_and_shapes_are_checked(self):
    params, tasks = _problem(5)
    learner = _learner()
    first, again = learner.init(params), learner.init(params)
    other = dataclasses.replace(learner, seed=1).init(params)
    chex.assert_trees_all_equal(first, again)
    self.assertFalse(np.allclose(first["relation"]["fc0"]["kernel"],
                                 other["relation"]["fc0"]["kernel"]))
    wrong = _learner(feature_shape=(WIDTH + 1,))
    with self.assertRaisesRegex(ValueError, "feature maps"):
      jax.eval_shape(wrong.task_loss, first, _first(tasks))

  def test_relation_mse_closed_form(self):
    logits = np.array([[0.0, np.log(3.0), -np.inf]])  # scores 1/2, 3/4, 0
    np.testing.assert_allclose(jax.jit(relation.relation_mse)(logits, np.array([1])),
                               0.25 + 1 / 16, rtol=F32_TOL)


if __name__ == "__main__":
  pytest.main([__file__])
