"""Reptile (Nichol, Achiam and Schulman 2018): move the initialisation towards adapted weights.

For each task, run k steps of an inner optimiser from theta to theta'; the outer update feeds the
pseudo-gradient `theta - mean_i theta'_i` to any optax optimiser (plain SGD with step epsilon
gives the paper's `theta <- theta + epsilon (mean_i theta'_i - theta)`). Nothing is
differentiated through the inner loop, so there are no second-order terms by construction.

`Reptile` is a `metajax.MAML` (same fields, same `adapt`), so it evaluates with
`metajax.evaluate_tasks` (adaptation = the k inner steps), composes with `metajax.with_zeroing`,
and takes any optax inner optimiser (the paper uses Adam with beta1 = 0):

    learner = Reptile(model.apply, metajax.cross_entropy, num_inner_steps=5, inner_lr=1e-3)
    reptile_step = make_reptile_step(learner, optax.sgd(1.0))        # batched: vmap over tasks
    reptile_step = make_reptile_step(learner, optax.sgd(1.0), serial=True)  # the serial algorithm
    state = reptile_step.init(model.init(key))
    state, metrics = reptile_step.step(state, tasks)

Its `task_loss` is the surrogate `1/2 |theta - stop_gradient(theta')|^2`, whose gradient is the
pseudo-gradient: `metajax.make_meta_step(learner, opt)` is therefore batched Reptile too (tested
equal); `make_reptile_step` computes the pseudo-gradient directly (no backward pass) and reports
the query loss after adaptation as `outer/loss`, comparable with MAML's.

The inner loop adapts on each task's support set only (full batch, every step); to adapt on
more data per task, sample tasks with more shots. With `adapt_mask` only the masked leaves move
in the inner loop, so only they get a non-zero pseudo-gradient.

Reference: A. Nichol, J. Achiam, J. Schulman, On First-Order Meta-Learning Algorithms,
arXiv 1803.02999.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from metajax import losses as losses_lib
from metajax import meta as meta_lib
from metajax.meta import MAML, MetaParams, MetaState, MetaStep, TaskMap
from metajax.types import Array, Params, Task


@dataclasses.dataclass(frozen=True)
class Reptile(MAML):
  """Reptile's inner loop: MAML's fields (`num_inner_steps`, `inner_lr` or `optimizer`,
  `adapt_mask`, `params_transforms`, ...), a first-order outer update.

  `first_order` and `remat` make no difference (nothing is differentiated through the inner
  loop); learned inner learning rates (`learn_inner_lr`) are refused, as the pseudo-gradient
  gives them no signal.
  """

  def __post_init__(self):
    super().__post_init__()
    if self.learn_inner_lr is not None:
      raise ValueError("Reptile cannot learn inner learning rates (its pseudo-gradient does not "
                       f"depend on them); got learn_inner_lr={self.learn_inner_lr!r}")

  def pseudo_gradient(self, meta_params: MetaParams, task: Task
                      ) -> tuple[Params, dict[str, Array]]:
    """`theta - theta'` for one task, and per-task metrics (the query loss after adaptation).

    theta' is computed from `stop_gradient(theta)`: differentiating this never reaches the inner
    loop.
    """
    theta = jax.lax.stop_gradient(meta_params)
    adapted, inner_losses = self.adapt(theta, task.support_x, task.support_y, return_losses=True)
    grads = jax.tree.map(jnp.subtract, theta, adapted)
    outputs = self.apply_fn(adapted, task.query_x)
    query_loss = self.loss(outputs, task.query_y)
    metrics = {"inner/support_loss_before": inner_losses[0],
               "inner/support_loss_last": inner_losses[-1],
               "outer/query_loss": query_loss}
    if meta_lib.is_classification(task.query_y):
      metrics["outer/query_accuracy"] = losses_lib.accuracy(outputs, task.query_y)
    return grads, metrics

  def task_loss(self, meta_params: MetaParams, task: Task) -> tuple[Array, dict[str, Array]]:
    """The surrogate `1/2 |theta - stop_gradient(theta')|^2`: its gradient wrt theta is the
    pseudo-gradient `theta - theta'`. Metrics as `pseudo_gradient`."""
    grads, metrics = self.pseudo_gradient(meta_params, task)
    adapted = jax.tree.map(jnp.subtract, jax.lax.stop_gradient(meta_params), grads)
    surrogate = 0.5 * sum(jnp.sum(jnp.square(p - a)) for p, a in
                          zip(jax.tree.leaves(meta_params), jax.tree.leaves(adapted)))
    return surrogate, metrics


def _batched_update(learner: Reptile, optimizer: optax.GradientTransformation,
                    task_map: TaskMap):
  """All tasks adapt from the same theta; one optimiser update with the mean pseudo-gradient."""

  def update(state: MetaState, tasks: Task) -> tuple[MetaParams, Any, Params, dict[str, Array]]:
    grads, metrics = meta_lib.map_tasks(lambda t: learner.pseudo_gradient(state.params, t),
                                        tasks, task_map)
    grads = jax.tree.map(lambda g: jnp.mean(g, axis=0), grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    return optax.apply_updates(state.params, updates), opt_state, grads, metrics

  return update


def _serial_update(learner: Reptile, optimizer: optax.GradientTransformation):
  """The paper's serial algorithm: tasks in turn (`lax.scan`), each adapting from the theta that
  the previous task's optimiser update produced."""

  def update(state: MetaState, tasks: Task) -> tuple[MetaParams, Any, Params, dict[str, Array]]:
    def one_task(carry, task):
      params, opt_state, grad_sum = carry
      grads, metrics = learner.pseudo_gradient(params, task)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
      return (optax.apply_updates(params, updates), opt_state, grad_sum), metrics

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (params, opt_state, grad_sum), metrics = jax.lax.scan(
      one_task, (state.params, state.opt_state, zeros), tasks)
    num_tasks = jax.tree.leaves(tasks)[0].shape[0]
    return params, opt_state, jax.tree.map(lambda g: g / num_tasks, grad_sum), metrics

  return update


