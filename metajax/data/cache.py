"""A small, safe on-disk cache of preprocessed numpy arrays.

Preprocessing a dataset (decoding and resizing 32,460 Omniglot PNGs, or 60,000 mini-ImageNet
JPEGs) is done once and stored as one compressed `.npz` file. The file is

* keyed: its name and contents carry a key built from a fingerprint of the source files and the
  preprocessing options (`make_key`), so a changed source or option makes a new cache file;
* written atomically: to a temporary file in the same directory, then `os.replace`d into place,
  so a crash or a concurrent reader never sees a half-written cache;
* verified: a sha256 of the stored arrays is saved with them and checked on every load, so a
  truncated or bit-flipped cache is detected, reported with a warning and rebuilt, never used.

Where it goes (`resolve_cache_dir`): an explicit `cache_dir` argument, else `$METAJAX_CACHE_DIR`,
else the user's cache directory (`user_cache_dir()`: `$XDG_CACHE_HOME/metajax`, by default
`~/.cache/metajax`; `~/Library/Caches/metajax` on macOS, `%LOCALAPPDATA%\\metajax` on Windows).
Never the data folder unless it is passed as `cache_dir`: a data folder is only read, it may be
read-only or shared between users, and what a loader left there would change what the next
user, or the next test run, finds in it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

CACHE_DIR_ENV = "METAJAX_CACHE_DIR"

_KEY_FIELD = "__metajax_cache_key__"
_CHECKSUM_FIELD = "__metajax_checksum__"
_CHUNK = 1 << 20


def fingerprint(paths: Iterable[str | os.PathLike[str]]) -> str:
  """Returns a hex sha256 identifying the contents of files and directories.

  A file contributes the sha256 of its bytes (cheap for archives of a few MB). A directory
  contributes its sorted listing of relative paths, sizes and modification times (reading every
  byte of an extracted dataset would cost as much as preprocessing it).

  Args:
    paths: files or directories, in a fixed order.

  Returns:
    A 64-character hex digest.

  Raises:
    FileNotFoundError: if a path does not exist.
  """
  total = hashlib.sha256()
  for path in paths:
    path = Path(path)
    if path.is_file():
      digest = hashlib.sha256()
      with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
          digest.update(chunk)
      total.update(f"file:{path.name}:{digest.hexdigest()}\n".encode())
    elif path.is_dir():
      total.update(f"dir:{path.name}\n".encode())
      for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
          full = Path(root) / name
          st = full.stat()
          rel = full.relative_to(path).as_posix()
          total.update(f"{rel}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    else:
      raise FileNotFoundError(f"cannot fingerprint {str(path)!r}: no such file or directory")
  return total.hexdigest()


def make_key(**fields: Any) -> str:
  """Returns a hex sha256 of JSON-serializable `fields` (sorted), used as a cache key."""
  blob = json.dumps(fields, sort_keys=True, default=str).encode()
  return hashlib.sha256(blob).hexdigest()


def user_cache_dir() -> Path:
  """The platform's per-user cache directory for metajax.

  `$XDG_CACHE_HOME/metajax` when that variable holds an absolute path (the XDG base directory
  specification ignores relative ones), else `~/Library/Caches/metajax` on macOS,
  `%LOCALAPPDATA%\\metajax` on Windows, and `~/.cache/metajax` elsewhere.
  """
  xdg = os.environ.get("XDG_CACHE_HOME", "")
  if xdg and os.path.isabs(xdg):
    return Path(xdg) / "metajax"
  if sys.platform == "darwin":
    return Path.home() / "Library" / "Caches" / "metajax"
  if sys.platform == "win32" and os.environ.get("LOCALAPPDATA"):
    return Path(os.environ["LOCALAPPDATA"]) / "metajax"
  return Path.home() / ".cache" / "metajax"


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
  """Where caches go: `cache_dir`, else `$METAJAX_CACHE_DIR`, else `user_cache_dir()`.

  Args:
    cache_dir: an explicit directory (the only way a cache lands beside the data).

  Returns:
    The directory, `~` expanded; it may not exist yet (`save_arrays` creates it).
  """
  if cache_dir is not None and str(cache_dir):
    return Path(cache_dir).expanduser()
  env = os.environ.get(CACHE_DIR_ENV)
  if env:
    return Path(env).expanduser()
  return user_cache_dir()


def array_checksum(arrays: Mapping[str, np.ndarray]) -> str:
  """Returns a sha256 over the names, dtypes, shapes and bytes of `arrays`."""
  digest = hashlib.sha256()
  for name in sorted(arrays):
    array = np.ascontiguousarray(arrays[name])
    digest.update(f"{name}:{array.dtype.str}:{array.shape}\n".encode())
    digest.update(array.reshape(-1).view(np.uint8).data if array.size else b"")
  return digest.hexdigest()


def save_arrays(
  path: str | os.PathLike[str], arrays: Mapping[str, np.ndarray], *, key: str
) -> None:
  """Writes `arrays` to a compressed `.npz` at `path`, atomically, with `key` and a checksum.

  Args:
    path: destination file; its directory is created if needed.
    arrays: name -> array; names must not start with `__metajax`. Object arrays are refused
      (they would need pickle to load).
    key: the cache key (see `make_key`), checked by `load_arrays`.

  Raises:
    OSError: if the directory cannot be created or written.
    ValueError: for an object-dtype array or a reserved name.
  """
  path = Path(path)
  for name, array in arrays.items():
    if name.startswith("__metajax"):
      raise ValueError(f"array name {name!r} is reserved")
    if np.asarray(array).dtype == object:
      raise ValueError(f"array {name!r} has dtype object; store strings as a unicode array")
  payload = {name: np.asarray(array) for name, array in arrays.items()}
  payload[_KEY_FIELD] = np.asarray(key)
  payload[_CHECKSUM_FIELD] = np.asarray(array_checksum(_without_meta(payload)))
  with atomic_write(path) as f:
    np.savez_compressed(f, **payload)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], suffix: str = ".tmp") -> Iterator[BinaryIO]:
  """Writes `path` all at once or not at all: a binary file to write into, renamed into place.

  The file is a temporary one in `path`'s directory (created if missing); when the block ends it
  is flushed, fsync-ed, made readable by all (a cache or data folder may be shared) and renamed
  to `path`. An exception inside the block (e.g. a failed check of what was written) removes it:
  a reader never sees a partial file, and nothing is left behind.
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
  try:
    with os.fdopen(fd, "wb") as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # mkstemp makes it owner-only
    os.replace(tmp, path)
  except BaseException:
    try:
      os.unlink(tmp)
    except OSError:
      pass
    raise


