"""A training run's checkpoints on orbax-checkpoint, verified when read back.

A checkpoint is the step folder `<directory>/checkpoint_<step:08d>/` of an orbax
`CheckpointManager`, with the items

  state    the state pytree as nested dicts of numpy arrays (`ocp.args.StandardSave`),
  config   the run's config, as JSON beside the state,
  extra    JSON the caller needs to resume exactly, e.g. the training loop's metric accumulators
           (only when given; checkpoints written before it existed have none),
  digest   a sha256 over the step, the config, the metrics, the extra JSON and every array's
           name, dtype, shape and bytes,
  metrics  the step's validation metrics (only when the run keeps its best checkpoint).

orbax does the writing: synchronously, into a temporary folder renamed into place once complete,
by the one process that opens the directory (in a multi-process run the primary alone, as orbax
is told: no barrier waits for the others); it keeps the `keep` newest checkpoints plus
the best one by a validation metric (`Best`) and deletes the others. metajax adds what orbax does
not do: the digest, because orbax hands back whatever bytes it finds on disk, so that a flipped
bit of an array or a flipped digit of the stored config is caught instead of silently changing
the run; `read_latest` (and `read_checkpoint`, which also returns the metrics and the extra JSON)
names a corrupt or partial newest checkpoint in one `CheckpointWarning` and falls back to the
previous good one; a SIGINT (Ctrl-C) during a save takes effect once the save is complete;
`Checkpoints` removes the temporaries of writes that were killed; errors name the entries that do
not fit the model; and a directory of metajax's earlier msgpack format is refused with a message
saying so.

    with Checkpoints(ckpt_dir, keep=3, best=Best("eval/accuracy_after", "max")) as checkpoints:
      checkpoints.save(step, state, config=config_dict, metrics={"eval/accuracy_after": 0.93})
    state, config, step = restore(ckpt_dir, target)    # target: a pytree of the same structure
    checkpoint = read_checkpoint(ckpt_dir)    # the raw state dict, config, step, metrics, extra

It also holds `write_atomic` and `write_json_atomic`, which write a run's small files (the config,
the results) so that readers see the old file or the new one, never a mix.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import re
import shutil
import signal
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import serialization, traverse_util
from orbax.checkpoint import checkpoint_managers

from metajax.types import PyTree

FORMAT = "metajax-orbax-v1"
_PREFIX = "checkpoint"
_DIGITS = 8
_NAME = re.compile(rf"{_PREFIX}_(\d{{{_DIGITS},}})")
_ITEMS = ("state", "config", "digest", "extra")
_OLD_FORMAT = "checkpoint_*.msgpack"  # metajax's earlier format, one msgpack file per step
# orbax's step folders are written as `<name>.orbax-checkpoint-tmp-<timestamp>` and renamed
_ORBAX_TMP = ".orbax-checkpoint-tmp"
_ATOMIC_TMP = re.compile(r"\..+\.[^.]+\.tmp")  # write_atomic's temporaries, `.<name>.<random>.tmp`


class CheckpointError(ValueError):
  """A checkpoint that does not exist, cannot be read, or does not fit the run."""


class OneLineWarning(UserWarning):
  """A warning about the user's run or files, which the binaries print as one line."""


class CheckpointWarning(OneLineWarning):
  """A broken checkpoint was skipped, and another good one read instead."""


def one_line_warnings() -> None:
  """Makes `OneLineWarning`s (`CheckpointWarning`, `train.DivergenceWarning`) print as one
  `warning: <message>` line (for binaries: the message names the checkpoint or the step; the
  source line that warned means nothing to their user). Other warnings print as before."""
  default = warnings.formatwarning
  if getattr(default, "_one_line", False):
    return

  def format_warning(message, category, filename, lineno, line=None):
    if issubclass(category, OneLineWarning):  # orbax's errors inside may span lines
      return f"warning: {' '.join(str(message).split())}\n"
    return default(message, category, filename, lineno, line)

  format_warning._one_line = True  # type: ignore[attr-defined]
  warnings.formatwarning = format_warning


