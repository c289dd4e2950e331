"""metajax's version, read from the installed distribution: pyproject.toml is its one source."""

from __future__ import annotations

from importlib import metadata

__all__ = ["__version__"]


def _installed_version() -> str:
  try:
    return metadata.version("metajax")
  except metadata.PackageNotFoundError:  # imported from a source tree that was never installed
    return "0+unknown"


__version__: str = _installed_version()
