"""Tests of the inner loop and of the exactness of MAML's meta-gradients."""

from __future__ import annotations


import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized
from jax.test_util import check_grads

import metajax as mj

F64_TOL = 1e-9  # float64 agreement of two exact computations
FD_TOL = 1e-5  # float64 central finite differences with step FD_EPS
# Small enough that no max-pool window switches its argmax within +-FD_EPS (a switch makes the
# inner gradient, hence the meta-loss, jump; check_grads' default 1e-4 steps across some).
FD_EPS = 1e-6
F32_TOL = 1e-5


def _quadratic_problem(key, dim=4):
  """Support loss 1/2 t^T A t - b^T t and query loss 1/2 t^T B t - c^T t, A and B SPD."""
  k1, k2, k3, k4, k5 = jax.random.split(key, 5)
  ma = jax.random.normal(k1, (dim, dim))
  mb = jax.random.normal(k2, (dim, dim))
  a = ma @ ma.T / dim + jnp.eye(dim)
  b_mat = mb @ mb.T / dim + jnp.eye(dim)
  return (a, jax.random.normal(k3, (dim,)), b_mat, jax.random.normal(k4, (dim,)),
          jax.random.normal(k5, (dim,)))


def _quad_loss(theta, mat, vec):
  return 0.5 * theta @ mat @ theta - vec @ theta


def _tiny_mlp_problem(key, num_tasks=3, dtype=jnp.float64):
  # softplus: with ReLU the meta-loss jumps where the inner gradient does (see models.conv4), and
  # finite differences across a jump are meaningless.
  model = mj.mlp(3, hidden=(5,), input_shape=(2,), activation=jax.nn.softplus)
  kp, kx, ky, kq, ku = jax.random.split(key, 5)
  params = jax.tree.map(lambda p: p.astype(dtype), model.init(kp))
  tasks = mj.Task(
    jax.random.normal(kx, (num_tasks, 6, 2), dtype), jax.random.randint(ky, (num_tasks, 6), 0, 3),
    jax.random.normal(kq, (num_tasks, 9, 2), dtype), jax.random.randint(ku, (num_tasks, 9), 0, 3))
  return model, params, tasks


def _tiny_conv_problem(key, num_tasks=2, dtype=jnp.float64):
  model = mj.conv4(3, filters=3, input_shape=(16, 16, 1), activation=jax.nn.softplus)
  kp, kx, kq = jax.random.split(key, 3)
  params = jax.tree.map(lambda p: p.astype(dtype), model.init(kp))
  labels_s = jnp.tile(jnp.arange(3), (num_tasks, 1))
  labels_q = jnp.tile(jnp.arange(3).repeat(2), (num_tasks, 1))
  tasks = mj.Task(jax.random.normal(kx, (num_tasks, 3, 16, 16, 1), dtype), labels_s,
                  jax.random.normal(kq, (num_tasks, 6, 16, 16, 1), dtype), labels_q)
  return model, params, tasks


class AdaptTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(1, 2, 3)
  def test_quadratic_closed_form(self, num_steps):
    with jax.enable_x64(True):
      a, b, b_mat, c, theta = _quadratic_problem(jax.random.key(0))
      lr = 0.1
      loss_fn = lambda t, mat, vec: _quad_loss(t, mat, vec)  # noqa: E731

      def outer(t, first_order):
        adapted = mj.adapt(t, a, b, loss_fn=loss_fn, num_inner_steps=num_steps, inner_lr=lr,
                           first_order=first_order)
        return _quad_loss(adapted, b_mat, c)

      second = self.variant(jax.grad(lambda t: outer(t, False)))(theta)
      first = self.variant(jax.grad(lambda t: outer(t, True)))(theta)
      # Closed forms: theta_k = theta_{k-1} - lr (A theta_{k-1} - b), so
      # d theta_K / d theta = (I - lr A)^K, and grad Lq(theta_K) = B theta_K - c.
      t_k = theta
      for _ in range(num_steps):
        t_k = t_k - lr * (a @ t_k - b)
      grad_q = b_mat @ t_k - c
      jac = jnp.linalg.matrix_power(jnp.eye(4) - lr * a, num_steps)
      np.testing.assert_allclose(second, jac.T @ grad_q, rtol=F64_TOL, atol=F64_TOL)
      np.testing.assert_allclose(first, grad_q, rtol=F64_TOL, atol=F64_TOL)
      # A non-zero support Hessian makes the two differ.
      self.assertGreater(float(jnp.max(jnp.abs(second - first))), 1e-3)

  @parameterized.parameters(1, 2, 3)
  def test_second_order_matches_finite_differences_mlp(self, num_steps):
    with jax.enable_x64(True):
      model, params, tasks = _tiny_mlp_problem(jax.random.key(1))
      learner = mj.MAML(model.apply, mj.cross_entropy, num_inner_steps=num_steps, inner_lr=0.5)
      f = jax.jit(lambda p: mj.meta_loss(p, tasks, learner))
      check_grads(f, (params,), order=2, modes=["rev"], atol=FD_TOL, rtol=FD_TOL, eps=FD_EPS)

  def _check_conv4_finite_differences(self, num_steps):
    with jax.enable_x64(True):
      model, params, tasks = _tiny_conv_problem(jax.random.key(2))
      learner = mj.MAML(model.apply, mj.cross_entropy, num_inner_steps=num_steps, inner_lr=0.1)
      f = jax.jit(lambda p: mj.meta_loss(p, tasks, learner))
      check_grads(f, (params,), order=1, modes=["rev"], atol=FD_TOL, rtol=FD_TOL, eps=FD_EPS)

  def test_second_order_matches_finite_differences_conv4(self):
    self._check_conv4_finite_differences(1)

  def test_first_order_differs_and_equals_query_gradient(self):
    with jax.enable_x64(True):
      model, params, tasks = _tiny_mlp_problem(jax.random.key(3), num_tasks=1)
      task = jax.tree.map(lambda x: x[0], tasks)
      kw = dict(loss_fn=mj.make_loss_fn(model.apply, mj.cross_entropy), num_inner_steps=2,
                inner_lr=0.5)

      def query_loss(p, first_order):
        adapted = mj.adapt(p, task.support_x, task.support_y, first_order=first_order, **kw)
        return mj.cross_entropy(model.apply(adapted, task.query_x), task.query_y)

      fo = jax.jit(jax.grad(query_loss), static_argnums=1)(params, True)
      so = jax.jit(jax.grad(query_loss), static_argnums=1)(params, False)
      adapted = mj.adapt(params, task.support_x, task.support_y, **kw)
      at_adapted = jax.grad(lambda p: mj.cross_entropy(model.apply(p, task.query_x),
                                                       task.query_y))(adapted)
      chex.assert_trees_all_close(fo, at_adapted, rtol=F64_TOL, atol=F64_TOL)
      diff = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(fo),
                                                               jax.tree.leaves(so)))
      self.assertGreater(diff, 1e-4)

  @chex.variants(with_jit=True, without_jit=True)
  def test_inner_losses_and_step_count(self):
    with jax.enable_x64(True):
      a, b, _, _, theta = _quadratic_problem(jax.random.key(4))
      fn = self.variant(lambda t: mj.adapt(t, a, b, loss_fn=_quad_loss, num_inner_steps=3,
                                           inner_lr=0.1, return_losses=True))
      adapted, losses = fn(theta)
      t = theta
      expected = []
      for _ in range(3):
        expected.append(_quad_loss(t, a, b))
        t = t - 0.1 * (a @ t - b)
      np.testing.assert_allclose(losses, jnp.stack(expected), rtol=F64_TOL)
      np.testing.assert_allclose(adapted, t, rtol=F64_TOL)

  def test_per_tensor_inner_lr_pytree(self):
    with jax.enable_x64(True):
      model, params, tasks = _tiny_mlp_problem(jax.random.key(5), num_tasks=1)
      task = jax.tree.map(lambda x: x[0], tasks)
      loss_fn = mj.make_loss_fn(model.apply, mj.cross_entropy)
      lrs = jax.tree.map(lambda _: 0.0, params)
      lrs["head"]["kernel"] = 0.3
      adapted = mj.adapt(params, task.support_x, task.support_y, loss_fn=loss_fn, inner_lr=lrs)
      grads = jax.grad(loss_fn)(params, task.support_x, task.support_y)
      expected = jax.tree.map(lambda p, g, lr: p - lr * g, params, grads, lrs)
      chex.assert_trees_all_close(adapted, expected, rtol=F64_TOL)

  @chex.variants(with_jit=True, without_jit=True)
  def test_optax_inner_optimizer_sgd_equals_plain(self):
    with jax.enable_x64(True):
      model, params, tasks = _tiny_mlp_problem(jax.random.key(6), num_tasks=1)
      task = jax.tree.map(lambda x: x[0], tasks)
      loss_fn = mj.make_loss_fn(model.apply, mj.cross_entropy)

      def outer(p, **kw):
        adapted = mj.adapt(p, task.support_x, task.support_y, loss_fn=loss_fn,
                           num_inner_steps=2, **kw)
        return loss_fn(adapted, task.query_x, task.query_y)

      g_plain = self.variant(jax.grad(lambda p: outer(p, inner_lr=0.3)))(params)
      g_optax = self.variant(jax.grad(lambda p: outer(p, optimizer=optax.sgd(0.3))))(params)
      chex.assert_trees_all_close(g_plain, g_optax, rtol=F64_TOL, atol=1e-12)

  def test_adam_inner_with_eps_root_has_finite_meta_gradient(self):
    model, params, tasks = _tiny_mlp_problem(jax.random.key(7), dtype=jnp.float32)
    learner = mj.MAML(model.apply, mj.cross_entropy, num_inner_steps=2,
                      optimizer=optax.adam(0.1, eps_root=1e-8))
    grads = jax.jit(jax.grad(lambda p: mj.meta_loss(p, tasks, learner)))(params)
    self.assertTrue(all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads)))

  @chex.variants(with_jit=True, without_jit=True)
  def test_remat_gives_the_same_meta_gradient(self):
    with jax.enable_x64(True):
      model, params, tasks = _tiny_mlp_problem(jax.random.key(8))
      kw = dict(num_inner_steps=3, inner_lr=0.5)
      plain = mj.MAML(model.apply, mj.cross_entropy, **kw)
      g1 = self.variant(jax.grad(lambda p: mj.meta_loss(p, tasks, plain)))(params)
      for policy in (True, jax.checkpoint_policies.dots_saveable):
        remat = mj.MAML(model.apply, mj.cross_entropy, remat=policy, **kw)
        g2 = self.variant(jax.grad(lambda p, r=remat: mj.meta_loss(p, tasks, r)))(params)
        chex.assert_trees_all_close(g1, g2, rtol=F64_TOL, atol=1e-12)

  def test_remat_policy_saves_what_it_allows(self):
    model, params, tasks = _tiny_mlp_problem(jax.random.key(8), dtype=jnp.float32)
    task = jax.tree.map(lambda a: a[0], tasks)

    def num_saved(remat):  # entries of the residuals that the meta-loss' vjp closes over
      learner = mj.MAML(model.apply, mj.cross_entropy, num_inner_steps=2, inner_lr=0.5,
                        remat=remat)
      vjp = jax.vjp(lambda p: learner.task_loss(p, task)[0], params)[1]
      return sum(r.size for r in jax.tree.leaves(vjp))

    plain, dots, full = (num_saved(r) for r in
                         (False, jax.checkpoint_policies.dots_saveable, True))
    self.assertLess(full, dots)
    self.assertLess(dots, plain)

  def test_remat_rejects_other_values(self):
    model, params, tasks = _tiny_mlp_problem(jax.random.key(8), dtype=jnp.float32)
    with self.assertRaisesRegex(ValueError, "remat must be a bool or a jax.checkpoint_policies"):
      mj.adapt(params, tasks.support_x[0], tasks.support_y[0],
               loss_fn=mj.make_loss_fn(model.apply, mj.cross_entropy), inner_lr=0.1,
               remat="dots_saveable")

  def test_unroll_gives_the_same_meta_gradient(self):
    # Op by op (what unroll means, not what XLA:CPU compiles of it: benchmarks/xla_cpu/sweep.py):
    # rolled, partly and fully unrolled agree to float64 rounding.
    with jax.enable_x64(True):
      model, params, tasks = _tiny_mlp_problem(jax.random.key(9))
      grads = []
      for u in (None, 1, 2, True):
        learner = mj.MAML(model.apply, mj.cross_entropy, num_inner_steps=3, inner_lr=0.5,
                          unroll=u)
        grads.append(jax.grad(lambda p: mj.meta_loss(p, tasks, learner))(params))
      for g in grads[1:]:
        chex.assert_trees_all_close(g, grads[0], rtol=F64_TOL, atol=1e-12)