def make_reptile_step(learner: Reptile, optimizer: optax.GradientTransformation, *,
                      serial: bool = False, task_map: TaskMap = "vmap", jit: bool = True,
                      donate: bool = True) -> MetaStep:
  """Builds Reptile's outer update, with `metajax.make_meta_step`'s interface and `MetaState`.

  Args:
    learner: the inner loop (`Reptile(...)`, possibly `with_zeroing`).
    optimizer: the outer optimiser fed with the pseudo-gradient `theta - theta'`, e.g.
      `optax.sgd(epsilon)` for the paper's update (its "outer step size" epsilon).
    serial: False: batched Reptile, every task adapts from the same theta and the optimiser
      takes one step with the mean pseudo-gradient. True: serial Reptile, the tasks of the batch
      are processed in turn (`lax.scan`), one optimiser step per task, each task adapting from
      the previous task's result (`state.step` still counts calls, not tasks).
    task_map: how tasks are mapped in the batched version, see `metajax.map_tasks`.
    jit: compile the step once (guarded against retracing).
    donate: let XLA reuse the old state's buffers (the old state must not be used afterwards).

  Returns:
    `MetaStep` (`init`, `step`, `steps`); `step(state, tasks) -> (state, metrics)` with metrics
    averaged over tasks: `outer/loss` (= `outer/query_loss`, after adaptation), `outer/query_accuracy` for
    labels, `inner/support_loss_before` (before the first inner step), `inner/support_loss_last` (before
    the last one) and `outer/grad_norm` (norm of the mean pseudo-gradient); `inputs/bad_labels` as
    `make_meta_step`.
  """
  if not isinstance(learner, Reptile):
    raise TypeError(f"make_reptile_step needs a metajax.algorithms.reptile.Reptile learner, got "
                    f"{type(learner).__name__} (use make_meta_step for MAML)")
  update = _serial_update(learner, optimizer) if serial else _batched_update(
    learner, optimizer, task_map)

  def init(params: Params) -> MetaState:
    meta_params = jax.tree.map(jnp.array, learner.init(params))  # a copy, as make_meta_step
    return MetaState(meta_params, optimizer.init(meta_params), jnp.zeros((), jnp.int32))

  def step(state: MetaState, tasks: Task) -> tuple[MetaState, dict[str, Array]]:
    params, opt_state, grads, metrics = update(state, tasks)
    metrics = jax.tree.map(jnp.mean, metrics)
    metrics = {**metrics, "outer/loss": metrics["outer/query_loss"],
               "outer/grad_norm": optax.tree.norm(grads),
               **meta_lib.bad_label_metrics(learner, state.params, tasks)}
    return MetaState(params, opt_state, state.step + 1), metrics

  check = functools.partial(meta_lib.check_first_batch, learner, [])
  return meta_lib.compile_step(init, step, check, jit=jit, donate=donate)


__all__ = ["Reptile", "make_reptile_step"]
