"""Process start-up: huge-page malloc for XLA:CPU, and a quiet backend probe.

`prepare_process(hugepages=...)` is what the binaries call first: it drops jax's note that libtpu
is not installed (`silence_missing_libtpu`), then re-executes the process with glibc's huge-page
malloc where that helps (`reexec_with_hugepages`), saying so in one line on stderr.

Why this module exists: XLA:CPU takes each executable's temporaries from `malloc` (gigabytes for a
meta-step over 32 tasks: im2col patch matrices, activations kept for the backward pass). glibc
serves blocks that large with a fresh `mmap` and unmaps them on `free`, so every step faults every
4 KiB page in again and the kernel zeroes it: one fwd+bwd of a convolution over a [2560, 14, 14,
64] batch took 660,000 minor page faults and about as much system time as compute time. glibc
>= 2.35 backs those blocks with 2 MiB transparent huge pages when `GLIBC_TUNABLES` holds
`glibc.malloc.hugetlb=1`: 100-350x fewer faults, so the kernel's share of a meta-step's time all
but disappears, at the same peak memory (docs/BENCHMARKS.md; the PyTorch peers gain from it
too). It matters only when the kernel's THP mode is `madvise` (the Debian and Ubuntu default):
with `always` every large block gets huge pages anyway, with `never` none can.

glibc reads the tunable once, when the process starts, so it cannot be switched on from Python;
`reexec_with_hugepages()` re-executes the running command with it (the experiment binaries and the
benchmarks call it first), same PID, arguments and environment plus the tunable, and prints one
line saying so (a debugger attached to the process before that line loses it). Scripts of your
own can call it at the top of their `__main__` block or be started as
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python script.py`. The switch: an argument `hugepages`
("auto", "on", "off", or a bool; the binaries' `--hugepages` flag passes it), else the environment
variable `METAJAX_HUGEPAGES` (the same values, "1" and "0" too), else "auto": on exactly where it
was measured to help (Linux, glibc >= 2.35, THP mode `madvise`). "on" re-executes wherever glibc
has the tunable, whatever the THP mode. The setting changes where memory comes from, never what
is computed.

What it cannot fix: in a VM whose kernel reports freed pages to the host (free page reporting,
e.g. Firecracker), memory that a step frees and the next step maps again may have been taken
back by the host in between, and faulting it back costs seconds. glibc tunables that keep freed
memory in the process (`arena_max=1:mmap_max=0`) fragment the heap to 2-3x the peak (a 20-way
step ran out of memory); the fix is to allocate less often: `MetaStep.steps` runs several outer
steps in one compiled call, over one set of temporaries (see `metajax.meta.compile_step`).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Mapping
from typing import NamedTuple

__all__ = [
  "HUGEPAGES_ENV",
  "HUGEPAGE_TUNABLE",
  "Decision",
  "HugepagesMode",
  "decide",
  "decide_here",
  "glibc_version",
  "hugepage_environ",
  "parse_hugepages",
  "prepare_process",
  "reexec_with_hugepages",
  "silence_missing_libtpu",
  "thp_mode",
  "with_hugepage_tunable",
  "without_hugepage_tunable",
]

HUGEPAGE_TUNABLE = "glibc.malloc.hugetlb=1"
HUGEPAGES_ENV = "METAJAX_HUGEPAGES"
_TUNABLE_NAME = "glibc.malloc.hugetlb"
_OPT_OUT = HUGEPAGES_ENV
_THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"

# "auto", "on", "off", a bool, or None (defer to the environment variable, then "auto").
HugepagesMode = bool | str | None
_ON = ("on", "1", "true", "yes")
_OFF = ("off", "0", "false", "no")


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


def parse_hugepages(value: HugepagesMode) -> bool | None:
  """`True` for "on", `False` for "off", `None` for "auto" (or None, or "").

  Accepts bools and, in any case, "on"/"1"/"true"/"yes", "off"/"0"/"false"/"no", "auto".

  Raises:
    ValueError: any other value.
  """
  if value is None or isinstance(value, bool):
    return value
  text = str(value).strip().lower()
  if text in ("", "auto"):
    return None
  if text in _ON:
    return True
  if text in _OFF:
    return False
  raise ValueError(f"huge pages setting {value!r} is not one of auto, on, off (or 1, 0)")


def decide(environ: Mapping[str, str], platform: str, glibc: tuple[int, int] | None,
           thp: str | None, mode: HugepagesMode = None) -> Decision:
  """Whether a process with this environment, OS, glibc and THP mode should re-execute.

  Pure, so every branch is testable; `reexec_with_hugepages` feeds it the live values.

  Args:
    environ: the process environment (`GLIBC_TUNABLES`, `METAJAX_HUGEPAGES`).
    platform, glibc, thp: `sys.platform`, `glibc_version()`, `thp_mode()`.
    mode: "on", "off" or "auto" (see `parse_hugepages`); None defers to `METAJAX_HUGEPAGES`.

  Raises:
    ValueError: an unknown `mode` or `METAJAX_HUGEPAGES` value.
  """
  if mode is not None and parse_hugepages(mode) is not None:
    wanted, source = parse_hugepages(mode), f"hugepages={mode}"
  else:
    try:
      wanted = parse_hugepages(environ.get(_OPT_OUT))
    except ValueError as e:
      raise ValueError(f"${_OPT_OUT}: {e}") from None
    source = f"{_OPT_OUT}={environ.get(_OPT_OUT)}"
  if wanted is False:
    return Decision(False, f"{source}: off")
  if any(t.split("=")[0] == _TUNABLE_NAME for t in _tunables(environ)):
    return Decision(False, "GLIBC_TUNABLES already sets glibc.malloc.hugetlb")
  if not platform.startswith("linux"):
    return Decision(False, f"platform {platform!r} is not Linux")
  if glibc is None or glibc < (2, 35):
    return Decision(False, f"C library {glibc} is not glibc >= 2.35 (no hugetlb tunable)")
  if wanted:
    return Decision(True, f"{source}: on (THP mode {thp!r})")
  if thp != "madvise":
    return Decision(False, f"transparent huge pages mode is {thp!r}, not 'madvise'")
  return Decision(True, "glibc >= 2.35 and THP mode 'madvise': malloc can use huge pages")


def decide_here(environ: Mapping[str, str], mode: HugepagesMode = None) -> Decision:
  """`decide` for this machine: its platform, glibc and THP mode, with `environ` and `mode`."""
  return decide(environ, sys.platform, glibc_version(), thp_mode(), mode)


def hugepage_environ(environ: Mapping[str, str], mode: HugepagesMode = None) -> dict[str, str]:
  """The environment a binary would re-execute with: `environ` plus the tunable where it helps.

  For launching subprocesses (benchmark workers, test workers) the way the binaries run.
  """
  return with_hugepage_tunable(environ) if decide_here(environ, mode).reexec else dict(environ)


def _to_stderr(line: str) -> None:
  sys.stderr.write(line + "\n")
  sys.stderr.flush()


def reexec_with_hugepages(hugepages: HugepagesMode = None, *,
                          announce: Callable[[str], None] = _to_stderr) -> Decision:
  """Re-executes the running command with `HUGEPAGE_TUNABLE` when `decide` says so.

  Call it first thing in a script's `__main__` block (or its absl `main`), before any work: on a
  re-exec it announces itself in one line and does not return (the process image is replaced,
  same PID, arguments and environment plus the tunable; the new process finds the tunable set and
  goes on). Otherwise it returns the `Decision`, so a caller can log why not. Never call it from
  library code or a test process: it replaces the whole interpreter.

  Args:
    hugepages: "auto", "on", "off" or a bool (e.g. a binary's `--hugepages` flag); None defers to
      `$METAJAX_HUGEPAGES`, else "auto".
    announce: where the one line goes (default stderr).

  Raises:
    ValueError: an unknown `hugepages` or `$METAJAX_HUGEPAGES` value.
  """
  decision = decide_here(os.environ, hugepages)
  if decision.reexec:
    announce(f"metajax: re-executing this process (same PID) with GLIBC_TUNABLES="
             f"{HUGEPAGE_TUNABLE}, glibc's huge-page malloc, which speeds up XLA:CPU; "
             f"{_OPT_OUT}=0 runs without it")
    sys.stdout.flush()
    sys.stderr.flush()
    argv = [sys.executable, *getattr(sys, "orig_argv", [sys.executable, *sys.argv])[1:]]
    os.execve(sys.executable, argv, with_hugepage_tunable(os.environ))
  return decision


class _MissingLibtpuFilter(logging.Filter):
  """Drops jax's INFO record that the TPU backend could not load libtpu because it is not
  installed; any other record (a TPU that fails to start, every warning) passes."""

  _MISSING = ("cannot open shared object file", "No such file", "not found", "Unable to find")

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno > logging.INFO:
      return True
    message = record.getMessage()
    return not (message.startswith("Unable to initialize backend 'tpu'") and "libtpu" in message
                and any(m in message for m in self._MISSING))


_XLA_BRIDGE_LOGGER = "jax._src.xla_bridge"


def silence_missing_libtpu() -> None:
  """Stops jax's "Unable to initialize backend 'tpu': ... libtpu.so" note on machines without
  libtpu.

  Without `JAX_PLATFORMS`, jax probes every backend it knows when it first needs one, and logs a
  failed TPU probe at INFO, a level absl's binaries print. Where libtpu is simply not installed
  that line says nothing (jax warns on its own when the machine does have TPU chips), so a filter
  on jax's backend logger drops exactly that record; a TPU that is installed but fails to start,
  and every warning and error, are still reported. Idempotent.
  """
  logger = logging.getLogger(_XLA_BRIDGE_LOGGER)
  if not any(isinstance(f, _MissingLibtpuFilter) for f in logger.filters):
    logger.addFilter(_MissingLibtpuFilter())


def prepare_process(hugepages: HugepagesMode = None) -> Decision:
  """What a binary calls first: `silence_missing_libtpu()`, then `reexec_with_hugepages(hugepages)`.

  Returns:
    The huge-page `Decision` when the process was not re-executed.
  """
  silence_missing_libtpu()
  return reexec_with_hugepages(hugepages)
