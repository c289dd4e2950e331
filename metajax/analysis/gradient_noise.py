"""How noisy is MAML's encoder gradient while it meta-trains? (Kao et al., ICLR 2022, Section 4.)

`metajax.analysis.theory` splits ANIL MAML's encoder meta-gradient exactly into a supervised contrastive
part and a noise part (a random initial head and the "coefficient noise"); the zeroing trick
removes the noise. This module measures that split *along a real meta-training run*:

    for record in measure_during_training(model, VARIANTS["so"], params, sample_train_tasks,
                                          images, train_key, grad_tasks, feature_tasks, eval_tasks,
                                          loss="cross_entropy", inner_lr=0.4,
                                          meta_optimizer=optax.adam(1e-3), num_steps=500,
                                          measure_every=25):
      print(record["step"], record["cosine"], record["noise_norm"], record["gap"])

Each record holds, on fixed batches of tasks (the same for every variant and every step):

* `cosine`: cosine similarity between the true MAML encoder gradient and its pure contrastive
  part; `total_norm`, `contrastive_norm`, `noise_norm` (norms over every non-head parameter) and
  `noise_fraction = noise_norm / total_norm`. With the zeroing trick and one inner step the noise
  is exactly 0 (MSE) or round-off (cross-entropy), so the cosine is 1.
* `same_class`, `different_class`, `gap`: the mean cosine similarity of encoder features of
  same-class and different-class pairs of held-out episodes (the paper's feature-space view).
* `accuracy`, `accuracy_ci95`: query accuracy after adaptation on held-out tasks (the learner's
  own test-time procedure: with zeroing the head starts at 0).
* `train/...`: the meta-training metrics averaged over the steps since the previous record.

Everything here is a pure function of its arguments (params, tasks, keys); the loop is a generator
so that the caller logs, times and writes files (see experiments/gradient_noise.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metajax import losses as losses_lib
from metajax.analysis import theory
from metajax.platform import xla
from metajax.eval import Z_95, evaluate_tasks
from metajax.meta import MAML, make_meta_step, with_zeroing
from metajax.nn.models import Model
from metajax.types import ApplyFn, Array, ArrayLike, Params, PRNGKey, Task
from metajax.variants import head_mask


class Variant(NamedTuple):
  """A MAML setting: first- or second-order meta-gradient, with or without the zeroing trick."""

  first_order: bool
  zeroing: bool


VARIANTS: dict[str, Variant] = {
  "fo": Variant(first_order=True, zeroing=False),
  "so": Variant(first_order=False, zeroing=False),
  "fo_zero": Variant(first_order=True, zeroing=True),
  "so_zero": Variant(first_order=False, zeroing=True),
}

# The scalars of one record, in the order of the summary table.
GRADIENT_KEYS = ("cosine", "total_norm", "contrastive_norm", "noise_norm", "noise_fraction")
FEATURE_KEYS = ("same_class", "different_class", "gap")
ACCURACY_KEYS = ("accuracy", "accuracy_ci95")


def get_variants(names: Sequence[str]) -> dict[str, Variant]:
  """`["fo", "so_zero"] -> {"fo": Variant(...), "so_zero": Variant(...)}`, in the given order.

  Raises:
    ValueError: an unknown or repeated name, or no name at all.
  """
  names = list(names)
  unknown = [n for n in names if n not in VARIANTS]
  if unknown or not names or len(set(names)) != len(names):
    raise ValueError(f"variants must be distinct names among {', '.join(VARIANTS)}, got {names}")
  return {name: VARIANTS[name] for name in names}


def anil_learner(apply_fn: ApplyFn, variant: Variant, *, loss: theory.LossName,
                 inner_lr: float, num_inner_steps: int = 1) -> MAML:
  """The ANIL learner (only the head adapts: the theory's assumption) of a variant.

  Args:
    apply_fn: `(params, x) -> outputs`, params `{"encoder": ..., "head": ...}`.
    variant: first/second order, zeroing or not.
    loss: "mse_onehot" or "cross_entropy".
    inner_lr: inner step size.
    num_inner_steps: inner steps (the exact decomposition needs 1 for second order).
  """
  learner = MAML(apply_fn, losses_lib.get_loss(loss), num_inner_steps=num_inner_steps,
                 inner_lr=inner_lr, first_order=variant.first_order, adapt_mask=head_mask)
  return with_zeroing(learner) if variant.zeroing else learner


def task_feature_similarity(features_fn: ApplyFn, params: Params, tasks: Task) -> dict[str, Array]:
  """`theory.feature_similarity` of each task's support + query features, averaged over tasks.

  The features are computed as MAML sees them: `phi(support)` and `phi(query)` in two calls (with
  batch-statistics normalisation each set is normalised on its own), then pooled.

  Args:
    features_fn: `(params, x) -> phi(x)` `[N, D]`.
    params: model params.
    tasks: a `Task` with a leading task axis and integer labels.

  Returns:
    Scalars `{"same_class", "different_class", "gap"}` (means over tasks).
  """

  def one(task: Task) -> dict[str, Array]:
    features = jnp.concatenate([features_fn(params, task.support_x),
                                features_fn(params, task.query_x)])  # (N+M)D
    labels = jnp.concatenate([task.support_y, task.query_y])
    return theory.feature_similarity(features, labels)

  return jax.tree.map(jnp.mean, jax.vmap(one)(tasks))


def measure(model: Model, variant: Variant, params: Params, grad_tasks: Task,
            feature_tasks: Task, eval_tasks: Task, *, loss: theory.LossName,
            inner_lr: float, num_inner_steps: int = 1) -> dict[str, Array]:
  """One measurement: gradient noise, feature similarity and test accuracy (jittable).

  Args:
    model: the model (its `apply` and `features`).
    variant: the learner's setting; the gradient is that of this learner's meta-loss.
    params: model params `{"encoder": ..., "head": ...}`.
    grad_tasks: tasks (leading axis) whose mean meta-gradient is decomposed.
    feature_tasks: held-out tasks for the same/different-class feature similarity.
    eval_tasks: held-out tasks for the accuracy after adaptation.
    loss, inner_lr, num_inner_steps: as in `anil_learner`.

  Returns:
    Scalars named by `GRADIENT_KEYS + FEATURE_KEYS + ACCURACY_KEYS`.
  """
  parts = theory.decompose_encoder_gradient(
    model.features, params, grad_tasks, inner_lr=inner_lr, loss=loss,
    num_inner_steps=num_inner_steps, first_order=variant.first_order, zeroing=variant.zeroing)
  out = {name: parts[name] for name in ("cosine", "total_norm", "contrastive_norm", "noise_norm")}
  total = parts["total_norm"]
  out["noise_fraction"] = jnp.where(total > 0, parts["noise_norm"] / jnp.where(total > 0, total, 1),
                                    0.0)
  out.update(task_feature_similarity(model.features, params, feature_tasks))
  learner = anil_learner(model.apply, variant, loss=loss, inner_lr=inner_lr,
                         num_inner_steps=num_inner_steps)
  accuracy = evaluate_tasks(learner, params, eval_tasks)["accuracy_after"]  # [num_tasks]
  n = accuracy.shape[0]
  out["accuracy"] = jnp.mean(accuracy)
  out["accuracy_ci95"] = (Z_95 * jnp.std(accuracy, ddof=1) / np.sqrt(n) if n > 1
                          else jnp.full((), jnp.nan, accuracy.dtype))
  return out


def measurement_steps(num_steps: int, measure_every: int) -> list[int]:
  """The outer steps at which `measure_during_training` measures: 0, k, 2k, ... and num_steps."""
  if num_steps < 0 or measure_every < 1:
    raise ValueError(f"need num_steps >= 0 and measure_every >= 1, got {num_steps}, "
                     f"{measure_every}")
  return sorted({*range(0, num_steps + 1, measure_every), num_steps})


def measure_during_training(
  model: Model,
  variant: Variant,
  params: Params,
  sample_train_tasks: Callable[[PRNGKey, Any], Task],
  train_data: Any,
  train_key: PRNGKey,
  grad_tasks: Task,
  feature_tasks: Task,
  eval_tasks: Task,
  *,
  loss: theory.LossName,
  inner_lr: float,
  meta_optimizer: optax.GradientTransformation,
  num_steps: int,
  measure_every: int,
  num_inner_steps: int = 1,
  jit: bool = True,
) -> Iterator[dict[str, Any]]:
  """Meta-trains the variant's ANIL learner and yields a measurement every `measure_every` steps.

  Step s trains on `sample_train_tasks(jax.random.fold_in(train_key, s), train_data)`, so every
  variant given the same key sees the same task sequence. Measurements are taken before step 0,
  every `measure_every` steps and after the last step (`measurement_steps`).

  Args:
    model: the model.
    variant: first/second order, zeroing or not.
    params: initial model params (not modified).
    sample_train_tasks: `(key, train_data) -> Task` with a leading task axis (the meta-batch),
      e.g. `lambda key, images: sample_meta_batch(sample, key, images, num_tasks=16)`.
    train_data: its second argument, e.g. the device-resident image pool. An argument, not a
      closure: jit would embed a closed-over pool in the program as a constant.
    train_key: the training key.
    grad_tasks, feature_tasks, eval_tasks: the fixed measurement batches (see `measure`).
    loss, inner_lr, num_inner_steps: as in `anil_learner`.
    meta_optimizer: the outer optimiser, e.g. `optax.adam(1e-3)`.
    num_steps: outer steps.
    measure_every: steps between measurements.
    jit: compile the meta-step, the sampler and the measurement.

  Yields:
    Host dicts `{"step": int, <measure's scalars as floats>, "train/<metric>": float}`; the
    train metrics are the means over the steps since the previous record (absent at step 0).
  """
  steps = measurement_steps(num_steps, measure_every)
  learner = anil_learner(model.apply, variant, loss=loss, inner_lr=inner_lr,
                         num_inner_steps=num_inner_steps)
  meta_step = make_meta_step(learner, meta_optimizer, jit=jit)
  measure_fn = functools.partial(measure, model, variant, loss=loss, inner_lr=inner_lr,
                                 num_inner_steps=num_inner_steps)
  sample = sample_train_tasks
  if jit:
    measure_fn, sample = xla.jit(measure_fn), jax.jit(sample_train_tasks)
  state = meta_step.init(params)
  pending: list[Mapping[str, Array]] = []
  for step in range(num_steps + 1):
    if step in steps:
      record = {"step": step, **_to_host(measure_fn(state.params, grad_tasks, feature_tasks,
                                                    eval_tasks))}
      if pending:
        train = jax.device_get(pending)
        record.update({f"train/{name.split('/')[-1]}": float(np.mean([m[name] for m in train]))
                       for name in train[0]})
        pending = []
      yield record
    if step < num_steps:
      state, metrics = meta_step.step(state, sample(jax.random.fold_in(train_key, step), train_data))
      pending.append(metrics)


def _to_host(values: Mapping[str, ArrayLike]) -> dict[str, float]:
  return {name: float(value) for name, value in jax.device_get(dict(values)).items()}


def to_series(records: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
  """Records (one dict per measurement) -> columns `{name: [value per record]}`.

  A value that is absent or a non-finite float becomes None, so that the series is strict JSON.
  """
  names = list(dict.fromkeys(name for record in records for name in record))

  def clean(value: Any) -> Any:
    return None if isinstance(value, float) and not np.isfinite(value) else value

  return {name: [clean(record.get(name)) for record in records] for name in names}


SUMMARY_KEYS = ("cosine", "noise_norm", "noise_fraction", "total_norm", "gap", "accuracy")


def format_summary(series: Mapping[str, Mapping[str, Sequence[Any]]],
                   keys: Sequence[str] = SUMMARY_KEYS) -> str:
  """A text table: one row per variant, each key's first -> last value of its series.

  Args:
    series: `{variant name: to_series(records)}`.
    keys: the columns.
  """
  rows = [["variant", "steps", *keys]]
  for name, columns in series.items():
    values = {key: _floats(columns, key) for key in keys}
    rows.append([name, str((columns.get("step") or ["-"])[-1]),
                 *(f"{v[0]:.4g} -> {v[-1]:.4g}" if v else "-" for v in values.values())])
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in
                     enumerate(zip(row, widths))) for row in rows]
  return "\n".join(lines)


PANELS = (
  ("cosine", "cos(total, contrastive) of the encoder gradient"),
  ("noise_norm", "norm of the noise term"),
  ("feature_similarity", "feature cosine similarity (held-out)"),
  ("accuracy", "test accuracy after adaptation"),
)


def plot_series(series: Mapping[str, Mapping[str, Sequence[Any]]], *, title: str = ""):
  """A figure with one panel per `PANELS` entry, every variant in every panel.

  Args:
    series: `{variant name: to_series(records)}`.
    title: the figure's title.

  Returns:
    A `matplotlib.figure.Figure` (no pyplot, no backend state; save it with `savefig`).
  """
  from matplotlib.figure import Figure  # local: plotting is optional for the library

  fig = Figure(figsize=(11, 8), layout="constrained")
  axes = fig.subplots(2, 2).ravel()
  colors = {name: f"C{i}" for i, name in enumerate(series)}
  for ax, (panel, label) in zip(axes, PANELS):
    for name, columns in series.items():
      steps = columns.get("step", [])
      if panel == "feature_similarity":
        ax.plot(steps, _floats(columns, "same_class"), "-o", ms=3, color=colors[name],
                label=f"{name} same class")
        ax.plot(steps, _floats(columns, "different_class"), "--", color=colors[name],
                label=f"{name} different class")
      else:
        ax.plot(steps, _floats(columns, panel), "-o", ms=3, color=colors[name], label=name)
    ax.set_title(label)
    ax.set_xlabel("outer step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  if title:
    fig.suptitle(title)
  return fig


def _floats(columns: Mapping[str, Sequence[Any]], name: str) -> list[float]:
  return [np.nan if v is None else float(v) for v in columns.get(name, [])]


__all__ = [
  "ACCURACY_KEYS",
  "FEATURE_KEYS",
  "GRADIENT_KEYS",
  "PANELS",
  "VARIANTS",
  "Variant",
  "SUMMARY_KEYS",
  "anil_learner",
  "format_summary",
  "get_variants",
  "measure",
  "measure_during_training",
  "measurement_steps",
  "plot_series",
  "task_feature_similarity",
  "to_series",
]