class Checkpoint(NamedTuple):
  """A verified checkpoint as read back (`read_checkpoint`)."""

  state: dict[str, Any]  # the raw nested state dict of numpy arrays
  config: dict[str, Any]
  step: int
  metrics: dict[str, float] | None  # the stored validation metrics (when a `Best` is tracked)
  extra: Any  # the extra JSON given to `save` (None when none was)


class Best(NamedTuple):
  """Which checkpoint is the best: the highest `metric` (mode "max") or the lowest ("min")."""

  metric: str
  mode: str = "max"


# ------------------------------------------------------------------------------------- listing


def checkpoint_path(directory: str | os.PathLike[str], step: int) -> Path:
  """The folder of step `step`'s checkpoint."""
  return Path(directory) / f"{_PREFIX}_{int(step):0{_DIGITS}d}"


def all_steps(directory: str | os.PathLike[str]) -> list[int]:
  """Steps of the complete checkpoints in `directory`, ascending (temporaries ignored)."""
  directory = Path(directory)
  if not directory.is_dir():
    return []
  return sorted(int(m.group(1)) for m in map(_NAME.fullmatch, os.listdir(directory))
                if m and (directory / m.group(0)).is_dir())


def latest_step(directory: str | os.PathLike[str]) -> int | None:
  steps = all_steps(directory)
  return steps[-1] if steps else None


def check_format(directory: str | os.PathLike[str]) -> None:
  """Refuses a directory of metajax's earlier checkpoint format.

  Raises:
    CheckpointError: `directory` holds `checkpoint_*.msgpack` files.
  """
  old = sorted(p.name for p in Path(directory).glob(_OLD_FORMAT))
  if old:
    raise CheckpointError(
      f"{str(directory)!r} holds checkpoints of metajax's earlier msgpack format ({old[-1]}"
      f"{f' and {len(old) - 1} more' if len(old) > 1 else ''}), which this version does not "
      "read (checkpoints are orbax-checkpoint folders now): train in a new --workdir, or delete "
      "those files to train this one again from step 0")


def _score(best: Best, metrics: Mapping[str, Any] | None) -> float:
  """Higher is better; a checkpoint without the metric ranks below every one with it."""
  if not metrics or best.metric not in metrics:
    return -math.inf
  value = float(metrics[best.metric])
  return value if best.mode == "max" else -value


def best_step(directory: str | os.PathLike[str], best: Best) -> int | None:
  """The step whose stored metrics are the best by `best` (None if none has the metric)."""
  steps = all_steps(directory)
  if not steps:
    return None
  with _manager(directory, write=False) as manager:
    scores = {step: _score(best, manager.metrics(step)) for step in steps}
  step = max(steps, key=lambda s: (scores[s], s))
  return step if scores[step] > -math.inf else None


# ------------------------------------------------------------------------------------- writing


