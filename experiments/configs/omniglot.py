"""Omniglot configs: the MAML paper (Finn et al. 2017), Kao et al.'s zeroing trick, smoke, readme.

Pick one with `--config=experiments/configs/omniglot.py:<name>` (the names are the keys of
`VARIANTS`); override any field with `--config.<field>=<value>` (fields and defaults:
`experiments/configs/default.py`). The data is read from `--config.data_dir` or
`$METAJAX_OMNIGLOT_DIR` (the folder of `images_background.zip` and `images_evaluation.zip`), or
downloaded into the user's cache directory with `--config.download=True`.

MAML paper (Table 1; Finn's split with rotations, Conv-4, 600 test tasks, mean +- 95% CI):

  5way1shot   98.7 +- 0.4   python experiments/train.py --config=experiments/configs/omniglot.py:5way1shot --workdir=runs/maml_5w1s
  5way5shot   99.9 +- 0.1   python experiments/train.py --config=experiments/configs/omniglot.py:5way5shot --workdir=runs/maml_5w5s
  20way1shot  95.8 +- 0.3   python experiments/train.py --config=experiments/configs/omniglot.py:20way1shot --workdir=runs/maml_20w1s
  20way5shot  98.9 +- 0.2   python experiments/train.py --config=experiments/configs/omniglot.py:20way5shot --workdir=runs/maml_20w5s

  5-way: 1 inner step of 0.4 in training, 3 at test, meta-batch 32; 20-way: 5 inner steps of 0.1
  in training and at test, meta-batch 16; Adam 1e-3; 60,000 steps. Add `--config.algorithm=fomaml`
  for first-order MAML (98.3 +- 0.5 for 5w1s in the paper), `--config.algorithm=anil` for ANIL,
  `--config.zeroing=True` for the zeroing trick. (Finn's Omniglot network uses strided
  convolutions; `conv4` here uses max-pooling, as the paper's mini-ImageNet network.)

Kao et al., "MAML is a noisy contrastive learner" (kao_conv, split kao without rotations,
meta-batch 32, Adam 1e-3, inner lr 0.4, 2 inner steps in training and 3 at test, 3000 steps):

  kao5way1shot          first-order, random head (their curve ends near 88.6 after 1 test step)
  kao5way1shot_zeroing  first-order, zeroing trick (near 93.8 after 1 test step)
    python experiments/train.py --config=experiments/configs/omniglot.py:kao5way1shot_zeroing --workdir=runs/kao_5w1s_zero --config.eval_num_inner_steps=1
  kao5way5shot          second-order, random head (near 97.3)
  kao5way5shot_zeroing  second-order, zeroing trick (near 97.9)
    python experiments/train.py --config=experiments/configs/omniglot.py:kao5way5shot_zeroing --workdir=runs/kao_5w5s_zero

Reptile (Nichol et al. 2018, Table 1: transductive, 5w1s 97.68 +- 0.04, 5w5s 99.48 +- 0.06):

  reptile5way1shot, reptile5way5shot   Finn's split with rotations, conv4, 5 inner steps of SGD
    0.1 on the support set, outer SGD with step 1.0 on theta - theta' (the paper's meta step,
    not annealed here), meta-batch 5, 100,000 steps, 50 inner steps at test; batch statistics
    make the evaluation transductive, as the paper's number. Differences: the paper adapts with
    Adam (beta1 = 0, lr 1e-3) on mini-batches of 10 drawn from 10 training shots per class;
    here plain SGD on the full support set of the evaluation's shots. `--config.reptile_serial=True`
    for the serial algorithm (one outer update per task).
    python experiments/train.py --config=experiments/configs/omniglot.py:reptile5way1shot --workdir=runs/reptile_5w1s

ProtoNets (Snell et al. 2017, Table 1: 5w1s 98.8, 5w5s 99.7, 20w1s 96.0, 20w5s 98.9), trained on
60-way episodes (`train_ways`, "higher way"), 5 queries per class, Adam 1e-3, conv4 64 filters,
Finn's split with rotations; the paper halves the learning rate every 2,000 episodes (not here):

  protonet5way1shot, protonet5way5shot, protonet20way1shot, protonet20way5shot
    python experiments/train.py --config=experiments/configs/omniglot.py:protonet5way1shot --workdir=runs/protonet_5w1s

Metric learners, trained on episodes of the test's ways (`train_ways` for higher way), Finn's
split with rotations, conv4 64 filters, Adam 1e-3, 20,000 steps of one episode (the papers train
longer: Relation Networks one million episodes):

  matching5way1shot, matching20way1shot   Matching Networks (Vinyals et al. 2016, Table 1:
    5w1s 98.1, 20w1s 93.8): cosine attention over the support set, 15 (5-way) or 5 queries
    per class; `--config.algorithm=matching_fce` adds the full-context embeddings
  relation5way1shot, relation20way1shot   Relation Networks (Sung et al. 2018, Table 1: 5w1s 99.6
    +- 0.2, 20w1s 97.6 +- 0.2): a learned relation module on (class map, query map) pairs,
    squared error to one-hot, 19 (5-way) or 10 queries per class as the paper
  siamese20way1shot   Siamese networks (Koch et al. 2015, 20-way one-shot 92.0): weighted-L1
    verification on the episode's pairs, one-shot by the most similar support image (the paper
    trains on affine-distorted verification pairs of 30 alphabets, here on 20-way episodes)
    python experiments/train.py --config=experiments/configs/omniglot.py:relation5way1shot --workdir=runs/relation_5w1s

UMTRA (Khodadadeh et al. 2019, Omniglot 5w1s 83.80, their MAML-based table): MAML meta-trained on
unlabelled tasks (5 random training images, the support = the image, the query = a random affine
augmentation), evaluated on labelled 5-way 1-shot episodes of the test characters; conv4, 1 inner
step of 0.4 in training and 3 at test, meta-batch 25, Adam 1e-3, 30,000 steps.
Add `--config.zeroing=True` for the zeroing trick.
    python experiments/train.py --config=experiments/configs/omniglot.py:umtra5way1shot --workdir=runs/umtra_5w1s

Pre-training baselines (no paper number of their own here): each step one pooled minibatch of
meta_batch_size x ways classes x (shots + queries) images with global labels, as many images as
an episodic step; Finn's split with rotations, conv4, Adam 1e-3, 30,000 steps.
  pretrain5way1shot  cross-entropy over all 4,400 training classes, then per test task a fresh
                     (zero) 5-way head and 10 fine-tuning steps of 0.1 on the support set
                     (`--config.pretrain_eval=linear_probe`: the head only)
  simclr5way1shot    SimCLR (two affine views, labels unused), then prototypes
  supcon5way1shot    SupCon (labels used), then prototypes (`--config.pretrain_eval=linear_probe`)
  byol5way1shot      BYOL (predictor, EMA target, momentum 0.996 rising to 1), then prototypes
  moco5way1shot      MoCo v2 (momentum 0.999, a queue of 65,536 negatives, temperature 0.2,
                     shuffled BatchNorm in the paper's 8 groups)
  barlow_twins5way1shot  Barlow Twins (lambda 5e-3, projector 8192 wide)
  swav5way1shot      SwAV (3,000 prototypes, 3 Sinkhorn iterations of epsilon 0.05, temperature
                     0.1, prototypes frozen for the first 313 steps; two views, no multi-crop)
    fields: `byol_*`, `moco_*`, `barlow_twins_*`, `swav_*`, and `selfsup_hidden_dim`,
    `selfsup_projection_dim` (0: the paper's widths), see experiments/configs/default.py
    python experiments/train.py --config=experiments/configs/omniglot.py:supcon5way1shot --workdir=runs/supcon_5w1s

MAML++ (Antoniou et al., "How to train your MAML", ICLR 2019; Table 1: 20-way 1-shot 97.65 +-
0.05): algorithm mamlpp (multi-step loss annealed over 10 epochs of 500 steps, per-layer
per-step learned inner lrs starting at 0.1, per-step BatchNorm weights and biases, second order
throughout as their configs), 5 inner steps in training and at test, meta-batch 8, 1 query per
class, conv4 64 filters, Adam 1e-3 with a cosine decay to 1e-5 over 50,000 steps (100 epochs),
Finn's split with rotations. Their code decays the meta lr once per epoch and keeps running
BatchNorm statistics per step; here the decay is per step and BatchNorm uses batch statistics.
`--config.mamlpp_first_order_epochs=N` turns on derivative-order annealing (off in their configs).

  mamlpp20way1shot, mamlpp5way1shot (the same in 5-way)
    python experiments/train.py --config=experiments/configs/omniglot.py:mamlpp20way1shot --workdir=runs/mamlpp_20w1s

Learned inner optimizers (`metajax.algorithms.learned_optimizers`), learned with the
initialisation: meta_lstm (Ravi & Larochelle 2017's meta-learner LSTM; its input gate starts at
inner_lr, its forget gate near 1) and lstm_optimizer (Andrychowicz et al. 2016's coordinate-wise
two-layer LSTM); `--config.lstm_hidden` sets their width (20 as the papers).

Inner-loop methods at one budget: Kao et al.'s 5-way 1-shot setting above (kao split, kao_conv,
2 inner steps in training and 3 at test, inner lr 0.4, meta-batch 32, Adam 1e-3, 3,000 steps),
second order, 600 test tasks: methods_maml, methods_mamlpp (its epochs 100 steps long, the
multi-step loss annealed over the first 1,000 steps, the meta lr decayed to 1e-5),
methods_meta_lstm, methods_lstm_optimizer.
    python experiments/train.py --config=experiments/configs/omniglot.py:methods_mamlpp --workdir=runs/methods_mamlpp

Implicit MAML (Rajeswaran et al., "Meta-Learning with Implicit Gradients", NeurIPS 2019; Table 2,
iMAML with gradient descent: 5w1s 99.16 +- 0.35, 20w1s 94.46 +- 0.42; with a Hessian-free inner
solver 99.50 +- 0.26 and 96.18 +- 0.36): algorithm imaml, the inner problem the support loss plus
lambda/2 |phi - theta|^2 with lambda 2.0, solved by 16 (5-way) or 25 (20-way) gradient steps of
0.1 in training and at test, the meta-gradient by 5 conjugate-gradient steps with damping 1.0
(the reference code's command), conv4 64 filters, Finn's split with rotations, 1 query per class
(the reference's tasks), meta-batch 32 (5-way) or 16 (20-way), Adam 1e-3, 20,000 steps.
Differences: the reference code also divides H by lambda + 10 in the CG system (here by lambda:
`((1 + damping) I + H / lambda) g = grad L_q`) and adapts without the proximal term at test
(here with it, as in training).

  imaml5way1shot, imaml20way1shot
    python experiments/train.py --config=experiments/configs/omniglot.py:imaml5way1shot --workdir=runs/imaml_5w1s

ResNet-12 (MetaOptNet's network, `metajax.nn.resnet`) at the narrower widths 16-32-64-128 for the
28x28 characters, in the MAML paper's 5-way settings above (no paper number of its own here):

  resnet12_5way1shot, resnet12_5way5shot
    python experiments/train.py --config=experiments/configs/omniglot.py:resnet12_5way1shot --workdir=runs/resnet12_5w1s
  `--config.widths=(64,160,320,640)` for the full width; any algorithm with `--config.algorithm`.

meta_lstm_smoke, lstm_optimizer_smoke: 2 steps of each learned optimizer.
imaml_smoke: 2 steps of implicit MAML (2 inner steps, 5 CG steps).
mamlpp_smoke: 3 steps of MAML++ with every option on, its schedules shortened to 1-step epochs.
matching_smoke, relation_smoke, siamese_smoke: 2 steps of each metric learner (10-way training
episodes, 5-way tests).
byol_smoke, moco_smoke, barlow_twins_smoke, swav_smoke: 2 steps of each self-supervised
objective with a 16-8 projector (MoCo: a queue of 64; SwAV: 10 prototypes, frozen for 1 step).
reptile_smoke, protonet_smoke, umtra_smoke, pretrain_smoke, simclr_smoke, supcon_smoke,
resnet12_smoke: 2 steps of a tiny model (serial Reptile; ProtoNet with 10-way training episodes;
UMTRA with the zeroing trick; ResNet-12 at widths 4-4-8-8), for CI.

smoke: 2 steps of a tiny model on real Omniglot (CI):
    python experiments/train.py --config=experiments/configs/omniglot.py:smoke --workdir=/tmp/smoke

readme: the README's quick start: first-order MAML with the zeroing trick, kao_conv, 5-way 1-shot,
1 inner step (3 at test), meta-batch 16, 300 steps, then 600 tasks of the 423 held-out characters:
    python experiments/train.py --config=experiments/configs/omniglot.py:readme --workdir=/tmp/metajax_readme
  about a minute on a 2-core CPU once the archives are preprocessed (the first run does that);
  test accuracy 85.43 +- 0.84 % (chance 20 %) on a 2-core AMD EPYC with AVX-512 (float32
  rounding differs across CPUs in the last digits). `--config.zeroing=False` runs the same
  without the zeroing trick.
"""

