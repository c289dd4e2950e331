"""Siamese networks (Koch et al. 2015) as a learner with MAML's interface.

Training is pairwise verification: two images go through the same embedding network h, and the
probability that they show the same class is `p = sigmoid(sum_j alpha_j |h(x1)_j - h(x2)_j| +
b)`, a learned weighting of the L1 distance (alpha, b meta-learned with the embedding), trained
with binary cross-entropy on same/different pairs drawn from each episode's images. One-shot
classification assigns a query the class of its most similar support image:

    model = metajax.conv4(num_classes=5)                   # its head is unused
    learner = SiameseNet(model.features, num_classes=5, feature_dim=model.feature_dim)
    meta_step = metajax.make_meta_step(learner, optax.adam(1e-3))

`task_loss` is the verification loss; `apply_fn` returns class logits, each class's the largest
verification logit of the query against that class's support images, so that their argmax is
the most similar support image's class and `evaluate_tasks` works unchanged (its `loss` reads
those logits with `SiameseNet.loss`, cross-entropy by default, as a score of the ranking). As in
`ProtoNet`, a learner built for N classes serves tasks with fewer ways (absent classes: -inf).

Reference: G. Koch, R. Zemel, R. Salakhutdinov, Siamese Neural Networks for One-shot Image
Recognition, ICML Deep Learning Workshop 2015.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from metajax import losses as losses_lib
from metajax.types import ApplyFn, Array, ArrayLike, Params, Task

SiameseParams = dict[str, Any]  # {"params": model params, "siamese": {"weights": [D], "bias": []}}


def init_verifier(feature_dim: int, dtype: Any = jnp.float32) -> Params:
  """The verification head `{"weights": [D], "bias": []}`: `alpha_j = -1/D`, `b = 0`.

  Deterministic: the embedding breaks the symmetry, so the head needs no random draw; the
  negative weights make the initial same-class probability fall as the L1 distance grows.
  """
  return {"weights": jnp.full((feature_dim,), -1.0 / feature_dim, dtype),
          "bias": jnp.zeros((), dtype)}


def verification_logits(head: Params, a: ArrayLike, b: ArrayLike) -> Array:
  """`[A, D], [B, D] -> [A, B]`: `sum_j alpha_j |a_ij - b_kj| + bias`, the logit of "same"."""
  a, b = jnp.asarray(a), jnp.asarray(b)
  distances = jnp.abs(a[:, None, :] - b[None, :, :])  # ABD
  return distances @ head["weights"] + head["bias"]  # ABD,D->AB


def pair_labels(labels_a: ArrayLike, labels_b: ArrayLike) -> Array:
  """`[A], [B] -> [A, B]` booleans: True where the two examples share a class."""
  return jnp.asarray(labels_a)[:, None] == jnp.asarray(labels_b)[None, :]


def verification_loss(logits: ArrayLike, same: ArrayLike, mask: ArrayLike | None = None, *,
                      balanced: bool = True) -> Array:
  """Binary cross-entropy of the verification logits against the same/different labels.

  Args:
    logits: `[...]` logits of "same".
    same: `[...]` booleans (or 0/1), the targets.
    mask: `[...]` booleans, the pairs that count (None: all).
    balanced: weight the same and the different pairs so that each kind contributes half of the
      loss (Koch et al. train on balanced pairs; an N-way episode has about N - 1 different pairs
      per same pair). False: the plain mean over the pairs.

  Returns:
    The (weighted) mean binary cross-entropy, a scalar.
  """
  logits = jnp.asarray(logits)
  same = jnp.asarray(same, logits.dtype)
  mask = jnp.ones_like(logits) if mask is None else jnp.asarray(mask, logits.dtype)
  bce = optax.sigmoid_binary_cross_entropy(logits, same)
  if not balanced:
    return jnp.sum(mask * bce) / jnp.maximum(jnp.sum(mask), 1)
  pos, neg = mask * same, mask * (1 - same)
  # A kind with no pairs contributes nothing (its term is 0 / 1).
  return 0.5 * (jnp.sum(pos * bce) / jnp.maximum(jnp.sum(pos), 1)
                + jnp.sum(neg * bce) / jnp.maximum(jnp.sum(neg), 1))


def class_logits(pair_logits: ArrayLike, labels: ArrayLike, num_classes: int) -> Array:
  """`[Q, S], [S] -> [Q, N]`: per class, the largest logit against that class's support images
  (-inf for a class without any), so the argmax is the most similar support image's class."""
  member = jax.nn.one_hot(labels, num_classes, dtype=bool)  # SN
  masked = jnp.where(member[None], jnp.asarray(pair_logits)[:, :, None], -jnp.inf)  # QSN
  return jnp.max(masked, axis=1)