class _QuietOrbax(logging.Filter):
  """Drops orbax-checkpoint's INFO records (a dozen per save, which absl binaries print); its
  warnings and errors pass."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno > logging.INFO or f"{os.sep}orbax{os.sep}" not in record.pathname


class _QuietTensorstoreTasks(logging.Filter):
  """Drops asyncio's "Task exception was never retrieved" records of tensorstore reads: when
  orbax reads a damaged checkpoint, the sibling reads of the one whose error it raises are left
  unretrieved, and asyncio prints each with a page of tensorstore spec when it is collected. The
  error itself reaches the caller (`read_checkpoint` names the checkpoint)."""

  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return not ("Task exception was never retrieved" in message and "tensorstore" in message)


def _quiet_orbax() -> None:
  for logger, quiet in ((logging.getLogger("absl"), _QuietOrbax),  # orbax logs through absl
                        (logging.getLogger("asyncio"), _QuietTensorstoreTasks)):
    if not any(isinstance(f, quiet) for f in logger.filters):
      logger.addFilter(quiet())


class _Manager(ocp.CheckpointManager):
  """orbax's manager, except that a step's metrics that cannot be read count as absent.

  orbax reads every step's metrics when it opens a directory, so one unparsable metrics file
  would make every checkpoint of it unreadable; as absent, only that step's digest fails.
  """

  def _get_metrics(self, step: int) -> Any:
    try:
      return super()._get_metrics(step)
    except Exception:  # noqa: BLE001 - JSON, unicode and OS errors of a damaged file
      return None


def _manager(directory: str | os.PathLike[str], *, write: bool, keep: int | None = None,
             best: Best | None = None) -> ocp.CheckpointManager:
  _quiet_orbax()
  policies = [checkpoint_managers.LatestN(n=keep)]
  tracking = {}
  if best is not None:
    if best.mode not in ("max", "min"):
      raise ValueError(f"Best.mode must be 'max' or 'min', got {best.mode!r}")
    score = functools.partial(_score, best)
    policies.append(checkpoint_managers.BestN(get_metric_fn=score, n=1,
                                              keep_checkpoints_without_metrics=False))
    # orbax stores a step's metrics only when best_fn is set; the policy above decides deletion
    tracking = {"best_fn": score, "best_mode": "max"}
  alone = {}
  if jax.process_count() > 1:
    # The state saved is host numpy, which one process writes: the calling process works alone,
    # with no barrier that the other processes (which never open the checkpoints) would miss.
    me = jax.process_index()
    alone["multiprocessing_options"] = ocp.options.MultiprocessingOptions(
      primary_host=me, active_processes={me})
    if write:  # orbax does not create it with active_processes set
      Path(directory).mkdir(parents=True, exist_ok=True)
  options = ocp.CheckpointManagerOptions(
    step_prefix=_PREFIX, step_format_fixed_length=_DIGITS, create=write and not alone,
    enable_async_checkpointing=False,  # a returned save is on disk: resume stays simple
    preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies), **tracking, **alone)
  return _Manager(Path(directory).absolute(), options=options, item_names=_ITEMS)


def remove_temporaries(directory: str | os.PathLike[str]) -> list[str]:
  """Removes what killed writes left in `directory`: orbax's unfinished step folders and
  `write_atomic`'s temporary files (primary process only). Returns the names removed."""
  directory = Path(directory)
  if jax.process_index() != 0 or not directory.is_dir():
    return []
  removed = []
  for path in sorted(directory.iterdir()):
    if _ORBAX_TMP in path.name and path.is_dir():
      shutil.rmtree(path, ignore_errors=True)
    elif _ATOMIC_TMP.fullmatch(path.name) and path.is_file():
      path.unlink(missing_ok=True)
    else:
      continue
    removed.append(path.name)
  return removed


def _to_host(tree: PyTree) -> PyTree:
  def leaf(x):
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      raise TypeError("typed PRNG keys cannot be saved: store jax.random.key_data(key)")
    return np.asarray(x)

  return jax.tree.map(leaf, jax.device_get(tree))


def _plain(obj: Any) -> Any:
  """`obj` as it reads back from JSON (tuples become lists), so the digest sees what is stored."""
  return json.loads(json.dumps(obj, sort_keys=True))


def digest(step: int, state_dict: Mapping[str, Any], config: Any, metrics: Any,
           extra: Any = None) -> str:
  """sha256 of everything a checkpoint holds: step, config, metrics, the extra JSON, and each
  array's name, dtype, shape and bytes."""
  header = {"format": FORMAT, "step": int(step), "config": config, "metrics": metrics}
  if extra is not None:  # absent from the header of checkpoints without it, as before it existed
    header["extra"] = extra
  h = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
  for name, leaf in sorted(traverse_util.flatten_dict(dict(state_dict), sep="/").items()):
    array = np.asarray(leaf)
    h.update(json.dumps([name, array.dtype.str, array.shape]).encode())
    h.update(array.tobytes())
  return h.hexdigest()


