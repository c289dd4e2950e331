"""Faults a careful user meets: a damaged config inside a checkpoint, Ctrl-C, SIGKILL.

A config stored in a checkpoint is covered by its digest: a flipped digit (a valid JSON of another
learning rate) or a flipped bit (no longer JSON) is corruption, so training, evaluation and
classification fall back to the previous good checkpoint with one warning naming the file, instead
of refusing "a different run" or using the wrong config. The binary under real signals is slow
(a subprocess compiles from scratch): Ctrl-C ends it with one line naming the step to resume from
and the command, exit status 130; a SIGKILLed run rerun writes the outputs of an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest

from metajax.experiment import build, checkpoint, metrics, train

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 300  # seconds a subprocess may take (compilation on a loaded 2-core machine)


def sinusoid_config(**overrides):
  config = build.load_config_file(f"{REPO / 'experiments/configs/sinusoid.py'}:smoke")
  config.update(eval_every=0, test_num_tasks=0)
  config.update(overrides)
  return config


def quiet(_line: str) -> None:
  pass


def damage_config(path: Path, how: str) -> None:
  """Step folder `path`'s stored config: inner_lr 0.01 -> 0.02 (still valid JSON), or one bit of
  its first ':' flipped (';', no longer JSON)."""
  stored = path / "config" / "metadata"
  text = stored.read_text()
  if how == "digit":
    assert '"inner_lr": 0.01' in text
    stored.write_text(text.replace('"inner_lr": 0.01', '"inner_lr": 0.02'))
  else:
    data = bytearray(stored.read_bytes())
    data[data.index(b":")] ^= 0x01
    stored.write_bytes(bytes(data))


def broken_warnings(caught) -> list[str]:
  return [str(w.message) for w in caught if issubclass(w.category, checkpoint.CheckpointWarning)]


@pytest.mark.parametrize("how", ["digit", "bit"])
def test_a_damaged_config_in_the_newest_checkpoint_falls_back_everywhere(tmp_path, how):
  workdir = tmp_path / "run"
  train.train_and_evaluate(sinusoid_config(num_steps=2), workdir, print_fn=quiet)
  ckpt_dir = workdir / train.CHECKPOINT_DIR
  reference = checkpoint.read(ckpt_dir, 1)[0]
  damage_config(checkpoint.checkpoint_path(ckpt_dir, 2), how)

  # evaluate.py and classify.py load through restore_learner
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    config, _, _, params, step = train.restore_learner(workdir)
  messages = broken_warnings(caught)
  assert len(messages) == 1 and "checkpoint_00000002" in messages[0], messages
  assert step == 1 and config.inner_lr == 0.01
  assert _bytes(params) == _bytes(reference["meta"]["params"])

  # train.py: corruption, not "a different run"; step 2 is trained again and good
  lines = []
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    result = train.train_and_evaluate(sinusoid_config(num_steps=2), workdir, print_fn=lines.append)
  messages = broken_warnings(caught)
  assert len(messages) == 1 and "checkpoint_00000002" in messages[0], messages
  assert any("resuming from checkpoint step 1" in line for line in lines)
  assert result["step"] == 2
  assert checkpoint.read(ckpt_dir, 2)[1]["inner_lr"] == 0.01


def test_a_stray_truncation_file_is_removed_at_start(tmp_path):
  train.train_and_evaluate(sinusoid_config(num_steps=1), tmp_path, print_fn=quiet)
  (tmp_path / "metrics.jsonl.tmp").write_text('{"step": 1')  # a rewrite killed before its rename
  (tmp_path / ".results.json.x1y2z3.tmp").write_text("{")  # a write_atomic killed likewise
  lines = []
  train.train_and_evaluate(sinusoid_config(num_steps=2), tmp_path, print_fn=lines.append)
  assert any("removed what killed writes left" in line and "metrics.jsonl.tmp" in line
             and ".results.json.x1y2z3.tmp" in line for line in lines)
  assert not list(tmp_path.glob("*.tmp"))


def test_an_interrupt_names_the_newest_checkpoint(tmp_path, monkeypatch):
  save = checkpoint.Checkpoints.save

  def save_then_ctrl_c(self, step, *args, **kwargs):
    path = save(self, step, *args, **kwargs)
    if step == 2:
      raise KeyboardInterrupt
    return path

  monkeypatch.setattr(checkpoint.Checkpoints, "save", save_then_ctrl_c)
  where = re.escape(repr(str(tmp_path / train.CHECKPOINT_DIR)))
  with pytest.raises(train.Interrupted,
                     match=f"^interrupted; the last checkpoint is step 2 in {where}$") as info:
    train.train_and_evaluate(sinusoid_config(num_steps=4), tmp_path, print_fn=quiet)
  assert info.value.step == 2 and isinstance(info.value, KeyboardInterrupt)
  assert checkpoint.all_steps(tmp_path / train.CHECKPOINT_DIR) == [1, 2]
  assert not (tmp_path / train.RESULTS_FILE).exists()


# ------------------------------------------------------------------------------ real signals

FLAGS = ("--config=experiments/configs/sinusoid.py:smoke", "--config.eval_every=0")


def environ(tmp_path: Path) -> dict[str, str]:
  return {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PLATFORMS": "cpu"}


def start(flags, workdir: Path, env) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, str(REPO / "experiments/train.py"), *flags,
                           f"--workdir={workdir}"], env=env, cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def wait_for(condition, process: subprocess.Popen, what: str) -> None:
  deadline = time.time() + TIMEOUT
  while not condition():
    if process.poll() is not None:
      pytest.fail(f"the run ended before {what}:\n{process.stderr.read()[-3000:]}")
    if time.time() > deadline:
      process.kill()
      pytest.fail(f"no {what} within {TIMEOUT} s")
    time.sleep(0.001)


def _unfinished(ckpt_dir: Path) -> list[Path]:
  return list(ckpt_dir.glob("*.orbax-checkpoint-tmp*")) if ckpt_dir.is_dir() else []


@pytest.mark.slow
@pytest.mark.parametrize("when", ["training", "writing a checkpoint"])
def test_ctrl_c_ends_with_one_line_naming_the_step_and_the_command(tmp_path, when):
  """SIGINT once the first checkpoint exists (or while one is being written, if caught at it):
  any save in progress completes, then one line names the newest checkpoint and the command to
  resume with, no traceback, exit status 130."""
  flags = [*FLAGS, "--config.num_steps=100000", "--config.checkpoint_every=1",
           "--config.log_every=7", "--config.test_num_tasks=0"]
  workdir = tmp_path / "run"
  ckpt_dir = workdir / train.CHECKPOINT_DIR
  process = start(flags, workdir, environ(tmp_path))
  if when == "training":
    wait_for(lambda: checkpoint.latest_step(ckpt_dir) is not None, process, "a checkpoint")
  else:
    wait_for(lambda: (checkpoint.latest_step(ckpt_dir) or 0) >= 2 and _unfinished(ckpt_dir),
             process, "a checkpoint being written")
  process.send_signal(signal.SIGINT)
  try:
    _, stderr = process.communicate(timeout=TIMEOUT)
  except subprocess.TimeoutExpired:
    process.kill()
    pytest.fail("the run did not stop within the timeout after SIGINT")
  assert process.returncode == 130, stderr[-3000:]
  assert "Traceback" not in stderr
  last = stderr.strip().splitlines()[-1]
  match = re.fullmatch(r"interrupted; the last checkpoint is step (\d+) in '(.+)'; resume with: "
                       r"(.+)", last)
  assert match, last
  assert sum("interrupted" in line for line in stderr.splitlines()) == 1
  step = int(match.group(1))
  assert Path(match.group(2)) == ckpt_dir
  assert shlex.split(match.group(3))[1:] == [str(REPO / "experiments/train.py"), *flags,
                                             f"--workdir={workdir}"]
  # the save in progress was completed, not abandoned
  assert step == checkpoint.latest_step(ckpt_dir) and not _unfinished(ckpt_dir)
  assert checkpoint.read_checkpoint(ckpt_dir, step).step == step


@pytest.mark.slow
def test_a_sigkilled_binary_rerun_writes_the_uninterrupted_outputs(tmp_path):
  """SIGKILL at whatever point the run has reached once a checkpoint exists, with log_every not
  dividing checkpoint_every; the rerun's metrics (without times), results and checkpoints are
  those of an uninterrupted run."""
  flags = [*FLAGS, "--config.num_steps=200", "--config.checkpoint_every=4",
           "--config.log_every=3", "--config.keep_checkpoints=100", "--config.test_num_tasks=2",
           "--config.eval_num_tasks=2", "--config.eval_batch_size=2"]
  env = environ(tmp_path)
  killed, reference = tmp_path / "killed", tmp_path / "uninterrupted"
  process = start(flags, killed, env)
  wait_for(lambda: (checkpoint.latest_step(killed / train.CHECKPOINT_DIR) or 0) >= 8, process,
           "checkpoint 8")
  process.send_signal(signal.SIGKILL)
  process.wait(timeout=TIMEOUT)
  assert not (killed / train.RESULTS_FILE).exists(), "the run ended before it could be killed"
  for workdir in (killed, reference):
    rerun = subprocess.run([sys.executable, str(REPO / "experiments/train.py"), *flags,
                            f"--workdir={workdir}"], env=env, cwd=REPO, capture_output=True,
                           text=True, timeout=TIMEOUT)
    assert rerun.returncode == 0, rerun.stderr[-3000:]

  def files(workdir: Path) -> dict:
    ckpt_dir = workdir / train.CHECKPOINT_DIR
    reads = {s: checkpoint.read_checkpoint(ckpt_dir, s) for s in checkpoint.all_steps(ckpt_dir)}
    return {"metrics": [{k: v for k, v in r.items() if k != "time"}
                        for r in metrics.read_metrics(workdir)],
            "results": json.loads((workdir / train.RESULTS_FILE).read_text()),
            "checkpoints": {s: (json.dumps(r.config), json.dumps(r.extra),
                                _bytes(r.state))
                            for s, r in reads.items()}}

  assert files(killed) == files(reference)


def _bytes(tree) -> list[tuple[str, bytes]]:
  return [(np.asarray(x).dtype.str, np.asarray(x).tobytes()) for x in jax.tree.leaves(tree)]


@pytest.mark.slow
def test_the_binary_names_a_skipped_checkpoint_in_one_warning_line(tmp_path):
  workdir = tmp_path / "run"
  train.train_and_evaluate(sinusoid_config(num_steps=2), workdir, print_fn=quiet)
  damage_config(checkpoint.checkpoint_path(workdir / train.CHECKPOINT_DIR, 2), "bit")
  result = subprocess.run([sys.executable, str(REPO / "experiments/train.py"), *FLAGS,
                           "--config.num_steps=2", "--config.test_num_tasks=0",
                           f"--workdir={workdir}"], env=environ(tmp_path), cwd=REPO,
                          capture_output=True, text=True, timeout=TIMEOUT)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = [line for line in result.stderr.splitlines() if "checkpoint_00000002" in line]
  assert len(lines) == 1 and lines[0].startswith("warning: skipping 1 broken checkpoint(s)")
  assert "warnings.warn" not in result.stderr  # no source line under it
  assert "resuming from checkpoint step 1" in result.stdout
