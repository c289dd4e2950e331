"""Tests of metajax.data.omniglot: the real archives, preprocessing, cache, splits, bad input."""

from __future__ import annotations

import os
import random
import re
import shutil
import time
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

from metajax.data import (
  OMNIGLOT_PUBLISHED_COUNTS,
  CorruptDataError,
  add_rotations,
  finn_character_order,
  load_omniglot,
  omniglot_split,
)
from metajax.data import cache as cache_lib
from metajax.data import omniglot as omniglot_lib

BACKGROUND, EVALUATION = "images_background", "images_evaluation"
SMALL1 = "images_background_small1"
PUBLISHED_ALPHABETS = omniglot_lib.PUBLISHED_ALPHABETS


# --- the real archives --------------------------------------------------------------------------


def test_full_pool_counts_match_published(omniglot_pool):
  pool = omniglot_pool
  assert pool.images.shape == (1623, 20, 28, 28, 1)
  assert pool.images.dtype == np.float32
  archive = pool.metadata["archive"]
  for name in (BACKGROUND, EVALUATION):
    alphabets, characters, images = OMNIGLOT_PUBLISHED_COUNTS[name]
    mask = archive == name
    assert mask.sum() == characters
    assert mask.sum() * pool.images_per_class == images
    assert len(np.unique(pool.metadata["alphabet"][mask])) == alphabets
  # Global character ids: 1-964 background, 965-1623 evaluation (0-based here), all distinct.
  ids = pool.metadata["char_index"]
  assert sorted(ids[archive == BACKGROUND]) == list(range(964))
  assert sorted(ids[archive == EVALUATION]) == list(range(964, 1623))
  assert len(set(pool.class_names)) == 1623


@pytest.mark.parametrize("archive", ["images_background_small1", "images_background_small2"])
def test_small_archives_counts_match_published(omniglot_dir, omniglot_pool, archive):
  pool = load_omniglot(omniglot_dir, archives=[archive], use_cache=False)
  alphabets, characters, images = OMNIGLOT_PUBLISHED_COUNTS[archive]
  assert pool.num_classes == characters
  assert pool.num_classes * pool.images_per_class == images
  assert len(np.unique(pool.metadata["alphabet"])) == alphabets
  # The small sets are subsets of background: same characters, same preprocessed images.
  index = {name: i for i, name in enumerate(omniglot_pool.class_names)}
  rows = [index[name] for name in pool.class_names]
  np.testing.assert_array_equal(omniglot_pool.metadata["archive"][rows], BACKGROUND)
  np.testing.assert_array_equal(
    omniglot_pool.metadata["char_index"][rows], pool.metadata["char_index"]
  )
  np.testing.assert_array_equal(omniglot_pool.images[rows], pool.images)


def test_archive_image_counts_independently(omniglot_dir):
  """Counts PNG entries in each zip directly, without the loader."""
  for archive, (alphabets, characters, images) in OMNIGLOT_PUBLISHED_COUNTS.items():
    with zipfile.ZipFile(omniglot_dir / f"{archive}.zip") as zf:
      names = [n for n in zf.namelist() if n.endswith(".png")]
    assert len(names) == images
    assert len({n.rsplit("/", 1)[0] for n in names}) == characters
    assert len({n.split("/")[1] for n in names}) == alphabets


def test_preprocessing_strokes_are_one_on_zero(omniglot_pool):
  images = omniglot_pool.images
  assert images.min() == 0.0 and images.max() == 1.0
  # Mostly background: strokes cover a small part of each image (Omniglot's ink is ~8%).
  assert 0.03 < images.mean() < 0.2
  # Antialiased: intermediate grey levels exist (a nearest-neighbour resize would be binary).
  assert np.mean((images > 0.05) & (images < 0.95)) > 0.01
  # The border rows are (almost) empty in every image.
  assert images[:, :, 0, :, :].mean() < 0.01


def test_braille_duplicate_quirk(omniglot_pool):
  """The data's known quirk: Braille/character01 drawings 03 and 19 are identical."""
  row = list(omniglot_pool.class_names).index("Braille/character01")
  images = omniglot_pool.images[row]
  np.testing.assert_array_equal(images[2], images[18])
  assert not np.array_equal(images[2], images[3])


