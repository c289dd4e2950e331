"""Atomic, verified checkpoints of a training run: state pytree + config, one msgpack file each.

A checkpoint is `<directory>/checkpoint_<step:08d>.msgpack`, holding a format tag, the step, the
run's config (JSON) and the state pytree (meta-params, optimiser state, step, PRNG key data)
serialised with `flax.serialization` (a bit-exact round trip of every array), plus a sha256 of
the serialised state.

Writes are atomic: the bytes go to a temporary file in the same directory, are fsync'ed, and the
file is `os.replace`d into place (then the directory is fsync'ed). A crash mid-write leaves at most
a stray `*.tmp` file, never a broken checkpoint; `latest_step` ignores temporaries and `restore`
falls back to the previous checkpoint (with a warning) if the newest one is unreadable all the
same. Only the `keep` newest checkpoints are kept.

    save(ckpt_dir, step, state, config=config.to_dict())
    state, config = restore(ckpt_dir, target=state)      # target: a pytree of the same structure
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
from flax import serialization
from flax import traverse_util

from metajax.types import PyTree

FORMAT = "metajax-checkpoint-v1"
_NAME = re.compile(r"^checkpoint_(\d{8,})\.msgpack$")


class CheckpointError(ValueError):
  """A checkpoint that does not exist, cannot be read, or does not fit the run."""


def checkpoint_path(directory: str | os.PathLike[str], step: int) -> Path:
  return Path(directory) / f"checkpoint_{int(step):08d}.msgpack"


def all_steps(directory: str | os.PathLike[str]) -> list[int]:
  """Steps of the checkpoints in `directory`, ascending (temporaries ignored)."""
  directory = Path(directory)
  if not directory.is_dir():
    return []
  return sorted(int(m.group(1)) for m in map(_NAME.match, os.listdir(directory)) if m)


def latest_step(directory: str | os.PathLike[str]) -> int | None:
  steps = all_steps(directory)
  return steps[-1] if steps else None


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


def _to_host(tree: PyTree) -> PyTree:
  def leaf(x):
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      raise TypeError("typed PRNG keys cannot be saved: store jax.random.key_data(key)")
    return np.asarray(x)

  return jax.tree.map(leaf, jax.device_get(tree))


def save(directory: str | os.PathLike[str], step: int, state: PyTree, *,
         config: Mapping[str, Any] | None = None, keep: int = 3) -> Path:
  """Writes the checkpoint of `step` atomically and deletes all but the `keep` newest.

  Args:
    directory: the checkpoint directory (created if needed).
    step: the step number in the file name.
    state: a pytree of arrays (NamedTuples, dicts, lists; raw key data for PRNG keys).
    config: a JSON-serialisable dict stored with the state.
    keep: how many checkpoints to keep (>= 1).

  Returns:
    The path written.
  """
  if keep < 1:
    raise ValueError(f"keep must be >= 1, got {keep}")
  state_bytes = serialization.msgpack_serialize(serialization.to_state_dict(_to_host(state)))
  payload = {
    "format": FORMAT,
    "step": int(step),
    "config": json.dumps(config if config is not None else {}, sort_keys=True),
    "sha256": hashlib.sha256(state_bytes).hexdigest(),
    "state": state_bytes,
  }
  path = checkpoint_path(directory, step)
  write_atomic(path, serialization.msgpack_serialize(payload))
  for old in all_steps(directory)[:-keep]:
    checkpoint_path(directory, old).unlink(missing_ok=True)
  return path


def read(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Any], int]:
  """Reads and verifies one checkpoint file.

  Returns:
    `(state_dict, config, step)`: the raw nested state dict (numpy arrays), the stored config.

  Raises:
    CheckpointError: unreadable, not a metajax checkpoint, or a checksum mismatch.
  """
  path = Path(path)
  try:
    payload = serialization.msgpack_restore(path.read_bytes())
  except FileNotFoundError:
    raise CheckpointError(f"no checkpoint at {str(path)!r}") from None
  except Exception as e:  # msgpack raises several types on truncated input
    raise CheckpointError(f"checkpoint {str(path)!r} is unreadable: {e}") from e
  if not isinstance(payload, dict) or payload.get("format") != FORMAT:
    raise CheckpointError(f"{str(path)!r} is not a {FORMAT} file")
  if hashlib.sha256(payload["state"]).hexdigest() != payload["sha256"]:
    raise CheckpointError(f"checkpoint {str(path)!r} is corrupt (checksum mismatch)")
  state_dict = serialization.msgpack_restore(payload["state"])
  return state_dict, json.loads(payload["config"]), int(payload["step"])


def read_latest(directory: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Any], int]:
  """`read` of the newest readable checkpoint in `directory` (skipping broken ones, with a warning).

  Raises:
    CheckpointError: no readable checkpoint in `directory`.
  """
  errors = []
  for step in reversed(all_steps(directory)):
    try:
      return read(checkpoint_path(directory, step))
    except CheckpointError as e:
      warnings.warn(f"skipping checkpoint: {e}", stacklevel=2)
      errors.append(str(e))
  raise CheckpointError(f"no readable checkpoint in {str(directory)!r}"
                        + (f" ({'; '.join(errors)})" if errors else ""))


def read_config(directory: str | os.PathLike[str]) -> dict[str, Any] | None:
  """The config stored in the newest readable checkpoint, or None if there is none."""
  if latest_step(directory) is None:
    return None
  return read_latest(directory)[1]


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
  problems += [f"{k}: in the checkpoint but not in this model" for k in sorted(set(have) - set(want))]
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
  """Restores the newest (or the given step's) checkpoint into `target`'s structure.

  Returns:
    `(state, config, step)` with numpy arrays in `target`'s structure.
  """
  if step is None:
    state_dict, config, step = read_latest(directory)
  else:
    state_dict, config, step = read(checkpoint_path(directory, step))
  return restore_into(target, state_dict), config, step