def _without_meta(payload: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Returns `payload` without the key and checksum fields."""
  return {k: v for k, v in payload.items() if not k.startswith("__metajax")}


def load_arrays(path: str | os.PathLike[str], *, key: str) -> dict[str, np.ndarray] | None:
  """Loads a cache written by `save_arrays`, or returns None if it is absent, stale or corrupt.

  A file that exists but cannot be read, has a different key, or whose arrays do not match the
  stored checksum is reported with a `RuntimeWarning` (so a corrupt cache is never silently used)
  and None is returned, so the caller rebuilds it.
  """
  path = Path(path)
  if not path.exists():
    return None
  try:
    with np.load(path, allow_pickle=False) as npz:
      payload = {name: npz[name] for name in npz.files}
    stored_key = str(payload[_KEY_FIELD])
    stored_checksum = str(payload[_CHECKSUM_FIELD])
  # a truncated file, a failed CRC check, a corrupt deflate stream of a member
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as e:
    warnings.warn(f"ignoring unreadable cache {str(path)!r} ({e!r}); rebuilding it", RuntimeWarning)
    return None
  if stored_key != key:
    warnings.warn(
      f"ignoring cache {str(path)!r} built for another source; rebuilding it", RuntimeWarning
    )
    return None
  arrays = _without_meta(payload)
  if array_checksum(arrays) != stored_checksum:
    warnings.warn(
      f"ignoring corrupt cache {str(path)!r} (checksum mismatch); rebuilding it", RuntimeWarning
    )
    return None
  return arrays


def cached_arrays(
  path: str | os.PathLike[str],
  *,
  key: str,
  build: Callable[[], Mapping[str, np.ndarray]],
) -> dict[str, np.ndarray]:
  """Returns the arrays cached at `path` for `key`, building and saving them if needed.

  If saving fails (a read-only or full disk), a warning is issued and the built arrays are
  returned anyway: a cache is an optimization, not a requirement.
  """
  arrays = load_arrays(path, key=key)
  if arrays is not None:
    return arrays
  arrays = {name: np.asarray(array) for name, array in build().items()}
  try:
    save_arrays(path, arrays, key=key)
  except OSError as e:
    warnings.warn(
      f"could not write cache {str(path)!r} ({e!r}); continuing without it", RuntimeWarning
    )
  return arrays
