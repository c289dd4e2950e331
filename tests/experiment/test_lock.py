"""One writer per workdir: the lock refuses a second holder, names the first, and never outlives
its process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from metajax.experiment import lock, train

from tests.experiment.test_train import sinusoid_config

# a child that takes the lock, says so, and waits to be killed; it loads lock.py alone (standard
# library only), skipping jax's import time
_HOLDER = textwrap.dedent("""
  import importlib.util, sys, time
  spec = importlib.util.spec_from_file_location("lock", sys.argv[2])
  lock = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(lock)
  lock.WorkdirLock(sys.argv[1], purpose="train").acquire()
  print("held", flush=True)
  time.sleep(600)
""")


def start_holder(workdir) -> subprocess.Popen:
  child = subprocess.Popen([sys.executable, "-c", _HOLDER, str(workdir), lock.__file__], stdout=subprocess.PIPE,
                           text=True)
  assert child.stdout.readline().strip() == "held"
  return child


def test_a_second_holder_is_refused_with_the_first_named(tmp_path):
  with lock.WorkdirLock(tmp_path, purpose="train") as held:
    assert held.held
    record = json.loads((tmp_path / lock.LOCK_FILE).read_text())
    assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    with pytest.raises(lock.WorkdirBusyError) as e:
      lock.WorkdirLock(tmp_path).acquire()
  message = str(e.value)
  assert message.startswith(f"workdir {str(tmp_path)!r} is in use by pid {os.getpid()} on "
                            f"{socket.gethostname()}, started {record['started']}")
  assert message.endswith("; wait for it to finish or stop it, or pass another --workdir")
  assert "\n" not in message
  # released on exit: the next holder gets it
  with lock.WorkdirLock(tmp_path):
    pass


def test_released_when_the_body_raises(tmp_path):
  with pytest.raises(KeyboardInterrupt):
    with lock.WorkdirLock(tmp_path):
      raise KeyboardInterrupt
  lock.WorkdirLock(tmp_path).acquire()


def test_a_killed_holders_lock_is_stale(tmp_path):
  child = start_holder(tmp_path)
  try:
    with pytest.raises(lock.WorkdirBusyError, match=f"in use by pid {child.pid} on "):
      lock.WorkdirLock(tmp_path).acquire()
  finally:
    child.send_signal(signal.SIGKILL)
    child.wait()
  # the file still names the dead process, but the kernel released its lock
  assert json.loads((tmp_path / lock.LOCK_FILE).read_text())["pid"] == child.pid
  with lock.WorkdirLock(tmp_path):
    assert json.loads((tmp_path / lock.LOCK_FILE).read_text())["pid"] == os.getpid()


def test_training_is_refused_in_a_held_workdir_and_writes_nothing(tmp_path):
  child = start_holder(tmp_path)
  try:
    with pytest.raises(train.USER_ERRORS) as e:
      train.train_and_evaluate(sinusoid_config(), tmp_path, print_fn=lambda _: None)
  finally:
    child.send_signal(signal.SIGKILL)
    child.wait()
  assert isinstance(e.value, lock.WorkdirBusyError) and f"pid {child.pid}" in str(e.value)
  assert sorted(p.name for p in tmp_path.iterdir()) == [lock.LOCK_FILE]
