"""From an experiment config to the objects the loop needs: model, learner, optimiser, task sources.

Everything a config selects by name is looked up in a registry here, so a new algorithm, model or
dataset is one entry, never an `if` in the loop, in `validate_config` or in the data loading:

    ALGORITHMS["reptile"] = Algorithm(
        learner=lambda model, loss, config, num_inner_steps: Reptile(model.apply, loss, ...),
        step=_reptile_step)           # (model, learner, optimizer, config, ...) -> MetaStep
    DATASETS["omniglot"] = DatasetSpec(kind="classification", ..., load=_load_omniglot,
                                       find=_find_omniglot, checks=(_classification_checks, ...))

An `Algorithm` names the learner (used for training and, rebuilt with `eval_num_inner_steps`, for
evaluation), the meta-step (all share `MetaState`, so checkpoints, resuming and the NaN stop are
the loop's, unchanged), and the training data drawn from the train pool (labelled episodes,
UMTRA's unlabelled tasks, or class minibatches for pre-training); evaluation is always on
labelled `ways`-way episodes. A `DatasetSpec` carries its splits and class counts, its loader,
the cheap check that its files are there, its own config checks, and the validation metric that
picks the best checkpoint.

`validate_config` checks a config against the registries *before* any data is loaded or anything
is compiled, and raises one ConfigError that lists every problem.

Configs are data: `experiments/configs/default.py` gives every field of `FIELDS` its default, and
the dataset configs beside it build on that. `config_from_dict` turns a stored config (a
checkpoint's, a run's `config.json`) back into a ConfigDict; fields that configs stored by older
versions lack take the value those runs ran with (`ABSENT`).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib.util
import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import flags

from metajax import data as data_lib
from metajax import losses as losses_lib
from metajax.algorithms import contrastive_pretrain as contrastive_lib
from metajax.algorithms import learned_optimizers as learned_lib
from metajax.algorithms import pretrain as pretrain_lib
from metajax.algorithms import selfsup_pretrain
from metajax.algorithms.imaml import IMAML
from metajax.algorithms.matching import FullContextEmbeddings, MatchingNet
from metajax.algorithms.protonet import ProtoNet
from metajax.algorithms.relation import RelationNet, relation_mse, relation_module
from metajax.algorithms.reptile import Reptile, make_reptile_step
from metajax.algorithms.siamese import SiameseNet
from metajax.data.augment import make_affine_augment
from metajax.data.umtra import make_umtra_sampler
from metajax.meta import (MAML, MetaStep, TaskMap, compile_step, make_meta_step,
                          multi_step_loss_weights, resolve_task_map, with_zeroing)
from metajax.nn import models as models_lib
from metajax.nn import resnet as resnet_lib
from metajax.types import Array, PRNGKey, Task
from metajax.variants import head_mask, norm_mask

Config = ml_collections.ConfigDict | ml_collections.FrozenConfigDict
Learner = MAML  # any object with MAML's interface: init, model_params, adapt, task_loss, ...


class ConfigError(ValueError):
  """An invalid config, or one that does not match the checkpoint it should resume from."""


class UnknownConfigError(flags.Error, LookupError):
  """A config name that its config file does not define. An absl flags error, so that
  `--config=file.py:name` with a typo is one usage error naming the valid names (config_flags
  would wrap a ValueError in a traceback)."""


# ----------------------------------------------------------------------------------- algorithms

def _maml_kwargs(config: Config, num_inner_steps: int) -> dict[str, Any]:
  return {"num_inner_steps": num_inner_steps, "inner_lr": config.inner_lr, "remat": config.remat}


def _learned_optimizer(model: models_lib.Model, loss: losses_lib.Loss, config: Config, k: int, *,
                       kind: str) -> MAML:
  """MAML with a learned inner optimizer (its params drawn from `config.seed`)."""
  optimizer = (learned_lib.meta_lstm(hidden=config.lstm_hidden, inner_lr=config.inner_lr)
               if kind == "meta_lstm" else learned_lib.lstm_optimizer(hidden=config.lstm_hidden))
  return MAML(model.apply, loss, num_inner_steps=k, learned_optimizer=optimizer,
              remat=config.remat, seed=config.seed)


def _mamlpp(model: models_lib.Model, loss: losses_lib.Loss, config: Config, k: int) -> MAML:
  """MAML++ (Antoniou et al. 2019): the options that the `mamlpp_*` fields switch on."""
  epochs, per_epoch = config.mamlpp_msl_epochs, config.mamlpp_epoch_steps
  weights = (multi_step_loss_weights(k, epochs, steps_per_epoch=per_epoch) if epochs else None)
  return MAML(model.apply, loss, step_loss_weights=weights,
              learn_inner_lr="step" if config.mamlpp_step_lrs else None,
              per_step_params=norm_mask if config.mamlpp_step_norm else None,
              first_order_steps=config.mamlpp_first_order_epochs * per_epoch,
              **_maml_kwargs(config, k))


def _imaml(model: models_lib.Model, loss: losses_lib.Loss, config: Config, k: int) -> IMAML:
  """Implicit MAML (Rajeswaran et al. 2019): k gradient steps of inner_lr on the proximally
  regularised support loss (`imaml_lambda`), the meta-gradient by conjugate gradient."""
  return IMAML(model.apply, loss, num_inner_steps=k, inner_lr=config.inner_lr,
               lam=config.imaml_lambda, cg_steps=config.imaml_cg_steps,
               cg_damping=config.imaml_cg_damping)


def train_ways(config: Config) -> int:
  """Ways of the training episodes: `config.train_ways`, or `config.ways` when it is 0."""
  return config.get("train_ways") or config.ways


def _feature_map_shape(model: models_lib.Model, config: Config) -> tuple[int, int, int]:
  """The relation module's view of `model.features`: conv4 flattens `(H/16, W/16, filters)` maps
  row-major; other encoders' features are read as 1x1 maps."""
  h, w = (d // 16 for d in model.input_shape[:2]) if config.model == "conv4" else (1, 1)
  return (h, w, model.feature_dim // (h * w))


def _matching(model: models_lib.Model, loss: losses_lib.Loss, config: Config, k: int, *,
              fce: bool) -> MatchingNet:
  del k
  return MatchingNet(model.features, train_ways(config),
                     temperature=config.matching_temperature,
                     fce=FullContextEmbeddings(model.feature_dim, config.fce_steps) if fce else None,
                     seed=config.seed, loss=loss)


def _relation(model: models_lib.Model, loss: losses_lib.Loss, config: Config,
              k: int) -> RelationNet:
  del loss, k  # the paper's squared error to one-hot, unless `config.loss` names another
  return RelationNet(model.features, train_ways(config),
                     relation=relation_module(_feature_map_shape(model, config)),
                     seed=config.seed,
                     loss=losses_lib.get_loss(config.loss) if config.loss else relation_mse)


def _meta_step(model: models_lib.Model, learner: Learner, optimizer: optax.GradientTransformation,
               config: Config, *, task_map: TaskMap, jit: bool) -> MetaStep:
  del model, config
  return make_meta_step(learner, optimizer, task_map=task_map, jit=jit)


def _reptile_step(model: models_lib.Model, learner: Learner,
                  optimizer: optax.GradientTransformation, config: Config, *, task_map: TaskMap,
                  jit: bool) -> MetaStep:
  del model
  return make_reptile_step(learner, optimizer, serial=bool(config.reptile_serial),
                           task_map=task_map, jit=jit)


# Pre-training objectives: `(model, config) -> objective(params, (x, y), key)`.
def _supervised(model: models_lib.Model, config: Config) -> Callable[..., Array]:
  return pretrain_lib.supervised_objective(model.apply, build_loss(config))


def _simclr(model: models_lib.Model, config: Config) -> Callable[..., Array]:
  del config
  return contrastive_lib.simclr_objective(model.features, make_affine_augment())


def _supcon(model: models_lib.Model, config: Config) -> Callable[..., Array]:
  del config
  return contrastive_lib.supcon_objective(model.features, make_affine_augment())


def _pretrain_step(model: models_lib.Model, learner: Learner,
                   optimizer: optax.GradientTransformation, config: Config, *, task_map: TaskMap,
                   jit: bool, objective: Callable[[models_lib.Model, Config], Any]) -> MetaStep:
  """One optax step of `objective` on a pooled minibatch: the `[meta_batch_size, B, ...]` chunks
  of `_class_batches` are flattened into one batch of `meta_batch_size * B` examples. The
  augmentations of step s come from `fold_in(fold_in(key(seed), 1), s)` (resumable)."""
  del learner, task_map
  loss = objective(model, config)

  def pooled(params, batch, key):
    if isinstance(batch, Task):  # regression tasks: their support and query points, pooled
      return loss(params, pretrain_lib.tasks_to_batch(batch), key)
    x, y = (a.reshape((-1,) + a.shape[2:]) for a in batch)
    return loss(params, (x, y), key)

  key = jax.random.fold_in(jax.random.key(config.seed), 1)
  return pretrain_lib.make_pretrain_step(pooled, optimizer, key=key, jit=jit)


def _episodes(config: Config, images: Array) -> Callable[..., Task]:
  """Labelled `train_ways`-way `shots`-shot episodes of the training classes."""
  return data_lib.make_episode_sampler(images, train_ways(config), config.shots, config.queries)


def _umtra_tasks(config: Config, images: Array) -> Callable[..., Task]:
  """UMTRA's unsupervised tasks, as in the paper: `ways` random images of the pool (labels
  ignored), the support example the image itself, the query example a random affine augmentation
  of it (1 shot, 1 query; `shots` and `queries` apply to the labelled evaluation episodes)."""
  return make_umtra_sampler(images, config.ways, shots=1, queries=1,
                            augment=make_affine_augment())


def _class_batches(config: Config, images: Array) -> Callable[..., Task]:
  """Pre-training data: per key, `ways` classes of the pool with `shots + queries` images each,
  labelled with their global class index (as many examples per step as episodic training)."""
  return pretrain_lib.make_class_batch_sampler(images, classes_per_batch=config.ways,
                                               images_per_class=config.shots + config.queries)


def _pretrained_learner(model: models_lib.Model, loss: losses_lib.Loss, config: Config,
                        num_inner_steps: int, *, default_eval: str) -> Learner:
  """The few-shot learner on top of pre-trained params (`config.pretrain_eval`, else
  `default_eval`): "finetune" all params from a fresh zero `ways`-way head, "linear_probe" (the
  head only), or "prototypes" (nearest class mean of the features). On regression datasets:
  fine-tune every param of the pre-trained network, its head included."""
  if DATASETS[config.dataset].kind == "regression":
    # Finn et al.'s baseline: fine-tune the whole pre-trained network, its output layer included
    # (a regression head has nothing class-specific to reset).
    return pretrain_lib.finetune_learner(model.apply, loss, num_inner_steps=num_inner_steps,
                                         inner_lr=config.inner_lr)
  how = config.pretrain_eval or default_eval
  if how == "prototypes":
    return ProtoNet(model.features, config.ways, loss)
  shape = DATASETS[config.dataset].input_shape(config)
  small = MODELS[config.model].build(config, num_outputs(config), shape)
  head = jax.eval_shape(small.init, jax.random.key(0))["head"]

  def fresh_head(params):
    return pretrain_lib.with_head(params, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                                                       head))

  learner = pretrain_lib.finetune_learner(small.apply, loss, num_inner_steps=num_inner_steps,
                                          inner_lr=config.inner_lr,
                                          head_only=how == "linear_probe")
  return dataclasses.replace(learner, params_transforms=(fresh_head,))


def _pretrain_outputs(config: Config) -> int:
  """A head over all meta-training classes (classification), else the dataset's outputs."""
  if DATASETS[config.dataset].kind == "regression":
    return num_outputs(config)
  return DATASETS[config.dataset].classes(config).get("train", 0)


def _byol_learner(model: models_lib.Model, loss: losses_lib.Loss, config: Config,
                  num_inner_steps: int) -> Learner:
  """The pre-trained learner of `_pretrained_learner` (prototypes by default) on the online
  encoder of BYOL's state params."""
  return selfsup_pretrain.on_online_encoder(
    _pretrained_learner(model, loss, config, num_inner_steps, default_eval="prototypes"))


def _byol_step(model: models_lib.Model, learner: Learner, optimizer: optax.GradientTransformation,
               config: Config, *, task_map: TaskMap, jit: bool) -> MetaStep:
  """BYOL on pooled minibatches (as `_pretrain_step`), its EMA target in the state; the target's
  momentum rises to 1 over `num_steps`."""
  del learner, task_map
  byol = selfsup_pretrain.make_byol_step(
    model.features, model.feature_dim, make_affine_augment(), optimizer,
    total_steps=config.num_steps, key=jax.random.fold_in(jax.random.key(config.seed), 1),
    base_momentum=config.byol_base_momentum,
    **_head_dims(config, selfsup_pretrain.HIDDEN_DIM, selfsup_pretrain.PROJECTION_DIM),
    jit=False)

  def pooled(state, batch):
    x, y = (a.reshape((-1,) + a.shape[2:]) for a in batch)
    return byol.update(state, (x, y))

  return compile_step(byol.init, pooled, jit=jit)


def _head_dims(config: Config, hidden_dim: int, projection_dim: int) -> dict[str, int]:
  """The projector's widths: `selfsup_hidden_dim`, `selfsup_projection_dim`, or (0) the
  algorithm's paper widths given."""
  return {"hidden_dim": config.selfsup_hidden_dim or hidden_dim,
          "projection_dim": config.selfsup_projection_dim or projection_dim}


def _moco(model: models_lib.Model, optimizer: optax.GradientTransformation, config: Config,
          key: Array) -> MetaStep:
  return selfsup_pretrain.make_moco_step(
    model.features, model.feature_dim, make_affine_augment(), optimizer,
    momentum=config.moco_momentum, queue_size=config.moco_queue_size,
    temperature=config.moco_temperature, shuffle_groups=config.moco_shuffle_groups,
    **_head_dims(config, selfsup_pretrain.MOCO_HIDDEN_DIM, selfsup_pretrain.MOCO_PROJECTION_DIM),
    key=key, jit=False)


def _barlow_twins(model: models_lib.Model, optimizer: optax.GradientTransformation,
                  config: Config, key: Array) -> MetaStep:
  return selfsup_pretrain.make_barlow_twins_step(
    model.features, model.feature_dim, make_affine_augment(), optimizer,
    off_diagonal_weight=config.barlow_twins_lambda,
    **_head_dims(config, selfsup_pretrain.BARLOW_TWINS_DIM, selfsup_pretrain.BARLOW_TWINS_DIM),
    key=key, jit=False)


def _swav(model: models_lib.Model, optimizer: optax.GradientTransformation, config: Config,
          key: Array) -> MetaStep:
  return selfsup_pretrain.make_swav_step(
    model.features, model.feature_dim, make_affine_augment(), optimizer,
    num_prototypes=config.swav_num_prototypes, freeze_steps=config.swav_freeze_steps,
    temperature=config.swav_temperature, epsilon=config.swav_epsilon,
    num_iters=config.swav_sinkhorn_iters, num_small_crops=config.swav_small_crops,
    small_crop_augment=make_affine_augment(
      scale_range=selfsup_pretrain.SWAV_SMALL_CROP_SCALE,
      max_translation=selfsup_pretrain.SWAV_SMALL_CROP_TRANSLATION),
    **_head_dims(config, selfsup_pretrain.SWAV_HIDDEN_DIM, selfsup_pretrain.SWAV_PROJECTION_DIM),
    key=key, jit=False)


def _selfsup_step(model: models_lib.Model, learner: Learner,
                  optimizer: optax.GradientTransformation, config: Config, *, task_map: TaskMap,
                  jit: bool, make: Callable[..., MetaStep]) -> MetaStep:
  """A self-supervised step of `selfsup_pretrain` (`make(model, optimizer, config, key)`) on
  pooled minibatches, as `_byol_step`; its augmentations from `fold_in(key(seed), 1)`."""
  del learner, task_map
  inner = make(model, optimizer, config, jax.random.fold_in(jax.random.key(config.seed), 1))

  def pooled(state, batch):
    x, y = (a.reshape((-1,) + a.shape[2:]) for a in batch)
    return inner.update(state, (x, y))

  return compile_step(inner.init, pooled, jit=jit)


KINDS = frozenset({"classification", "regression"})


class Algorithm(NamedTuple):
  """Everything `config.algorithm` selects.

  Attributes:
    learner: `(model, loss, config, num_inner_steps) -> learner` (MAML's interface: `init`,
      `model_params`, `adapt`, `task_loss`); evaluation builds it again with
      `eval_num_inner_steps` (a learner without inner steps ignores the argument).
    step: `(model, learner, optimizer, config, *, task_map, jit) -> MetaStep` (the shared
      `MetaState`).
    train_tasks: `(config, train images [C, M, ...]) -> sample(key, images) -> Task`, the
      training task sampler (evaluation episodes are always labelled `ways`-way episodes).
    kinds: the dataset kinds it works on.
    higher_way: supports `train_ways` different from `ways` (one learner for both).
    outputs: `config -> ` width of the trained model's head (default `num_outputs`).
  """

  learner: Callable[[models_lib.Model, losses_lib.Loss, Config, int], Learner]
  step: Callable[..., MetaStep] = _meta_step
  train_tasks: Callable[[Config, Array], Callable[..., Task]] = _episodes
  kinds: frozenset[str] = KINDS
  higher_way: bool = False
  outputs: Callable[[Config], int] | None = None


_CLASSIFICATION = frozenset({"classification"})

ALGORITHMS: dict[str, Algorithm] = {
  # Finn et al. 2017: exact second-order meta-gradient.
  "maml": Algorithm(lambda model, loss, c, k: MAML(model.apply, loss, **_maml_kwargs(c, k))),
  # First-order MAML: no gradient through the inner gradients.
  "fomaml": Algorithm(lambda model, loss, c, k: MAML(model.apply, loss, first_order=True,
                                                     **_maml_kwargs(c, k))),
  # Raghu et al. 2020: only the head adapts in the inner loop (second-order, it is cheap here).
  "anil": Algorithm(lambda model, loss, c, k: MAML(model.apply, loss, adapt_mask=head_mask,
                                                   **_maml_kwargs(c, k))),
  # Li et al. 2017: one learned inner learning rate per parameter entry, starting at inner_lr.
  "metasgd": Algorithm(lambda model, loss, c, k: MAML(model.apply, loss, learn_inner_lr="element",
                                                      **_maml_kwargs(c, k))),
  # Antoniou et al. 2019: multi-step loss, per-layer per-step inner lrs, per-step BatchNorm
  # weights and biases, derivative-order annealing (the `mamlpp_*` fields).
  "mamlpp": Algorithm(_mamlpp),
  # Ravi & Larochelle 2017: the meta-learner LSTM as the inner optimizer (input gate from
  # inner_lr at the start), learned with the initialisation.
  "meta_lstm": Algorithm(functools.partial(_learned_optimizer, kind="meta_lstm")),
  # Andrychowicz et al. 2016: a coordinate-wise two-layer LSTM optimizer, learned with the
  # initialisation.
  "lstm_optimizer": Algorithm(functools.partial(_learned_optimizer, kind="lstm_optimizer")),
  # Rajeswaran et al. 2019: the implicit meta-gradient of a proximally regularised inner problem
  # (`imaml_lambda`), by conjugate gradient (`imaml_cg_steps`, `imaml_cg_damping`); memory flat in
  # the inner steps.
  "imaml": Algorithm(_imaml),
  # Nichol et al. 2018: k inner SGD steps, the outer optimiser fed theta - theta' (batched, or
  # serial with `reptile_serial`).
  "reptile": Algorithm(lambda model, loss, c, k: Reptile(model.apply, loss, **_maml_kwargs(c, k)),
                       step=_reptile_step),
  # Snell et al. 2017: nearest class mean of `model.features`; the head is unused. Trained on
  # `train_ways`-way episodes ("higher way"), evaluated on `ways`-way ones.
  "protonet": Algorithm(lambda model, loss, c, k: ProtoNet(model.features, train_ways(c), loss),
                        kinds=_CLASSIFICATION, higher_way=True),
  # Vinyals et al. 2016: attention over the support set's cosine similarities (`model.features`;
  # the head is unused); `matching_fce` adds the full-context embeddings. Higher way.
  "matching": Algorithm(functools.partial(_matching, fce=False), kinds=_CLASSIFICATION,
                        higher_way=True),
  "matching_fce": Algorithm(functools.partial(_matching, fce=True), kinds=_CLASSIFICATION,
                            higher_way=True),
  # Sung et al. 2018: a learned relation module on (class map, query map) pairs, MSE to one-hot.
  "relation": Algorithm(_relation, kinds=_CLASSIFICATION, higher_way=True),
  # Koch et al. 2015: weighted-L1 verification on the episode's pairs; one-shot by the most
  # similar support image.
  "siamese": Algorithm(lambda model, loss, c, k: SiameseNet(model.features, train_ways(c),
                                                            feature_dim=model.feature_dim,
                                                            loss=loss),
                       kinds=_CLASSIFICATION, higher_way=True),
  # Khodadadeh et al. 2019: MAML meta-trained on unlabelled tasks of the training pool.
  "umtra": Algorithm(lambda model, loss, c, k: MAML(model.apply, loss, **_maml_kwargs(c, k)),
                     train_tasks=_umtra_tasks, kinds=_CLASSIFICATION),
  # Joint training on all meta-training classes (a head over all of them), then per test task a
  # fresh head fine-tuned on the support set (`pretrain_eval`: finetune, linear_probe, prototypes).
  # On regression datasets (sinusoid) it trains on the pooled points of the sampled tasks and
  # fine-tunes every parameter at test time (Finn et al. 2017's pre-training baseline).
  "pretrain": Algorithm(functools.partial(_pretrained_learner, default_eval="finetune"),
                        step=functools.partial(_pretrain_step, objective=_supervised),
                        train_tasks=_class_batches, outputs=_pretrain_outputs),
  # Chen et al. 2020 / Khosla et al. 2020: contrastive pre-training of the encoder on two affine
  # views, then prototypes (default) or a linear probe.
  "simclr": Algorithm(functools.partial(_pretrained_learner, default_eval="prototypes"),
                      step=functools.partial(_pretrain_step, objective=_simclr),
                      train_tasks=_class_batches, kinds=_CLASSIFICATION),
  "supcon": Algorithm(functools.partial(_pretrained_learner, default_eval="prototypes"),
                      step=functools.partial(_pretrain_step, objective=_supcon),
                      train_tasks=_class_batches, kinds=_CLASSIFICATION),
  # Grill et al. 2020: BYOL (online network with a predictor, EMA target with the cosine
  # momentum schedule, both in the training state), then prototypes (default) or a linear probe.
  "byol": Algorithm(_byol_learner, step=_byol_step, train_tasks=_class_batches,
                    kinds=_CLASSIFICATION),
  # He et al. 2020 / Chen et al. 2020: MoCo v2 (momentum key network, queue of negatives in the
  # training state, InfoNCE); Zbontar et al. 2021: Barlow Twins (cross-correlation to the
  # identity); Caron et al. 2020: SwAV (swapped prediction of Sinkhorn codes of learned
  # prototypes). Then prototypes (default) or a linear probe on the online encoder.
  "moco": Algorithm(_byol_learner, step=functools.partial(_selfsup_step, make=_moco),
                    train_tasks=_class_batches, kinds=_CLASSIFICATION),
  "barlow_twins": Algorithm(_byol_learner,
                            step=functools.partial(_selfsup_step, make=_barlow_twins),
                            train_tasks=_class_batches, kinds=_CLASSIFICATION),
  "swav": Algorithm(_byol_learner, step=functools.partial(_selfsup_step, make=_swav),
                    train_tasks=_class_batches, kinds=_CLASSIFICATION),
}

PRETRAIN_EVALS = ("finetune", "linear_probe", "prototypes")


def reads_pretrain_eval(algorithm: str) -> bool:
  """Whether `algorithm` pre-trains an encoder on class batches and is then evaluated the way
  `config.pretrain_eval` says (every other algorithm ignores the field)."""
  spec = ALGORITHMS.get(algorithm)
  return spec is not None and spec.train_tasks is _class_batches


# ------------------------------------------------------------------------------ models, optimisers

class ModelSpec(NamedTuple):
  """What `config.model` selects: `build(config, num_outputs, input_shape) -> Model`, the
  dataset kinds whose inputs it takes, and its own config checks (`config -> problems`, run by
  `validate_config`)."""

  build: Callable[[Config, int, tuple[int, ...]], models_lib.Model]
  kinds: frozenset[str]
  checks: tuple[Callable[[Config], list[str]], ...] = ()


def _widths_checks(config: Config) -> list[str]:
  widths = config.get("widths")
  ok = (isinstance(widths, (tuple, list)) and len(widths) == 4
        and all(_is_int(w) and w >= 1 for w in widths))
  return [] if ok else [f"widths={widths!r} must be 4 positive ints, the channels of "
                        "ResNet-12's blocks (e.g. (64, 160, 320, 640))"]


MODELS: dict[str, ModelSpec] = {
  "conv4": ModelSpec(lambda c, n, shape: models_lib.conv4(n, filters=c.filters, input_shape=shape),
                     _CLASSIFICATION),
  "kao_conv": ModelSpec(lambda c, n, shape: models_lib.kao_conv(n, filters=c.filters,
                                                                input_shape=shape),
                        _CLASSIFICATION),
  "mlp": ModelSpec(lambda c, n, shape: models_lib.mlp(n, hidden=tuple(c.hidden),
                                                      input_shape=shape),
                   frozenset({"regression"})),
  # MetaOptNet's / learn2learn's ResNet-12, `widths` the channels of its four blocks.
  "resnet12": ModelSpec(lambda c, n, shape: resnet_lib.resnet12(n, widths=tuple(c.widths),
                                                                input_shape=shape),
                        _CLASSIFICATION, checks=(_widths_checks,)),
}

OPTIMIZERS: dict[str, Callable[[float], optax.GradientTransformation]] = {
  "adam": optax.adam,
  "sgd": optax.sgd,
}


# ------------------------------------------------------------------------------------- datasets

class TaskSource(NamedTuple):
  """Tasks of one split as a pure function of a key.

  Attributes:
    sample: `sample(key, *arrays) -> Task` (jittable, vmappable over keys).
    arrays: device-resident arguments of `sample` (the image pool), passed by reference.
    num_classes: classes in the split (0 for synthetic tasks).
  """

  sample: Callable[..., Task]
  arrays: tuple[Array, ...]
  num_classes: int


Problems = list[str]


class DatasetSpec(NamedTuple):
  """Everything `config.dataset` selects.

  Attributes:
    kind: "classification" or "regression" (one of `KINDS`).
    images_per_class: M, or None for synthetic tasks.
    classes: `config -> {split: number of classes}`, its splits (empty: synthetic tasks, any
      split name works).
    input_shape: `config -> ` the shape of one example.
    default_loss: the loss used when `config.loss` is empty.
    load: `(config, splits) -> {split: TaskSource}`, pools put on device once.
    find: `config -> None`, raising FileNotFoundError (with what to do) when the files are not
      there; cheap, run before anything is compiled. None: nothing to find.
    checks: `(config, spec) -> problems` run by `validate_config`.
    best: `(metric, mode)` of the evaluation that picks the best checkpoint ("max" or "min").
    dark_background: images are light strokes on black (user images are inverted to match).
  """

  kind: str
  images_per_class: int | None
  classes: Callable[[Config], Mapping[str, int]]
  input_shape: Callable[[Config], tuple[int, ...]]
  default_loss: str
  load: Callable[[Config, tuple[str, ...]], dict[str, TaskSource]]
  find: Callable[[Config], None] | None = None
  checks: tuple[Callable[[Config, DatasetSpec], Problems], ...] = ()
  best: tuple[str, str] = ("accuracy_after", "max")
  dark_background: bool = False


def _episode_sources(config: Config, pools: Mapping[str, data_lib.ClassPool],
                     splits: tuple[str, ...]) -> dict[str, TaskSource]:
  """Labelled `ways`-way episodes of each split's pool; images stay uint8 on device (4x smaller
  than float32), the samplers scale them to [0, 1]."""
  sources = {}
  for split in splits:
    if split not in pools:
      raise ValueError(f"{config.dataset} has no split {split!r}; it has {', '.join(pools)}")
    sample = data_lib.make_episode_sampler(pools[split], config.ways, config.shots, config.queries)
    sources[split] = TaskSource(sample, (jnp.asarray(pools[split].images),),
                                pools[split].num_classes)
  return sources


_OMNIGLOT_CLASSES = {"finn": {"train": 1100, "val": 100, "test": 423},
                     "kao": {"train": 1200, "test": 423},
                     "lake": {"train": 964, "test": 659}}


def _omniglot_rotations(config: Config) -> bool:
  return config.split == "finn" if config.rotations is None else bool(config.rotations)


def _omniglot_classes(config: Config) -> dict[str, int]:
  counts = dict(_OMNIGLOT_CLASSES.get(config.split, {}))
  if _omniglot_rotations(config) and "train" in counts:
    counts["train"] *= 4
  return counts


def _load_omniglot(config: Config, splits: tuple[str, ...]) -> dict[str, TaskSource]:
  pool = data_lib.load_omniglot(config.data_dir or None, cache_dir=config.cache_dir or None,
                                image_size=config.image_size, dtype=np.uint8,
                                download=bool(config.get("download", False)))
  try:
    pools = data_lib.omniglot_split(pool, config.split, rotations=_omniglot_rotations(config))
  except ValueError as e:  # e.g. alphabets of one's own in Omniglot's layout: not the 1623
    where = data_lib.find_omniglot_dir(config.data_dir or None)
    raise ConfigError(f"split={config.split!r} cannot split the Omniglot data in {str(where)!r} "
                      f"({pool.num_classes} characters): {e}; pass --config.data_dir=<a folder "
                      f"with the published archives>") from None
  return _episode_sources(config, pools, splits)


def _find_omniglot(config: Config) -> None:
  if not config.get("download", False):  # otherwise the loader fetches what is missing
    data_lib.find_omniglot_dir(config.data_dir or None)


def _load_miniimagenet(config: Config, splits: tuple[str, ...]) -> dict[str, TaskSource]:
  pools = {split: data_lib.load_miniimagenet(config.data_dir or None, split,
                                             image_size=config.image_size,
                                             cache_dir=config.cache_dir or None)
           for split in sorted(set(splits))}
  return _episode_sources(config, pools, splits)


def _load_sinusoid(config: Config, splits: tuple[str, ...]) -> dict[str, TaskSource]:
  sample = data_lib.make_sinusoid_sampler(config.shots, config.queries)
  return {split: TaskSource(sample, (), 0) for split in splits}


def _is_int(value: Any) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _int_at_least(config: Config, field: str, minimum: int) -> Problems:
  value = config.get(field)
  return [] if _is_int(value) and value >= minimum else [
    f"{field}={value!r} must be an int >= {minimum}"]


def _classification_checks(config: Config, spec: DatasetSpec) -> Problems:
  """Episodes that fit the dataset: enough images per class, and classes per split."""
  problems = _int_at_least(config, "ways", 2)
  ways_ok = not problems
  m = spec.images_per_class
  counts = _is_int(config.get("shots")) and _is_int(config.get("queries")) and m is not None
  if counts and config.shots + config.queries > m:
    problems.append(f"shots + queries = {config.shots} + {config.queries} is more than the {m} "
                      f"images per class of {config.dataset}")
  classes = spec.classes(config)
  if not classes:
    return problems
  if ways_ok:
    for split in ("train", config.get("eval_split"), "test"):
      if split in classes and config.ways > classes[split]:
        problems.append(f"ways={config.ways} is more than the {classes[split]} classes of the "
                        f"{config.dataset} {split!r} split")
    train_ways_ok = "train" in classes and _is_int(config.get("train_ways"))
    if train_ways_ok and config.train_ways > classes["train"]:
      problems.append(f"train_ways={config.train_ways} is more than the {classes['train']} "
                      f"classes of the {config.dataset} 'train' split")
  if config.get("eval_split") not in classes:
    problems.append(f"eval_split={config.get('eval_split')!r} is not a split of {config.dataset} "
                    f"(split {config.get('split')!r}): {', '.join(classes)}")
  return problems


def _omniglot_checks(config: Config, spec: DatasetSpec) -> Problems:
  del spec
  split = config.get("split")
  return [] if split in _OMNIGLOT_CLASSES else [
    f"split={split!r} is not one of {', '.join(sorted(_OMNIGLOT_CLASSES))}"]


def _no_download(config: Config, spec: DatasetSpec) -> Problems:
  del spec
  return [f"download=True: metajax does not download {config.dataset}; pass data_dir"] if (
    config.get("download")) else []


DATASETS: dict[str, DatasetSpec] = {
  "omniglot": DatasetSpec("classification", 20, _omniglot_classes,
                          lambda c: (c.image_size, c.image_size, 1), "cross_entropy",
                          load=_load_omniglot, find=_find_omniglot,
                          checks=(_omniglot_checks, _classification_checks),
                          dark_background=True),
  "miniimagenet": DatasetSpec("classification", 600,
                              lambda c: {"train": 64, "val": 16, "test": 20},
                              lambda c: (c.image_size, c.image_size, 3), "cross_entropy",
                              load=_load_miniimagenet,
                              find=lambda c: data_lib.find_miniimagenet_dir(c.data_dir or None),
                              checks=(_classification_checks, _no_download)),
  "sinusoid": DatasetSpec("regression", None, lambda c: {}, lambda c: (1,), "mse",
                          load=_load_sinusoid, best=("loss_after", "min")),
}


# --------------------------------------------------------------------------------------- config

# Every field a run reads; `experiments/configs/default.py` gives each its default and meaning.
FIELDS = frozenset({
  # data
  "dataset", "data_dir", "cache_dir", "download", "split", "rotations", "image_size",
  # model
  "model", "filters", "hidden", "widths",
  # algorithm
  "algorithm", "reptile_serial", "pretrain_eval", "zeroing", "loss", "matching_temperature",
  "fce_steps",
  # episodes and optimisation
  "ways", "train_ways", "shots", "queries", "meta_batch_size", "num_inner_steps",
  "eval_num_inner_steps", "inner_lr", "meta_lr", "optimizer",
  # schedule, evaluation, logging
  "num_steps", "eval_every", "eval_split", "eval_num_tasks", "test_num_tasks", "eval_batch_size",
  "eval_seed", "log_every", "checkpoint_every", "keep_checkpoints", "seed",
  # execution
  "task_map", "remat", "steps_per_call", "devices",
  # the meta learning rate's schedule; MAML++'s options
  "meta_lr_schedule", "min_meta_lr", "mamlpp_msl_epochs", "mamlpp_epoch_steps",
  "mamlpp_first_order_epochs", "mamlpp_step_lrs", "mamlpp_step_norm",
  # the learned inner optimizers
  "lstm_hidden",
  # implicit MAML's options
  "imaml_lambda", "imaml_cg_steps", "imaml_cg_damping",
  # the self-supervised pre-training objectives' options
  "byol_base_momentum", "moco_momentum", "moco_queue_size", "moco_temperature",
  "moco_shuffle_groups", "barlow_twins_lambda", "swav_num_prototypes", "swav_temperature",
  "swav_epsilon", "swav_sinkhorn_iters", "swav_freeze_steps", "swav_small_crops",
  "selfsup_hidden_dim", "selfsup_projection_dim",
  # divergence
  "divergence_loss_ratio", "divergence_grad_norm", "on_divergence",
})

# The self-supervised objectives' fields, their defaults (the papers'; 0 widths: the algorithm's
# own) and the algorithms that read them.
SELFSUP_DEFAULTS: Mapping[str, Any] = {
  "byol_base_momentum": 0.996, "moco_momentum": 0.999, "moco_queue_size": 65536,
  "moco_temperature": 0.2, "moco_shuffle_groups": 1, "barlow_twins_lambda": 5e-3,
  "swav_num_prototypes": 3000, "swav_temperature": 0.1, "swav_epsilon": 0.05,
  "swav_sinkhorn_iters": 3, "swav_freeze_steps": 313, "swav_small_crops": 0,
  "selfsup_hidden_dim": 0, "selfsup_projection_dim": 0}
SELFSUP_ALGORITHMS = ("byol", "moco", "barlow_twins", "swav")

# Fields that configs stored by older versions lack, with the value those runs ran with (one
# outer step per compiled call; no download; one device; the metric learners' and ResNet-12's
# defaults, unused before them).
ABSENT: Mapping[str, Any] = {"steps_per_call": 1, "download": False, "devices": "1",
                             "matching_temperature": 1.0, "fce_steps": 1,
                             "widths": resnet_lib.DEFAULT_WIDTHS,
                             "meta_lr_schedule": "constant", "min_meta_lr": 0.0,
                             "mamlpp_msl_epochs": 10, "mamlpp_epoch_steps": 500,
                             "mamlpp_first_order_epochs": 0, "mamlpp_step_lrs": True,
                             "mamlpp_step_norm": True, "lstm_hidden": 20,
                             "imaml_lambda": 1.0, "imaml_cg_steps": 5, "imaml_cg_damping": 0.0,
                             **SELFSUP_DEFAULTS,
                             "divergence_loss_ratio": 0.0, "divergence_grad_norm": 0.0,
                             "on_divergence": "warn"}

# Fields that may differ between a checkpoint's config and the config of a run resuming from it:
# schedule, logging, evaluation and where the data lives. Every other field defines the run.
RESUMABLE_FIELDS = frozenset({
  "num_steps", "eval_every", "eval_split", "eval_num_tasks", "test_num_tasks", "eval_batch_size",
  "eval_num_inner_steps", "eval_seed", "log_every", "checkpoint_every", "keep_checkpoints",
  "data_dir", "cache_dir", "download", "task_map", "remat", "steps_per_call", "devices",
  "divergence_loss_ratio", "divergence_grad_norm", "on_divergence",
})

# Fields that may differ on resume when the run is told so (`train.py --allow_config_change=...`;
# the change is recorded in the workdir's `config_history.jsonl`): the learning rates (meta_lr is
# the cosine schedule's peak, min_meta_lr its floor). The training state does not depend on them
# (optax's adam and sgd, and the schedule's step count, keep no learning rate in theirs).
CHANGEABLE_FIELDS = frozenset({"meta_lr", "min_meta_lr", "inner_lr"})


def config_to_dict(config: Config | Mapping[str, Any]) -> dict[str, Any]:
  """A config as plain JSON values (tuples become lists), for storage and comparison."""
  if hasattr(config, "to_json"):
    return json.loads(config.to_json())
  return json.loads(json.dumps(dict(config)))


def config_from_dict(values: Config | Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A ConfigDict of every field in `FIELDS` from a config or its stored dict.

  Stored lists of `hidden` and `widths` become tuples again; the fields of `ABSENT` that `values`
  lacks take their `ABSENT` value.

  Raises:
    ConfigError: fields that are not in `FIELDS` (e.g. a misspelt name), or missing ones.
  """
  values = dict(values.to_dict() if hasattr(values, "to_dict") else values)
  unknown = sorted(set(values) - FIELDS)
  if unknown:
    raise ConfigError(f"unknown config fields {unknown}; the fields are {sorted(FIELDS)}")
  missing = sorted(FIELDS - set(values) - set(ABSENT))
  if missing:
    raise ConfigError(f"the config lacks the fields {missing}: start from "
                      "experiments/configs/default.py (or a dataset config beside it)")
  values = {**ABSENT, **values}
  for field in ("hidden", "widths"):
    if isinstance(values[field], list):
      values[field] = tuple(values[field])
  return ml_collections.ConfigDict(values)


def config_diff(saved: Mapping[str, Any], current: Mapping[str, Any],
                ignore: frozenset[str] = RESUMABLE_FIELDS) -> list[str]:
  """Fields (other than `ignore`) whose values differ between two configs as plain dicts."""
  keys = sorted((set(saved) | set(current)) - ignore)
  return [f"{k}: {saved.get(k, '<missing>')!r} in the checkpoint, {current.get(k, '<missing>')!r} "
          "now" for k in keys if saved.get(k, "<missing>") != current.get(k, "<missing>")]


def get_variant(variants: Mapping[str, Callable[[], Config]], name: str, where: str) -> Config:
  """`variants[name]()`, the named config of a config file.

  Raises:
    UnknownConfigError: `name` is not in `variants` (listing the valid names and the closest).
  """
  if name not in variants:
    close = difflib.get_close_matches(name, list(variants), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise UnknownConfigError(f"{where} has no config {name!r}{hint}; its configs are: "
                      + ", ".join(variants))
  return variants[name]()


def load_config_file(spec: str | os.PathLike[str]) -> ml_collections.ConfigDict:
  """The config of `path` or `path:variant`, as `--config=path[:variant]` gives it (no overrides).

  Config files are not a package: this loads one by its path (dataset configs load
  `default.py` so, notebooks and tests their configs).
  """
  spec = str(spec)
  path, variant = spec, None
  if ":" in spec and not spec.endswith(".py"):
    path, variant = spec.rsplit(":", 1)
  path = Path(path)
  module_spec = importlib.util.spec_from_file_location(
    f"metajax_config_{path.stem}_{abs(hash(str(path.resolve())))}", path)
  if module_spec is None or not path.is_file():
    raise FileNotFoundError(f"no config file {str(path)!r}")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config() if variant is None else module.get_config(variant)


# --------------------------------------------------------------------------------------- checks

def parse_task_map(value: Any) -> TaskMap:
  """"auto", "vmap", "map", or a positive int (also given as a string, e.g. "8" from the command
  line)."""
  if _is_int(value) and value >= 1:
    return int(value)
  if isinstance(value, str):
    if value in ("auto", "vmap", "map"):
      return value
    if value.isdigit() and int(value) >= 1:
      return int(value)
  raise ValueError(f"task_map must be 'auto', 'vmap', 'map' or a positive int, got {value!r}")


def parse_devices(value: Any) -> int | None:
  """`config.devices`: "all" (None: every local device) or how many of them, as a string
  (`--config.devices=4`) or an int."""
  text = str(value).strip().lower()
  if text == "all":
    return None
  if not text.isdigit() or int(text) < 1 or isinstance(value, bool):
    raise ValueError(f"devices={value!r}: devices must be 'all' or a positive integer (how many "
                     f"of this process's devices share the meta-batch)")
  return int(text)


# What a finite divergence (`divergence_loss_ratio`, `divergence_grad_norm`) does to the run.
DIVERGENCE_ACTIONS = ("warn", "stop")


META_LR_SCHEDULES = ("constant", "cosine")


def _mamlpp_problems(config: Config) -> Problems:
  """The `mamlpp_*` fields: in range, and left at their defaults unless algorithm="mamlpp"."""
  problems = (_int_at_least(config, "mamlpp_msl_epochs", 0)
              + _int_at_least(config, "mamlpp_epoch_steps", 1)
              + _int_at_least(config, "mamlpp_first_order_epochs", 0))
  for field in ("mamlpp_step_lrs", "mamlpp_step_norm"):
    if not isinstance(config.get(field), bool):
      problems.append(f"{field}={config.get(field)!r} must be True or False")
  if config.get("algorithm") != "mamlpp":
    changed = sorted(f for f in ("mamlpp_msl_epochs", "mamlpp_epoch_steps",
                                 "mamlpp_first_order_epochs", "mamlpp_step_lrs",
                                 "mamlpp_step_norm") if config.get(f) != ABSENT[f])
    if changed:
      problems.append(f"{', '.join(changed)} only apply to algorithm='mamlpp', not "
                      f"algorithm={config.get('algorithm')!r}")
  elif config.get("mamlpp_step_norm") is True and config.get("model") == "mlp":
    problems.append("mamlpp_step_norm=True needs a model with BatchNorm (conv4, kao_conv, "
                    "resnet12), not model='mlp'; pass --config.mamlpp_step_norm=False")
  return problems


def _imaml_problems(config: Config) -> Problems:
  """The `imaml_*` fields: in range, and left at their defaults unless algorithm="imaml"."""
  problems = _int_at_least(config, "imaml_cg_steps", 1)
  lam, damping = config.get("imaml_lambda"), config.get("imaml_cg_damping")
  if not (isinstance(lam, (int, float)) and not isinstance(lam, bool) and lam > 0):
    problems.append(f"imaml_lambda={lam!r} must be a number > 0")
  if not (isinstance(damping, (int, float)) and not isinstance(damping, bool) and damping >= 0):
    problems.append(f"imaml_cg_damping={damping!r} must be a number >= 0")
  fields = ("imaml_lambda", "imaml_cg_steps", "imaml_cg_damping")
  changed = sorted(f for f in fields if config.get(f) != ABSENT[f])
  if config.get("algorithm") != "imaml" and changed:
    problems.append(f"{', '.join(changed)} only apply to algorithm='imaml', not "
                    f"algorithm={config.get('algorithm')!r}")
  return problems


def _selfsup_problems(config: Config) -> Problems:
  """The self-supervised objectives' fields: in range, and left at their defaults unless the
  algorithm reads them (`byol_*` byol, `moco_*` moco, ..., `selfsup_*` all four)."""
  problems: Problems = []

  def number(field: str, low: float, high: float | None = None, *, open_low: bool) -> None:
    value = config.get(field)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
      value > low if open_low else value >= low) and (high is None or value <= high)
    if not ok:
      bound = f"in [{low}, {high}]" if high is not None else f"{'>' if open_low else '>='} {low}"
      problems.append(f"{field}={value!r} must be a number {bound}")

  number("byol_base_momentum", 0.0, 1.0, open_low=False)
  number("moco_momentum", 0.0, 1.0, open_low=False)
  number("moco_temperature", 0.0, open_low=True)
  number("barlow_twins_lambda", 0.0, open_low=False)
  number("swav_temperature", 0.0, open_low=True)
  number("swav_epsilon", 0.0, open_low=True)
  problems += (_int_at_least(config, "moco_queue_size", 1)
               + _int_at_least(config, "moco_shuffle_groups", 1)
               + _int_at_least(config, "swav_num_prototypes", 1)
               + _int_at_least(config, "swav_sinkhorn_iters", 1)
               + _int_at_least(config, "swav_freeze_steps", 0)
               + _int_at_least(config, "swav_small_crops", 0)
               + _int_at_least(config, "selfsup_hidden_dim", 0)
               + _int_at_least(config, "selfsup_projection_dim", 0))
  algorithm = config.get("algorithm")
  for prefix, owners in (("byol_", ("byol",)), ("moco_", ("moco",)),
                         ("barlow_twins_", ("barlow_twins",)), ("swav_", ("swav",)),
                         ("selfsup_", SELFSUP_ALGORITHMS)):
    changed = sorted(f for f in SELFSUP_DEFAULTS if f.startswith(prefix)
                     and config.get(f) != SELFSUP_DEFAULTS[f])
    if changed and algorithm not in owners:
      problems.append(f"{', '.join(changed)} only apply to algorithm="
                      f"{' or '.join(repr(a) for a in owners)}, not algorithm={algorithm!r}")
  size = config.get("moco_queue_size")
  counts = [config.get(f) for f in ("meta_batch_size", "ways", "shots", "queries")]
  if algorithm == "moco" and _is_int(size) and all(_is_int(c) for c in counts):
    batch = counts[0] * counts[1] * (counts[2] + counts[3])
    if size < batch:
      problems.append(f"moco_queue_size={size} is less than the {batch} keys each step enqueues "
                      "(meta_batch_size * ways * (shots + queries))")
    groups = config.get("moco_shuffle_groups")
    if _is_int(groups) and groups >= 1 and batch % groups:
      problems.append(f"moco_shuffle_groups={groups} must divide the {batch} images of each view "
                      "(meta_batch_size * ways * (shots + queries))")
  return problems


def validate_config(config: Config) -> None:
  """Checks a config before anything is loaded or compiled.

  Raises:
    ConfigError (a ValueError): listing every problem found (unknown names, counts out of range,
      episodes that do not fit the dataset, inconsistent evaluation settings).
  """
  problems: Problems = []

  def need(ok: bool, message: str) -> None:
    if not ok:
      problems.append(message)

  def choice(field: str, options: Mapping[str, Any]) -> bool:
    value = config.get(field)
    ok = value in options
    need(ok, f"{field}={value!r} is not one of {', '.join(sorted(options))}")
    return ok

  def positive(field: str) -> None:
    value = config.get(field)
    need(isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0,
         f"{field}={value!r} must be a positive number")

  have_dataset = choice("dataset", DATASETS)
  have_algorithm = choice("algorithm", ALGORITHMS)
  have_model = choice("model", MODELS)
  choice("optimizer", OPTIMIZERS)
  for field in ("zeroing", "reptile_serial", "download"):
    need(isinstance(config.get(field), bool), f"{field}={config.get(field)!r} must be True or "
         "False")
  train_ways_problems = _int_at_least(config, "train_ways", 0)
  problems += train_ways_problems
  if not train_ways_problems and config.train_ways and have_algorithm:
    algorithm = ALGORITHMS[config.algorithm]
    need(algorithm.higher_way or config.train_ways == config.get("ways"),
         f"train_ways={config.train_ways} differs from ways={config.get('ways')!r}, which "
         f"algorithm={config.algorithm!r} does not support ("
         f"{', '.join(n for n, a in ALGORITHMS.items() if a.higher_way)} do; 0 means ways)")
    need(not _is_int(config.get("ways")) or config.train_ways >= config.ways,
         f"train_ways={config.train_ways} is less than ways={config.ways}")
  if config.get("loss"):
    choice("loss", losses_lib.LOSSES)
  if config.get("pretrain_eval"):
    choice("pretrain_eval", dict.fromkeys(PRETRAIN_EVALS))
  for field in ("shots", "queries", "meta_batch_size", "num_inner_steps", "eval_num_inner_steps",
                "eval_num_tasks", "eval_batch_size", "log_every",
                "checkpoint_every", "keep_checkpoints", "filters", "steps_per_call", "fce_steps"):
    problems += _int_at_least(config, field, 1)
  for field in ("num_steps", "eval_every", "seed", "eval_seed", "test_num_tasks"):
    problems += _int_at_least(config, field, 0)
  positive("inner_lr")
  positive("meta_lr")
  positive("matching_temperature")
  need(config.get("meta_lr_schedule") in META_LR_SCHEDULES,
       f"meta_lr_schedule={config.get('meta_lr_schedule')!r} is not one of "
       + ", ".join(META_LR_SCHEDULES))
  min_lr, meta_lr = config.get("min_meta_lr"), config.get("meta_lr")
  need(isinstance(min_lr, (int, float)) and not isinstance(min_lr, bool)
       and (0 <= min_lr <= meta_lr if isinstance(meta_lr, (int, float)) else min_lr >= 0),
       f"min_meta_lr={min_lr!r} must be a number in [0, meta_lr={meta_lr!r}]")
  problems += _mamlpp_problems(config)
  problems += _imaml_problems(config)
  problems += _selfsup_problems(config)
  problems += _int_at_least(config, "lstm_hidden", 1)
  if config.get("algorithm") == "meta_lstm":
    need(not isinstance(meta_lr, bool) and isinstance(config.get("inner_lr"), (int, float))
         and 0 < config.inner_lr < 1, f"inner_lr={config.get('inner_lr')!r}: meta_lstm starts "
         "its input gate (a sigmoid) at inner_lr, which must be in (0, 1)")
  for field in ("divergence_loss_ratio", "divergence_grad_norm"):
    value = config.get(field)
    need(isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0,
         f"{field}={value!r} must be a number >= 0 (0: no bound)")
  need(config.get("on_divergence") in DIVERGENCE_ACTIONS,
       f"on_divergence={config.get('on_divergence')!r} is not one of "
       + ", ".join(DIVERGENCE_ACTIONS))
  try:
    parse_task_map(config.get("task_map"))
  except ValueError as e:
    problems.append(str(e))
  try:
    parse_devices(config.get("devices", "all"))
  except ValueError as e:
    problems.append(str(e))
  if have_model:
    for model_check in MODELS[config.model].checks:
      problems += model_check(config)
  if have_dataset:
    spec = DATASETS[config.dataset]
    if have_model:
      need(spec.kind in MODELS[config.model].kinds,
           f"model={config.model!r} is not for {spec.kind}; {config.dataset} needs "
           + " or ".join(sorted(m for m, s in MODELS.items() if spec.kind in s.kinds)))
    if have_algorithm:
      kinds = ALGORITHMS[config.algorithm].kinds
      need(spec.kind in kinds, f"algorithm={config.algorithm!r} needs a "
           f"{' or '.join(sorted(kinds))} dataset, not {config.dataset}")
    for check in spec.checks:
      problems += check(config, spec)
  if problems:
    raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))


def check_data(config: Config) -> None:
  """Checks that the dataset's files are there (cheap; before anything is compiled).

  Raises:
    FileNotFoundError: naming the directory and the flag or environment variable to set.
  """
  find = DATASETS[config.dataset].find
  if find is None:
    return
  try:
    find(config)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"{e} (binaries: --config.data_dir=...)") from None


# --------------------------------------------------------------------------------------- builders

def num_outputs(config: Config) -> int:
  """Width of the model's head: `ways` for classification, 1 for regression."""
  return config.ways if DATASETS[config.dataset].kind == "classification" else 1


def build_model(config: Config) -> models_lib.Model:
  """The model of `config.model` with `num_outputs(config)` outputs (or the algorithm's)."""
  shape = DATASETS[config.dataset].input_shape(config)
  outputs = ALGORITHMS[config.algorithm].outputs or num_outputs
  return MODELS[config.model].build(config, outputs(config), shape)


def build_loss(config: Config) -> losses_lib.Loss:
  return losses_lib.get_loss(config.get("loss") or DATASETS[config.dataset].default_loss)


def build_learner(config: Config, model: models_lib.Model, *,
                  num_inner_steps: int | None = None) -> Learner:
  """The learner of `config.algorithm` (with the zeroing trick if `config.zeroing`).

  Args:
    config: the experiment config.
    model: from `build_model(config)`.
    num_inner_steps: overrides `config.num_inner_steps` (e.g. `eval_num_inner_steps`).
  """
  steps = config.num_inner_steps if num_inner_steps is None else int(num_inner_steps)
  learner = ALGORITHMS[config.algorithm].learner(model, build_loss(config), config, steps)
  if config.zeroing:
    learner = with_zeroing(learner)
  return learner


def meta_lr_schedule(config: Config) -> float | optax.Schedule:
  """`meta_lr`, or with `meta_lr_schedule="cosine"` a cosine decay from it to `min_meta_lr` over
  `num_steps` outer steps (MAML++'s annealing, per step rather than per epoch)."""
  if config.meta_lr_schedule == "constant":
    return config.meta_lr
  return optax.cosine_decay_schedule(config.meta_lr, max(config.num_steps, 1),
                                     alpha=config.min_meta_lr / config.meta_lr)


def build_optimizer(config: Config) -> optax.GradientTransformation:
  return OPTIMIZERS[config.optimizer](meta_lr_schedule(config))


def build_meta_step(config: Config, model: models_lib.Model, learner: Learner, *,
                    jit: bool = True, sharded: bool = False) -> MetaStep:
  """The outer update of `config.algorithm` (all share `MetaState`, so checkpoints fit).

  `sharded`: the tasks will be split over devices, so `task_map="auto"` is "vmap"
  (`resolve_task_map`); otherwise "auto" is left to the meta-step.
  """
  task_map = parse_task_map(config.task_map)
  if sharded:
    task_map = resolve_task_map(task_map, sharded=True)
  return ALGORITHMS[config.algorithm].step(model, learner, build_optimizer(config), config,
                                           task_map=task_map, jit=jit)


def load_task_sources(config: Config, splits: tuple[str, ...]) -> dict[str, TaskSource]:
  """Loads the dataset and returns one `TaskSource` per split (pools put on device once)."""
  return DATASETS[config.dataset].load(config, splits)


def train_task_source(config: Config, source: TaskSource) -> TaskSource:
  """The training tasks of `config.algorithm`, drawn from the pool of `source` (the train split's
  labelled source from `load_task_sources`); synthetic sources are returned unchanged."""
  if not source.arrays:
    return source
  return source._replace(sample=ALGORITHMS[config.algorithm].train_tasks(config,
                                                                         source.arrays[0]))


def sample_tasks(source: TaskSource, keys: PRNGKey) -> Task:
  """One task per key (`keys` is `[num_tasks]`): `vmap(sample)` with the pool unbatched."""
  return jax.vmap(source.sample, in_axes=(0,) + (None,) * len(source.arrays))(keys, *source.arrays)
