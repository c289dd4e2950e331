"""mini-ImageNet configs of the MAML paper (Finn et al. 2017, Table 2; Ravi & Larochelle split).

Conv-4 with 32 filters on 84x84x3 images; 5 inner steps of 0.01 in training, 10 at test; 15
queries per class; meta-batch 4 (1-shot) / 2 (5-shot); Adam 1e-3; 60,000 steps; 600 test tasks.
The data is read from `--config.data_dir` or `$METAJAX_MINIIMAGENET_DIR` (see
`metajax.data.load_miniimagenet` for the accepted layouts).

  5way1shot  48.70 +- 1.84 %
    python experiments/train.py --config=experiments/configs/miniimagenet.py:5way1shot --workdir=runs/mini_5w1s
  5way5shot  63.11 +- 0.92 %
    python experiments/train.py --config=experiments/configs/miniimagenet.py:5way5shot --workdir=runs/mini_5w5s

First-order MAML (`--config.algorithm=fomaml`): 48.07 +- 1.75 and 63.15 +- 0.91 in the paper.

Kao et al., "MAML is a noisy contrastive learner" (their official code's `miniimagenet/train.py`):
the same network, inner SGD 0.01, 5 inner steps in training and 10 at test, Adam 1e-3, meta-batch
4 (1-shot) / 2 (5-shot), 15 queries, second order, evaluated on the test split during training.
Their network applies ReLU before BatchNorm; metajax's Conv-4 applies BatchNorm first.
`num_steps` is the budget of the reproduction queue (their runs: 12 epochs of 2,500 steps).

  kao5way1shot          second order, random head
  kao5way1shot_zeroing  second order, zeroing trick
    python experiments/train.py --config=experiments/configs/miniimagenet.py:kao5way1shot_zeroing --workdir=runs/kao_mini_5w1s_zero
  kao5way5shot          second order, random head
  kao5way5shot_zeroing  second order, zeroing trick

First order: `--config.algorithm=fomaml`.

ResNet-12 (MetaOptNet's backbone, `metajax.nn.resnet`; 64-160-320-640 channels, 640 features,
about 12.4M params) in the MAML paper's settings above (no paper number of its own here). Second
order through 5 inner steps of this network needs a large accelerator: `--config.remat=True`
trades compute for memory, `--config.algorithm=anil` adapts the head only, `=fomaml` is first order.

  resnet12_5way1shot, resnet12_5way5shot
    python experiments/train.py --config=experiments/configs/miniimagenet.py:resnet12_5way1shot --workdir=runs/mini_resnet12_5w1s

MAML++ (Antoniou et al. 2019, Table 2: 5-way 1-shot 52.15 +- 0.26 %; their configs): algorithm
mamlpp, Conv-4 with 48 filters, 5 inner steps of learned per-layer per-step lrs starting at 0.01
(5 at test), multi-step loss annealed over 15 epochs of 500 steps, per-step BatchNorm weights and
biases, meta-batch 2, 15 queries, Adam 1e-3 (their cosine decay ends at 1e-3 too: constant),
50,000 steps.

  mamlpp5way1shot
    python experiments/train.py --config=experiments/configs/miniimagenet.py:mamlpp5way1shot --workdir=runs/mini_mamlpp_5w1s

short: a first look at mini-ImageNet on a CPU: first-order MAML with the zeroing trick in Kao et
  al.'s setting, 300 outer steps, then 200 test tasks with 10 inner steps.
    python experiments/train.py --config=experiments/configs/miniimagenet.py:short --workdir=runs/mini_short
"""

from pathlib import Path
from typing import Callable

import ml_collections

from metajax.experiment import build


def _maml(shots: int) -> ml_collections.ConfigDict:
  c = build.load_config_file(Path(__file__).with_name("default.py"))
  c.dataset, c.image_size, c.model, c.filters = "miniimagenet", 84, "conv4", 32
  c.algorithm, c.ways, c.shots, c.queries = "maml", 5, shots, 15
  c.meta_batch_size = 4 if shots == 1 else 2
  c.num_inner_steps, c.eval_num_inner_steps, c.inner_lr, c.meta_lr = 5, 10, 0.01, 1e-3
  c.num_steps, c.eval_split, c.eval_every, c.eval_num_tasks = 60_000, "val", 1_000, 100
  c.eval_batch_size, c.log_every, c.checkpoint_every = 10, 100, 1_000
  return c


def _kao(shots: int, zeroing: bool) -> ml_collections.ConfigDict:
  c = _maml(shots)
  c.zeroing = zeroing
  c.num_steps, c.eval_split, c.eval_every, c.eval_num_tasks = 5_000, "test", 1_000, 100
  c.log_every, c.checkpoint_every = 50, 250
  return c


def _resnet12(shots: int) -> ml_collections.ConfigDict:
  c = _maml(shots)
  c.model, c.widths = "resnet12", (64, 160, 320, 640)
  return c


def _mamlpp() -> ml_collections.ConfigDict:
  c = _maml(1)
  c.algorithm, c.filters, c.meta_batch_size = "mamlpp", 48, 2
  c.num_inner_steps, c.eval_num_inner_steps, c.inner_lr = 5, 5, 0.01
  c.mamlpp_msl_epochs, c.mamlpp_epoch_steps, c.mamlpp_first_order_epochs = 15, 500, 0
  c.mamlpp_step_lrs, c.mamlpp_step_norm = True, True
  c.num_steps, c.eval_every = 50_000, 500
  return c


def _short() -> ml_collections.ConfigDict:
  c = _kao(1, zeroing=True)
  c.algorithm, c.num_steps, c.eval_every, c.test_num_tasks = "fomaml", 300, 0, 200
  c.log_every, c.checkpoint_every = 25, 100
  return c


VARIANTS: dict[str, Callable[[], ml_collections.ConfigDict]] = {
  "5way1shot": lambda: _maml(1),
  "5way5shot": lambda: _maml(5),
  "kao5way1shot": lambda: _kao(1, zeroing=False),
  "kao5way1shot_zeroing": lambda: _kao(1, zeroing=True),
  "kao5way5shot": lambda: _kao(5, zeroing=False),
  "kao5way5shot_zeroing": lambda: _kao(5, zeroing=True),
  "resnet12_5way1shot": lambda: _resnet12(1),
  "resnet12_5way5shot": lambda: _resnet12(5),
  "mamlpp5way1shot": _mamlpp,
  "short": _short,
}


def get_config(variant: str = "5way1shot") -> ml_collections.ConfigDict:
  return build.get_variant(VARIANTS, variant, "experiments/configs/miniimagenet.py")
