"""Omniglot through tensorflow-datasets (TFDS), without TensorFlow.

TFDS's `omniglot` (version 3.0.0) has splits `train` (= images_background), `test`
(= images_evaluation), `small1` and `small2`, and features `image` (the original PNG bytes),
`alphabet`, `alphabet_char_id` and `label` (the global character id NNNN - 1).

* `load_tfds_omniglot(data_dir)` reads a prepared TFDS omniglot from a TFDS data dir and returns
  the same `ClassPool` as `metajax.data.omniglot.load_omniglot` (same classes in the same order,
  same metadata, same preprocessing and cache), except that images *within* a class come in
  TFDS's stored order: TFDS does not keep the drawer (the `DD` of the file name). It reads both
  file formats without TensorFlow: `array_record` through `tfds.data_source`, `tfrecord` (what
  `tfds.load` prepares by default) with a small built-in TFRecord reader and TFDS's tf-free
  `tf.train.Example` proto.
* `prepare_tfds_omniglot(data_dir, archive_dir)` writes TFDS's omniglot from local copies of the
  archives, offline and without TensorFlow, in the `array_record` format. TFDS's own builder
  cannot do that: it downloads from GitHub, checks the published zip checksums, and extracts and
  lists files with TensorFlow. This builder subclasses it, keeping its name, version, features,
  splits and example keys, and replaces only how the examples are found.

tensorflow-datasets is imported lazily, when one of these functions is called.
"""

from __future__ import annotations

import functools
import os
import struct
import tempfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from metajax.data import cache as cache_lib
from metajax.data import omniglot as omniglot_lib
from metajax.data.omniglot import CorruptDataError
from metajax.data.samplers import ClassPool

TFDS_NAME = "omniglot"
SPLIT_TO_ARCHIVE = {
  "train": omniglot_lib.BACKGROUND,
  "test": omniglot_lib.EVALUATION,
  "small1": omniglot_lib.SMALL1,
  "small2": omniglot_lib.SMALL2,
}


@functools.cache
def _builder_class() -> type:
  """Returns the offline builder class (defined on first use so tfds is imported lazily)."""
  import tensorflow_datasets as tfds
  from tensorflow_datasets.image_classification import omniglot as tfds_omniglot

  class LocalOmniglot(tfds_omniglot.Omniglot, skip_registration=True):
    """TFDS's `omniglot` built from local archives: same name, version, features and keys."""

    name = TFDS_NAME
    # Nothing is downloaded, so there are no checksums to look up; TFDS would otherwise locate
    # this file's package resources, which needs the `importlib_resources` backport.
    code_path = None

    def __init__(self, *, archive_dir: str | os.PathLike[str], **kwargs: Any):
      self._archive_dir = omniglot_lib.find_omniglot_dir(archive_dir)
      super().__init__(**kwargs)

    def _split_generators(self, dl_manager):
      sources = {
        split: omniglot_lib.find_source(self._archive_dir, archive)
        for split, archive in SPLIT_TO_ARCHIVE.items()
      }
      alphabets, label_names = set(), {}
      for split, source in sources.items():
        for alphabet, character_id, label, _, _ in _examples(
          source, SPLIT_TO_ARCHIVE[split], read=False
        ):
          alphabets.add(alphabet)
          label_names[label] = f"{alphabet}_{character_id}"
      self.info.features["alphabet"].names = sorted(alphabets)
      self.info.features["label"].names = [label_names[k] for k in sorted(label_names)]
      return [
        tfds.core.SplitGenerator(
          name=split, gen_kwargs={"source": str(source), "archive": SPLIT_TO_ARCHIVE[split]}
        )
        for split, source in sources.items()
      ]

    def _generate_examples(self, source: str, archive: str):
      for alphabet, character_id, label, name, raw in _examples(Path(source), archive, read=True):
        # The same example key as TFDS's builder: "%s_%d_%s" % (alphabet, character_id, image).
        key = f"{alphabet}_{character_id}_{name}"
        yield (
          key,
          {
            "image": raw,
            "alphabet": alphabet,
            "alphabet_char_id": character_id,
            "label": label,
          },
        )

  # Recorded as `moduleName` in dataset_info.json: the same as a dataset TFDS prepared itself.
  LocalOmniglot.__module__ = tfds_omniglot.__name__
  return LocalOmniglot


