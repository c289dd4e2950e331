"""Tests of metajax.data.tfds_omniglot: TFDS's omniglot prepared offline, without TensorFlow."""

from __future__ import annotations

import json
import shutil
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

from metajax.data import load_omniglot, load_tfds_omniglot, prepare_tfds_omniglot


@pytest.fixture(scope="session")
def tfds_data_dir(tmp_path_factory, omniglot_dir) -> Path:
  """A TFDS data dir holding omniglot:3.0.0 (array_record) built from the shared archives."""
  data_dir = tmp_path_factory.mktemp("tfds")
  prepare_tfds_omniglot(data_dir, omniglot_dir)
  return data_dir


def _sorted_within_class(images: np.ndarray) -> np.ndarray:
  """Images of each class in a canonical (lexicographic) order: TFDS does not keep drawers."""
  flat = images.reshape(images.shape[0], images.shape[1], -1)
  out = np.empty_like(flat)
  for c in range(flat.shape[0]):
    out[c] = flat[c][np.lexsort(flat[c].T[::-1])]
  return out


def _assert_same_pool(tfds_pool, archive_pool):
  np.testing.assert_array_equal(tfds_pool.class_names, archive_pool.class_names)
  assert sorted(tfds_pool.metadata) == sorted(archive_pool.metadata)
  for name, column in archive_pool.metadata.items():
    np.testing.assert_array_equal(tfds_pool.metadata[name], column)
  assert tfds_pool.images.shape == archive_pool.images.shape
  np.testing.assert_array_equal(
    _sorted_within_class(tfds_pool.images), _sorted_within_class(archive_pool.images)
  )


def test_prepared_dataset_is_tfds_omniglot(tfds_data_dir):
  import tensorflow_datasets as tfds

  sources = tfds.data_source("omniglot", data_dir=tfds_data_dir, download=False)
  assert {split: len(source) for split, source in sources.items()} == {
    "train": 19_280,
    "test": 13_180,
    "small1": 2_720,
    "small2": 3_120,
  }
  example = sources["small1"][0]
  assert set(example) == {"image", "alphabet", "alphabet_char_id", "label"}
  assert example["image"].shape == (105, 105, 3)
  info = json.loads((tfds_data_dir / "omniglot/3.0.0/dataset_info.json").read_text())
  assert info["version"] == "3.0.0" and info["fileFormat"] == "array_record"
  assert info["moduleName"] == "tensorflow_datasets.image_classification.omniglot"


def test_full_splits_hold_the_archives_png_bytes(tfds_data_dir, omniglot_dir):
  """Every TFDS record of train/test is an archive PNG, byte for byte, with the right labels."""
  import tensorflow_datasets as tfds

  from metajax.data import tfds_omniglot

  builder = tfds.builder("omniglot", data_dir=tfds_data_dir)
  alphabets = builder.info.features["alphabet"].names
  for split, archive in (("train", "images_background"), ("test", "images_evaluation")):
    with zipfile.ZipFile(omniglot_dir / f"{archive}.zip") as zf:
      expected = sorted(
        (
          n.split("/")[1],
          int(n.split("/")[2][len("character") :]) - 1,
          int(n.split("/")[3][:4]) - 1,
          zf.read(n),
        )
        for n in zf.namelist()
        if n.endswith(".png")
      )
    records = tfds_omniglot._split_records(builder, split)
    got = sorted(
      (alphabets[r["alphabet"]], int(r["alphabet_char_id"]), int(r["label"]), bytes(r["image"]))
      for r in records
    )
    assert len(got) == len(expected)
    assert got == expected


@pytest.mark.slow
def test_full_pool_equals_archive_loader(tfds_data_dir, omniglot_pool):
  pool = load_tfds_omniglot(tfds_data_dir, use_cache=False)
  _assert_same_pool(pool, omniglot_pool)


def test_small_splits_and_cache(tfds_data_dir, omniglot_dir, tmp_path):
  archive_pool = load_omniglot(
    omniglot_dir, archives=["images_background_small1", "images_background_small2"], use_cache=False
  )
  pool = load_tfds_omniglot(tfds_data_dir, splits=("small1", "small2"), cache_dir=tmp_path)
  _assert_same_pool(pool, archive_pool)
  assert len(list(tmp_path.glob("metajax-tfds-omniglot-small1+small2-28px-*.npz"))) == 1
  cached = load_tfds_omniglot(tfds_data_dir, splits=("small1", "small2"), cache_dir=tmp_path)
  np.testing.assert_array_equal(cached.images, pool.images)


