"""Implicit MAML (Rajeswaran, Finn, Kakade and Levine 2019): meta-gradients through the solution.

Each task adapts by (approximately) solving a proximally regularised inner problem that starts
from, and is pulled towards, the meta-parameters theta (the paper's Section 3):

    phi*(theta) = argmin_phi  G(phi, theta),   G(phi, theta) = L_s(phi) + lam/2 |phi - theta|^2

with `L_s` the support loss. At the solution `grad_phi G = 0`, so by the implicit function
theorem `d phi* / d theta = (I + H / lam)^{-1}`, `H = hess L_s(phi*)` (the paper's Lemma 1), and
the meta-gradient of the query loss `L_q(phi*(theta))` is

    g_theta = (I + H / lam)^{-1} grad L_q(phi*).

It depends on the inner solution only, not on the path that found it: the inner loop (any of
`metajax.adapt`'s solvers: `num_inner_steps` gradient steps of `inner_lr`, or an optax
`optimizer`) runs forward only, with no gradient through it, and the linear system is solved by
`cg_steps` steps of conjugate gradient with Hessian-vector products (forward-over-reverse:
`jax.jvp` of `jax.grad`). Memory therefore does not grow with the number of inner steps; the
backward pass costs `cg_steps` HVPs and one second-order vector-Jacobian product.

`IMAML` implements `metajax.types.Learner`: `metajax.make_meta_step`, `metajax.evaluate`,
`metajax.with_zeroing`, the training loop and its checkpoints take it as they take `MAML`, and
`jax.grad(metajax.meta_loss)` is the implicit meta-gradient (a `jax.custom_vjp` whose backward
pass is the conjugate-gradient solve; reverse mode only):

    learner = IMAML(model.apply, metajax.cross_entropy, num_inner_steps=16, inner_lr=0.1,
                    lam=2.0, cg_steps=5, cg_damping=1.0)
    meta_step = metajax.make_meta_step(learner, optax.adam(1e-3))

The implicit gradient is exact when the inner problem is solved (`grad_phi G(phi, theta) = 0`)
and conjugate gradient has converged (at most as many steps as adapted parameters, in exact
arithmetic, when `H + lam I` is positive definite); with an approximate inner solution its error
is bounded by the inner solution's error (the paper's Theorem 1). Conjugate gradient needs
`H + lam I` positive definite: on non-convex support losses take `lam` above the most negative
curvature, or damp the system (`cg_damping`).

Reference: A. Rajeswaran, C. Finn, S. Kakade, S. Levine, Meta-Learning with Implicit Gradients,
NeurIPS 2019, arXiv 1909.04630.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from metajax import inner as inner_lib
from metajax import losses as losses_lib
from metajax import meta as meta_lib
from metajax.types import ApplyFn, Array, MetaParams, Params, Task


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _tree_sq_dist(a: list[Array], b: list[Array]) -> Array:
  """`sum_leaves |a - b|^2` (a scalar)."""
  return sum(jnp.sum(jnp.square(x - y)) for x, y in zip(a, b))


@dataclasses.dataclass(frozen=True)
class IMAML:
  """Implicit MAML: a proximally regularised inner problem, its meta-gradient by implicit
  differentiation and conjugate gradient.

  The meta-parameters are the model params (theta). Predictions before adaptation use theta
  (with `params_transforms`), after it the inner solution phi (the same regularised inner
  problem at test time, as in training).

  Attributes:
    apply_fn: `(params, x) -> outputs`.
    loss: `(outputs, targets) -> scalar`, the support loss `L_s` (plus the proximal term) in the
      inner loop and the query loss `L_q` in the outer loop.
    num_inner_steps: steps of the inner solver (>= 1). Only the solution they reach matters to
      the meta-gradient, and memory does not grow with them.
    inner_lr: step size of plain gradient descent on `G` (exclusive with `optimizer`): a scalar
      or a pytree as `metajax.adapt` takes it. Gradient descent on `G` converges for
      `inner_lr < 2 / (L + lam)`, `L` the largest eigenvalue of `H`.
    optimizer: an optax transformation minimising `G` instead of gradient descent (its state
      starts fresh per task).
    lam: the proximal regularisation strength lambda > 0: large keeps phi close to theta (and
      `H + lam I` well conditioned), small lets the task loss dominate.
    cg_steps: conjugate-gradient steps for the linear system (>= 1); each costs one
      Hessian-vector product of the support loss.
    cg_damping: delta >= 0: the system solved is `((1 + delta) I + H / lam) g = grad L_q(phi)`;
      0 is the implicit gradient, delta > 0 shrinks it towards `grad L_q / (1 + delta)` and
      conditions the system when `H` has negative eigenvalues (non-convex support losses).
    adapt_mask: which params adapt in the inner loop (e.g. `metajax.head_mask`); the others stay
      at theta in the inner problem and get their meta-gradient through the implicit function
      theorem too (`-(d^2 G / d phi d theta)^T` applied to the solved system).
    unroll: `lax.scan`'s unroll of the inner loop (see `metajax.adapt`).
    params_transforms: functions applied, in order, to theta before the inner loop and before
      any prediction (e.g. `zero_head`; see `metajax.with_zeroing`).
    allow_nonpositive_inner_lr: accept an `inner_lr` <= 0 (refused by default).
  """

  apply_fn: ApplyFn
  loss: Callable[[Array, Array], Array]
  num_inner_steps: int = 1
  inner_lr: Any = None
  optimizer: optax.GradientTransformation | None = None
  lam: float = 1.0
  cg_steps: int = 5
  cg_damping: float = 0.0
  adapt_mask: Any = None
  unroll: int | bool = 1
  params_transforms: tuple[Callable[[Params], Params], ...] = ()
  allow_nonpositive_inner_lr: bool = False

  def __post_init__(self):
    if (not isinstance(self.num_inner_steps, int) or isinstance(self.num_inner_steps, bool)
        or self.num_inner_steps < 1):
      raise ValueError(f"num_inner_steps must be an int >= 1, got {self.num_inner_steps!r}")
    if (self.inner_lr is None) == (self.optimizer is None):
      raise ValueError("give exactly one of inner_lr (gradient descent on the regularised inner "
                       "problem) or optimizer (an optax transformation), got "
                       f"inner_lr={self.inner_lr!r}, optimizer={self.optimizer!r}")
    if self.inner_lr is not None:
      inner_lib.check_inner_lr(self.inner_lr, allow_nonpositive=self.allow_nonpositive_inner_lr)
    if not _is_number(self.lam) or not self.lam > 0:
      raise ValueError(f"lam (the proximal regularisation strength) must be a number > 0, got "
                       f"{self.lam!r}")
    if (not isinstance(self.cg_steps, int) or isinstance(self.cg_steps, bool)
        or self.cg_steps < 1):
      raise ValueError(f"cg_steps must be an int >= 1, got {self.cg_steps!r}")
    if not _is_number(self.cg_damping) or not self.cg_damping >= 0:
      raise ValueError(f"cg_damping must be a number >= 0, got {self.cg_damping!r}")

  def init(self, params: Params) -> MetaParams:
    """Model params -> meta-params: the model params themselves (theta)."""
    return params

  def model_params(self, meta_params: MetaParams) -> Params:
    """theta with `params_transforms` applied: where the inner problem starts and is pulled to."""
    params = meta_params
    for transform in self.params_transforms:
      params = transform(params)
    return params

  def adapt(self, meta_params: MetaParams, x: Array, y: Array, *,
            return_losses: bool = False) -> Params | tuple[Params, Array]:
    """The inner solution phi of one task's support set `(x, y)`, and with `return_losses` the
    regularised inner loss `G` before each step, `[num_inner_steps]` (the first is `L_s(theta)`).

    Differentiable wrt `meta_params` (reverse mode) by the implicit function theorem (a
    `jax.custom_vjp`): the vector-Jacobian product of `phi*(theta)` solves
    `(H + lam (1 + cg_damping) I) u = v` by conjugate gradient; the inner steps themselves are
    never differentiated.

    Raises:
      ValueError, TypeError: as `metajax.meta.check_support`, before anything is traced.
    """
    meta_lib.check_support(self, meta_params, x, y)
    adapted, losses = self._solve(self.model_params(meta_params), x, y)
    return (adapted, losses) if return_losses else adapted

  def _solve(self, theta: Params, x: Array, y: Array) -> tuple[Params, Array]:
    """`phi*(theta)` with its implicit derivative, and the inner losses (not differentiated)."""
    leaves, treedef = jax.tree.flatten(theta)
    flags = inner_lib.resolve_mask(self.adapt_mask, theta)
    support_loss = losses_lib.make_loss_fn(self.apply_fn, self.loss)
    lam, damping = self.lam, self.lam * self.cg_damping

    def merge(adapted: list[Array], start: list[Array]) -> Params:
      it = iter(adapted)
      return treedef.unflatten([next(it) if f else w for w, f in zip(start, flags)])

    def adapted_part(start: list[Array]) -> list[Array]:
      return [w for w, f in zip(start, flags) if f]

    def optimality(phi: list[Array], start: list[Array], x: Array, y: Array) -> list[Array]:
      """`grad_phi G(phi, theta)`, zero at the solution; G's fixed leaves sit at theta, so they
      add nothing to the proximal term."""
      def objective(phi):
        return (support_loss(merge(phi, start), x, y)
                + 0.5 * lam * _tree_sq_dist(phi, adapted_part(start)))
      return jax.grad(objective)(phi)

    def inner_solve(start: list[Array], x: Array, y: Array) -> tuple[list[Array], Array]:
      """The inner solver's phi (adapted leaves) from theta, and `G` before each step."""
      def inner_loss(params: Params, x: Array, y: Array) -> Array:
        return (support_loss(params, x, y)
                + 0.5 * lam * _tree_sq_dist(jax.tree.leaves(params), start))

      adapted, losses = inner_lib.adapt(
        treedef.unflatten(start), x, y, loss_fn=inner_loss,
        num_inner_steps=self.num_inner_steps, inner_lr=self.inner_lr, optimizer=self.optimizer,
        adapt_mask=treedef.unflatten(flags), unroll=self.unroll, return_losses=True,
        allow_nonpositive_inner_lr=self.allow_nonpositive_inner_lr)
      return adapted_part(jax.tree.leaves(adapted)), losses

    @jax.custom_vjp
    def solution(start: list[Array], x: Array, y: Array) -> tuple[list[Array], Array]:
      return inner_solve(start, x, y)

    def solution_fwd(start, x, y):
      phi, losses = inner_solve(start, x, y)
      # The residuals of the backward pass: theta, the task and phi; nothing of the inner steps.
      return (phi, losses), (start, x, y, phi)

    def solution_bwd(residuals, cotangents):
      start, x, y, phi = residuals
      v, _ = cotangents  # the inner losses are metrics: their cotangent is dropped

      def matvec(w: list[Array]) -> list[Array]:
        # (H + lam I) w by forward-over-reverse, plus the damping lam * delta * w.
        _, hw = jax.jvp(lambda p: optimality(p, start, x, y), (phi,), (w,))
        return [a + damping * b for a, b in zip(hw, w)]

      # u = (H + lam (1 + delta) I)^{-1} v, then by the implicit function theorem the cotangent
      # of (theta, x, y) is -(d grad_phi G / d (theta, x, y))^T u: lam u on the adapted leaves
      # of theta, (I + H / lam)^{-1} v as the paper writes it.
      u, _ = jax.scipy.sparse.linalg.cg(matvec, v, tol=0.0, atol=0.0, maxiter=self.cg_steps)
      _, vjp = jax.vjp(lambda s, x, y: optimality(phi, s, x, y), start, x, y)
      return jax.tree.map(lambda c: -c if c.dtype != jax.dtypes.float0 else c, vjp(u))

    solution.defvjp(solution_fwd, solution_bwd)
    phi, losses = solution(leaves, x, y)
    return merge(phi, leaves), jax.lax.stop_gradient(losses)

  def task_loss(self, meta_params: MetaParams, task: Task) -> tuple[Array, dict[str, Array]]:
    """The query loss `L_q(phi*(theta))` of one task and per-task metrics; its gradient wrt
    `meta_params` is the implicit meta-gradient `(I + H / lam)^{-1} grad L_q(phi*)` (damped by
    `cg_damping`, through the `params_transforms`).

    Metrics: `inner/support_loss_before` (`L_s(theta)`), `inner/support_loss_after`
    (`L_s(phi)`), `outer/query_loss`, and `outer/query_accuracy` for integer labels.
    """
    adapted, inner_losses = self.adapt(meta_params, task.support_x, task.support_y,
                                       return_losses=True)
    outputs = self.apply_fn(adapted, task.query_x)
    loss = self.loss(outputs, task.query_y)
    support_after = self.loss(self.apply_fn(jax.lax.stop_gradient(adapted), task.support_x),
                              task.support_y)
    metrics = {"inner/support_loss_before": inner_losses[0],
               "inner/support_loss_after": support_after, "outer/query_loss": loss}
    if meta_lib.is_classification(task.query_y):
      metrics["outer/query_accuracy"] = losses_lib.accuracy(outputs, task.query_y)
    return loss, metrics


__all__ = ["IMAML"]
