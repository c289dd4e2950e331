"""Learned inner optimizers: the meta-learner LSTM pinned to gradient descent, exact meta-gradients
through both LSTMs (float64, central differences), fresh state per task, and `MAML`'s checks."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

import metajax as mj
from metajax.algorithms import learned_optimizers as lo

F64_TOL = 1e-12  # float64 agreement of gradient descent and the pinned meta-learner LSTM
FD_TOL = 1e-6
FD_EPS = 1e-5
LR = 0.3
STEPS = 3


def _apply(params, x):
  return jnp.tanh(x @ params["body"]["w"]) @ params["head"]["w"] + params["head"]["b"]


def _params(key, dtype=jnp.float64):
  k1, k2 = jax.random.split(key)
  return {"body": {"w": jax.random.normal(k1, (3, 4), dtype)},
          "head": {"w": 0.5 * jax.random.normal(k2, (4, 3), dtype), "b": jnp.zeros(3, dtype)}}


def _tasks(key, num_tasks=2, dtype=jnp.float64):
  ks, kq = jax.random.split(key)
  y = jnp.tile(jnp.arange(3).repeat(2), (num_tasks, 1))
  centres = jnp.array([[1.0, 0.0, 0.5], [-0.5, 0.9, 0.0], [-0.5, -0.9, -0.5]], dtype)
  return mj.Task(centres[y] + 0.5 * jax.random.normal(ks, (num_tasks, 6, 3), dtype), y,
                 centres[y] + 0.5 * jax.random.normal(kq, (num_tasks, 6, 3), dtype), y)


def _loss(params, x, y):
  return mj.cross_entropy(_apply(params, x), y)


def _learner(optimizer, **kwargs):
  return mj.MAML(_apply, mj.cross_entropy, num_inner_steps=STEPS, learned_optimizer=optimizer,
                 **kwargs)


class PreprocessTest(chex.TestCase):

  def test_the_papers_two_regimes(self):
    with jax.enable_x64(True):
      x = jnp.array([2.0, -0.5, 1e-6, -1e-6, 0.0])
      got = np.asarray(lo.preprocess(x, 10.0))
      want = [[math.log(2.0) / 10, 1.0], [math.log(0.5) / 10, -1.0], [-1.0, math.exp(10) * 1e-6],
              [-1.0, -math.exp(10) * 1e-6], [-1.0, 0.0]]
      np.testing.assert_allclose(got, want, rtol=1e-12)
      # Finite derivatives everywhere, 0 included (second-order MAML differentiates it).
      grads = jax.grad(lambda v: jnp.sum(lo.preprocess(v, 10.0)))(x)
      self.assertTrue(np.all(np.isfinite(grads)))


class MetaLSTMTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_pinned_gates_are_gradient_descent(self):
    """Forget gate 1 and input gate lr: the cell update is theta - lr * grad (seed 004)."""
    with jax.enable_x64(True):
      params, tasks = _params(jax.random.key(0)), _tasks(jax.random.key(1))
      task = jax.tree.map(lambda a: a[0], tasks)
      learner = _learner(lo.meta_lstm(dtype=jnp.float64))
      meta = learner.init(params)
      pinned = dict(meta["optimizer"])
      pinned["input_gate"] = {"w": jnp.zeros_like(pinned["input_gate"]["w"]),
                              "b": jnp.full((1,), math.log(LR / (1 - LR)))}
      pinned["forget_gate"] = {"w": jnp.zeros_like(pinned["forget_gate"]["w"]),
                               "b": jnp.full((1,), 40.0)}  # sigmoid(40) is 1.0 in float64
      meta = {"params": params, "optimizer": pinned}
      adapted = self.variant(lambda m: learner.adapt(m, task.support_x, task.support_y))(meta)
      want = params
      for _ in range(STEPS):
        grads = jax.grad(_loss)(want, task.support_x, task.support_y)
        want = jax.tree.map(lambda w, g: w - LR * g, want, grads)
      chex.assert_trees_all_close(adapted, want, rtol=F64_TOL, atol=F64_TOL)

  @chex.variants(with_jit=True, without_jit=True)
  def test_the_meta_gradient_matches_central_differences(self):
    with jax.enable_x64(True):
      params, tasks = _params(jax.random.key(2)), _tasks(jax.random.key(3))
      learner = _learner(lo.meta_lstm(hidden=3, inner_lr=LR, dtype=jnp.float64))
      meta = learner.init(params)
      check_grads(self.variant(lambda m: mj.meta_loss(m, tasks, learner)), (meta,), order=1, modes=["rev"],
                  eps=FD_EPS, atol=FD_TOL, rtol=FD_TOL)

  def test_inner_lr_sets_the_input_gate(self):
    with jax.enable_x64(True):
      opt_params = lo.meta_lstm(inner_lr=0.1, dtype=jnp.float64).init(jax.random.key(4))
      np.testing.assert_allclose(jax.nn.sigmoid(opt_params["input_gate"]["b"]), [0.1], rtol=1e-12)
      forget = jax.nn.sigmoid(opt_params["forget_gate"]["b"])
      self.assertTrue(0.98 < float(forget[0]) < 0.9976)  # b_F ~ U(4, 6): near 1, as the paper

  def test_its_update_needs_the_loss(self):
    transform = lo.meta_lstm().bind(lo.meta_lstm().init(jax.random.key(5)))
    params = {"w": jnp.ones(2)}
    with self.assertRaisesRegex(ValueError, r"needs the params and the loss: update\(grads, "
                                r"state, params, value=loss\)"):
      transform.update(params, transform.init(params), params)


class LSTMOptimizerTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_the_meta_gradient_matches_central_differences(self):
    with jax.enable_x64(True):
      params, tasks = _params(jax.random.key(6)), _tasks(jax.random.key(7))
      learner = _learner(lo.lstm_optimizer(hidden=3, dtype=jnp.float64))
      meta = learner.init(params)
      check_grads(self.variant(lambda m: mj.meta_loss(m, tasks, learner)), (meta,), order=1, modes=["rev"],
                  eps=FD_EPS, atol=FD_TOL, rtol=FD_TOL)

  @chex.variants(with_jit=True, without_jit=True)
  def test_its_update_is_the_scaled_output_of_one_lstm_for_every_coordinate(self):
    with jax.enable_x64(True):
      optimizer = lo.lstm_optimizer(hidden=4, layers=1, output_scale=0.1, dtype=jnp.float64)
      opt_params = optimizer.init(jax.random.key(8))
      transform = optimizer.bind(opt_params)
      grads = {"a": jnp.array([[0.5, -2e-6]]), "b": jnp.array([3.0])}
      updates, _ = self.variant(transform.update)(grads, transform.init(grads), grads)
      cell = opt_params["cells"][0]
      for g, u in zip(jnp.array([0.5, -2e-6, 3.0]), jax.tree.leaves(updates)[0].ravel().tolist()
                      + jax.tree.leaves(updates)[1].tolist()):
        gates = jnp.concatenate([lo.preprocess(g), jnp.zeros(4)]) @ cell["w"] + cell["b"]
        i, f, c_in, o = jnp.split(gates, 4)
        h = jax.nn.sigmoid(o) * jnp.tanh(jax.nn.sigmoid(i) * jnp.tanh(c_in))
        want = 0.1 * (h @ opt_params["out"]["w"] + opt_params["out"]["b"])[0]
        np.testing.assert_allclose(u, want, rtol=1e-12)


class AsInnerOptimizerTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_state_is_per_task(self):
    """The vmapped meta-loss equals the mean of each task adapted alone: no state crosses tasks."""
    with jax.enable_x64(True):
      params, tasks = _params(jax.random.key(9)), _tasks(jax.random.key(10), num_tasks=3)
      for optimizer in (lo.meta_lstm(dtype=jnp.float64), lo.lstm_optimizer(dtype=jnp.float64)):
        learner = _learner(optimizer)
        meta = learner.init(params)
        batched = self.variant(lambda m: mj.meta_loss(m, tasks, learner))(meta)
        alone = [learner.task_loss(meta, jax.tree.map(lambda a: a[i], tasks))[0]
                 for i in range(3)]
        np.testing.assert_allclose(batched, np.mean(alone), rtol=F64_TOL)

  def test_without_learn_init_only_the_optimizer_learns(self):
    with jax.enable_x64(True):
      params, tasks = _params(jax.random.key(11)), _tasks(jax.random.key(12))
      learner = _learner(lo.meta_lstm(dtype=jnp.float64), learn_init=False)
      grads = jax.grad(mj.meta_loss)(learner.init(params), tasks, learner)
      self.assertEqual(float(optax.tree.norm(grads["params"])), 0.0)
      self.assertGreater(float(optax.tree.norm(grads["optimizer"])), 0.0)

  def test_meta_training_lowers_the_query_loss(self):
    params, tasks = _params(jax.random.key(13), jnp.float32), _tasks(jax.random.key(14),
                                                                        dtype=jnp.float32)
    learner = _learner(lo.meta_lstm(inner_lr=0.1))
    meta_step = mj.make_meta_step(learner, optax.adam(1e-2))
    state = meta_step.init(params)
    losses = []
    for _ in range(15):
      state, metrics = meta_step.step(state, tasks)
      losses.append(float(metrics["outer/loss"]))
    self.assertLess(losses[-1], losses[0])

  def test_bad_combinations_are_refused(self):
    with self.assertRaisesRegex(ValueError, "exactly one of inner_lr, optimizer or "
                                "learned_optimizer"):
      _learner(lo.meta_lstm(), inner_lr=0.1)
    with self.assertRaisesRegex(TypeError, "learned_optimizer must have init"):
      _learner(optax.sgd(0.1))
    learner = _learner(lo.meta_lstm())
    with self.assertRaisesRegex(ValueError, r"learned_optimizer='meta_lstm' takes meta-params "
                                r"\{'optimizer', 'params'\}"):
      learner.model_params(_params(jax.random.key(15), jnp.float32))
    with self.assertRaisesRegex(ValueError, r"inner_lr must be a number in \(0, 1\)"):
      lo.meta_lstm(inner_lr=1.5)
    with self.assertRaisesRegex(ValueError, "hidden must be an int >= 1, got 0"):
      lo.lstm_optimizer(hidden=0)


if __name__ == "__main__":
  pytest.main([__file__])
