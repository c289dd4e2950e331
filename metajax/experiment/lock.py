"""One writer per workdir: an advisory lock on `<workdir>/.lock`, held while a process writes there.

The lock is `fcntl.flock` on an open file, so the kernel releases it when the holder exits in any
way (SIGKILL included): a lock file left by a dead process is never mistaken for a live holder.
The file records the holder's pid, host and start time, so that a refused process can say who
holds the workdir. Across hosts it holds as far as the filesystem's flock does (local filesystems,
and NFS with lock support).
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
from pathlib import Path
from types import TracebackType

LOCK_FILE = ".lock"


class WorkdirBusyError(RuntimeError):
  """Another live process holds the workdir's lock."""


def _describe(path: Path) -> str:
  try:
    holder = json.loads(path.read_text())
    return (f"pid {holder['pid']} on {holder['host']}, started {holder['started']}")
  except (OSError, ValueError, KeyError, TypeError):
    return "a process that has not yet recorded itself"


class WorkdirLock:
  """Context manager holding `<workdir>/.lock` exclusively; `WorkdirBusyError` if another process
  holds it.

  Args:
    workdir: an existing, writable directory.
    purpose: what the holder does there (recorded in the lock file), e.g. "train".
  """

  def __init__(self, workdir: str | os.PathLike[str], *, purpose: str = "write"):
    self.path = Path(workdir) / LOCK_FILE
    self.purpose = purpose
    self._fd: int | None = None

  def acquire(self) -> None:
    """Takes the lock, or raises `WorkdirBusyError` naming the holder."""
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      raise WorkdirBusyError(
        f"workdir {str(self.path.parent)!r} is in use by {_describe(self.path)}; wait for it to "
        "finish or stop it, or pass another --workdir") from None
    except BaseException:
      os.close(fd)
      raise
    # Rewritten in place (not replaced): a rename would give waiters a different inode to lock.
    record = {"pid": os.getpid(), "host": socket.gethostname(), "purpose": self.purpose,
              "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    self._fd = fd

  def release(self) -> None:
    """Releases the lock (the file stays: removing it would race with a process locking it)."""
    if self._fd is None:
      return
    fd, self._fd = self._fd, None
    try:
      os.ftruncate(fd, 0)
    except OSError:
      pass  # the lock is what matters, and closing releases it
    os.close(fd)

  @property
  def held(self) -> bool:
    return self._fd is not None

  def __enter__(self) -> WorkdirLock:
    self.acquire()
    return self

  def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
               tb: TracebackType | None) -> None:
    self.release()