def test_cache_is_reused_and_identical(
  omniglot_dir, omniglot_pool, omniglot_cache_dir, monkeypatch
):
  cache_files = list(omniglot_cache_dir.glob("metajax-omniglot-background+evaluation-28px-*.npz"))
  assert len(cache_files) == 1

  def no_decoding(*args, **kwargs):
    raise AssertionError("the cache should have been used")

  monkeypatch.setattr(omniglot_lib, "_read_archive", no_decoding)
  start = time.perf_counter()
  again = load_omniglot(omniglot_dir, cache_dir=omniglot_cache_dir)
  assert time.perf_counter() - start < 10.0  # typically ~0.3 s
  np.testing.assert_array_equal(again.images, omniglot_pool.images)
  np.testing.assert_array_equal(again.class_names, omniglot_pool.class_names)
  as_uint8 = load_omniglot(omniglot_dir, cache_dir=omniglot_cache_dir, dtype=np.uint8)
  assert as_uint8.images.dtype == np.uint8
  np.testing.assert_allclose(as_uint8.images / 255.0, omniglot_pool.images, atol=1e-6)


def test_nearest_resample_reproduces_finns_binary_images(omniglot_dir):
  pool = load_omniglot(
    omniglot_dir, archives=["images_background_small1"], resample="nearest", use_cache=False
  )
  assert set(np.unique(pool.images)) <= {0.0, 1.0}


# --- splits -------------------------------------------------------------------------------------


def _disjoint(*pools):
  names = [set(pool.metadata["char_index"].tolist()) for pool in pools]
  return all(not (a & b) for i, a in enumerate(names) for b in names[i + 1 :])


def test_split_sizes(omniglot_pool, omniglot_finn):
  finn = omniglot_finn
  assert {k: v.num_classes for k, v in finn.items()} == {"train": 4400, "val": 100, "test": 423}
  assert _disjoint(finn["train"], finn["val"], finn["test"])
  kao = omniglot_split(omniglot_pool, "kao")
  assert {k: v.num_classes for k, v in kao.items()} == {"train": 1200, "test": 423}
  lake = omniglot_split(omniglot_pool, "lake")
  assert {k: v.num_classes for k, v in lake.items()} == {"train": 964, "test": 659}
  for split in (kao, lake):
    assert _disjoint(split["train"], split["test"])
    assert len(split["train"]) + len(split["test"]) == 1623
  np.testing.assert_array_equal(lake["train"].metadata["archive"], BACKGROUND)
  np.testing.assert_array_equal(lake["test"].metadata["archive"], EVALUATION)
  # kao: all background characters, then the first 236 evaluation characters (sorted).
  assert (kao["train"].metadata["archive"] == BACKGROUND).sum() == 964
  np.testing.assert_array_equal(kao["test"].class_names, lake["test"].class_names[236:])


def test_finn_order_reproduces_finns_procedure(omniglot_pool, omniglot_dir):
  """Finn's code: sorted <Alphabet>/<character> folders of both archives, random.seed(1) shuffle."""
  folders = []
  for archive in (BACKGROUND, EVALUATION):
    with zipfile.ZipFile(omniglot_dir / f"{archive}.zip") as zf:
      folders += {tuple(n.split("/")[1:3]) for n in zf.namelist() if n.endswith(".png")}
  folders = [os.path.join("omniglot_resized", a, c) for a, c in sorted(folders)]
  random.seed(1)
  random.shuffle(folders)
  order = finn_character_order(omniglot_pool)
  got = [os.path.join("omniglot_resized", str(name)) for name in omniglot_pool.class_names[order]]
  assert got == folders
  finn = omniglot_split(omniglot_pool, "finn", rotations=False)
  assert list(finn["train"].class_names) == [f.split("/", 1)[1] for f in folders[:1100]]
  assert list(finn["val"].class_names) == [f.split("/", 1)[1] for f in folders[1100:1200]]
  assert list(finn["test"].class_names) == [f.split("/", 1)[1] for f in folders[1200:]]


