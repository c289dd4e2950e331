"""Relation Networks (Sung et al. 2018) as a learner with MAML's interface.

An embedding module f maps every image to a feature map; a class's map is the sum of its support
images' maps (the paper's K-shot rule; `class_pool="mean"` averages instead); a learned relation
module g scores each (class map, query map) pair, concatenated along the channels, with
`r = sigmoid(g([F_c, f(x)]))` in (0, 1); training regresses the scores onto the one-hot labels
with a squared error. "Adapting" to a task means computing its class maps:

    model = metajax.conv4(num_classes=5)                   # its head is unused
    learner = RelationNet(model.features, num_classes=5,
                          relation=relation_module((1, 1, model.feature_dim)))
    meta_step = metajax.make_meta_step(learner, optax.adam(1e-3))

`apply_fn` returns the relation *logits* (the scores are their sigmoid, `RelationNet.scores`), so
that the argmax, the evaluation and a softmax read-out work as for any learner; the default loss
`relation_mse` is the paper's squared error on the scores. As in `ProtoNet`, a learner built for N
classes serves tasks with fewer ways: a class without support examples gets logit -inf (score 0,
never predicted, no loss, zero gradient), and its pairs are left out of the relation module's
batch statistics, so the present classes' scores are exactly those of an N-way learner.

The embedding is `(params, x) -> [B, D]` as everywhere in metajax; `relation_module(feature_shape)`
reads those D features as `feature_shape` maps (a row-major flatten, as the models' encoders do),
so that an encoder that keeps spatial resolution feeds the paper's convolutional relation module.

Reference: F. Sung, Y. Yang, L. Zhang, T. Xiang, P. Torr, T. Hospedales, Learning to Compare:
Relation Network for Few-Shot Learning, CVPR 2018, arXiv 1711.06025.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from metajax.algorithms.protonet import episode_task_loss
from metajax.nn.conv import max_pool_2x2
from metajax.types import ApplyFn, Array, ArrayLike, Params, PRNGKey, Task

RelationParams = dict[str, Any]  # {"params": model params, "relation": relation module params}
CLASS_POOLS = ("sum", "mean")
# The relation module's initial weights come from `fold_in(key(seed), INIT_STREAM)`: a stream of
# their own, never the root key itself (which the training loop splits into its init and train
# keys).
INIT_STREAM = 2


def relation_mse(logits: ArrayLike, labels: ArrayLike) -> Array:
  """The Relation Network's loss: `mean_q sum_c (sigmoid(logits[q, c]) - 1{c = labels_q})^2`.

  The paper sums over queries and classes; the mean over queries keeps the scale independent of
  the episode's size (its official code's `MSELoss` also divides by the number of classes).
  A -inf logit (an absent class) has score 0 and contributes 0.

  Args:
    logits: `[Q, N]` relation logits.
    labels: `[Q]` integer labels in `[0, N)`.
  """
  scores = jax.nn.sigmoid(jnp.asarray(logits))
  onehot = jax.nn.one_hot(labels, scores.shape[-1], dtype=scores.dtype)
  return jnp.mean(jnp.sum(jnp.square(scores - onehot), axis=-1))


def masked_batch_norm(x: ArrayLike, weights: ArrayLike, scale: ArrayLike, bias: ArrayLike, *,
                      epsilon: float = 1e-5) -> Array:
  """BatchNorm with the statistics of the examples whose weight is 1 (batch statistics only).

  Args:
    x: `[P, ..., C]`, normalised per channel over every axis but the last.
    weights: `[P]`, 1 for the examples the statistics are taken over, 0 for the others (they
      are normalised with the same statistics).
    scale, bias: `[C]`.

  Returns:
    `(x - mean) / sqrt(var + epsilon) * scale + bias`; with all weights 1, plain batch-statistics
    BatchNorm (`metajax.nn.models.BatchStatNorm`).
  """
  x = jnp.asarray(x)
  w = jnp.asarray(weights, x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
  axes = tuple(range(x.ndim - 1))
  count = jnp.maximum(jnp.sum(w) * math.prod(x.shape[1:-1]), 1)
  mean = jnp.sum(w * x, axis=axes) / count
  var = jnp.sum(w * jnp.square(x - mean), axis=axes) / count
  return (x - mean) * jax.lax.rsqrt(var + epsilon) * scale + bias


class _MaskedNorm(nn.Module):
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x: Array, weights: Array) -> Array:
    features = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (features,), x.dtype)
    bias = self.param("bias", nn.initializers.zeros, (features,), x.dtype)
    return masked_batch_norm(x, weights, scale, bias, epsilon=self.epsilon)


class _Relation(nn.Module):
  """The paper's relation module: conv blocks (conv, BatchNorm, ReLU, 2x2 max-pool), then a ReLU
  layer and one output. A block's kernel is 3x3, or the map's size where that is smaller; it pools
  only maps of at least 2x2."""

  filters: int
  hidden: int
  num_blocks: int

  @nn.compact
  def __call__(self, pairs: Array, weights: Array) -> Array:
    x = pairs
    for i in range(self.num_blocks):
      kernel = (min(3, x.shape[1]), min(3, x.shape[2]))
      # XLA's own convolution: the module's weights are shared by every task (never batched
      # under vmap), unlike the per-task kernels `metajax.nn.conv` is for.
      x = nn.Conv(self.filters, kernel, padding="SAME", name=f"conv{i}")(x)
      x = nn.relu(_MaskedNorm(name=f"norm{i}")(x, weights))
      if x.shape[1] >= 2 and x.shape[2] >= 2:
        x = max_pool_2x2(x)
    x = nn.relu(nn.Dense(self.hidden, name="fc0")(x.reshape(x.shape[0], -1)))
    return nn.Dense(1, name="fc1")(x)[:, 0]


class RelationModule(NamedTuple):
  """A relation module as pure functions.

  Attributes:
    init: `(key, dtype) -> params`.
    apply: `(params, pairs [P, H, W, 2C], weights [P]) -> logits [P]`; `weights` (1 or 0) says
      which pairs its batch statistics are taken over.
    feature_shape: `(H, W, C)`, the shape one embedding's D = H * W * C features are read as.
  """

  init: Callable[[PRNGKey, Any], Params]
  apply: Callable[[Params, Array, Array], Array]
  feature_shape: tuple[int, int, int]


def relation_module(feature_shape: Sequence[int], *, filters: int = 64, hidden: int = 8,
                    num_blocks: int = 2) -> RelationModule:
  """The relation module of Sung et al. (Omniglot and mini-ImageNet: 64 filters, 8 hidden units).

  Args:
    feature_shape: how one embedding's features are read: `(H, W, C)` maps, or `(D,)` for flat
      features (read as `1 x 1 x D` maps: the blocks are then 1x1 convolutions, no pooling).
    filters: channels of every conv block.
    hidden: width of the hidden fully connected layer.
    num_blocks: conv blocks (2 in the paper).
  """
  shape = tuple(int(d) for d in feature_shape)
  if len(shape) == 1:
    shape = (1, 1) + shape
  if len(shape) != 3 or min(shape) < 1:
    raise ValueError(f"feature_shape must be (D,) or (H, W, C) of positive sizes, got "
                     f"{tuple(feature_shape)!r}")
  for name, value in (("filters", filters), ("hidden", hidden), ("num_blocks", num_blocks)):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"{name} must be an int >= 1, got {value!r}")
  module = _Relation(filters=filters, hidden=hidden, num_blocks=num_blocks)
  h, w, c = shape

  # Jitted: run eagerly, flax's initialisers compile one small XLA program per op.
  @functools.partial(jax.jit, static_argnums=1)
  def init(key: PRNGKey, dtype: Any = jnp.float32) -> Params:
    dummy = jnp.zeros((2, h, w, 2 * c), dtype)
    params = module.init(key, dummy, jnp.ones((2,), dtype))["params"]
    return jax.tree.map(lambda p: p.astype(dtype), dict(params))

  def apply(params: Params, pairs: Array, weights: Array) -> Array:
    return module.apply({"params": params}, pairs, weights)

  return RelationModule(init=init, apply=apply, feature_shape=shape)


@dataclasses.dataclass(frozen=True)
class RelationNet:
  """Relation Networks: a learned comparison of each query with each class's feature map.

  The meta-params are `{"params": model params, "relation": relation module params}`; the adapted
  params add the class maps `[N, D]` (flattened) and which classes are present `[N]`.

  Attributes:
    features: the embedding module `(params, x) -> [B, D]`, D = prod(relation.feature_shape).
    num_classes: N, the most ways of any task it sees (logits are `[Q, N]`).
    relation: the relation module, e.g. `relation_module(feature_shape)`.
    class_pool: "sum" (the paper's) or "mean" of a class's support maps.
    seed: seeds the relation module's initial weights (see `INIT_STREAM`; the embedding's come
      with the model params).
    loss: `(logits, labels) -> scalar` on the query set (`relation_mse`, as in the paper).
    params_transforms: functions applied, in order, to the model params before embedding (as in
      `MAML`, so that `metajax.with_zeroing` composes; zeroing the unused head changes nothing).
  """

  features: ApplyFn
  num_classes: int
  relation: RelationModule
  class_pool: str = "sum"
  seed: int = 0
  loss: Callable[[Array, Array], Array] = relation_mse
  params_transforms: tuple[Callable[[Params], Params], ...] = ()

  def __post_init__(self):
    if not isinstance(self.num_classes, int) or self.num_classes < 1:
      raise ValueError(f"num_classes must be an int >= 1, got {self.num_classes!r}")
    if self.class_pool not in CLASS_POOLS:
      raise ValueError(f"class_pool must be one of {CLASS_POOLS}, got {self.class_pool!r}")

  def init(self, params: Params) -> RelationParams:
    """Model params -> meta-params, the relation module's weights drawn from `seed`."""
    dtype = jnp.result_type(*jax.tree.leaves(params))
    key = jax.random.fold_in(jax.random.key(self.seed), INIT_STREAM)
    return {"params": params, "relation": self.relation.init(key, dtype)}

  def model_params(self, meta_params: RelationParams) -> RelationParams:
    """The "unadapted" predictor: every class map 0 and every class present.

    All N logits of a query are then equal (one pair, compared N times), so "before adaptation"
    in `evaluate_tasks` is chance by construction: the accuracy of always predicting class 0.
    """
    params = meta_params["params"]
    for transform in self.params_transforms:
      params = transform(params)
    dtype = jnp.result_type(*jax.tree.leaves(params))
    dim = math.prod(self.relation.feature_shape)
    return {**meta_params, "params": params,
            "class_maps": jnp.zeros((self.num_classes, dim), dtype),
            "present": jnp.ones((self.num_classes,), bool)}

  def class_maps(self, embeddings: ArrayLike, labels: ArrayLike) -> tuple[Array, Array]:
    """`[S, D], [S] -> ([N, D], present [N])`: each class's summed (or mean) support features."""
    f = jnp.asarray(embeddings)
    onehot = jax.nn.one_hot(labels, self.num_classes, dtype=f.dtype)  # SN
    counts = jnp.sum(onehot, axis=0)
    sums = onehot.T @ f  # NS,SD->ND
    maps = sums if self.class_pool == "sum" else sums / jnp.maximum(counts, 1)[:, None]
    return maps, counts > 0

  def _relate(self, relation_params: Params, embeddings: Array, maps: Array,
              present: Array) -> Array:
    """`[Q, D], [N, D], [N] -> [Q, N]` logits: the relation module on every (class, query) pair."""
    h, w, c = self.relation.feature_shape
    if embeddings.shape[-1] != h * w * c:
      raise ValueError(f"the embedding gives {embeddings.shape[-1]} features, which cannot be "
                       f"read as the relation module's {h}x{w}x{c} feature maps")
    q, n = embeddings.shape[0], maps.shape[0]
    queries = jnp.broadcast_to(embeddings.reshape(q, 1, h, w, c), (q, n, h, w, c))
    classes = jnp.broadcast_to(maps.reshape(1, n, h, w, c), (q, n, h, w, c))
    pairs = jnp.concatenate([classes, queries], axis=-1).reshape(q * n, h, w, 2 * c)
    weights = jnp.broadcast_to(present, (q, n)).reshape(-1).astype(embeddings.dtype)
    logits = self.relation.apply(relation_params, pairs, weights).reshape(q, n)
    return jnp.where(present, logits, -jnp.inf)

  def apply_fn(self, adapted: RelationParams, x: Array) -> Array:
    """Relation logits `[Q, N]` of the queries `x` against the class maps (-inf: absent)."""
    embeddings = self.features(adapted["params"], x)
    return self._relate(adapted["relation"], embeddings, adapted["class_maps"],
                        adapted["present"])

  def scores(self, adapted: RelationParams, x: Array) -> Array:
    """Relation scores `[Q, N]` in (0, 1) (0 for an absent class): the sigmoid of `apply_fn`."""
    return jax.nn.sigmoid(self.apply_fn(adapted, x))

  def adapt(self, meta_params: RelationParams, x: Array, y: Array, *,
            return_losses: bool = False) -> RelationParams | tuple[RelationParams, Array]:
    """Computes the class maps of one task's support set `(x, y)` (differentiably).

    With `return_losses`, also the support set's loss against its own class maps, `[1]` (no
    second pass through the embedding).
    """
    start = self.model_params(meta_params)
    embeddings = self.features(start["params"], x)
    maps, present = self.class_maps(embeddings, y)
    adapted = {**start, "class_maps": maps, "present": present}
    if not return_losses:
      return adapted
    support_logits = self._relate(start["relation"], embeddings, maps, present)
    return adapted, self.loss(support_logits, y)[None]

  def task_loss(self, meta_params: RelationParams, task: Task) -> tuple[Array, dict[str, Array]]:
    """Query loss of one episode against its class maps, and per-task metrics."""
    return episode_task_loss(self, meta_params, task)


__all__ = ["CLASS_POOLS", "RelationModule", "RelationNet", "masked_batch_norm", "relation_mse",
           "relation_module"]
