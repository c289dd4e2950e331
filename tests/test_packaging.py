"""Packaging: one version (pyproject.toml's), the PEP 561 marker, the license file."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

import metajax

ROOT = Path(__file__).resolve().parents[1]


def _pyproject_field(name: str) -> str:
  match = re.search(rf'^{name} = "([^"]+)"$', (ROOT / "pyproject.toml").read_text(), re.M)
  assert match, f"pyproject.toml has no {name} = \"...\" line"
  return match.group(1)


def test_version_has_one_source():
  version = _pyproject_field("version")
  assert metajax.__version__ == metadata.version("metajax") == version, (
    "the installed metadata is stale: reinstall with `pip install -e .`")


def test_typed_marker_ships_with_the_package():
  assert (ROOT / "metajax/py.typed").is_file()
  assert re.search(r'^metajax = \[[^\]]*"py\.typed"', (ROOT / "pyproject.toml").read_text(), re.M)


def test_license_file_is_the_declared_license():
  text = (ROOT / "LICENSE").read_text()
  assert "Apache License" in text and "Version 2.0, January 2004" in text
  assert "END OF TERMS AND CONDITIONS" in text
  assert 'license = { text = "Apache-2.0" }' in (ROOT / "pyproject.toml").read_text()