def test_splits_are_deterministic(omniglot_pool):
  for name in ("finn", "kao", "lake"):
    a = omniglot_split(omniglot_pool, name, rotations=False)
    b = omniglot_split(omniglot_pool, name, rotations=False)
    for split in a:
      np.testing.assert_array_equal(a[split].class_names, b[split].class_names)
  other_seed = omniglot_split(omniglot_pool, "finn", seed=2, rotations=False)
  default = omniglot_split(omniglot_pool, "finn", rotations=False)
  assert list(other_seed["train"].class_names) != list(default["train"].class_names)


def test_rotations_are_distinct_classes(omniglot_pool, omniglot_finn):
  finn = omniglot_finn
  train = finn["train"]
  assert len(set(train.class_names)) == 4400
  np.testing.assert_array_equal(np.bincount(train.metadata["rotation"] // 90), [1100] * 4)
  # Only training classes are rotated by default.
  assert not finn["val"].metadata["rotation"].any() and not finn["test"].metadata["rotation"].any()
  base = train.images[:1100]
  for k in range(1, 4):
    rotated = train.images[k * 1100 : (k + 1) * 1100]
    np.testing.assert_array_equal(rotated, np.rot90(base, k=k, axes=(2, 3)))
    assert not np.array_equal(rotated, base)
  # Flags on other splits.
  assert omniglot_split(omniglot_pool, "lake", rotations=True)["train"].num_classes == 964 * 4
  assert omniglot_split(omniglot_pool, "finn", rotations=False)["train"].num_classes == 1100


def test_add_rotations_metadata_and_errors(omniglot_pool):
  small = omniglot_pool.take([0, 1])
  rotated = add_rotations(small, (0, 180))
  assert list(rotated.class_names) == [
    "Alphabet_of_the_Magi/character01",
    "Alphabet_of_the_Magi/character02",
    "Alphabet_of_the_Magi/character01/rot180",
    "Alphabet_of_the_Magi/character02/rot180",
  ]
  np.testing.assert_array_equal(
    rotated.metadata["char_index"], np.tile(small.metadata["char_index"], 2)
  )
  with pytest.raises(ValueError, match="multiples of 90"):
    add_rotations(small, (0, 45))
  with pytest.raises(ValueError, match="distinct"):
    add_rotations(small, (90, 450))


def test_split_bad_input(omniglot_pool):
  with pytest.raises(ValueError, match="unknown Omniglot split 'ravi'.*finn, kao, lake"):
    omniglot_split(omniglot_pool, "ravi")
  with pytest.raises(ValueError, match="needs all 1623 Omniglot characters"):
    omniglot_split(omniglot_pool.take(range(964)), "lake")
  with pytest.raises(ValueError, match="unrotated"):
    omniglot_split(add_rotations(omniglot_pool, (90,)), "kao")


# --- layouts, cache and bad input on small generated archives -------------------------------------


def test_extracted_directory_equals_zip(tmp_path, fake_omniglot):
  zipped = fake_omniglot(tmp_path / "zip", as_zip=True)
  extracted = fake_omniglot(tmp_path / "dir", as_zip=False)
  assert zipped.is_file() and extracted.is_dir()
  a = load_omniglot(zipped.parent, archives=[BACKGROUND], use_cache=False)
  b = load_omniglot(extracted.parent, archives=[BACKGROUND], use_cache=False)
  np.testing.assert_array_equal(a.images, b.images)
  np.testing.assert_array_equal(
    a.class_names,
    [
      "Alpha/character01",
      "Alpha/character02",
      "Beta/character01",
      "Beta/character02",
      "Beta/character03",
    ],
  )
  np.testing.assert_array_equal(a.metadata["char_index"], [0, 1, 2, 3, 4])


def test_env_var_locates_data(tmp_path, fake_omniglot, monkeypatch):
  fake_omniglot(tmp_path)
  monkeypatch.setenv("METAJAX_OMNIGLOT_DIR", str(tmp_path))
  assert load_omniglot(archives=[BACKGROUND], use_cache=False).num_classes == 5
  monkeypatch.delenv("METAJAX_OMNIGLOT_DIR")
  with pytest.raises(FileNotFoundError, match="METAJAX_OMNIGLOT_DIR"):
    load_omniglot(archives=[BACKGROUND])


def _listing(directory: Path) -> list[tuple[str, int, int]]:
  """Every file under `directory` with its size and modification time."""
  return sorted((str(p.relative_to(directory)), p.stat().st_size, p.stat().st_mtime_ns)
                for p in directory.rglob("*"))


def test_cache_goes_to_the_user_cache_dir_and_is_rebuilt_when_source_changes(
  tmp_path, fake_omniglot, monkeypatch
):
  monkeypatch.delenv("METAJAX_CACHE_DIR", raising=False)
  monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  monkeypatch.setattr(cache_lib.sys, "platform", "linux")
  data = tmp_path / "data"
  fake_omniglot(data)  # a writable data folder: still only read
  before = _listing(data)
  load_omniglot(data, archives=[BACKGROUND])
  assert _listing(data) == before
  user_cache = tmp_path / "home/.cache/metajax"
  assert len(list(user_cache.glob("metajax-omniglot-*.npz"))) == 1
  # A different source (one more alphabet) gets a different key and cache file.
  fake_omniglot(data, alphabets=(("Alpha", 2), ("Beta", 3), ("Gamma", 1)))
  pool = load_omniglot(data, archives=[BACKGROUND])
  assert pool.num_classes == 6
  assert len(list(user_cache.glob("metajax-omniglot-*.npz"))) == 2
  assert not list(data.glob("*.npz"))


def test_env_and_explicit_cache_dir(tmp_path, fake_omniglot, monkeypatch):
  data = tmp_path / "data"
  fake_omniglot(data)
  data.chmod(0o555)  # read-only data works: nothing is written there
  try:
    monkeypatch.setenv("METAJAX_CACHE_DIR", str(tmp_path / "env_cache"))
    load_omniglot(data, archives=[BACKGROUND])
    assert len(list((tmp_path / "env_cache").glob("metajax-omniglot-*.npz"))) == 1
    load_omniglot(data, archives=[BACKGROUND], cache_dir=tmp_path / "explicit")
    assert len(list((tmp_path / "explicit").glob("metajax-omniglot-*.npz"))) == 1
    assert not list(data.glob("*.npz"))
  finally:
    data.chmod(0o755)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "flip_array_bytes", "corrupt_deflate"])
