"""Opt-in download of Omniglot's published archives, verified against their published sha256.

Nothing here runs unless asked: `load_omniglot(download=True)` (the binaries'
`--config.download=True`) or `download_omniglot()` itself. The archives come from the dataset's
official repository, `brendenlake/omniglot` on GitHub (folder `python/`), and go by default to
`default_omniglot_dir()`, a folder of the user's cache directory (`metajax.data.cache`), never
to a data folder that was not named.

Each file is streamed to a temporary file beside its destination, checked (byte count against
the published size and the server's `Content-Length`, sha256 against the published sum), and only
then renamed into place: an interrupted, truncated or corrupted transfer leaves nothing behind,
and a file under the final name is always a verified one.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

from metajax.data import cache as cache_lib

__all__ = [
  "OMNIGLOT_DOWNLOADS",
  "OMNIGLOT_URL",
  "DownloadError",
  "Published",
  "default_omniglot_dir",
  "download_file",
  "download_omniglot",
]

_log = logging.getLogger(__name__)

OMNIGLOT_URL = "https://github.com/brendenlake/omniglot/raw/master/python/"


class Published(NamedTuple):
  """A published file's size in bytes and sha256 (hex)."""

  size: int
  sha256: str


# The files under OMNIGLOT_URL, as published. These must be the sums of the published files
# themselves: they are tensorflow-datasets' recorded checksums for these very URLs
# (tensorflow_datasets/url_checksums/omniglot.txt). A re-zipped copy holding the same images has
# other sums and is refused; read such a copy with `data_dir=` instead.
OMNIGLOT_DOWNLOADS: dict[str, Published] = {
  "images_background": Published(
    9_464_212, "ad41ab679c8b5d90b271ef46be6987cc81211774a695c29dcc5367b2b26ee640"),
  "images_evaluation": Published(
    6_462_886, "1f61a8f3366785b057fc117d9228e78a16e3d976c8953b2a10fcc74cf0609cee"),
  "images_background_small1": Published(
    1_319_022, "f38eb80f801274ac2b4dff5b24289016bfaba4a7d5bb50deebf27104ad6cb8a4"),
  "images_background_small2": Published(
    1_580_917, "3ccaa407515a8778e5d0861875af38b17e418f301ad5bb3b5a6b65d901a41c7f"),
}
_DEFAULT_ARCHIVES = ("images_background", "images_evaluation")
_CHUNK = 1 << 16


class DownloadError(OSError):
  """A download failed: no connection, an HTTP error, a truncated transfer, a wrong checksum.

  Nothing is left under the destination's name when it is raised.
  """


def default_omniglot_dir() -> Path:
  """Where `download_omniglot` puts the archives by default: `<cache dir>/omniglot`.

  The cache directory is `metajax.data.cache.resolve_cache_dir()`: `$METAJAX_CACHE_DIR`, else the
  user's cache directory (`~/.cache/metajax` on Linux).
  """
  return cache_lib.resolve_cache_dir() / "omniglot"


