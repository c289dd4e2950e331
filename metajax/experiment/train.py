"""The training loop: `train_and_evaluate(config, workdir)`, imported by binaries and notebooks.

It follows flax's `examples/imagenet/train.py`: validate the config, create the state, restore
the newest checkpoint of `workdir` if any (`step_offset = int(state.step)`), loop; up to
`config.steps_per_call` outer steps run in one compiled call (`MetaStep.steps`); metrics are
fetched to the host only every `log_every` steps; evaluation and checkpoints run on their own
intervals; the state is donated to the jitted meta-step.

PRNG: one root key `jax.random.key(config.seed)` is split into an init key and a train key; the
meta-batch of step s is sampled (in its own jitted function, from device-resident pools) from
`fold_in(train_key, s)`, so a resumed run sees exactly the tasks an uninterrupted one would, and
its final parameters are bit-identical. Evaluation tasks come from `jax.random.key(eval_seed)`
instead (task i from `fold_in(eval_key, i)`), so that runs with different seeds, and any two
checkpoints, are evaluated on the very same tasks.

A non-finite meta-loss or meta-gradient stops the run with a `NonFiniteError` naming the step;
checkpoints are only written after checking every step since the last one, so the newest
checkpoint is always a good one.

Workdir layout: `checkpoints/checkpoint_<step>.msgpack`, `metrics.jsonl`, `tensorboard/`,
`config.json`, `results.json` (the final metrics).
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from metajax.experiment import build
from metajax.experiment import checkpoint as ckpt_lib
from metajax.experiment import metrics as metrics_lib
from metajax.platform import xla
from metajax.data.omniglot import CorruptDataError
from metajax.eval import evaluate_tasks, summarize
from metajax.meta import MetaState, TaskMap
from metajax.types import Array, PRNGKey

PrintFn = Callable[[str], None]
CHECKPOINT_DIR = "checkpoints"
RESULTS_FILE = "results.json"
# outer metrics that must stay finite
WATCHED = ("outer/loss", "outer/grad_norm")


class NonFiniteError(FloatingPointError):
  """The meta-loss (or meta-gradient) became NaN or infinite; the run was stopped."""


# Errors that are the user's to fix (binaries print them without a traceback).
USER_ERRORS = (build.ConfigError, ckpt_lib.CheckpointError, NonFiniteError, PermissionError,
               NotADirectoryError, FileNotFoundError, CorruptDataError)


class TrainState(NamedTuple):
  """What a checkpoint holds: the meta-state and the raw data of the training PRNG key."""

  meta: MetaState
  train_key: Array  # jax.random.key_data(train_key), uint32


def _print(line: str) -> None:
  print(line, flush=True)


def prepare_workdir(workdir: str | os.PathLike[str]) -> Path:
  """Creates `workdir` if needed and checks it is writable (before anything is computed).

  Raises:
    PermissionError / NotADirectoryError with the path and what to do.
  """
  path = Path(workdir).expanduser()
  if path.exists() and not path.is_dir():
    raise NotADirectoryError(f"workdir {str(path)!r} exists and is not a directory")
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f".write_probe_{os.getpid()}"
    probe.write_bytes(b"")
    probe.unlink()
  except OSError as e:
    raise PermissionError(f"workdir {str(path)!r} is not writable ({e.strerror}); pass a "
                          "writable --workdir") from e
  return path


def config_to_dict(config: build.Config) -> dict[str, Any]:
  """A config as plain JSON values (tuples become lists), for storage and comparison."""
  return json.loads(config.to_json())


def _check_finite(records: list[tuple[int, Mapping[str, Any]]], ckpt_dir: Path) -> None:
  for step, scalars in records:
    for name in WATCHED:
      if name in scalars and not math.isfinite(float(scalars[name])):
        last = ckpt_lib.latest_step(ckpt_dir)
        where = (f"the last good checkpoint is step {last} in {str(ckpt_dir)!r}" if last is not None
                 else "no checkpoint was written")
        raise NonFiniteError(
          f"{name} = {float(scalars[name])} at step {step}: training stopped; {where}. Lower "
          "meta_lr or inner_lr (or check the data) and rerun the command to resume from it.")


def _intervals(config: build.Config) -> list[int]:
  return [config.log_every, config.checkpoint_every] + ([config.eval_every]
                                                        if config.eval_every else [])


def steps_per_call(config: build.Config) -> int:
  """Outer steps per compiled call: the largest divisor of the log, eval and checkpoint intervals
  that is at most `config.steps_per_call`, so every interval ends on a call boundary (and a run
  resumed from a checkpoint makes the very same calls)."""
  common = math.gcd(*_intervals(config))
  return max(k for k in range(1, config.steps_per_call + 1) if common % k == 0)


def _to_next_boundary(config: build.Config, step: int) -> int:
  """Steps from `step` to the next multiple of a log, eval or checkpoint interval (a resumed run
  may start off the call grid, e.g. after an interval changed)."""
  return min((step // e + 1) * e - step for e in _intervals(config))


def _unstack_metrics(records: list[tuple[int, int, Any]]) -> list[tuple[int, Mapping[str, Any]]]:
  """Host records `(last step, n, metrics)` -> one `(step, metrics)` per step; n == 0 marks a
  single step's unstacked metrics."""
  out = []
  for last, n, metrics in records:
    if n == 0:
      out.append((last, metrics))
    else:
      out.extend((last - n + 1 + i, {k: v[i] for k, v in metrics.items()}) for i in range(n))
  return out


