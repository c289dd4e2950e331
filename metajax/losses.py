"""Per-batch losses and metrics used in the inner and outer loops.

Every loss has the signature `loss(outputs, targets) -> scalar` so that it composes with any
`apply_fn(params, x) -> outputs` into `loss_fn(params, x, y)` (see `make_loss_fn`).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from metajax.types import ApplyFn, Array, ArrayLike, LossFn, Params

Loss = Callable[[Array, Array], Array]


def _check_class_labels(loss: str, outputs: ArrayLike, labels: ArrayLike) -> None:
  """Integer labels, one per row of `outputs`: from dtypes and shapes alone (trace-safe; the
  values, `[0, C)`, are checked by the entry points that see concrete labels)."""
  dtype = jnp.result_type(labels)
  if not jnp.issubdtype(dtype, jnp.integer):
    raise TypeError(f"{loss} takes integer class labels in [0, C), got labels of dtype {dtype} "
                    "(cast them with .astype(jnp.int32))")
  out_shape, label_shape = jnp.shape(outputs), jnp.shape(labels)
  if out_shape[:-1] != label_shape:
    raise ValueError(f"{loss} takes outputs [..., C] and labels [...] of the same leading shape, "
                     f"got outputs {out_shape} and labels {label_shape}")


def cross_entropy(logits: ArrayLike, labels: ArrayLike) -> Array:
  """Mean softmax cross-entropy.

  Args:
    logits: `[N, C]` unnormalised scores.
    labels: `[N]` integer labels in `[0, C)`.

  Returns:
    Scalar mean over the N examples.

  Raises:
    TypeError, ValueError: labels that are not integers, or not one per row of `logits`.
  """
  _check_class_labels("cross_entropy", logits, labels)
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def mse_onehot(outputs: ArrayLike, labels: ArrayLike) -> Array:
  """Squared error against one-hot labels: `mean_n 1/2 sum_i (outputs[n, i] - 1{i = y_n})^2`.

  This is the loss of Kao et al.'s derivation (MAML as a noisy contrastive learner); the factor
  1/2 makes its gradient wrt the outputs exactly `outputs - onehot`.

  Args:
    outputs: `[N, C]` predictions (the linear head's outputs, no softmax).
    labels: `[N]` integer labels in `[0, C)`.

  Raises:
    TypeError, ValueError: as `cross_entropy`.
  """
  _check_class_labels("mse_onehot", outputs, labels)
  outputs = jnp.asarray(outputs)
  onehot = jax.nn.one_hot(labels, outputs.shape[-1], dtype=outputs.dtype)
  return 0.5 * jnp.mean(jnp.sum(jnp.square(outputs - onehot), axis=-1))


def mse(predictions: ArrayLike, targets: ArrayLike) -> Array:
  """Mean squared error for regression (e.g. sinusoid tasks): `mean((pred - target)^2)`."""
  return jnp.mean(jnp.square(jnp.asarray(predictions) - jnp.asarray(targets)))


def accuracy(logits: ArrayLike, labels: ArrayLike) -> Array:
  """Fraction of rows whose argmax equals the integer label. `[N, C], [N] -> scalar`."""
  return jnp.mean(jnp.argmax(logits, axis=-1) == labels)


def make_loss_fn(apply_fn: ApplyFn, loss: Loss) -> LossFn:
  """Composes a model and a loss into `loss_fn(params, x, y) -> scalar`."""

  def loss_fn(params: Params, x: Array, y: Array) -> Array:
    return loss(apply_fn(params, x), y)

  return loss_fn


LOSSES: dict[str, Loss] = {
  "cross_entropy": cross_entropy,
  "mse_onehot": mse_onehot,
  "mse": mse,
}


def get_loss(name: str) -> Loss:
  """Looks a loss up by name; raises a ValueError listing the known names."""
  try:
    return LOSSES[name]
  except KeyError:
    raise ValueError(f"unknown loss {name!r}; expected one of {sorted(LOSSES)}") from None
