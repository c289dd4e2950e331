"""Fixtures of the data tests: every test gets its own cache directory."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _private_cache_dir(tmp_path_factory: pytest.TempPathFactory,
                       monkeypatch: pytest.MonkeyPatch) -> None:
  """Points `$METAJAX_CACHE_DIR` at a fresh directory, so a loader's default cache location is
  never the user's own (`~/.cache/metajax`): a test neither reads what earlier runs left there
  nor leaves anything behind. Tests of the default location unset it themselves."""
  monkeypatch.setenv("METAJAX_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
