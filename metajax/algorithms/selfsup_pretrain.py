"""BYOL pre-training of an encoder, its momentum target kept in the training state.

BYOL (Grill et al. 2020) trains an online network (encoder f, projector g, predictor q) to
predict, from one augmented view, the target network's projection of the other view; the target
(f', g') receives no gradient and follows the online network by an exponential moving average
whose momentum rises from `base_momentum` to 1 over training (`selfsup.byol_momentum`). Every
part of that lives in the `metajax.MetaState` the pre-training step returns, so checkpoints and
resuming (bit-exact) are those of every other step:

    state.params = {"online": {"encoder": model_params, "projector": ..., "predictor": ...},
                    "target": {"encoder": ..., "projector": ...}}
    state.opt_state = optimizer.init(state.params["online"])   # the target is not optimised

Then, as after SimCLR, few-shot tasks are solved with the frozen online encoder by prototypes or
a linear probe; `on_online_encoder` makes any learner of model params read them out of the state:

    model = metajax.conv4(num_classes=5)
    byol_step = make_byol_step(model.features, model.feature_dim,
                               metajax.data.augment.make_affine_augment(), optax.adam(1e-3),
                               total_steps=10_000, key=train_key)
    state = byol_step.init(model.init(init_key))
    state, metrics = byol_step.step(state, sample(batch_key, images))   # (x, y); y is unused
    learner = on_online_encoder(prototype_learner(model, ways=5))
    metajax.evaluate_tasks(learner, state.params, tasks)

Both views go through each network in one batch of 2B images, so batch-statistics normalisation
(in the encoder and the heads) sees all of them, as in `contrastive_pretrain`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, TypeVar

import jax
import jax.numpy as jnp
import optax

from metajax import meta as meta_lib
from metajax.algorithms import selfsup
from metajax.algorithms.contrastive_pretrain import two_views
from metajax.algorithms.pretrain import Batch
from metajax.data.augment import Augment
from metajax.meta import MetaState, MetaStep
from metajax.types import ApplyFn, Array, Params, PRNGKey

L = TypeVar("L")
# objective(online, target, batch, key) -> (loss, metrics)
TwoNetworkObjective = Callable[[Params, Params, Batch, PRNGKey], tuple[Array, dict[str, Array]]]

HIDDEN_DIM = 4096  # Grill et al. 2020, section 3.3: the projector's and predictor's hidden width
PROJECTION_DIM = 256  # ... and their output width
HEAD_NORM_EPSILON = 1e-5


# --------------------------------------------------------------------------------- MLP heads

def mlp_head_init(key: PRNGKey, in_dim: int, *, hidden_dim: int = HIDDEN_DIM,
                  out_dim: int = PROJECTION_DIM, dtype: jnp.dtype = jnp.float32) -> Params:
  """Params of BYOL's projector / predictor: linear, batch norm, ReLU, linear.

  Weights LeCun-normal (flax's `Dense` default), the output bias 0, the norm's scale 1 and bias
  0. The first linear layer has no bias: the batch norm would cancel it (its gradient is 0, and
  an optimiser such as Adam would only move it by rounding noise).
  """
  for name, value in (("in_dim", in_dim), ("hidden_dim", hidden_dim), ("out_dim", out_dim)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{name} must be an int >= 1, got {value!r}")
  key_hidden, key_out = jax.random.split(key)
  init = jax.nn.initializers.lecun_normal()
  return {
    "hidden": {"w": init(key_hidden, (in_dim, hidden_dim), dtype)},
    "norm": {"scale": jnp.ones((hidden_dim,), dtype), "bias": jnp.zeros((hidden_dim,), dtype)},
    "out": {"w": init(key_out, (hidden_dim, out_dim), dtype), "b": jnp.zeros((out_dim,), dtype)},
  }


def mlp_head_apply(params: Params, x: Array) -> Array:
  """`[B, in_dim] -> [B, out_dim]`; the batch norm uses the statistics of this batch."""
  h = x @ params["hidden"]["w"]  # BI,IH->BH
  mean = jnp.mean(h, axis=0)
  var = jnp.mean(jnp.square(h - mean), axis=0)
  h = (h - mean) / jnp.sqrt(var + HEAD_NORM_EPSILON)
  h = jax.nn.relu(h * params["norm"]["scale"] + params["norm"]["bias"])
  return h @ params["out"]["w"] + params["out"]["b"]  # BH,HO->BO


# ------------------------------------------------------------------------------------ state

def online_encoder(params: Params) -> Params:
  """The model params of the online encoder, out of BYOL's state params."""
  return params["online"]["encoder"]


def on_online_encoder(learner: L) -> L:
  """`learner` (any learner of model params with a `params_transforms` field: `ProtoNet`, the
  fine-tuning and linear-probe `MAML`s) made to take BYOL's state params: the online encoder's
  params are read out of them first, before the learner's own transforms (a fresh head, ...)."""
  return dataclasses.replace(learner,
                             params_transforms=(online_encoder, *learner.params_transforms))


def init_byol_params(key: PRNGKey, model_params: Params, feature_dim: int, *,
                     hidden_dim: int = HIDDEN_DIM, projection_dim: int = PROJECTION_DIM
                     ) -> Params:
  """BYOL's params: the online network (the model, a projector and a predictor) and the target
  network, a copy of the online encoder and projector (as in the paper's code)."""
  key_projector, key_predictor = jax.random.split(key)
  dtype = jnp.result_type(*jax.tree.leaves(model_params))
  projector = mlp_head_init(key_projector, feature_dim, hidden_dim=hidden_dim,
                            out_dim=projection_dim, dtype=dtype)
  predictor = mlp_head_init(key_predictor, projection_dim, hidden_dim=hidden_dim,
                            out_dim=projection_dim, dtype=dtype)
  online = {"encoder": model_params, "projector": projector, "predictor": predictor}
  target = {"encoder": model_params, "projector": projector}
  return jax.tree.map(jnp.array, {"online": online, "target": target})  # copies, not aliases


# -------------------------------------------------------------------------------- objective

def byol_objective(features: ApplyFn, augment: Augment, *,
                   epsilon: float | None = None) -> TwoNetworkObjective:
  """`objective(online, target, (x, y), key) -> (loss, metrics)`: `selfsup.byol_loss` on two
  augmented views of x (the labels y are ignored).

  Args:
    features: the encoder `(model_params, x) -> [N, D]`, e.g. `model.features`.
    augment: `(key, image) -> image`, applied independently to each view.
    epsilon: norm clipping of the cosine similarities (see `selfsup`).

  Metrics: `outer/positive_cosine`, the mean cosine of each view's prediction and the other
  view's target projection (1 - loss / 4).
  """

  def project(network: Params, images: Array) -> Array:
    return mlp_head_apply(network["projector"], features(network["encoder"], images))

  def objective(online: Params, target: Params, batch: Batch,
                key: PRNGKey) -> tuple[Array, dict[str, Array]]:
    x, _ = batch
    view_1, view_2 = two_views(augment, key, x)
    b = view_1.shape[0]
    images = jnp.concatenate([view_1, view_2])  # one batch of 2B
    predictions = mlp_head_apply(online["predictor"], project(online, images))  # (2B)P
    targets = jax.lax.stop_gradient(project(target, images))  # (2B)P
    loss = selfsup.byol_loss(predictions[:b], predictions[b:], targets[:b], targets[b:],
                             epsilon=epsilon)
    return loss, {"outer/positive_cosine": 1.0 - loss / 4.0}

  return objective


def make_byol_step(features: ApplyFn, feature_dim: int, augment: Augment,
                   optimizer: optax.GradientTransformation, *, total_steps: int,
                   base_momentum: float = selfsup.BYOL_BASE_MOMENTUM,
                   hidden_dim: int = HIDDEN_DIM, projection_dim: int = PROJECTION_DIM,
                   epsilon: float | None = None, key: PRNGKey | None = None,
                   jit: bool = True, donate: bool = True) -> MetaStep:
  """Builds BYOL's pre-training step `step(state, (x, y)) -> (state, metrics)`.

  One step: the gradient of `byol_objective` with respect to the online params only, one optax
  update of them, then the target's EMA towards the *updated* online encoder and projector with
  momentum `byol_momentum(state.step, total_steps, base=base_momentum)` (the paper's order).

  Args:
    features: the encoder `(model_params, x) -> [N, D]`, e.g. `model.features`.
    feature_dim: D, the width of `features` (the projector's input).
    augment: `(key, image) -> image`, e.g. `metajax.data.augment.make_affine_augment()`.
    optimizer: for the online params, e.g. `optax.adam(1e-3)` (the paper: LARS).
    total_steps: K, the steps over which the momentum rises to 1 (the length of training).
    base_momentum: tau_base (the paper: 0.996).
    hidden_dim, projection_dim: the projector's and predictor's widths (the paper: 4096, 256).
    epsilon: norm clipping of the cosine similarities.
    key: the root of the step's randomness, split once: the projector's and predictor's initial
      params, and the augmentations of step s (`fold_in(., s)`, so a resumed run repeats them).
      Default `jax.random.key(0)`.
    jit: compile the step once (guarded against retracing).
    donate: let XLA reuse the old state's buffers.

  Returns:
    `MetaStep` (`init(model_params)`, `step`, `steps`, `update`) over `MetaState` with the params
    of `init_byol_params`; metrics `outer/loss`, `outer/grad_norm`, `outer/momentum` (the one
    this step applied) and `outer/positive_cosine`.
  """
  objective = byol_objective(features, augment, epsilon=epsilon)
  momentum_at = lambda step: selfsup.byol_momentum(step, total_steps,  # noqa: E731
                                                   base=base_momentum)
  momentum_at(0)  # checks total_steps and base now, not at the first step
  head_key, augment_root = jax.random.split(jax.random.key(0) if key is None else key)

  def init(model_params: Params) -> MetaState:
    params = init_byol_params(head_key, model_params, feature_dim, hidden_dim=hidden_dim,
                              projection_dim=projection_dim)
    return MetaState(params, optimizer.init(params["online"]), jnp.zeros((), jnp.int32))

  def step(state: MetaState, batch: Any) -> tuple[MetaState, dict[str, Array]]:
    step_key = jax.random.fold_in(augment_root, state.step)
    online, target = state.params["online"], state.params["target"]
    (value, metrics), grads = jax.value_and_grad(objective, has_aux=True)(
      online, target, batch, step_key)
    updates, opt_state = optimizer.update(grads, state.opt_state, online)
    online = optax.apply_updates(online, updates)
    momentum = momentum_at(state.step)
    target = selfsup.ema_update(
      target, {"encoder": online["encoder"], "projector": online["projector"]}, momentum)
    metrics = {**metrics, "outer/loss": value, "outer/grad_norm": optax.tree.norm(grads),
               "outer/momentum": momentum}
    return MetaState({"online": online, "target": target}, opt_state, state.step + 1), metrics

  return meta_lib.compile_step(init, step, jit=jit, donate=donate)


__all__ = [
  "HIDDEN_DIM",
  "PROJECTION_DIM",
  "TwoNetworkObjective",
  "byol_objective",
  "init_byol_params",
  "make_byol_step",
  "mlp_head_apply",
  "mlp_head_init",
  "on_online_encoder",
  "online_encoder",
]
