"""metajax.platform.runtime: when a process re-executes itself with glibc's huge-page malloc, that
the re-execution keeps the command line and environment and says so, and the quiet TPU probe."""

from __future__ import annotations

import json
import logging
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


@pytest.mark.parametrize("environ, thp, mode, expected", [
  ({}, THP, "off", False),
  ({}, THP, False, False),
  ({}, THP, "auto", True),  # auto: as measured best
  ({}, "always", "auto", False),
  ({}, "always", "on", True),  # asked for: whatever the THP mode
  ({}, "never", True, True),
  ({"METAJAX_HUGEPAGES": "on"}, "always", None, True),
  ({"METAJAX_HUGEPAGES": "off"}, THP, None, False),
  ({"METAJAX_HUGEPAGES": "0"}, THP, "on", True),  # the argument wins over the variable
  ({"METAJAX_HUGEPAGES": "1"}, THP, "off", False),
  ({"METAJAX_HUGEPAGES": "0"}, THP, "auto", False),  # auto defers to the variable
  ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, THP, "on", False),  # never loops or overrides
])
def test_decide_with_a_mode(environ, thp, mode, expected):
  decision = runtime.decide(environ, LINUX, GLIBC, thp, mode)
  assert decision.reexec is expected, decision.reason
  assert not runtime.decide(environ, "darwin", None, None, "on").reexec  # on needs glibc


def test_parse_hugepages():
  for value in ("on", "ON", "1", "true", "yes", True):
    assert runtime.parse_hugepages(value) is True
  for value in ("off", "0", "False", "no", False):
    assert runtime.parse_hugepages(value) is False
  for value in ("auto", "", None, " Auto "):
    assert runtime.parse_hugepages(value) is None
  with pytest.raises(ValueError, match="'sometimes' is not one of auto, on, off"):
    runtime.parse_hugepages("sometimes")
  with pytest.raises(ValueError, match=r"\$METAJAX_HUGEPAGES: huge pages setting 'maybe'"):
    runtime.decide({"METAJAX_HUGEPAGES": "maybe"}, LINUX, GLIBC, THP)


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
  done = subprocess.run([sys.executable, "-u", str(script), "--flag=1", "two words"], env=env,
                        capture_output=True, text=True, check=True)
  result = json.loads(done.stdout.strip().splitlines()[-1])
  assert result["argv"] == [str(script), "--flag=1", "two words"]
  assert result["other"] == "kept"
  live = runtime.decide_here(env)
  if live.reexec:
    # Re-executed once: the new process found the tunable and did not go round again.
    assert result["tunables"] == runtime.HUGEPAGE_TUNABLE
    assert "already sets" in result["reason"]
    # Said so, in one line, first.
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("metajax: re-executing this process")
    assert "GLIBC_TUNABLES=glibc.malloc.hugetlb=1" in lines[0]
    assert "METAJAX_HUGEPAGES=0" in lines[0]
  else:
    assert result["tunables"] in (None, "") and result["reason"] == live.reason
    assert done.stderr == ""


def test_reexec_announces_through_the_given_function(monkeypatch):
  calls = []
  monkeypatch.setattr(runtime.os, "execve", lambda *args: calls.append(args))
  monkeypatch.setattr(runtime, "decide_here",
                      lambda environ, mode=None: runtime.Decision(mode != "off", "test"))
  lines = []
  assert not runtime.reexec_with_hugepages("off", announce=lines.append).reexec
  assert not calls and not lines
  runtime.reexec_with_hugepages("on", announce=lines.append)  # execve is faked: it returns
  assert len(calls) == 1 and len(lines) == 1
  assert "glibc.malloc.hugetlb=1" in calls[0][2]["GLIBC_TUNABLES"]


def _record(message, level=logging.INFO):
  return logging.LogRecord("jax._src.xla_bridge", level, "xla_bridge.py", 1, message, None, None)


def test_missing_libtpu_filter_drops_only_that_note():
  check = runtime._MissingLibtpuFilter().filter  # noqa: SLF001
  missing = ("Unable to initialize backend 'tpu': INTERNAL: Failed to open libtpu.so: libtpu.so: "
             "cannot open shared object file: No such file or directory")
  assert not check(_record(missing))
  assert check(_record(missing, logging.WARNING))  # warnings and errors always pass
  assert check(_record("Unable to initialize backend 'tpu': ABORTED: The TPU is already in use "
                       "by process 12 (libtpu)"))  # installed but failing: reported
  assert check(_record("Unable to initialize backend 'cuda': no devices"))
  runtime.silence_missing_libtpu()
  runtime.silence_missing_libtpu()
  logger = logging.getLogger("jax._src.xla_bridge")
  assert sum(isinstance(f, runtime._MissingLibtpuFilter) for f in logger.filters) == 1  # noqa


def test_an_absl_binary_starts_without_the_libtpu_note(tmp_path):
  """An absl program (INFO goes to stderr) that calls `prepare_process` first prints no TPU note
  on a machine without libtpu, and its own lines still come through."""
  script = tmp_path / "binary.py"
  script.write_text(textwrap.dedent("""
    from absl import app, logging
    from metajax.platform import runtime

    def main(argv):
      runtime.prepare_process("off")
      import jax
      print(jax.devices()[0].platform)
      logging.info("the binary's own line")

    app.run(main)
  """))
  env = {**os.environ, "JAX_PLATFORMS": ""}
  done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                        check=True, timeout=120)
  assert "libtpu" not in done.stderr, done.stderr
  assert "the binary's own line" in done.stderr
  assert done.stdout.strip()
