"""The training loop: `train_and_evaluate(config, workdir)`, imported by binaries and notebooks.

It reads top-down as five steps, the shape of flax's `examples/imagenet/train.py`:

  setup     validate the config, check the data and the workdir, build model, learner, meta-step;
  restore   the newest good checkpoint of `workdir` (`step_offset = int(state.step)`), or a fresh
            state; a checkpoint of another config is refused;
  train     up to `config.steps_per_call` outer steps per compiled call (`MetaStep.steps`), the
            state donated to the jitted meta-step; metrics fetched to the host only every
            `log_every` steps; evaluation and checkpoints on their own intervals;
  evaluate  the final evaluation, on `test_num_tasks` tasks of the test split;
  finish    `results.json`, and where the run's files are.

PRNG: one root key `jax.random.key(config.seed)` is split into an init key and a train key; the
meta-batch of step s is sampled (in its own jitted function, from device-resident pools) from
`fold_in(train_key, s)`, so a resumed run sees exactly the tasks an uninterrupted one would, and
its final parameters are bit-identical. Evaluation tasks come from `jax.random.key(eval_seed)`
instead (task i from `fold_in(eval_key, i)`), so that runs with different seeds, and any two
checkpoints, are evaluated on the very same tasks.

A non-finite meta-loss or meta-gradient stops the run with a `NonFiniteError` naming the step, as
labels outside the episode's classes do (`BadLabelsError`, from the meta-step's
`inputs/bad_labels` count where it reports one); a finite divergence (a meta-loss above
`divergence_loss_ratio` times the first step's, a meta-gradient norm above `divergence_grad_norm`)
warns once (`DivergenceWarning`), or stops the run likewise with `on_divergence="stop"`
(`DivergenceError`). Checkpoints are only written after checking every step since the last one,
so the newest checkpoint is always a good one. A run resumes with other learning rates
(`build.CHANGEABLE_FIELDS`) only when told so (`allow_config_change`); each change is a line of
`config_history.jsonl`, and the checkpoints written afterwards hold the new values. A checkpoint also holds the host side of the metrics (the
per-step metrics since the last log line, the latest logged and evaluated values), so a resumed
run, or a rerun of a finished one, writes the very lines and `results.json` an uninterrupted run
writes. Ctrl-C (SIGINT) lets a checkpoint being written complete, then raises `Interrupted`
naming the newest checkpoint, which rerunning resumes from. Besides the `keep_checkpoints`
newest, the run keeps its best checkpoint by the dataset's validation metric
(`DatasetSpec.best`, e.g. `eval/accuracy_after`).

Workdir layout: `checkpoints/checkpoint_<step>/` (orbax folders, `metajax.experiment.checkpoint`),
`metrics.jsonl`, `tensorboard/`, `config.json`, `config_history.jsonl` (the learning-rate
changes made on resume, one JSON line each), `versions.json` (per invocation: the versions of
jax, jaxlib, flax, optax, numpy, orbax-checkpoint, metajax, and metajax's git revision), and
`results.json` (the final metrics), and `.lock` (`metajax.experiment.lock`: one training process
per workdir; a second one is refused with the holder named). Files are written by the primary
process only.

Several processes (`jax.distributed`, initialised by the binary): the mesh spans every process's
devices (`task_mesh`), each process samples only its rows of each meta-batch from their per-task
keys (`make_sampler`'s `rows`), so the meta-batches, and the parameters, are those of one process
with as many devices. The primary alone takes the lock, opens the checkpoints, restores and sends
the state to the others (an error it meets is raised on every process), writes, prints and
evaluates; the others never touch the workdir.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Collection, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import serialization

from metajax import data as data_lib
from metajax.eval import evaluate_tasks, summarize
from metajax.experiment import build
from metajax.experiment import checkpoint as ckpt_lib
from metajax.experiment import lock as lock_lib
from metajax.experiment import metrics as metrics_lib
from metajax.meta import MetaState, MetaStep, TaskMap
from metajax.platform import sharding as sharding_lib
from metajax.platform import xla
from metajax.types import Array, PRNGKey, Task

PrintFn = Callable[[str], None]
Evaluator = Callable[[Any], dict[str, np.ndarray]]
CHECKPOINT_DIR = "checkpoints"
RESULTS_FILE = "results.json"
LOG_STATE = "log"  # the key of `_Log.state()` in a checkpoint's extra JSON
VERSIONS_FILE = "versions.json"
CONFIG_HISTORY_FILE = "config_history.jsonl"
# outer metrics that must stay finite
WATCHED = ("outer/loss", "outer/grad_norm")
# the meta-step's count of labels outside [0, ways) in a step's meta-batch (classification only):
# any stops the run; it is never logged (it is 0 on every step a run gets past)
BAD_LABELS = "inputs/bad_labels"
LOWER_BY = 10  # the learning-rate reduction the stop advice suggests
# what versions.json records, besides python and the git revision
PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy", "orbax-checkpoint", "metajax")


class TrainingStopped(Exception):
  """A step's metrics stopped the run; the newest checkpoint is the last good state.

  Attributes:
    what: what was wrong, e.g. "outer/loss = nan".
    step: the step it was seen at.
    ckpt_dir: the run's checkpoint directory.
    checkpoint_step: its newest (good) checkpoint's step, which a rerun resumes from (None: none
      was written; a rerun starts afresh).
    lower: learning rates to resume with, e.g. `{"meta_lr": 1e-4}` (a tenth of the run's); empty
      where a learning rate is not the likely cause.
  """

  def __init__(self, what: str, step: int, ckpt_dir: Path, *, advice: str = "",
               lower: Mapping[str, float] | None = None):
    self.what, self.step, self.ckpt_dir = what, int(step), Path(ckpt_dir)
    self.checkpoint_step = ckpt_lib.latest_step(ckpt_dir)
    self.lower = dict(lower or {})
    if self.lower:
      values = ", ".join(f"{k}={v!r}" for k, v in self.lower.items())
      flags = " ".join(f"--config.{k}={v!r}" for k, v in self.lower.items())
      allow = ",".join(self.lower)
      advice = (f"To {'resume from it' if self.checkpoint_step is not None else 'start again'} "
                f"with a lower learning rate, rerun with {values}"
                + (f" and allow_config_change=({', '.join(map(repr, self.lower))},) (train.py: "
                   f"{flags} --allow_config_change={allow})" if self.checkpoint_step is not None
                   else f" (train.py: {flags})"))
    super().__init__(f"{self.summary}. {advice}".rstrip(". ") + ("." if advice else ""))

  @property
  def summary(self) -> str:
    """`<what> at step <step>: training stopped; <where the last good checkpoint is>`."""
    where = (f"the last good checkpoint is step {self.checkpoint_step} in {str(self.ckpt_dir)!r}"
             if self.checkpoint_step is not None else "no checkpoint was written")
    return f"{self.what} at step {self.step}: training stopped; {where}"


class NonFiniteError(TrainingStopped, FloatingPointError):
  """The meta-loss (or meta-gradient) became NaN or infinite; the run was stopped."""


class DivergenceError(TrainingStopped, FloatingPointError):
  """A finite divergence (`divergence_loss_ratio`, `divergence_grad_norm`) stopped the run
  (`on_divergence="stop"`)."""


class BadLabelsError(TrainingStopped, ValueError):
  """A meta-batch held labels outside `[0, ways)` (`inputs/bad_labels > 0`); the run was stopped."""


class DivergenceWarning(ckpt_lib.OneLineWarning):
  """A finite divergence was seen (`on_divergence="warn"`); the run goes on."""


class Interrupted(KeyboardInterrupt):
  """Training was interrupted (SIGINT, Ctrl-C) after any checkpoint being written was complete.

  Attributes:
    ckpt_dir: the run's checkpoint directory.
    step: its newest checkpoint's step, which rerunning resumes from (None: none was written).
  """

  def __init__(self, ckpt_dir: Path, step: int | None):
    where = (f"the last checkpoint is step {step} in {str(ckpt_dir)!r}" if step is not None
             else f"no checkpoint was written in {str(ckpt_dir)!r}")
    super().__init__(f"interrupted; {where}")
    self.ckpt_dir, self.step = ckpt_dir, step


# Errors that are the user's to fix (binaries print them without a traceback).
USER_ERRORS = (build.ConfigError, ckpt_lib.CheckpointError, TrainingStopped, PermissionError,
               NotADirectoryError, FileNotFoundError, data_lib.CorruptDataError,
               data_lib.DownloadError, lock_lib.WorkdirBusyError)


class TrainState(NamedTuple):
  """What a checkpoint holds: the meta-state and the raw data of the training PRNG key."""

  meta: MetaState
  train_key: Array  # jax.random.key_data(train_key), uint32


def _print(line: str) -> None:
  print(line, flush=True)


def _is_primary() -> bool:
  return jax.process_index() == 0


# ------------------------------------------------------------------------------ small helpers


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


def _git_revision(root: Path) -> dict[str, Any]:
  """The commit of the checkout metajax runs from, and whether it has uncommitted changes (None
  when metajax is not run from a git checkout, or git is not there)."""
  if not (root / ".git").exists():
    return {"git_revision": None, "git_dirty": None}

  def git(*args: str) -> str | None:
    try:  # --no-optional-locks: never take the index lock of a checkout others work in
      result = subprocess.run(["git", "--no-optional-locks", "-C", str(root), *args],
                              capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
      return None
    return result.stdout.strip()

  revision = git("rev-parse", "HEAD")
  status = git("status", "--porcelain", "--untracked-files=no") if revision else None
  return {"git_revision": revision, "git_dirty": None if status is None else bool(status)}


def software_versions() -> dict[str, Any]:
  """The versions a run's numbers depend on: python, each of `PACKAGES` (None if not installed)
  and the git revision of metajax's source checkout (`git_revision`, `git_dirty`)."""
  versions: dict[str, Any] = {"python": platform.python_version()}
  for name in PACKAGES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  return {**versions, **_git_revision(Path(__file__).resolve().parents[2])}


def record_versions(workdir: Path, step: int) -> None:
  """Appends `{"step": step, **software_versions()}` to `workdir/versions.json` (one entry per
  invocation: a resumed run says which versions trained which steps)."""
  path = workdir / VERSIONS_FILE
  try:
    entries = json.loads(path.read_text())
  except (OSError, ValueError):
    entries = []
  entries = entries if isinstance(entries, list) else []
  ckpt_lib.write_json_atomic(path, [*entries, {"step": int(step), **software_versions()}])


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


def _final_eval_due(config: build.Config) -> bool:
  """An `eval_split` evaluation at the last step (a "test" one is the final test evaluation)."""
  return bool(config.eval_every) and config.eval_split != "test"


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


def lower_learning_rates(config: build.Config) -> dict[str, float]:
  """What the stop advice suggests resuming with: a `LOWER_BY`th of the run's meta_lr (and of
  its schedule's floor `min_meta_lr`, where it has one, which must stay below it)."""
  lower = {"meta_lr": float(config.meta_lr) / LOWER_BY}
  if config.get("min_meta_lr"):
    lower["min_meta_lr"] = float(config.min_meta_lr) / LOWER_BY
  return lower


class Guards:
  """The per-step checks of a run's metrics on the host: NaN/Inf (`WATCHED`), labels outside the
  episode's classes (`BAD_LABELS`), and a finite divergence (`divergence_loss_ratio` times the
  first step's `outer/loss`, `divergence_grad_norm`), which warns once per bound or stops as
  `on_divergence` says.

  Args:
    config: the run's config.
    ckpt_dir: the run's checkpoint directory (named when the run is stopped).
    initial_loss: the first step's `outer/loss` (None: taken from the first step checked).
  """

  def __init__(self, config: build.Config, ckpt_dir: Path, initial_loss: float | None = None):
    self.ckpt_dir = ckpt_dir
    self.ratio = float(config.get("divergence_loss_ratio", 0.0))
    self.grad_bound = float(config.get("divergence_grad_norm", 0.0))
    self.stop = config.get("on_divergence", "warn") == "stop"
    self.ways = build.train_ways(config) if (
      build.DATASETS[config.dataset].kind == "classification") else None
    self.lower = lower_learning_rates(config)
    self.initial_loss = initial_loss
    self._warned: set[str] = set()

  def check(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Raises `NonFiniteError`, `BadLabelsError` or `DivergenceError` for a bad step; warns
    (`DivergenceWarning`) for a divergence the run goes on after."""
    for name in WATCHED:
      if name in scalars and not math.isfinite(float(scalars[name])):
        raise NonFiniteError(f"{name} = {float(scalars[name])}", step, self.ckpt_dir,
                             lower=self.lower)
    if BAD_LABELS in scalars and int(scalars[BAD_LABELS]) > 0:
      count = int(scalars[BAD_LABELS])
      allowed = (f"[0, {self.ways}) (the {self.ways} classes of an episode)" if self.ways
                 else "[0, ways)")
      raise BadLabelsError(f"{BAD_LABELS} = {count}: {count} label(s) of that step's meta-batch "
                           f"outside {allowed}", step, self.ckpt_dir,
                           advice="Check the data and the dataset's task sampler.")
    if "outer/loss" in scalars and self.initial_loss is None:
      self.initial_loss = float(scalars["outer/loss"])
    if self.ratio and self.initial_loss is not None and self.initial_loss > 0 and (
        "outer/loss" in scalars):
      loss, bound = float(scalars["outer/loss"]), self.ratio * self.initial_loss
      if loss > bound:
        self._diverged("loss", f"outer/loss = {loss:.6g} is above divergence_loss_ratio = "
                       f"{self.ratio:g} times the first step's {self.initial_loss:.6g}", step)
    if self.grad_bound and "outer/grad_norm" in scalars:
      norm = float(scalars["outer/grad_norm"])
      if norm > self.grad_bound:
        self._diverged("grad_norm", f"outer/grad_norm = {norm:.6g} is above "
                       f"divergence_grad_norm = {self.grad_bound:g}", step)

  def _diverged(self, kind: str, what: str, step: int) -> None:
    if self.stop:
      raise DivergenceError(what, step, self.ckpt_dir, lower=self.lower)
    if kind not in self._warned:
      self._warned.add(kind)
      lower = ", ".join(f"{k}={v!r}" for k, v in self.lower.items())
      warnings.warn(DivergenceWarning(
        f"{what} at step {step}: the run may be diverging (this bound is not reported again in "
        f"this process); on_divergence='stop' stops it, and resuming with a lower learning rate "
        f"(e.g. {lower}, allow_config_change) may help"), stacklevel=2)


def _check_params_finite(params: Any, step: int, ckpt_dir: Path, config: build.Config) -> None:
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    if not np.all(np.isfinite(leaf)):
      raise NonFiniteError(f"non-finite meta-parameter {jax.tree_util.keystr(path)} (not saved)",
                           step, ckpt_dir, lower=lower_learning_rates(config))


def make_evaluator(learner: build.Learner, source: build.TaskSource, *, num_tasks: int,
                   batch_size: int, key: PRNGKey, task_map: TaskMap = "vmap") -> Evaluator:
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


def best_of(config: build.Config) -> ckpt_lib.Best:
  """The metric that picks a run's best checkpoint: its dataset's `best`, on `eval/`."""
  metric, mode = build.DATASETS[config.dataset].best
  return ckpt_lib.Best(f"eval/{metric}", mode)


def check_config_changes(fields: Collection[str], learner: Any = None) -> tuple[str, ...]:
  """The fields of `allow_config_change`, checked: each must be one of
  `build.CHANGEABLE_FIELDS` (or a resumable field, which may change anyway).

  Args:
    fields: field names (`train.py --allow_config_change=meta_lr,inner_lr`).
    learner: the run's learner; one that learns its inner learning rates (Meta-SGD) refuses
      `inner_lr`, which only initialises them.

  Raises:
    ConfigError: one line naming the field and what may change.
  """
  fields = tuple(dict.fromkeys(f.strip() for f in fields if f.strip()))
  changeable = ", ".join(sorted(build.CHANGEABLE_FIELDS))
  for field in fields:
    if field not in build.FIELDS:
      close = difflib.get_close_matches(field, sorted(build.FIELDS), n=1)
      hint = f"did you mean {close[0]}?" if close else f"changeable: {changeable}"
      raise build.ConfigError(f"allow_config_change: {field!r} is not a config field ({hint})")
    if field not in build.CHANGEABLE_FIELDS | build.RESUMABLE_FIELDS:
      raise build.ConfigError(
        f"allow_config_change: {field!r} cannot change on resume, it defines the run (changeable: "
        f"{changeable}; schedule, logging and evaluation fields change without it); train with "
        f"another {field} in another --workdir")
    if field == "inner_lr" and getattr(learner, "learn_inner_lr", None):
      raise build.ConfigError(
        "allow_config_change: 'inner_lr' cannot change on resume for a learner that learns its "
        "inner learning rates (Meta-SGD): inner_lr only initialises them, and they are in the "
        "checkpoint; change meta_lr instead")
  return fields


def check_resumable(config: build.Config, saved: Mapping[str, Any], ckpt_dir: Path,
                    allow_config_change: Collection[str] = ()) -> dict[str, dict[str, Any]]:
  """Checks that `saved` (a checkpoint's config) is this run's, up to the resumable fields and
  those of `allow_config_change`; returns the allowed fields that differ,
  `{field: {"from": saved value, "to": value now}}`.

  Raises:
    ConfigError: `saved` is another run's config (a changeable field among the differences names
      the flag that allows it).
  """
  saved = build.config_to_dict(build.config_from_dict(saved))
  current = build.config_to_dict(config)
  allowed = frozenset(allow_config_change)
  diff = build.config_diff(saved, current, ignore=build.RESUMABLE_FIELDS | allowed)
  if diff:
    changeable = sorted(f for f in build.CHANGEABLE_FIELDS - allowed
                        if saved.get(f) != current.get(f))
    hint = (f" To resume with the new {' and '.join(changeable)}, allow the change: "
            f"--allow_config_change={','.join(changeable)}." if changeable else "")
    raise build.ConfigError(f"{str(ckpt_dir)!r} holds a checkpoint of a different run; use "
                            f"another --workdir, or the same config.{hint} Differences:\n  "
                            + "\n  ".join(diff))
  return {f: {"from": saved.get(f), "to": current.get(f)} for f in sorted(allowed)
          if f in build.CHANGEABLE_FIELDS and saved.get(f) != current.get(f)}


def record_config_changes(workdir: Path, step: int, changes: Mapping[str, Any]) -> bool:
  """Appends `{"step", "time", "changes"}` to `workdir/config_history.jsonl`, unless its last line
  records the same changes at the same step (a rerun of a resume killed before its next
  checkpoint). Returns whether a line was written."""
  path = workdir / CONFIG_HISTORY_FILE
  history = metrics_lib.read_metrics(path) if path.exists() else []
  if history and history[-1].get("step") == step and history[-1].get("changes") == changes:
    return False
  metrics_lib.append_jsonl(path, {"step": int(step), "time": time.time(), "changes": changes})
  return True


# ---------------------------------------------------------------------------------------- setup


class Run(NamedTuple):
  """What `setup` builds: everything fixed for the whole run."""

  config: ml_collections.ConfigDict
  workdir: Path
  model: Any
  learner: build.Learner
  eval_learner: build.Learner
  meta_step: MetaStep
  init_key: PRNGKey
  train_key: PRNGKey
  mesh: Any = None  # the task mesh over several local devices, None on one

  @property
  def ckpt_dir(self) -> Path:
    return self.workdir / CHECKPOINT_DIR


def local_devices(config: build.Config) -> list[jax.Device]:
  """The local devices `config.devices` asks for: "all", or the first N."""
  devices = jax.local_devices()
  wanted = build.parse_devices(config.get("devices", "all"))
  if wanted is None:
    return devices
  if wanted > len(devices):
    raise build.ConfigError(f"devices={wanted}, but this process has {len(devices)} local "
                            f"device(s); use 'all' or at most {len(devices)}")
  return devices[:wanted]


def task_mesh(config: build.Config) -> Any:
  """The mesh the meta-batch's tasks are split over, or None when one device of one process
  runs the step (the program is then the single-device one).

  With `devices="all"` the mesh takes as many local devices as divide the meta-batch evenly
  (e.g. 4 of 8 for a meta-batch of 4), so every config runs as it is; an explicit count that
  does not divide it is refused. Over several processes (`jax.distributed`) the mesh takes that
  many devices of every process, process by process, and the meta-batch must divide over them all.
  """
  devices = local_devices(config)
  processes = jax.process_count()
  if processes > 1 and config.meta_batch_size % processes:
    raise build.ConfigError(
      f"meta_batch_size={config.meta_batch_size} cannot be split evenly over {processes} "
      f"processes; use a multiple of {processes}")
  if build.parse_devices(config.get("devices", "all")) is None:
    devices = devices[:max(n for n in range(1, len(devices) + 1)
                           if config.meta_batch_size % (n * processes) == 0)]
  if len(devices) == 1 and processes == 1:
    return None
  if processes > 1:
    total = len(devices) * processes
    if config.meta_batch_size % total:
      raise build.ConfigError(
        f"meta_batch_size={config.meta_batch_size} cannot be split evenly over {total} devices "
        f"({processes} processes with {len(devices)} each); use a multiple of {total}, or "
        f"--config.devices=all (as many devices as divide it)")
    return sharding_lib.task_mesh(sharding_lib.process_devices(len(devices)))
  if config.meta_batch_size % len(devices):
    raise build.ConfigError(
      f"meta_batch_size={config.meta_batch_size} cannot be split evenly over {len(devices)} "
      f"devices; use a multiple of {len(devices)}, or --config.devices=all (as many devices as "
      f"divide it)")
  return sharding_lib.task_mesh(devices)


def _one_device(run: Run, tree: Any) -> Any:
  """`tree` (replicated over the run's mesh) on the first device, where evaluation runs (over
  several processes: this process's copy on its first device of the mesh)."""
  if run.mesh is None:
    return tree
  if jax.process_count() > 1:
    return jax.tree.map(lambda x: x.addressable_data(0) if isinstance(x, jax.Array) else x, tree)
  return jax.device_put(tree, run.mesh.devices.flat[0])


def _place(run: Run, tasks: Task, stacked: bool) -> Task:
  """The meta-batch with its task axis split over the run's mesh (unchanged on one device).
  Over several processes `tasks` holds this process's rows only (`make_sampler`'s `rows`)."""
  if run.mesh is None:
    return tasks
  if jax.process_count() > 1:
    return sharding_lib.shard_local_tasks(tasks, run.config.meta_batch_size, run.mesh,
                                          stacked=stacked)
  spec = (None, sharding_lib.TASK_AXIS) if stacked else (sharding_lib.TASK_AXIS,)
  return jax.device_put(tasks, jax.sharding.NamedSharding(run.mesh,
                                                          jax.sharding.PartitionSpec(*spec)))


def setup(config: build.Config | Mapping[str, Any], workdir: str | os.PathLike[str]) -> Run:
  """Validates the config, checks the data and the workdir (before anything is written or
  compiled), and builds the model, the learners and the meta-step."""
  config = build.config_from_dict(config)
  build.validate_config(config)
  build.check_data(config)
  # the other processes of a multi-process run never touch the workdir (it may not be theirs)
  workdir = prepare_workdir(workdir) if _is_primary() else Path(workdir).expanduser()
  model = build.build_model(config)
  learner = build.build_learner(config, model)
  eval_learner = build.build_learner(config, model, num_inner_steps=config.eval_num_inner_steps)
  mesh = task_mesh(config)
  init_key, train_key = jax.random.split(jax.random.key(config.seed))
  return Run(config, workdir, model, learner, eval_learner,
             build.build_meta_step(config, model, learner, sharded=mesh is not None), init_key,
             train_key, mesh)


def _fresh_state(run: Run) -> TrainState:
  return TrainState(run.meta_step.init(run.model.init(run.init_key)),
                    jax.random.key_data(run.train_key))


def restore(run: Run, checkpoints: ckpt_lib.Checkpoints, print_fn: PrintFn,
            allow_config_change: Collection[str] = ()
            ) -> tuple[TrainState, Mapping[str, Any] | None]:
  """The state of the newest good checkpoint (broken newer ones are removed, as training writes
  those steps again) and the metrics state stored with it (`_Log.state`; None in checkpoints
  written before it was stored), or a fresh state and None when there is none. What killed
  writes left is removed first. Allowed changes of the config (`allow_config_change`) are
  recorded in `config_history.jsonl` and printed.

  Raises:
    ConfigError: the checkpoint is another config's (up to `allow_config_change`).
    CheckpointError: no readable checkpoint, or one that does not fit the model.
  """
  removed = [*checkpoints.removed, *ckpt_lib.remove_temporaries(run.workdir),
             *metrics_lib.remove_temporaries(run.workdir)]
  if removed:
    print_fn(f"removed what killed writes left in {str(run.workdir)!r}: " + ", ".join(removed))
  if ckpt_lib.latest_step(run.ckpt_dir) is None:
    return jax.jit(lambda: _fresh_state(run))(), None
  checkpoint = ckpt_lib.read_checkpoint(run.ckpt_dir)
  changes = check_resumable(run.config, checkpoint.config, run.ckpt_dir, allow_config_change)
  state = ckpt_lib.restore_into(jax.eval_shape(lambda: _fresh_state(run)), checkpoint.state)
  for broken in [s for s in ckpt_lib.all_steps(run.ckpt_dir) if s > checkpoint.step]:
    checkpoints.discard(broken)
  print_fn(f"resuming from checkpoint step {checkpoint.step} in {str(run.ckpt_dir)!r}")
  if changes:
    if _is_primary():
      record_config_changes(run.workdir, checkpoint.step, changes)
    print_fn("changed on resume (recorded in "
             f"{str(run.workdir / CONFIG_HISTORY_FILE)!r}): "
             + ", ".join(f"{k} {v['from']!r} -> {v['to']!r}" for k, v in changes.items()))
  logged = (checkpoint.extra or {}).get(LOG_STATE)
  return jax.tree.map(jnp.asarray, state), logged


def load_data(run: Run, print_fn: PrintFn) -> tuple[build.TaskSource, dict[str, Evaluator]]:
  """The training task source and the evaluators (`eval`, and `test` when `test_num_tasks`), on
  device-resident pools; tasks are sampled by jitted functions of a key."""
  config = run.config
  start = time.time()
  splits = tuple(dict.fromkeys(("train", config.eval_split, "test")))
  sources = build.load_task_sources(config, splits)
  print_fn(f"data: {config.dataset} loaded in {time.time() - start:.1f} s; classes per split: "
           + ", ".join(f"{s} {src.num_classes}" for s, src in sources.items()))
  evaluator = functools.partial(make_evaluator, run.eval_learner,
                                batch_size=config.eval_batch_size,
                                key=jax.random.key(config.eval_seed),
                                task_map=build.parse_task_map(config.task_map))
  evaluators = {"eval": evaluator(sources[config.eval_split], num_tasks=config.eval_num_tasks)}
  if config.test_num_tasks:
    evaluators["test"] = evaluator(sources["test"], num_tasks=config.test_num_tasks)
  return build.train_task_source(config, sources["train"]), evaluators


def make_sampler(config: build.Config, source: build.TaskSource, train_key: PRNGKey,
                 rows: slice | None = None) -> Callable[[int, int], Task]:
  """`sample(first, n)`: the meta-batches of steps `first .. first + n - 1`, from
  `fold_in(train_key, step)` (stacked on a leading axis when n > 1), each one jitted call.

  `rows`: only these tasks of each meta-batch (a process's share of it over several processes,
  `sharding_lib.local_task_slice`); default all.
  """

  def sample_at(step, arrays):
    keys = jax.random.split(jax.random.fold_in(train_key, step), config.meta_batch_size)
    if rows is not None:
      # Task i comes from its own key i (`build.sample_tasks` vmaps the sampler over the keys),
      # so sampling only this process's keys gives exactly the rows one process samples, at a
      # 1/processes of the cost; sampling the whole batch everywhere would only add work (two
      # processes reach a two-device process's parameters bit for bit: test_processes.py).
      keys = keys[rows]
    return build.sample_tasks(build.TaskSource(source.sample, arrays, 0), keys)

  one = jax.jit(lambda step, *arrays: sample_at(step, arrays))

  @functools.partial(jax.jit, static_argnums=0)
  def stack(n, first, *arrays):
    return jax.vmap(lambda s: sample_at(s, arrays))(first + jnp.arange(n, dtype=jnp.int32))

  def sample(first: int, n: int) -> Task:
    if n > 1:
      return stack(n, np.int32(first), *source.arrays)
    return one(np.int32(first), *source.arrays)

  return sample


# ------------------------------------------------------------------------------------- metrics


class _Log:
  """The host side of a run's metrics: device metrics not yet fetched, their finite check, the
  averages of each log interval, the writers (primary process only) and the progress line.

  Its `state()` (what a checkpoint stores beside the training state) restores the metrics since
  the last log line, the latest values (`final`) and the step of the latest evaluation."""

  def __init__(self, run: Run, step_offset: int, print_fn: PrintFn,
               state: Mapping[str, Any] | None = None):
    self.ckpt_dir = run.ckpt_dir
    self.final: dict[str, float] = {}
    self.eval_step: int | None = None  # the step of the latest `eval` evaluation
    # (last step, steps, metrics) not yet checked; metrics of a multi-step call are stacked
    self._pending: list[tuple[int, int, Any]] = []
    self._checked = metrics_lib.IntervalMeans()  # since the last log line
    initial_loss = None
    if state is not None:  # before any writer is opened
      try:
        self._checked = metrics_lib.IntervalMeans.from_state(state["since_log"])
        self.final = {k: float(v) for k, v in state["final"].items()}
        self.eval_step = None if state["eval_step"] is None else int(state["eval_step"])
        # absent in checkpoints written before the divergence bound
        initial_loss = state.get("initial_loss")
        initial_loss = None if initial_loss is None else float(initial_loss)
      except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ckpt_lib.CheckpointError(f"the metrics state in {str(run.ckpt_dir)!r} does not "
                                       f"fit this version ({type(e).__name__}: {e})") from e
    writers = []
    if _is_primary():
      jsonl = metrics_lib.JsonlWriter(run.workdir / metrics_lib.METRICS_FILE)
      jsonl.truncate_after(step_offset, also_at_step=("test/",))
      tensorboard = metrics_lib.TensorBoardWriter(run.workdir / "tensorboard")
      metric = build.DATASETS[run.config.dataset].best[0]
      tensorboard.write_config(build.config_to_dict(run.config),
                               metrics=[f"eval/{metric}", f"test/{metric}"])
      writers = [jsonl, tensorboard]
      if state is None and step_offset and jsonl.path.exists():
        self._replay(metrics_lib.read_metrics(jsonl.path))
      if initial_loss is None and step_offset and jsonl.path.exists():
        initial_loss = next((float(r["outer/loss"]) for r in metrics_lib.read_metrics(jsonl.path)
                             if "outer/loss" in r), None)  # the first logged one, then
    self.guards = Guards(run.config, run.ckpt_dir, initial_loss)
    self.files = metrics_lib.MultiWriter(writers)
    self.progress = metrics_lib.ProgressLine(run.config.num_steps, step_offset, print_fn)

  def _replay(self, records: list[Mapping[str, Any]]) -> None:
    """The latest values and evaluation step from the metrics file up to the checkpoint, for a
    checkpoint written before checkpoints held the metrics state."""
    for record in records:
      scalars = {k: v for k, v in record.items() if k not in ("step", "time")}
      self.final.update(scalars)
      if any(k.startswith("eval/") for k in scalars):
        self.eval_step = int(record["step"])

  def state(self) -> dict[str, Any]:
    """The metrics state as JSON (call `check` first: metrics not yet fetched are not in it)."""
    return {"since_log": self._checked.state(), "final": dict(self.final),
            "eval_step": self.eval_step, "initial_loss": self.guards.initial_loss}

  def add(self, done: int, n: int, metrics: Any) -> None:
    self._pending.append((done, n if n > 1 else 0, metrics))

  def check(self) -> None:
    """Fetches the pending metrics and checks each step's (`Guards`): stops the run on a bad
    one, warns of a divergence."""
    host = _unstack_metrics(jax.device_get(self._pending))
    self._pending.clear()
    for step, scalars in host:
      self.guards.check(step, scalars)
    for step, scalars in host:
      self._checked.add(step, {k: v for k, v in scalars.items() if k != BAD_LABELS})

  def log(self, step: int) -> None:
    """Writes the averages of the metrics since the last log line."""
    self.check()
    if not self._checked:
      return
    means = self._checked.pop_means()
    self.write(step, means)
    self.progress.write(step, means)

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    self.files.write(step, scalars)
    self.final.update(scalars)

  def close(self) -> None:
    self.progress.close()
    self.files.close()


def _evaluate(log: _Log, evaluators: Mapping[str, Evaluator], prefix: str, step: int,
              params: Any) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
  if not _is_primary():  # evaluation is local to a device, and only the primary records it
    return {}, {}
  summary = summarize(evaluators[prefix](params))
  scalars = flatten_summary(summary, prefix)
  log.write(step, scalars)
  if prefix == "eval":
    log.eval_step = step
  return summary, scalars


# ---------------------------------------------------------------------------------------- train


def train(run: Run, state: TrainState, checkpoints: ckpt_lib.Checkpoints,
          sample: Callable[[int, int], Task], evaluators: Mapping[str, Evaluator],
          log: _Log) -> TrainState:
  """Trains from `state`'s step to `num_steps`, logging, evaluating and saving on the way."""
  config, meta_step = run.config, run.meta_step
  step_offset = done = int(state.meta.step)
  if done >= config.num_steps:
    return state
  episodes = (f"{build.train_ways(config)}-way {config.shots}-shot"
              if build.DATASETS[config.dataset].kind == "classification" else
              f"{config.shots}-shot")
  zeroing = " + zeroing" if config.zeroing else ""
  log.progress.message(f"training {config.algorithm}{zeroing} {episodes} {config.dataset}, steps "
                       f"{done} -> {config.num_steps}, workdir {str(run.workdir)!r}")
  if run.mesh is not None:
    processes, sampled = ((f" of {jax.process_count()} processes",
                           ", sampled by the process that holds them")
                          if jax.process_count() > 1 else ("", ""))
    log.progress.message(f"the meta-batch of {config.meta_batch_size} tasks is split over "
                         f"{run.mesh.size} devices{processes} ("
                         f"{config.meta_batch_size // run.mesh.size} each{sampled}); parameters "
                         f"replicated")
    state = TrainState(sharding_lib.replicate(state.meta, run.mesh), state.train_key)
  per_call = steps_per_call(config) if meta_step.steps is not None else 1
  config_dict = build.config_to_dict(config)
  start = time.time()
  while done < config.num_steps:
    step = done
    n = min(per_call, config.num_steps - step, _to_next_boundary(config, step))
    tasks = _place(run, sample(step, n), stacked=n > 1)
    meta, metrics = (meta_step.steps if n > 1 else meta_step.step)(state.meta, tasks)
    state = TrainState(meta, state.train_key)
    done = step + n
    log.add(done, n, metrics)
    last = done == config.num_steps
    if step == step_offset:  # do not count compilation in the rate
      jax.block_until_ready(metrics)
      what = "step" if n == 1 else f"{n} steps (one call)"
      log.progress.message(f"first {what} (compilation included) took "
                           f"{time.time() - start:.1f} s")
      log.progress.reset(done)
    if done % config.log_every == 0 or last:
      log.log(done)
    scalars = None
    # The last step's evaluation comes before its checkpoint, which it may make the best.
    if config.eval_every and (done % config.eval_every == 0 and not last
                              or last and _final_eval_due(config)):
      log.check()
      summary, scalars = _evaluate(log, evaluators, "eval", done,
                                   _one_device(run, state.meta.params))
      if not last:
        log.progress.message(f"eval at step {done} ({config.eval_split}): "
                             + format_summary(summary).replace("\n", "; "))
        log.progress.reset(done)
    if done % config.checkpoint_every == 0 or last:
      log.check()
      host_state = jax.device_get(state)
      _check_params_finite(host_state.meta.params, done, run.ckpt_dir, config)
      checkpoints.save(done, host_state, config=config_dict, metrics=scalars,
                       extra={LOG_STATE: log.state()})
  log.log(config.num_steps)
  return TrainState(_one_device(run, state.meta), state.train_key)


def evaluate(run: Run, state: TrainState, evaluators: Mapping[str, Evaluator],
             log: _Log) -> None:
  """The final evaluations: `eval_split` (unless training just did it), then the test split."""
  config = run.config
  step = int(state.meta.step)
  if _final_eval_due(config) and log.eval_step != step:
    _evaluate(log, evaluators, "eval", step, state.meta.params)
  if config.test_num_tasks:
    start = time.time()
    summary, _ = _evaluate(log, evaluators, "test", step, state.meta.params)
    log.progress.message(f"test at step {step} ({config.test_num_tasks} tasks, "
                         f"{config.eval_num_inner_steps} inner steps, "
                         f"{time.time() - start:.1f} s):\n" + format_summary(summary))


def finish(run: Run, state: TrainState, final: Mapping[str, float],
           print_fn: PrintFn) -> dict[str, float]:
  """Writes `results.json` and says where the run's files are; returns the final metrics."""
  results = {"step": int(state.meta.step), **final}
  if _is_primary():
    ckpt_lib.write_json_atomic(run.workdir / RESULTS_FILE, results)
  print_fn(f"results: {str(run.workdir / RESULTS_FILE)!r}; metrics: "
           f"{str(run.workdir / metrics_lib.METRICS_FILE)!r} (plots: python experiments/plot.py "
           f"--workdir={run.workdir}); TensorBoard: tensorboard --logdir="
           f"{run.workdir / 'tensorboard'}")
  return results


def train_and_evaluate(config: build.Config | Mapping[str, Any],
                       workdir: str | os.PathLike[str], *,
                       print_fn: PrintFn = _print,
                       allow_config_change: Collection[str] = ()) -> dict[str, float]:
  """Meta-trains as `config` says, in `workdir` (resuming from its newest checkpoint), then
  evaluates on `test_num_tasks` tasks of the test split.

  Args:
    config: every field of `build.FIELDS` (`experiments/configs/` has the defaults).
    workdir: where checkpoints, metrics and results go; rerunning in it resumes.
    print_fn: where progress lines go.
    allow_config_change: fields of `build.CHANGEABLE_FIELDS` (the learning rates) that may
      differ from the checkpoint's config when resuming; a change is recorded in
      `config_history.jsonl`, and the checkpoints written from then on hold the new values.

  Returns:
    The final metrics: `step`, the last logged `inner/...` and `outer/...` averages, the last
    `eval/...`, and `test/<metric>` / `test/<metric>_ci95` of the final evaluation.

  Raises:
    ConfigError: an invalid config, or a workdir with a checkpoint of another config.
    WorkdirBusyError: another live process trains in `workdir` (the message names it).
    CheckpointError: a checkpoint that does not fit the model, or of the earlier format.
    PermissionError: a non-writable workdir.
    TrainingStopped: a bad step; the newest checkpoint is the last good state. NonFiniteError
      (a NaN/Inf meta-loss or meta-gradient), BadLabelsError (labels outside the episode's
      classes), DivergenceError (a finite divergence, with `on_divergence="stop"`).
    Interrupted: SIGINT (Ctrl-C), once a checkpoint being written was complete; it names the
      newest checkpoint.
  """
  try:
    run = setup(config, workdir)
    allow_config_change = check_config_changes(allow_config_change, run.learner)
    if not _is_primary():  # the printed log comes from the primary
      print_fn = _print_nothing
    with contextlib.ExitStack() as files:

      def open_and_restore() -> tuple[Any, TrainState, Mapping[str, Any] | None]:
        # one writer per workdir: taken before anything is written there, released on any exit
        files.enter_context(lock_lib.WorkdirLock(run.workdir, purpose="train"))
        checkpoints = files.enter_context(ckpt_lib.Checkpoints(
          run.ckpt_dir, keep=run.config.keep_checkpoints, best=best_of(run.config)))
        state, log_state = restore(run, checkpoints, print_fn, allow_config_change)
        ckpt_lib.write_json_atomic(run.workdir / "config.json", build.config_to_dict(run.config))
        record_versions(run.workdir, int(state.meta.step))
        return checkpoints, state, log_state

      checkpoints, state, log_state = _on_primary(run, open_and_restore)
      step_offset = int(state.meta.step)
      train_source, evaluators = load_data(run, print_fn)
      log = _Log(run, step_offset, print_fn, log_state)
      if jax.process_count() > 1:  # the primary's divergence bound, which metrics.jsonl may give
        log.guards.initial_loss = json.loads(sharding_lib.broadcast_bytes(
          json.dumps(log.guards.initial_loss).encode() if _is_primary() else None))
      rows = (sharding_lib.local_task_slice(run.config.meta_batch_size, run.mesh)
              if jax.process_count() > 1 else None)
      try:
        state = train(run, state, checkpoints,
                      make_sampler(run.config, train_source, jax.random.wrap_key_data(
                        state.train_key), rows), evaluators, log)
        evaluate(run, state, evaluators, log)
      finally:
        log.close()
    return finish(run, state, log.final, print_fn)
  except KeyboardInterrupt as e:
    if isinstance(e, Interrupted):
      raise
    # Checkpoints is closed by now (a save in progress completed): name what it holds
    ckpt_dir = Path(workdir).expanduser() / CHECKPOINT_DIR
    raise Interrupted(ckpt_dir, ckpt_lib.latest_step(ckpt_dir)) from None


class _NoCheckpoints:
  """What a non-primary process saves through: nothing (the primary writes the checkpoints)."""

  def save(self, *args: Any, **kwargs: Any) -> None:
    return None


def _print_nothing(line: str) -> None:
  del line


def _on_primary(run: Run, open_and_restore: Callable[[], tuple[Any, TrainState, Any]]
                ) -> tuple[Any, TrainState, Mapping[str, Any] | None]:
  """`open_and_restore()` (the workdir lock, the checkpoints, the restored state) on the primary
  process; with one process, just that.

  Over several processes the primary alone opens the workdir; the state it restored and the
  metrics state stored with it reach every other process bit for bit (`broadcast_bytes`), which
  gets `_NoCheckpoints`. An error the primary met (a busy workdir, a checkpoint of another
  config) is raised on every process, so that none waits in a collective for a process that has
  stopped.
  """
  if jax.process_count() == 1:
    return open_and_restore()
  payload, error = None, None
  if _is_primary():
    try:
      checkpoints, state, log_state = open_and_restore()
      payload = {"state": serialization.to_state_dict(jax.device_get(state)),
                 "json": np.frombuffer(json.dumps({"log": log_state}).encode(), np.uint8)}
    except BaseException as e:  # noqa: BLE001 - told to the others, then raised
      error = e
      payload = {"json": np.frombuffer(json.dumps(
        {"error": [type(e).__name__, str(e)]}).encode(), np.uint8)}
  received = serialization.msgpack_restore(sharding_lib.broadcast_bytes(
    serialization.msgpack_serialize(payload) if payload is not None else None))
  if error is not None:
    raise error
  header = json.loads(np.asarray(received["json"]).tobytes())
  if "error" in header:
    name, message = header["error"]
    kinds = {kind.__name__: kind for kind in USER_ERRORS
             if not issubclass(kind, TrainingStopped)}
    if name in kinds:
      raise kinds[name](message)
    if name in ("KeyboardInterrupt", "Interrupted"):
      raise KeyboardInterrupt(message)
    raise RuntimeError(f"the primary process stopped: {name}: {message}")
  if _is_primary():
    return checkpoints, state, header["log"]
  target = jax.eval_shape(lambda: _fresh_state(run))
  state = serialization.from_state_dict(target, received["state"])
  return _NoCheckpoints(), jax.tree.map(jnp.asarray, state), header["log"]


# ------------------------------------------------------------------------------ from checkpoints


def restore_learner(workdir: str | os.PathLike[str], *, num_inner_steps: int | None = None,
                    step: int | None = None, best: bool = False, data_dir: str | None = None,
                    cache_dir: str | None = None, pretrain_eval: str | None = None
                    ) -> tuple[build.Config, Any, Any, Any, int]:
  """`(config, model, learner, meta_params, step)` of a workdir's checkpoint.

  The config is the one stored in the checkpoint (with `eval_num_inner_steps`, `data_dir` and
  `cache_dir` overridden when given); the learner adapts with `num_inner_steps` (default the
  config's `eval_num_inner_steps`).

  Args:
    workdir: a training workdir.
    num_inner_steps, data_dir, cache_dir: overrides of the stored config.
    pretrain_eval: how a pre-trained encoder is evaluated ("prototypes", "linear_probe",
      "finetune"), overriding the stored config's `pretrain_eval`; only for the algorithms that
      pre-train on class batches (`build.reads_pretrain_eval`).
    step: which checkpoint (default the newest good one; broken newer ones are skipped with a
      `CheckpointWarning` naming them).
    best: the good checkpoint with the best validation metric instead (`best_of(config)`).

  Raises:
    CheckpointError: no (readable) checkpoint, or one that does not fit its own config's model.
    ConfigError: `pretrain_eval` is not one of `build.PRETRAIN_EVALS`, or the run's algorithm
      does not read it.
  """
  ckpt_dir = Path(workdir) / CHECKPOINT_DIR
  ckpt_lib.check_format(ckpt_dir)
  if ckpt_lib.latest_step(ckpt_dir) is None:
    raise ckpt_lib.CheckpointError(f"no checkpoint in {str(ckpt_dir)!r}: is {str(workdir)!r} a "
                                   "training workdir?")
  if step is not None and best:
    raise ValueError("pass step or best, not both")
  checkpoint = ckpt_lib.read_checkpoint(ckpt_dir, step)
  if best:  # the metric comes from the dataset of the run's (newest good) config
    checkpoint = ckpt_lib.read_checkpoint(
      ckpt_dir, best=best_of(build.config_from_dict(checkpoint.config)))
  state_dict, ckpt_step = checkpoint.state, checkpoint.step
  config = build.config_from_dict(checkpoint.config)
  if num_inner_steps is not None:
    config.eval_num_inner_steps = int(num_inner_steps)
  if data_dir:
    config.data_dir = str(data_dir)
  if cache_dir:
    config.cache_dir = str(cache_dir)
  if pretrain_eval is not None:
    if not build.reads_pretrain_eval(config.algorithm):
      raise build.ConfigError(
        f"pretrain_eval={pretrain_eval!r} applies to the pre-training algorithms "
        f"({', '.join(a for a in build.ALGORITHMS if build.reads_pretrain_eval(a))}); the run in "
        f"{str(workdir)!r} is algorithm={config.algorithm!r}")
    config.pretrain_eval = pretrain_eval
  build.validate_config(config)
  model = build.build_model(config)
  learner = build.build_learner(config, model, num_inner_steps=config.eval_num_inner_steps)
  # The state's shapes are the training learner's (MAML++'s per-step lrs: one per training step).
  meta_step = build.build_meta_step(config, model, build.build_learner(config, model), jit=False)
  target = jax.eval_shape(lambda: TrainState(meta_step.init(model.init(jax.random.key(0))),
                                             jax.random.key_data(jax.random.key(0))))
  state = ckpt_lib.restore_into(target, state_dict)
  return config, model, learner, jax.tree.map(jnp.asarray, state.meta.params), ckpt_step


def evaluate_checkpoint(workdir: str | os.PathLike[str], *, split: str = "test",
                        num_tasks: int = 600, num_inner_steps: int | None = None,
                        eval_seed: int = 0, batch_size: int = 50, step: int | None = None,
                        best: bool = False, data_dir: str | None = None,
                        cache_dir: str | None = None, pretrain_eval: str | None = None,
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
    best: the checkpoint with the best validation metric instead.
    data_dir, cache_dir: override the config's data location.
    pretrain_eval: a pre-trained encoder's evaluation instead of the config's (`restore_learner`).

  Returns:
    `{"step", "split", "num_tasks", "num_inner_steps", "eval_seed", "config", "metrics":
    {name: {"mean", "ci95", "num_tasks"}}}`; "config" is the one evaluated (overrides applied).
  """
  config, _, learner, meta_params, ckpt_step = restore_learner(
    workdir, num_inner_steps=num_inner_steps, step=step, best=best, data_dir=data_dir,
    cache_dir=cache_dir, pretrain_eval=pretrain_eval)
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
          "config": build.config_to_dict(config), "metrics": summary}

