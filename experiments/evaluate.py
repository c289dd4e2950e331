r"""Evaluates a workdir's checkpoint before and after adaptation on a fixed set of test tasks.

The tasks come from --eval_seed alone (not the training seed), so any two checkpoints are
compared on the same tasks. Prints mean +- 95% CI and writes them as JSON (atomically).

  python experiments/evaluate.py --workdir=/tmp/metajax_readme --num_tasks=600
"""

import sys
from pathlib import Path

from absl import app, flags

from metajax.experiment import checkpoint, train
from metajax.platform import runtime

_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir (its checkpoints/).")
_SPLIT = flags.DEFINE_string("split", "test", "Class split the tasks come from.")
_NUM_TASKS = flags.DEFINE_integer("num_tasks", 600, "Number of tasks.", lower_bound=1)
_STEPS = flags.DEFINE_integer("num_inner_steps", None, "Inner steps at test time (default: the "
                              "config's eval_num_inner_steps).", lower_bound=1)
_EVAL_SEED = flags.DEFINE_integer("eval_seed", 0, "Seed of the evaluation tasks.")
_BATCH = flags.DEFINE_integer("batch_size", 50, "Tasks evaluated at once.", lower_bound=1)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Overrides the config's data_dir.")
_OUTPUT = flags.DEFINE_string("output", None, "JSON output (default: "
                              "<workdir>/eval_<split>_step<step>.json).")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  try:
    result = train.evaluate_checkpoint(
      _WORKDIR.value, split=_SPLIT.value, num_tasks=_NUM_TASKS.value,
      num_inner_steps=_STEPS.value, eval_seed=_EVAL_SEED.value, batch_size=_BATCH.value,
      step=_STEP.value, data_dir=_DATA_DIR.value)
  except train.USER_ERRORS as e:
    sys.exit(f"error: {e}")
  output = _OUTPUT.value or Path(_WORKDIR.value) / f"eval_{_SPLIT.value}_step{result['step']}.json"
  checkpoint.write_json_atomic(output, result)
  print(f"wrote {output}")


if __name__ == "__main__":
  runtime.reexec_with_hugepages()  # before any work: glibc reads it at start-up
  app.run(main)
