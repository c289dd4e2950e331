r"""Adapts a checkpoint to your own support images and prints the class of each query image.

  python experiments/classify.py --workdir=/tmp/metajax_readme \
    --support_dir=my_alphabet/support --query_dir=my_alphabet/query

support_dir has one sub-folder per class (2 to the model's `ways`), query_dir the images to
classify. Any size or mode works: images are converted to the model's input; for Omniglot-style
models (dark background) light-background drawings are inverted (--invert=auto|true|false).
"""

import csv
import sys
from pathlib import Path

from absl import app, flags

from metajax.experiment import build, checkpoint, classify, cli, train
from metajax.platform import runtime

_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir (its checkpoints/).")
_SUPPORT = flags.DEFINE_string("support_dir", None, "One sub-folder of images per class.")
_QUERY = flags.DEFINE_string("query_dir", None, "Images to classify.")
_INVERT = flags.DEFINE_enum("invert", "auto", ["auto", "true", "false"], "Invert images: auto "
                            "(light-background images, for dark-background models), or force.")
_STEPS = flags.DEFINE_integer("num_inner_steps", None, "Inner steps (default: the config's "
                              "eval_num_inner_steps).", lower_bound=1)
_OUTPUT = flags.DEFINE_string("output", None, "CSV output (default: <workdir>/predictions.csv).")
_HUGEPAGES = flags.DEFINE_enum("hugepages", None, ["auto", "on", "off"], "glibc's huge-page "
                                "malloc for XLA:CPU (the process re-executes itself once); default "
                                "$METAJAX_HUGEPAGES, else auto (on where it was measured to help).")
flags.mark_flags_as_required(["workdir", "support_dir", "query_dir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  runtime.prepare_process(_HUGEPAGES.value)  # before any work: glibc reads it at start-up
  checkpoint.one_line_warnings()  # a checkpoint fall-back is one "warning: ..." line
  try:
    classify.list_folders(_SUPPORT.value, _QUERY.value)  # cheap: before a model is loaded
    config, model, learner, params, _ = train.restore_learner(_WORKDIR.value,
                                                              num_inner_steps=_STEPS.value)
    dark = build.DATASETS[config.dataset].dark_background
    invert = {"auto": "auto" if dark else False, "true": True, "false": False}[_INVERT.value]
    rows = classify.classify_folders(learner, params, model.input_shape, config.ways,
                                     _SUPPORT.value, _QUERY.value, invert=invert)
  except (*train.USER_ERRORS, classify.InputError, OSError) as e:
    sys.exit(f"error: {e}")
  except KeyboardInterrupt:
    sys.exit("interrupted; nothing was written")
  # printed first, so that a failed write loses nothing
  for row in rows:
    print(f"{row['image']}\t{row['label']}\t{row['probability']:.3f}")
  output = Path(_OUTPUT.value or Path(_WORKDIR.value) / "predictions.csv")
  try:
    with open(output, "w", newline="") as f:
      writer = csv.DictWriter(f, fieldnames=["image", "label", "probability"])
      writer.writeheader()
      writer.writerows(rows)
  except OSError as e:
    sys.exit(f"error: could not write {str(output)!r} ({e.strerror or e}); the predictions are "
             "printed above, pass --output to write them elsewhere")
  print(f"wrote {output}")


if __name__ == "__main__":
  cli.exit_on_bad_config_overrides(sys.argv, takes_config=False)
  app.run(main)
