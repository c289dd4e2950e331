"""From an experiment config to the objects the loop needs: model, learner, optimiser, task sources.

Everything a config selects by name is looked up in a registry here, so a new algorithm, model or
dataset is one entry, never an `if` in the loop:

    ALGORITHMS["reptile"] = Algorithm(
        learner=lambda model, loss, config, num_inner_steps: Reptile(model.apply, loss, ...),
        step=_reptile_step)           # (model, learner, optimizer, config, ...) -> MetaStep

An `Algorithm` names the learner (used for training and, rebuilt with `eval_num_inner_steps`, for
evaluation), the meta-step (all share `MetaState`, so checkpoints, resuming and the NaN stop are
the loop's, unchanged), and the training data drawn from the train pool (labelled episodes,
UMTRA's unlabelled tasks, or class minibatches for pre-training); evaluation is always on
labelled `ways`-way episodes.

`validate_config` checks a config against what is known about each dataset *before* any data is
loaded or anything is compiled, and raises one ValueError that lists every problem.

The config fields (see `experiments/configs/omniglot.py` for their defaults and meaning):
  dataset, data_dir, cache_dir, split, rotations, model, filters, hidden, algorithm, zeroing, loss,
  reptile_serial, pretrain_eval, ways, train_ways, shots, queries, meta_batch_size, num_inner_steps, eval_num_inner_steps, inner_lr, meta_lr,
  optimizer, num_steps, eval_every, eval_split, eval_num_tasks, test_num_tasks, eval_batch_size,
  eval_seed, log_every, checkpoint_every, keep_checkpoints, seed, task_map, remat, steps_per_call.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from metajax.algorithms import contrastive_pretrain as contrastive_lib
from metajax import losses as losses_lib
from metajax.nn import models as models_lib
from metajax.algorithms import pretrain as pretrain_lib
from metajax.data.augment import make_affine_augment
from metajax.meta import MAML, MetaStep, TaskMap, make_meta_step, with_zeroing
from metajax.algorithms.protonet import ProtoNet
from metajax.algorithms.reptile import Reptile, make_reptile_step
from metajax.types import Array, PRNGKey, Task
from metajax.data.umtra import make_umtra_sampler
from metajax.variants import head_mask

Config = ml_collections.ConfigDict | ml_collections.FrozenConfigDict
Learner = MAML  # any object with MAML's interface: init, model_params, adapt, task_loss, ...



class ConfigError(ValueError):
  """An invalid config, or one that does not match the checkpoint it should resume from."""


# --------------------------------------------------------------------------------------- registry

def _maml_kwargs(config: Config, num_inner_steps: int) -> dict[str, Any]:
  return dict(num_inner_steps=num_inner_steps, inner_lr=config.inner_lr, remat=config.remat)


def train_ways(config: Config) -> int:
  """Ways of the training episodes: `config.train_ways`, or `config.ways` when it is 0."""
  return config.get("train_ways") or config.ways


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


# Pre-training baselines: `(model, config) -> objective(params, (x, y), key)`.
PRETRAIN_OBJECTIVES: dict[str, Callable[[models_lib.Model, Config], Any]] = {
  "pretrain": lambda model, c: pretrain_lib.supervised_objective(model.apply, build_loss(c)),
  "simclr": lambda model, c: contrastive_lib.simclr_objective(model.features,
                                                              make_affine_augment()),
  "supcon": lambda model, c: contrastive_lib.supcon_objective(model.features,
                                                              make_affine_augment()),
}


def _pretrain_step(model: models_lib.Model, learner: Learner,
                   optimizer: optax.GradientTransformation, config: Config, *, task_map: TaskMap,
                   jit: bool) -> MetaStep:
  """One optax step on a pooled minibatch: the `[meta_batch_size, B, ...]` chunks of
  `_class_batches` are flattened into one batch of `meta_batch_size * B` examples. The
  augmentations of step s come from `fold_in(fold_in(key(seed), 1), s)` (resumable)."""
  del learner, task_map
  objective = PRETRAIN_OBJECTIVES[config.algorithm](model, config)

  def pooled(params, batch, key):
    if isinstance(batch, Task):  # regression tasks: their support and query points, pooled
      return objective(params, pretrain_lib.tasks_to_batch(batch), key)
    x, y = (a.reshape((-1,) + a.shape[2:]) for a in batch)
    return objective(params, (x, y), key)

  key = jax.random.fold_in(jax.random.key(config.seed), 1)
  return pretrain_lib.make_pretrain_step(pooled, optimizer, key=key, jit=jit)


def _episodes(config: Config, images: Array) -> Callable[..., Task]:
  """Labelled `train_ways`-way `shots`-shot episodes of the training classes."""
  from metajax import data as data_lib  # local: data imports PIL and the loaders

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
                        num_inner_steps: int) -> Learner:
  """The few-shot learner on top of pre-trained params (`config.pretrain_eval`, default the
  algorithm's): "finetune" all params from a fresh zero `ways`-way head, "linear_probe" (the head
  only), or "prototypes" (nearest class mean of the features). On regression datasets: fine-tune
  every param of the pre-trained network, its head included."""
  if DATASETS[config.dataset].kind == "regression":
    # Finn et al.'s baseline: fine-tune the whole pre-trained network, its output layer included
    # (a regression head has nothing class-specific to reset).
    return pretrain_lib.finetune_learner(model.apply, loss, num_inner_steps=num_inner_steps,
                                         inner_lr=config.inner_lr)
  how = config.pretrain_eval or {"pretrain": "finetune"}.get(config.algorithm, "prototypes")
  if how == "prototypes":
    return ProtoNet(model.features, config.ways, loss)
  shape = DATASETS[config.dataset].input_shape(config)
  small = MODELS[config.model](config, num_outputs(config), shape)
  head = jax.eval_shape(small.init, jax.random.key(0))["head"]
  fresh_head = lambda params: pretrain_lib.with_head(  # noqa: E731
    params, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), head))
  learner = pretrain_lib.finetune_learner(small.apply, loss, num_inner_steps=num_inner_steps,
                                          inner_lr=config.inner_lr,
                                          head_only=how == "linear_probe")
  return dataclasses.replace(learner, params_transforms=(fresh_head,))


def _pretrain_outputs(config: Config) -> int:
  """A head over all meta-training classes (classification), else the dataset's outputs."""
  if DATASETS[config.dataset].kind == "regression":
    return num_outputs(config)
  return DATASETS[config.dataset].classes(config).get("train", 0)


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
    classification_only: refuse regression datasets.
    higher_way: supports `train_ways` different from `ways` (one learner for both).
    outputs: `config -> ` width of the trained model's head (default `num_outputs`).
  """

  learner: Callable[[models_lib.Model, losses_lib.Loss, Config, int], Learner]
  step: Callable[..., MetaStep] = _meta_step
  train_tasks: Callable[[Config, Array], Callable[..., Task]] = _episodes
  classification_only: bool = False
  higher_way: bool = False
  outputs: Callable[[Config], int] | None = None


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
  # Nichol et al. 2018: k inner SGD steps, the outer optimiser fed theta - theta' (batched, or
  # serial with `reptile_serial`).
  "reptile": Algorithm(lambda model, loss, c, k: Reptile(model.apply, loss, **_maml_kwargs(c, k)),
                       step=_reptile_step),
  # Snell et al. 2017: nearest class mean of `model.features`; the head is unused. Trained on
  # `train_ways`-way episodes ("higher way"), evaluated on `ways`-way ones.
  "protonet": Algorithm(lambda model, loss, c, k: ProtoNet(model.features, train_ways(c), loss),
                        classification_only=True, higher_way=True),
  # Khodadadeh et al. 2019: MAML meta-trained on unlabelled tasks of the training pool.
  "umtra": Algorithm(lambda model, loss, c, k: MAML(model.apply, loss, **_maml_kwargs(c, k)),
                     train_tasks=_umtra_tasks, classification_only=True),
  # Joint training on all meta-training classes (a head over all of them), then per test task a
  # fresh head fine-tuned on the support set (`pretrain_eval`: finetune, linear_probe, prototypes).
  # On regression datasets (sinusoid) it trains on the pooled points of the sampled tasks and
  # fine-tunes every parameter at test time (Finn et al. 2017's pre-training baseline).
  "pretrain": Algorithm(_pretrained_learner, step=_pretrain_step, train_tasks=_class_batches,
                        outputs=_pretrain_outputs),
  # Chen et al. 2020 / Khosla et al. 2020: contrastive pre-training of the encoder on two affine
  # views, then prototypes (default) or a linear probe.
  "simclr": Algorithm(_pretrained_learner, step=_pretrain_step, train_tasks=_class_batches,
                      classification_only=True),
  "supcon": Algorithm(_pretrained_learner, step=_pretrain_step, train_tasks=_class_batches,
                      classification_only=True),
}

PRETRAIN_EVALS = ("finetune", "linear_probe", "prototypes")


class DatasetSpec(NamedTuple):
  """What is known about a dataset before loading it (used to validate configs early).

  Attributes:
    kind: "classification" or "regression".
    images_per_class: M, or None for synthetic tasks.
    classes: split name -> number of classes (None if unknown before loading).
    input_shape: the shape of one example.
    default_loss: the loss used when `config.loss` is empty.
  """

  kind: str
  images_per_class: int | None
  classes: Callable[[Config], Mapping[str, int]]
  input_shape: Callable[[Config], tuple[int, ...]]
  default_loss: str


def _omniglot_classes(config: Config) -> dict[str, int]:
  rotations = _omniglot_rotations(config)
  counts = {"finn": {"train": 1100, "val": 100, "test": 423},
            "kao": {"train": 1200, "test": 423},
            "lake": {"train": 964, "test": 659}}.get(config.split, {})
  counts = dict(counts)
  if rotations and "train" in counts:
    counts["train"] *= 4
  return counts


def _omniglot_rotations(config: Config) -> bool:
  return config.split == "finn" if config.rotations is None else bool(config.rotations)


DATASETS: dict[str, DatasetSpec] = {
  "omniglot": DatasetSpec("classification", 20, _omniglot_classes,
                          lambda c: (c.image_size, c.image_size, 1), "cross_entropy"),
  "miniimagenet": DatasetSpec("classification", 600,
                              lambda c: {"train": 64, "val": 16, "test": 20},
                              lambda c: (c.image_size, c.image_size, 3), "cross_entropy"),
  "sinusoid": DatasetSpec("regression", None, lambda c: {}, lambda c: (1,), "mse"),
}

# name -> (config, num_outputs, input_shape) -> Model
MODELS: dict[str, Callable[[Config, int, tuple[int, ...]], models_lib.Model]] = {
  "conv4": lambda c, n, shape: models_lib.conv4(n, filters=c.filters, input_shape=shape),
  "kao_conv": lambda c, n, shape: models_lib.kao_conv(n, filters=c.filters, input_shape=shape),
  "mlp": lambda c, n, shape: models_lib.mlp(n, hidden=tuple(c.hidden), input_shape=shape),
}

OPTIMIZERS: dict[str, Callable[[float], optax.GradientTransformation]] = {
  "adam": optax.adam,
  "sgd": optax.sgd,
}

# Fields that may differ between a checkpoint's config and the config of a run resuming from it:
# schedule, logging, evaluation and where the data lives. Every other field defines the run.
RESUMABLE_FIELDS = frozenset({
  "num_steps", "eval_every", "eval_split", "eval_num_tasks", "test_num_tasks", "eval_batch_size",
  "eval_num_inner_steps", "eval_seed", "log_every", "checkpoint_every", "keep_checkpoints",
  "data_dir", "cache_dir", "task_map", "remat", "steps_per_call",
})

# --------------------------------------------------------------------------------------- config


def default_config() -> ml_collections.ConfigDict:
  """Every field a run reads, with defaults (5-way 1-shot Omniglot MAML, Finn et al.'s split).

  The experiment configs in `experiments/configs/` start from this and override what differs.
  """
  c = ml_collections.ConfigDict()
  # data
  c.dataset = "omniglot"            # one of DATASETS: omniglot, miniimagenet, sinusoid
  c.data_dir = ""                   # "" -> $METAJAX_OMNIGLOT_DIR / $METAJAX_MINIIMAGENET_DIR
  c.cache_dir = ""                  # "" -> metajax.data.cache.resolve_cache_dir's default
  c.split = "finn"                  # Omniglot class split: finn, kao, lake
  c.rotations = ml_collections.config_dict.placeholder(bool)  # None -> the split's default
  c.image_size = 28                 # 28 for Omniglot, 84 for mini-ImageNet
  # model
  c.model = "conv4"                 # one of MODELS: conv4, kao_conv, mlp
  c.filters = 64
  c.hidden = (40, 40)               # mlp only
  # algorithm
  c.algorithm = "maml"              # one of ALGORITHMS: maml, fomaml, anil, metasgd, reptile,
                                    # protonet, umtra
  c.reptile_serial = False          # reptile: tasks in turn, one outer update each
  c.pretrain_eval = ""              # pretrain/simclr/supcon: finetune, linear_probe, prototypes
                                    # ("": finetune for pretrain, prototypes for the others)
  c.zeroing = False                 # Kao et al.'s zeroing trick
  c.loss = ""                       # "" -> the dataset's default (cross_entropy / mse)
  # episodes
  c.ways = 5
  c.train_ways = 0                  # protonet: ways of the training episodes (0: ways)
  c.shots = 1
  c.queries = 15
  c.meta_batch_size = 32
  c.num_inner_steps = 1
  c.eval_num_inner_steps = 3
  c.inner_lr = 0.4
  c.meta_lr = 1e-3
  c.optimizer = "adam"              # one of OPTIMIZERS
  # schedule
  c.num_steps = 60_000              # outer steps
  c.eval_every = 1_000              # 0: only the final evaluation
  c.eval_split = "val"              # the split evaluated during training
  c.eval_num_tasks = 100            # tasks per evaluation during training
  c.test_num_tasks = 600            # tasks of the final evaluation on the "test" split (0: none)
  c.eval_batch_size = 50            # tasks evaluated at once (memory)
  c.eval_seed = 0                   # evaluation tasks come from this seed, not from `seed`
  c.log_every = 100
  c.checkpoint_every = 1_000
  c.keep_checkpoints = 3
  c.seed = 0
  c.task_map = "vmap"               # "vmap", "map", or an int chunk size (see metajax.map_tasks)
  c.remat = False
  # Outer steps per compiled call (`MetaStep.steps`, a lax.scan): at most this many, and a divisor
  # of the log/eval/checkpoint intervals, so that every interval ends on a call boundary. Same
  # steps, same tasks; on CPU it spares the per-call allocation of XLA's temporaries.
  c.steps_per_call = 5
  return c


# --------------------------------------------------------------------------------------- checks


def _is_int(value: Any) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def parse_task_map(value: Any) -> TaskMap:
  """"vmap", "map", or a positive int (also given as a string, e.g. "8" from the command line)."""
  if _is_int(value) and value >= 1:
    return int(value)
  if isinstance(value, str):
    if value in ("vmap", "map"):
      return value
    if value.isdigit() and int(value) >= 1:
      return int(value)
  raise ValueError(f"task_map must be 'vmap', 'map' or a positive int, got {value!r}")


def validate_config(config: Config) -> None:
  """Checks a config before anything is loaded or compiled.

  Raises:
    ConfigError (a ValueError): listing every problem found (unknown names, counts out of range, episodes that
      do not fit the dataset, inconsistent evaluation settings).
  """
  problems = []

  def need(ok: bool, message: str) -> None:
    if not ok:
      problems.append(message)

  def choice(field: str, options: Mapping[str, Any]) -> bool:
    value = config.get(field)
    ok = value in options
    need(ok, f"{field}={value!r} is not one of {', '.join(sorted(options))}")
    return ok

  def count(field: str, minimum: int) -> bool:
    value = config.get(field)
    ok = _is_int(value) and value >= minimum
    need(ok, f"{field}={value!r} must be an int >= {minimum}")
    return ok

  def positive(field: str) -> None:
    value = config.get(field)
    need(isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0,
         f"{field}={value!r} must be a positive number")

  have_dataset = choice("dataset", DATASETS)
  have_algorithm = choice("algorithm", ALGORITHMS)
  choice("model", MODELS)
  choice("optimizer", OPTIMIZERS)
  for field in ("zeroing", "reptile_serial"):
    need(isinstance(config.get(field), bool), f"{field}={config.get(field)!r} must be True or "
         "False")
  if count("train_ways", 0) and config.train_ways and have_algorithm:
    algorithm = ALGORITHMS[config.algorithm]
    need(algorithm.higher_way or config.train_ways == config.get("ways"),
         f"train_ways={config.train_ways} differs from ways={config.get('ways')!r}, which "
         f"algorithm={config.algorithm!r} does not support (protonet does; 0 means ways)")
    need(not _is_int(config.get("ways")) or config.train_ways >= config.ways,
         f"train_ways={config.train_ways} is less than ways={config.ways}")
  if config.get("loss"):
    choice("loss", losses_lib.LOSSES)
  if config.get("pretrain_eval"):
    choice("pretrain_eval", dict.fromkeys(PRETRAIN_EVALS))
  for field in ("shots", "queries", "meta_batch_size", "num_inner_steps", "eval_num_inner_steps",
                "eval_num_tasks", "eval_batch_size", "log_every",
                "checkpoint_every", "keep_checkpoints", "filters", "steps_per_call"):
    count(field, 1)
  for field in ("num_steps", "eval_every", "seed", "eval_seed", "test_num_tasks"):
    count(field, 0)
  positive("inner_lr")
  positive("meta_lr")
  try:
    parse_task_map(config.get("task_map"))
  except ValueError as e:
    problems.append(str(e))
  if have_dataset:
    spec = DATASETS[config.dataset]
    if spec.kind == "classification":
      ways_ok = count("ways", 2)
      if config.dataset == "omniglot":
        choice("split", {"finn": 0, "kao": 0, "lake": 0})
      if config.get("model") == "mlp":
        problems.append(f"model='mlp' is for regression; {config.dataset} needs conv4 or kao_conv")
      m = spec.images_per_class
      if _is_int(config.get("shots")) and _is_int(config.get("queries")):
        need(config.shots + config.queries <= m,
             f"shots + queries = {config.shots} + {config.queries} is more than the {m} images per "
             f"class of {config.dataset}")
      classes = spec.classes(config)
      if ways_ok and classes:
        for split in ("train", config.get("eval_split"), "test"):
          if split in classes:
            need(config.ways <= classes[split],
                 f"ways={config.ways} is more than the {classes[split]} classes of the "
                 f"{config.dataset} {split!r} split")
        if "train" in classes and _is_int(config.get("train_ways")):
          need(config.train_ways <= classes["train"],
               f"train_ways={config.train_ways} is more than the {classes['train']} classes of "
               f"the {config.dataset} 'train' split")
      if classes:
        need(config.get("eval_split") in classes,
             f"eval_split={config.get('eval_split')!r} is not a split of {config.dataset} "
             f"(split {config.get('split')!r}): {', '.join(classes)}")
    else:
      need(config.get("model") == "mlp", f"model={config.get('model')!r}: {config.dataset} "
           "regression needs model='mlp'")
      need(not (have_algorithm and ALGORITHMS[config.algorithm].classification_only),
           f"algorithm={config.get('algorithm')!r} needs a classification dataset, not "
           f"{config.dataset}")
  if problems:
    raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))


def check_data(config: Config) -> None:
  """Checks that the dataset's directory exists (cheap; before anything is compiled).

  Raises:
    FileNotFoundError: naming the directory and the flag or environment variable to set.
  """
  from metajax import data as data_lib  # local: data imports PIL and the loaders

  find = {"omniglot": data_lib.find_omniglot_dir,
          "miniimagenet": data_lib.find_miniimagenet_dir}.get(config.dataset)
  if find is None:
    return
  try:
    find(config.data_dir or None)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"{e} (binaries: --config.data_dir=...)") from None


def config_diff(saved: Mapping[str, Any], current: Mapping[str, Any],
                ignore: frozenset[str] = RESUMABLE_FIELDS) -> list[str]:
  """Fields (other than `ignore`) whose values differ between two configs as plain dicts."""
  keys = sorted((set(saved) | set(current)) - ignore)
  return [f"{k}: {saved.get(k, '<missing>')!r} in the checkpoint, {current.get(k, '<missing>')!r} "
          "now" for k in keys if saved.get(k, "<missing>") != current.get(k, "<missing>")]


# --------------------------------------------------------------------------------------- builders


def num_outputs(config: Config) -> int:
  """Width of the model's head: `ways` for classification, 1 for regression."""
  return config.ways if DATASETS[config.dataset].kind == "classification" else 1


def build_model(config: Config) -> models_lib.Model:
  """The model of `config.model` with `num_outputs(config)` outputs."""
  shape = DATASETS[config.dataset].input_shape(config)
  outputs = ALGORITHMS[config.algorithm].outputs or num_outputs
  return MODELS[config.model](config, outputs(config), shape)


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


def build_optimizer(config: Config) -> optax.GradientTransformation:
  return OPTIMIZERS[config.optimizer](config.meta_lr)


def build_meta_step(config: Config, model: models_lib.Model, learner: Learner, *,
                    jit: bool = True) -> MetaStep:
  """The outer update of `config.algorithm` (all share `MetaState`, so checkpoints fit)."""
  return ALGORITHMS[config.algorithm].step(model, learner, build_optimizer(config), config,
                                           task_map=parse_task_map(config.task_map), jit=jit)


def train_task_source(config: Config, source: TaskSource) -> TaskSource:
  """The training tasks of `config.algorithm`, drawn from the pool of `source` (the train split's
  labelled source from `load_task_sources`); synthetic sources are returned unchanged."""
  if not source.arrays:
    return source
  return source._replace(sample=ALGORITHMS[config.algorithm].train_tasks(config,
                                                                         source.arrays[0]))


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


def load_task_sources(config: Config, splits: tuple[str, ...]) -> dict[str, TaskSource]:
  """Loads the dataset and returns one `TaskSource` per split (pools put on device once).

  Images stay uint8 on device (4x smaller than float32); the samplers scale them to [0, 1].
  """
  from metajax import data as data_lib  # local: data imports PIL and the loaders

  if config.dataset == "sinusoid":
    sample = data_lib.make_sinusoid_sampler(config.shots, config.queries)
    return {split: TaskSource(sample, (), 0) for split in splits}
  if config.dataset == "omniglot":
    pool = data_lib.load_omniglot(config.data_dir or None, cache_dir=config.cache_dir or None,
                                  image_size=config.image_size, dtype=np.uint8)
    pools = data_lib.omniglot_split(pool, config.split, rotations=_omniglot_rotations(config))
  elif config.dataset == "miniimagenet":
    pools = {split: data_lib.load_miniimagenet(config.data_dir or None, split,
                                               image_size=config.image_size,
                                               cache_dir=config.cache_dir or None)
             for split in sorted(set(splits))}
  else:
    raise ValueError(f"unknown dataset {config.dataset!r}")
  sources = {}
  for split in splits:
    if split not in pools:
      raise ValueError(f"{config.dataset} has no split {split!r}; it has {', '.join(pools)}")
    sample = data_lib.make_episode_sampler(pools[split], config.ways, config.shots, config.queries)
    sources[split] = TaskSource(sample, (jnp.asarray(pools[split].images),),
                                pools[split].num_classes)
  return sources


def sample_tasks(source: TaskSource, keys: PRNGKey) -> Task:
  """One task per key (`keys` is `[num_tasks]`): `vmap(sample)` with the pool unbatched."""
  return jax.vmap(source.sample, in_axes=(0,) + (None,) * len(source.arrays))(keys, *source.arrays)