@pytest.mark.slow
class AdaptMoreStepsTest(chex.TestCase):
  """Conv-4 finite differences through 2 and 3 inner steps (CI's slow step)."""

  @parameterized.parameters(2, 3)
  def test_second_order_matches_finite_differences_conv4_more_steps(self, num_steps):
    AdaptTest._check_conv4_finite_differences(self, num_steps)


class HeadOnlyAndZeroingTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_head_only_leaves_encoder_bit_identical(self):
    model, params, tasks = _tiny_mlp_problem(jax.random.key(9), dtype=jnp.float32)
    task = jax.tree.map(lambda x: x[0], tasks)
    fn = self.variant(lambda p: mj.adapt(
      p, task.support_x, task.support_y, loss_fn=mj.make_loss_fn(model.apply, mj.cross_entropy),
      num_inner_steps=3, inner_lr=0.5, adapt_mask=mj.head_mask))
    adapted = fn(params)
    for new, old in zip(jax.tree.leaves(adapted["encoder"]), jax.tree.leaves(params["encoder"])):
      np.testing.assert_array_equal(np.asarray(new), np.asarray(old))
    self.assertFalse(np.array_equal(adapted["head"]["kernel"], params["head"]["kernel"]))

  def test_head_only_still_gives_encoder_meta_gradient(self):
    with jax.enable_x64(True):
      model, params, tasks = _tiny_mlp_problem(jax.random.key(10))
      learner = mj.MAML(model.apply, mj.cross_entropy, inner_lr=0.5, adapt_mask=mj.head_mask)
      f = jax.jit(lambda p: mj.meta_loss(p, tasks, learner))
      check_grads(f, (params,), order=1, modes=["rev"], atol=FD_TOL, rtol=FD_TOL, eps=FD_EPS)

  @chex.variants(with_jit=True, without_jit=True)
  def test_zeroing_starts_inner_loop_at_zero_head(self):
    with jax.enable_x64(True):
      model, params, tasks = _tiny_mlp_problem(jax.random.key(11), num_tasks=1)
      task = jax.tree.map(lambda x: x[0], tasks)
      learner = mj.with_zeroing(mj.MAML(model.apply, mj.mse_onehot, inner_lr=0.7,
                                        adapt_mask=mj.head_mask))
      start = learner.model_params(params)
      for leaf in jax.tree.leaves(start["head"]):
        np.testing.assert_array_equal(np.asarray(leaf), 0.0)
      adapted = self.variant(lambda p: learner.adapt(p, task.support_x, task.support_y))(params)
      # One step from w = 0: w' = -lr * grad_w L_support(w = 0).
      zeroed = mj.zero_head(params)
      grad_w = jax.grad(lambda h: mj.mse_onehot(
        model.head(h, model.features(zeroed, task.support_x)), task.support_y))(zeroed["head"])
      chex.assert_trees_all_close(adapted["head"], jax.tree.map(lambda g: -0.7 * g, grad_w),
                                  rtol=F64_TOL, atol=1e-15)

  def test_zeroing_head_gets_no_outer_gradient(self):
    model, params, tasks = _tiny_mlp_problem(jax.random.key(12), dtype=jnp.float32)
    learner = mj.with_zeroing(mj.MAML(model.apply, mj.cross_entropy, inner_lr=0.5))
    grads = jax.grad(mj.meta_loss)(params, tasks, learner)
    for g in jax.tree.leaves(grads["head"]):
      np.testing.assert_array_equal(np.asarray(g), 0.0)
    self.assertGreater(float(optax.tree.norm(grads["encoder"])), 0.0)


