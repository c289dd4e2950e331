"""The metric learners (matching, matching_fce, relation, siamese) from the configs: the named
configs in their papers' settings, the fields' checks, a step on real Omniglot and a killed run
resumed to the uninterrupted outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from metajax.experiment import build, checkpoint, train
from tests.experiment.test_resume import KILL_AT_2, resumes_after_step_2

CONFIGS = Path(__file__).resolve().parents[2] / "experiments" / "configs"
METRIC = ("matching", "matching_fce", "relation", "siamese")
# name -> (algorithm, ways, queries per class) of the papers' Omniglot settings.
NAMED = {"matching5way1shot": ("matching", 5, 15), "matching20way1shot": ("matching", 20, 5),
         "relation5way1shot": ("relation", 5, 19), "relation20way1shot": ("relation", 20, 10),
         "siamese20way1shot": ("siamese", 20, 5)}


def _named(name: str, **overrides):
  config = build.load_config_file(f"{CONFIGS / 'omniglot.py'}:{name}")
  config.update(overrides)
  return config


def _smoke(algorithm: str, **overrides):
  config = build.load_config_file(f"{CONFIGS / 'omniglot.py'}:protonet_smoke")
  config.update(algorithm=algorithm, **overrides)
  return config


@pytest.mark.parametrize("algorithm", METRIC)
def test_configs_validate(algorithm):
  config = _smoke(algorithm)
  build.validate_config(config)  # protonet_smoke trains on more ways than it tests: higher way
  assert config.train_ways > config.ways


@pytest.mark.parametrize("name", NAMED)
def test_named_configs_are_the_papers_settings_and_build(name):
  config = _named(name)
  build.validate_config(config)
  algorithm, ways, queries = NAMED[name]
  assert (config.algorithm, config.ways, config.shots, config.queries) == (algorithm, ways, 1,
                                                                           queries)
  assert config.train_ways == ways and config.split == "finn"  # rotated classes by default
  learner = build.build_learner(config, build.build_model(config))
  assert learner.num_classes == ways


def test_bad_metric_fields_are_refused():
  with pytest.raises(build.ConfigError, match="matching_temperature=0.0 must be a positive"):
    build.validate_config(_smoke("matching", matching_temperature=0.0))
  with pytest.raises(build.ConfigError, match="fce_steps"):
    build.validate_config(_smoke("matching_fce", fce_steps=0))
  with pytest.raises(build.ConfigError, match="matching, matching_fce, relation, siamese"):
    build.validate_config(_smoke("maml"))


def test_stored_configs_without_the_fields_load_with_their_defaults():
  values = _smoke("protonet").to_dict()
  del values["matching_temperature"], values["fce_steps"]
  config = build.config_from_dict(values)
  assert (config.matching_temperature, config.fce_steps) == (1.0, 1)


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", METRIC)
def test_one_step_on_real_omniglot_then_the_test_evaluation(algorithm, omniglot_dir,
                                                           omniglot_cache_dir, omniglot_pool,
                                                           tmp_path):
  del omniglot_pool  # only requested so that the cache is warm
  config = _smoke(algorithm, data_dir=str(omniglot_dir), cache_dir=str(omniglot_cache_dir),
                  eval_every=0, num_steps=1)
  result = train.train_and_evaluate(config, tmp_path, print_fn=lambda _: None)
  assert result["step"] == 1 and np.isfinite(result["outer/loss"])
  assert 0.0 <= result["test/accuracy_after"] <= 1.0
  assert checkpoint.all_steps(tmp_path / train.CHECKPOINT_DIR) == [1]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["matching_smoke", "relation_smoke", "siamese_smoke"])
def test_a_run_killed_after_a_checkpoint_resumes_to_the_uninterrupted_outputs(
    name, tmp_path, monkeypatch, omniglot_dir, omniglot_cache_dir, omniglot_pool):
  del omniglot_pool  # only requested so that the cache is warm

  def config():
    return _named(name, data_dir=str(omniglot_dir), cache_dir=str(omniglot_cache_dir),
                  **KILL_AT_2)

  assert config().algorithm == name.removesuffix("_smoke") and config().train_ways == 10
  resumes_after_step_2(config, tmp_path, monkeypatch)
