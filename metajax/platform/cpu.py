"""The host CPU: its vendor and model, its vector ISA features, and the family they put it in.

XLA:CPU's fastest options depend on the vector units the CPU has (`metajax.platform.xla` picks
them per family), and the benchmark prints them beside every table; both read them here, once per
call, from `/proc/cpuinfo` (Linux). Elsewhere the features are empty and the family is
"baseline", for which no tuning applies.

AVX-512 is two families: Intel's cores since Skylake-SP execute 512-bit instructions on 512-bit
units, AMD's Zen 4 splits each into two 256-bit halves, so what pays on one (wider vectors) need
not on the other.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import NamedTuple

__all__ = ["FAMILIES", "ISA_FEATURES", "CpuInfo", "cpu_info", "family"]

# The features worth printing: what decides which kernels XLA and PyTorch's oneDNN can use.
ISA_FEATURES = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")

_AVX512 = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq"})
# Family -> (vendor or None for any, the features it needs), most specific first: a CPU belongs
# to the first family whose vendor it has and whose features it has all of.
FAMILIES: tuple[tuple[str, str | None, frozenset[str]], ...] = (
  ("avx512-intel", "GenuineIntel", _AVX512),
  ("avx512-amd", "AuthenticAMD", _AVX512),
  ("avx2", None, frozenset({"avx2", "fma"})),
  ("baseline", None, frozenset()),
)


class CpuInfo(NamedTuple):
  """What `cpu_info` found.

  Attributes:
    vendor: the vendor id ("GenuineIntel", "AuthenticAMD"), or "" where unknown.
    model: the model name ("AMD EPYC", "Intel(R) Xeon(R) ..."), or `platform.processor()`.
    features: every flag the kernel reports for the first CPU (empty where unknown).
    cores: `os.cpu_count()`.
  """

  vendor: str
  model: str
  features: frozenset[str]
  cores: int

  @property
  def isa(self) -> list[str]:
    """The features of `ISA_FEATURES` this CPU has, in that order."""
    return [f for f in ISA_FEATURES if f in self.features]

  @property
  def family(self) -> str:
    """`family(self.features, self.vendor)`."""
    return family(self.features, self.vendor)


def cpu_info(path: str | os.PathLike[str] = "/proc/cpuinfo") -> CpuInfo:
  """Reads the model name and the feature flags of the first CPU listed in `path`.

  Never raises: a missing or unreadable file (not Linux, a sandbox) gives no features.
  """
  vendor, model, features = None, None, None
  try:
    lines = Path(path).read_text().splitlines()
  except OSError:
    lines = []
  for line in lines:  # one block per logical CPU: the first block's values stand for all
    key, _, value = line.partition(":")
    key = key.strip()
    if key == "vendor_id" and vendor is None:
      vendor = value.strip()
    elif key == "model name" and model is None:
      model = value.strip()
    elif key == "flags" and features is None:
      features = frozenset(value.split())
  return CpuInfo(vendor=vendor or "", model=model or platform.processor() or platform.machine(),
                 features=features or frozenset(), cores=os.cpu_count() or 1)


def family(features: frozenset[str] | set[str], vendor: str = "") -> str:
  """The first entry of `FAMILIES` matching `vendor` whose features `features` has all of
  ("baseline" at worst)."""
  return next(name for name, of, needs in FAMILIES
              if (of is None or of == vendor) and needs <= set(features))
