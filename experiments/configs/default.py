"""Every field a run reads, with its default: 5-way 1-shot Omniglot MAML on Finn et al.'s split.

The dataset configs beside this file start from `get_config()` and override what differs; any
field can be overridden on the command line with `--config.<field>=<value>`. The training loop
(`metajax.experiment.train`) takes a complete config: `metajax.experiment.build.FIELDS` names the
fields, and this file is where their values and meaning are.

    python experiments/train.py --config=experiments/configs/default.py --workdir=runs/default
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # data
  c.dataset = "omniglot"            # one of build.DATASETS: omniglot, miniimagenet, sinusoid
  c.data_dir = ""                   # "" -> $METAJAX_OMNIGLOT_DIR / $METAJAX_MINIIMAGENET_DIR
  c.cache_dir = ""                  # "" -> metajax.data.cache.resolve_cache_dir's default
  c.download = False                # Omniglot: fetch missing archives (sha256-verified)
  c.split = "finn"                  # Omniglot class split: finn, kao, lake
  c.rotations = ml_collections.config_dict.placeholder(bool)  # None -> the split's default
  c.image_size = 28                 # 28 for Omniglot, 84 for mini-ImageNet
  # model
  c.model = "conv4"                 # one of build.MODELS: conv4, kao_conv, mlp, resnet12
  c.filters = 64                    # conv4, kao_conv
  c.hidden = (40, 40)               # mlp only
  c.widths = (64, 160, 320, 640)    # resnet12 only: channels of its 4 blocks
  # algorithm
  c.algorithm = "maml"              # one of build.ALGORITHMS: maml, fomaml, anil, metasgd,
                                    # mamlpp, meta_lstm, lstm_optimizer, imaml, reptile,
                                    # protonet, umtra, pretrain, simclr, supcon, byol, moco,
                                    # barlow_twins, swav
  c.reptile_serial = False          # reptile: tasks in turn, one outer update each
  c.pretrain_eval = ""              # pretrain, simclr, ...: finetune, linear_probe, prototypes
                                    # ("": finetune for pretrain, prototypes for the others)
  c.zeroing = False                 # Kao et al.'s zeroing trick
  c.loss = ""                       # "" -> the dataset's default (cross_entropy / mse)
  c.matching_temperature = 1.0      # matching: softmax temperature over cosine similarities
  c.fce_steps = 1                   # matching_fce: processing steps of the attention LSTM
  # episodes
  c.ways = 5
  c.train_ways = 0                  # protonet: ways of the training episodes (0: ways)
  c.shots = 1
  c.queries = 15
  c.meta_batch_size = 32
  c.num_inner_steps = 1
  c.eval_num_inner_steps = 3
  c.inner_lr = 0.4
  c.meta_lr = 1e-3
  c.optimizer = "adam"              # one of build.OPTIMIZERS: adam, sgd
  c.meta_lr_schedule = "constant"   # or "cosine": from meta_lr to min_meta_lr over num_steps
  c.min_meta_lr = 0.0
  # MAML++ (algorithm="mamlpp", Antoniou et al. 2019); an "epoch" is mamlpp_epoch_steps steps
  c.mamlpp_msl_epochs = 10          # epochs of the annealed multi-step loss (0: last step only)
  c.mamlpp_epoch_steps = 500
  c.mamlpp_first_order_epochs = 0   # derivative-order annealing: first-order epochs first
  c.mamlpp_step_lrs = True          # per-layer per-step learned inner lrs
  c.mamlpp_step_norm = True         # per-step BatchNorm weights and biases
  c.lstm_hidden = 20                # meta_lstm, lstm_optimizer: units per LSTM layer
  # implicit MAML (algorithm="imaml", Rajeswaran et al. 2019)
  c.imaml_lambda = 1.0              # proximal regularisation lambda of the inner problem
  c.imaml_cg_steps = 5              # conjugate-gradient steps of the implicit meta-gradient
  c.imaml_cg_damping = 0.0          # delta: solves ((1 + delta) I + H / lambda) g = grad L_q
  # self-supervised pre-training (byol, moco, barlow_twins, swav): the papers' values
  c.byol_base_momentum = 0.996      # byol: the target's momentum at step 0 (cosine to 1)
  c.moco_momentum = 0.999           # moco: the key network's EMA momentum
  c.moco_queue_size = 65536         # moco: negatives in the queue (>= the keys of one step)
  c.moco_temperature = 0.2          # moco: InfoNCE temperature
  c.moco_shuffle_groups = 1         # moco: shuffled BatchNorm's groups (1: none; the paper: 8)
  c.barlow_twins_lambda = 5e-3      # barlow_twins: weight of the off-diagonal terms
  c.swav_num_prototypes = 3000      # swav: learned prototypes (L2-normalised)
  c.swav_temperature = 0.1          # swav: temperature of the swapped predictions
  c.swav_epsilon = 0.05             # swav: Sinkhorn-Knopp entropic regularisation
  c.swav_sinkhorn_iters = 3         # swav: Sinkhorn-Knopp iterations
  c.swav_freeze_steps = 313         # swav: steps with the prototypes frozen at first
  c.swav_small_crops = 0            # swav: multi-crop's small (zoomed) views (the paper: 6)
  c.selfsup_hidden_dim = 0          # projector hidden width (0: the algorithm's paper width)
  c.selfsup_projection_dim = 0      # projector output width (0: the algorithm's paper width)
  # schedule
  c.num_steps = 60_000              # outer steps
  c.eval_every = 1_000              # 0: only the final evaluation
  c.eval_split = "val"              # the split evaluated during training
  c.eval_num_tasks = 100            # tasks per evaluation during training
  c.test_num_tasks = 600            # tasks of the final evaluation on the "test" split (0: none)
  c.eval_batch_size = 50            # tasks evaluated at once (memory)
  c.eval_seed = 0                   # evaluation tasks come from this seed, not from `seed`
  c.log_every = 100
  c.checkpoint_every = 1_000
  c.keep_checkpoints = 3            # the newest kept, besides the best by validation metric
  c.seed = 0
  # "auto" (per backend: "map" on CPU, "vmap" elsewhere), "vmap", "map", or an int chunk size
  # (see metajax.make_meta_step and metajax.meta_value_and_grad).
  c.task_map = "auto"
  c.remat = False
  # Outer steps per compiled call (`MetaStep.steps`, a lax.scan): at most this many, and a divisor
  # of the log/eval/checkpoint intervals, so that every interval ends on a call boundary. Same
  # steps, same tasks; on CPU it spares the per-call allocation of XLA's temporaries.
  c.steps_per_call = 5
  # "all": the meta-batch's tasks split over as many local devices as divide it (parameters
  # replicated; one device runs the single-device program), or "N" for the first N (N must
  # divide it). A string: --config.devices=2.
  c.devices = "all"
  # divergence: a finite meta-loss above this multiple of the first step's (0: no bound), a
  # meta-gradient norm above this (0: no bound); "warn" prints one line, "stop" stops the run as a
  # NaN does (the newest checkpoint is the last good state). All may change on resume.
  c.divergence_loss_ratio = 1_000.0
  c.divergence_grad_norm = 0.0
  c.on_divergence = "warn"
  return c