@contextlib.contextmanager
def _uninterruptible() -> Iterator[None]:
  """Holds back SIGINT (Ctrl-C) until the block is done, then acts on it as it would have: a save
  once started completes (only in the main thread, where Python handles signals)."""
  previous = signal.getsignal(signal.SIGINT)
  if threading.current_thread() is not threading.main_thread() or previous is None:
    yield  # None: a handler installed outside Python, which cannot be put back
    return
  received: list[Any] = []
  signal.signal(signal.SIGINT, lambda signum, frame: received.append(frame))
  try:
    yield
  finally:
    signal.signal(signal.SIGINT, previous)
  if received:
    if callable(previous):
      previous(signal.SIGINT, received[0])  # the default handler raises KeyboardInterrupt
    elif previous == signal.SIG_DFL:
      signal.raise_signal(signal.SIGINT)


class Checkpoints:
  """A run's checkpoint directory opened for writing: one orbax `CheckpointManager`.

  Opening it refuses the earlier format and removes the temporaries of killed writes (their
  names are in `removed`). Use it as a context manager, or call `close`.
  """

  def __init__(self, directory: str | os.PathLike[str], *, keep: int = 3,
               best: Best | None = None):
    """
    Args:
      directory: the checkpoint directory (created if needed).
      keep: how many of the newest checkpoints to keep (>= 1).
      best: also keep the best checkpoint by this metric of `save`'s `metrics`.
    """
    if keep < 1:
      raise ValueError(f"keep must be >= 1, got {keep}")
    self.directory = Path(directory)
    check_format(self.directory)
    self.removed = remove_temporaries(self.directory)
    self.best = best
    self._manager = _manager(self.directory, write=True, keep=keep, best=best)

  def save(self, step: int, state: PyTree, *, config: Mapping[str, Any] | None = None,
           metrics: Mapping[str, float] | None = None,
           extra: Mapping[str, Any] | None = None) -> Path:
    """Writes step `step`'s checkpoint (then deletes those neither among the newest nor best).

    A SIGINT (Ctrl-C) during the save takes effect when it is complete.

    Args:
      step: the step number in the folder name.
      state: a pytree of arrays (NamedTuples, dicts, lists; raw key data for PRNG keys).
      config: a JSON-serialisable dict stored with the state.
      metrics: the step's validation metrics (kept only when the directory tracks a `Best`).
      extra: a JSON-serialisable dict the caller needs to resume exactly, read back as
        `read_checkpoint(...).extra` and covered by the digest.

    Returns:
      The folder written.
    """
    state_dict = serialization.to_state_dict(_to_host(state))
    config = _plain(dict(config or {}))
    stored = _plain({k: float(v) for k, v in (metrics or {}).items()}) if self.best else None
    extra = None if extra is None else _plain(dict(extra))
    items = {"state": ocp.args.StandardSave(state_dict), "config": ocp.args.JsonSave(config),
             "digest": ocp.args.JsonSave({
               "format": FORMAT, "sha256": digest(step, state_dict, config, stored, extra)})}
    if extra is not None:
      items["extra"] = ocp.args.JsonSave(extra)
    with _uninterruptible():
      self._manager.save(int(step), args=ocp.args.Composite(**items), metrics=stored, force=True)
    return checkpoint_path(self.directory, step)

  def discard(self, step: int) -> None:
    """Deletes step `step`'s checkpoint (e.g. a corrupt one that training will write again)."""
    try:
      self._manager.delete(int(step))
    except Exception:  # noqa: BLE001 - a checkpoint too broken for orbax to list
      if jax.process_index() == 0:
        shutil.rmtree(checkpoint_path(self.directory, step), ignore_errors=True)
    self._manager.reload()

  def close(self) -> None:
    self._manager.close()

  def __enter__(self) -> Checkpoints:  # noqa: PYI034 - not subclassed
    return self

  def __exit__(self, *exc: object) -> None:
    self.close()


def save(directory: str | os.PathLike[str], step: int, state: PyTree, *,
         config: Mapping[str, Any] | None = None, keep: int = 3,
         metrics: Mapping[str, float] | None = None, best: Best | None = None,
         extra: Mapping[str, Any] | None = None) -> Path:
  """`Checkpoints(directory, keep=keep, best=best).save(step, state, ...)`, then closes it."""
  with Checkpoints(directory, keep=keep, best=best) as checkpoints:
    return checkpoints.save(step, state, config=config, metrics=metrics, extra=extra)