def test_corrupt_cache_is_detected_and_rebuilt(tmp_path, fake_omniglot, damage):
  fake_omniglot(tmp_path / "data")
  cache_dir = tmp_path / "cache"
  good = load_omniglot(tmp_path / "data", archives=[BACKGROUND], cache_dir=cache_dir)
  (path,) = cache_dir.glob("*.npz")
  if damage == "truncate":
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
  elif damage == "garbage":
    path.write_bytes(b"not a cache")
  elif damage == "corrupt_deflate":
    _break_deflate(path, "images.npy")
  else:  # a valid npz whose arrays no longer match the stored checksum
    with np.load(path) as npz:
      arrays = {k: npz[k] for k in npz.files}
    arrays["images"] = arrays["images"].copy()
    arrays["images"][0, 0, 10, 10] ^= 0xFF
    np.savez_compressed(path, **arrays)
  with pytest.warns(RuntimeWarning, match="rebuilding"):
    rebuilt = load_omniglot(tmp_path / "data", archives=[BACKGROUND], cache_dir=cache_dir)
  np.testing.assert_array_equal(rebuilt.images, good.images)
  # The rebuilt cache is valid again: no warning on the next load.
  import warnings

  with warnings.catch_warnings():
    warnings.simplefilter("error")
    load_omniglot(tmp_path / "data", archives=[BACKGROUND], cache_dir=cache_dir)


def test_missing_path_and_archive(tmp_path, fake_omniglot):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    load_omniglot(tmp_path / "nowhere")
  fake_omniglot(tmp_path)
  with pytest.raises(
    FileNotFoundError, match="'images_evaluation' not found.*images_evaluation.zip"
  ):
    load_omniglot(tmp_path)  # default archives: background and evaluation
  with pytest.raises(ValueError, match="unknown Omniglot archive 'images_test'"):
    load_omniglot(tmp_path, archives=["images_test"])
  with pytest.raises(ValueError, match="resample='cubic'"):
    load_omniglot(tmp_path, archives=[BACKGROUND], resample="cubic")
  with pytest.raises(ValueError, match="image_size=0"):
    load_omniglot(tmp_path, archives=[BACKGROUND], image_size=0)