def _to_tfrecord(array_record_dir: Path, tfrecord_dir: Path) -> None:
  """Rewrites a prepared dataset as TFRecord files, as `tfds.load` prepares it with TensorFlow.

  The records (serialized tf.train.Example protos) are the same bytes; only the container
  changes. CRCs are written as zeros: the reader under test checks lengths, not CRCs.
  """
  from array_record.python.array_record_module import ArrayRecordReader

  shutil.copytree(array_record_dir, tfrecord_dir)
  for path in sorted(tfrecord_dir.glob("*.array_record-*")):
    reader = ArrayRecordReader(str(path))
    records = reader.read_all()
    reader.close()
    target = tfrecord_dir / path.name.replace(".array_record-", ".tfrecord-")
    with open(target, "wb") as f:
      f.writelines(
        struct.pack("<Q", len(record)) + b"\0" * 4 + record + b"\0" * 4 for record in records
      )
    path.unlink()
  info_path = tfrecord_dir / "dataset_info.json"
  info = json.loads(info_path.read_text())
  info["fileFormat"] = "tfrecord"
  info_path.write_text(json.dumps(info))


def test_tfrecord_format_without_tensorflow(tfds_data_dir, omniglot_dir, tmp_path):
  _to_tfrecord(tfds_data_dir / "omniglot/3.0.0", tmp_path / "omniglot/3.0.0")
  pool = load_tfds_omniglot(tmp_path, splits=("small1",), use_cache=False)
  archive_pool = load_omniglot(omniglot_dir, archives=["images_background_small1"], use_cache=False)
  _assert_same_pool(pool, archive_pool)
  # A truncated TFRecord file is reported, not half-read.
  shard = next((tmp_path / "omniglot/3.0.0").glob("omniglot-small1.tfrecord-*"))
  shard.write_bytes(shard.read_bytes()[:-100])
  with pytest.raises(ValueError, match="truncated TFRecord file"):
    load_tfds_omniglot(tmp_path, splits=("small1",), use_cache=False)


def test_bad_input(tmp_path, tfds_data_dir):
  with pytest.raises(FileNotFoundError, match="no prepared TFDS 'omniglot'.*prepare_tfds_omniglot"):
    load_tfds_omniglot(tmp_path)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    load_tfds_omniglot(tmp_path / "nowhere")
  with pytest.raises(ValueError, match="unknown TFDS omniglot split 'validation'"):
    load_tfds_omniglot(tfds_data_dir, splits=("validation",))
  with pytest.raises(ValueError, match="only 'array_record' can be written without TensorFlow"):
    prepare_tfds_omniglot(tmp_path, file_format="tfrecord")



def test_a_corrupt_deflate_stream_names_the_member_and_the_archive(tmp_path, omniglot_dir):
  """prepare_tfds_omniglot on a copy of the archives whose first member's deflate stream is
  damaged: one CorruptDataError naming the member and the archive (not zlib's bare error)."""
  import zlib

  from metajax.data import CorruptDataError
  from tests.data.test_omniglot import _break_deflate

  data = tmp_path / "data"
  data.mkdir()
  for archive in ("images_evaluation", "images_background_small1", "images_background_small2"):
    (data / f"{archive}.zip").symlink_to(Path(omniglot_dir) / f"{archive}.zip")
  path = data / "images_background.zip"
  shutil.copyfile(Path(omniglot_dir) / "images_background.zip", path)
  with zipfile.ZipFile(path) as zf:  # the first member the builder reads
    member = min((n for n in zf.namelist() if n.endswith(".png")), key=lambda n: n.split("/")[1:])
  _break_deflate(path, member)
  with pytest.raises(CorruptDataError) as error:
    prepare_tfds_omniglot(tmp_path / "tfds", data)
  assert isinstance(error.value.__cause__, zlib.error)
  message = str(error.value)
  assert "\n" not in message
  assert message.startswith(f"cannot read {member} from {str(path)!r} (Error -3 ")
  assert message.endswith("); replace it with an intact copy of images_background.zip")