def _sha256(path: Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def download_file(url: str, path: str | os.PathLike[str], *, sha256: str,
                  size: int | None = None, timeout: float = 60.0) -> Path:
  """Downloads `url` to `path` if its sha256 is `sha256`; nothing is left at `path` otherwise.

  The bytes go to a temporary file in `path`'s directory (created if needed), are counted and
  hashed on the way, and the file is renamed to `path` only after every check passed.

  Args:
    url: what to fetch (http, https or file URL).
    path: the destination file.
    sha256: the expected hex sha256 of the whole file.
    size: the expected size in bytes, when known (a short transfer is then named as such).
    timeout: seconds to wait for the connection and for each read.

  Returns:
    `path`, as a `Path`.

  Raises:
    DownloadError: the connection failed or was refused, the server answered with an HTTP error,
      the transfer ended early (fewer bytes than `Content-Length` or `size`), or the sha256 differs.
    OSError: the destination directory cannot be created or written (e.g. PermissionError).
  """
  path = Path(path)
  with cache_lib.atomic_write(path, suffix=".part") as out:  # checks fail inside: nothing kept
    digest, received, announced = hashlib.sha256(), 0, None
    try:
      request = urllib.request.Request(url, headers={"User-Agent": "metajax"})
      with urllib.request.urlopen(request, timeout=timeout) as response:
        length = response.headers.get("Content-Length")
        announced = int(length) if length and length.isdigit() else None
        for chunk in iter(lambda: response.read(_CHUNK), b""):
          digest.update(chunk)
          out.write(chunk)
          received += len(chunk)
    except urllib.error.HTTPError as e:
      raise DownloadError(f"cannot download {url}: HTTP {e.code} {e.reason}") from e
    except urllib.error.URLError as e:
      raise DownloadError(f"cannot download {url}: {e.reason}") from e
    except http.client.IncompleteRead as e:  # what newer Pythons raise on an early close
      got = received + len(e.partial)
      whole = got + e.expected if e.expected is not None else announced
      raise DownloadError(f"download of {url} was cut short: {got} of {whole} bytes; "
                          "nothing was kept, try again") from e
    except (OSError, http.client.HTTPException) as e:  # resets, timeouts, bad responses
      raise DownloadError(f"download of {url} failed after {received} bytes: {e!r}") from e
    # urllib does not raise on a connection closed early: count the bytes.
    whole = announced if announced is not None else size
    if whole is not None and received < whole:
      raise DownloadError(f"download of {url} was cut short: {received} of {whole} bytes; "
                          "nothing was kept, try again")
    if size is not None and received != size:
      raise DownloadError(f"{url} is {received} bytes, the published file {size}: not the "
                          "published file; nothing was kept")
    got = digest.hexdigest()
    if got != sha256.lower():
      raise DownloadError(f"sha256 of {url} is {got}, expected {sha256.lower()} (the published "
                          "file's): the transfer was corrupted or the file changed; nothing was "
                          "kept")
  return path


def download_omniglot(dest: str | os.PathLike[str] | None = None, *,
                      archives: Sequence[str] = _DEFAULT_ARCHIVES, base_url: str | None = None,
                      checksums: Mapping[str, Published] | None = None,
                      timeout: float = 60.0) -> Path:
  """Downloads Omniglot's published archives into `dest` and verifies their sha256.

  An archive already in `dest` with the published sum is kept as it is (no network access);
  one with another sum is an error, never overwritten.

  Args:
    dest: the folder to put `<archive>.zip` in; default `default_omniglot_dir()`.
    archives: which archives (names of `OMNIGLOT_DOWNLOADS`); default background and evaluation,
      the 1623 characters `load_omniglot` reads by default.
    base_url: the folder URL the archives are fetched from; default `OMNIGLOT_URL` (the dataset's
      official repository). Tests point it at a local server.
    checksums: archive -> `Published(size, sha256)`; default `OMNIGLOT_DOWNLOADS`.
    timeout: seconds to wait for the connection and for each read.

  Returns:
    The folder holding the archives (pass it to `load_omniglot` as `data_dir`).

  Raises:
    ValueError: an archive without a published checksum.
    DownloadError: a failed, truncated or corrupted download, or an existing file with another
      sha256 (remove it, or point `dest` elsewhere).
  """
  dest = Path(dest).expanduser() if dest is not None else default_omniglot_dir()
  base_url = base_url if base_url is not None else OMNIGLOT_URL
  checksums = checksums if checksums is not None else OMNIGLOT_DOWNLOADS
  unknown = [a for a in archives if a not in checksums]
  if unknown:
    raise ValueError(f"no published checksum for {', '.join(unknown)}; downloadable: "
                     f"{', '.join(checksums)}")
  for archive in archives:
    published = checksums[archive]
    path = dest / f"{archive}.zip"
    if path.is_file():
      got = _sha256(path)
      if got != published.sha256.lower():
        raise DownloadError(f"{str(path)!r} exists but its sha256 is {got}, not the published "
                            f"{published.sha256}: remove it to download it again")
      continue
    url = base_url.rstrip("/") + f"/{archive}.zip"
    _log.info("downloading %s (%.1f MB) to %s", url, published.size / 1e6, path)
    download_file(url, path, sha256=published.sha256, size=published.size, timeout=timeout)
  return dest