from pathlib import Path
from typing import Any, Callable

import ml_collections

from metajax.algorithms.selfsup_pretrain import MOCO_SHUFFLE_GROUPS
from metajax.experiment import build


def _maml(ways: int, shots: int) -> ml_collections.ConfigDict:
  c = build.load_config_file(Path(__file__).with_name("default.py"))
  c.dataset, c.split, c.model, c.filters = "omniglot", "finn", "conv4", 64
  c.ways, c.shots, c.queries = ways, shots, 15
  if ways == 5:
    c.meta_batch_size, c.inner_lr, c.num_inner_steps, c.eval_num_inner_steps = 32, 0.4, 1, 3
  else:
    c.meta_batch_size, c.inner_lr, c.num_inner_steps, c.eval_num_inner_steps = 16, 0.1, 5, 5
  c.meta_lr, c.num_steps = 1e-3, 60_000
  c.eval_split, c.eval_every, c.eval_num_tasks = "val", 1_000, 100
  return c


def _kao(shots: int, zeroing: bool) -> ml_collections.ConfigDict:
  c = _maml(5, shots)
  c.split, c.rotations, c.model = "kao", False, "kao_conv"
  c.algorithm = "fomaml" if shots == 1 else "maml"
  c.zeroing = zeroing
  c.num_inner_steps, c.eval_num_inner_steps, c.inner_lr = 2, 3, 0.4
  c.num_steps, c.eval_split, c.eval_every, c.eval_num_tasks = 3_000, "test", 250, 100
  c.checkpoint_every, c.log_every = 250, 50
  return c


