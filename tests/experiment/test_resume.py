"""A run killed at any phase and rerun writes exactly the outputs of an uninterrupted run.

Every output file is compared: `metrics.jsonl` (without its wall-clock field), `results.json`,
`config.json` and every checkpoint (state bit for bit, config, metrics, extra JSON). The kills
here are exceptions raised in-process at the chosen point (the files written up to there stay, as
after a SIGKILL); the binary under real signals is in test_faults.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from metajax.experiment import build, checkpoint, metrics, train

REPO = Path(__file__).resolve().parents[2]


class Killed(BaseException):
  """Stands for SIGKILL: nothing in the loop catches it."""


def tiny_config():
  """log_every does not divide checkpoint_every (averages span a resume), an evaluation on
  "val" at the last step (before the last checkpoint) and a test evaluation after it."""
  config = build.load_config_file(f"{REPO / 'experiments/configs/sinusoid.py'}:smoke")
  config.update(num_steps=8, log_every=3, checkpoint_every=2, eval_every=4, eval_split="val",
                eval_num_tasks=2, test_num_tasks=2, eval_batch_size=2, keep_checkpoints=10)
  return config


def outputs(workdir: Path) -> dict:
  """Every output of a run that does not depend on the clock or the invocation."""
  ckpt_dir = workdir / train.CHECKPOINT_DIR
  checkpoints = {}
  for step in checkpoint.all_steps(ckpt_dir):
    read = checkpoint.read_checkpoint(ckpt_dir, step)
    flat = {"/".join(k): np.asarray(v) for k, v in _flatten(read.state).items()}
    checkpoints[step] = {"state": {k: (v.dtype.str, v.shape, v.tobytes()) for k, v in flat.items()},
                         "config": read.config, "metrics": read.metrics, "extra": read.extra}
  return {"metrics": [{k: v for k, v in r.items() if k != "time"}
                      for r in metrics.read_metrics(workdir)],
          "results": json.loads((workdir / train.RESULTS_FILE).read_text()),
          "config": json.loads((workdir / "config.json").read_text()),
          "checkpoints": checkpoints}


def _flatten(tree, prefix=()):
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, (*prefix, str(key))))
    else:
      out[(*prefix, str(key))] = value
  return out


def quiet(_line: str) -> None:
  pass


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
  workdir = tmp_path_factory.mktemp("uninterrupted")
  train.train_and_evaluate(tiny_config(), workdir, print_fn=quiet)
  return outputs(workdir)


def test_the_reference_has_what_a_resume_must_reproduce(uninterrupted):
  records = uninterrupted["metrics"]
  assert [r["step"] for r in records if "outer/loss" in r] == [3, 6, 8]
  assert [r["step"] for r in records if "eval/loss_after" in r] == [4, 8]
  assert [r["step"] for r in records if "test/loss_after" in r] == [8]
  assert {"inner/support_loss_before", "outer/loss", "outer/grad_norm", "eval/loss_after",
          "test/loss_after"} <= set(uninterrupted["results"])
  assert sorted(uninterrupted["checkpoints"]) == [2, 4, 6, 8]


def kill_after_log_line(monkeypatch, at: int) -> None:
  write = metrics.JsonlWriter.write

  def killing_write(self, step, scalars):
    write(self, step, scalars)
    if step == at and "outer/loss" in scalars:
      raise Killed

  monkeypatch.setattr(metrics.JsonlWriter, "write", killing_write)


def kill_after_checkpoint(monkeypatch, at: int) -> None:
  save = checkpoint.Checkpoints.save

  def killing_save(self, step, *args, **kwargs):
    path = save(self, step, *args, **kwargs)
    if step == at:
      raise Killed
    return path

  monkeypatch.setattr(checkpoint.Checkpoints, "save", killing_save)


def killed_and_resumed(config, tmp_path: Path, monkeypatch, at: int) -> tuple[dict, dict]:
  """The outputs of `config()` run uninterrupted, and of a run killed after its step-`at`
  checkpoint and rerun (workdirs `uninterrupted` and `killed` under `tmp_path`)."""
  reference = tmp_path / "uninterrupted"
  train.train_and_evaluate(config(), reference, print_fn=quiet)
  killed = tmp_path / "killed"
  with monkeypatch.context() as patch:
    kill_after_checkpoint(patch, at=at)
    with pytest.raises(Killed):
      train.train_and_evaluate(config(), killed, print_fn=quiet)
  train.train_and_evaluate(config(), killed, print_fn=quiet)
  return outputs(reference), outputs(killed)


# Four steps checkpointed at 2 and 4: a run killed after step 2 resumes from a checkpoint.
KILL_AT_2 = {"num_steps": 4, "eval_every": 0, "log_every": 1, "checkpoint_every": 2,
             "keep_checkpoints": 5}


def resumes_after_step_2(config, tmp_path: Path, monkeypatch) -> dict:
  """Asserts that `config()` (with `KILL_AT_2`'s fields), killed after its step-2 checkpoint and
  rerun, gives the uninterrupted run's outputs and keeps checkpoints 2 and 4; returns those
  outputs."""
  reference, resumed = killed_and_resumed(config, tmp_path, monkeypatch, at=2)
  assert resumed == reference
  assert checkpoint.all_steps(tmp_path / "killed" / train.CHECKPOINT_DIR) == [2, 4]
  return reference


def kill_in_test_evaluation(monkeypatch) -> None:
  evaluate = train._evaluate

  def killing_evaluate(log, evaluators, prefix, *args):
    if prefix == "test":
      raise Killed
    return evaluate(log, evaluators, prefix, *args)

  monkeypatch.setattr(train, "_evaluate", killing_evaluate)


@pytest.mark.parametrize("phase", [
  "after a log line, between checkpoints",  # resumes from 2 with steps 1-2 of the average of 3
  pytest.param("right after a checkpoint",  # resumes from 4, mid log interval, after the eval
               marks=pytest.mark.slow),
  "during the final test evaluation",  # everything trained and saved; results.json not written
])
def test_a_killed_run_rerun_writes_the_uninterrupted_outputs(tmp_path, monkeypatch, phase,
                                                            uninterrupted):
  with monkeypatch.context() as patch:
    if phase.startswith("after a log line"):
      kill_after_log_line(patch, at=3)
    elif phase.startswith("right after"):
      kill_after_checkpoint(patch, at=4)
    else:
      kill_in_test_evaluation(patch)
    with pytest.raises(Killed):
      train.train_and_evaluate(tiny_config(), tmp_path, print_fn=quiet)
  assert not (tmp_path / train.RESULTS_FILE).exists()
  lines = []
  result = train.train_and_evaluate(tiny_config(), tmp_path, print_fn=lines.append)
  resumed_from = {"after": 2, "right": 4, "during": 8}[phase.split()[0]]
  assert any(f"resuming from checkpoint step {resumed_from}" in line for line in lines)
  assert result == uninterrupted["results"]
  assert outputs(tmp_path) == uninterrupted


@pytest.mark.slow
def test_a_finished_run_rerun_rewrites_the_same_outputs(tmp_path, uninterrupted):
  train.train_and_evaluate(tiny_config(), tmp_path, print_fn=quiet)
  assert outputs(tmp_path) == uninterrupted
  lines = []
  train.train_and_evaluate(tiny_config(), tmp_path, print_fn=lines.append)
  assert any("resuming from checkpoint step 8" in line for line in lines)
  assert outputs(tmp_path) == uninterrupted


@pytest.mark.slow
def test_a_finished_run_of_a_checkpoint_without_the_metrics_state_reruns_the_same(
    tmp_path, uninterrupted):
  """Checkpoints written before they held the metrics state: a rerun of the finished run takes
  the latest values and evaluation from metrics.jsonl instead."""
  config = tiny_config()
  train.train_and_evaluate(config, tmp_path, print_fn=quiet)
  ckpt_dir = tmp_path / train.CHECKPOINT_DIR
  last = checkpoint.read_checkpoint(ckpt_dir)
  with checkpoint.Checkpoints(ckpt_dir, keep=config.keep_checkpoints,
                              best=train.best_of(config)) as checkpoints:
    checkpoints.discard(last.step)
    checkpoints.save(last.step, last.state, config=last.config, metrics=last.metrics)
  assert checkpoint.read_checkpoint(ckpt_dir).extra is None
  train.train_and_evaluate(config, tmp_path, print_fn=quiet)
  rerun = outputs(tmp_path)
  assert rerun["metrics"] == uninterrupted["metrics"]  # no second evaluation line
  assert rerun["results"] == uninterrupted["results"]
