"""Shared pytest fixtures.

Data fixtures: the real Omniglot archives live in `shared/data/omniglot` beside the repository
root (in CI the clone has `shared/` beside it too), unless `$METAJAX_OMNIGLOT_DIR` points
elsewhere. Tests that need them fail (never skip) when they are missing. Everything the tests
write, caches included, goes to pytest's temporary directories.
"""

from __future__ import annotations

import io
import os
import tempfile
import time
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from metajax.platform import runtime as _runtime

# The test processes (pytest-xdist's workers are started after this module is imported) and the
# binaries they launch use the malloc the binaries re-execute themselves with
# (metajax.platform.runtime): the same code paths, and the suite's big jitted steps run faster.
os.environ.update(_runtime.hugepage_environ(os.environ))

# Caches of the suite (and of the binaries it launches) never go to the user's cache directory:
# a private folder, shared by pytest-xdist's workers (they inherit the controller's environment),
# unless the caller chose one (CI sets $METAJAX_CACHE_DIR to a folder of its clone).
os.environ.setdefault("METAJAX_CACHE_DIR", tempfile.mkdtemp(prefix="metajax-test-cache-"))

OMNIGLOT_DIR_ENV = "METAJAX_OMNIGLOT_DIR"
SHARED_OMNIGLOT = Path(__file__).resolve().parents[2] / "shared/data/omniglot"


@pytest.fixture(scope="session")
def omniglot_dir() -> Path:
  """The directory of the real Omniglot archives (read-only)."""
  env = os.environ.get(OMNIGLOT_DIR_ENV)
  path = Path(env) if env else SHARED_OMNIGLOT
  if not (path / "images_background.zip").is_file() and not (path / "images_background").is_dir():
    pytest.fail(
      f"Omniglot archives not found in {str(path)!r}: put images_background.zip, "
      f"images_evaluation.zip, images_background_small1.zip and images_background_small2.zip "
      f"there (shared/data/omniglot beside the repository) or set ${OMNIGLOT_DIR_ENV}",
      pytrace=False,
    )
  return path


@pytest.fixture(scope="session")
def omniglot_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
  """A session-wide cache directory, so tests never touch a user's cache."""
  return tmp_path_factory.mktemp("metajax_cache")


@pytest.fixture(scope="session")
def omniglot_pool(omniglot_dir: Path, omniglot_cache_dir: Path):
  """All 1623 characters, 28x28 float32, preprocessed once per session (cold, into a tmp cache)."""
  from metajax.data import load_omniglot

  start = time.perf_counter()
  pool = load_omniglot(omniglot_dir, cache_dir=omniglot_cache_dir)
  seconds = time.perf_counter() - start
  print(f"\n[omniglot_pool] cold load + preprocessing of 32,460 images: {seconds:.1f} s")
  return pool


@pytest.fixture(scope="session")
def omniglot_finn(omniglot_pool):
  """`omniglot_split(omniglot_pool, "finn")`: train (4400 classes with rotations), val, test."""
  from metajax.data import omniglot_split

  return omniglot_split(omniglot_pool, "finn")


def _fake_png(seed: int, size: int = 105) -> bytes:
  """A 1-bit PNG like Omniglot's: white background (1), a few black (0) strokes."""
  rng = np.random.default_rng(seed)
  image = np.ones((size, size), dtype=bool)
  for _ in range(3):
    row, col = rng.integers(10, size - 30, size=2)
    length = int(rng.integers(10, 25))
    if rng.integers(2):
      image[row : row + 3, col : col + length] = False
    else:
      image[row : row + length, col : col + 3] = False
  buffer = io.BytesIO()
  Image.fromarray(image).convert("1").save(buffer, format="PNG")
  return buffer.getvalue()


def write_fake_omniglot(
  root: Path,
  archive: str = "images_background",
  alphabets: Sequence[tuple[str, int]] = (("Alpha", 2), ("Beta", 3)),
  *,
  first_id: int = 1,
  images_per_character: int = 20,
  as_zip: bool = True,
) -> Path:
  """Writes a small archive in Omniglot's layout; returns the zip file or the extracted folder.

  Args:
    root: the data directory to write into.
    archive: the archive name, e.g. "images_background".
    alphabets: (alphabet name, number of characters) pairs.
    first_id: the global id (NNNN) of the first character.
    images_per_character: drawings per character (Omniglot has 20).
    as_zip: write `root/<archive>.zip` (True) or the extracted folder `root/<archive>/`.
  """
  root.mkdir(parents=True, exist_ok=True)
  files: dict[str, bytes] = {}
  char_id = first_id
  for alphabet, num_characters in alphabets:
    for c in range(1, num_characters + 1):
      for drawer in range(1, images_per_character + 1):
        name = f"{archive}/{alphabet}/character{c:02d}/{char_id:04d}_{drawer:02d}.png"
        files[name] = _fake_png(char_id * 100 + drawer)
      char_id += 1
  if as_zip:
    path = root / f"{archive}.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
      for name, data in files.items():
        zf.writestr(name, data)
    return path
  for name, data in files.items():
    target = root / name
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
  return root / archive


@pytest.fixture
def fake_omniglot() -> Callable[..., Path]:
  """The factory `write_fake_omniglot(root, archive, alphabets, ...)`."""
  return write_fake_omniglot
