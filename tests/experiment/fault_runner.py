"""Runs a binary of experiments/ in this process and delivers a real signal to it at one phase.

    python tests/experiment/fault_runner.py <phase> experiments/train.py --config=... --workdir=...

The binary runs as `__main__` (its own code, flags and exit status); the phase hooks only decide
when the signal comes, so a kill lands exactly where the fault battery wants it instead of
wherever a poll from outside happens to catch the run. Phases (`PHASES`), with
`STEP` the checkpoint they act at:

  data loading          SIGKILL as the data starts loading (the workdir already has its files)
  compilation           SIGKILL 50 ms into the first step's call (compiling, unless cached)
  between checkpoints   SIGKILL right after the log line of step 3
  checkpoint write      SIGKILL inside the save of step STEP, before orbax's rename
  after a rename        SIGKILL right after the save of step STEP
  final evaluation      SIGKILL as the final test evaluation starts (all steps trained)
  sigterm, sigint       SIGTERM / SIGINT right after the save of step STEP
  hold                  after the save of step STEP, wait until the file $FAULT_RELEASE exists
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
import threading
import time
from pathlib import Path

STEP = 8
PHASES = ("data loading", "compilation", "between checkpoints", "checkpoint write",
          "after a rename", "final evaluation", "sigterm", "sigint", "hold")


def _signal(signum: int) -> None:
  os.kill(os.getpid(), signum)


def install(phase: str) -> None:
  """Patches the library functions the binary calls so that `phase`'s signal comes."""
  from orbax.checkpoint._src.path import atomicity

  from metajax.experiment import checkpoint, metrics, train

  if phase not in PHASES:
    raise SystemExit(f"unknown phase {phase!r}; phases: {', '.join(PHASES)}")
  if phase == "data loading":
    train.load_data = lambda *args, **kwargs: _signal(signal.SIGKILL)
  elif phase == "compilation":
    place = train._place

    def place_then_kill(*args, **kwargs):
      threading.Timer(0.05, _signal, (signal.SIGKILL,)).start()
      return place(*args, **kwargs)

    train._place = place_then_kill
  elif phase == "between checkpoints":
    write = metrics.JsonlWriter.write

    def write_then_kill(self, step, scalars):
      write(self, step, scalars)
      if step == 3 and "outer/loss" in scalars:
        _signal(signal.SIGKILL)

    metrics.JsonlWriter.write = write_then_kill
  elif phase == "final evaluation":
    evaluate = train._evaluate

    def kill_at_test(log, evaluators, prefix, *args):
      if prefix == "test":
        _signal(signal.SIGKILL)
      return evaluate(log, evaluators, prefix, *args)

    train._evaluate = kill_at_test
  else:
    save = checkpoint.Checkpoints.save
    saving = threading.Event()
    if phase == "checkpoint write":
      finalize = atomicity.AtomicRenameTemporaryPath.finalize

      def kill_before_rename(self, *args, **kwargs):
        if saving.is_set():
          _signal(signal.SIGKILL)
        return finalize(self, *args, **kwargs)

      atomicity.AtomicRenameTemporaryPath.finalize = kill_before_rename

    def save_then(self, step, *args, **kwargs):
      if step == STEP:
        saving.set()
      path = save(self, step, *args, **kwargs)
      if step != STEP:
        return path
      if phase == "after a rename":
        _signal(signal.SIGKILL)
      elif phase in ("sigterm", "sigint"):
        _signal(signal.SIGTERM if phase == "sigterm" else signal.SIGINT)
        time.sleep(1)  # the signal is handled before this returns
      elif phase == "hold":
        release = Path(os.environ["FAULT_RELEASE"])
        while not release.exists():
          time.sleep(0.05)
      return path

    checkpoint.Checkpoints.save = save_then


if __name__ == "__main__":
  phase, binary = sys.argv[1], sys.argv[2]
  sys.argv = [binary, *sys.argv[3:]]
  sys.path.insert(0, str(Path(binary).resolve().parent))
  install(phase)
  runpy.run_path(binary, run_name="__main__")