@dataclasses.dataclass(frozen=True)
class SiameseNet:
  """Siamese networks: verification-trained embeddings, one-shot by the nearest support image.

  The meta-params are `{"params": model params, "siamese": the verification head}`; the adapted
  params add the support embeddings `[S, D]` and labels `[S]`.

  Attributes:
    features: the embedding `(params, x) -> [B, D]`, e.g. `model.features` of `metajax.conv4`.
    num_classes: N, the most ways of any task it sees (class logits are `[Q, N]`).
    feature_dim: D, the width of `features`' output (`model.feature_dim`).
    all_pairs: verification pairs from all pairs of distinct images of the episode (support and
      query pooled); False: every query image with every support image.
    balanced: same and different pairs weigh equally in the loss (see `verification_loss`).
    loss: `(class_logits, labels) -> scalar`, the query loss evaluation reports on `apply_fn`'s
      class logits (cross-entropy); training minimises the verification loss.
    params_transforms: functions applied, in order, to the model params before embedding (as in
      `MAML`, so that `metajax.with_zeroing` composes; zeroing the unused head changes nothing).
  """

  features: ApplyFn
  num_classes: int
  feature_dim: int
  all_pairs: bool = False
  balanced: bool = True
  loss: Callable[[Array, Array], Array] = losses_lib.cross_entropy
  params_transforms: tuple[Callable[[Params], Params], ...] = ()

  def __post_init__(self):
    for name in ("num_classes", "feature_dim"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")

  def init(self, params: Params) -> SiameseParams:
    """Model params -> meta-params, with the verification head of `init_verifier`."""
    dtype = jnp.result_type(*jax.tree.leaves(params))
    return {"params": params, "siamese": init_verifier(self.feature_dim, dtype)}

  def model_params(self, meta_params: SiameseParams) -> SiameseParams:
    """The "unadapted" predictor: no support image to compare with, so all class logits are 0
    (chance: loss log(N) and the accuracy of always predicting class 0 in `evaluate_tasks`)."""
    params = meta_params["params"]
    for transform in self.params_transforms:
      params = transform(params)
    return {**meta_params, "params": params}

  def adapt(self, meta_params: SiameseParams, x: Array, y: Array, *,
            return_losses: bool = False) -> SiameseParams | tuple[SiameseParams, Array]:
    """Embeds one task's support set `(x, y)` (differentiably).

    With `return_losses`, also the verification loss of the support images' distinct pairs,
    `[1]` (with one image per class there are only different pairs).
    """
    start = self.model_params(meta_params)
    embeddings = self.features(start["params"], x)
    adapted = {**start, "support_embeddings": embeddings, "support_labels": y}
    if not return_losses:
      return adapted
    logits = verification_logits(start["siamese"], embeddings, embeddings)
    distinct = ~jnp.eye(y.shape[0], dtype=bool)
    loss = verification_loss(logits, pair_labels(y, y), distinct, balanced=self.balanced)
    return adapted, loss[None]

  def apply_fn(self, adapted: SiameseParams, x: Array) -> Array:
    """Class logits `[Q, N]` of the queries `x`: per class, the largest verification logit
    against its support images (-inf: absent; all 0 for params without a support set)."""
    if "support_embeddings" not in adapted:
      dtype = jnp.result_type(*jax.tree.leaves(adapted["params"]))
      return jnp.zeros((x.shape[0], self.num_classes), dtype)
    logits = verification_logits(adapted["siamese"], self.features(adapted["params"], x),
                                 adapted["support_embeddings"])
    return class_logits(logits, adapted["support_labels"], self.num_classes)

  def task_loss(self, meta_params: SiameseParams, task: Task) -> tuple[Array, dict[str, Array]]:
    """The verification loss of one episode's pairs, and per-task metrics (the one-shot query
    accuracy among them)."""
    start = self.model_params(meta_params)
    support = self.features(start["params"], task.support_x)
    query = self.features(start["params"], task.query_x)
    head = start["siamese"]
    query_logits = verification_logits(head, query, support)  # QS
    if self.all_pairs:
      pooled = jnp.concatenate([support, query])
      labels = jnp.concatenate([task.support_y, task.query_y])
      logits, same = verification_logits(head, pooled, pooled), pair_labels(labels, labels)
      mask = jnp.triu(jnp.ones(same.shape, bool), k=1)  # each unordered pair once
    else:
      logits, same, mask = query_logits, pair_labels(task.query_y, task.support_y), None
    loss = verification_loss(logits, same, mask, balanced=self.balanced)
    predictions = class_logits(query_logits, task.support_y, self.num_classes)
    return loss, {"outer/query_loss": loss,
                  "outer/verification_accuracy": _verification_accuracy(logits, same, mask),
                  "outer/query_accuracy": losses_lib.accuracy(predictions, task.query_y)}


def _verification_accuracy(logits: Array, same: Array, mask: Array | None) -> Array:
  """Fraction of the counted pairs whose "same" decision (logit > 0) is right."""
  right = ((logits > 0) == same).astype(logits.dtype)
  if mask is None:
    return jnp.mean(right)
  mask = mask.astype(logits.dtype)
  return jnp.sum(mask * right) / jnp.maximum(jnp.sum(mask), 1)


__all__ = ["SiameseNet", "class_logits", "init_verifier", "pair_labels", "verification_logits",
           "verification_loss"]
