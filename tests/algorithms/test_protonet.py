"""Tests of Prototypical Networks: closed-form logits, class-order invariance, higher-way
training, the episodic meta-step and evaluation."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized

import metajax as mj
from metajax.algorithms import protonet

F64_TOL = 1e-10
F32_TOL = 1e-5
WAYS, SHOTS, QUERIES, DIM = 3, 2, 4, 5


def _problem(key, num_tasks=2, dtype=jnp.float32, separation=0.0):
  """Tasks whose class-j inputs are centred at `separation * e_j` (0: pure noise)."""
  model = mj.mlp(WAYS, hidden=(8,), input_shape=(DIM,))
  kp, ks, kq = jax.random.split(key, 3)
  params = jax.tree.map(lambda p: p.astype(dtype), model.init(kp))
  centres = separation * jnp.eye(WAYS, DIM, dtype=dtype)
  sy = jnp.tile(jnp.arange(WAYS).repeat(SHOTS), (num_tasks, 1))
  qy = jnp.tile(jnp.arange(WAYS).repeat(QUERIES), (num_tasks, 1))
  tasks = mj.Task(centres[sy] + jax.random.normal(ks, (num_tasks, WAYS * SHOTS, DIM), dtype), sy,
                  centres[qy] + jax.random.normal(kq, (num_tasks, WAYS * QUERIES, DIM), dtype), qy)
  return model, params, tasks


def _first(tasks):
  return jax.tree.map(lambda x: x[0], tasks)


class ProtoNetTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_logits_are_negative_squared_distances_to_class_means(self):
    with jax.enable_x64(True):
      model, params, tasks = _problem(jax.random.key(0), dtype=jnp.float64)
      task = _first(tasks)
      learner = protonet.ProtoNet(model.features, num_classes=WAYS)
      logits = self.variant(
        lambda p, t: learner.apply_fn(learner.adapt(p, t.support_x, t.support_y), t.query_x)
      )(params, task)
      fs = np.asarray(model.features(params, task.support_x))
      fq = np.asarray(model.features(params, task.query_x))
      sy = np.asarray(task.support_y)
      protos = np.stack([fs[sy == c].mean(axis=0) for c in range(WAYS)])
      expected = -np.array([[np.sum((q - p) ** 2) for p in protos] for q in fq])
      np.testing.assert_allclose(logits, expected, rtol=F64_TOL, atol=F64_TOL)
      loss, metrics = learner.task_loss(params, task)
      np.testing.assert_allclose(loss, mj.cross_entropy(expected, task.query_y), rtol=F64_TOL)
      self.assertEqual(set(metrics), {"inner/support_loss_before", "outer/query_loss",
                                      "outer/query_accuracy"})

  @parameterized.parameters([(2, 0, 1)], [(1, 2, 0)])
  def test_loss_invariant_to_class_order(self, perm):
    with jax.enable_x64(True):
      model, params, tasks = _problem(jax.random.key(1), dtype=jnp.float64)
      task = _first(tasks)
      perm = jnp.asarray(perm)
      relabelled = task._replace(support_y=perm[task.support_y], query_y=perm[task.query_y])
      learner = protonet.ProtoNet(model.features, num_classes=WAYS)
      loss, _ = learner.task_loss(params, task)
      loss_perm, _ = learner.task_loss(params, relabelled)
      np.testing.assert_allclose(loss_perm, loss, rtol=F64_TOL)
      logits = learner.apply_fn(learner.adapt(params, task.support_x, task.support_y),
                                task.query_x)
      logits_perm = learner.apply_fn(
        learner.adapt(params, relabelled.support_x, relabelled.support_y), task.query_x)
      np.testing.assert_allclose(logits_perm[:, perm], logits, rtol=F64_TOL)

  def test_higher_way_learner_equals_exact_way_learner_on_fewer_ways(self):
    model, params, tasks = _problem(jax.random.key(2))
    task = _first(tasks)
    exact = protonet.ProtoNet(model.features, num_classes=WAYS)
    wide = protonet.ProtoNet(model.features, num_classes=WAYS + 4)
    @jax.jit
    def run(p, t):
      logits = {name: lr.apply_fn(lr.adapt(p, t.support_x, t.support_y), t.query_x)
                for name, lr in (("wide", wide), ("exact", exact))}
      losses = {name: lr.task_loss(p, t)[0] for name, lr in (("wide", wide), ("exact", exact))}
      return logits, losses, jax.grad(lambda q: wide.task_loss(q, t)[0])(p)

    logits, losses, grads = run(params, task)
    np.testing.assert_array_equal(logits["wide"][:, WAYS:], -np.inf)
    np.testing.assert_allclose(logits["wide"][:, :WAYS], logits["exact"], rtol=F32_TOL)
    np.testing.assert_allclose(losses["wide"], losses["exact"], rtol=F32_TOL)
    # The -inf logits give zero, not NaN, gradients.
    self.assertTrue(all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads)))

  def test_meta_step_trains_the_encoder_and_evaluation_starts_at_chance(self):
    model, params, tasks = _problem(jax.random.key(3), num_tasks=4, separation=1.5)
    learner = protonet.ProtoNet(model.features, num_classes=WAYS)
    meta_step = mj.make_meta_step(learner, optax.adam(1e-2))  # unchanged: duck typing
    state = meta_step.init(params)
    losses = []
    for _ in range(6):
      state, metrics = meta_step.step(state, tasks)
      losses.append(float(metrics["outer/loss"]))
    self.assertLess(losses[-1], losses[0])
    chex.assert_trees_all_equal(state.params["head"], params["head"])  # unused, zero gradient
    per_task = mj.evaluate_tasks(learner, state.params, tasks)
    np.testing.assert_allclose(per_task["loss_before"], np.log(WAYS), rtol=1e-6)
    np.testing.assert_allclose(per_task["accuracy_before"], 1.0 / WAYS)  # always class 0
    self.assertGreater(float(per_task["accuracy_after"].mean()), 1.0 / WAYS)

  def test_prototypes_closed_form_and_absent_class(self):
    emb = jnp.array([[1.0, 0.0], [3.0, 2.0], [5.0, 5.0]])
    protos, present = protonet.prototypes(emb, jnp.array([0, 0, 2]), 4)
    np.testing.assert_allclose(protos, [[2.0, 1.0], [0.0, 0.0], [5.0, 5.0], [0.0, 0.0]])
    np.testing.assert_array_equal(present, [True, False, True, False])
    with self.assertRaisesRegex(ValueError, "num_classes"):
      protonet.ProtoNet(lambda p, x: x, num_classes=0)


if __name__ == "__main__":
  pytest.main([__file__])