def _reptile(shots: int) -> ml_collections.ConfigDict:
  c = _maml(5, shots)
  c.algorithm, c.reptile_serial = "reptile", False
  c.num_inner_steps, c.inner_lr, c.eval_num_inner_steps = 5, 0.1, 50
  c.optimizer, c.meta_lr, c.meta_batch_size, c.num_steps = "sgd", 1.0, 5, 100_000
  return c


def _protonet(ways: int, shots: int) -> ml_collections.ConfigDict:
  c = _maml(ways, shots)
  c.algorithm, c.train_ways, c.queries = "protonet", 60, 5
  c.meta_batch_size, c.meta_lr, c.num_steps = 1, 1e-3, 20_000
  c.test_num_tasks = 1_000
  return c


def _metric(algorithm: str, ways: int, queries: int) -> ml_collections.ConfigDict:
  c = _protonet(ways, 1)
  c.algorithm, c.train_ways, c.queries = algorithm, ways, queries
  return c


def _umtra() -> ml_collections.ConfigDict:
  c = _maml(5, 1)
  c.algorithm = "umtra"
  c.meta_batch_size, c.num_inner_steps, c.inner_lr, c.eval_num_inner_steps = 25, 1, 0.4, 3
  c.num_steps = 30_000
  return c


def _pretrain(algorithm: str, **overrides: Any) -> ml_collections.ConfigDict:
  c = _maml(5, 1)
  c.algorithm, c.meta_batch_size, c.queries, c.num_steps = algorithm, 32, 15, 30_000
  c.num_inner_steps, c.eval_num_inner_steps, c.inner_lr = 10, 10, 0.1
  c.update(overrides)
  return c


