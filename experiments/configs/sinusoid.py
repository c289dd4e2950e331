"""Sinusoid regression (Finn et al. 2017, section 5.1; Figure 2).

Tasks: y = A sin(x - phase), A ~ U[0.1, 5], phase ~ U[0, pi], x ~ U[-5, 5]; K = 10 support and 10
query points. Model: MLP 1 -> 40 -> 40 -> 1 (ReLU); MSE; 1 inner step of 0.01; Adam 1e-3;
meta-batch 25; 70,000 steps. The paper reports curves, not a number: after 1 gradient step MAML's
fitted curve follows the true sinusoid, and the loss keeps falling over 10 test steps (Figure 3).

    python experiments/train.py --config=experiments/configs/sinusoid.py --workdir=runs/sinusoid
    python experiments/train.py --config=experiments/configs/sinusoid.py:smoke --workdir=/tmp/sin

Variants: `default` (the paper), `smoke` (a few steps, for tests and CI).
"""

from pathlib import Path
from typing import Callable

import ml_collections

from metajax.experiment import build


def _paper() -> ml_collections.ConfigDict:
  c = build.load_config_file(Path(__file__).with_name("default.py"))
  c.dataset, c.model, c.hidden, c.loss = "sinusoid", "mlp", (40, 40), "mse"
  c.algorithm, c.zeroing = "maml", False
  c.shots, c.queries, c.meta_batch_size = 10, 10, 25
  c.num_inner_steps, c.eval_num_inner_steps, c.inner_lr, c.meta_lr = 1, 10, 0.01, 1e-3
  c.num_steps, c.eval_every, c.eval_split, c.eval_num_tasks = 70_000, 1_000, "test", 100
  c.log_every, c.checkpoint_every = 100, 1_000
  return c


def _smoke() -> ml_collections.ConfigDict:
  c = _paper()
  c.hidden, c.meta_batch_size = (8, 8), 4
  c.num_steps, c.eval_every, c.eval_num_tasks, c.test_num_tasks = 4, 2, 4, 4
  c.log_every, c.checkpoint_every, c.eval_batch_size, c.eval_num_inner_steps = 1, 1, 4, 2
  return c


VARIANTS: dict[str, Callable[[], ml_collections.ConfigDict]] = {"default": _paper,
                                                                "smoke": _smoke}


def get_config(variant: str = "default") -> ml_collections.ConfigDict:
  return build.get_variant(VARIANTS, variant, "experiments/configs/sinusoid.py")
