"""Tests of Siamese networks: pair labels, the weighted L1 verification logits and the balanced
loss against hand computations, one-shot prediction by the most similar support image,
class-order invariance, fewer ways, the episodic meta-step and evaluation."""

from __future__ import annotations

import chex
import jax
import numpy as np
import optax
import pytest

import metajax as mj
from tests.algorithms import metric_problem
from metajax.algorithms import siamese

F64_TOL = 1e-10
F32_TOL = 1e-5
WAYS, SHOTS, QUERIES, DIM, WIDTH = 3, 2, 4, 5, 6


_features, _np_features = metric_problem.features, metric_problem.np_features
_first = metric_problem.first


def _problem(seed, num_tasks=2, dtype=np.float32, separation=0.0, shots=SHOTS):
  return metric_problem.problem(seed, ways=WAYS, shots=shots, queries=QUERIES, dim=DIM,
                                width=WIDTH, num_tasks=num_tasks, dtype=dtype,
                                separation=separation)


def _learner(num_classes=WAYS, **kwargs):
  return siamese.SiameseNet(_features, num_classes=num_classes, feature_dim=WIDTH, **kwargs)


def _predict(learner, meta_params, task):
  return learner.apply_fn(learner.adapt(meta_params, task.support_x, task.support_y),
                          task.query_x)


def _np_bce(logits, targets):
  return np.logaddexp(0, logits) - targets * logits  # -t log s - (1 - t) log(1 - s)


def _np_balanced(bce, same):
  return 0.5 * (bce[same].mean() + bce[~same].mean())


