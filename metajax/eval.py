"""Evaluation on a fixed batch of tasks: loss and accuracy before and after adaptation."""

from __future__ import annotations

import math
from typing import Mapping

import jax
import numpy as np

from metajax import losses as losses_lib
from metajax.platform import xla
from metajax.meta import TaskMap, check_inputs, is_classification, map_tasks
from metajax.types import Array, ArrayLike, Learner, MetaParams, Task

Z_95 = 1.959963984540054  # two-sided 95% normal quantile


def evaluate_tasks(learner: Learner, meta_params: MetaParams, tasks: Task, *,
                   task_map: TaskMap = "vmap") -> dict[str, Array]:
  """Per-task query metrics before and after adaptation on each task's support set.

  Returns a dict of `[num_tasks]` arrays: `loss_before`, `loss_after` and, for integer labels,
  `accuracy_before`, `accuracy_after`. "Before" uses the params the inner loop starts from (with
  the zeroing trick that is a zero head, i.e. chance accuracy).

  Raises:
    ValueError, TypeError: `tasks` that `metajax.meta.check_inputs` refuses (shapes, target
      dtypes, and label values when they are concrete), before anything is mapped over tasks.
  """
  check_inputs(learner, meta_params, tasks, batched=True)
  return _per_task(learner, meta_params, tasks, task_map)


def _per_task(learner: Learner, meta_params: MetaParams, tasks: Task,
              task_map: TaskMap) -> dict[str, Array]:
  def one(task: Task) -> dict[str, Array]:
    before = learner.apply_fn(learner.model_params(meta_params), task.query_x)
    adapted = learner.adapt(meta_params, task.support_x, task.support_y)
    after = learner.apply_fn(adapted, task.query_x)
    out = {"loss_before": learner.loss(before, task.query_y),
           "loss_after": learner.loss(after, task.query_y)}
    if is_classification(task.query_y):
      out["accuracy_before"] = losses_lib.accuracy(before, task.query_y)
      out["accuracy_after"] = losses_lib.accuracy(after, task.query_y)
    return out

  return map_tasks(one, tasks, task_map)


def mean_confidence_interval(values: ArrayLike, z: float = Z_95) -> tuple[float, float]:
  """Mean and half-width of its normal-approximation confidence interval, `z * s / sqrt(n)`.

  `s` is the sample standard deviation (ddof=1); with the default z this is the "mean +- 95% CI
  over tasks" of the few-shot literature. One value gives a half-width of NaN.
  """
  values = np.asarray(values, np.float64).ravel()
  if values.size == 0:
    raise ValueError("mean_confidence_interval needs at least one value")
  if values.size == 1:
    return float(values[0]), math.nan
  return float(values.mean()), float(z * values.std(ddof=1) / math.sqrt(values.size))


def summarize(per_task: Mapping[str, ArrayLike]) -> dict[str, dict[str, float]]:
  """`{name: [num_tasks]} -> {name: {"mean": m, "ci95": h, "num_tasks": n}}`."""
  out = {}
  for name, values in per_task.items():
    mean, ci = mean_confidence_interval(values)
    out[name] = {"mean": mean, "ci95": ci, "num_tasks": int(np.size(values))}
  return out


def evaluate(learner: Learner, meta_params: MetaParams, tasks: Task, *,
             task_map: TaskMap = "vmap", jit: bool = True) -> dict[str, dict[str, float]]:
  """`evaluate_tasks` then `summarize`: mean and 95% CI of each metric over the tasks.

  Raises:
    ValueError, TypeError: as `evaluate_tasks`, before anything is compiled.
  """
  check_inputs(learner, meta_params, tasks, batched=True)  # the labels while they are concrete
  fn = lambda p, t: _per_task(learner, p, t, task_map)  # noqa: E731
  if jit:
    fn = xla.jit(fn)
  return summarize(jax.device_get(fn(meta_params, tasks)))


__all__ = ["evaluate", "evaluate_tasks", "mean_confidence_interval", "summarize"]