# The self-supervised smoke configs' narrow projector (the papers' are 2048 to 8192 wide).
_SELFSUP_SMOKE = {"selfsup_hidden_dim": 16, "selfsup_projection_dim": 8}


def _resnet12(ways: int, shots: int) -> ml_collections.ConfigDict:
  c = _maml(ways, shots)
  c.model, c.widths = "resnet12", (16, 32, 64, 128)
  return c


def _mamlpp(ways: int) -> ml_collections.ConfigDict:
  c = _maml(ways, 1)
  c.algorithm, c.queries, c.meta_batch_size = "mamlpp", 1, 8
  c.num_inner_steps, c.eval_num_inner_steps, c.inner_lr = 5, 5, 0.1
  c.mamlpp_msl_epochs, c.mamlpp_epoch_steps, c.mamlpp_first_order_epochs = 10, 500, 0
  c.mamlpp_step_lrs, c.mamlpp_step_norm = True, True
  c.num_steps, c.meta_lr, c.meta_lr_schedule, c.min_meta_lr = 50_000, 1e-3, "cosine", 1e-5
  c.eval_every, c.eval_num_tasks, c.test_num_tasks = 500, 100, 600
  return c


def _imaml(ways: int) -> ml_collections.ConfigDict:
  c = _maml(ways, 1)
  c.algorithm, c.queries, c.meta_batch_size = "imaml", 1, 32 if ways == 5 else 16
  c.num_inner_steps = c.eval_num_inner_steps = 16 if ways == 5 else 25
  c.inner_lr, c.imaml_lambda, c.imaml_cg_steps, c.imaml_cg_damping = 0.1, 2.0, 5, 1.0
  c.num_steps, c.test_num_tasks = 20_000, 600
  return c


