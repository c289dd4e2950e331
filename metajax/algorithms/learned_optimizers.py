"""Learned inner optimizers: coordinate-wise LSTMs that turn gradients into updates.

Gradient descent is a special case of an LSTM cell: with the cell state as the parameters, a
forget gate of 1 and an input gate of lr, `c_t = f_t * c_{t-1} + i_t * (-grad_t)` is
`theta_t = theta_{t-1} - lr * grad_t`. Learning the gates (or a whole LSTM) learns the optimizer.

- `lstm_optimizer`: Andrychowicz et al. 2016, a two-layer LSTM applied to every coordinate with
  shared weights, reading the preprocessed gradient and writing the update.
- `meta_lstm`: Ravi & Larochelle 2017, the meta-learner LSTM: a first LSTM layer reads the
  preprocessed gradient and loss; its output, the parameter and the previous gate give the input
  and forget gates of a second cell whose state is the parameter itself.

Each is a `LearnedOptimizer`: `init(key)` gives the optimizer's own parameters, and
`bind(opt_params)` an optax transformation whose `update` takes the support loss as `value=` (as
optax's line searches do). `metajax.MAML(learned_optimizer=...)` puts those parameters into the
meta-parameters, so the outer loop learns them with (or instead of) the initialisation; every
task's inner loop starts from a fresh optimizer state (zeros), so no state crosses tasks.

References: M. Andrychowicz et al., Learning to learn by gradient descent by gradient descent,
NeurIPS 2016 (preprocessing: its Appendix A); S. Ravi, H. Larochelle, Optimization as a Model for
Few-Shot Learning, ICLR 2017.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from metajax.types import Array, Params, PRNGKey


class LearnedOptimizer(NamedTuple):
  """An inner optimizer with parameters of its own.

  Attributes:
    name: what it is ("lstm_optimizer", "meta_lstm").
    init: `key -> opt_params`, the optimizer's initial parameters (a pytree of arrays).
    bind: `opt_params -> optax.GradientTransformationExtraArgs`; its `update(grads, state,
      params, value=loss)` needs `params` (and, for `meta_lstm`, the loss `value`).
  """

  name: str
  init: Callable[[PRNGKey], Params]
  bind: Callable[[Params], optax.GradientTransformationExtraArgs]


def preprocess(x: Array, p: float = 10.0) -> Array:
  """Andrychowicz et al.'s preprocessing of each entry: `[..., 2]` features
  `(log|x| / p, sign(x))` where `|x| >= exp(-p)`, else `(-1, exp(p) x)`: inputs of every scale
  reach the LSTM on a comparable scale, their sign kept."""
  big = jnp.abs(x) >= math.exp(-p)
  log = jnp.log(jnp.maximum(jnp.abs(x), math.exp(-p))) / p  # the max keeps log(0) out of grads
  first = jnp.where(big, log, -1.0)
  second = jnp.where(big, jnp.sign(x), math.exp(p) * x)
  return jnp.stack([first, second], axis=-1)


def _lstm_params(key: PRNGKey, inputs: int, hidden: int, dtype: Any) -> dict[str, Array]:
  """One LSTM layer: `[inputs + hidden, 4 hidden]` weights (gates i, f, g, o), forget bias 1."""
  scale = 1.0 / math.sqrt(inputs + hidden)
  bias = jnp.zeros(4 * hidden, dtype).at[hidden:2 * hidden].set(1.0)
  return {"w": jax.random.uniform(key, (inputs + hidden, 4 * hidden), dtype, -scale, scale),
          "b": bias}


def _lstm_cell(params: dict[str, Array], x: Array, h: Array, c: Array) -> tuple[Array, Array]:
  """A standard LSTM cell on a batch of coordinates: x `[n, inputs]`, h, c `[n, hidden]`."""
  gates = jnp.concatenate([x, h], axis=-1) @ params["w"] + params["b"]
  i, f, g, o = jnp.split(gates, 4, axis=-1)
  c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
  return jax.nn.sigmoid(o) * jnp.tanh(c), c


def _check(name: str, value: Any, minimum: float, kind: type = int) -> None:
  if not isinstance(value, kind) or isinstance(value, bool) or not value >= minimum:
    raise ValueError(f"{name} must be {'an int' if kind is int else 'a number'} >= {minimum}, "
                     f"got {value!r}")


def _per_leaf(fn: Callable[..., tuple[Array, Any]], grads: Any, state: Any, *rest: Any
              ) -> tuple[Any, Any]:
  """Applies a coordinate-wise `fn(grad [n], state, *rest [n]) -> (update [n], state)` to every
  leaf, each flattened to its coordinates."""
  leaves, treedef = jax.tree.flatten(grads)
  states = treedef.flatten_up_to(state)
  others = [treedef.flatten_up_to(r) for r in rest]
  updates, new_states = [], []
  for i, (g, s) in enumerate(zip(leaves, states)):
    u, s = fn(g.reshape(-1), s, *(o[i].reshape(-1) for o in others))
    updates.append(u.reshape(g.shape))
    new_states.append(s)
  return treedef.unflatten(updates), treedef.unflatten(new_states)


def lstm_optimizer(*, hidden: int = 20, layers: int = 2, output_scale: float = 0.1,
                   preprocess_p: float = 10.0, dtype: Any = jnp.float32) -> LearnedOptimizer:
  """Andrychowicz et al.'s coordinate-wise LSTM optimizer.

  Every coordinate of every parameter runs through the same `layers`-layer LSTM (`hidden` units):
  input the preprocessed gradient (`preprocess`), output `output_scale * (h W + b)`, the update.
  Its state is `(h, c)` per layer and coordinate, zeros at the start of each task.

  Args:
    hidden: units per LSTM layer (the paper: 20).
    layers: LSTM layers (the paper: 2).
    output_scale: the factor on the LSTM's output (the paper: 0.1).
    preprocess_p: `p` of the gradient preprocessing (the paper: 10).
    dtype: of the optimizer's parameters.
  """
  _check("hidden", hidden, 1)
  _check("layers", layers, 1)
  _check("preprocess_p", preprocess_p, 0, float)

  def init(key: PRNGKey) -> Params:
    keys = jax.random.split(key, layers + 1)
    cells = [_lstm_params(keys[i], 2 if i == 0 else hidden, hidden, dtype) for i in range(layers)]
    scale = 1.0 / math.sqrt(hidden)
    return {"cells": cells,
            "out": {"w": jax.random.uniform(keys[-1], (hidden, 1), dtype, -scale, scale),
                    "b": jnp.zeros((1,), dtype)}}

  def bind(opt_params: Params) -> optax.GradientTransformationExtraArgs:
    def init_fn(params: Params) -> Any:
      return jax.tree.map(
        lambda p: [(jnp.zeros((p.size, hidden), p.dtype),) * 2 for _ in range(layers)], params)

    def coordinates(g: Array, state: list) -> tuple[Array, list]:
      x, new_state = preprocess(g, preprocess_p).astype(g.dtype), []
      for cell, (h, c) in zip(opt_params["cells"], state):
        h, c = _lstm_cell(cell, x, h, c)
        new_state.append((h, c))
        x = h
      out = opt_params["out"]
      return output_scale * (x @ out["w"] + out["b"])[:, 0], new_state

    def update_fn(grads: Any, state: Any, params: Params | None = None, **extra: Any
                  ) -> tuple[Any, Any]:
      del params, extra
      return _per_leaf(coordinates, grads, state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)

  return LearnedOptimizer("lstm_optimizer", init, bind)


class MetaLSTMState(NamedTuple):
  """Per coordinate: the first layer's `(h, c)` `[n, hidden]`, the previous gates `[n]`."""

  h: Array
  c: Array
  input_gate: Array
  forget_gate: Array


