"""A diverging run the user can act on: learning rates changed on resume (explicitly, recorded in
the workdir's history), a finite divergence that warns or stops, bad labels that stop the run.

In-process on the sinusoid smoke config. With Adam, a meta_lr of 10 (3) after two healthy steps
gives a NaN (a finite divergence above 1000 times the first step's loss) two steps later, and a tenth of
it trains on: what the stop advice suggests.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import jax.numpy as jnp
import pytest

from metajax.experiment import build, checkpoint, metrics, train

REPO = Path(__file__).resolve().parents[2]


def sinusoid_config(**overrides):
  config = build.load_config_file(f"{REPO / 'experiments/configs/sinusoid.py'}:smoke")
  config.update(eval_every=0, test_num_tasks=0)
  config.update(overrides)
  return config


def quiet(_line: str) -> None:
  pass


def history(workdir: Path) -> list[dict]:
  return [{k: v for k, v in r.items() if k != "time"}
          for r in metrics.read_metrics(workdir / train.CONFIG_HISTORY_FILE)]


# ------------------------------------------------------------------- learning rates on resume


def test_a_learning_rate_changes_on_resume_only_when_allowed_and_is_recorded(tmp_path):
  train.train_and_evaluate(sinusoid_config(num_steps=2), tmp_path, print_fn=quiet)
  ckpt_dir = tmp_path / train.CHECKPOINT_DIR
  lower = sinusoid_config(num_steps=4, meta_lr=1e-4)
  with pytest.raises(build.ConfigError) as refused:
    train.train_and_evaluate(lower, tmp_path, print_fn=quiet)
  assert "To resume with the new meta_lr, allow the change: --allow_config_change=meta_lr." in (
    str(refused.value))
  assert "meta_lr: 0.001 in the checkpoint, 0.0001 now" in str(refused.value)
  assert not (tmp_path / train.CONFIG_HISTORY_FILE).exists()

  lines = []
  train.train_and_evaluate(lower, tmp_path, print_fn=lines.append, allow_config_change=["meta_lr"])
  assert f"changed on resume (recorded in {str(tmp_path / train.CONFIG_HISTORY_FILE)!r}): " \
         "meta_lr 0.001 -> 0.0001" in lines
  assert history(tmp_path) == [{"step": 2, "changes": {"meta_lr": {"from": 0.001,
                                                                   "to": 0.0001}}}]
  assert checkpoint.read_checkpoint(ckpt_dir, 2).config["meta_lr"] == 0.001
  assert [checkpoint.read_checkpoint(ckpt_dir, s).config["meta_lr"] for s in (3, 4)] == [1e-4] * 2
  assert json.loads((tmp_path / "config.json").read_text())["meta_lr"] == 1e-4
  # a rerun resumes from a checkpoint of the new value: nothing changes, nothing is recorded
  train.train_and_evaluate(lower, tmp_path, print_fn=quiet, allow_config_change=["meta_lr"])
  assert len(history(tmp_path)) == 1


def test_a_resume_killed_before_its_next_checkpoint_records_its_change_once(tmp_path):
  workdir = tmp_path
  (workdir / "checkpoints").mkdir()
  changes = {"inner_lr": {"from": 0.01, "to": 0.005}}
  assert train.record_config_changes(workdir, 2, changes)
  assert not train.record_config_changes(workdir, 2, changes)  # the same resume, rerun
  assert train.record_config_changes(workdir, 4, changes)
  assert [r["step"] for r in history(workdir)] == [2, 4]


@pytest.mark.parametrize("fields, message", [
  (["ways"], "allow_config_change: 'ways' cannot change on resume, it defines the run "
             "(changeable: inner_lr, meta_lr, min_meta_lr; schedule, logging and evaluation fields "
             "change "
             "without it); train with another ways in another --workdir"),
  (["meta_rl"], "allow_config_change: 'meta_rl' is not a config field (did you mean meta_lr?)"),
])
def test_other_fields_are_refused_in_one_line(fields, message):
  with pytest.raises(build.ConfigError) as error:
    train.check_config_changes(fields)
  assert str(error.value) == message


def test_learning_rates_and_resumable_fields_are_allowed_but_a_learned_inner_lr_is_not():
  assert train.check_config_changes(["meta_lr", " inner_lr", "num_steps", ""]) == (
    "meta_lr", "inner_lr", "num_steps")
  config = sinusoid_config(algorithm="metasgd")
  learner = build.build_learner(config, build.build_model(config))
  assert train.check_config_changes(["meta_lr"], learner) == ("meta_lr",)
  with pytest.raises(build.ConfigError, match="'inner_lr' cannot change on resume for a learner "
                     "that learns its inner learning rates"):
    train.check_config_changes(["inner_lr"], learner)


# ---------------------------------------------------------------------------------- divergence


def test_a_finite_divergence_warns_once_by_default():
  """meta_lr=3: the loss soon exceeds 1000 times the first step's (1e11 at step 6, finite); the
  run goes on."""
  import tempfile

  with tempfile.TemporaryDirectory() as workdir, warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    result = train.train_and_evaluate(sinusoid_config(num_steps=6, meta_lr=3.0), workdir,
                                      print_fn=quiet)
  assert result["step"] == 6
  messages = [str(w.message) for w in caught if issubclass(w.category, train.DivergenceWarning)]
  assert len(messages) == 1, messages
  assert "is above divergence_loss_ratio = 1000 times the first step's" in messages[0]
  assert "the run may be diverging" in messages[0] and "meta_lr=0.3" in messages[0]


@pytest.mark.slow
@pytest.mark.parametrize("meta_lr, stopped", [(10.0, train.NonFiniteError),
                                              (3.0, train.DivergenceError)])
def test_a_stopped_run_resumes_with_the_advised_learning_rate(tmp_path, meta_lr, stopped):
  """Two healthy steps, then a meta_lr that diverges: the run stops at step 4, naming the
  checkpoint of step 2 and a tenth of the meta_lr, which resumes from it and trains on."""
  train.train_and_evaluate(sinusoid_config(num_steps=2, optimizer="adam"), tmp_path,
                           print_fn=quiet)
  config = sinusoid_config(num_steps=8, checkpoint_every=2, meta_lr=meta_lr,
                           on_divergence="stop")
  with pytest.raises(stopped) as error:
    train.train_and_evaluate(config, tmp_path, print_fn=quiet, allow_config_change=["meta_lr"])
  assert error.value.step == 4 and error.value.checkpoint_step == 2
  assert str(error.value).startswith(
    f"{error.value.what} at step 4: training stopped; the last good checkpoint is step 2 in "
    f"{str(tmp_path / train.CHECKPOINT_DIR)!r}. To resume from it with a lower learning rate, "
    f"rerun with meta_lr={meta_lr / 10!r} and allow_config_change=('meta_lr',)")
  assert checkpoint.latest_step(tmp_path / train.CHECKPOINT_DIR) == 2
  config.meta_lr = error.value.lower["meta_lr"]
  result = train.train_and_evaluate(config, tmp_path, print_fn=quiet,
                                    allow_config_change=error.value.lower)
  assert result["step"] == 8
  assert [r["step"] for r in history(tmp_path)] == [2, 2]


def test_guards_name_the_bound_and_the_step(tmp_path):
  config = sinusoid_config(divergence_grad_norm=50.0, on_divergence="stop")
  guards = train.Guards(config, tmp_path)
  guards.check(1, {"outer/loss": 2.0, "outer/grad_norm": 10.0})
  guards.check(2, {"outer/loss": 1999.0, "outer/grad_norm": 50.0})  # at the bounds: healthy
  with pytest.raises(train.DivergenceError, match=r"^outer/loss = 2001 is above "
                     r"divergence_loss_ratio = 1000 times the first step's 2 at step 3: "
                     "training stopped; no checkpoint was written"):
    guards.check(3, {"outer/loss": 2001.0})
  with pytest.raises(train.DivergenceError, match=r"^outer/grad_norm = 51 is above "
                     r"divergence_grad_norm = 50 at step 4"):
    guards.check(4, {"outer/loss": 1.0, "outer/grad_norm": 51.0})
  off = train.Guards(sinusoid_config(divergence_loss_ratio=0.0), tmp_path, initial_loss=1.0)
  off.check(5, {"outer/loss": 1e30})  # no bound


@pytest.mark.parametrize("field, value", [("divergence_loss_ratio", -1.0),
                                          ("divergence_grad_norm", -0.5),
                                          ("on_divergence", "halt")])
def test_bad_divergence_fields_are_config_errors(field, value):
  with pytest.raises(build.ConfigError, match=field):
    build.validate_config(sinusoid_config(**{field: value}))


# -------------------------------------------------------------------------------- bad labels


def test_bad_labels_name_the_step_and_the_allowed_range(tmp_path):
  config = build.load_config_file(f"{REPO / 'experiments/configs/omniglot.py'}:smoke")
  guards = train.Guards(config, tmp_path)
  guards.check(1, {train.BAD_LABELS: 0, "outer/loss": 1.6})
  with pytest.raises(train.BadLabelsError) as error:
    guards.check(2, {train.BAD_LABELS: 3, "outer/loss": 1.6})
  assert str(error.value) == (
    f"inputs/bad_labels = 3: 3 label(s) of that step's meta-batch outside [0, {config.ways}) "
    f"(the {config.ways} classes of an episode) at step 2: training stopped; no checkpoint was "
    "written. Check the data and the dataset's task sampler.")
  assert isinstance(error.value, ValueError) and not error.value.lower


def _reporting_bad_labels(monkeypatch, bad_at: int | None) -> None:
  """The meta-step with an `inputs/bad_labels` metric: 2 at step `bad_at`, else 0."""
  build_meta_step = build.build_meta_step

  def with_count(*args, **kwargs):
    meta_step = build_meta_step(*args, **kwargs)

    def step(state, tasks):
      state, scalars = meta_step.step(state, tasks)
      return state, {**scalars, train.BAD_LABELS: jnp.where(state.step == bad_at, 2, 0)}

    return dataclasses.replace(meta_step, step=step, steps=None)  # one step per call

  monkeypatch.setattr(build, "build_meta_step", with_count)


@pytest.mark.parametrize("bad_at", [None, 3])
def test_the_loop_stops_on_bad_labels_and_never_logs_the_count(tmp_path, monkeypatch, bad_at):
  _reporting_bad_labels(monkeypatch, bad_at)
  config = sinusoid_config(num_steps=4, log_every=1, checkpoint_every=2)
  if bad_at is None:
    result = train.train_and_evaluate(config, tmp_path, print_fn=quiet)
    assert result["step"] == 4 and train.BAD_LABELS not in result
  else:
    with pytest.raises(train.BadLabelsError, match="^inputs/bad_labels = 2: .* at step 3: "
                       "training stopped; the last good checkpoint is step 2 in "):
      train.train_and_evaluate(config, tmp_path, print_fn=quiet)
    assert checkpoint.latest_step(tmp_path / train.CHECKPOINT_DIR) == 2
  records = metrics.read_metrics(tmp_path)
  assert [r["step"] for r in records] == [1, 2, 3, 4][:4 if bad_at is None else 2]
  assert not any(train.BAD_LABELS in r for r in records)