def _method(algorithm: str) -> ml_collections.ConfigDict:
  c = _kao(1, zeroing=False)
  c.algorithm, c.test_num_tasks = algorithm, 600
  if algorithm == "mamlpp":
    c.mamlpp_epoch_steps, c.mamlpp_msl_epochs = 100, 10
    c.meta_lr_schedule, c.min_meta_lr = "cosine", 1e-5
  return c


def _smoke(c: ml_collections.ConfigDict, **overrides: Any) -> ml_collections.ConfigDict:
  """Two steps of a tiny Kao et al. network on real Omniglot, evaluated on 4 test tasks."""
  c.split, c.rotations, c.model = "kao", False, "kao_conv"
  c.filters, c.queries, c.meta_batch_size = 8, 2, 2
  c.num_steps, c.eval_every, c.eval_num_tasks, c.test_num_tasks = 2, 2, 4, 4
  c.eval_split, c.log_every, c.checkpoint_every, c.eval_batch_size = "test", 1, 1, 4
  c.num_inner_steps, c.eval_num_inner_steps = min(c.num_inner_steps, 2), 2
  c.update(overrides)
  return c


def _readme() -> ml_collections.ConfigDict:
  c = _kao(1, True)  # first-order MAML with the zeroing trick
  c.num_inner_steps, c.eval_num_inner_steps = 1, 3
  c.meta_batch_size, c.queries = 16, 5
  c.num_steps, c.eval_every, c.log_every, c.checkpoint_every = 300, 0, 25, 100
  c.test_num_tasks, c.eval_batch_size = 600, 10
  return c


