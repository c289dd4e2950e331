"""Launching the processes of a multi-process test on 127.0.0.1 (CPU, gloo collectives): a free
port for the coordinator, and every process waited for with a bound, so that a hung collective
fails the test instead of the CI job."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence

TIMEOUT_S = 240  # start-up, compilation and a few steps take well under a minute


def free_port() -> int:
  """A TCP port free on 127.0.0.1 now (for the coordinator of `jax.distributed`)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def cpu_env(**extra: str) -> dict[str, str]:
  """This process's environment on the CPU with one device per process (no forced count)."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", **extra}
  if "XLA_FLAGS" not in extra:
    env.pop("XLA_FLAGS", None)
  return env


def run_processes(commands: Sequence[Sequence[str]], envs: Sequence[Mapping[str, str]],
                  *, cwd: str | None = None, timeout: float = TIMEOUT_S,
                  status: int = 0) -> list[str]:
  """Starts every command at once (command i with `envs[i]`), waits for all of them, and returns
  their outputs (stdout and stderr together); asserts each exited with `status`. A process still
  running after `timeout` seconds is killed, and the test fails naming it."""
  procs = [subprocess.Popen(list(c), env=dict(e), cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for c, e in zip(commands, envs)]
  outputs = []
  deadline = time.monotonic() + timeout  # one bound for them all
  try:
    for i, proc in enumerate(procs):
      try:
        out, _ = proc.communicate(timeout=max(deadline - time.monotonic(), 1.0))
      except subprocess.TimeoutExpired:
        for other in procs:
          other.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"process {i} was still running after {timeout} s (a hung "
                             f"collective?): {out[-3000:]}") from None
      outputs.append(out)
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  for i, (proc, out) in enumerate(zip(procs, outputs)):
    assert proc.returncode == status, (f"process {i} exited with {proc.returncode}, not "
                                       f"{status}: {out[-3000:]}")
  return outputs
