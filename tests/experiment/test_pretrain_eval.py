"""`evaluate.py --pretrain_eval`: a pre-trained encoder evaluated another way than its config says,
and the override refused where the run's algorithm does not pre-train."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from metajax.experiment import build, train

CONFIGS = Path(__file__).resolve().parents[2] / "experiments" / "configs"


def _smoke(variant, omniglot_dir, omniglot_cache_dir):
  config = build.load_config_file(f"{CONFIGS / 'omniglot.py'}:{variant}")
  config.update(data_dir=str(omniglot_dir), cache_dir=str(omniglot_cache_dir), eval_every=0,
                num_steps=1, test_num_tasks=0)
  return config


def test_which_algorithms_read_pretrain_eval():
  assert all(build.reads_pretrain_eval(a) for a in ("pretrain", "simclr", "supcon", "byol"))
  assert not any(build.reads_pretrain_eval(a)
                 for a in ("maml", "fomaml", "protonet", "matching", "reptile", "no_such"))


@pytest.mark.slow
def test_a_pretrained_encoder_is_evaluated_by_the_probe_asked_for(omniglot_dir, omniglot_cache_dir,
                                                                 omniglot_pool, tmp_path):
  del omniglot_pool  # only requested so that the cache is warm
  workdir = tmp_path / "simclr"
  train.train_and_evaluate(_smoke("simclr_smoke", omniglot_dir, omniglot_cache_dir), workdir,
                           print_fn=lambda _: None)
  results = {how: train.evaluate_checkpoint(workdir, num_tasks=4, batch_size=4, pretrain_eval=how,
                                            print_fn=lambda _: None)
             for how in (None, "prototypes", "linear_probe")}
  assert results[None]["config"]["pretrain_eval"] == ""  # simclr's default: prototypes
  assert results["linear_probe"]["config"]["pretrain_eval"] == "linear_probe"
  assert results[None]["metrics"] == results["prototypes"]["metrics"]
  after = {how: r["metrics"]["loss_after"]["mean"] for how, r in results.items()}
  assert np.isfinite(after["linear_probe"]) and after["linear_probe"] != after["prototypes"]

  with pytest.raises(build.ConfigError,
                     match="pretrain_eval='prototype' is not one of finetune, linear_probe"):
    train.evaluate_checkpoint(workdir, num_tasks=4, pretrain_eval="prototype")

  maml = tmp_path / "maml"
  train.train_and_evaluate(_smoke("smoke", omniglot_dir, omniglot_cache_dir), maml,
                           print_fn=lambda _: None)
  with pytest.raises(build.ConfigError, match=r"pretrain_eval='linear_probe' applies to the "
                     r"pre-training algorithms \(pretrain, simclr, supcon, byol.*\); the run in .* "
                     r"is algorithm='fomaml'"):
    train.evaluate_checkpoint(maml, num_tasks=4, pretrain_eval="linear_probe")
