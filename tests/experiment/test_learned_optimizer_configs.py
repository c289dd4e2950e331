"""The learned inner optimizers (meta_lstm, lstm_optimizer) from the configs."""

from __future__ import annotations

from pathlib import Path

import jax
import pytest

from metajax.experiment import build
from tests.experiment.test_resume import KILL_AT_2, resumes_after_step_2

CONFIGS = Path(__file__).resolve().parents[2] / "experiments" / "configs"
ALGORITHMS = ("meta_lstm", "lstm_optimizer")


def _config(name: str, **overrides):
  config = build.load_config_file(f"{CONFIGS / 'omniglot.py'}:{name}")
  config.update(overrides)
  return config


@pytest.mark.parametrize("name", ["methods_maml", "methods_mamlpp", "methods_meta_lstm",
                                  "methods_lstm_optimizer", "meta_lstm_smoke",
                                  "lstm_optimizer_smoke"])
def test_the_named_configs_validate(name):
  config = _config(name)
  build.validate_config(config)
  assert (config.split, config.shots) == ("kao", 1)
  if not name.endswith("smoke"):
    assert (config.num_steps, config.test_num_tasks, config.zeroing) == (3000, 600, False)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_the_learner_holds_the_optimizer_of_the_config(algorithm):
  config = _config(f"{algorithm}_smoke")
  learner = build.ALGORITHMS[algorithm].learner(build.build_model(config), None, config, 2)
  assert learner.learned_optimizer.name == algorithm and learner.seed == config.seed
  meta = learner.init(build.build_model(config).init(jax.random.key(0)))
  assert set(meta) == {"params", "optimizer"}


def test_bad_fields_are_refused_by_name():
  with pytest.raises(build.ConfigError, match="lstm_hidden=0"):
    build.validate_config(_config("meta_lstm_smoke", lstm_hidden=0))
  with pytest.raises(build.ConfigError, match=r"inner_lr=1.5: meta_lstm starts its input gate "
                                              r"\(a sigmoid\) at inner_lr, which must be in "
                                              r"\(0, 1\)"):
    build.validate_config(_config("meta_lstm_smoke", inner_lr=1.5))


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_a_run_killed_after_a_checkpoint_resumes_to_the_uninterrupted_outputs(
    algorithm, tmp_path, monkeypatch, omniglot_dir, omniglot_cache_dir):
  def config():
    return _config(f"{algorithm}_smoke", data_dir=str(omniglot_dir),
                   cache_dir=str(omniglot_cache_dir), **KILL_AT_2)

  resumes_after_step_2(config, tmp_path, monkeypatch)
