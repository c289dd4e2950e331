"""Tests of metajax.data.miniimagenet on small fixtures written in both on-disk formats."""

from __future__ import annotations

import csv
import io
import pickle
import zipfile
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
  with pytest.raises(FileNotFoundError, match="is neither a directory nor a .zip archive"):
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
  with pytest.raises(FileNotFoundError,
                     match="1 images listed in .*train.csv. are missing, e.g. .*n0153282900000002"):
    load_miniimagenet(csv_root, cache_dir=tmp_path / "cache")


def test_unequal_class_sizes(tmp_path):
  write_csv_format(tmp_path, per_class=2)
  with open(tmp_path / "train.csv", "a", newline="") as f:
    name = "extra.jpg"
    Image.fromarray(_image(0, 0)).save(tmp_path / "images" / name)
    csv.writer(f).writerow([name, LABELS[0]])
  with pytest.raises(CorruptDataError, match=r"classes of different sizes \(n01532829: 3"):
    load_miniimagenet(tmp_path, use_cache=False)


def _zip_folder(folder: Path, archive: Path, prefix: str = "mini-imagenet/",
                compression: int = zipfile.ZIP_STORED) -> Path:
  """Zips `folder`'s files under `prefix`, as the distributed archive is laid out."""
  with zipfile.ZipFile(archive, "w", compression) as zf:
    for path in sorted(folder.rglob("*")):
      if path.is_file():
        zf.write(path, prefix + path.relative_to(folder).as_posix())
  return archive


@pytest.mark.parametrize("prefix", ["mini-imagenet/", ""])
def test_zip_archive_read_in_place(tmp_path, prefix):
  folder = tmp_path / "extracted"
  for split in ("train", "test"):
    write_csv_format(folder, split)
  holder = tmp_path / "holder"
  holder.mkdir()
  archive = _zip_folder(folder, holder / "mini-imagenet-84.zip", prefix)
  before = archive.read_bytes()
  expected = load_miniimagenet(folder, "test", use_cache=False)
  cache_dir = tmp_path / "cache"
  for source in (archive, holder):  # the archive itself, or the folder that holds it
    pool = load_miniimagenet(source, "test", cache_dir=cache_dir)
    np.testing.assert_array_equal(pool.images, expected.images)
    np.testing.assert_array_equal(pool.class_names, expected.class_names)
  assert len(list(cache_dir.glob("metajax-miniimagenet-test-84px-*.npz"))) == 1
  assert load_miniimagenet(archive, "train", use_cache=False).images.shape == (3, 4, 84, 84, 3)
  assert archive.read_bytes() == before and sorted(p.name for p in holder.iterdir()) == [
    "mini-imagenet-84.zip"]  # nothing written beside the archive


def test_zip_archive_errors_name_the_file(tmp_path):
  folder = tmp_path / "extracted"
  write_csv_format(folder, "train", per_class=2)
  archive = _zip_folder(folder, tmp_path / "a.zip")
  # Truncated: the central directory at the end is gone.
  truncated = tmp_path / "truncated.zip"
  truncated.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
  with pytest.raises(CorruptDataError, match="corrupt or truncated mini-ImageNet archive "
                     ".*truncated.zip"):
    load_miniimagenet(truncated, use_cache=False)
  # One flipped byte inside a stored image: its CRC-32 fails, and the member is named.
  with zipfile.ZipFile(archive) as zf:
    info = zf.getinfo("mini-imagenet/images/n0155899300000001.jpg")
  data = bytearray(archive.read_bytes())
  data[info.header_offset + 30 + len(info.filename) + 200] ^= 0xFF
  flipped = tmp_path / "flipped.zip"
  flipped.write_bytes(bytes(data))
  with pytest.raises(CorruptDataError, match="n0155899300000001.jpg' in archive .*flipped.zip"):
    load_miniimagenet(flipped, use_cache=False)
  # A damaged deflate stream (the failure that surfaced as a bare zlib.error elsewhere).
  deflated = _zip_folder(folder, tmp_path / "deflated.zip", compression=zipfile.ZIP_DEFLATED)
  with zipfile.ZipFile(deflated) as zf:
    info = zf.getinfo("mini-imagenet/images/n0155899300000001.jpg")
  data = bytearray(deflated.read_bytes())
  start = info.header_offset + 30 + len(info.filename)
  data[start:start + 40] = bytes(40)
  broken = tmp_path / "broken.zip"
  broken.write_bytes(bytes(data))
  with pytest.raises(CorruptDataError, match="n0155899300000001.jpg' in archive .*broken.zip"):
    load_miniimagenet(broken, use_cache=False)
  # A CSV row that names no file of the archive.
  text = (folder / "train.csv").read_text()
  (folder / "train.csv").write_text(text.replace("n0155899300000002.jpg", "n0155899399999999.jpg"))
  rows = _zip_folder(folder, tmp_path / "rows.zip")
  with pytest.raises(FileNotFoundError, match="1 images listed in 'mini-imagenet/train.csv' in "
                     "archive .*rows.zip' are missing, e.g. 'mini-imagenet/images/"
                     "n0155899399999999.jpg'"):
    load_miniimagenet(rows, use_cache=False)
  # A folder of several archives is ambiguous.
  many = tmp_path / "many"
  many.mkdir()
  for name in ("x.zip", "y.zip"):
    (many / name).write_bytes(archive.read_bytes())
  with pytest.raises(FileNotFoundError, match="several archives \\['x.zip', 'y.zip'\\]"):
    load_miniimagenet(many, use_cache=False)


REAL_ARCHIVE = Path(__file__).resolve().parents[3] / "shared/data/miniimagenet/mini-imagenet-84.zip"


@pytest.mark.slow
@pytest.mark.skipif(not REAL_ARCHIVE.is_file(), reason=f"no {REAL_ARCHIVE}")
def test_real_archive():
  """The distributed archive: the Ravi & Larochelle split, and pixels as PIL decodes them."""
  pools = {split: load_miniimagenet(REAL_ARCHIVE, split) for split in ("train", "val", "test")}
  assert {s: p.images.shape for s, p in pools.items()} == {
    "train": (64, 600, 84, 84, 3), "val": (16, 600, 84, 84, 3), "test": (20, 600, 84, 84, 3)}
  assert all(p.images.dtype == np.uint8 for p in pools.values())
  names = [set(p.class_names) for p in pools.values()]
  assert sum(map(len, names)) == len(set.union(*names)) == 100  # disjoint splits
  with zipfile.ZipFile(REAL_ARCHIVE) as zf:
    rows = list(csv.reader(zf.read("mini-imagenet/test.csv").decode().splitlines()))[1:]
    test = pools["test"]
    for filename, label in (rows[0], rows[599], rows[6000], rows[-1]):
      c = list(test.class_names).index(label)
      i = [r[0] for r in rows if r[1] == label].index(filename)
      with Image.open(io.BytesIO(zf.read(f"mini-imagenet/images/{filename}"))) as image:
        np.testing.assert_array_equal(test.images[c, i], np.asarray(image.convert("RGB")))
