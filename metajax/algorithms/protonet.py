"""Prototypical Networks (Snell et al. 2017) as a learner with MAML's interface.

"Adapting" to a task means computing its class prototypes, the mean support embedding of each
class; a query's logits are its negative squared Euclidean distances to the prototypes. The
learner implements `metajax.types.Learner` (`init`, `model_params`, `adapt`, `apply_fn`, `loss`,
`task_loss`), so the episodic meta-step and the evaluation work unchanged:

    model = metajax.conv4(num_classes=5)                   # its head is unused by ProtoNet
    learner = ProtoNet(model.features, num_classes=5)
    meta_step = metajax.make_meta_step(learner, optax.adam(1e-3))
    metajax.evaluate_tasks(learner, state.params, tasks)   # "before" = chance, see model_params

The adapted params are the dict `{"params": model params, "prototypes": [N, D],
"log_mask": [N]}`; `log_mask` is 0 for the classes present in the support set and -inf for the
others, so that a learner built for N classes also serves tasks with fewer ways: the paper's
"higher way" training (e.g. 20-way training episodes, 5-way test episodes) is one learner with
`num_classes=20` and two episode samplers, and on a 5-way task it gives exactly the 5-way logits
(the absent classes have logit -inf: probability 0, never predicted).

Reference: J. Snell, K. Swersky, R. Zemel, Prototypical Networks for Few-shot Learning,
NeurIPS 2017, arXiv 1703.05175.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from metajax import losses as losses_lib
from metajax.types import ApplyFn, Array, ArrayLike, Params, Task

ProtoParams = dict[str, Any]  # {"params": model params, "prototypes": [N, D], "log_mask": [N]}


def squared_distances(queries: ArrayLike, prototypes: ArrayLike) -> Array:
  """`[Q, D], [N, D] -> [Q, N]`: `|q_i - p_j|^2`, computed from the differences (exact, no
  cancellation; `[N, 1]` prototypes broadcast against any D)."""
  q, p = jnp.asarray(queries), jnp.asarray(prototypes)
  return jnp.sum(jnp.square(q[:, None, :] - p[None, :, :]), axis=-1)  # QND->QN


def prototypes(embeddings: ArrayLike, labels: ArrayLike, num_classes: int) -> tuple[Array, Array]:
  """Class means of the embeddings, and which classes have at least one example.

  Args:
    embeddings: `[S, D]` support embeddings.
    labels: `[S]` integer labels in `[0, num_classes)`.
    num_classes: N.

  Returns:
    `(prototypes [N, D], present [N] bool)`; an absent class has a zero prototype.
  """
  f = jnp.asarray(embeddings)
  onehot = jax.nn.one_hot(labels, num_classes, dtype=f.dtype)  # SN
  counts = jnp.sum(onehot, axis=0)  # N
  sums = onehot.T @ f  # NS,SD->ND
  return sums / jnp.maximum(counts, 1)[:, None], counts > 0


@dataclasses.dataclass(frozen=True)
class ProtoNet:
  """Prototypical Networks: nearest class mean in embedding space, trained episodically.

  Attributes:
    features: the embedding `(params, x) -> [B, D]`, e.g. `model.features` of `metajax.conv4`.
    num_classes: N, the most ways of any task it sees (logits are `[Q, N]`; tasks with fewer
      ways get -inf logits for the missing classes).
    loss: `(logits, labels) -> scalar` on the query set (cross-entropy, as in the paper).
    params_transforms: functions applied, in order, to the params before embedding (as in
      `MAML`, so that `metajax.with_zeroing` composes; zeroing the unused head changes nothing).
  """

  features: ApplyFn
  num_classes: int
  loss: Callable[[Array, Array], Array] = losses_lib.cross_entropy
  params_transforms: tuple[Callable[[Params], Params], ...] = ()

  def __post_init__(self):
    if not isinstance(self.num_classes, int) or self.num_classes < 1:
      raise ValueError(f"num_classes must be an int >= 1, got {self.num_classes!r}")

  def init(self, params: Params) -> Params:
    """Model params -> meta-params (the same: ProtoNet learns only the embedding)."""
    return params

  def model_params(self, meta_params: Params) -> ProtoParams:
    """The "unadapted" predictor: every prototype at 0 and every class present.

    All N logits are then equal (`-|f(x)|^2`), so "before adaptation" in `evaluate_tasks` is
    chance by construction: loss log(N) and the accuracy of always predicting class 0 (as with
    the zeroing trick's zero head). There is no classifier without a support set.
    """
    params = meta_params
    for transform in self.params_transforms:
      params = transform(params)
    dtype = jnp.result_type(*jax.tree.leaves(params))
    return {"params": params, "prototypes": jnp.zeros((self.num_classes, 1), dtype),
            "log_mask": jnp.zeros((self.num_classes,), dtype)}

  def apply_fn(self, adapted: ProtoParams, x: Array) -> Array:
    """Logits `[Q, N]`: minus the squared distances of the query embeddings to the prototypes."""
    d2 = squared_distances(self.features(adapted["params"], x), adapted["prototypes"])
    return adapted["log_mask"] - d2

  def adapt(self, meta_params: Params, x: Array, y: Array, *,
            return_losses: bool = False) -> ProtoParams | tuple[ProtoParams, Array]:
    """Computes the prototypes of one task's support set `(x, y)` (differentiably).

    With `return_losses`, also the support set's loss under its own prototypes, `[1]` (the
    analogue of MAML's support loss before its one "step").
    """
    start = self.model_params(meta_params)
    embeddings = self.features(start["params"], x)
    protos, present = prototypes(embeddings, y, self.num_classes)
    log_mask = jnp.where(present, 0.0, -jnp.inf).astype(protos.dtype)
    adapted = {"params": start["params"], "prototypes": protos, "log_mask": log_mask}
    if not return_losses:
      return adapted
    support_logits = log_mask - squared_distances(embeddings, protos)  # no second forward pass
    return adapted, self.loss(support_logits, y)[None]

  def task_loss(self, meta_params: Params, task: Task) -> tuple[Array, dict[str, Array]]:
    """Query loss of one episode at its prototypes, and per-task metrics."""
    return episode_task_loss(self, meta_params, task)


def episode_task_loss(learner: Any, meta_params: Any, task: Task) -> tuple[Array, dict[str, Array]]:
  """The query loss of one episode for a learner that `adapt`s to the support set in one pass
  (the metric learners: ProtoNet, Matching and Relation networks), and its per-task metrics.

  `learner.adapt(..., return_losses=True)` gives the adapted state and the support loss; the
  query logits are `learner.apply_fn(adapted, query_x)`, scored by `learner.loss`.
  """
  adapted, support_loss = learner.adapt(meta_params, task.support_x, task.support_y,
                                        return_losses=True)
  logits = learner.apply_fn(adapted, task.query_x)
  loss = learner.loss(logits, task.query_y)
  return loss, {"inner/support_loss_before": support_loss[0], "outer/query_loss": loss,
                "outer/query_accuracy": losses_lib.accuracy(logits, task.query_y)}


__all__ = ["ProtoNet", "episode_task_loss", "prototypes", "squared_distances"]
