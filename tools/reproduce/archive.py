"""Copying the runs' small files into the repository (`docs/results/runs/<run>/`).

A workdir lives outside version control; its archive keeps what the report reads and, for a run
not finished yet, the newest checkpoint, so that copying `<archive>/<run>` back into a root on a
fresh checkout gives the queue its finished runs (skipped) and its unfinished ones (resumed).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

from metajax.experiment import checkpoint
from tools.reproduce import suite

# What the report reads (`results.json` also marks training as finished, for the queue); with
# the newest checkpoint of an unfinished run, what resuming needs. The evaluations come per run.
SMALL_FILES = ("config.json", "results.json", "metrics.jsonl", suite.LOG_FILE)


def _copy_checkpoint(src: Path, dest: Path) -> None:
  """Copies one checkpoint (a file or a folder, whichever the format writes) so that readers of
  `dest` see the old copy or the whole new one."""
  if src.is_file():
    checkpoint.write_atomic(dest, src.read_bytes())
    return
  dest.parent.mkdir(parents=True, exist_ok=True)
  # A dot name is no checkpoint to `checkpoint.all_steps`: an interrupted copy is never resumed.
  tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp"))
  try:
    shutil.copytree(src, tmp, dirs_exist_ok=True)
    _relative_commit_markers(tmp, src)
    _remove(dest)
    os.replace(tmp, dest)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _relative_commit_markers(copy: Path, src: Path) -> None:
  """orbax's `commit_success.txt` markers name the absolute folder they were committed to (a
  path of the machine that wrote them); in the copy they name it relative to the checkpoint, so
  the archive holds no machine's paths. Only the markers' presence is read back."""
  for marker in copy.rglob("commit_success.txt"):
    rel = marker.parent.relative_to(copy)
    where = src.name if rel == Path(".") else f"{src.name}/{rel.as_posix()}"
    marker.write_text(f"Checkpoint commit was successful to {where}")


def _remove(path: Path) -> None:
  if path.is_dir():
    shutil.rmtree(path)
  elif path.exists():
    path.unlink()


def archive(runs: Sequence[suite.Run], root: Path, dest: Path) -> list[str]:
  """Copies each started run's small files into `dest/<run>/`; returns the runs copied.

  A finished run gets its config, results, evaluations, metrics and queue log; an unfinished one
  also its newest checkpoint. A run is started once its `config.json` exists. Files are written
  atomically; a checkpoint archived earlier is replaced (or dropped once the run is finished).
  `root` and `dest` are relative to the project root, or absolute.
  """
  copied = []
  for run in runs:
    workdir = suite.ROOT / root / run.name
    if not (workdir / "config.json").exists():
      continue
    target = suite.ROOT / dest / run.name
    names = [*SMALL_FILES, *(suite.eval_file(Path(), k, probe).name
                             for k, probe in run.evaluations)]
    for name in names:
      if (workdir / name).exists():
        checkpoint.write_atomic(target / name, (workdir / name).read_bytes())
    step = checkpoint.latest_step(workdir / "checkpoints")
    keep = None
    if not suite.status(run, root)["done"] and step is not None:
      keep = step
      _copy_checkpoint(checkpoint.checkpoint_path(workdir / "checkpoints", step),
                       checkpoint.checkpoint_path(target / "checkpoints", step))
    for old in checkpoint.all_steps(target / "checkpoints"):
      if old != keep:
        _remove(checkpoint.checkpoint_path(target / "checkpoints", old))
    copied.append(run.name)
  return copied
