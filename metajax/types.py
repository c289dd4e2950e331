"""Type aliases, the `Task` container and the `Learner` protocol shared by every metajax module."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Protocol, runtime_checkable

import jax

Array = jax.Array
ArrayLike = jax.typing.ArrayLike
PRNGKey = jax.Array
Params = Any  # a pytree of arrays
PyTree = Any

# apply_fn(params, x) -> outputs (logits or regression predictions)
ApplyFn = Callable[[Params, Array], Array]
# loss_fn(params, x, y) -> scalar
LossFn = Callable[[Params, Array, Array], Array]
MetaParams = Any  # the pytree the outer optimiser updates (model params, maybe inner lrs)


class Task(NamedTuple):
  """One few-shot episode (or, with a leading task axis, a meta-batch of them).

  Attributes:
    support_x: support inputs, e.g. `[ways * shots, H, W, C]` images or `[K, 1]` points.
    support_y: support targets: int labels in `[0, ways)` of shape `[ways * shots]`, or
      regression targets `[K, 1]`.
    query_x: query inputs, same trailing shape as `support_x`.
    query_y: query targets, same kind as `support_y`.
  """

  support_x: Array
  support_y: Array
  query_x: Array
  query_y: Array


@runtime_checkable
class Learner(Protocol):
  """What the outer loop, evaluation and the binaries need of a meta-learner.

  A learner is an immutable description of how to adapt to a task; it holds no parameters.
  `metajax.MAML`, `metajax.Reptile`, `metajax.ProtoNet` and the pre-training learners implement
  it, and so can a class of your own: `make_meta_step` differentiates `task_loss` (averaged over
  the tasks), `evaluate_tasks` compares `apply_fn` at `model_params(...)` (before adaptation) with
  `apply_fn` at `adapt(...)` (after), and `with_zeroing` prepends `zero_head` to
  `params_transforms` (a frozen dataclass with that field supports it through
  `dataclasses.replace`).

  Attributes:
    loss: `(outputs, targets) -> scalar`, the query loss.
    params_transforms: functions applied, in order, to the model params before adaptation and
      before any prediction (empty for none).
  """

  loss: Callable[[Array, Array], Array]
  params_transforms: tuple[Callable[[Params], Params], ...]

  def init(self, params: Params) -> MetaParams:
    """Model params -> the meta-params the outer optimiser updates."""
    ...

  def model_params(self, meta_params: MetaParams) -> Params:
    """The params predictions start from before adaptation (transforms applied)."""
    ...

  def apply_fn(self, params: Params, x: Array) -> Array:
    """`(params, x) -> outputs` for params from `model_params` or `adapt`."""
    ...

  def adapt(self, meta_params: MetaParams, x: Array, y: Array, *,
            return_losses: bool = False) -> Params | tuple[Params, Array]:
    """Adapted params for one task's support set `(x, y)` (and the support losses if asked)."""
    ...

  def task_loss(self, meta_params: MetaParams, task: Task) -> tuple[Array, dict[str, Array]]:
    """One task's outer loss (what the meta-gradient differentiates) and per-task metrics."""
    ...