def _examples(
  source: Path, archive: str, *, read: bool
) -> Iterator[tuple[str, int, int, str, bytes | None]]:
  """Yields (alphabet, alphabet_char_id, label, file name, PNG bytes or None) of an archive.

  Raises:
    CorruptDataError: a corrupt archive, or a member that cannot be read (a failed CRC check, a
      corrupt deflate stream), naming the member and the archive.
  """
  import zipfile

  def contents(alphabet: str, character: str, name: str, reader) -> bytes:
    try:
      return reader()
    # a damaged member: a failed CRC check, a corrupt deflate stream, a mangled header
    except (zipfile.BadZipFile, EOFError, OSError, zlib.error, NotImplementedError) as e:
      if isinstance(e, (FileNotFoundError, PermissionError)):
        raise
      raise CorruptDataError(
        f"cannot read {archive}/{alphabet}/{character}/{name} from {str(source)!r} ({e}); "
        f"replace it with an intact copy of {source.name}"
      ) from e

  def from_entries(entries):
    for alphabet, character, name, reader in sorted(entries, key=lambda e: e[:3]):
      character_id = int(character[len("character") :]) - 1
      label = int(name.split("_")[0]) - 1
      raw = contents(alphabet, character, name, reader) if read else None
      yield alphabet, character_id, label, name, raw

  if source.is_dir():
    yield from from_entries(list(omniglot_lib.dir_entries(source)))
    return
  try:
    with zipfile.ZipFile(source) as zf:
      yield from from_entries(list(omniglot_lib.zip_entries(source, archive, zf)))
  except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as e:
    raise CorruptDataError(f"corrupt Omniglot archive {str(source)!r}: {e}") from e


def prepare_tfds_omniglot(
  data_dir: str | os.PathLike[str],
  archive_dir: str | os.PathLike[str] | None = None,
  *,
  file_format: str = "array_record",
) -> Path:
  """Writes TFDS's `omniglot:3.0.0` into a TFDS data dir from local Omniglot archives.

  Needs no network and no TensorFlow. Afterwards `tfds.data_source("omniglot", data_dir=...)`
  and `load_tfds_omniglot(data_dir)` read it (and `tfds.load` too, where TensorFlow is installed).

  Args:
    data_dir: the TFDS data dir to write into (the dataset lands in `data_dir/omniglot/3.0.0`).
    archive_dir: folder with the four archives (or their extracted folders); default
      `$METAJAX_OMNIGLOT_DIR`.
    file_format: "array_record" (the only one TFDS can write without TensorFlow).

  Returns:
    The prepared dataset's directory.
  """
  if file_format != "array_record":
    raise ValueError(
      f"file_format={file_format!r}: only 'array_record' can be written without TensorFlow"
    )
  builder = _builder_class()(
    archive_dir=archive_dir, data_dir=os.fspath(data_dir), file_format=file_format
  )
  with tempfile.TemporaryDirectory(prefix="metajax-tfds-") as download_dir:  # stays empty
    builder.download_and_prepare(download_dir=download_dir)
  return Path(os.fspath(builder.data_dir))


def _read_tfrecord(path: str | os.PathLike[str]) -> Iterator[bytes]:
  """Yields the records of a TFRecord file (lengths are checked, CRCs are not)."""
  with open(path, "rb") as f:
    while True:
      header = f.read(12)
      if not header:
        return
      if len(header) != 12:
        raise CorruptDataError(f"truncated TFRecord file {str(path)!r}")
      (length,) = struct.unpack("<Q", header[:8])
      data = f.read(length)
      if len(data) != length or len(f.read(4)) != 4:
        raise CorruptDataError(f"truncated TFRecord file {str(path)!r}")
      yield data


def _parse_example(serialized: bytes) -> dict[str, Any]:
  from tensorflow_datasets.proto import tf_example_pb2

  feature = tf_example_pb2.Example.FromString(serialized).features.feature
  return {
    "image": feature["image"].bytes_list.value[0],
    "alphabet": feature["alphabet"].int64_list.value[0],
    "alphabet_char_id": feature["alphabet_char_id"].int64_list.value[0],
    "label": feature["label"].int64_list.value[0],
  }


def _split_records(builder: Any, split: str) -> list[dict[str, Any]]:
  """Returns a split's examples as dicts with the PNG bytes undecoded."""
  import tensorflow_datasets as tfds

  file_format = builder.info.file_format
  file_format = getattr(file_format, "value", file_format)
  if file_format == "array_record":
    # What tfds.data_source("omniglot", data_dir=...) returns, with the PNG bytes kept as such.
    source = builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
    return list(source.__getitems__(list(range(len(source)))))
  if file_format in ("tfrecord", None):
    return [
      _parse_example(record)
      for path in builder.info.splits[split].filepaths
      for record in _read_tfrecord(os.fspath(path))
    ]
  raise ValueError(
    f"TFDS omniglot in {str(builder.data_dir)!r} is in format {file_format!r}; "
    "readable formats: array_record, tfrecord"
  )


def _dataset_files(builder: Any, splits: Sequence[str]) -> list[Path]:
  """The files a prepared split depends on (not the whole folder, which may hold our cache)."""
  dataset_dir = Path(os.fspath(builder.data_dir))
  files = [dataset_dir / "dataset_info.json"]
  for split in splits:
    files.extend(Path(os.fspath(p)) for p in builder.info.splits[split].filepaths)
  return files


