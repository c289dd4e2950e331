r"""Turns workdirs' metrics (metrics.jsonl) into PNG learning curves.

  python experiments/plot.py --workdir=/tmp/metajax_readme    # -> /tmp/metajax_readme/plots/*.png
  python experiments/plot.py --compare=random=runs/kao_5w1s,zeroing=runs/kao_5w1s_zero \
      --metric=eval/accuracy_after --out=/tmp/zeroing.png    # several runs on one plot
"""

import sys
from pathlib import Path

from absl import app, flags

from metajax.experiment import metrics

_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir (its metrics.jsonl).")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Where the PNGs go (default: <workdir>/plots).")
_COMPARE = flags.DEFINE_list("compare", [], "label=workdir pairs: one plot of --metric for all.")
_METRIC = flags.DEFINE_string("metric", "eval/accuracy_after", "The metric of --compare.")
_OUT = flags.DEFINE_string("out", "comparison.png", "The PNG of --compare.")
_LOG_Y = flags.DEFINE_bool("log_y", False, "Log-scale y axis for --compare.")


def compare(pairs: list[str]) -> list[Path]:
  curves = {}
  for pair in pairs:
    label, sep, workdir = pair.partition("=")
    if not sep or not label or not workdir:
      raise ValueError(f"--compare entry {pair!r} is not label=workdir")
    curves[label] = metrics.read_metrics(Path(workdir))
  return [metrics.plot_comparison(curves, _METRIC.value, _OUT.value, title=_METRIC.value,
                                  log_y=_LOG_Y.value)]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if bool(_WORKDIR.value) == bool(_COMPARE.value):
    raise app.UsageError("give either --workdir or --compare")
  try:
    if _COMPARE.value:
      paths = compare(_COMPARE.value)
    else:
      workdir = Path(_WORKDIR.value)
      records = metrics.read_metrics(workdir)
      paths = metrics.plot_learning_curves(records, _OUT_DIR.value or workdir / "plots",
                                           title=workdir.name)
  except (OSError, ValueError) as e:
    sys.exit(f"error: {e}")
  for path in paths:
    print(path)


if __name__ == "__main__":
  app.run(main)