VARIANTS: dict[str, Callable[[], ml_collections.ConfigDict]] = {
  # Finn et al. 2017
  "5way1shot": lambda: _maml(5, 1),
  "5way5shot": lambda: _maml(5, 5),
  "20way1shot": lambda: _maml(20, 1),
  "20way5shot": lambda: _maml(20, 5),
  # Kao et al.
  "kao5way1shot": lambda: _kao(1, zeroing=False),
  "kao5way1shot_zeroing": lambda: _kao(1, zeroing=True),
  "kao5way5shot": lambda: _kao(5, zeroing=False),
  "kao5way5shot_zeroing": lambda: _kao(5, zeroing=True),
  # Nichol et al. 2018
  "reptile5way1shot": lambda: _reptile(1),
  "reptile5way5shot": lambda: _reptile(5),
  # Snell et al. 2017
  "protonet5way1shot": lambda: _protonet(5, 1),
  "protonet5way5shot": lambda: _protonet(5, 5),
  "protonet20way1shot": lambda: _protonet(20, 1),
  "protonet20way5shot": lambda: _protonet(20, 5),
  # Vinyals et al. 2016, Sung et al. 2018, Koch et al. 2015
  "matching5way1shot": lambda: _metric("matching", 5, 15),
  "matching20way1shot": lambda: _metric("matching", 20, 5),
  "relation5way1shot": lambda: _metric("relation", 5, 19),
  "relation20way1shot": lambda: _metric("relation", 20, 10),
  "siamese20way1shot": lambda: _metric("siamese", 20, 5),
  # Khodadadeh et al. 2019
  "umtra5way1shot": _umtra,
  # Antoniou et al. 2019
  "mamlpp20way1shot": lambda: _mamlpp(20),
  "mamlpp5way1shot": lambda: _mamlpp(5),
  # Rajeswaran et al. 2019
  "imaml5way1shot": lambda: _imaml(5),
  "imaml20way1shot": lambda: _imaml(20),
  # ResNet-12 (Lee et al. 2019's backbone), narrower
  "resnet12_5way1shot": lambda: _resnet12(5, 1),
  "resnet12_5way5shot": lambda: _resnet12(5, 5),
  # pre-training baselines
  "pretrain5way1shot": lambda: _pretrain("pretrain"),
  "simclr5way1shot": lambda: _pretrain("simclr"),
  "supcon5way1shot": lambda: _pretrain("supcon"),
  "byol5way1shot": lambda: _pretrain("byol"),
  "moco5way1shot": lambda: _pretrain("moco", moco_shuffle_groups=MOCO_SHUFFLE_GROUPS),
  "barlow_twins5way1shot": lambda: _pretrain("barlow_twins"),
  "swav5way1shot": lambda: _pretrain("swav"),
  # CI (smoke keeps Kao et al.'s 3 test steps)
  "smoke": lambda: _smoke(_kao(1, zeroing=False), eval_num_inner_steps=3),
  "methods_maml": lambda: _method("maml"),
  "methods_mamlpp": lambda: _method("mamlpp"),
  "methods_meta_lstm": lambda: _method("meta_lstm"),
  "methods_lstm_optimizer": lambda: _method("lstm_optimizer"),
  "meta_lstm_smoke": lambda: _smoke(_method("meta_lstm"), lstm_hidden=4),
  "lstm_optimizer_smoke": lambda: _smoke(_method("lstm_optimizer"), lstm_hidden=4),
  "imaml_smoke": lambda: _smoke(_imaml(5)),
  "mamlpp_smoke": lambda: _smoke(_mamlpp(5), num_steps=3, eval_every=3, mamlpp_epoch_steps=1,
                                 mamlpp_msl_epochs=2, mamlpp_first_order_epochs=1),
  "reptile_smoke": lambda: _smoke(_reptile(1), reptile_serial=True),
  "protonet_smoke": lambda: _smoke(_protonet(5, 1), train_ways=10),
  "matching_smoke": lambda: _smoke(_metric("matching", 5, 15), train_ways=10),
  "relation_smoke": lambda: _smoke(_metric("relation", 5, 19), train_ways=10),
  "siamese_smoke": lambda: _smoke(_metric("siamese", 20, 5), ways=5, train_ways=10),
  "umtra_smoke": lambda: _smoke(_umtra(), zeroing=True),
  "pretrain_smoke": lambda: _smoke(_pretrain("pretrain")),
  "simclr_smoke": lambda: _smoke(_pretrain("simclr")),
  "supcon_smoke": lambda: _smoke(_pretrain("supcon")),
  "byol_smoke": lambda: _smoke(_pretrain("byol"), **_SELFSUP_SMOKE),
  "moco_smoke": lambda: _smoke(_pretrain("moco"), moco_queue_size=64, moco_shuffle_groups=2,
                               **_SELFSUP_SMOKE),
  "barlow_twins_smoke": lambda: _smoke(_pretrain("barlow_twins"), **_SELFSUP_SMOKE),
  "swav_smoke": lambda: _smoke(_pretrain("swav"), swav_num_prototypes=10, swav_freeze_steps=1,
                               **_SELFSUP_SMOKE),
  "resnet12_smoke": lambda: _smoke(_resnet12(5, 1), model="resnet12", widths=(4, 4, 8, 8)),
  # the README's quick start
  "readme": _readme,
}


def get_config(variant: str = "5way1shot") -> ml_collections.ConfigDict:
  return build.get_variant(VARIANTS, variant, "experiments/configs/omniglot.py")
