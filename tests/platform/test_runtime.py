"""metajax.platform.runtime: when a process re-executes itself with glibc's huge-page malloc, and that the
re-execution keeps the command line and environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from metajax.platform import runtime

LINUX, GLIBC, THP = "linux", (2, 36), "madvise"


def test_thp_mode_reads_the_bracketed_mode(tmp_path):
  f = tmp_path / "enabled"
  for text, mode in [("always [madvise] never\n", "madvise"), ("[always] madvise never", "always"),
                     ("always madvise [never]", "never"), ("no brackets", None), ("", None)]:
    f.write_text(text)
    assert runtime.thp_mode(str(f)) == mode, text
  assert runtime.thp_mode(str(tmp_path / "missing")) is None


def test_glibc_version_matches_the_platform_module():
  import platform

  libc, version = platform.libc_ver()
  found = runtime.glibc_version()
  if libc != "glibc":
    assert found is None
  else:
    assert found == tuple(int(v) for v in version.split(".")[:2])


def test_with_hugepage_tunable_appends_keeps_others_and_respects_an_explicit_value():
  env = {"PATH": "/bin"}
  out = runtime.with_hugepage_tunable(env)
  assert out == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
  assert env == {"PATH": "/bin"}  # the input is not modified
  out = runtime.with_hugepage_tunable({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
  assert out["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
  explicit = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0:glibc.malloc.arena_max=2"}
  assert runtime.with_hugepage_tunable(explicit) == explicit


def test_hugepage_environ_follows_the_live_decision():
  env = runtime.without_hugepage_tunable(os.environ)
  env.pop("METAJAX_HUGEPAGES")
  out = runtime.hugepage_environ(env)
  if runtime.decide_here(env).reexec:
    assert out == runtime.with_hugepage_tunable(env)
  else:
    assert out == env
  assert runtime.hugepage_environ({**env, "METAJAX_HUGEPAGES": "0"}) == {
    **env, "METAJAX_HUGEPAGES": "0"}


def test_without_hugepage_tunable_strips_it_and_opts_out():
  out = runtime.without_hugepage_tunable(
    {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1", "A": "b"})
  assert out == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "A": "b", "METAJAX_HUGEPAGES": "0"}
  out = runtime.without_hugepage_tunable({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"})
  assert "GLIBC_TUNABLES" not in out
  assert not runtime.decide(out, LINUX, GLIBC, THP).reexec


@pytest.mark.parametrize("environ, platform, glibc, thp, expected", [
  ({}, LINUX, GLIBC, THP, True),
  ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, LINUX, GLIBC, THP, True),
  ({"METAJAX_HUGEPAGES": "0"}, LINUX, GLIBC, THP, False),
  ({"METAJAX_HUGEPAGES": "1"}, LINUX, GLIBC, THP, True),
  ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, LINUX, GLIBC, THP, False),  # no loop
  ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, LINUX, GLIBC, THP, False),  # the user's choice
  ({}, "darwin", None, None, False),
  ({}, LINUX, None, THP, False),  # musl
  ({}, LINUX, (2, 34), THP, False),  # before the hugetlb tunable
  ({}, LINUX, (2, 35), THP, True),
  ({}, LINUX, GLIBC, "always", False),  # huge pages already
  ({}, LINUX, GLIBC, "never", False),
  ({}, LINUX, GLIBC, None, False),
])
def test_decide(environ, platform, glibc, thp, expected):
  decision = runtime.decide(environ, platform, glibc, thp)
  assert decision.reexec is expected
  assert decision.reason


def test_reexec_keeps_arguments_and_environment_and_adds_the_tunable(tmp_path):
  script = tmp_path / "script.py"
  script.write_text(textwrap.dedent("""
    import json, os, sys
    from metajax.platform import runtime
    decision = runtime.reexec_with_hugepages()
    print(json.dumps({"argv": sys.argv, "tunables": os.environ.get("GLIBC_TUNABLES"),
                      "other": os.environ.get("METAJAX_TEST_MARK"), "reason": decision.reason}))
  """))
  env = runtime.without_hugepage_tunable(os.environ)
  env.pop("METAJAX_HUGEPAGES")
  env["METAJAX_TEST_MARK"] = "kept"
  out = subprocess.run([sys.executable, "-u", str(script), "--flag=1", "two words"], env=env,
                       capture_output=True, text=True, check=True).stdout
  result = json.loads(out.strip().splitlines()[-1])
  assert result["argv"] == [str(script), "--flag=1", "two words"]
  assert result["other"] == "kept"
  live = runtime.decide_here(env)
  if live.reexec:
    # Re-executed once: the new process found the tunable and did not go round again.
    assert result["tunables"] == runtime.HUGEPAGE_TUNABLE
    assert "already sets" in result["reason"]
  else:
    assert result["tunables"] in (None, "") and result["reason"] == live.reason
