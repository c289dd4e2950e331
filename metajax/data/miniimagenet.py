"""mini-ImageNet (Vinyals et al. 2016; the Ravi & Larochelle 2017 class split) as class pools.

Two common on-disk formats are read from `data_dir` or `$METAJAX_MINIIMAGENET_DIR`:

* "csv": `train.csv`, `val.csv`, `test.csv` (header `filename,label`) next to an `images/` folder
  of JPEGs (64 / 16 / 20 classes of 600 images). Images are resized to `image_size` (84) with
  Lanczos when they are not that size already (as cbfinn/maml `proc_images.py`), and the decoded
  pool is cached like Omniglot's (`metajax.data.cache`).
* "pickle": `mini-imagenet-cache-{train,val,test}.pkl`, each a dict with `image_data`
  (`[N, 84, 84, 3]` uint8) and `class_dict` (`{label: [indices into image_data]}`). They are
  read with a restricted unpickler that only accepts numpy arrays and plain containers, so a
  tampered file cannot run code. No cache is needed.

The pool's classes are sorted by label (WordNet id); images within a class are in file order.
Images are uint8 by default: the 64 training classes are 1.1 GB as float32 and 271 MB as uint8,
and the episode samplers scale uint8 to [0, 1] on device.
"""

from __future__ import annotations

import collections
import csv
import io
import os
import pickle
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from metajax.data import cache as cache_lib
from metajax.data.omniglot import CorruptDataError
from metajax.data.samplers import ClassPool

MINIIMAGENET_DIR_ENV = "METAJAX_MINIIMAGENET_DIR"
SPLITS = ("train", "val", "test")
FORMATS = ("auto", "pickle", "csv")
PREPROCESSING_VERSION = 1


def find_miniimagenet_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
  """Returns the mini-ImageNet directory: `data_dir`, else `$METAJAX_MINIIMAGENET_DIR`.

  Raises:
    FileNotFoundError: if neither is given, or the directory does not exist.
  """
  if data_dir is None:
    env = os.environ.get(MINIIMAGENET_DIR_ENV)
    if not env:
      raise FileNotFoundError(
        f"no mini-ImageNet directory given: pass data_dir=... or set ${MINIIMAGENET_DIR_ENV} to a "
        "directory holding train.csv/val.csv/test.csv + images/, or mini-imagenet-cache-*.pkl"
      )
    data_dir = env
  path = Path(data_dir).expanduser()
  if not path.is_dir():
    raise FileNotFoundError(
      f"mini-ImageNet directory {str(path)!r} does not exist or is not a directory"
    )
  return path


class _ArrayUnpickler(pickle.Unpickler):
  """Unpickles numpy arrays, scalars, dicts and lists; refuses every other global."""

  _ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset(
    {
      ("numpy.core.multiarray", "_reconstruct"),
      ("numpy._core.multiarray", "_reconstruct"),
      ("numpy.core.multiarray", "scalar"),
      ("numpy._core.multiarray", "scalar"),
      ("numpy.core.numeric", "_frombuffer"),
      ("numpy._core.numeric", "_frombuffer"),
      ("numpy", "ndarray"),
      ("numpy", "dtype"),
      ("builtins", "bytearray"),
      ("__builtin__", "bytearray"),
      ("_codecs", "encode"),
    }
  )

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in self._ALLOWED:
      return super().find_class(module, name)
    raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")


def _load_pickle_split(path: Path) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
  try:
    with open(path, "rb") as f:
      data = _ArrayUnpickler(f, encoding="latin1").load()
  except (
    pickle.UnpicklingError,
    EOFError,
    ValueError,
    TypeError,
    AttributeError,
    ImportError,
  ) as e:
    raise CorruptDataError(f"cannot read mini-ImageNet pickle {str(path)!r}: {e}") from e
  if not isinstance(data, dict) or "image_data" not in data or "class_dict" not in data:
    keys = sorted(data) if isinstance(data, dict) else type(data).__name__
    raise CorruptDataError(
      f"{str(path)!r} is not a mini-ImageNet cache: expected a dict with 'image_data' and "
      f"'class_dict', got {keys}"
    )
  images = np.asarray(data["image_data"])
  if images.ndim != 4 or images.shape[-1] != 3:
    raise CorruptDataError(
      f"{str(path)!r}: image_data has shape {images.shape}, expected [N, H, W, 3]"
    )
  labels = sorted(data["class_dict"], key=str)
  indices = [np.asarray(data["class_dict"][label], dtype=np.int64).reshape(-1) for label in labels]
  for label, idx in zip(labels, indices):
    if idx.size and (idx.min() < 0 or idx.max() >= len(images)):
      raise CorruptDataError(
        f"{str(path)!r}: class {label!r} indexes outside image_data ({len(images)} images)"
      )
  return images, np.array([str(label) for label in labels]), indices


def _read_csv(path: Path) -> dict[str, list[str]]:
  by_label: dict[str, list[str]] = {}
  with open(path, newline="") as f:
    reader = csv.reader(f)
    header = next(reader, None)
    if header is None or [h.strip() for h in header[:2]] != ["filename", "label"]:
      raise CorruptDataError(f"{str(path)!r}: expected a header 'filename,label', got {header}")
    for row in reader:
      if not row:
        continue
      if len(row) < 2:
        raise CorruptDataError(f"{str(path)!r}: malformed row {row}")
      by_label.setdefault(row[1].strip(), []).append(row[0].strip())
  if not by_label:
    raise CorruptDataError(f"{str(path)!r} lists no images")
  return by_label