def _check_params_finite(params: Any, step: int) -> None:
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    if not np.all(np.isfinite(leaf)):
      raise NonFiniteError(f"non-finite meta-parameter {jax.tree_util.keystr(path)} at step {step}; "
                           "not saving a checkpoint")


def make_evaluator(learner: build.Learner, source: build.TaskSource, *, num_tasks: int,
                   batch_size: int, key: PRNGKey, task_map: TaskMap = "vmap"
                   ) -> Callable[[Any], dict[str, np.ndarray]]:
  """`evaluate(meta_params) -> {metric: [num_tasks] numpy}` on a fixed set of tasks.

  Task i is sampled from `fold_in(key, i)`: the set does not depend on `batch_size`, and is the
  same for every call and every checkpoint. Tasks are sampled and evaluated `batch_size` at a
  time (one compiled function; the last batch is padded and the padding dropped).
  """
  batch_size = min(batch_size, num_tasks)
  num_batches = -(-num_tasks // batch_size)
  indices = jnp.arange(num_batches * batch_size).reshape(num_batches, batch_size)
  keys = jax.vmap(jax.vmap(lambda i: jax.random.fold_in(key, i)))(indices)

  @xla.jit
  def run_batch(meta_params, batch_keys, *arrays):
    tasks = build.sample_tasks(build.TaskSource(source.sample, arrays, 0), batch_keys)
    return evaluate_tasks(learner, meta_params, tasks, task_map=task_map)

  def evaluate(meta_params) -> dict[str, np.ndarray]:
    parts = [jax.device_get(run_batch(meta_params, keys[b], *source.arrays))
             for b in range(num_batches)]
    return {k: np.concatenate([p[k] for p in parts])[:num_tasks] for k in parts[0]}

  return evaluate


def flatten_summary(summary: Mapping[str, Mapping[str, float]], prefix: str) -> dict[str, float]:
  """`{"accuracy_after": {"mean": m, "ci95": h, ...}} -> {"eval/accuracy_after": m,
  "eval/accuracy_after_ci95": h}`."""
  out = {}
  for name, stats in summary.items():
    out[f"{prefix}/{name}"] = stats["mean"]
    out[f"{prefix}/{name}_ci95"] = stats["ci95"]
  return out


def format_summary(summary: Mapping[str, Mapping[str, float]], *, percent: bool = True) -> str:
  """Human-readable `accuracy after: 93.10 +- 0.85 % (600 tasks)` lines."""
  lines = []
  for name, stats in summary.items():
    scale, unit = (100.0, " %") if percent and name.startswith("accuracy") else (1.0, "")
    lines.append(f"{name.replace('_', ' ')}: {scale * stats['mean']:.2f} +- "
                 f"{scale * stats['ci95']:.2f}{unit} ({stats['num_tasks']} tasks)")
  return "\n".join(lines)


def check_resumable(config: build.Config, ckpt_dir: Path) -> None:
  """Raises a ConfigError if `ckpt_dir` holds a checkpoint of another run's config."""
  saved = ckpt_lib.read_config(ckpt_dir)
  if saved is None:
    return
  # fields added since the checkpoint was written take their defaults
  diff = build.config_diff({**config_to_dict(build.default_config()), **saved},
                           config_to_dict(config))
  if diff:
    raise build.ConfigError(f"{str(ckpt_dir)!r} holds a checkpoint of a different run; use another "
                     "--workdir, or the same config. Differences:\n  " + "\n  ".join(diff))


def train_and_evaluate(config: build.Config, workdir: str | os.PathLike[str], *,
                       print_fn: PrintFn = _print) -> dict[str, float]:
  """Meta-trains as `config` says, in `workdir` (resuming from its newest checkpoint), then
  evaluates on `test_num_tasks` tasks of the test split.

  Args:
    config: see `metajax.experiment.build.default_config` for the fields.
    workdir: where checkpoints, metrics and results go; rerunning in it resumes.
    print_fn: where progress lines go.

  Returns:
    The final metrics: `step`, the last logged `inner/...` and `outer/...` averages, the last
    `eval/...`, and `test/<metric>` / `test/<metric>_ci95` of the final evaluation.

  Raises:
    ConfigError: an invalid config, or a workdir with a checkpoint of another config.
    CheckpointError: a checkpoint that does not fit the model.
    PermissionError: a non-writable workdir.
    NonFiniteError: a NaN/Inf meta-loss; the newest checkpoint is the last good state.
  """
  config = config_from_dict(config.to_dict() if hasattr(config, "to_dict") else config)
  build.validate_config(config)
  build.check_data(config)
  workdir = prepare_workdir(workdir)
  ckpt_dir = workdir / CHECKPOINT_DIR
  check_resumable(config, ckpt_dir)
  task_map = build.parse_task_map(config.task_map)

  # Model, learner, optimiser, state.
  model = build.build_model(config)
  learner = build.build_learner(config, model)
  eval_learner = build.build_learner(config, model, num_inner_steps=config.eval_num_inner_steps)
  meta_step = build.build_meta_step(config, model, learner)
  init_key, train_key = jax.random.split(jax.random.key(config.seed))

  def fresh_state() -> TrainState:
    return TrainState(meta_step.init(model.init(init_key)), jax.random.key_data(train_key))

  target = jax.eval_shape(fresh_state)
  if ckpt_lib.latest_step(ckpt_dir) is None:
    state = jax.jit(fresh_state)()
  else:
    restored, _, restored_step = ckpt_lib.restore(ckpt_dir, target)
    state = jax.tree.map(jnp.asarray, restored)
    print_fn(f"resuming from checkpoint step {restored_step} in {str(ckpt_dir)!r}")
  step_offset = int(state.meta.step)
  train_key = jax.random.wrap_key_data(state.train_key)
  ckpt_lib.write_json_atomic(workdir / "config.json", config_to_dict(config))

  # Data: device-resident pools; tasks sampled by jitted functions of a key.
  start = time.time()
  splits = tuple(dict.fromkeys(("train", config.eval_split, "test")))
  sources = build.load_task_sources(config, splits)
  print_fn(f"data: {config.dataset} loaded in {time.time() - start:.1f} s; classes per split: "
           + ", ".join(f"{s} {src.num_classes}" for s, src in sources.items()))
  train_source = build.train_task_source(config, sources["train"])

  def sample_at(step, arrays):
    keys = jax.random.split(jax.random.fold_in(train_key, step), config.meta_batch_size)
    return build.sample_tasks(build.TaskSource(train_source.sample, arrays, 0), keys)

  sample_train = jax.jit(lambda step, *arrays: sample_at(step, arrays))

  @functools.partial(jax.jit, static_argnums=0)
  def sample_train_stack(n, first, *arrays):  # the meta-batches of steps first .. first + n - 1
    return jax.vmap(lambda s: sample_at(s, arrays))(first + jnp.arange(n, dtype=jnp.int32))

  per_call = steps_per_call(config) if meta_step.steps is not None else 1

  eval_key = jax.random.key(config.eval_seed)
  evaluators = {
    "eval": make_evaluator(eval_learner, sources[config.eval_split],
                           num_tasks=config.eval_num_tasks, batch_size=config.eval_batch_size,
                           key=eval_key, task_map=task_map),
  }
  if config.test_num_tasks:
    evaluators["test"] = make_evaluator(eval_learner, sources["test"],
                                        num_tasks=config.test_num_tasks,
                                        batch_size=config.eval_batch_size, key=eval_key,
                                        task_map=task_map)

  jsonl = metrics_lib.JsonlWriter(workdir / metrics_lib.METRICS_FILE)
  jsonl.truncate_after(step_offset, also_at_step=("test/",))
  tensorboard = metrics_lib.TensorBoardWriter(workdir / "tensorboard")
  progress = metrics_lib.ProgressLine(config.num_steps, step_offset, print_fn)
  files = metrics_lib.MultiWriter([jsonl, tensorboard])
  final: dict[str, float] = {}
  # (last step, steps, metrics) not yet checked; metrics of a multi-step call are stacked
  pending: list[tuple[int, int, Any]] = []
  checked: list[tuple[int, Mapping[str, float]]] = []  # host metrics since the last log line

  def check_pending() -> None:
    host = _unstack_metrics(jax.device_get(pending))
    pending.clear()
    _check_finite(host, ckpt_dir)
    checked.extend(host)

  def log(step: int) -> None:
    check_pending()
    if not checked:
      return
    means = {k: float(np.mean([m[k] for _, m in checked])) for k in checked[-1][1]}
    checked.clear()
    files.write(step, means)
    progress.write(step, means)
    final.update(means)

  def run_eval(prefix: str, step: int) -> dict[str, dict[str, float]]:
    summary = summarize(evaluators[prefix](state.meta.params))
    scalars = flatten_summary(summary, prefix)
    files.write(step, scalars)
    final.update(scalars)
    return summary

  def save(step: int) -> None:
    check_pending()
    host_state = jax.device_get(state)
    _check_params_finite(host_state.meta.params, step)
    ckpt_lib.save(ckpt_dir, step, host_state, config=config_to_dict(config),
                  keep=config.keep_checkpoints)

  start = time.time()
  if step_offset < config.num_steps:
    episodes = (f"{build.train_ways(config)}-way {config.shots}-shot"
                if build.DATASETS[config.dataset].kind == "classification" else
                f"{config.shots}-shot")
    print_fn(f"training {config.algorithm}{' + zeroing' if config.zeroing else ''} {episodes} "
             f"{config.dataset}, steps {step_offset} -> {config.num_steps}, workdir "
             f"{str(workdir)!r}")
  try:
    done = step_offset
    while done < config.num_steps:
      step = done
      n = min(per_call, config.num_steps - step, _to_next_boundary(config, step))
      if n > 1:
        tasks = sample_train_stack(n, np.int32(step), *train_source.arrays)
        meta, metrics = meta_step.steps(state.meta, tasks)
      else:
        tasks = sample_train(np.int32(step), *train_source.arrays)
        meta, metrics = meta_step.step(state.meta, tasks)
      state = TrainState(meta, state.train_key)
      done = step + n
      pending.append((done, n if n > 1 else 0, metrics))
      if step == step_offset:  # do not count compilation in the rate
        jax.block_until_ready(metrics)
        what = "step" if n == 1 else f"{n} steps (one call)"
        print_fn(f"first {what} (compilation included) took {time.time() - start:.1f} s")
        progress.reset(done)
      if done % config.log_every == 0 or done == config.num_steps:
        log(done)
      if config.eval_every and done % config.eval_every == 0 and done != config.num_steps:
        check_pending()
        summary = run_eval("eval", done)
        print_fn(f"eval at step {done} ({config.eval_split}): "
                 + format_summary(summary).replace("\n", "; "))
        progress.reset(done)
      if done % config.checkpoint_every == 0 or done == config.num_steps:
        save(done)
    log(config.num_steps)

    # Final evaluation on the test split.
    step = int(state.meta.step)
    if config.eval_every and config.eval_split != "test":
      run_eval("eval", step)
    if config.test_num_tasks:
      start = time.time()
      summary = run_eval("test", step)
      print_fn(f"test at step {step} ({config.test_num_tasks} tasks, "
               f"{config.eval_num_inner_steps} inner steps, {time.time() - start:.1f} s):\n"
               + format_summary(summary))
  finally:
    files.close()
  final = {"step": step, **final}
  ckpt_lib.write_json_atomic(workdir / RESULTS_FILE, final)
  return final


def evaluate_checkpoint(workdir: str | os.PathLike[str], *, split: str = "test",
                        num_tasks: int = 600, num_inner_steps: int | None = None,
                        eval_seed: int = 0, batch_size: int = 50, step: int | None = None,
                        data_dir: str | None = None, cache_dir: str | None = None,
                        print_fn: PrintFn = _print) -> dict[str, Any]:
  """Accuracy/loss before and after adaptation of a workdir's checkpoint on fixed tasks.

  Args:
    workdir: a training workdir (its `checkpoints/` are read; the config comes from the
      checkpoint).
    split: the class split the tasks are drawn from ("test", "val", "train").
    num_tasks: how many tasks (600 as in the literature).
    num_inner_steps: inner steps at test time; default the config's `eval_num_inner_steps`.
    eval_seed: the tasks come from `jax.random.key(eval_seed)` (task i from `fold_in(key, i)`),
      independent of training: two checkpoints are compared on the same tasks.
    batch_size: tasks evaluated at once.
    step: which checkpoint (default the newest).
    data_dir, cache_dir: override the config's data location.

  Returns:
    `{"step", "split", "num_tasks", "num_inner_steps", "eval_seed", "config", "metrics":
    {name: {"mean", "ci95", "num_tasks"}}}`.
  """
  config, _, learner, meta_params, ckpt_step = restore_learner(
    workdir, num_inner_steps=num_inner_steps, step=step, data_dir=data_dir, cache_dir=cache_dir)
  num_inner_steps = config.eval_num_inner_steps
  source = build.load_task_sources(config, (split,))[split]
  evaluator = make_evaluator(learner, source, num_tasks=num_tasks, batch_size=batch_size,
                             key=jax.random.key(eval_seed),
                             task_map=build.parse_task_map(config.task_map))
  start = time.time()
  summary = summarize(evaluator(meta_params))
  print_fn(f"checkpoint step {ckpt_step}, {split} split, {num_tasks} tasks, {num_inner_steps} "
           f"inner steps ({time.time() - start:.1f} s):\n" + format_summary(summary))
  return {"step": ckpt_step, "split": split, "num_tasks": num_tasks,
          "num_inner_steps": num_inner_steps, "eval_seed": eval_seed,
          "config": config_to_dict(config), "metrics": summary}


def restore_learner(workdir: str | os.PathLike[str], *, num_inner_steps: int | None = None,
                    step: int | None = None, data_dir: str | None = None,
                    cache_dir: str | None = None) -> tuple[build.Config, Any, Any, Any, int]:
  """`(config, model, learner, meta_params, step)` of a workdir's checkpoint.

  The config is the one stored in the checkpoint (with `eval_num_inner_steps`, `data_dir` and
  `cache_dir` overridden when given); the learner adapts with `num_inner_steps` (default the
  config's `eval_num_inner_steps`).

  Raises:
    CheckpointError: no (readable) checkpoint, or one that does not fit its own config's model.
  """
  ckpt_dir = Path(workdir) / CHECKPOINT_DIR
  if ckpt_lib.latest_step(ckpt_dir) is None:
    raise ckpt_lib.CheckpointError(f"no checkpoint in {str(ckpt_dir)!r}: is {str(workdir)!r} a "
                                   "training workdir?")
  state_dict, saved, ckpt_step = (ckpt_lib.read_latest(ckpt_dir) if step is None else
                                  ckpt_lib.read(ckpt_lib.checkpoint_path(ckpt_dir, step)))
  config = config_from_dict(saved)
  if num_inner_steps is not None:
    config.eval_num_inner_steps = int(num_inner_steps)
  if data_dir:
    config.data_dir = str(data_dir)
  if cache_dir:
    config.cache_dir = str(cache_dir)
  build.validate_config(config)
  model = build.build_model(config)
  learner = build.build_learner(config, model, num_inner_steps=config.eval_num_inner_steps)
  meta_step = build.build_meta_step(config, model, learner, jit=False)
  target = jax.eval_shape(lambda: TrainState(meta_step.init(model.init(jax.random.key(0))),
                                             jax.random.key_data(jax.random.key(0))))
  state = ckpt_lib.restore_into(target, state_dict)
  return config, model, learner, jax.tree.map(jnp.asarray, state.meta.params), ckpt_step


def config_from_dict(values: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """`default_config()` updated with `values` (JSON lists back to tuples).

  Raises:
    ConfigError: a field that `default_config` does not have (e.g. a misspelt name).
  """
  config = build.default_config()
  unknown = sorted(set(values) - set(config))
  if unknown:
    raise build.ConfigError(f"unknown config fields {unknown}; the fields are {sorted(config)}")
  for key, value in values.items():
    if isinstance(config.get(key), tuple) and isinstance(value, list):
      value = tuple(value)
    config[key] = value
  return config
