"""mini-ImageNet (Vinyals et al. 2016; the Ravi & Larochelle 2017 class split) as class pools.

Three common forms are read from `data_dir` or `$METAJAX_MINIIMAGENET_DIR`:

* "csv": `train.csv`, `val.csv`, `test.csv` (header `filename,label`) next to an `images/` folder
  of JPEGs (64 / 16 / 20 classes of 600 images). Images are resized to `image_size` (84) with
  Lanczos when they are not that size already (as cbfinn/maml `proc_images.py`), and the decoded
  pool is cached like Omniglot's (`metajax.data.cache`).
* the same layout inside a zip archive, read in place (never extracted): `data_dir` is the
  archive itself, or a folder holding exactly one `*.zip` and no split files. The layout may sit
  under one top-level folder of the archive (`mini-imagenet/train.csv`, ...).
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
import hashlib
import io
import os
import pickle
import zipfile
import zlib
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
  """Returns the mini-ImageNet folder or archive: `data_dir`, else `$METAJAX_MINIIMAGENET_DIR`.

  Raises:
    FileNotFoundError: if neither is given, or the path is neither a folder nor a zip file.
  """
  if data_dir is None:
    env = os.environ.get(MINIIMAGENET_DIR_ENV)
    if not env:
      raise FileNotFoundError(
        f"no mini-ImageNet directory given: pass data_dir=... or set ${MINIIMAGENET_DIR_ENV} to a "
        "directory holding train.csv/val.csv/test.csv + images/ (or a zip of them), or "
        "mini-imagenet-cache-*.pkl"
      )
    data_dir = env
  path = Path(data_dir).expanduser()
  if not (path.is_dir() or (path.is_file() and path.suffix.lower() == ".zip")):
    raise FileNotFoundError(
      f"mini-ImageNet path {str(path)!r} is neither a directory nor a .zip archive"
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


def _parse_csv(text: str, where: str) -> dict[str, list[str]]:
  """`label -> [file names]` of a split CSV (header `filename,label`), in file order."""
  by_label: dict[str, list[str]] = {}
  reader = csv.reader(io.StringIO(text))
  header = next(reader, None)
  if header is None or [h.strip() for h in header[:2]] != ["filename", "label"]:
    raise CorruptDataError(f"{where}: expected a header 'filename,label', got {header}")
  for line, row in enumerate(reader, start=2):
    if not row:
      continue
    if len(row) < 2 or not row[0].strip() or not row[1].strip():
      raise CorruptDataError(f"{where}: malformed row {line}: {row}")
    by_label.setdefault(row[1].strip(), []).append(row[0].strip())
  if not by_label:
    raise CorruptDataError(f"{where} lists no images")
  return by_label


def _decode_jpeg(raw: bytes, where: str, image_size: int) -> np.ndarray:
  try:
    with Image.open(io.BytesIO(raw)) as image:
      image.load()
      image = image.convert("RGB")
      if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.Resampling.LANCZOS)
      return np.asarray(image, dtype=np.uint8)
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise CorruptDataError(f"unreadable image {where}: {e}") from e


class _CsvLayout:
  """The "csv" layout (`<split>.csv` + `images/`) in a folder or inside a zip archive.

  It lists a split's files by class, checks that each exists, identifies their contents for the
  cache key, and reads their bytes, with every failure naming the file (and the archive).
  """

  def __init__(self, root: Path) -> None:
    self.root = root
    self.zip: zipfile.ZipFile | None = None
    self.prefix = ""
    self.members: dict[str, zipfile.ZipInfo] = {}
    if root.is_file():
      try:
        self.zip = zipfile.ZipFile(root)
        self.members = {i.filename: i for i in self.zip.infolist() if not i.is_dir()}
      except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError) as e:
        if isinstance(e, PermissionError):
          raise
        raise CorruptDataError(
          f"corrupt or truncated mini-ImageNet archive {str(root)!r}: {e}"
        ) from e
      csvs = [n for n in self.members if n.rsplit("/", 1)[-1] in {f"{s}.csv" for s in SPLITS}
              and n.count("/") <= 1]
      prefixes = sorted({n.rsplit("/", 1)[0] + "/" if "/" in n else "" for n in csvs})
      if len(prefixes) > 1:
        raise CorruptDataError(
          f"mini-ImageNet archive {str(root)!r} holds split CSVs in several folders {prefixes}"
        )
      self.prefix = prefixes[0] if prefixes else ""

  def close(self) -> None:
    if self.zip is not None:
      self.zip.close()

  def where(self, name: str) -> str:
    """`name` (relative to the layout's root) as the user finds it."""
    if self.zip is None:
      return repr(str(self.root / name))
    return f"{self.prefix + name!r} in archive {str(self.root)!r}"

  def has(self, name: str) -> bool:
    if self.zip is None:
      return (self.root / name).is_file()
    return self.prefix + name in self.members

  def read(self, name: str) -> bytes:
    if self.zip is None:
      return (self.root / name).read_bytes()
    try:
      return self.zip.read(self.members[self.prefix + name])
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
      raise CorruptDataError(f"corrupt data for {self.where(name)}: {e}") from e

  def identity(self, names: list[str]) -> str:
    """A key of the files' contents: zip CRC-32s and sizes, or folder sizes and mtimes."""
    if self.zip is None:
      stats = [(self.root / n).stat() for n in names]
      return cache_lib.make_key(files=[(n, st.st_size, st.st_mtime_ns)
                                       for n, st in zip(names, stats)])
    infos = [self.members[self.prefix + n] for n in names]
    return cache_lib.make_key(files=[(n, i.CRC, i.file_size) for n, i in zip(names, infos)])


def _layout_root(root: Path, split: str) -> Path:
  """`root`, or the one zip archive inside it when the folder has no split files of its own."""
  if root.is_file() or (root / f"{split}.csv").is_file():
    return root
  archives = sorted(p for p in root.glob("*.zip") if p.is_file())
  if len(archives) == 1:
    return archives[0]
  if len(archives) > 1:
    raise FileNotFoundError(
      f"mini-ImageNet folder {str(root)!r} has no {split}.csv and several archives "
      f"{[p.name for p in archives]}: point data_dir at one of them"
    )
  return root


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
    data_dir: the dataset folder or zip archive (or a folder holding one archive); default
      `$METAJAX_MINIIMAGENET_DIR`.
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
    layout = _CsvLayout(_layout_root(root, split))
    try:
      arrays = _load_csv_split(layout, split, image_size, cache_dir, use_cache)
    finally:
      layout.close()
    pool_images, labels = arrays["images"], arrays["labels"]
  pool = ClassPool(images=pool_images, class_names=labels, metadata={"label": labels})
  return pool.astype(dtype)


def _load_csv_split(
  layout: _CsvLayout,
  split: str,
  image_size: int,
  cache_dir: str | os.PathLike[str] | None,
  use_cache: bool,
) -> dict[str, np.ndarray]:
  """One split in the csv layout, through the cache: `images` `[C, M, S, S, 3]` uint8 and the
  sorted `labels`."""
  csv_name = f"{split}.csv"
  if not layout.has(csv_name):
    raise FileNotFoundError(
      f"mini-ImageNet split {split!r} not found: no {layout.where(csv_name)}; expected "
      f"mini-imagenet-cache-{split}.pkl or {csv_name} beside an images/ folder (in a folder or "
      "a zip archive)"
    )
  csv_bytes = layout.read(csv_name)
  try:
    by_label = _parse_csv(csv_bytes.decode("utf-8-sig"), layout.where(csv_name))
  except UnicodeDecodeError as e:
    raise CorruptDataError(f"{layout.where(csv_name)} is not UTF-8 text: {e}") from e
  labels = sorted(by_label)
  _equal_counts(split, np.array(labels), [len(by_label[label]) for label in labels])
  names = {label: [f"images/{f}" for f in by_label[label]] for label in labels}
  missing = [n for label in labels for n in names[label] if not layout.has(n)]
  if missing:
    raise FileNotFoundError(
      f"{len(missing)} images listed in {layout.where(csv_name)} are missing, e.g. "
      f"{layout.where(missing[0])}"
    )

  def build() -> dict[str, np.ndarray]:
    images = np.empty((len(labels), len(names[labels[0]]), image_size, image_size, 3), np.uint8)
    for c, label in enumerate(labels):
      for i, n in enumerate(names[label]):
        images[c, i] = _decode_jpeg(layout.read(n), layout.where(n), image_size)
    return {"images": images, "labels": np.array(labels)}

  if not use_cache:
    return build()
  key = cache_lib.make_key(
    dataset="miniimagenet",
    version=PREPROCESSING_VERSION,
    split=split,
    image_size=int(image_size),
    csv=hashlib.sha256(csv_bytes).hexdigest(),
    images=layout.identity([n for label in labels for n in names[label]]),
  )
  path = cache_lib.resolve_cache_dir(cache_dir) / (
    f"metajax-miniimagenet-{split}-{int(image_size)}px-{key[:16]}.npz"
  )
  return cache_lib.cached_arrays(path, key=key, build=build)
