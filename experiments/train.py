r"""Meta-trains a learner as the config says, then evaluates it on held-out test tasks.

Rerunning the same command in the same --workdir resumes from its newest good checkpoint; Ctrl-C
stops once a checkpoint being written is complete, printing the step to resume from and the
command (exit status 130). A resumed run may use other learning rates when told so:
`--config.meta_lr=1e-4 --allow_config_change=meta_lr` (recorded in <workdir>/config_history.jsonl).
A NaN, a divergence (with --config.on_divergence=stop) or bad labels stop the run with one line
naming the step, the last good checkpoint and the command that resumes from it (exit status 1).

  python experiments/train.py --config=experiments/configs/omniglot.py:readme \
    --workdir=/tmp/metajax_readme
  python experiments/train.py --config=experiments/configs/omniglot.py:5way1shot \
    --workdir=runs/fomaml_zero --config.algorithm=fomaml --config.zeroing=True
  python experiments/train.py --config=experiments/configs/omniglot.py:kao5way1shot \
    --workdir=runs/reptile --config.algorithm=reptile --config.reptile_serial=True

--config.algorithm: maml, fomaml, anil, metasgd, reptile, protonet (--config.train_ways for
higher-way training), umtra, pretrain, simclr, supcon (--config.pretrain_eval); see
`metajax.experiment.build.ALGORITHMS` and the named configs in experiments/configs/omniglot.py.

Over several hosts (`jax.distributed`), the same command on each, host 0's address and this
host's index in the environment; host 0 alone writes the workdir and prints:

  METAJAX_COORDINATOR=10.0.0.1:1234 METAJAX_NUM_PROCESSES=2 METAJAX_PROCESS_ID=$i \
    python experiments/train.py --config=experiments/configs/omniglot.py:5way1shot --workdir=runs/mh

All the logic is in `metajax.experiment.train.train_and_evaluate`, importable in notebooks.
"""

import shlex
import sys

from absl import app, flags
from ml_collections import config_flags

from metajax.experiment import checkpoint, cli, train
from metajax.platform import runtime, sharding

_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and results go here; "
                               "rerunning in the same workdir resumes.")
_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file[:variant], e.g. "
                                          "experiments/configs/omniglot.py:5way1shot.",
                                          lock_config=True)
_HUGEPAGES = flags.DEFINE_enum("hugepages", None, ["auto", "on", "off"], "glibc's huge-page "
                                "malloc for XLA:CPU (the process re-executes itself once); default "
                                "$METAJAX_HUGEPAGES, else auto (on where it was measured to help).")
_ALLOW = flags.DEFINE_list(cli.ALLOW_FLAG, [], "Config fields that may differ from the "
                          "checkpoint's when resuming: meta_lr, inner_lr (the change is recorded "
                          "in <workdir>/config_history.jsonl).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  runtime.prepare_process(_HUGEPAGES.value)  # before any work: glibc reads it at start-up
  # several processes when $METAJAX_COORDINATOR etc. say so, before any device is touched
  sharding.initialize_distributed()
  checkpoint.one_line_warnings()
  command = getattr(sys, "orig_argv", [sys.executable, *sys.argv])
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value, allow_config_change=_ALLOW.value)
  except train.TrainingStopped as e:  # the exact command that resumes with a lower lr
    sys.exit(f"error: {cli.stop_message(e, command)}")
  except train.USER_ERRORS as e:
    sys.exit(f"error: {e}")
  except KeyboardInterrupt as e:  # a train.Interrupted names the checkpoint
    command = shlex.join(command)
    print(f"{str(e) or 'interrupted'}; resume with: {command}", file=sys.stderr, flush=True)
    sys.exit(130)  # 128 + SIGINT, as a shell reports an interrupted command


if __name__ == "__main__":
  cli.exit_on_bad_config_overrides(sys.argv)
  app.run(main)