def _decode_jpeg(path: Path, image_size: int) -> np.ndarray:
  try:
    with Image.open(io.BytesIO(path.read_bytes())) as image:
      image.load()
      image = image.convert("RGB")
      if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.Resampling.LANCZOS)
      return np.asarray(image, dtype=np.uint8)
  except FileNotFoundError:
    raise FileNotFoundError(
      f"mini-ImageNet image {str(path)!r} listed in the split CSV is missing"
    ) from None
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise CorruptDataError(f"unreadable image {str(path)!r}: {e}") from e


def _equal_counts(split: str, labels: np.ndarray, counts: list[int]) -> int:
  if len(set(counts)) != 1:
    usual = collections.Counter(counts).most_common(1)[0][0]
    detail = ", ".join(f"{label}: {n}" for label, n in zip(labels, counts) if n != usual)
    raise CorruptDataError(
      f"mini-ImageNet split {split!r} has classes of different sizes ({detail}; the others "
      f"{usual}); a pool needs the same number of images in every class"
    )
  return counts[0]


def load_miniimagenet(
  data_dir: str | os.PathLike[str] | None = None,
  split: str = "train",
  *,
  format: str = "auto",
  image_size: int = 84,
  dtype: np.dtype | type | str = np.uint8,
  cache_dir: str | os.PathLike[str] | None = None,
  use_cache: bool = True,
) -> ClassPool:
  """Loads one split of mini-ImageNet as a `ClassPool` `[C, 600, 84, 84, 3]`.

  Args:
    data_dir: the dataset folder; default `$METAJAX_MINIIMAGENET_DIR`.
    split: "train", "val" or "test".
    format: "pickle" (`mini-imagenet-cache-<split>.pkl`), "csv" (`<split>.csv` + `images/`), or
      "auto": pickle if that file exists, else csv.
    image_size: output side for the csv format (the pickles are used as stored).
    dtype: uint8 (default, values in [0, 255]) or float32 (values in [0, 1]).
    cache_dir: where the csv format's decoded cache is kept (see `metajax.data.cache`).
    use_cache: False to neither read nor write the csv format's cache.

  Returns:
    A `ClassPool`; class names are the labels (WordNet ids), metadata `label` the same.

  Raises:
    FileNotFoundError: missing folder, split files or images.
    CorruptDataError (a ValueError): an unreadable pickle/CSV/JPEG, or unequal class sizes.
    ValueError: unknown split or format.
  """
  if split not in SPLITS:
    raise ValueError(f"unknown mini-ImageNet split {split!r}; allowed: {', '.join(SPLITS)}")
  if format not in FORMATS:
    raise ValueError(f"unknown mini-ImageNet format {format!r}; allowed: {', '.join(FORMATS)}")
  root = find_miniimagenet_dir(data_dir)
  pickle_path = root / f"mini-imagenet-cache-{split}.pkl"
  csv_path = root / f"{split}.csv"
  if format == "auto":
    format = "pickle" if pickle_path.is_file() else "csv"
  if format == "pickle":
    if not pickle_path.is_file():
      raise FileNotFoundError(f"mini-ImageNet pickle {str(pickle_path)!r} not found")
    images, labels, indices = _load_pickle_split(pickle_path)
    if not labels.size:
      raise CorruptDataError(f"{str(pickle_path)!r}: class_dict is empty")
    _equal_counts(split, labels, [len(i) for i in indices])
    pool_images = images[np.stack(indices)]  # [C, M, H, W, 3]
  else:
    if not csv_path.is_file():
      raise FileNotFoundError(
        f"mini-ImageNet split {split!r} not found in {str(root)!r}: expected {pickle_path.name} "
        f"or {csv_path.name} with an images/ folder"
      )
    image_dir = root / "images"
    if not image_dir.is_dir():
      raise FileNotFoundError(f"mini-ImageNet image folder {str(image_dir)!r} not found")
    by_label = _read_csv(csv_path)
    labels = np.array(sorted(by_label))
    _equal_counts(split, labels, [len(by_label[label]) for label in labels])

    def build() -> dict[str, np.ndarray]:
      return {
        "images": np.stack(
          [
            np.stack([_decode_jpeg(image_dir / f, image_size) for f in by_label[label]])
            for label in labels
          ]
        )
      }

    if use_cache:
      files = [image_dir / f for label in labels for f in by_label[label]]
      missing = [str(f) for f in files if not f.is_file()]
      if missing:
        raise FileNotFoundError(
          f"{len(missing)} images listed in {csv_path.name} are missing, e.g. {missing[0]!r}"
        )
      listing = cache_lib.make_key(
        files=[(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
      )
      key = cache_lib.make_key(
        dataset="miniimagenet",
        version=PREPROCESSING_VERSION,
        split=split,
        image_size=int(image_size),
        csv=cache_lib.fingerprint([csv_path]),
        images=listing,
      )
      path = cache_lib.resolve_cache_dir(cache_dir) / (
        f"metajax-miniimagenet-{split}-{int(image_size)}px-{key[:16]}.npz"
      )
      pool_images = cache_lib.cached_arrays(path, key=key, build=build)["images"]
    else:
      pool_images = build()["images"]
  pool = ClassPool(images=pool_images, class_names=labels, metadata={"label": labels})
  return pool.astype(dtype)
