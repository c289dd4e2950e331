"""Implicit MAML from the configs: its named configs, its fields' checks, training from the loop
and a killed run resumed to the uninterrupted outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from metajax.algorithms.imaml import IMAML
from metajax.experiment import build, checkpoint, train
from tests.experiment.test_resume import KILL_AT_2, killed_and_resumed, quiet, resumes_after_step_2

CONFIGS = Path(__file__).resolve().parents[2] / "experiments" / "configs"


def _config(name: str, file: str = "omniglot.py", **overrides):
  config = build.load_config_file(f"{CONFIGS / file}:{name}")
  config.update(overrides)
  return config


@pytest.mark.parametrize("name", ["imaml5way1shot", "imaml20way1shot", "imaml_smoke"])
def test_the_named_configs_validate_and_build_their_learner(name):
  config = _config(name)
  build.validate_config(config)
  learner = build.build_learner(config, build.build_model(config))
  assert isinstance(learner, IMAML)
  assert (learner.lam, learner.cg_steps, learner.cg_damping) == (
    config.imaml_lambda, config.imaml_cg_steps, config.imaml_cg_damping)
  assert learner.num_inner_steps == config.num_inner_steps
  evaluation = build.build_learner(config, build.build_model(config),
                                   num_inner_steps=config.eval_num_inner_steps)
  assert evaluation.num_inner_steps == config.eval_num_inner_steps


def test_the_papers_settings():
  """Table 2's iMAML-GD: lambda 2.0, 5 CG steps, 16 (5-way) and 25 (20-way) inner steps."""
  five, twenty = _config("imaml5way1shot"), _config("imaml20way1shot")
  for config in (five, twenty):
    assert (config.imaml_lambda, config.imaml_cg_steps, config.inner_lr) == (2.0, 5, 0.1)
    assert (config.algorithm, config.split, config.model, config.shots) == (
      "imaml", "finn", "conv4", 1)
  assert (five.ways, five.num_inner_steps, five.eval_num_inner_steps) == (5, 16, 16)
  assert (twenty.ways, twenty.num_inner_steps, twenty.eval_num_inner_steps) == (20, 25, 25)


@pytest.mark.parametrize("overrides,message", [
  ({"algorithm": "maml"}, "imaml_cg_damping, imaml_lambda only apply to algorithm='imaml', "
                          "not algorithm='maml'"),
  ({"imaml_lambda": 0.0}, "imaml_lambda=0.0 must be a number > 0"),
  ({"imaml_cg_steps": 0}, "imaml_cg_steps=0"),
  ({"imaml_cg_damping": -0.5}, "imaml_cg_damping=-0.5 must be a number >= 0"),
])
def test_bad_fields_are_refused_by_name(overrides, message):
  with pytest.raises(build.ConfigError, match=message):
    build.validate_config(_config("imaml_smoke", **overrides))


def test_stored_configs_without_the_fields_load_as_they_ran():
  values = _config("readme").to_dict()
  for field in ("imaml_lambda", "imaml_cg_steps", "imaml_cg_damping"):
    del values[field]
  config = build.config_from_dict(values)
  build.validate_config(config)
  assert (config.imaml_lambda, config.imaml_cg_steps, config.imaml_cg_damping) == (1.0, 5, 0.0)


def _sinusoid(**overrides):
  return _config("smoke", "sinusoid.py", algorithm="imaml", num_inner_steps=3, imaml_lambda=2.0,
                 imaml_cg_steps=3, imaml_cg_damping=0.5, eval_every=0, **overrides)


def test_trains_from_the_loop(tmp_path):
  """4 outer steps on sinusoid regression (float targets) from `train_and_evaluate`, the
  binaries' loop: finite losses, the test evaluation, a checkpoint per step."""
  result = train.train_and_evaluate(_sinusoid(), tmp_path, print_fn=quiet)
  assert result["step"] == 4 and np.isfinite(result["outer/loss"])
  assert np.isfinite(result["test/loss_after"])
  assert checkpoint.all_steps(tmp_path / train.CHECKPOINT_DIR)[-1] == 4


@pytest.mark.slow  # three runs, ~35 s
def test_sinusoid_run_killed_after_a_checkpoint_resumes_to_the_uninterrupted_outputs(
    tmp_path, monkeypatch):
  """Killed after the step-2 checkpoint of 4 steps, rerun: the same outputs bit for bit."""
  def config():
    return _sinusoid(checkpoint_every=2, keep_checkpoints=5, steps_per_call=1)

  reference, resumed = killed_and_resumed(config, tmp_path, monkeypatch, at=2)
  assert resumed == reference
  assert sorted(reference["checkpoints"]) == [2, 4]
  assert np.isfinite(reference["results"]["outer/loss"])


@pytest.mark.slow
def test_omniglot_smoke_trains_and_a_killed_run_resumes_to_the_uninterrupted_outputs(
    tmp_path, monkeypatch, omniglot_dir, omniglot_cache_dir):
  def config():
    return _config("imaml_smoke", data_dir=str(omniglot_dir), cache_dir=str(omniglot_cache_dir),
                   **KILL_AT_2)

  reference = resumes_after_step_2(config, tmp_path, monkeypatch)
  assert 0.0 <= reference["results"]["test/accuracy_after"] <= 1.0
