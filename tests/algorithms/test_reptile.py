"""Tests of Reptile: closed-form pseudo-gradients, batched vs serial, the surrogate task loss."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized

import metajax as mj
from metajax.algorithms import reptile

F64_TOL = 1e-10
F32_TOL = 1e-5


def _problem(key, num_tasks=3, dtype=jnp.float32):
  """3-way tasks in 2-D: class j is a blob around a corner of a triangle, plus unit noise."""
  model = mj.mlp(3, hidden=(6,), input_shape=(2,))
  kp, kx, kq = jax.random.split(key, 3)
  params = jax.tree.map(lambda p: p.astype(dtype), model.init(kp))
  y = jnp.tile(jnp.arange(3).repeat(2), (num_tasks, 1))
  centres = 2.0 * jnp.array([[1.0, 0.0], [-0.5, 0.87], [-0.5, -0.87]], dtype)
  tasks = mj.Task(centres[y] + jax.random.normal(kx, (num_tasks, 6, 2), dtype), y,
                  centres[y] + jax.random.normal(kq, (num_tasks, 6, 2), dtype), y)
  return model, params, tasks


def _task(tasks, i):
  return jax.tree.map(lambda x: x[i], tasks)


def _linear(params, x):
  return x @ params["w"]


class PseudoGradientTest(chex.TestCase):

  def test_one_sgd_step_is_a_scaled_gradient_step(self):
    # theta - mean theta' = inner_lr * mean_i grad L_i(theta); with optax.sgd(meta_lr) outside,
    # theta_new = theta - meta_lr * inner_lr * mean_i grad L_i(theta).
    with jax.enable_x64(True):
      model, params, tasks = _problem(jax.random.key(0), dtype=jnp.float64)
      inner_lr, meta_lr = 0.3, 0.7
      learner = reptile.Reptile(model.apply, mj.cross_entropy, inner_lr=inner_lr)
      meta_step = reptile.make_reptile_step(learner, optax.sgd(meta_lr))
      state, metrics = meta_step.step(meta_step.init(params), tasks)
      loss_fn = mj.make_loss_fn(model.apply, mj.cross_entropy)
      grads = [jax.grad(loss_fn)(params, t.support_x, t.support_y)
               for t in (_task(tasks, i) for i in range(3))]
      mean_grad = jax.tree.map(lambda *g: sum(g) / 3, *grads)
      expected = jax.tree.map(lambda p, g: p - meta_lr * inner_lr * g, params, mean_grad)
      chex.assert_trees_all_close(state.params, expected, rtol=F64_TOL, atol=1e-13)
      np.testing.assert_allclose(metrics["outer/grad_norm"],
                                 inner_lr * optax.tree.norm(mean_grad), rtol=F64_TOL)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(1, 4)
  def test_k_steps_on_least_squares_closed_form(self, num_inner_steps):
    # L(w) = mean (Xw - y)^2 = 1/2 (w - w*)^T H (w - w*) + const, H = 2 X^T X / n, so k steps of
    # gradient descent give w' = w* + (I - a H)^k (w - w*).
    with jax.enable_x64(True):
      kx, ky, kw = jax.random.split(jax.random.key(1), 3)
      x = jax.random.normal(kx, (8, 3), jnp.float64)
      y = jax.random.normal(ky, (8,), jnp.float64)
      w = jax.random.normal(kw, (3,), jnp.float64)
      lr = 0.1
      learner = reptile.Reptile(_linear, mj.mse, num_inner_steps=num_inner_steps, inner_lr=lr)
      task = mj.Task(x, y, x, y)
      grads, _ = self.variant(learner.pseudo_gradient)({"w": w}, task)
      xn, yn = np.asarray(x), np.asarray(y)
      h = 2.0 * xn.T @ xn / 8
      w_star = np.linalg.lstsq(xn, yn, rcond=None)[0]
      contraction = np.linalg.matrix_power(np.eye(3) - lr * h, num_inner_steps)
      expected = np.asarray(w) - (w_star + contraction @ (np.asarray(w) - w_star))
      np.testing.assert_allclose(grads["w"], expected, rtol=1e-9, atol=1e-12)

  def test_optax_inner_sgd_equals_inner_lr(self):
    model, params, tasks = _problem(jax.random.key(2))
    plain = reptile.Reptile(model.apply, mj.cross_entropy, num_inner_steps=3, inner_lr=0.2)
    opt = reptile.Reptile(model.apply, mj.cross_entropy, num_inner_steps=3,
                          optimizer=optax.sgd(0.2))
    task = _task(tasks, 0)
    chex.assert_trees_all_close(jax.jit(plain.pseudo_gradient)(params, task),
                                jax.jit(opt.pseudo_gradient)(params, task), rtol=F32_TOL,
                                atol=1e-6)

  def test_surrogate_task_loss_gradient_is_the_pseudo_gradient(self):
    model, params, tasks = _problem(jax.random.key(3))
    learner = reptile.Reptile(model.apply, mj.cross_entropy, num_inner_steps=2, inner_lr=0.5)
    task = _task(tasks, 1)
    grads = jax.jit(jax.grad(lambda p: learner.task_loss(p, task)[0]))(params)
    chex.assert_trees_all_close(grads, jax.jit(learner.pseudo_gradient)(params, task)[0],
                                rtol=F32_TOL, atol=1e-7)
    with self.assertRaisesRegex(ValueError, "learn inner"):
      reptile.Reptile(model.apply, mj.cross_entropy, inner_lr=0.1, learn_inner_lr="element")


class ReptileStepTest(chex.TestCase):

  def _learner(self, model):
    return reptile.Reptile(model.apply, mj.cross_entropy, num_inner_steps=2, inner_lr=0.3)

  def test_serial_equals_batched_with_one_task(self):
    model, params, tasks = _problem(jax.random.key(4), num_tasks=1)
    out = []
    for serial in (False, True):
      meta_step = reptile.make_reptile_step(self._learner(model), optax.adam(0.1), serial=serial)
      state = meta_step.init(params)
      for _ in range(2):
        state, metrics = meta_step.step(state, tasks)
      out.append((state, metrics))
    chex.assert_trees_all_close(out[0], out[1], rtol=F32_TOL, atol=1e-6)

  def test_serial_is_a_sequence_of_one_task_steps(self):
    model, params, tasks = _problem(jax.random.key(5), num_tasks=3)
    learner = self._learner(model)
    serial = reptile.make_reptile_step(learner, optax.adam(0.1), serial=True, donate=False)
    single = reptile.make_reptile_step(learner, optax.adam(0.1), donate=False)
    state, _ = serial.step(serial.init(params), tasks)
    manual = single.init(params)
    for i in range(3):
      manual, _ = single.step(manual, jax.tree.map(lambda x, i=i: x[i:i + 1], tasks))
    chex.assert_trees_all_close((state.params, state.opt_state), (manual.params,
                                manual.opt_state), rtol=F32_TOL, atol=1e-6)
    self.assertEqual(int(state.step), 1)

  def test_make_meta_step_on_the_surrogate_is_batched_reptile(self):
    model, params, tasks = _problem(jax.random.key(6))
    learner = self._learner(model)
    a = reptile.make_reptile_step(learner, optax.sgd(0.5))
    b = mj.make_meta_step(learner, optax.sgd(0.5))
    state_a, metrics_a = a.step(a.init(params), tasks)
    state_b, metrics_b = b.step(b.init(params), tasks)
    chex.assert_trees_all_close(state_a.params, state_b.params, rtol=F32_TOL, atol=1e-6)
    np.testing.assert_allclose(metrics_a["outer/grad_norm"], metrics_b["outer/grad_norm"],
                               rtol=F32_TOL)

  def test_trains_traces_once_evaluates_and_composes_with_zeroing(self):
    model, params, tasks = _problem(jax.random.key(7))
    learner = mj.with_zeroing(self._learner(model))
    self.assertIsInstance(learner, reptile.Reptile)
    meta_step = reptile.make_reptile_step(learner, optax.sgd(1.0))
    state = meta_step.init(params)
    losses = []
    for _ in range(8):
      state, metrics = meta_step.step(state, tasks)
      losses.append(float(metrics["outer/loss"]))
    self.assertLess(losses[-1], losses[0])
    self.assertEqual(int(state.step), 8)
    with self.assertWarnsRegex(mj.meta.RecompileWarning, "compiles again"):
      state, _ = meta_step.step(state, jax.tree.map(lambda x: x[:2], tasks))
    per_task = mj.evaluate_tasks(learner, state.params, tasks)
    np.testing.assert_allclose(per_task["loss_before"], np.log(3.0), rtol=1e-6)  # zero head
    with self.assertRaisesRegex(TypeError, "Reptile learner"):
      reptile.make_reptile_step(mj.MAML(model.apply, mj.cross_entropy, inner_lr=0.1),
                                optax.sgd(1.0))


if __name__ == "__main__":
  pytest.main([__file__])
