"""Tests of metajax.data.miniimagenet on small fixtures written in both on-disk formats."""

from __future__ import annotations

import csv
import pickle
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from metajax.data import CorruptDataError, load_miniimagenet, make_episode_sampler

LABELS = ["n01532829", "n01558993", "n01704323"]
PER_CLASS = 4


def _image(label_index: int, i: int, size: int = 84) -> np.ndarray:
  """A smooth, JPEG-friendly image identifying (class, index) by its mean colour."""
  image = np.zeros((size, size, 3), np.uint8)
  image[..., 0] = 40 + 60 * label_index
  image[..., 1] = 30 + 40 * i
  image[..., 2] = np.linspace(0, 255, size, dtype=np.uint8)[None, :]
  return image


def write_csv_format(
  root: Path, split: str = "train", *, size: int = 84, per_class: int = PER_CLASS
) -> None:
  """Ravi & Larochelle layout: <split>.csv (filename,label) + images/<filename>.jpg."""
  (root / "images").mkdir(parents=True, exist_ok=True)
  with open(root / f"{split}.csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["filename", "label"])
    for c, label in enumerate(LABELS):
      for i in range(per_class):
        name = f"{label}{i + 1:08d}.jpg"
        Image.fromarray(_image(c, i, size)).save(root / "images" / name, quality=95)
        writer.writerow([name, label])


def write_pickle_format(root: Path, split: str = "train", *, protocol: int = 4) -> np.ndarray:
  """mini-imagenet-cache-<split>.pkl: {'image_data': [N, 84, 84, 3] uint8, 'class_dict': ...}."""
  root.mkdir(parents=True, exist_ok=True)
  images, class_dict = [], {}
  # Interleave classes in image_data so that class_dict really is used.
  for i in range(PER_CLASS):
    for c, label in enumerate(reversed(LABELS)):
      class_dict.setdefault(label, []).append(len(images))
      images.append(_image(len(LABELS) - 1 - c, i))
  image_data = np.stack(images)
  with open(root / f"mini-imagenet-cache-{split}.pkl", "wb") as f:
    pickle.dump({"image_data": image_data, "class_dict": class_dict}, f, protocol=protocol)
  return image_data


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_pickle_format(tmp_path, protocol):
  write_pickle_format(tmp_path, "val", protocol=protocol)
  pool = load_miniimagenet(tmp_path, "val")
  assert pool.images.shape == (3, PER_CLASS, 84, 84, 3) and pool.images.dtype == np.uint8
  np.testing.assert_array_equal(pool.class_names, LABELS)
  for c in range(3):
    for i in range(PER_CLASS):
      np.testing.assert_array_equal(pool.images[c, i], _image(c, i))
  as_float = load_miniimagenet(tmp_path, "val", dtype=np.float32)
  np.testing.assert_allclose(as_float.images, pool.images / 255.0, atol=1e-6)


def test_csv_format_and_cache(tmp_path):
  write_csv_format(tmp_path / "data", "test")
  cache_dir = tmp_path / "cache"
  pool = load_miniimagenet(tmp_path / "data", "test", cache_dir=cache_dir)
  assert pool.images.shape == (3, PER_CLASS, 84, 84, 3)
  np.testing.assert_array_equal(pool.class_names, LABELS)
  for c in range(3):
    for i in range(PER_CLASS):  # JPEG is lossy: compare mean colours
      np.testing.assert_allclose(pool.images[c, i].mean((0, 1)), _image(c, i).mean((0, 1)), atol=3)
  assert len(list(cache_dir.glob("metajax-miniimagenet-test-84px-*.npz"))) == 1
  again = load_miniimagenet(tmp_path / "data", "test", cache_dir=cache_dir)
  np.testing.assert_array_equal(again.images, pool.images)
  # Episodes sample from it like from any pool.
  sample = make_episode_sampler(pool, 3, 1, 2)
  task = sample(jax.random.key(0), pool.images)
  assert task.support_x.shape == (3, 84, 84, 3) and float(task.support_x.max()) <= 1.0


def test_csv_format_resizes_to_84(tmp_path):
  write_csv_format(tmp_path, size=100, per_class=2)
  pool = load_miniimagenet(tmp_path, use_cache=False)
  assert pool.images.shape == (3, 2, 84, 84, 3)


def test_env_var_and_auto_format(tmp_path, monkeypatch):
  write_pickle_format(tmp_path)
  write_csv_format(tmp_path)
  monkeypatch.setenv("METAJAX_MINIIMAGENET_DIR", str(tmp_path))
  from_pickle = load_miniimagenet()  # auto prefers the pickle
  from_csv = load_miniimagenet(format="csv", use_cache=False)
  assert from_pickle.images.shape == from_csv.images.shape
  np.testing.assert_allclose(from_pickle.images.mean((2, 3)), from_csv.images.mean((2, 3)), atol=3)
  monkeypatch.delenv("METAJAX_MINIIMAGENET_DIR")
  with pytest.raises(FileNotFoundError, match="METAJAX_MINIIMAGENET_DIR"):
    load_miniimagenet()


def test_bad_input(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    load_miniimagenet(tmp_path / "nowhere")
  with pytest.raises(
    FileNotFoundError, match="expected mini-imagenet-cache-train.pkl or train.csv"
  ):
    load_miniimagenet(tmp_path)
  with pytest.raises(
    ValueError, match="unknown mini-ImageNet split 'valid'; allowed: train, val, test"
  ):
    load_miniimagenet(tmp_path, "valid")
  with pytest.raises(ValueError, match="unknown mini-ImageNet format 'h5'"):
    load_miniimagenet(tmp_path, format="h5")
  with pytest.raises(FileNotFoundError, match="pickle .* not found"):
    load_miniimagenet(tmp_path, format="pickle")


def test_corrupt_files(tmp_path):
  write_pickle_format(tmp_path)
  path = tmp_path / "mini-imagenet-cache-train.pkl"
  path.write_bytes(path.read_bytes()[:1000])
  with pytest.raises(CorruptDataError, match="cannot read mini-ImageNet pickle"):
    load_miniimagenet(tmp_path)
  # A pickle that would run code is refused, not executed.
  path.write_bytes(pickle.dumps({"image_data": Path("/"), "class_dict": {}}))
  with pytest.raises(CorruptDataError, match="refusing to unpickle"):
    load_miniimagenet(tmp_path)
  path.write_bytes(pickle.dumps({"images": np.zeros(3)}))
  with pytest.raises(CorruptDataError, match="expected a dict with 'image_data' and 'class_dict'"):
    load_miniimagenet(tmp_path)

  csv_root = tmp_path / "csv"
  write_csv_format(csv_root, per_class=2)
  victim = sorted((csv_root / "images").iterdir())[1]
  victim.write_bytes(victim.read_bytes()[:100])
  with pytest.raises(CorruptDataError, match=f"unreadable image .*{victim.name}"):
    load_miniimagenet(csv_root, use_cache=False)
  victim.unlink()
  with pytest.raises(FileNotFoundError, match=f"{victim.name}"):
    load_miniimagenet(csv_root, use_cache=False)
  with pytest.raises(FileNotFoundError, match="1 images listed in train.csv are missing"):
    load_miniimagenet(csv_root, cache_dir=tmp_path / "cache")


def test_unequal_class_sizes(tmp_path):
  write_csv_format(tmp_path, per_class=2)
  with open(tmp_path / "train.csv", "a", newline="") as f:
    name = "extra.jpg"
    Image.fromarray(_image(0, 0)).save(tmp_path / "images" / name)
    csv.writer(f).writerow([name, LABELS[0]])
  with pytest.raises(CorruptDataError, match=r"classes of different sizes \(n01532829: 3"):
    load_miniimagenet(tmp_path, use_cache=False)
