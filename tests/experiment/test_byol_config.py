"""BYOL pre-training from the configs (`--config.algorithm=byol`), then few-shot evaluation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from metajax.experiment import build, checkpoint, train

CONFIGS = Path(__file__).resolve().parents[2] / "experiments" / "configs"


def _smoke(**overrides):
  config = build.load_config_file(f"{CONFIGS / 'omniglot.py'}:simclr_smoke")
  config.update(algorithm="byol", **overrides)
  return config


def test_config_validates_and_refuses_regression():
  build.validate_config(_smoke())
  sinusoid = build.load_config_file(f"{CONFIGS / 'sinusoid.py'}:smoke")
  sinusoid.algorithm = "byol"
  with pytest.raises(build.ConfigError, match="algorithm='byol' needs a classification"):
    build.validate_config(sinusoid)


@pytest.mark.slow
def test_two_steps_on_real_omniglot_then_the_test_evaluation(omniglot_dir, omniglot_cache_dir,
                                                             omniglot_pool, tmp_path):
  del omniglot_pool  # only requested so that the cache is warm
  config = _smoke(data_dir=str(omniglot_dir), cache_dir=str(omniglot_cache_dir), eval_every=0,
                  num_steps=2, steps_per_call=1, checkpoint_every=1, log_every=1)
  result = train.train_and_evaluate(config, tmp_path, print_fn=lambda _: None)
  assert result["step"] == 2 and np.isfinite(result["outer/loss"])
  assert 0.0 <= result["test/accuracy_after"] <= 1.0
  state, _, _ = checkpoint.read_latest(tmp_path / train.CHECKPOINT_DIR)
  params = state["meta"]["params"]
  assert set(params) == {"online", "target"}  # the EMA target is part of the checkpointed state
