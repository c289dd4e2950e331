"""The self-supervised pre-training objectives from the configs (`--config.algorithm=byol`,
`moco`, `barlow_twins`, `swav`): named configs, their fields' checks, one step of each as the loop
builds it, and the smoke configs trained and resumed bit-exactly from the loop."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest

from metajax.algorithms import selfsup_pretrain
from metajax.experiment import build
from tests.experiment.test_resume import KILL_AT_2, resumes_after_step_2

CONFIGS = Path(__file__).resolve().parents[2] / "experiments" / "configs"
ALGORITHMS = ("byol", "moco", "barlow_twins", "swav")


def _config(name: str, **overrides):
  config = build.load_config_file(f"{CONFIGS / 'omniglot.py'}:{name}")
  config.update(overrides)
  return config


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_the_named_configs_validate_and_evaluate_the_online_encoder(algorithm):
  for name in (f"{algorithm}5way1shot", f"{algorithm}_smoke"):
    config = _config(name)
    assert config.algorithm == algorithm
    build.validate_config(config)
    assert build.reads_pretrain_eval(algorithm)
    learner = build.build_learner(config, build.build_model(config))
    assert learner.params_transforms[0] is selfsup_pretrain.online_encoder


def test_the_papers_settings():
  full = {a: _config(f"{a}5way1shot") for a in ALGORITHMS}
  assert full["byol"].byol_base_momentum == 0.996
  assert (full["moco"].moco_momentum, full["moco"].moco_queue_size,
          full["moco"].moco_temperature, full["moco"].moco_shuffle_groups) == (0.999, 65536, 0.2, 8)
  assert full["barlow_twins"].barlow_twins_lambda == 5e-3
  swav = full["swav"]
  assert (swav.swav_num_prototypes, swav.swav_temperature, swav.swav_epsilon,
          swav.swav_sinkhorn_iters, swav.swav_freeze_steps) == (3000, 0.1, 0.05, 3, 313)
  assert swav.swav_small_crops == 0  # two views: multi-crop is an option
  for config in full.values():
    assert (config.selfsup_hidden_dim, config.selfsup_projection_dim) == (0, 0)  # the papers'
    assert (config.split, config.model, config.ways, config.shots) == ("finn", "conv4", 5, 1)


@pytest.mark.parametrize("overrides,message", [
  ({"algorithm": "simclr"}, "moco_queue_size, moco_shuffle_groups only apply to "
                            "algorithm='moco', not algorithm='simclr'"),
  ({"algorithm": "byol"}, "moco_queue_size, moco_shuffle_groups only apply to algorithm='moco', "
                          "not algorithm='byol'"),
  ({"algorithm": "maml"}, "selfsup_hidden_dim, selfsup_projection_dim only apply to "
                          "algorithm='byol' or 'moco' or 'barlow_twins' or 'swav', not "
                          "algorithm='maml'"),
  ({"moco_momentum": 1.5}, r"moco_momentum=1.5 must be a number in \[0.0, 1.0\]"),
  ({"moco_temperature": 0.0}, "moco_temperature=0.0 must be a number > 0.0"),
  ({"moco_queue_size": 29}, r"moco_queue_size=29 is less than the 30 keys each step enqueues "
                            r"\(meta_batch_size \* ways \* \(shots \+ queries\)\)"),
  ({"moco_queue_size": 0}, "moco_queue_size=0 must be an int >= 1"),
  ({"moco_shuffle_groups": 0}, "moco_shuffle_groups=0 must be an int >= 1"),
  ({"moco_shuffle_groups": 4}, r"moco_shuffle_groups=4 must divide the 30 images of each view "
                               r"\(meta_batch_size \* ways \* \(shots \+ queries\)\)"),
  ({"selfsup_hidden_dim": -1}, "selfsup_hidden_dim=-1 must be an int >= 0"),
  ({"swav_temperature": 0.3}, "swav_temperature only apply to algorithm='swav', not "
                              "algorithm='moco'"),
])
def test_bad_moco_fields_are_refused_by_name(overrides, message):
  with pytest.raises(build.ConfigError, match=message):
    build.validate_config(_config("moco_smoke", **overrides))


@pytest.mark.parametrize("overrides,message", [
  ({"swav_epsilon": 0.0}, "swav_epsilon=0.0 must be a number > 0.0"),
  ({"swav_sinkhorn_iters": 0}, "swav_sinkhorn_iters=0 must be an int >= 1"),
  ({"swav_freeze_steps": -1}, "swav_freeze_steps=-1 must be an int >= 0"),
  ({"swav_small_crops": -1}, "swav_small_crops=-1 must be an int >= 0"),
  ({"swav_num_prototypes": 0}, "swav_num_prototypes=0 must be an int >= 1"),
  ({"barlow_twins_lambda": 0.1}, "barlow_twins_lambda only apply to algorithm='barlow_twins', "
                                 "not algorithm='swav'"),
  ({"byol_base_momentum": 0.99}, "byol_base_momentum only apply to algorithm='byol', not "
                                 "algorithm='swav'"),
])
def test_bad_swav_fields_are_refused_by_name(overrides, message):
  with pytest.raises(build.ConfigError, match=message):
    build.validate_config(_config("swav_smoke", **overrides))


def test_bad_byol_and_barlow_twins_fields_are_refused_by_name():
  with pytest.raises(build.ConfigError, match="byol_base_momentum=-0.1 must be a number in"):
    build.validate_config(_config("byol_smoke", byol_base_momentum=-0.1))
  with pytest.raises(build.ConfigError, match="barlow_twins_lambda=-1.0 must be a number >= 0"):
    build.validate_config(_config("barlow_twins_smoke", barlow_twins_lambda=-1.0))


def test_stored_configs_without_the_fields_load_as_they_ran():
  values = _config("simclr_smoke").to_dict()
  for field in build.SELFSUP_DEFAULTS:
    del values[field]
  config = build.config_from_dict(values)
  build.validate_config(config)
  assert {f: config[f] for f in build.SELFSUP_DEFAULTS} == dict(build.SELFSUP_DEFAULTS)


def _one_step(config):
  """The loop's step of `config` on a random batch shaped as `_class_batches` gives."""
  model = build.build_model(config)
  step = build.build_meta_step(config, model, build.build_learner(config, model))
  n = config.ways * (config.shots + config.queries)
  rng = np.random.default_rng(0)
  x = rng.uniform(size=(config.meta_batch_size, n, *model.input_shape)).astype(np.float32)
  y = np.tile(np.repeat(np.arange(config.ways), config.shots + config.queries),
              (config.meta_batch_size, 1)).astype(np.int32)
  state = step.init(jax.jit(model.init)(jax.random.key(config.seed)))
  return step.step(state, (x, y))


