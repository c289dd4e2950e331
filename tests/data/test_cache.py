"""Tests of metajax.data.cache: atomic, keyed, verified array caches."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest

from metajax.data import cache as cache_lib


def _arrays():
  return {
    "images": np.arange(60, dtype=np.uint8).reshape(3, 4, 5),
    "names": np.array(["a", "bb", "ccc"]),
    "ids": np.array([3, 1, 2], np.int32),
  }


def test_round_trip(tmp_path):
  path = tmp_path / "sub" / "c.npz"
  cache_lib.save_arrays(path, _arrays(), key="k1")
  loaded = cache_lib.load_arrays(path, key="k1")
  assert set(loaded) == set(_arrays())
  for name, array in _arrays().items():
    np.testing.assert_array_equal(loaded[name], array)
  assert [p.name for p in path.parent.iterdir()] == ["c.npz"]  # no temporary file left
  assert path.stat().st_mode & 0o777 == 0o644


def test_missing_and_stale(tmp_path):
  path = tmp_path / "c.npz"
  assert cache_lib.load_arrays(path, key="k") is None
  cache_lib.save_arrays(path, _arrays(), key="k1")
  with pytest.warns(RuntimeWarning, match="built for another source"):
    assert cache_lib.load_arrays(path, key="k2") is None


def test_corruption_is_detected(tmp_path):
  path = tmp_path / "c.npz"
  cache_lib.save_arrays(path, _arrays(), key="k")
  raw = path.read_bytes()
  path.write_bytes(raw[:-50])
  with pytest.warns(RuntimeWarning, match="unreadable cache"):
    assert cache_lib.load_arrays(path, key="k") is None
  # Same key, valid npz, different data: the stored checksum catches it.
  with np.load(_save(tmp_path / "d.npz")) as npz:
    payload = {k: npz[k] for k in npz.files}
  payload["ids"] = np.array([3, 1, 9], np.int32)
  np.savez_compressed(tmp_path / "d.npz", **payload)
  with pytest.warns(RuntimeWarning, match="checksum mismatch"):
    assert cache_lib.load_arrays(tmp_path / "d.npz", key="k") is None


def _save(path):
  cache_lib.save_arrays(path, _arrays(), key="k")
  return path


def test_cached_arrays_builds_once(tmp_path):
  calls = []

  def build():
    calls.append(1)
    return _arrays()

  path = tmp_path / "c.npz"
  first = cache_lib.cached_arrays(path, key="k", build=build)
  second = cache_lib.cached_arrays(path, key="k", build=build)
  assert len(calls) == 1
  np.testing.assert_array_equal(first["images"], second["images"])
  path.write_bytes(b"junk")
  with pytest.warns(RuntimeWarning):
    cache_lib.cached_arrays(path, key="k", build=build)
  assert len(calls) == 2


def test_unwritable_cache_still_returns(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("a file where a directory should be")
  with pytest.warns(RuntimeWarning, match="could not write cache"):
    arrays = cache_lib.cached_arrays(blocker / "c.npz", key="k", build=_arrays)
  np.testing.assert_array_equal(arrays["ids"], [3, 1, 2])


def test_refuses_object_arrays(tmp_path):
  with pytest.raises(ValueError, match="dtype object"):
    cache_lib.save_arrays(tmp_path / "c.npz", {"x": np.array([{}, 1], dtype=object)}, key="k")


def test_fingerprint(tmp_path):
  f = tmp_path / "a.zip"
  f.write_bytes(b"1234")
  d = tmp_path / "extracted"
  (d / "x").mkdir(parents=True)
  (d / "x" / "1.png").write_bytes(b"abc")
  first = cache_lib.fingerprint([f, d])
  assert cache_lib.fingerprint([f, d]) == first
  f.write_bytes(b"1235")  # same size, new content
  assert cache_lib.fingerprint([f, d]) != first
  second = cache_lib.fingerprint([f, d])
  (d / "x" / "2.png").write_bytes(b"abc")
  assert cache_lib.fingerprint([f, d]) != second
  with pytest.raises(FileNotFoundError, match="no such file"):
    cache_lib.fingerprint([tmp_path / "nope"])


def test_resolve_cache_dir(tmp_path, monkeypatch):
  monkeypatch.delenv(cache_lib.CACHE_DIR_ENV, raising=False)
  monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  monkeypatch.setattr(cache_lib.sys, "platform", "linux")
  assert cache_lib.resolve_cache_dir(tmp_path / "explicit") == tmp_path / "explicit"
  assert cache_lib.resolve_cache_dir() == tmp_path / "home/.cache/metajax"
  assert cache_lib.resolve_cache_dir("") == tmp_path / "home/.cache/metajax"  # a config's ""
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert cache_lib.resolve_cache_dir() == tmp_path / "xdg/metajax"
  monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # ignored, as the XDG spec says
  assert cache_lib.resolve_cache_dir() == tmp_path / "home/.cache/metajax"
  monkeypatch.setenv(cache_lib.CACHE_DIR_ENV, str(tmp_path / "env"))
  assert cache_lib.resolve_cache_dir() == tmp_path / "env"
  assert cache_lib.resolve_cache_dir(tmp_path / "explicit") == tmp_path / "explicit"


def test_user_cache_dir_per_platform(tmp_path, monkeypatch):
  monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
  monkeypatch.setenv("HOME", str(tmp_path))
  monkeypatch.setattr(cache_lib.sys, "platform", "darwin")
  assert cache_lib.user_cache_dir() == tmp_path / "Library/Caches/metajax"
  monkeypatch.setattr(cache_lib.sys, "platform", "win32")
  monkeypatch.setenv("LOCALAPPDATA", str(tmp_path / "local"))
  assert cache_lib.user_cache_dir() == tmp_path / "local/metajax"


def test_make_key_is_order_independent():
  assert cache_lib.make_key(a=1, b=(2, 3)) == cache_lib.make_key(b=(2, 3), a=1)
  assert cache_lib.make_key(a=1) != cache_lib.make_key(a=2)


def test_no_warning_on_valid_load(tmp_path):
  path = _save(tmp_path / "c.npz")
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert cache_lib.load_arrays(path, key="k") is not None
  assert os.path.getsize(path) > 0
