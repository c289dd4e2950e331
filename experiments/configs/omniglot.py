"""Omniglot configs: the MAML paper (Finn et al. 2017), Kao et al.'s zeroing trick, smoke, readme.

Pick one with `--config=experiments/configs/omniglot.py:<name>`; override any field with
`--config.<field>=<value>` (fields: `metajax.experiment.build.default_config`). The data is read from
`--config.data_dir` or `$METAJAX_OMNIGLOT_DIR` (the folder of `images_background.zip` and
`images_evaluation.zip`).

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
    python experiments/train.py --config=experiments/configs/omniglot.py:supcon5way1shot --workdir=runs/supcon_5w1s

reptile_smoke, protonet_smoke, umtra_smoke, pretrain_smoke, simclr_smoke, supcon_smoke: 2 steps of a tiny model (serial Reptile; ProtoNet with
10-way training episodes; UMTRA with the zeroing trick), for CI.

smoke: 2 steps of a tiny model on real Omniglot (CI):
    python experiments/train.py --config=experiments/configs/omniglot.py:smoke --workdir=/tmp/smoke

readme: the README's quick start: first-order MAML with the zeroing trick, kao_conv, 5-way 1-shot,
1 inner step (3 at test), meta-batch 16, 300 steps, then 600 tasks of the 423 held-out characters:
    python experiments/train.py --config=experiments/configs/omniglot.py:readme --workdir=/tmp/metajax_readme
  measured on a shared 2-core CPU (load average ~9), first run, preprocessing included: 2m34s
  wall (84 s of CPU), test accuracy 85.52 +- 0.83 % (chance 20 %); without the zeroing trick
  (`--config.zeroing=False`) the same run gives 72.95 +- 1.04 %.
"""

from metajax.experiment.build import default_config

VARIANTS = ("5way1shot", "5way5shot", "20way1shot", "20way5shot", "kao5way1shot",
            "kao5way1shot_zeroing", "kao5way5shot", "kao5way5shot_zeroing", "reptile5way1shot",
            "reptile5way5shot", "protonet5way1shot", "protonet5way5shot", "protonet20way1shot",
            "protonet20way5shot", "umtra5way1shot", "smoke", "reptile_smoke", "protonet_smoke",
            "umtra_smoke", "pretrain5way1shot", "simclr5way1shot", "supcon5way1shot",
            "pretrain_smoke", "simclr_smoke", "supcon_smoke", "readme")


def _maml(ways: int, shots: int):
  c = default_config()
  c.dataset, c.split, c.model, c.filters = "omniglot", "finn", "conv4", 64
  c.ways, c.shots, c.queries = ways, shots, 15
  if ways == 5:
    c.meta_batch_size, c.inner_lr, c.num_inner_steps, c.eval_num_inner_steps = 32, 0.4, 1, 3
  else:
    c.meta_batch_size, c.inner_lr, c.num_inner_steps, c.eval_num_inner_steps = 16, 0.1, 5, 5
  c.meta_lr, c.num_steps = 1e-3, 60_000
  c.eval_split, c.eval_every, c.eval_num_tasks = "val", 1_000, 100
  return c


def _kao(shots: int, zeroing: bool):
  c = _maml(5, shots)
  c.split, c.rotations, c.model = "kao", False, "kao_conv"
  c.algorithm = "fomaml" if shots == 1 else "maml"
  c.zeroing = zeroing
  c.num_inner_steps, c.eval_num_inner_steps, c.inner_lr = 2, 3, 0.4
  c.num_steps, c.eval_split, c.eval_every, c.eval_num_tasks = 3_000, "test", 250, 100
  c.checkpoint_every, c.log_every = 250, 50
  return c


def _reptile(shots: int):
  c = _maml(5, shots)
  c.algorithm, c.reptile_serial = "reptile", False
  c.num_inner_steps, c.inner_lr, c.eval_num_inner_steps = 5, 0.1, 50
  c.optimizer, c.meta_lr, c.meta_batch_size, c.num_steps = "sgd", 1.0, 5, 100_000
  return c


def _protonet(ways: int, shots: int):
  c = _maml(ways, shots)
  c.algorithm, c.train_ways, c.queries = "protonet", 60, 5
  c.meta_batch_size, c.meta_lr, c.num_steps = 1, 1e-3, 20_000
  c.test_num_tasks = 1_000
  return c


def _umtra():
  c = _maml(5, 1)
  c.algorithm = "umtra"
  c.meta_batch_size, c.num_inner_steps, c.inner_lr, c.eval_num_inner_steps = 25, 1, 0.4, 3
  c.num_steps = 30_000
  return c


def _pretrain(algorithm: str):
  c = _maml(5, 1)
  c.algorithm, c.meta_batch_size, c.queries, c.num_steps = algorithm, 32, 15, 30_000
  c.num_inner_steps, c.eval_num_inner_steps, c.inner_lr = 10, 10, 0.1
  return c


def _smoke(c):
  c.split, c.rotations, c.model = "kao", False, "kao_conv"
  c.filters, c.queries, c.meta_batch_size = 8, 2, 2
  c.num_steps, c.eval_every, c.eval_num_tasks, c.test_num_tasks = 2, 2, 4, 4
  c.eval_split, c.log_every, c.checkpoint_every, c.eval_batch_size = "test", 1, 1, 4
  c.num_inner_steps, c.eval_num_inner_steps = min(c.num_inner_steps, 2), 2
  return c


def get_config(variant: str = "5way1shot"):
  if variant in ("5way1shot", "5way5shot", "20way1shot", "20way5shot"):
    return _maml(int(variant.split("way")[0]), int(variant.split("way")[1][0]))
  if variant.startswith("kao5way"):
    return _kao(int(variant[len("kao5way")]), variant.endswith("_zeroing"))
  if variant == "smoke":
    c = _kao(1, False)
    c.filters, c.queries, c.meta_batch_size = 8, 2, 2
    c.num_steps, c.eval_every, c.eval_num_tasks, c.test_num_tasks = 2, 2, 4, 4
    c.log_every, c.checkpoint_every, c.eval_batch_size = 1, 1, 4
    return c
  if variant.startswith("reptile5way"):
    return _reptile(int(variant[len("reptile5way")]))
  if variant.startswith("protonet") and variant != "protonet_smoke":
    ways, shots = variant[len("protonet"):].split("way")
    return _protonet(int(ways), int(shots[0]))
  if variant == "umtra5way1shot":
    return _umtra()
  if variant == "reptile_smoke":
    c = _smoke(_reptile(1))
    c.reptile_serial = True
    return c
  if variant == "protonet_smoke":
    c = _smoke(_protonet(5, 1))
    c.train_ways = 10
    return c
  if variant == "umtra_smoke":
    c = _smoke(_umtra())
    c.zeroing = True
    return c
  if variant in ("pretrain5way1shot", "simclr5way1shot", "supcon5way1shot"):
    return _pretrain(variant[:-len("5way1shot")])
  if variant in ("pretrain_smoke", "simclr_smoke", "supcon_smoke"):
    return _smoke(_pretrain(variant[:-len("_smoke")]))
  if variant == "readme":
    c = _kao(1, True)  # first-order MAML with the zeroing trick
    c.num_inner_steps, c.eval_num_inner_steps = 1, 3
    c.meta_batch_size, c.queries = 16, 5
    c.num_steps, c.eval_every, c.log_every, c.checkpoint_every = 300, 0, 25, 100
    c.test_num_tasks, c.eval_batch_size = 600, 10
    return c
  raise ValueError(f"unknown omniglot config {variant!r}; choose one of {', '.join(VARIANTS)}")