@pytest.mark.slow  # compiling a Conv-4 step: about 15 s each on 2 busy cores
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_one_step_of_the_smoke_config(algorithm):
  """The smoke config's step as the loop builds it (pooled minibatch, the config's fields)."""
  config = _config(f"{algorithm}_smoke")
  state, metrics = _one_step(config)
  assert int(state.step) == 1 and np.isfinite(metrics["outer/loss"])
  params = state.params
  projector = params["online"]["projector"]
  assert projector["hidden"]["w"].shape[1] == config.selfsup_hidden_dim
  assert projector["out"]["w"].shape[1] == config.selfsup_projection_dim
  if algorithm == "moco":
    batch = config.meta_batch_size * config.ways * (config.shots + config.queries)
    assert params["queue"]["keys"].shape == (config.moco_queue_size, config.selfsup_projection_dim)
    assert int(params["queue"]["ptr"]) == batch
  if algorithm == "swav":
    assert params["online"]["prototypes"].shape == (config.swav_num_prototypes,
                                                    config.selfsup_projection_dim)
  if algorithm == "byol":
    np.testing.assert_allclose(metrics["outer/momentum"], config.byol_base_momentum, rtol=1e-6)


@pytest.mark.slow  # about 20 s on 2 busy cores
def test_one_step_of_swav_with_small_crops():
  config = _config("swav_smoke", swav_small_crops=2)
  build.validate_config(config)
  state, metrics = _one_step(config)
  assert int(state.step) == 1 and np.isfinite(metrics["outer/loss"])


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_smoke_trains_and_a_killed_run_resumes_to_the_uninterrupted_outputs(
    algorithm, tmp_path, monkeypatch, omniglot_dir, omniglot_cache_dir):
  """4 steps of the smoke config from `train_and_evaluate` (the binaries' loop), killed after the
  step-2 checkpoint and rerun: the same outputs bit for bit (the queue, prototypes and momentum
  networks are checkpointed with the rest)."""
  def config():
    return _config(f"{algorithm}_smoke", data_dir=str(omniglot_dir),
                   cache_dir=str(omniglot_cache_dir), **KILL_AT_2)

  reference = resumes_after_step_2(config, tmp_path, monkeypatch)
  assert np.isfinite(reference["results"]["outer/loss"])
  assert 0.0 <= reference["results"]["test/accuracy_after"] <= 1.0
  state = reference["checkpoints"][4]["state"]
  expected = {"byol": "meta/params/target/", "moco": "meta/params/queue/ptr",
              "barlow_twins": "meta/params/online/projector/", "swav": "meta/params/online/prototypes"}
  assert any(k.startswith(expected[algorithm]) for k in state), sorted(state)
