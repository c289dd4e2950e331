"""Tests of metajax.data.download against a local HTTP server on 127.0.0.1, never the internet."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import socket
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from metajax.data import DownloadError, download_omniglot, load_omniglot
from metajax.data import download as download_lib

BACKGROUND = "images_background"


class _Handler(http.server.BaseHTTPRequestHandler):
  """Serves `server.files` (name -> bytes); `server.truncate` names files cut to half their
  announced length, the connection then closed."""

  def do_GET(self):  # noqa: N802 - http.server's name
    name = self.path.rsplit("/", 1)[-1]
    body = self.server.files.get(name)
    if body is None:
      self.send_error(404, "not here")
      return
    self.send_response(200)
    self.send_header("Content-Type", "application/zip")
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    self.wfile.write(body[: len(body) // 2] if name in self.server.truncate else body)
    self.wfile.flush()
    self.close_connection = True

  def log_message(self, *args):  # keep the test output quiet
    pass


@contextlib.contextmanager
def _serve(files: dict[str, bytes], truncate: tuple[str, ...] = ()) -> Iterator[str]:
  """A server on 127.0.0.1 (a free port) in a thread; yields its base URL."""
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
  server.files, server.truncate = files, truncate
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    yield f"http://127.0.0.1:{server.server_address[1]}/omniglot/python/"
  finally:
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture
def archive(tmp_path, fake_omniglot) -> tuple[bytes, download_lib.Published]:
  """A small archive in Omniglot's layout and its checksum entry."""
  raw = fake_omniglot(tmp_path / "fixture").read_bytes()
  return raw, download_lib.Published(len(raw), hashlib.sha256(raw).hexdigest())


@pytest.fixture(autouse=True)
def _no_internet(monkeypatch):
  """Any URL but 127.0.0.1 fails the test: nothing here may reach the network."""
  real = urllib.request.urlopen

  def local_only(request, *args, **kwargs):
    url = request.full_url if isinstance(request, urllib.request.Request) else str(request)
    if not url.startswith("http://127.0.0.1:"):
      raise AssertionError(f"a test tried to download {url}")
    return real(request, *args, **kwargs)

  monkeypatch.setattr(urllib.request, "urlopen", local_only)


def _files(directory: Path) -> list[str]:
  return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def test_download_verifies_and_is_read_by_the_loader(tmp_path, archive):
  raw, published = archive
  with _serve({f"{BACKGROUND}.zip": raw}) as url:
    dest = download_omniglot(tmp_path / "dl", archives=[BACKGROUND], base_url=url,
                             checksums={BACKGROUND: published})
  assert dest == tmp_path / "dl"
  assert _files(dest) == [f"{BACKGROUND}.zip"]  # no temporary file left
  assert (dest / f"{BACKGROUND}.zip").read_bytes() == raw
  assert (dest / f"{BACKGROUND}.zip").stat().st_mode & 0o777 == 0o644
  pool = load_omniglot(dest, archives=[BACKGROUND], use_cache=False)
  assert pool.num_classes == 5
  # A verified file already there is kept, without any connection (the server is gone).
  download_omniglot(dest, archives=[BACKGROUND], base_url=url, checksums={BACKGROUND: published})


def test_wrong_checksum_keeps_nothing(tmp_path, archive):
  raw, published = archive
  wrong = published._replace(sha256="0" * 64)
  with _serve({f"{BACKGROUND}.zip": raw}) as url:
    with pytest.raises(DownloadError, match=f"sha256 of {url}images_background.zip is "
                                            f"{published.sha256}, expected 0{{64}}"):
      download_omniglot(tmp_path / "dl", archives=[BACKGROUND], base_url=url,
                        checksums={BACKGROUND: wrong})
  assert _files(tmp_path / "dl") == []


def test_truncated_transfer_keeps_nothing(tmp_path, archive):
  raw, published = archive
  with _serve({f"{BACKGROUND}.zip": raw}, truncate=(f"{BACKGROUND}.zip",)) as url:
    with pytest.raises(DownloadError, match=f"cut short: {len(raw) // 2} of {len(raw)} bytes"):
      download_omniglot(tmp_path / "dl", archives=[BACKGROUND], base_url=url,
                        checksums={BACKGROUND: published})
  assert _files(tmp_path / "dl") == []


def test_refused_connection_keeps_nothing(tmp_path, archive):
  _, published = archive
  with socket.socket() as s:  # a port nobody listens on once this socket is closed
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  with pytest.raises(DownloadError, match=f"cannot download http://127.0.0.1:{port}/.*refused"):
    download_omniglot(tmp_path / "dl", archives=[BACKGROUND],
                      base_url=f"http://127.0.0.1:{port}/", checksums={BACKGROUND: published})
  assert _files(tmp_path / "dl") == []


