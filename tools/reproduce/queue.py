"""Running the suite: one subprocess per step of a run, each logged, resumable at any point.

A run's steps are its training command and its final evaluations. Each invocation's wall time, CPU
time, return code, load and machine are appended to `<run>/reproduce_log.jsonl` (the report sums
and quotes them). What is finished is skipped and training resumes from its newest checkpoint, so
the queue can be killed at any time and started again; SIGTERM to the queue's own process stops it
cleanly, with the running command logged up to that point.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import shlex
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Sequence

from tools.reproduce import suite


def machine() -> dict[str, Any]:
  """The CPU, core count, host, jax version, backend and device the commands run on."""
  # Local imports: only a real queue needs jax, not a dry run, --list or the report.
  import jax

  from metajax.platform.cpu import cpu_info

  device = jax.devices()[0]
  info = cpu_info()
  return {"cpu": info.model, "cores": info.cores, "host": platform.node(), "jax": jax.__version__,
          "backend": jax.default_backend(), "device": getattr(device, "device_kind", str(device))}


def _children_cpu() -> float:
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  return usage.ru_utime + usage.ru_stime


def _shown(cmd: Sequence[str]) -> str:
  """`cmd` as a user types it (`python`, not this interpreter's path)."""
  return " ".join(shlex.quote(c) for c in ["python", *cmd[1:]])


class _Stop:
  """SIGTERM handler of the queue: the running command gets the signal and is still logged (wall
  and CPU time up to that point), and no further command starts."""

  def __init__(self) -> None:
    self.requested = False
    self.child: subprocess.Popen | None = None

  def __call__(self, signum: int, frame: Any) -> None:
    del signum, frame
    self.requested = True
    if self.child is not None and self.child.poll() is None:
      self.child.terminate()  # train.py dies at once; its checkpoints every 250 steps remain


def _run_logged(cmd: list[str], workdir: Path, kind: str, machine: dict[str, Any],
                stop: _Stop | None = None) -> int:
  """Runs `cmd` from the project root; appends its wall time and outcome to the run's log."""
  workdir.mkdir(parents=True, exist_ok=True)
  shown = _shown(cmd)
  print(f"[reproduce {time.strftime('%H:%M:%S')}] {shown}", flush=True)
  start, load = time.time(), os.getloadavg()[0]
  cpu_start = _children_cpu()
  child = subprocess.Popen(cmd, cwd=suite.ROOT)
  if stop is not None:
    stop.child = child
  rc = child.wait()
  entry = {"kind": kind, "command": shown, "returncode": rc,
           "seconds": round(time.time() - start, 1),
           # CPU time of the command (all threads): unlike the wall clock, pauses do not count
           "cpu_seconds": round(_children_cpu() - cpu_start, 1),
           "start": datetime.datetime.fromtimestamp(start, datetime.timezone.utc).isoformat(
             timespec="seconds"),
           "load_start": round(load, 2), "load_end": round(os.getloadavg()[0], 2), **machine}
  with open(workdir / suite.LOG_FILE, "a") as f:  # one short line: an append is all-or-nothing
    f.write(json.dumps(entry) + "\n")
  return rc


def check_data(runs: Sequence[suite.Run], root: Path, data_dir: str | None,
               miniimagenet_dir: str | None = None) -> None:
  """Checks that the data of every unfinished run of `runs` is where its commands will look.

  Cheap (the folders are found, nothing is read), so a missing dataset is one message before
  anything starts instead of a failed command per run.

  Args:
    runs, root, data_dir, miniimagenet_dir: as `work` takes them.

  Raises:
    FileNotFoundError: naming the run, the dataset and the flag that points at its data.
  """
  from metajax import data as data_lib  # local, as jax in `machine`: only a real queue needs it

  finders = {"omniglot": (data_lib.find_omniglot_dir, data_dir, "--data_dir"),
             "miniimagenet": (data_lib.find_miniimagenet_dir, miniimagenet_dir,
                              "--miniimagenet_dir")}
  checked = set()
  for run in runs:
    if run.dataset not in finders or run.dataset in checked:
      continue
    if "--config.download=True" in run.overrides or suite.status(run, root)["done"]:
      continue
    find, folder, flag = finders[run.dataset]
    try:
      find(folder or None)
    except FileNotFoundError as e:
      raise FileNotFoundError(f"run {run.name} needs the {run.dataset} data ({flag}): {e}") from e
    checked.add(run.dataset)


def work(runs: Sequence[suite.Run], root: Path, data_dir: str | None, eval_tasks: int,
         dry_run: bool, miniimagenet_dir: str | None = None) -> int:
  """Trains and evaluates every unfinished run of `runs`; returns the number of runs that failed.

  Args:
    runs: the runs to work on, in order.
    root: the parent of the runs' workdirs (relative to the project root, or absolute).
    data_dir: the Omniglot archives (None: the configs' own `data_dir`).
    miniimagenet_dir: the mini-ImageNet archive or folder (None: the configs' own).
    eval_tasks: test tasks of each final evaluation.
    dry_run: print the commands still to run instead of running them.

  A failed command ends its run's turn (the queue goes on with the next run). SIGTERM stops the
  queue cleanly: the running command is terminated and logged, nothing more starts, and the next
  invocation resumes from the newest checkpoint.
  """
  failed = 0
  host = {} if dry_run else machine()
  stop = _Stop()
  previous = signal.signal(signal.SIGTERM, stop)
  try:
    for run in runs:
      st = suite.status(run, root)
      if st["done"]:
        continue
      todo = []
      if st["results"] is None:
        todo.append(("train", run.train_command(root, data_dir, miniimagenet_dir)))
      todo += [("eval", run.eval_command(root, k, eval_tasks))
               for k, v in st["evals"].items() if v is None]
      todo += [("eval", run.eval_command(root, k, eval_tasks, probe))
               for probe, evals in st["probes"].items() for k, v in evals.items() if v is None]
      for kind, cmd in todo:
        if dry_run:
          print(_shown(cmd))
          continue
        rc = _run_logged(cmd, suite.ROOT / root / run.name, kind, host, stop)
        if stop.requested:
          print(f"[reproduce] stopped by SIGTERM during {run.name}: {kind}", flush=True)
          return failed
        if rc != 0:
          print(f"[reproduce] {run.name}: {kind} failed; going on with the next run", flush=True)
          failed += 1
          break
  finally:
    signal.signal(signal.SIGTERM, previous)
  return failed
