r"""The reproduction suite of docs/RESULTS.md: a resumable queue of runs, their archive, the report.

Run from the project root:

  nice -n 19 python -m tools.reproduce --root=workdirs/reproduce \
      --data_dir=../shared/data/omniglot > workdirs/reproduce.log 2>&1 &
  python -m tools.reproduce --root=workdirs/reproduce --list          # what is done
  python -m tools.reproduce --root=workdirs/reproduce --report=docs/RESULTS.md
  python -m tools.reproduce --root=workdirs/reproduce --archive=docs/results/runs

A new checkout has no `workdirs/`: copying `docs/results/runs/*` into a root gives the queue back
its finished runs (skipped) and its unfinished ones (resumed from the archived checkpoint), and
`--root=docs/results/runs --report=...` regenerates the report from the repository alone.

Modules, one concept each:
  suite: the runs as data (configs, groups, the papers' figures), selection by name, a run's
    status read from its files;
  queue: running the unfinished steps as subprocesses, logged to `<run>/reproduce_log.jsonl`,
    stopped cleanly by SIGTERM and resumable;
  archive: copying a run's small files (and an unfinished run's newest checkpoint) into the
    repository;
  report: the generated section of docs/RESULTS.md and its plots, from the runs' files;
  __main__: the absl binary over the four.
"""
