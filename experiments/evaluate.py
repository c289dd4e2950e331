r"""Evaluates a workdir's checkpoint before and after adaptation on a fixed set of test tasks.

The tasks come from --eval_seed alone (not the training seed), so any two checkpoints are
compared on the same tasks. Prints mean +- 95% CI, then writes them as JSON (atomically); a
failed write names the file and the reason, after the metrics are printed.

  python experiments/evaluate.py --workdir=/tmp/metajax_readme --num_tasks=600
  python experiments/evaluate.py --workdir=runs/kao_5w1s_zero --best   # best validation metric
  python experiments/evaluate.py --workdir=runs/simclr --pretrain_eval=linear_probe
"""

import sys
from pathlib import Path

from absl import app, flags

from metajax.experiment import build, checkpoint, cli, train
from metajax.platform import runtime

_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir (its checkpoints/).")
_SPLIT = flags.DEFINE_string("split", "test", "Class split the tasks come from (one the run's "
                             "dataset has: train, test, and for some val).")
_NUM_TASKS = flags.DEFINE_integer("num_tasks", 600, "Number of tasks.", lower_bound=1)
_STEPS = flags.DEFINE_integer("num_inner_steps", None, "Inner steps at test time (default: the "
                              "config's eval_num_inner_steps).", lower_bound=1)
_EVAL_SEED = flags.DEFINE_integer("eval_seed", 0, "Seed of the evaluation tasks.")
_BATCH = flags.DEFINE_integer("batch_size", 50, "Tasks evaluated at once.", lower_bound=1)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
_BEST = flags.DEFINE_bool("best", False, "The checkpoint with the best validation metric "
                          "(kept besides the newest) instead of the newest.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Overrides the config's data_dir.")
_PRETRAIN_EVAL = flags.DEFINE_enum("pretrain_eval", None, list(build.PRETRAIN_EVALS),
                                   "A pre-trained encoder's evaluation (pre-training algorithms "
                                   "only; default: the config's pretrain_eval).")
_OUTPUT = flags.DEFINE_string("output", None, "JSON output (default: "
                              "<workdir>/eval_<split>_step<step>.json).")
_HUGEPAGES = flags.DEFINE_enum("hugepages", None, ["auto", "on", "off"], "glibc's huge-page "
                                "malloc for XLA:CPU (the process re-executes itself once); default "
                                "$METAJAX_HUGEPAGES, else auto (on where it was measured to help).")
flags.mark_flags_as_required(["workdir"])
flags.register_multi_flags_validator(["step", "best"],
                                    lambda f: not (f["best"] and f["step"] is not None),
                                    "give --step or --best, not both")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  runtime.prepare_process(_HUGEPAGES.value)  # before any work: glibc reads it at start-up
  checkpoint.one_line_warnings()  # a checkpoint fall-back is one "warning: ..." line
  try:
    config = cli.stored_config(_WORKDIR.value)  # to check --split before any data is loaded
    if config is not None and (error := cli.split_error(config, _SPLIT.value)):
      sys.exit(f"error: {error}")
    result = train.evaluate_checkpoint(
      _WORKDIR.value, split=_SPLIT.value, num_tasks=_NUM_TASKS.value,
      num_inner_steps=_STEPS.value, eval_seed=_EVAL_SEED.value, batch_size=_BATCH.value,
      step=_STEP.value, best=_BEST.value, data_dir=_DATA_DIR.value,
      pretrain_eval=_PRETRAIN_EVAL.value)
  except train.USER_ERRORS as e:
    sys.exit(f"error: {e}")
  except KeyboardInterrupt:
    sys.exit("interrupted; nothing was written")
  output = _OUTPUT.value or Path(_WORKDIR.value) / f"eval_{_SPLIT.value}_step{result['step']}.json"
  try:
    checkpoint.write_json_atomic(output, result)
  except OSError as e:  # the metrics are printed above: say where the JSON could not go
    sys.exit(f"error: could not write {str(output)!r} ({e.strerror or e}); the metrics are "
             "printed above, pass --output to write them elsewhere")
  print(f"wrote {output}")


if __name__ == "__main__":
  cli.exit_on_bad_config_overrides(sys.argv, takes_config=False)
  app.run(main)
