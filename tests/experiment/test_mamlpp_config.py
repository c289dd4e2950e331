"""MAML++ from the configs: its named configs, its fields' checks, and a killed run resumed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from metajax.experiment import build
from tests.experiment.test_resume import KILL_AT_2, resumes_after_step_2

CONFIGS = Path(__file__).resolve().parents[2] / "experiments" / "configs"


def _config(name: str, file: str = "omniglot.py", **overrides):
  config = build.load_config_file(f"{CONFIGS / file}:{name}")
  config.update(overrides)
  return config


@pytest.mark.parametrize("name,file", [("mamlpp20way1shot", "omniglot.py"),
                                       ("mamlpp5way1shot", "omniglot.py"),
                                       ("mamlpp_smoke", "omniglot.py"),
                                       ("mamlpp5way1shot", "miniimagenet.py")])
def test_the_named_configs_validate_and_build_their_learner(name, file):
  config = _config(name, file)
  build.validate_config(config)
  learner = build.ALGORITHMS["mamlpp"].learner(build.build_model(config), None, config,
                                               config.num_inner_steps)
  assert learner.learn_inner_lr == "step" and learner.per_step_params is not None
  assert callable(learner.step_loss_weights) and learner.first_order_steps == (
    config.mamlpp_first_order_epochs * config.mamlpp_epoch_steps)


def test_the_papers_settings():
  config = _config("mamlpp20way1shot")
  assert (config.ways, config.shots, config.queries, config.meta_batch_size) == (20, 1, 1, 8)
  assert (config.num_inner_steps, config.inner_lr, config.num_steps) == (5, 0.1, 50_000)
  assert (config.mamlpp_msl_epochs, config.mamlpp_epoch_steps) == (10, 500)
  schedule = build.meta_lr_schedule(config)
  np.testing.assert_allclose([schedule(0), schedule(25_000), schedule(50_000)],
                             [1e-3, (1e-3 + 1e-5) / 2, 1e-5], rtol=1e-5)


@pytest.mark.parametrize("overrides,message", [
  ({"algorithm": "maml"}, "mamlpp_msl_epochs only apply to algorithm='mamlpp', not "
                          "algorithm='maml'"),
  ({"mamlpp_epoch_steps": 0}, "mamlpp_epoch_steps=0"),
  ({"mamlpp_first_order_epochs": -1}, "mamlpp_first_order_epochs=-1"),
  ({"model": "mlp"}, "mamlpp_step_norm=True needs a model with BatchNorm"),
  ({"meta_lr_schedule": "linear"}, "meta_lr_schedule='linear' is not one of constant, cosine"),
  ({"min_meta_lr": 0.1}, r"min_meta_lr=0.1 must be a number in \[0, meta_lr=0.001\]"),
])
def test_bad_fields_are_refused_by_name(overrides, message):
  config = _config("mamlpp_smoke", mamlpp_msl_epochs=3, **overrides)
  with pytest.raises(build.ConfigError, match=message):
    build.validate_config(config)


def test_stored_configs_without_the_fields_load_as_they_ran():
  values = _config("readme").to_dict()
  for field in ("meta_lr_schedule", "min_meta_lr", "mamlpp_msl_epochs", "mamlpp_epoch_steps",
                "mamlpp_first_order_epochs", "mamlpp_step_lrs", "mamlpp_step_norm"):
    del values[field]
  config = build.config_from_dict(values)
  build.validate_config(config)
  assert config.meta_lr_schedule == "constant" and build.meta_lr_schedule(config) == 1e-3


@pytest.mark.slow
def test_a_run_killed_after_a_checkpoint_resumes_to_the_uninterrupted_outputs(
    tmp_path, monkeypatch, omniglot_dir, omniglot_cache_dir):
  def config():
    # 4 steps: first order at step 0, the multi-step loss annealed over steps 0-1.
    return _config("mamlpp_smoke", data_dir=str(omniglot_dir), cache_dir=str(omniglot_cache_dir),
                   **KILL_AT_2)

  resumes_after_step_2(config, tmp_path, monkeypatch)