class SiameseNetTest(chex.TestCase):

  def test_pair_labels(self):
    same = siamese.pair_labels(np.array([0, 1, 1]), np.array([1, 0]))
    np.testing.assert_array_equal(same, [[False, True], [True, False], [True, False]])

  @chex.variants(with_jit=True, without_jit=True)
  def test_verification_loss_and_one_shot_prediction_by_the_most_similar_image(self):
    with jax.enable_x64(True):
      params, tasks = _problem(0, dtype=np.float64)
      task = _first(tasks)
      learner = _learner()
      rng = np.random.default_rng(1)
      meta_params = {"params": params, "siamese": {"weights": rng.normal(size=WIDTH),
                                                   "bias": np.float64(0.3)}}

      def run(p, t):
        loss, metrics = learner.task_loss(p, t)
        return _predict(learner, p, t), loss, metrics

      class_logits, loss, metrics = self.variant(run)(meta_params, task)
      fs, fq = _np_features(params, task.support_x), _np_features(params, task.query_x)
      head = meta_params["siamese"]
      pair_logits = np.abs(fq[:, None] - fs[None]) @ head["weights"] + head["bias"]  # QS
      same = task.query_y[:, None] == task.support_y[None]
      expected = _np_balanced(_np_bce(pair_logits, same), same)
      np.testing.assert_allclose(loss, expected, rtol=F64_TOL)
      # One-shot rule: the class of the support image with the largest verification logit.
      nearest = task.support_y[pair_logits.argmax(axis=1)]
      np.testing.assert_array_equal(np.argmax(class_logits, axis=1), nearest)
      np.testing.assert_allclose(class_logits.max(axis=1), pair_logits.max(axis=1),
                                 rtol=F64_TOL)
      # (accuracies are float32 means of booleans)
      np.testing.assert_allclose(metrics["outer/query_accuracy"],
                                 np.mean(nearest == task.query_y), rtol=F32_TOL)
      np.testing.assert_allclose(metrics["outer/verification_accuracy"],
                                 np.mean((pair_logits > 0) == same), rtol=F32_TOL)

  def test_all_pairs_counts_each_unordered_pair_once(self):
    params, tasks = _problem(2)
    task = _first(tasks)
    learner = _learner(all_pairs=True, balanced=False)
    meta_params = learner.init(params)
    loss = jax.jit(lambda p: learner.task_loss(p, task)[0])(meta_params)
    emb = np.concatenate([_np_features(params, task.support_x),
                          _np_features(params, task.query_x)])
    labels = np.concatenate([task.support_y, task.query_y])
    # the initial head: alpha = -1/D, b = 0, i.e. minus the mean absolute difference
    i, j = np.triu_indices(len(labels), k=1)
    logits = -np.abs(emb[i] - emb[j]).mean(axis=1)
    np.testing.assert_allclose(loss, _np_bce(logits, labels[i] == labels[j]).mean(),
                               rtol=F32_TOL)

  def test_permuting_classes_permutes_predictions(self):
    params, tasks = _problem(3)
    task = _first(tasks)
    perm = np.array([2, 0, 1])
    relabelled = task._replace(support_y=perm[task.support_y], query_y=perm[task.query_y])
    learner = _learner()
    meta_params = learner.init(params)
    run = jax.jit(lambda p, t: (_predict(learner, p, t), learner.task_loss(p, t)[0]))
    (logits, loss), (logits_perm, loss_perm) = run(meta_params, task), run(meta_params, relabelled)
    np.testing.assert_allclose(logits_perm[:, perm], logits, rtol=F32_TOL)
    np.testing.assert_allclose(loss_perm, loss, rtol=F32_TOL)

  def test_higher_way_learner_equals_exact_way_learner_on_fewer_ways(self):
    params, tasks = _problem(4)
    task = _first(tasks)
    exact, wide = _learner(), _learner(num_classes=WAYS + 3)
    meta_params = wide.init(params)

    @jax.jit
    def run(p):
      (wide_loss, _), grads = jax.value_and_grad(wide.task_loss, has_aux=True)(p, task)
      adapted, support_loss = wide.adapt(p, task.support_x, task.support_y, return_losses=True)
      class_grads = jax.grad(lambda q: wide.loss(_predict(wide, q, task), task.query_y))(p)
      return (wide.apply_fn(adapted, task.query_x), _predict(exact, p, task), wide_loss,
              exact.task_loss(p, task)[0], support_loss, grads, class_grads)

    wide_logits, exact_logits, wide_loss, exact_loss, support_loss, grads, class_grads = run(
      meta_params)
    np.testing.assert_array_equal(wide_logits[:, WAYS:], -np.inf)
    np.testing.assert_allclose(wide_logits[:, :WAYS], exact_logits, rtol=F32_TOL)
    np.testing.assert_allclose(wide_loss, exact_loss, rtol=F32_TOL)
    self.assertEqual(support_loss.shape, (1,))
    # The -inf class logits give zero, not NaN, gradients.
    for g in (*jax.tree.leaves(grads), *jax.tree.leaves(class_grads)):
      self.assertTrue(np.all(np.isfinite(g)))

  def test_meta_step_trains_and_evaluation_starts_at_chance(self):
    params, tasks = _problem(5, num_tasks=4, separation=1.5)
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
    np.testing.assert_allclose(per_task["loss_before"], np.log(WAYS), rtol=1e-6)
    np.testing.assert_allclose(per_task["accuracy_before"], 1.0 / WAYS)  # always class 0
    self.assertGreater(float(per_task["accuracy_after"].mean()), 1.0 / WAYS)

  def test_balanced_loss_closed_form_and_invalid_arguments(self):
    logits = np.array([[0.0, 2.0], [-1.0, 3.0]])
    same = np.array([[True, False], [False, False]])
    got = jax.jit(siamese.verification_loss)(logits, same)
    bce = _np_bce(logits, same)
    np.testing.assert_allclose(got, _np_balanced(bce, same), rtol=F32_TOL)
    with self.assertRaisesRegex(ValueError, "feature_dim"):
      siamese.SiameseNet(_features, num_classes=2, feature_dim=0)


if __name__ == "__main__":
  pytest.main([__file__])