def test_http_error_and_size_mismatch(tmp_path, archive):
  raw, published = archive
  with _serve({}) as url:
    with pytest.raises(DownloadError, match="HTTP 404"):
      download_omniglot(tmp_path / "dl", archives=[BACKGROUND], base_url=url,
                        checksums={BACKGROUND: published})
  with _serve({f"{BACKGROUND}.zip": raw + b"extra"}) as url:
    with pytest.raises(DownloadError, match="not the published file"):
      download_omniglot(tmp_path / "dl", archives=[BACKGROUND], base_url=url,
                        checksums={BACKGROUND: published})
  assert _files(tmp_path / "dl") == []


def test_existing_file_with_another_checksum_is_never_overwritten(tmp_path, archive):
  _, published = archive
  (tmp_path / f"{BACKGROUND}.zip").write_bytes(b"somebody's file")
  with pytest.raises(DownloadError, match="exists but its sha256 .* remove it"):
    download_omniglot(tmp_path, archives=[BACKGROUND], base_url="http://127.0.0.1:9/",
                      checksums={BACKGROUND: published})
  assert (tmp_path / f"{BACKGROUND}.zip").read_bytes() == b"somebody's file"
  with pytest.raises(ValueError, match="no published checksum for images_test"):
    download_omniglot(tmp_path, archives=["images_test"])


def test_published_table_and_default_location(tmp_path, monkeypatch):
  assert set(download_lib.OMNIGLOT_DOWNLOADS) == {
    "images_background", "images_evaluation", "images_background_small1",
    "images_background_small2"}
  for size, sha256 in download_lib.OMNIGLOT_DOWNLOADS.values():
    assert size > 10**6 and len(sha256) == 64 and int(sha256, 16) >= 0
  assert download_lib.OMNIGLOT_URL.startswith("https://github.com/brendenlake/omniglot/")
  monkeypatch.setenv("METAJAX_CACHE_DIR", str(tmp_path / "cache"))
  assert download_lib.default_omniglot_dir() == tmp_path / "cache/omniglot"


def test_shared_small_archives_match_the_published_sums(omniglot_dir):
  """The small archives of the shared data are the published files themselves (the large ones
  there were re-zipped, so their sums differ by design)."""
  for archive in ("images_background_small1", "images_background_small2"):
    raw = (omniglot_dir / f"{archive}.zip").read_bytes()
    published = download_lib.OMNIGLOT_DOWNLOADS[archive]
    assert (len(raw), hashlib.sha256(raw).hexdigest()) == tuple(published)


def test_loader_downloads_only_when_asked(tmp_path, archive, monkeypatch):
  raw, published = archive
  monkeypatch.delenv("METAJAX_OMNIGLOT_DIR", raising=False)
  monkeypatch.setenv("METAJAX_CACHE_DIR", str(tmp_path / "cache"))
  with pytest.raises(FileNotFoundError) as error:
    load_omniglot(archives=[BACKGROUND])  # no data, no download: both ways are named
  message = str(error.value)
  assert "data_dir=" in message and "METAJAX_OMNIGLOT_DIR" in message
  assert "download=True" in message and "--config.download=True" in message
  assert str(tmp_path / "cache/omniglot") in message
  assert not (tmp_path / "cache").exists()  # nothing fetched or written
  with pytest.raises(FileNotFoundError, match="download=True"):
    load_omniglot(tmp_path / "empty_but_missing", archives=[BACKGROUND])
  with pytest.raises(ValueError, match="resample='cubic'"):  # checked before any download
    load_omniglot(archives=[BACKGROUND], download=True, resample="cubic")

  with _serve({f"{BACKGROUND}.zip": raw}) as url:
    monkeypatch.setattr(download_lib, "OMNIGLOT_URL", url)
    monkeypatch.setitem(download_lib.OMNIGLOT_DOWNLOADS, BACKGROUND, published)
    pool = load_omniglot(archives=[BACKGROUND], download=True)
  assert pool.num_classes == 5
  assert _files(tmp_path / "cache/omniglot") == [f"{BACKGROUND}.zip"]
  # Later loads find the download without being told where it is, and without the network.
  again = load_omniglot(archives=[BACKGROUND])
  np.testing.assert_array_equal(again.images, pool.images)


def test_loader_download_into_a_named_folder(tmp_path, archive, monkeypatch, fake_omniglot):
  raw, published = archive
  data = tmp_path / "data"
  fake_omniglot(data, "images_evaluation", (("Gamma", 1),), first_id=6, as_zip=False)
  with _serve({f"{BACKGROUND}.zip": raw}) as url:
    monkeypatch.setattr(download_lib, "OMNIGLOT_URL", url)
    monkeypatch.setitem(download_lib.OMNIGLOT_DOWNLOADS, BACKGROUND, published)
    pool = load_omniglot(data, download=True, use_cache=False)  # evaluation is there already
  assert pool.num_classes == 6
  assert _files(data) == [f"{BACKGROUND}.zip", "images_evaluation"]
