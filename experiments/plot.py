r"""Turns a workdir's metrics (metrics.jsonl) into PNG learning curves.

  python experiments/plot.py --workdir=/tmp/metajax_readme    # -> /tmp/metajax_readme/plots/*.png
"""

import sys
from pathlib import Path

from absl import app, flags

from metajax import metrics

_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir (its metrics.jsonl).")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Where the PNGs go (default: <workdir>/plots).")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  workdir = Path(_WORKDIR.value)
  try:
    records = metrics.read_metrics(workdir)
    paths = metrics.plot_learning_curves(records, _OUT_DIR.value or workdir / "plots",
                                         title=workdir.name)
  except (OSError, ValueError) as e:
    sys.exit(f"error: {e}")
  for path in paths:
    print(path)


if __name__ == "__main__":
  app.run(main)