class BadInputTest(parameterized.TestCase):

  def test_non_positive_inner_steps(self):
    for steps in (0, -1, 1.5):
      with self.assertRaisesRegex(ValueError, "num_inner_steps must be an int >= 1"):
        mj.adapt(jnp.zeros(2), jnp.zeros(2), jnp.zeros(2), loss_fn=lambda p, x, y: p @ x,
                 num_inner_steps=steps, inner_lr=0.1)
      with self.assertRaisesRegex(ValueError, "num_inner_steps"):
        mj.MAML(lambda p, x: x, mj.mse, num_inner_steps=steps, inner_lr=0.1)

  def test_lr_and_optimizer_are_exclusive(self):
    with self.assertRaisesRegex(ValueError, "exactly one of inner_lr"):
      mj.adapt(jnp.zeros(2), None, None, loss_fn=lambda p, x, y: p.sum())
    with self.assertRaisesRegex(ValueError, "exactly one of inner_lr"):
      mj.MAML(lambda p, x: x, mj.mse, inner_lr=0.1, optimizer=optax.sgd(0.1))

  def test_mask_with_wrong_structure(self):
    with self.assertRaisesRegex(ValueError, "adapt_mask must have the structure of params"):
      mj.adapt({"a": jnp.zeros(2)}, None, None, loss_fn=lambda p, x, y: p["a"].sum(),
               inner_lr=0.1, adapt_mask={"b": True})
    with self.assertRaisesRegex(ValueError, "selects no parameter"):
      mj.adapt({"a": jnp.zeros(2)}, None, None, loss_fn=lambda p, x, y: p["a"].sum(),
               inner_lr=0.1, adapt_mask={"a": False})

  def test_head_transforms_need_a_head(self):
    with self.assertRaisesRegex(ValueError, r"no leaf of params matches a key named 'head'.*\['w'\]"):
      mj.zero_head({"w": jnp.zeros(2)})
    with self.assertRaisesRegex(ValueError, r"no leaf of params matches a key named 'head'.*\['0'\]"):
      mj.head_mask([jnp.zeros(2)])
    with self.assertRaisesRegex(ValueError, "no encoder left"):
      mj.head_mask({"head": jnp.zeros(2)})
    with self.assertRaisesRegex(TypeError, "head must be None, a path"):
      mj.head_mask({"head": jnp.zeros(2), "w": jnp.zeros(1)}, head=3)


if __name__ == "__main__":
  pytest.main([__file__])
