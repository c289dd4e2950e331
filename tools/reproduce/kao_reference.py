r"""Kao et al.'s own mini-ImageNet test curves, reduced to one reference file of the suite.

Their official code (github.com/IandRover/MAML_noisy_contrasive_learner, `miniimagenet/train.py`)
evaluates on 400 test tasks whenever the step index *within an epoch* is a multiple of 200 and
appends one row of test accuracies (columns: 0..10 test-time inner steps) to
`figure_reproduction/results/miniimagenet/FOMAML_SOMAML/<run>/test_E<e>S<s>.csv`. An epoch is 2,500
outer steps (10,000 tasks in meta-batches of 4, or 5,000 in meta-batches of 2), so row `r` was
written after outer step `2500 * (r // 13) + 200 * (r % 13)`: 13 rows per epoch, not one per 200
steps.

Per setting (shots, order, head), this keeps the runs their figure notebook
(`figure_reproduction/mini_fomaml_somaml.ipynb`) averages: per run folder `test_E11S2300.csv`
(155 rows) or else `test_E6S1000.csv` (its first 155 rows); "random" is `initvar1.0` without
zeroing, "zeroing" every `zero1` run. The last column (10 test steps, metajax's
`eval_num_inner_steps` of these configs) is averaged over the runs, row by row.

  python -m tools.reproduce.kao_reference --repo=<clone of the official code> \
      --output=tools/reproduce/references/kao_miniimagenet.json
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

from absl import app, flags

from metajax.experiment import checkpoint

_REPO = flags.DEFINE_string("repo", None, "A clone of the official code.", required=False)
_OUTPUT = flags.DEFINE_string("output", "tools/reproduce/references/kao_miniimagenet.json",
                              "Where the reference JSON is written.")

SOURCE = "github.com/IandRover/MAML_noisy_contrasive_learner"
RESULTS = "figure_reproduction/results/miniimagenet/FOMAML_SOMAML"
ROWS = 155
STEPS_PER_EPOCH, ROWS_PER_EPOCH, EVERY = 2500, 13, 200
_RUN = re.compile(r"mini_5w(\d)s15q_(FO|SO)_(zero1_)?initvar([\d.]+)_seed(\d+)$")


def outer_step(row: int) -> int:
  """The outer step after which their script wrote row `row` of a test CSV."""
  return STEPS_PER_EPOCH * (row // ROWS_PER_EPOCH) + EVERY * (row % ROWS_PER_EPOCH)


def setting_key(shots: int, order: str, zeroing: bool) -> str:
  """The reference file's key of one setting, e.g. `5w1s_SO_zeroing`."""
  return f"5w{shots}s_{order.upper()}_{'zeroing' if zeroing else 'random'}"


def _read(path: Path) -> list[float]:
  with open(path, newline="") as f:
    rows = list(csv.reader(f))[1:]
  return [float(r[-1]) for r in rows[:ROWS]]


def build(repo: Path) -> dict:
  """The reference: `settings[key] = {"runs": [...], "accuracy": [per row], ...}`."""
  settings: dict[str, dict] = {}
  for folder in sorted((repo / RESULTS).iterdir()):
    match = _RUN.match(folder.name)
    if not match:
      continue
    shots, order, zero, initvar, _ = match.groups()
    if not zero and float(initvar) != 1.0:
      continue  # zero-initialised heads: a third curve of theirs, not compared here
    for name, rows in (("test_E11S2300.csv", ROWS), ("test_E6S1000.csv", ROWS + 1)):
      path = folder / name
      if path.is_file():
        curve = _read(path)
        if len(curve) == ROWS and sum(1 for _ in open(path)) - 1 == rows:
          key = setting_key(int(shots), order, bool(zero))
          settings.setdefault(key, {"runs": [], "curves": []})
          settings[key]["runs"].append(f"{folder.name}/{name}")
          settings[key]["curves"].append(curve)
          break
  for entry in settings.values():
    curves = entry.pop("curves")
    entry["accuracy"] = [round(100 * sum(c[r] for c in curves) / len(curves), 4)
                         for r in range(ROWS)]
  return {"source": SOURCE, "results": RESULTS, "test_tasks": 400, "test_inner_steps": 10,
          "steps": [outer_step(r) for r in range(ROWS)], "settings": settings}


def reference(path: Path, shots: int, order: str, zeroing: bool, step: int) -> float:
  """Their mean test accuracy (%) of a setting at the last row written at or before `step`."""
  return reference_at(path, setting_key(shots, order, zeroing), step)


def reference_at(path: Path, key: str, step: int) -> float:
  """Their mean test accuracy (%) of setting `key` at the last row written at or before `step`."""
  data = json.loads(path.read_text())
  steps, acc = data["steps"], data["settings"][key]["accuracy"]
  row = max(i for i, s in enumerate(steps) if s <= step)
  return acc[row]


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if not _REPO.value:
    raise app.UsageError("--repo: a clone of " + SOURCE)
  data = build(Path(_REPO.value))
  checkpoint.write_atomic(Path(_OUTPUT.value), (json.dumps(data, indent=1) + "\n").encode())
  counts = ", ".join(f"{k} ({len(v['runs'])} runs)" for k, v in data["settings"].items())
  print(f"wrote {_OUTPUT.value}: {counts}")


if __name__ == "__main__":
  app.run(main)
