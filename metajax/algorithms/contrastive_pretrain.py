"""Contrastive pre-training (SimCLR, SupCon) of an encoder, then few-shot by prototypes or a probe.

Pre-train the encoder on the meta-training classes with a contrastive loss on two augmented
views of each image, then solve each test task with the frozen encoder: class prototypes
(nearest class mean, `metajax.algorithms.protonet.ProtoNet`, no training per task) or a linear head fitted
on the support set (`metajax.algorithms.pretrain.finetune_learner(head_only=True, fresh_head=True)`). Both
are learners for `metajax.evaluate_tasks`:

    model = metajax.conv4(num_classes=5)
    augment = metajax.data.augment.make_affine_augment()
    sample = make_class_batch_sampler(pool, classes_per_batch=128, images_per_class=2)
    pretrain_step = make_pretrain_step(simclr_objective(model.features, augment),
                                       optax.adam(1e-3), key=train_key)   # or supcon_objective
    state = pretrain_step.init(model.init(key))
    state, metrics = pretrain_step.step(state, sample(batch_key, images))
    metajax.evaluate_tasks(prototype_learner(model, ways=5), state.params, tasks)
    metajax.evaluate_tasks(linear_probe_learner(model, metajax.cross_entropy, num_inner_steps=50,
                                                inner_lr=0.5), state.params, tasks)

The embedding is `embed_fn(params, x) -> [B, D]`: `model.features` (the encoder output, as
here), or a projection head on top (SimCLR's), e.g. `lambda p, x: proj.apply(p, ...)`; the
losses L2-normalise it. Both views go through the encoder in one batch, so batch-statistics
normalisation sees all 2B images.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from metajax import contrastive as contrastive_lib
from metajax.data.augment import Augment, augment_batch
from metajax.meta import MAML
from metajax.nn.models import Model
from metajax.algorithms.pretrain import Batch, Objective, finetune_learner
from metajax.algorithms.protonet import ProtoNet
from metajax.types import ApplyFn, Array, Params, PRNGKey


def two_views(augment: Augment, key: PRNGKey, x: Array) -> tuple[Array, Array]:
  """Two independent augmentations of every image of `x [B, H, W, C]`."""
  key1, key2 = jax.random.split(key)
  return augment_batch(augment, key1, x), augment_batch(augment, key2, x)


def _embed_views(embed_fn: ApplyFn, params: Params, view1: Array,
                 view2: Array) -> tuple[Array, Array]:
  z = embed_fn(params, jnp.concatenate([view1, view2]))  # one batch: (2B)D
  return z[: view1.shape[0]], z[view1.shape[0]:]


def simclr_objective(embed_fn: ApplyFn, augment: Augment, *,
                     temperature: float = 0.5) -> Objective:
  """SimCLR (Chen et al. 2020): `info_nce` between the embeddings of two augmented views.

  `objective(params, (x, y), key) -> (loss, metrics)`; the labels y are ignored (self-supervised).
  Metrics: `outer/positive_cosine`, the mean cosine similarity of the two views.
  """

  def objective(params: Params, batch: Batch, key: PRNGKey) -> tuple[Array, dict[str, Array]]:
    x, _ = batch
    z1, z2 = _embed_views(embed_fn, params, *two_views(augment, key, x))
    loss = contrastive_lib.info_nce(z1, z2, temperature=temperature)
    return loss, {"outer/positive_cosine": _mean_cosine(z1, z2)}

  return objective


def supcon_objective(embed_fn: ApplyFn, augment: Augment, *,
                     temperature: float = 0.1) -> Objective:
  """SupCon (Khosla et al. 2020): `supcon` on both views, every same-class example a positive.

  `objective(params, (x, y), key) -> (loss, metrics)` with y the global class labels (e.g. from
  `metajax.algorithms.pretrain.sample_class_batch`; with `images_per_class >= 2` each example also has
  positives that are other images of its class).
  """

  def objective(params: Params, batch: Batch, key: PRNGKey) -> tuple[Array, dict[str, Array]]:
    x, y = batch
    z1, z2 = _embed_views(embed_fn, params, *two_views(augment, key, x))
    loss = contrastive_lib.supcon(jnp.concatenate([z1, z2]), jnp.concatenate([y, y]),
                                  temperature=temperature)
    return loss, {"outer/positive_cosine": _mean_cosine(z1, z2)}

  return objective


def _mean_cosine(a: Array, b: Array) -> Array:
  eps = jnp.finfo(a.dtype).eps
  norms = jnp.sqrt(jnp.maximum(jnp.sum(a * a, -1), eps) * jnp.maximum(jnp.sum(b * b, -1), eps))
  return jnp.mean(jnp.sum(a * b, -1) / norms)


def prototype_learner(model: Model, ways: int) -> ProtoNet:
  """Few-shot with the frozen pre-trained encoder: nearest class mean of `model.features`."""
  return ProtoNet(model.features, num_classes=ways)


def linear_probe_learner(model: Model, loss: Callable[[Array, Array], Array], *,
                         num_inner_steps: int, inner_lr: float) -> MAML:
  """Few-shot with the frozen pre-trained encoder: a fresh (zero) linear head fitted on each
  support set by `num_inner_steps` steps of gradient descent (`model` has `ways` outputs)."""
  return finetune_learner(model.apply, loss, num_inner_steps=num_inner_steps, inner_lr=inner_lr,
                          head_only=True, fresh_head=True)


__all__ = [
  "linear_probe_learner",
  "prototype_learner",
  "simclr_objective",
  "supcon_objective",
  "two_views",
]