# ------------------------------------------------------------------------------------- reading


def _read(directory: str | os.PathLike[str], step: int) -> Checkpoint:
  check_format(directory)
  path = checkpoint_path(directory, step)
  if not path.is_dir():
    raise CheckpointError(f"no checkpoint at {str(path)!r}")
  has_extra = (path / "extra").is_dir()  # checkpoints written without extra JSON have none
  try:
    with _manager(directory, write=False) as manager:
      args = {"state": ocp.args.StandardRestore(), "config": ocp.args.JsonRestore(),
              "digest": ocp.args.JsonRestore()}
      if has_extra:
        args["extra"] = ocp.args.JsonRestore()
      items = manager.restore(int(step), args=ocp.args.Composite(**args))
      metrics = manager.metrics(int(step))
  except Exception as e:  # orbax and tensorstore raise many types on missing or broken files
    raise CheckpointError(f"checkpoint {str(path)!r} is unreadable "
                          f"({type(e).__name__}: {e})") from e
  stamp = items["digest"]
  if not isinstance(stamp, dict) or stamp.get("format") != FORMAT:
    raise CheckpointError(f"{str(path)!r} is not a {FORMAT} checkpoint")
  state_dict, config = items["state"], items["config"]
  extra = items["extra"] if has_extra else None
  if digest(step, state_dict, config, metrics, extra) != stamp.get("sha256"):
    raise CheckpointError(f"checkpoint {str(path)!r} is corrupt (its arrays, config, metrics "
                          "or extra JSON do not match the digest written with them)")
  return Checkpoint(state_dict, config, int(step), metrics, extra)


def read_checkpoint(directory: str | os.PathLike[str], step: int | None = None, *,
                    best: Best | None = None) -> Checkpoint:
  """Reads and verifies a checkpoint: step `step`'s, or by default the newest good one (or with
  `best`, the good one with the best metric), any better-placed broken ones named in one
  `CheckpointWarning`.

  Raises:
    CheckpointError: step `step`'s checkpoint is missing, unreadable, not a metajax checkpoint,
      or does not match its digest (a corrupt file); without `step`: no readable checkpoint in
      `directory` (naming what was wrong with each), or with `best`, none with the metric.
  """
  if step is not None:
    return _read(directory, step)
  check_format(directory)
  steps = list(reversed(all_steps(directory)))
  if best is not None:
    with _manager(directory, write=False) as manager:
      scores = {s: _score(best, manager.metrics(s)) for s in steps}
    steps = sorted((s for s in steps if scores[s] > -math.inf), key=lambda s: (-scores[s], -s))
    if not steps:
      raise CheckpointError(f"no checkpoint in {str(directory)!r} has a {best.metric} to pick "
                            "the best by")
  errors = []
  for candidate in steps:
    try:
      checkpoint = _read(directory, candidate)
    except CheckpointError as e:
      errors.append(str(e))
      continue
    if errors:
      which = "best" if best is not None else "newest"
      warnings.warn(f"skipping {len(errors)} broken checkpoint(s), using the {which} good one, "
                    f"step {candidate}, instead: " + "; ".join(errors), CheckpointWarning,
                    stacklevel=2)
    return checkpoint
  raise CheckpointError(f"no readable checkpoint in {str(directory)!r}"
                        + (f" ({'; '.join(errors)})" if errors else ""))


def read(directory: str | os.PathLike[str], step: int
         ) -> tuple[dict[str, Any], dict[str, Any], int]:
  """Reads and verifies step `step`'s checkpoint.

  Returns:
    `(state_dict, config, step)`: the raw nested state dict (numpy arrays), the stored config.

  Raises:
    CheckpointError: no such checkpoint, unreadable, not a metajax checkpoint, or its digest
      does not match what was read (a corrupt file).
  """
  checkpoint = _read(directory, step)
  return checkpoint.state, checkpoint.config, checkpoint.step


