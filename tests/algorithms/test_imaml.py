"""Tests of implicit MAML: closed forms on quadratic tasks, convergence with the inner solve,
central differences, and a backward pass that does not depend on the number of inner steps.

The quadratic tasks: `params = {"a": [3], "b": [2]}` read as one phi in R^5, a linear model
`x @ phi` and the loss `0.5 mean((x @ phi - y)^2)`, so the support loss is
`0.5 phi^T A phi - b^T phi + c` with `A = X^T X / n` (eigenvalues 0.088 to 1.84 here),
`b = X^T y / n`, and likewise the query loss (`Aq`, `bq`). Then
`phi* = (A + lam I)^{-1} (b + lam theta)` and the implicit gradient is
`g = lam (A + lam I)^{-1} grad Lq(phi*)`, `grad Lq(phi) = Aq phi - bq`.
"""

from __future__ import annotations

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized
from jax.test_util import check_grads

import metajax as mj
from metajax.algorithms.imaml import IMAML

F64_TOL = 1e-10  # float64 closed forms (measured errors ~1e-16)
FD_TOL = 1e-6    # central differences in float64
DIM = 5
LAM = 1.0
INNER_LR = 0.3   # gradient descent on G contracts by rho = max |1 - lr (mu + lam)| = 0.674 here
CONVERGED = 200  # inner steps: rho^200 ~ 1e-34, converged to float64 precision


def _apply(params, x):
  return x @ jnp.concatenate([params["a"], params["b"]])


def _loss(outputs, y):
  return 0.5 * jnp.mean(jnp.square(outputs - y))


def _quadratic(key=0, num_tasks=None):
  """A float64 quadratic task (or `num_tasks` of them), theta, and the task's `A, b, Aq, bq`."""
  n = 1 if num_tasks is None else num_tasks
  ks = jax.random.split(jax.random.key(key), 4)
  xs = jax.random.normal(ks[0], (n, 8, DIM), jnp.float64)
  ys = jax.random.normal(ks[1], (n, 8), jnp.float64)
  xq = jax.random.normal(ks[2], (n, 6, DIM), jnp.float64)
  yq = jax.random.normal(ks[3], (n, 6), jnp.float64)
  tasks = mj.Task(xs, ys, xq, yq)
  theta = {"a": jnp.array([0.0, 1 / 3, 2 / 3]), "b": jnp.array([-1.0, -1.0])}
  task = tasks if num_tasks is not None else jax.tree.map(lambda v: v[0], tasks)
  return task, theta


def _forms(task):
  """`A, b, Aq, bq` of one quadratic task."""
  xs, ys, xq, yq = task
  return xs.T @ xs / len(ys), xs.T @ ys / len(ys), xq.T @ xq / len(yq), xq.T @ yq / len(yq)


def _flat(params):
  return jnp.concatenate([params["a"], params["b"]])


def _solution(theta, a, b, lam=LAM):
  return jnp.linalg.solve(a + lam * jnp.eye(DIM), b + lam * theta)


def _closed_form_gradient(theta, task, lam=LAM, damping=0.0):
  """`((1 + damping) I + A / lam)^{-1} grad Lq(phi*)` (the implicit gradient when 0)."""
  a, b, aq, bq = _forms(task)
  phi = _solution(_flat(theta), a, b, lam)
  return jnp.linalg.solve((1 + damping) * jnp.eye(DIM) + a / lam, aq @ phi - bq)


def _learner(**kwargs):
  kwargs = {"num_inner_steps": CONVERGED, "inner_lr": INNER_LR, "lam": LAM, "cg_steps": DIM,
            **kwargs}
  return IMAML(_apply, _loss, **kwargs)


def _meta_grad(learner, theta, task):
  return jax.grad(lambda p: learner.task_loss(p, task)[0])(theta)


class ClosedFormTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_converged_gradient_is_the_closed_form(self):
    """Inner solve and CG converged: `g = lam (A + lam I)^{-1} grad Lq(phi*)`, and the adapted
    params are `phi*` (measured: both within 1e-16)."""
    with jax.enable_x64(True), jax.default_matmul_precision("highest"):
      task, theta = _quadratic()
      learner = _learner()
      grad = self.variant(lambda p: _meta_grad(learner, p, task))(theta)
      np.testing.assert_allclose(_flat(grad), _closed_form_gradient(theta, task), atol=F64_TOL)
      a, b, _, _ = _forms(task)
      adapted = self.variant(lambda p: learner.adapt(p, task.support_x, task.support_y))(theta)
      np.testing.assert_allclose(_flat(adapted), _solution(_flat(theta), a, b), atol=F64_TOL)

  @chex.variants(with_jit=True, without_jit=True)
  def test_an_optax_inner_solver_gives_the_same_gradient(self):
    """Heavy-ball SGD (momentum 0.5) as the inner solver: only the solution matters."""
    with jax.enable_x64(True), jax.default_matmul_precision("highest"):
      task, theta = _quadratic()
      learner = _learner(inner_lr=None, optimizer=optax.sgd(0.2, momentum=0.5),
                         num_inner_steps=300)
      grad = self.variant(lambda p: _meta_grad(learner, p, task))(theta)
      np.testing.assert_allclose(_flat(grad), _closed_form_gradient(theta, task), atol=F64_TOL)

  @chex.variants(with_jit=True, without_jit=True)
  def test_damping_solves_the_damped_system(self):
    """`cg_damping=delta` solves `((1 + delta) I + A / lam) g = grad Lq(phi*)`."""
    with jax.enable_x64(True), jax.default_matmul_precision("highest"):
      task, theta = _quadratic()
      for lam, damping in ((1.0, 0.5), (2.0, 1.0)):
        learner = _learner(lam=lam, cg_damping=damping, inner_lr=0.25)
        grad = self.variant(lambda p, learner=learner: _meta_grad(learner, p, task))(theta)
        np.testing.assert_allclose(_flat(grad),
                                   _closed_form_gradient(theta, task, lam=lam, damping=damping),
                                   atol=F64_TOL)

  @chex.variants(with_jit=True, without_jit=True)
  def test_one_cg_step_is_the_first_krylov_iterate(self):
    """`cg_steps=1`: CG's first iterate from 0, `u = (r.r / r.M r) r` with `r = grad Lq(phi*)`,
    `M = I + A / lam`; it differs from the converged gradient (so the step count is used)."""
    with jax.enable_x64(True), jax.default_matmul_precision("highest"):
      task, theta = _quadratic()
      a, b, aq, bq = _forms(task)
      r = aq @ _solution(_flat(theta), a, b) - bq
      m = jnp.eye(DIM) + a / LAM
      grad = self.variant(lambda p: _meta_grad(_learner(cg_steps=1), p, task))(theta)
      np.testing.assert_allclose(_flat(grad), (r @ r) / (r @ m @ r) * r, atol=F64_TOL)
      self.assertGreater(float(jnp.linalg.norm(_flat(grad) - _closed_form_gradient(theta, task))),
                         1e-3)

  @chex.variants(with_jit=True, without_jit=True)
  def test_adapting_only_some_leaves_differentiates_the_fixed_ones_implicitly(self):
    """`adapt_mask` adapts "b" only: "a" stays at theta in the inner problem and still moves
    phi*_b; the gradient is that of `Lq(theta_a, phi*_b(theta))` with `phi*_b` from a linear
    solve (differentiated by JAX), for both leaves."""
    with jax.enable_x64(True), jax.default_matmul_precision("highest"):
      task, theta = _quadratic()
      a, b, aq, bq = _forms(task)

      def exact(p):
        # argmin_b 0.5 phi^T A phi - b^T phi + lam/2 |phi_b - theta_b|^2 with phi_a = theta_a
        ta, tb = p["a"], p["b"]
        phi_b = jnp.linalg.solve(a[3:, 3:] + LAM * jnp.eye(2), b[3:] - a[3:, :3] @ ta + LAM * tb)
        phi = jnp.concatenate([ta, phi_b])
        return 0.5 * phi @ aq @ phi - bq @ phi

      learner = _learner(adapt_mask={"a": False, "b": True})
      grad = self.variant(lambda p: _meta_grad(learner, p, task))(theta)
      chex.assert_trees_all_close(grad, jax.grad(exact)(theta), atol=F64_TOL)
      self.assertGreater(float(jnp.abs(grad["a"]).max()), 1e-3)  # the fixed leaves do move it


class ConvergenceTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_the_error_is_the_inner_solutions_error_mapped_by_the_implicit_jacobian(self):
    """With K inner steps phi_K is not phi*; the gradient computed at phi_K is off by exactly
    `lam (A + lam I)^{-1} Aq (phi_K - phi*)`, and `|phi_K - phi*| <= rho^K |theta - phi*|`, so
    it converges to the exact gradient of the regularised problem as the inner solve does.

    Measured |g_K - g*| (|g*| = 0.33): K=5: 1.0e-2, K=10: 3.8e-4, K=20: 4.5e-6,
    K=40: 1.6e-9, K=80: 1.6e-16.
    """
    with jax.enable_x64(True), jax.default_matmul_precision("highest"):
      task, theta = _quadratic()
      a, b, aq, _ = _forms(task)
      phi_star = _solution(_flat(theta), a, b)
      exact = _closed_form_gradient(theta, task)
      mu = jnp.linalg.eigvalsh(a)
      rho = float(jnp.max(jnp.abs(1 - INNER_LR * (mu + LAM))))
      jacobian_aq = LAM * jnp.linalg.solve(a + LAM * jnp.eye(DIM), aq)
      errors = []
      for k in (5, 10, 20, 40, 80):
        learner = _learner(num_inner_steps=k)
        grad = _flat(self.variant(lambda p, learner=learner: _meta_grad(learner, p, task))(theta))
        phi_k = _flat(learner.adapt(theta, task.support_x, task.support_y))
        np.testing.assert_allclose(grad - exact, jacobian_aq @ (phi_k - phi_star), atol=1e-13)
        self.assertLessEqual(float(jnp.linalg.norm(phi_k - phi_star)),
                             rho ** k * float(jnp.linalg.norm(_flat(theta) - phi_star)) + 1e-15)
        errors.append(float(jnp.linalg.norm(grad - exact)))
      self.assertEqual(errors, sorted(errors, reverse=True))
      self.assertLess(errors[-1], 1e-12)
      self.assertGreater(errors[0], 1e-3)  # 5 steps are visibly not converged


