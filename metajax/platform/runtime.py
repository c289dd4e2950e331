"""Process start-up setting that makes XLA:CPU fast: transparent huge pages for glibc's malloc.

Why this module exists: XLA:CPU takes each executable's temporaries from `malloc` (gigabytes for a
meta-step over 32 tasks: im2col patch matrices, activations kept for the backward pass). glibc
serves blocks that large with a fresh `mmap` and unmaps them on `free`, so every step faults every
4 KiB page in again and the kernel zeroes it: one fwd+bwd of a convolution over a [2560, 14, 14,
64] batch took 660,000 minor page faults and about as much system time as compute time. glibc
>= 2.35 backs those blocks with 2 MiB transparent huge pages when `GLIBC_TUNABLES` holds
`glibc.malloc.hugetlb=1`: 100-350x fewer faults measured; on this project's 2-core CPU that took the
second-order W1 meta-step from 4.3 to 2.2 s at the same peak memory (docs/BENCHMARKS.md; the
PyTorch peers gain from it too). It matters only when the kernel's THP mode is `madvise` (the
Debian and Ubuntu default): with `always` every large block gets huge pages anyway, with `never`
none can.

glibc reads the tunable once, when the process starts, so it cannot be switched on from Python;
`reexec_with_hugepages()` re-executes the running command with it (the experiment binaries and the
benchmarks call it first). Scripts of your own can call it at the top of their `__main__` block or
be started as `GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python script.py`. `METAJAX_HUGEPAGES=0`
opts out. The setting changes where memory comes from, never what is computed.

What it cannot fix: in a VM whose kernel reports freed pages to the host (free page reporting,
e.g. Firecracker), memory that a step frees and the next step maps again may have been taken
back by the host in between, and faulting it back costs seconds. glibc tunables that keep freed
memory in the process (`arena_max=1:mmap_max=0`) fragment the heap to 2-3x the peak (W20 ran out
of memory); the fix is to allocate less often: `MetaStep.steps` runs several outer steps in one
compiled call, over one set of temporaries (see `metajax.meta.compile_step`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import NamedTuple

__all__ = [
  "HUGEPAGE_TUNABLE",
  "Decision",
  "decide",
  "decide_here",
  "glibc_version",
  "hugepage_environ",
  "reexec_with_hugepages",
  "thp_mode",
  "with_hugepage_tunable",
  "without_hugepage_tunable",
]

HUGEPAGE_TUNABLE = "glibc.malloc.hugetlb=1"
_TUNABLE_NAME = "glibc.malloc.hugetlb"
_OPT_OUT = "METAJAX_HUGEPAGES"
_THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


class Decision(NamedTuple):
  """Whether to re-execute with `HUGEPAGE_TUNABLE`, and why (a short phrase for logs)."""

  reexec: bool
  reason: str


def thp_mode(path: str = _THP_ENABLED) -> str | None:
  """The kernel's transparent-huge-page mode (`'always'`, `'madvise'`, `'never'`), or None.

  None where the file is missing or unreadable (not Linux, THP compiled out, a sandbox).
  """
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    return None
  # The active mode is the bracketed one: "always [madvise] never".
  start, end = text.find("["), text.find("]")
  return text[start + 1:end] if 0 <= start < end else None


def glibc_version() -> tuple[int, int] | None:
  """The running C library's glibc version as (major, minor), or None when it is not glibc."""
  try:
    text = os.confstr("CS_GNU_LIBC_VERSION")  # e.g. "glibc 2.36"
  except (AttributeError, ValueError, OSError):
    return None
  if not text or not text.startswith("glibc "):
    return None
  try:
    major, minor = text.split()[1].split(".")[:2]
    return int(major), int(minor)
  except (IndexError, ValueError):
    return None


def _tunables(environ: Mapping[str, str]) -> list[str]:
  return [t for t in environ.get("GLIBC_TUNABLES", "").split(":") if t]


def with_hugepage_tunable(environ: Mapping[str, str]) -> dict[str, str]:
  """A copy of `environ` whose `GLIBC_TUNABLES` asks malloc for huge pages.

  Other tunables are kept; an explicit `glibc.malloc.hugetlb=...` already there is respected.
  """
  env = dict(environ)
  tunables = _tunables(env)
  if not any(t.split("=")[0] == _TUNABLE_NAME for t in tunables):
    tunables.append(HUGEPAGE_TUNABLE)
  env["GLIBC_TUNABLES"] = ":".join(tunables)
  return env


def without_hugepage_tunable(environ: Mapping[str, str]) -> dict[str, str]:
  """A copy of `environ` without any `glibc.malloc.hugetlb` tunable, and opted out of re-exec."""
  env = dict(environ)
  tunables = [t for t in _tunables(env) if t.split("=")[0] != _TUNABLE_NAME]
  if tunables:
    env["GLIBC_TUNABLES"] = ":".join(tunables)
  else:
    env.pop("GLIBC_TUNABLES", None)
  env[_OPT_OUT] = "0"
  return env


def decide(environ: Mapping[str, str], platform: str, glibc: tuple[int, int] | None,
           thp: str | None) -> Decision:
  """Whether a process with this environment, OS, glibc and THP mode should re-execute.

  Pure, so every branch is testable; `reexec_with_hugepages` feeds it the live values.
  """
  if environ.get(_OPT_OUT, "1") == "0":
    return Decision(False, f"{_OPT_OUT}=0")
  if any(t.split("=")[0] == _TUNABLE_NAME for t in _tunables(environ)):
    return Decision(False, "GLIBC_TUNABLES already sets glibc.malloc.hugetlb")
  if not platform.startswith("linux"):
    return Decision(False, f"platform {platform!r} is not Linux")
  if glibc is None or glibc < (2, 35):
    return Decision(False, f"C library {glibc} is not glibc >= 2.35 (no hugetlb tunable)")
  if thp != "madvise":
    return Decision(False, f"transparent huge pages mode is {thp!r}, not 'madvise'")
  return Decision(True, "glibc >= 2.35 and THP mode 'madvise': malloc can use huge pages")


def decide_here(environ: Mapping[str, str]) -> Decision:
  """`decide` for this machine: its platform, glibc and THP mode, with `environ`."""
  return decide(environ, sys.platform, glibc_version(), thp_mode())


def hugepage_environ(environ: Mapping[str, str]) -> dict[str, str]:
  """The environment a binary would re-execute with: `environ` plus the tunable where it helps.

  For launching subprocesses (benchmark workers, test workers) the way the binaries run.
  """
  return with_hugepage_tunable(environ) if decide_here(environ).reexec else dict(environ)


def reexec_with_hugepages() -> Decision:
  """Re-execute the running command with `HUGEPAGE_TUNABLE` when `decide` says it helps.

  Call it first thing in a script's `__main__` block, before any work: on a re-exec this function
  does not return (the process image is replaced, same PID, arguments and environment plus the
  tunable). Otherwise it returns the `Decision`, so a caller can log why not. Never call it from
  library code or a test process: it replaces the whole interpreter.
  """
  decision = decide_here(os.environ)
  if decision.reexec:
    sys.stdout.flush()
    sys.stderr.flush()
    argv = [sys.executable, *getattr(sys, "orig_argv", [sys.executable, *sys.argv])[1:]]
    os.execve(sys.executable, argv, with_hugepage_tunable(os.environ))
  return decision