def test_truncated_real_archive(tmp_path, omniglot_dir):
  data = tmp_path / "data"
  data.mkdir()
  raw = (omniglot_dir / "images_background_small1.zip").read_bytes()
  (data / "images_background_small1.zip").write_bytes(raw[: len(raw) // 2])
  with pytest.raises(
    CorruptDataError, match="corrupt Omniglot archive .*images_background_small1.zip"
  ):
    load_omniglot(data, archives=["images_background_small1"], cache_dir=tmp_path / "cache")
  assert issubclass(CorruptDataError, ValueError)


def test_corrupt_member_of_archive(tmp_path, fake_omniglot):
  path = fake_omniglot(tmp_path)
  raw = bytearray(path.read_bytes())
  with zipfile.ZipFile(path) as zf:
    info = zf.infolist()[3]
  # Damage compressed bytes of one member: its CRC check fails when read.
  start = info.header_offset + 30 + len(info.filename) + 5
  raw[start : start + 20] = bytes(20)
  path.write_bytes(bytes(raw))
  with pytest.raises(CorruptDataError, match=r"(cannot read|unreadable image) .*Alpha/character01"):
    load_omniglot(tmp_path, archives=[BACKGROUND], use_cache=False)


@pytest.mark.parametrize("as_zip", [True, False])
def test_unreadable_png(tmp_path, fake_omniglot, as_zip):
  path = fake_omniglot(tmp_path, as_zip=False)
  bad = path / "Beta/character02/0004_07.png"
  bad.write_bytes(bad.read_bytes()[:40])  # a truncated PNG
  if as_zip:
    shutil.make_archive(str(tmp_path / "zipped" / BACKGROUND), "zip", tmp_path, BACKGROUND)
    data = tmp_path / "zipped"
  else:
    data = tmp_path
  with pytest.raises(CorruptDataError, match="unreadable image .*Beta/character02/0004_07.png"):
    load_omniglot(data, archives=[BACKGROUND], use_cache=False)


def test_character_with_missing_images(tmp_path, fake_omniglot):
  path = fake_omniglot(tmp_path, as_zip=False)
  (path / "Alpha/character02/0002_20.png").unlink()
  with pytest.raises(
    CorruptDataError, match="Alpha/character02 .* has 19 images; every Omniglot character has 20"
  ):
    load_omniglot(tmp_path, archives=[BACKGROUND], use_cache=False)


def test_empty_archive(tmp_path):
  with zipfile.ZipFile(tmp_path / "images_background.zip", "w") as zf:
    zf.writestr("readme.txt", "nothing here")
  with pytest.raises(CorruptDataError, match="no images found"):
    load_omniglot(tmp_path, archives=[BACKGROUND], use_cache=False)


def test_shared_data_dir_is_left_untouched(omniglot_dir, tmp_path, monkeypatch):
  """A load with the default cache location leaves the data folder exactly as it was (whatever
  earlier runs may have left in it)."""
  monkeypatch.delenv("METAJAX_CACHE_DIR", raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  before = _listing(Path(omniglot_dir))
  load_omniglot(omniglot_dir, archives=["images_background_small1"])
  assert _listing(Path(omniglot_dir)) == before
  assert len(list((tmp_path / "xdg/metajax").glob("metajax-omniglot-background_small1-*.npz"))) == 1


def _break_deflate(path: Path, member: str) -> None:
  """Sets the first byte of `member`'s deflate stream to 0xFF, a block of type 3 (which does not
  exist): reading the member raises zlib.error, as a bit flip inside the stream does."""
  raw = bytearray(path.read_bytes())
  with zipfile.ZipFile(path) as zf:
    offset = zf.getinfo(member).header_offset
  name_length = int.from_bytes(raw[offset + 26 : offset + 28], "little")
  extra_length = int.from_bytes(raw[offset + 28 : offset + 30], "little")
  raw[offset + 30 + name_length + extra_length] = 0xFF
  path.write_bytes(bytes(raw))


def test_corrupt_deflate_stream_names_the_archive_and_member(tmp_path, fake_omniglot):
  path = fake_omniglot(tmp_path / "data")
  with zipfile.ZipFile(path) as zf:
    member = zf.infolist()[3].filename
  _break_deflate(path, member)
  cache_dir = tmp_path / "cache"
  with pytest.raises(CorruptDataError) as error:
    load_omniglot(tmp_path / "data", archives=[BACKGROUND], cache_dir=cache_dir)
  assert isinstance(error.value.__cause__, zlib.error)
  message = str(error.value)
  assert message.startswith(f"cannot read {member} from {str(path)!r} (Error -3 ")
  assert message.endswith(f"); replace it with an intact copy of {BACKGROUND}.zip")
  assert not cache_dir.exists()  # nothing cached


# --- archives with only some of their published alphabets -----------------------------------------


def test_published_alphabets_are_those_of_the_archives(omniglot_dir):
  for archive, alphabets in PUBLISHED_ALPHABETS.items():
    with zipfile.ZipFile(omniglot_dir / f"{archive}.zip") as zf:
      folders = {tuple(n.split("/")[1:3]) for n in zf.namelist() if n.endswith(".png")}
    assert folders == {(a, f"character{i:02d}") for a, n in alphabets.items()
                       for i in range(1, n + 1)}
    assert (len(alphabets), sum(alphabets.values())) == OMNIGLOT_PUBLISHED_COUNTS[archive][:2]


def _listing_only(root: Path, archive: str, alphabets: Mapping[str, int]) -> Path:
  """A zip in Omniglot's layout whose PNGs are empty: enough for what is checked before anything
  is decoded (decoding one would fail)."""
  root.mkdir(parents=True, exist_ok=True)
  path, char_id = root / f"{archive}.zip", 1
  with zipfile.ZipFile(path, "w") as zf:
    for alphabet, num_characters in alphabets.items():
      for c in range(1, num_characters + 1):
        for drawer in range(1, 21):
          zf.writestr(f"{archive}/{alphabet}/character{c:02d}/{char_id:04d}_{drawer:02d}.png", b"")
        char_id += 1
  return path


def test_an_archive_with_some_alphabets_is_refused_before_decoding_and_nothing_cached(tmp_path):
  published = list(PUBLISHED_ALPHABETS[BACKGROUND])
  path = _listing_only(tmp_path / "data", BACKGROUND,
                       {a: PUBLISHED_ALPHABETS[BACKGROUND][a] for a in published[:5]})
  cache_dir = tmp_path / "cache"
  with pytest.raises(CorruptDataError) as error:
    load_omniglot(tmp_path / "data", archives=[BACKGROUND], cache_dir=cache_dir)
  assert str(error.value) == (
    f"incomplete Omniglot archive {str(path)!r}: it has 5 of the 30 published alphabets (missing "
    f"{', '.join(published[5:10])} and 20 more); replace it with a complete copy of "
    f"{BACKGROUND}.zip (load_omniglot(allow_partial=True) reads only what is there)")
  assert not cache_dir.exists()


def test_an_alphabet_with_missing_characters_is_refused(tmp_path):
  alphabets = dict(PUBLISHED_ALPHABETS[SMALL1])
  alphabets["Latin"] -= 2
  _listing_only(tmp_path, SMALL1, alphabets)
  with pytest.raises(CorruptDataError, match=re.escape(
      ": missing 2 characters of its alphabets (Latin/character25, Latin/character26); replace")):
    load_omniglot(tmp_path, archives=[SMALL1], use_cache=False)


def test_allow_partial_reads_what_is_there_and_its_cache_is_no_way_around_the_check(
  tmp_path, fake_omniglot
):
  data, cache_dir = tmp_path / "data", tmp_path / "cache"
  fake_omniglot(data, SMALL1, alphabets=(("Greek", 2),))
  pool = load_omniglot(data, archives=[SMALL1], cache_dir=cache_dir, allow_partial=True)
  assert list(pool.class_names) == ["Greek/character01", "Greek/character02"]
  assert len(list(cache_dir.glob("*.npz"))) == 1
  # the same source without allow_partial: the cached pool is checked as well
  with pytest.raises(CorruptDataError, match=re.escape(
      "it has 1 of the 5 published alphabets (missing Balinese, Early_Aramaic, Korean, Latin); "
      "missing 22 characters of its alphabets (Greek/character03, ")):
    load_omniglot(data, archives=[SMALL1], cache_dir=cache_dir)