class FiniteDifferenceTest(chex.TestCase, parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_quadratic_task_against_central_differences(self):
    """`jax.grad` of the converged task loss (the implicit gradient) against central
    differences of the query loss at the converged inner solution."""
    with jax.enable_x64(True), jax.default_matmul_precision("highest"):
      task, theta = _quadratic()
      learner = _learner()
      check_grads(self.variant(lambda p: learner.task_loss(p, task)[0]), (theta,), order=1,
                  modes=("rev",), atol=FD_TOL, rtol=FD_TOL)

  @chex.variants(with_jit=True, without_jit=True)
  @pytest.mark.slow  # under the variants, which keep it per case; ~5 s and ~15 s
  def test_mlp_classification_against_central_differences(self):
    """A non-quadratic task: an MLP (27 params) with cross-entropy, lam = 2 (so `H + lam I` is
    positive definite), 150 inner steps and 27 CG steps: the implicit gradient is the gradient
    of the query loss at the converged solution, as central differences measure it."""
    with jax.enable_x64(True), jax.default_matmul_precision("highest"):
      model = mj.mlp(3, hidden=(4,), input_shape=(2,))
      params = jax.tree.map(lambda p: p.astype(jnp.float64), model.init(jax.random.key(1)))
      kx, kq = jax.random.split(jax.random.key(2))
      y = jnp.arange(3).repeat(2)
      centres = jnp.array([[1.0, 0.0], [-0.5, 0.87], [-0.5, -0.87]])
      task = mj.Task(centres[y] + 0.5 * jax.random.normal(kx, (6, 2), jnp.float64), y,
                     centres[y] + 0.5 * jax.random.normal(kq, (6, 2), jnp.float64), y)
      num_params = sum(p.size for p in jax.tree.leaves(params))
      learner = IMAML(model.apply, mj.cross_entropy, num_inner_steps=150, inner_lr=0.3,
                      lam=2.0, cg_steps=num_params)
      check_grads(self.variant(lambda p: learner.task_loss(p, task)[0]), (params,), order=1,
                  modes=("rev",), atol=FD_TOL, rtol=FD_TOL)


class MetaLossTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_meta_loss_over_tasks_is_the_mean_of_the_closed_forms(self):
    """`jax.grad(metajax.meta_loss)` (vmap over 3 tasks) = the mean of the per-task closed
    forms."""
    with jax.enable_x64(True), jax.default_matmul_precision("highest"):
      tasks, theta = _quadratic(num_tasks=3)
      learner = _learner()
      grad = self.variant(jax.grad(lambda p: mj.meta_loss(p, tasks, learner)))(theta)
      expected = sum(_closed_form_gradient(theta, jax.tree.map(lambda v, i=i: v[i], tasks))
                     for i in range(3)) / 3
      np.testing.assert_allclose(_flat(grad), expected, atol=F64_TOL)

  def test_make_meta_step_trains_and_evaluate_adapts(self):
    """One compiled outer step with integer labels (through `with_zeroing`), its metrics, and
    `evaluate` after adaptation."""
    model = mj.mlp(3, hidden=(8,), input_shape=(2,))
    params = model.init(jax.random.key(0))
    y = jnp.tile(jnp.arange(3).repeat(2), (4, 1))
    x = jax.random.normal(jax.random.key(1), (4, 6, 2)) + y[..., None]
    tasks = mj.Task(x, y, x, y)
    learner = mj.with_zeroing(IMAML(model.apply, mj.cross_entropy, num_inner_steps=5,
                                    inner_lr=0.3, lam=1.0, cg_steps=3, cg_damping=0.1))
    meta_step = mj.make_meta_step(learner, optax.adam(1e-2))
    state, metrics = meta_step.step(meta_step.init(params), tasks)
    self.assertEqual(int(state.step), 1)
    for name in ("outer/loss", "outer/grad_norm", "outer/query_accuracy",
                 "inner/support_loss_before", "inner/support_loss_after"):
      self.assertTrue(np.isfinite(metrics[name]), name)
    self.assertLess(float(metrics["inner/support_loss_after"]),
                    float(metrics["inner/support_loss_before"]))
    result = mj.evaluate(learner, state.params, tasks)
    self.assertGreaterEqual(result["accuracy_after"]["mean"], 0.0)


def _leading_axes(jaxpr) -> set[int]:
  """The leading axis of every array of rank >= 2 in a jaxpr, its sub-jaxprs included."""
  return {int(shape.split(",")[0]) for shape in re.findall(r"\[([0-9]+(?:,[0-9]+)+)\]",
                                                              str(jaxpr))}


class MemoryTest(chex.TestCase):

  def test_the_backward_pass_keeps_nothing_per_inner_step(self):
    """The gradient's program with 37 inner steps has no array `[37, ...]` (the rolled scan's
    per-step residuals of second-order MAML are such arrays: the check can fail; iMAML's only
    per-step values are the inner losses, `[37]`), and it has as many lines for 3 steps as for
    37."""
    task, theta = _quadratic()
    task = jax.tree.map(lambda v: v.astype(jnp.float32), task)
    theta = jax.tree.map(lambda v: v.astype(jnp.float32), theta)

    def program(learner):
      return jax.make_jaxpr(lambda p: _meta_grad(learner, p, task))(theta)

    self.assertNotIn(37, _leading_axes(program(_learner(num_inner_steps=37))))
    maml = mj.MAML(_apply, _loss, num_inner_steps=37, inner_lr=INNER_LR)
    self.assertIn(37, _leading_axes(program(maml)))
    short, long = (str(program(_learner(num_inner_steps=k))) for k in (3, 37))
    self.assertEqual(short.count("\n"), long.count("\n"))

  @pytest.mark.slow  # four compilations, ~20 s
  def test_compiled_temporaries_do_not_grow_with_inner_steps(self):
    """XLA's temporary buffers for the meta-gradient of an MLP: the same for 2 and 64 inner
    steps with iMAML, larger with 64 for second-order MAML (rolled)."""
    model = mj.mlp(3, hidden=(64, 64), input_shape=(16,))
    params = model.init(jax.random.key(0))
    y = jnp.tile(jnp.arange(3).repeat(10), (4, 1))
    x = jax.random.normal(jax.random.key(1), (4, 30, 16))
    tasks = mj.Task(x, y, x, y)

    def temp_bytes(learner):
      fn = jax.jit(jax.grad(lambda p: mj.meta_loss(p, tasks, learner)))
      stats = fn.lower(params).compile().memory_analysis()
      return stats.temp_size_in_bytes

    imaml = [temp_bytes(IMAML(model.apply, mj.cross_entropy, num_inner_steps=k, inner_lr=0.1,
                              cg_steps=5)) for k in (2, 64)]
    maml = [temp_bytes(mj.MAML(model.apply, mj.cross_entropy, num_inner_steps=k, inner_lr=0.1))
            for k in (2, 64)]
    self.assertEqual(imaml[0], imaml[1])
    self.assertGreater(maml[1], 2 * maml[0])


class ArgumentTest(parameterized.TestCase):

  @parameterized.parameters(
    ({"lam": 0.0}, "lam .* must be a number > 0, got 0.0"),
    ({"lam": True}, "lam .* must be a number > 0, got True"),
    ({"cg_steps": 0}, "cg_steps must be an int >= 1, got 0"),
    ({"cg_damping": -1.0}, "cg_damping must be a number >= 0, got -1.0"),
    ({"num_inner_steps": 0}, "num_inner_steps must be an int >= 1, got 0"),
    ({"optimizer": optax.sgd(0.1)}, "give exactly one of inner_lr"),
    ({"inner_lr": -0.1}, "inner_lr must be > 0"),
  )
  def test_bad_arguments_are_refused_by_name(self, kwargs, message):
    with self.assertRaisesRegex(ValueError, message):
      _learner(**kwargs)

  def test_is_a_learner(self):
    self.assertIsInstance(_learner(), mj.types.Learner)