def meta_lstm(*, hidden: int = 20, inner_lr: float | None = None,
              forget_bias: tuple[float, float] = (4.0, 6.0),
              input_bias: tuple[float, float] = (-5.0, -4.0), preprocess_p: float = 10.0,
              dtype: Any = jnp.float32) -> LearnedOptimizer:
  """Ravi & Larochelle's meta-learner LSTM.

  Per coordinate: a standard LSTM layer (`hidden` units) reads the preprocessed gradient and
  loss; from its output h_t, the parameter theta_{t-1} and the previous gates,
  `i_t = sigmoid([h_t, theta_{t-1}, i_{t-1}] W_I + b_I)`,
  `f_t = sigmoid([h_t, theta_{t-1}, f_{t-1}] W_F + b_F)`, and the parameter (the cell state)
  becomes `theta_t = f_t theta_{t-1} - i_t grad_t`. With `W_I = W_F = 0`, `f_t = 1` and
  `i_t = lr` this is gradient descent with step lr.

  Args:
    hidden: units of the first LSTM layer (the paper: 20).
    inner_lr: if given, `b_I = logit(inner_lr)`, so that training starts near gradient descent
      with that step; else `b_I ~ U(input_bias)` as the paper.
    forget_bias: `b_F ~ U(forget_bias)`: forget gates near 1 at the start (the paper: 4 to 6).
    input_bias: the range of `b_I` without `inner_lr` (the paper: -5 to -4).
    preprocess_p: `p` of the gradient and loss preprocessing.
    dtype: of the optimizer's parameters.
  """
  _check("hidden", hidden, 1)
  _check("preprocess_p", preprocess_p, 0, float)
  if inner_lr is not None and not (isinstance(inner_lr, (int, float)) and 0 < inner_lr < 1):
    raise ValueError(f"inner_lr must be a number in (0, 1) (it is the input gate's sigmoid), "
                     f"got {inner_lr!r}")

  def init(key: PRNGKey) -> Params:
    k_lstm, k_wi, k_wf, k_bi, k_bf = jax.random.split(key, 5)
    gate_w = lambda k: jax.random.uniform(k, (hidden + 2, 1), dtype, -0.01, 0.01)  # noqa: E731
    b_i = (jnp.full((1,), math.log(inner_lr / (1 - inner_lr)), dtype) if inner_lr is not None
           else jax.random.uniform(k_bi, (1,), dtype, *input_bias))
    return {"lstm": _lstm_params(k_lstm, 4, hidden, dtype),
            "input_gate": {"w": gate_w(k_wi), "b": b_i},
            "forget_gate": {"w": gate_w(k_wf),
                            "b": jax.random.uniform(k_bf, (1,), dtype, *forget_bias)}}

  def bind(opt_params: Params) -> optax.GradientTransformationExtraArgs:
    def init_fn(params: Params) -> Any:
      def zeros(p):
        return MetaLSTMState(jnp.zeros((p.size, hidden), p.dtype),
                             jnp.zeros((p.size, hidden), p.dtype), jnp.zeros(p.size, p.dtype),
                             jnp.zeros(p.size, p.dtype))
      return jax.tree.map(zeros, params)

    def coordinates(g: Array, state: MetaLSTMState, theta: Array, loss: Array
                    ) -> tuple[Array, MetaLSTMState]:
      x = jnp.concatenate([preprocess(g, preprocess_p),
                           preprocess(jnp.broadcast_to(loss, g.shape), preprocess_p)], axis=-1)
      h, c = _lstm_cell(opt_params["lstm"], x.astype(g.dtype), state.h, state.c)

      def gate(name: str, previous: Array) -> Array:
        w = opt_params[name]
        z = jnp.concatenate([h, theta[:, None], previous[:, None]], axis=-1)
        return jax.nn.sigmoid(z @ w["w"] + w["b"])[:, 0]

      i, f = gate("input_gate", state.input_gate), gate("forget_gate", state.forget_gate)
      # theta_t - theta_{t-1} = (f - 1) theta_{t-1} - i grad
      return (f - 1) * theta - i * g, MetaLSTMState(h, c, i, f)

    def update_fn(grads: Any, state: Any, params: Params | None = None, *,
                  value: Array | None = None, **extra: Any) -> tuple[Any, Any]:
      del extra
      if params is None or value is None:
        raise ValueError("meta_lstm's update needs the params and the loss: "
                         "update(grads, state, params, value=loss)")
      losses = jax.tree.map(lambda p: jnp.broadcast_to(value, p.shape), params)
      return _per_leaf(coordinates, grads, state, params, losses)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)

  return LearnedOptimizer("meta_lstm", init, bind)


__all__ = ["LearnedOptimizer", "MetaLSTMState", "lstm_optimizer", "meta_lstm", "preprocess"]
