"""Type aliases and the `Task` container shared by every metajax module."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

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
