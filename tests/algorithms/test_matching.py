"""Tests of Matching Networks: the attention read-out against its closed form, nearest neighbour
at a sharp temperature, full-context embeddings against a NumPy LSTM, class-order invariance,
fewer ways, the episodic meta-step and evaluation."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized

import metajax as mj
from tests.algorithms import metric_problem
from metajax.algorithms import matching

F64_TOL = 1e-10
F32_TOL = 1e-5
WAYS, SHOTS, QUERIES, DIM, WIDTH = 3, 2, 4, 5, 6


_features, _np_features = metric_problem.features, metric_problem.np_features
_first = metric_problem.first


def _problem(seed, num_tasks=2, dtype=np.float32, separation=0.0, shots=SHOTS):
  return metric_problem.problem(seed, ways=WAYS, shots=shots, queries=QUERIES, dim=DIM,
                                width=WIDTH, num_tasks=num_tasks, dtype=dtype,
                                separation=separation)


def _predict(learner, meta_params, task):
  return learner.apply_fn(learner.adapt(meta_params, task.support_x, task.support_y),
                          task.query_x)


def _np_cross_entropy(log_probs, labels):
  """For normalised log-probabilities: the mean of minus the true class's."""
  return -np.mean(np.asarray(log_probs)[np.arange(len(labels)), labels])


def _np_cosine(a, b):
  a = a / np.linalg.norm(a, axis=1, keepdims=True)
  b = b / np.linalg.norm(b, axis=1, keepdims=True)
  return a @ b.T


def _np_lstm(cell, x, h, c):
  z = x @ cell["w_x"] + h @ cell["w_h"] + cell["b"]
  i, f, g, o = np.split(z, 4, axis=-1)
  sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
  c = sig(f) * c + sig(i) * np.tanh(g)
  return sig(o) * np.tanh(c), c


class MatchingNetTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_log_probs_are_attention_weighted_labels(self):
    with jax.enable_x64(True):
      params, tasks = _problem(0, dtype=np.float64)
      task = _first(tasks)
      learner = matching.MatchingNet(_features, num_classes=WAYS, temperature=0.5)
      meta_params = learner.init(params)
      log_probs, (loss, metrics) = self.variant(
        lambda p, t: (_predict(learner, p, t), learner.task_loss(p, t)))(meta_params, task)
      fs = np.asarray(_np_features(params, task.support_x))
      fq = np.asarray(_np_features(params, task.query_x))
      s = _np_cosine(fq, fs) / 0.5
      attention = np.exp(s) / np.exp(s).sum(axis=1, keepdims=True)  # QS
      expected = np.log(attention @ np.eye(WAYS)[np.asarray(task.support_y)])  # QS,SN->QN
      np.testing.assert_allclose(log_probs, expected, rtol=F64_TOL, atol=F64_TOL)
      np.testing.assert_allclose(loss, _np_cross_entropy(expected, task.query_y), rtol=F64_TOL)
      self.assertEqual(set(metrics), {"inner/support_loss_before", "outer/query_loss",
                                      "outer/query_accuracy"})

  def test_one_shot_sharp_temperature_is_cosine_nearest_neighbour(self):
    params, tasks = _problem(1, shots=1)
    task = _first(tasks)
    learner = matching.MatchingNet(_features, num_classes=WAYS, temperature=1e-3)
    log_probs = jax.jit(lambda p: _predict(learner, p, task))(learner.init(params))
    cos = _np_cosine(np.asarray(_np_features(params, task.query_x)),
                     np.asarray(_np_features(params, task.support_x)))
    nearest = np.asarray(task.support_y)[cos.argmax(axis=1)]
    np.testing.assert_allclose(np.exp(log_probs), np.eye(WAYS)[nearest], atol=F32_TOL)
    self.assertTrue(np.all(np.isfinite(log_probs)))  # however sharp: no log 0

  def test_attention_log_probs_stays_finite_for_present_classes(self):
    log_probs, cos = jax.jit(lambda s, y: (
      matching.attention_log_probs(s, y, 3, temperature=1e-3),
      matching.cosine_similarity(jnp.zeros((1, 2)), jnp.eye(2))))(
      np.array([[1.0, -1.0, 0.0]]), np.array([0, 1, 1]))
    # exact: class 1 has log-mass (max(-1, 0) - 1) / 1e-3 = -1000 (plus log(1 + e^-1000))
    np.testing.assert_allclose(log_probs[0, :2], [0.0, -1000.0], rtol=1e-6, atol=1e-6)
    self.assertEqual(float(log_probs[0, 2]), -np.inf)
    np.testing.assert_array_equal(cos, 0.0)  # a zero vector: 0, not NaN

  def test_full_context_embeddings_against_numpy_lstms(self):
    with jax.enable_x64(True):
      d, steps = 4, 2
      fce = matching.FullContextEmbeddings(feature_dim=d, num_processing_steps=steps)
      params = fce.init(jax.random.key(2), jnp.float64)
      rng = np.random.default_rng(3)
      g_prime, f_prime = rng.normal(size=(5, d)), rng.normal(size=(3, d))
      g, f = jax.jit(lambda p: (fce.embed_support(p, g_prime),
                                fce.embed_queries(p, f_prime, fce.embed_support(p, g_prime))))(
        params)
      np_params = jax.tree.map(np.asarray, params)

      def run(cell, xs):
        h = c = np.zeros(d)
        out = []
        for x in xs:
          h, c = _np_lstm(cell, x, h, c)
          out.append(h)
        return np.stack(out)

      expected_g = (g_prime + run(np_params["support_fw"], g_prime)
                    + run(np_params["support_bw"], g_prime[::-1])[::-1])
      np.testing.assert_allclose(g, expected_g, rtol=F64_TOL, atol=F64_TOL)
      h = c = np.zeros_like(f_prime)
      for _ in range(steps):
        a = np.exp(h @ expected_g.T)
        r = (a / a.sum(axis=1, keepdims=True)) @ expected_g
        h_hat, c = _np_lstm(np_params["query"], f_prime, np.concatenate([h, r], 1), c)
        h = h_hat + f_prime
      np.testing.assert_allclose(f, h, rtol=F64_TOL, atol=F64_TOL)

  def test_zero_lstm_weights_reduce_fce_to_the_plain_embedding(self):
    params, tasks = _problem(5)
    task = _first(tasks)
    plain = matching.MatchingNet(_features, num_classes=WAYS)
    fce = matching.MatchingNet(_features, num_classes=WAYS,
                               fce=matching.FullContextEmbeddings(WIDTH, 3))
    meta_params = fce.init(params)
    zeroed = {**meta_params, "fce": jax.tree.map(np.zeros_like, meta_params["fce"])}
    run = jax.jit(lambda p, z: (_predict(plain, p, task), _predict(fce, z, task)))
    expected, got = run(plain.init(params), zeroed)
    np.testing.assert_allclose(got, expected, rtol=F32_TOL, atol=F32_TOL)

  @parameterized.parameters([(2, 0, 1), False], [(1, 2, 0), True])
  def test_permuting_classes_permutes_predictions(self, perm, with_fce):
    params, tasks = _problem(6)
    task = _first(tasks)
    perm = np.asarray(perm)
    relabelled = task._replace(support_y=perm[task.support_y], query_y=perm[task.query_y])
    fce = matching.FullContextEmbeddings(WIDTH) if with_fce else None
    learner = matching.MatchingNet(_features, num_classes=WAYS, fce=fce)
    meta_params = learner.init(params)
    @jax.jit
    def run(p, t):
      loss, grads = jax.value_and_grad(lambda q: learner.task_loss(q, t)[0])(p)
      return _predict(learner, p, t), loss, grads

    (log_probs, loss, grads), (log_probs_perm, loss_perm, _) = (run(meta_params, task),
                                                                run(meta_params, relabelled))
    np.testing.assert_allclose(log_probs_perm[:, perm], log_probs, rtol=F32_TOL, atol=F32_TOL)
    np.testing.assert_allclose(loss_perm, loss, rtol=F32_TOL)
    self.assertTrue(all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads)))

  def test_higher_way_learner_equals_exact_way_learner_on_fewer_ways(self):
    params, tasks = _problem(7)
    task = _first(tasks)
    # (the FCE LSTMs do not see the labels: the number of classes only widens the read-out)
    exact = matching.MatchingNet(_features, num_classes=WAYS)
    wide = matching.MatchingNet(_features, num_classes=WAYS + 4)
    meta_params = wide.init(params)

    @jax.jit
    def run(p):
      (wide_loss, metrics), grads = jax.value_and_grad(wide.task_loss, has_aux=True)(p, task)
      return _predict(wide, p, task), _predict(exact, p, task), wide_loss, metrics, grads

    wide_lp, exact_lp, wide_loss, metrics, grads = run(meta_params)
    np.testing.assert_array_equal(wide_lp[:, WAYS:], -np.inf)
    np.testing.assert_allclose(wide_lp[:, :WAYS], exact_lp, rtol=F32_TOL, atol=F32_TOL)
    np.testing.assert_allclose(wide_loss, _np_cross_entropy(exact_lp, task.query_y), rtol=F32_TOL)
    self.assertTrue(np.isfinite(metrics["inner/support_loss_before"]))
    self.assertTrue(all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads)))

  def test_meta_step_trains_and_evaluation_starts_at_chance(self):
    params, tasks = _problem(8, num_tasks=4, separation=1.5)
    learner = matching.MatchingNet(_features, num_classes=WAYS, temperature=0.2)
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

  def test_invalid_arguments(self):
    with self.assertRaisesRegex(ValueError, "num_classes"):
      matching.MatchingNet(lambda p, x: x, num_classes=0)
    with self.assertRaisesRegex(ValueError, "temperature"):
      matching.MatchingNet(lambda p, x: x, num_classes=2, temperature=0.0)
    with self.assertRaisesRegex(ValueError, "num_processing_steps"):
      matching.FullContextEmbeddings(4, num_processing_steps=0)


if __name__ == "__main__":
  pytest.main([__file__])