def read_latest(directory: str | os.PathLike[str]
                ) -> tuple[dict[str, Any], dict[str, Any], int]:
  """`read` of the newest good checkpoint in `directory`; any newer broken ones are named in one
  `CheckpointWarning`.

  Raises:
    CheckpointError: no readable checkpoint in `directory` (naming what was wrong with each).
  """
  checkpoint = read_checkpoint(directory)
  return checkpoint.state, checkpoint.config, checkpoint.step


def _shape_dtype(x: Any) -> tuple[tuple[int, ...], np.dtype]:
  # arrays, numpy scalars and jax.ShapeDtypeStruct (a target from jax.eval_shape)
  if hasattr(x, "shape") and hasattr(x, "dtype"):
    return tuple(x.shape), np.dtype(x.dtype)
  return np.shape(x), np.result_type(x)


def restore_into(target: PyTree, state_dict: Mapping[str, Any]) -> PyTree:
  """Fills `target`'s structure with the arrays of `state_dict`, checking names, shapes, dtypes.

  `target` may hold arrays or `jax.ShapeDtypeStruct`s (e.g. from `jax.eval_shape(init)`).

  Raises:
    CheckpointError: naming every entry that is missing, extra, or of another shape or dtype.
  """
  want = traverse_util.flatten_dict(serialization.to_state_dict(target), sep="/")
  have = traverse_util.flatten_dict(dict(state_dict), sep="/")
  problems = [f"{k}: missing from the checkpoint" for k in sorted(set(want) - set(have))]
  problems += [f"{k}: in the checkpoint but not in this model"
               for k in sorted(set(have) - set(want))]
  for k in sorted(set(want) & set(have)):
    (w, wd), (h, hd) = _shape_dtype(want[k]), _shape_dtype(have[k])
    if w != h or wd != hd:
      problems.append(f"{k}: shape {h} {hd} in the checkpoint, {w} {wd} in this model")
  if problems:
    shown = problems[:10] + ([f"... and {len(problems) - 10} more"] if len(problems) > 10 else [])
    raise CheckpointError("the checkpoint does not fit this model/config:\n  " + "\n  ".join(shown))
  return serialization.from_state_dict(target, dict(state_dict))


def restore(directory: str | os.PathLike[str], target: PyTree, *,
            step: int | None = None) -> tuple[PyTree, dict[str, Any], int]:
  """Restores the newest good (or the given step's) checkpoint into `target`'s structure.

  Returns:
    `(state, config, step)` with numpy arrays in `target`'s structure.
  """
  state_dict, config, step = read_latest(directory) if step is None else read(directory, step)
  return restore_into(target, state_dict), config, step


def copy_checkpoint(source: str | os.PathLike[str], step: int,
                    destination: str | os.PathLike[str]) -> Path:
  """Copies step `step`'s checkpoint folder from the directory `source` into `destination`
  (replacing one of the same step there), so that readers see the whole folder or none of it.

  Returns:
    The folder written.
  """
  src, dest = checkpoint_path(source, step), checkpoint_path(destination, step)
  if not src.is_dir():
    raise CheckpointError(f"no checkpoint at {str(src)!r}")
  dest.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f"{dest.name}{_ORBAX_TMP}-copy-"))
  try:
    shutil.copytree(src, tmp, dirs_exist_ok=True)
    if dest.exists():
      shutil.rmtree(dest)
    os.replace(tmp, dest)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return dest


# ------------------------------------------------------------------------------- small files


def write_atomic(path: str | os.PathLike[str], data: bytes) -> None:
  """Writes `data` to `path` so that readers see the old file or the new one, never a mix."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise
  _fsync_dir(path.parent)


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
  """`json.dumps(obj, indent=2)` written with `write_atomic`."""
  write_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def _fsync_dir(directory: Path) -> None:
  try:
    fd = os.open(directory, os.O_RDONLY)
  except OSError:  # e.g. platforms without directory fds
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)
