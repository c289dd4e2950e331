"""Tests for metajax.platform.cpu: the CPU's model, ISA features and family."""

from __future__ import annotations

from metajax.platform import cpu

_TWO_CPUS = """processor	: 0
vendor_id	: AuthenticAMD
model name	: AMD EPYC 9R14
flags		: fpu sse4_2 avx avx2 fma avx512f avx512dq avx512bw avx512vl avx512_bf16

processor	: 1
model name	: something else
flags		: fpu sse4_2
"""


def test_reads_the_first_cpu(tmp_path):
  path = tmp_path / "cpuinfo"
  path.write_text(_TWO_CPUS)
  info = cpu.cpu_info(path)
  assert info.model == "AMD EPYC 9R14" and info.vendor == "AuthenticAMD"
  assert "avx512_bf16" in info.features and "processor" not in info.features
  assert info.isa == ["sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl",
                      "avx512_bf16"]
  assert info.family == "avx512-amd" and info.cores >= 1


def test_missing_file_gives_no_features(tmp_path):
  info = cpu.cpu_info(tmp_path / "absent")
  assert info.features == frozenset() and info.vendor == ""
  assert info.family == "baseline" and info.model


def test_families():
  avx512 = {"avx2", "fma", "avx512f", "avx512dq", "avx512bw", "avx512vl"}
  assert cpu.family({"avx2", "fma", "avx512f"}, "GenuineIntel") == "avx2"  # F alone: not enough
  assert cpu.family(avx512, "GenuineIntel") == "avx512-intel"
  assert cpu.family(avx512, "AuthenticAMD") == "avx512-amd"
  assert cpu.family(avx512, "HygonGenuine") == "avx2"  # an unlisted vendor: no guess
  assert cpu.family({"avx", "sse4_2"}) == "baseline"
  assert [name for name, _, _ in cpu.FAMILIES][-1] == "baseline"
