"""The reproduction binary: `python -m tools.reproduce` from the project root.

By default it works through the queue (every unfinished run of `--runs`, in suite order); `--list`,
`--report` and `--archive` each do their one thing instead and exit. Roots are taken relative to
the project root, as the commands run there and the report shows them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from absl import app, flags

from metajax.platform import runtime
from tools.reproduce import archive, queue, report, suite

_ROOT = flags.DEFINE_string("root", "workdirs/reproduce", "Parent of the runs' workdirs.")
_RUNS = flags.DEFINE_list("runs", [], "Runs or groups to work on (default: all, in order).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Omniglot archives (default: the configs' "
                                "data_dir, i.e. $METAJAX_OMNIGLOT_DIR).")
_MINI_DIR = flags.DEFINE_string("miniimagenet_dir", None, "The mini-ImageNet archive or folder "
                                "(default: the configs' data_dir, i.e. $METAJAX_MINIIMAGENET_DIR).")
_EVAL_TASKS = flags.DEFINE_integer("eval_tasks", 600, "Test tasks of the final evaluations.",
                                   lower_bound=1)
_LIST = flags.DEFINE_bool("list", False, "Print each run's status and exit.")
_REPORT = flags.DEFINE_string("report", None, "Write the generated section of this Markdown file "
                              "(and its plots next to it, in results/) and exit.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the commands instead of running them.")
_ARCHIVE = flags.DEFINE_string("archive", None, "Copy each run's small files (and, for a run not "
                               "finished yet, its newest checkpoint) into this folder and exit.")


def _from_root(path: str) -> Path:
  return Path(os.path.relpath(Path(path).resolve(), suite.ROOT))


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  try:
    return _run()
  except (app.UsageError, FileNotFoundError) as e:  # the user's to fix: one line, no usage text
    sys.exit(f"error: {e}")
  except KeyboardInterrupt:  # the running command got the signal too; finished steps are kept
    sys.exit("interrupted; rerun the same command to go on where it stopped")


def _run() -> int:
  root = _from_root(_ROOT.value)
  runs = suite.select(_RUNS.value)
  if _LIST.value:
    for run in runs:
      st = suite.status(run, root)
      print(f"{run.name:24s} {run.group:12s} {suite.progress(st):40s} "
            f"train {report.duration(st['train_seconds'])}")
    return 0
  if _REPORT.value:
    try:
      report.report(Path(_REPORT.value), root, _EVAL_TASKS.value)
    except ValueError as e:  # a file without the generated section's markers
      sys.exit(f"error: {e}")
    return 0
  if _ARCHIVE.value:
    dest = _from_root(_ARCHIVE.value)
    print(f"archived into {dest}: {', '.join(archive.archive(runs, root, dest)) or 'nothing'}")
    return 0
  if not _DRY_RUN.value:  # before anything starts: one line, not a failed command per run
    queue.check_data(runs, root, _DATA_DIR.value, _MINI_DIR.value)
  return 1 if queue.work(runs, root, _DATA_DIR.value, _EVAL_TASKS.value, _DRY_RUN.value,
                         _MINI_DIR.value) else 0


if __name__ == "__main__":
  runtime.prepare_process()  # jax's libtpu note silenced; huge pages: glibc reads it at start-up
  app.run(main)
