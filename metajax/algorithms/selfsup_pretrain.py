"""Self-supervised pre-training of an encoder (BYOL, MoCo v2, Barlow Twins, SwAV), every piece
of training state (momentum target, queue of negatives, prototypes) kept in the `MetaState`.

`make_moco_step` (a momentum key network and a queue of negatives in `params["queue"]`),
`make_barlow_twins_step` and `make_swav_step` (learned prototypes in `params["online"]`) follow
BYOL's below: the online network is `params["online"]` = {"encoder": model_params, ...}, so
`on_online_encoder` evaluates any of them; the objectives are those of `selfsup`.

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
from metajax.contrastive import _unit
from metajax.data.augment import Augment, augment_batch
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
                  out_dim: int = PROJECTION_DIM, num_hidden: int = 1,
                  dtype: jnp.dtype = jnp.float32) -> Params:
  """Params of BYOL's projector / predictor: linear, batch norm, ReLU, linear.

  Weights LeCun-normal (flax's `Dense` default), the output bias 0, the norm's scale 1 and bias
  0. The hidden linear layers have no bias: the batch norm would cancel it (its gradient is 0,
  and an optimiser such as Adam would only move it by rounding noise). `num_hidden` > 1 repeats
  linear, batch norm, ReLU (Barlow Twins' projector has 2): layers `hidden_2`, `norm_2`, ...
  """
  for name, value in (("in_dim", in_dim), ("hidden_dim", hidden_dim), ("out_dim", out_dim),
                      ("num_hidden", num_hidden)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{name} must be an int >= 1, got {value!r}")
  key_hidden, key_out = jax.random.split(key)
  init = jax.nn.initializers.lecun_normal()

  def norm() -> Params:
    return {"scale": jnp.ones((hidden_dim,), dtype), "bias": jnp.zeros((hidden_dim,), dtype)}

  params = {
    "hidden": {"w": init(key_hidden, (in_dim, hidden_dim), dtype)},
    "norm": norm(),
    "out": {"w": init(key_out, (hidden_dim, out_dim), dtype), "b": jnp.zeros((out_dim,), dtype)},
  }
  for i in range(2, num_hidden + 1):  # keys of their own: one hidden layer's init is unchanged
    params[f"hidden_{i}"] = {"w": init(jax.random.fold_in(key, i), (hidden_dim, hidden_dim),
                                       dtype)}
    params[f"norm_{i}"] = norm()
  return params


def mlp_head_apply(params: Params, x: Array) -> Array:
  """`[B, in_dim] -> [B, out_dim]`; the batch norms use the statistics of this batch."""

  def hidden(h: Array, linear: Params, norm: Params) -> Array:
    h = h @ linear["w"]  # BI,IH->BH
    mean = jnp.mean(h, axis=0)
    var = jnp.mean(jnp.square(h - mean), axis=0)
    h = (h - mean) / jnp.sqrt(var + HEAD_NORM_EPSILON)
    return jax.nn.relu(h * norm["scale"] + norm["bias"])

  h = hidden(x, params["hidden"], params["norm"])
  i = 2
  while f"hidden_{i}" in params:
    h = hidden(h, params[f"hidden_{i}"], params[f"norm_{i}"])
    i += 1
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


# ------------------------------------------------------------------- MoCo v2, Barlow Twins, SwAV

MOCO_HIDDEN_DIM = 2048  # Chen et al. 2020 (MoCo v2): a 2-layer MLP head, hidden 2048
MOCO_PROJECTION_DIM = 128  # ... output 128
MOCO_QUEUE_SIZE = 65536  # He et al. 2020, section 4.1 (K)
MOCO_SHUFFLE_GROUPS = 8  # ... section 3.3: shuffled BatchNorm over their 8 GPUs
_SHUFFLE_STREAM = 1  # fold_in of the step's key for the key batch's order (the views split it)
BARLOW_TWINS_DIM = 8192  # Zbontar et al. 2021, section 3: the projector's widths
SWAV_HIDDEN_DIM = 2048  # Caron et al. 2020, appendix A: the projection head
SWAV_PROJECTION_DIM = 128
SWAV_NUM_PROTOTYPES = 3000  # Caron et al. 2020, section 4 (ImageNet)
SWAV_FREEZE_STEPS = 313  # the official code's `freeze_prototypes_niters` default
# Multi-crop's small crops on 28 x 28 characters: zoomed 2-3x (a local view of about 11 x 11
# pixels, 10-20 % of the area as the paper's 96 px of 224) anywhere in the image, resampled to the
# full size (the paper feeds them at low resolution, which the fixed-size encoders here do not
# take).
SWAV_SMALL_CROP_SCALE = (2.0, 3.0)
SWAV_SMALL_CROP_TRANSLATION = 14.0


def _check_int(name: str, value: int, minimum: int) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _copy(tree: Params) -> Params:
  return jax.tree.map(jnp.array, tree)  # copies, not aliases (the step donates its buffers)


def _project(features: ApplyFn, network: Params, images: Array) -> Array:
  return mlp_head_apply(network["projector"], features(network["encoder"], images))


def _online_network(key: PRNGKey, model_params: Params, feature_dim: int, hidden_dim: int,
                    projection_dim: int, num_hidden: int = 1) -> Params:
  dtype = jnp.result_type(*jax.tree.leaves(model_params))
  projector = mlp_head_init(key, feature_dim, hidden_dim=hidden_dim, out_dim=projection_dim,
                            num_hidden=num_hidden, dtype=dtype)
  return {"encoder": model_params, "projector": projector}


def init_moco_params(key: PRNGKey, model_params: Params, feature_dim: int, *,
                     hidden_dim: int = MOCO_HIDDEN_DIM, projection_dim: int = MOCO_PROJECTION_DIM,
                     queue_size: int = MOCO_QUEUE_SIZE) -> Params:
  """MoCo v2's params: the query network (the model and an MLP projector), the momentum key
  network (a copy of it) and the queue of negatives (`selfsup.init_queue`: random unit keys, the
  pointer at 0), so that checkpoints carry all three:

      {"online": {"encoder", "projector"}, "target": {"encoder", "projector"},
       "queue": {"keys": [K, projection_dim], "ptr": int32}}
  """
  _check_int("queue_size", queue_size, 1)
  key_projector, key_queue = jax.random.split(key)
  online = _online_network(key_projector, model_params, feature_dim, hidden_dim, projection_dim)
  dtype = jnp.result_type(*jax.tree.leaves(model_params))
  queue = selfsup.init_queue(key_queue, queue_size, projection_dim, dtype=dtype)
  return _copy({"online": online, "target": online,
                "queue": {"keys": queue.keys, "ptr": queue.ptr}})


def _in_groups(apply: Callable[[Array], Array], x: Array, groups: int) -> Array:
  """`apply` on `groups` equal consecutive slices of the batch `x [B, ...]` (each normalised by
  its own batch statistics), concatenated back in order."""
  if x.shape[0] % groups:
    raise ValueError(f"shuffle_groups={groups} must divide the batch of {x.shape[0]} images")
  if groups == 1:
    return apply(x)
  y = jax.vmap(apply)(x.reshape((groups, -1) + x.shape[1:]))
  return y.reshape((x.shape[0],) + y.shape[2:])


def moco_objective(features: ApplyFn, augment: Augment, *,
                   temperature: float = selfsup.MOCO_TEMPERATURE, shuffle_groups: int = 1,
                   epsilon: float | None = None) -> Callable[..., tuple[Array, Any]]:
  """`objective(online, target, queue_keys, (x, y), key) -> (loss, (metrics, keys))`:
  `selfsup.moco_loss` of the queries (view 1 through the online network) against their keys
  (view 2 through the momentum network, no gradient) and the queue. Returns the keys,
  L2-normalised, for `selfsup.enqueue`. The labels y are ignored.

  Batch statistics would let a query find its key through the normalisation alone: the query
  batch and the key batch hold views of the same B images. MoCo's shuffled BatchNorm splits each
  batch over GPUs and gives the key network the images in a shuffled order; here the same on one
  device (as the authors' single-GPU "SplitBatchNorm"): `shuffle_groups` = G splits each view
  into G normalisation groups of B / G images, the queries in batch order, the keys after a
  random permutation of the batch (undone on the output), so a query and its key share a group
  only by chance and the rest of the two groups differ. G = 1: one normalisation batch per view,
  no shuffle.

  Metrics: `outer/positive_cosine`, the mean cosine of each query and its key.
  """

  _check_int("shuffle_groups", shuffle_groups, 1)

  def objective(online: Params, target: Params, queue_keys: Array, batch: Batch,
                key: PRNGKey) -> tuple[Array, tuple[dict[str, Array], Array]]:
    x, _ = batch
    view_1, view_2 = two_views(augment, key, x)
    queries = _in_groups(lambda v: _project(features, online, v), view_1, shuffle_groups)
    if shuffle_groups == 1:
      keys = _project(features, target, view_2)
    else:
      order = jax.random.permutation(jax.random.fold_in(key, _SHUFFLE_STREAM), x.shape[0])
      keys = _in_groups(lambda v: _project(features, target, v), view_2[order], shuffle_groups)
      keys = keys[jnp.argsort(order)]
    keys = jax.lax.stop_gradient(keys)
    loss = selfsup.moco_loss(queries, keys, queue_keys, temperature=temperature, epsilon=epsilon)
    keys = _unit(keys, epsilon)
    cosine = jnp.mean(jnp.sum(_unit(queries, epsilon) * keys, axis=-1))
    return loss, ({"outer/positive_cosine": cosine}, keys)

  return objective


def make_moco_step(features: ApplyFn, feature_dim: int, augment: Augment,
                   optimizer: optax.GradientTransformation, *,
                   momentum: float = selfsup.MOCO_MOMENTUM, queue_size: int = MOCO_QUEUE_SIZE,
                   temperature: float = selfsup.MOCO_TEMPERATURE, shuffle_groups: int = 1,
                   hidden_dim: int = MOCO_HIDDEN_DIM, projection_dim: int = MOCO_PROJECTION_DIM,
                   epsilon: float | None = None, key: PRNGKey | None = None,
                   jit: bool = True, donate: bool = True) -> MetaStep:
  """Builds MoCo v2's pre-training step `step(state, (x, y)) -> (state, metrics)`.

  One step, in the order of the paper's algorithm 1: the loss of `moco_objective` against the
  queue as it was, its gradient with respect to the online (query) network only and one optax
  update of it, the momentum (key) network's EMA towards the updated online network with the
  constant `momentum`, then this batch's keys enqueued (the oldest B dequeued). Params as
  `init_moco_params`; the optimiser state is that of `params["online"]`.

  Args:
    features: the encoder `(model_params, x) -> [N, D]`, e.g. `model.features`.
    feature_dim: D, the width of `features`.
    augment: `(key, image) -> image`, applied independently to each view.
    optimizer: for the online params (the paper: SGD with momentum).
    momentum: m in [0, 1] of the key network (the paper: 0.999).
    queue_size: K >= the batch size, the number of negatives (the paper: 65536).
    temperature: T > 0 of the InfoNCE logits (MoCo v2: 0.2).
    shuffle_groups: G >= 1 dividing the batch, the normalisation groups of shuffled BatchNorm
      (`moco_objective`; the paper: its 8 GPUs, `MOCO_SHUFFLE_GROUPS`); 1: none.
    hidden_dim, projection_dim: the MLP head's widths (MoCo v2: 2048, 128).
    epsilon: norm clipping of the cosine similarities.
    key: the root of the step's randomness: the head's and queue's initial values, and the
      augmentations of step s (`fold_in(., s)`, so a resumed run repeats them). Default
      `jax.random.key(0)`.
    jit, donate: as `make_byol_step`.

  Returns:
    `MetaStep`; metrics `outer/loss`, `outer/grad_norm`, `outer/positive_cosine`.
  """
  selfsup._check_fraction("momentum", momentum)
  _check_int("queue_size", queue_size, 1)
  objective = moco_objective(features, augment, temperature=temperature,
                             shuffle_groups=shuffle_groups, epsilon=epsilon)
  init_key, augment_root = jax.random.split(jax.random.key(0) if key is None else key)

  def init(model_params: Params) -> MetaState:
    params = init_moco_params(init_key, model_params, feature_dim, hidden_dim=hidden_dim,
                              projection_dim=projection_dim, queue_size=queue_size)
    return MetaState(params, optimizer.init(params["online"]), jnp.zeros((), jnp.int32))

  def step(state: MetaState, batch: Any) -> tuple[MetaState, dict[str, Array]]:
    step_key = jax.random.fold_in(augment_root, state.step)
    online, target, queue = (state.params[k] for k in ("online", "target", "queue"))
    (value, (metrics, keys)), grads = jax.value_and_grad(objective, has_aux=True)(
      online, target, queue["keys"], batch, step_key)
    updates, opt_state = optimizer.update(grads, state.opt_state, online)
    online = optax.apply_updates(online, updates)
    target = selfsup.ema_update(target, online, momentum)
    queue = selfsup.enqueue(selfsup.Queue(queue["keys"], queue["ptr"]), keys)
    metrics = {**metrics, "outer/loss": value, "outer/grad_norm": optax.tree.norm(grads)}
    params = {"online": online, "target": target, "queue": {"keys": queue.keys, "ptr": queue.ptr}}
    return MetaState(params, opt_state, state.step + 1), metrics

  return meta_lib.compile_step(init, step, jit=jit, donate=donate)


def _online_step(init_params: Callable[[Params], Params], objective: Callable[..., Any],
                 optimizer: optax.GradientTransformation, augment_root: PRNGKey, *,
                 transform_grads: Callable[[Params, Array], Params] = lambda g, s: g,
                 after_update: Callable[[Params, Array], Params] = lambda p, s: p, jit: bool,
                 donate: bool) -> MetaStep:
  """A step of one network, `params = {"online": ...}`, trained by `objective(online, batch,
  key) -> (loss, metrics)`: `transform_grads(grads, step)` before the optax update,
  `after_update(online, step)` after it."""

  def init(model_params: Params) -> MetaState:
    params = {"online": _copy(init_params(model_params))}
    return MetaState(params, optimizer.init(params["online"]), jnp.zeros((), jnp.int32))

  def step(state: MetaState, batch: Any) -> tuple[MetaState, dict[str, Array]]:
    step_key = jax.random.fold_in(augment_root, state.step)
    online = state.params["online"]
    (value, metrics), grads = jax.value_and_grad(objective, has_aux=True)(online, batch, step_key)
    grads = transform_grads(grads, state.step)
    updates, opt_state = optimizer.update(grads, state.opt_state, online)
    online = after_update(optax.apply_updates(online, updates), state.step)
    metrics = {**metrics, "outer/loss": value, "outer/grad_norm": optax.tree.norm(grads)}
    return MetaState({"online": online}, opt_state, state.step + 1), metrics

  return meta_lib.compile_step(init, step, jit=jit, donate=donate)


def barlow_twins_objective(features: ApplyFn, augment: Augment, *,
                           off_diagonal_weight: float = selfsup.BARLOW_TWINS_LAMBDA
                           ) -> Callable[..., tuple[Array, dict[str, Array]]]:
  """`objective(online, (x, y), key) -> (loss, metrics)`: `selfsup.barlow_twins_loss` of the
  projections of two augmented views of x (one batch of 2B through the network; the labels are
  ignored).

  Metrics: `outer/on_diagonal`, the mean correlation of each dimension across the views.
  """

  def objective(online: Params, batch: Batch, key: PRNGKey) -> tuple[Array, dict[str, Array]]:
    x, _ = batch
    view_1, view_2 = two_views(augment, key, x)
    z = _project(features, online, jnp.concatenate([view_1, view_2]))
    z1, z2 = z[: view_1.shape[0]], z[view_1.shape[0]:]
    loss = selfsup.barlow_twins_loss(z1, z2, off_diagonal_weight=off_diagonal_weight)
    on_diagonal = jnp.mean(jnp.diagonal(selfsup.cross_correlation(z1, z2)))
    return loss, {"outer/on_diagonal": on_diagonal}

  return objective


def make_barlow_twins_step(features: ApplyFn, feature_dim: int, augment: Augment,
                           optimizer: optax.GradientTransformation, *,
                           off_diagonal_weight: float = selfsup.BARLOW_TWINS_LAMBDA,
                           hidden_dim: int = BARLOW_TWINS_DIM,
                           projection_dim: int = BARLOW_TWINS_DIM, key: PRNGKey | None = None,
                           jit: bool = True, donate: bool = True) -> MetaStep:
  """Builds Barlow Twins' pre-training step `step(state, (x, y)) -> (state, metrics)`.

  Params `{"online": {"encoder": model_params, "projector": ...}}` (no target network); one
  optax step of `barlow_twins_objective` per call. The projector is the paper's: three linear
  layers, batch norm and ReLU after the first two (`mlp_head_init(num_hidden=2)`).

  Args:
    features, feature_dim, augment, optimizer: as `make_byol_step`.
    off_diagonal_weight: lambda >= 0 of the redundancy-reduction term (the paper: 5e-3).
    hidden_dim, projection_dim: the projector's widths (the paper: 8192, 8192).
    key: the projector's initial params and the augmentations of step s (`fold_in(., s)`).
    jit, donate: as `make_byol_step`.

  Returns:
    `MetaStep`; metrics `outer/loss`, `outer/grad_norm`, `outer/on_diagonal`.
  """
  if isinstance(off_diagonal_weight, bool) or not isinstance(off_diagonal_weight, (int, float)) \
      or off_diagonal_weight < 0:
    raise ValueError(f"off_diagonal_weight must be a number >= 0, got {off_diagonal_weight!r}")
  objective = barlow_twins_objective(features, augment, off_diagonal_weight=off_diagonal_weight)
  init_key, augment_root = jax.random.split(jax.random.key(0) if key is None else key)
  return _online_step(
    lambda model_params: _online_network(init_key, model_params, feature_dim, hidden_dim,
                                         projection_dim, num_hidden=2),
    objective, optimizer, augment_root, jit=jit, donate=donate)


def swav_objective(features: ApplyFn, augment: Augment, *,
                   temperature: float = selfsup.SWAV_TEMPERATURE,
                   epsilon: float = selfsup.SWAV_EPSILON,
                   num_iters: int = selfsup.SWAV_SINKHORN_ITERATIONS,
                   num_small_crops: int = 0, small_crop_augment: Augment | None = None
                   ) -> Callable[..., tuple[Array, dict[str, Array]]]:
  """`objective(online, (x, y), key) -> (loss, metrics)`: `selfsup.swav_loss` (swapped
  prediction of the Sinkhorn codes) of the projections of two augmented views of x against
  `online["prototypes"]` (one batch of 2B through the network; the labels are ignored).

  Multi-crop: with `num_small_crops` V > 0, V more views of x by `small_crop_augment` (keys
  from `fold_in(key, 1)`; the two views are those without them) go through the network in the
  same batch of (2 + V)B and predict the two views' codes (`selfsup.swav_multicrop_loss`).

  Metrics: `outer/code_entropy`, the mean entropy (nats) of the codes of view 1 (log K when
  uniform, 0 when hard).
  """

  _check_int("num_small_crops", num_small_crops, 0)
  if num_small_crops and small_crop_augment is None:
    raise ValueError("num_small_crops > 0 needs a small_crop_augment")

  def objective(online: Params, batch: Batch, key: PRNGKey) -> tuple[Array, dict[str, Array]]:
    x, _ = batch
    view_1, view_2 = two_views(augment, key, x)
    small = [augment_batch(small_crop_augment, k, x)
             for k in jax.random.split(jax.random.fold_in(key, 1), num_small_crops)
             ] if num_small_crops else []
    b = view_1.shape[0]
    z = _project(features, online, jnp.concatenate([view_1, view_2, *small]))
    z1, z2 = z[:b], z[b:2 * b]
    prototypes = online["prototypes"]
    if num_small_crops:
      loss = selfsup.swav_multicrop_loss(z.reshape(2 + num_small_crops, b, -1), prototypes,
                                         temperature=temperature, epsilon=epsilon,
                                         num_iters=num_iters)
    else:
      loss = selfsup.swav_loss(z1, z2, prototypes, temperature=temperature, epsilon=epsilon,
                               num_iters=num_iters)
    codes = selfsup.sinkhorn(_unit(z1, None) @ _unit(prototypes, None).T,
                             epsilon=epsilon, num_iters=num_iters)
    entropy = -jnp.mean(jnp.sum(codes * jnp.log(jnp.maximum(codes, 1e-30)), axis=-1))
    return loss, {"outer/code_entropy": entropy}

  return objective


def make_swav_step(features: ApplyFn, feature_dim: int, augment: Augment,
                   optimizer: optax.GradientTransformation, *,
                   num_prototypes: int = SWAV_NUM_PROTOTYPES,
                   freeze_steps: int = SWAV_FREEZE_STEPS,
                   temperature: float = selfsup.SWAV_TEMPERATURE,
                   epsilon: float = selfsup.SWAV_EPSILON,
                   num_iters: int = selfsup.SWAV_SINKHORN_ITERATIONS,
                   num_small_crops: int = 0, small_crop_augment: Augment | None = None,
                   hidden_dim: int = SWAV_HIDDEN_DIM, projection_dim: int = SWAV_PROJECTION_DIM,
                   key: PRNGKey | None = None, jit: bool = True, donate: bool = True) -> MetaStep:
  """Builds SwAV's pre-training step `step(state, (x, y)) -> (state, metrics)` (two views and
  optionally small crops; no queue).

  Params `{"online": {"encoder": model_params, "projector": ..., "prototypes": [K, P]}}`, the
  prototypes L2-normalised at init and after every update (as the paper's code, which
  normalises them before each step). The prototypes' gradient is zero during the first
  `freeze_steps` steps (`selfsup.freeze_prototypes`); with Adam or SGD (no weight decay) a zero
  gradient leaves them exactly where they are.

  Args:
    features, feature_dim, augment, optimizer: as `make_byol_step`.
    num_prototypes: K (the paper: 3000 on ImageNet).
    freeze_steps: >= 0 steps with the prototypes fixed (the official code: 313).
    temperature: T > 0 of the predictions (0.1).
    epsilon: > 0 the codes' entropic regularisation (0.05).
    num_iters: Sinkhorn-Knopp iterations (3).
    num_small_crops: multi-crop's small views (the paper: 6; 0: two views only).
    small_crop_augment: `(key, image) -> image` of the small crops, e.g.
      `make_affine_augment(scale_range=SWAV_SMALL_CROP_SCALE,
      max_translation=SWAV_SMALL_CROP_TRANSLATION)`.
    hidden_dim, projection_dim: the projection head's widths (2048, 128).
    key: the head's and prototypes' initial values and the augmentations of step s.
    jit, donate: as `make_byol_step`.

  Returns:
    `MetaStep`; metrics `outer/loss`, `outer/grad_norm`, `outer/code_entropy`.
  """
  _check_int("num_prototypes", num_prototypes, 1)
  _check_int("freeze_steps", freeze_steps, 0)
  _check_int("num_iters", num_iters, 0)
  objective = swav_objective(features, augment, temperature=temperature, epsilon=epsilon,
                             num_iters=num_iters, num_small_crops=num_small_crops,
                             small_crop_augment=small_crop_augment)
  init_key, augment_root = jax.random.split(jax.random.key(0) if key is None else key)
  key_projector, key_prototypes = jax.random.split(init_key)

  def init_params(model_params: Params) -> Params:
    online = _online_network(key_projector, model_params, feature_dim, hidden_dim,
                             projection_dim)
    dtype = jnp.result_type(*jax.tree.leaves(model_params))
    prototypes = jax.random.normal(key_prototypes, (num_prototypes, projection_dim), dtype)
    return {**online, "prototypes": selfsup.normalize_prototypes(prototypes)}

  def transform_grads(grads: Params, step: Array) -> Params:
    return {**grads, "prototypes": selfsup.freeze_prototypes(grads["prototypes"], step,
                                                             freeze_steps=freeze_steps)}

  def after_update(online: Params, step: Array) -> Params:
    # Frozen prototypes are left bit for bit (renormalising a unit vector can move its last bit).
    prototypes = online["prototypes"]
    prototypes = jnp.where(step < freeze_steps, prototypes,
                           selfsup.normalize_prototypes(prototypes))
    return {**online, "prototypes": prototypes}

  return _online_step(init_params, objective, optimizer, augment_root,
                      transform_grads=transform_grads, after_update=after_update, jit=jit,
                      donate=donate)


__all__ = [
  "BARLOW_TWINS_DIM",
  "HIDDEN_DIM",
  "MOCO_HIDDEN_DIM",
  "MOCO_PROJECTION_DIM",
  "MOCO_QUEUE_SIZE",
  "MOCO_SHUFFLE_GROUPS",
  "SWAV_FREEZE_STEPS",
  "SWAV_HIDDEN_DIM",
  "SWAV_NUM_PROTOTYPES",
  "SWAV_PROJECTION_DIM",
  "SWAV_SMALL_CROP_SCALE",
  "SWAV_SMALL_CROP_TRANSLATION",
  "PROJECTION_DIM",
  "TwoNetworkObjective",
  "barlow_twins_objective",
  "byol_objective",
  "init_byol_params",
  "init_moco_params",
  "make_barlow_twins_step",
  "make_byol_step",
  "make_moco_step",
  "make_swav_step",
  "moco_objective",
  "mlp_head_apply",
  "mlp_head_init",
  "on_online_encoder",
  "online_encoder",
  "swav_objective",
]