def _pool_arrays(builder: Any, split: str, image_size: int, resample: str) -> dict[str, np.ndarray]:
  archive = SPLIT_TO_ARCHIVE[split]
  alphabet_names = builder.info.features["alphabet"].names
  by_label: dict[int, list[dict[str, Any]]] = {}
  for record in _split_records(builder, split):
    by_label.setdefault(int(record["label"]), []).append(record)
  keys = []
  for label, records in by_label.items():
    first = records[0]
    alphabet = alphabet_names[int(first["alphabet"])]
    character = f"character{int(first['alphabet_char_id']) + 1:02d}"
    if len(records) != omniglot_lib.IMAGES_PER_CHARACTER:
      raise CorruptDataError(
        f"TFDS omniglot {split!r}: character {alphabet}/{character} has {len(records)} images, "
        f"expected {omniglot_lib.IMAGES_PER_CHARACTER}"
      )
    keys.append((alphabet, character, label))
  keys.sort()
  images = np.empty(
    (len(keys), omniglot_lib.IMAGES_PER_CHARACTER, image_size, image_size), np.uint8
  )
  for c, (alphabet, character, label) in enumerate(keys):
    for i, record in enumerate(by_label[label]):
      where = f"TFDS omniglot {split!r} {alphabet}/{character} image {i}"
      images[c, i] = omniglot_lib.decode_image(bytes(record["image"]), where, image_size, resample)
  return {
    "images": images[..., None],
    "alphabet": np.array([k[0] for k in keys]),
    "character": np.array([k[1] for k in keys]),
    "char_index": np.array([k[2] for k in keys], np.int32),
    "archive": np.array([archive] * len(keys)),
  }


def load_tfds_omniglot(
  data_dir: str | os.PathLike[str] | None = None,
  *,
  splits: Sequence[str] = ("train", "test"),
  image_size: int = 28,
  resample: str = "lanczos",
  dtype: np.dtype | type | str = np.float32,
  cache_dir: str | os.PathLike[str] | None = None,
  use_cache: bool = True,
) -> ClassPool:
  """Loads a prepared TFDS `omniglot` as the `ClassPool` `load_omniglot` would give.

  Args:
    data_dir: the TFDS data dir (holding `omniglot/3.0.0/`); default TFDS's own
      (`$TFDS_DATA_DIR` or `~/tensorflow_datasets`).
    splits: TFDS splits in order ("train", "test", "small1", "small2"); the default is all 1623
      characters, background then evaluation, like `load_omniglot`'s default archives.
    image_size, resample, dtype, cache_dir, use_cache: as `load_omniglot`.

  Returns:
    A `ClassPool` equal to `load_omniglot(archives=<the matching archives>)` up to the order of the
    20 images within each class.

  Raises:
    FileNotFoundError: no prepared TFDS omniglot in `data_dir`.
    ValueError: an unknown split, resample or format.
  """
  import tensorflow_datasets as tfds

  splits = tuple(splits)
  for split in splits:
    if split not in SPLIT_TO_ARCHIVE:
      raise ValueError(
        f"unknown TFDS omniglot split {split!r}; allowed: {', '.join(SPLIT_TO_ARCHIVE)}"
      )
  if not splits or len(set(splits)) != len(splits):
    raise ValueError(f"splits={splits} must name distinct TFDS omniglot splits")
  if resample not in omniglot_lib._RESAMPLE:
    raise ValueError(f"resample={resample!r} is not one of {', '.join(omniglot_lib._RESAMPLE)}")
  if data_dir is not None and not Path(data_dir).is_dir():
    raise FileNotFoundError(f"TFDS data dir {os.fspath(data_dir)!r} does not exist")
  builder = tfds.builder(TFDS_NAME, data_dir=None if data_dir is None else os.fspath(data_dir))
  if not builder.is_prepared():
    raise FileNotFoundError(
      f"no prepared TFDS {TFDS_NAME!r} in {os.fspath(builder.data_dir)!r}: prepare it with "
      "tfds.builder('omniglot').download_and_prepare() (needs TensorFlow and network) or "
      "metajax.data.prepare_tfds_omniglot(data_dir, archive_dir) (offline, no TensorFlow)"
    )
  dataset_dir = Path(os.fspath(builder.data_dir))

  def build() -> dict[str, np.ndarray]:
    parts = [_pool_arrays(builder, split, image_size, resample) for split in splits]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  if use_cache:
    key = cache_lib.make_key(
      dataset="tfds_omniglot",
      version=omniglot_lib.PREPROCESSING_VERSION,
      splits=splits,
      image_size=int(image_size),
      resample=resample,
      source=cache_lib.fingerprint(_dataset_files(builder, splits)),
    )
    path = cache_lib.resolve_cache_dir(cache_dir) / (
      f"metajax-tfds-omniglot-{'+'.join(splits)}-{int(image_size)}px-{resample}-{key[:16]}.npz"
    )
    arrays = cache_lib.cached_arrays(path, key=key, build=build)
  else:
    arrays = build()
  return omniglot_lib.pool_from_arrays(arrays, dtype)
