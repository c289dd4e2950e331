"""experiments/configs/miniimagenet.py: Kao et al.'s setting and the short config."""

from __future__ import annotations

from pathlib import Path

import pytest

from metajax.experiment import build

CONFIGS = Path(__file__).resolve().parents[2] / "experiments" / "configs" / "miniimagenet.py"


def _load(variant: str):
  return build.load_config_file(f"{CONFIGS}:{variant}")


@pytest.mark.parametrize("shots, batch", [(1, 4), (5, 2)])
@pytest.mark.parametrize("zeroing", [False, True])
def test_kao_configs_follow_their_official_script(shots, batch, zeroing):
  c = _load(f"kao5way{shots}shot" + ("_zeroing" if zeroing else ""))
  build.validate_config(c)
  assert (c.dataset, c.image_size, c.model, c.filters) == ("miniimagenet", 84, "conv4", 32)
  assert (c.ways, c.shots, c.queries, c.meta_batch_size) == (5, shots, 15, batch)
  assert (c.inner_lr, c.meta_lr, c.num_inner_steps, c.eval_num_inner_steps) == (0.01, 1e-3, 5, 10)
  assert (c.algorithm, c.zeroing, c.eval_split) == ("maml", zeroing, "test")


def test_short_config_is_valid_and_short():
  c = _load("short")
  build.validate_config(c)
  assert (c.algorithm, c.zeroing, c.num_steps, c.test_num_tasks) == ("fomaml", True, 300, 200)
