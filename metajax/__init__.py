"""metajax: gradient-based meta-learning as pure JAX functions.

The public API, re-exported from its modules:

- models: `conv4`, `kao_conv`, `mlp`, `model_from_encoder`, `Model`
- inner loop: `adapt`
- outer loop: `MAML`, `with_zeroing`, `meta_loss`, `make_meta_step`, `compile_step`, `MetaState`, `map_tasks`
- variants: `zero_head`, `head_mask`, `encoder_mask`
- losses: `cross_entropy`, `mse_onehot`, `mse`, `accuracy`, `make_loss_fn`
- evaluation: `evaluate`, `evaluate_tasks`, `mean_confidence_interval`
- contrastive losses: `info_nce`, `supcon`, `triplet`, `batch_hard_triplet`
- the family: `Reptile`, `make_reptile_step`, `ProtoNet`
- types: `Task`

Submodules: `metajax.data` (Omniglot, mini-ImageNet, sinusoid tasks, episode samplers),
`metajax.theory` (MAML's encoder gradient as a noisy contrastive loss, Kao et al.),
`metajax.conv` (the fast im2col convolution used on CPU), `metajax.sharding` (tasks over a device
mesh), `metajax.pretrain` and `metajax.contrastive_pretrain` (joint and contrastive pre-training
baselines), `metajax.augment` (random affine transforms), `metajax.umtra` (unsupervised tasks),
`metajax.gradient_noise` (measuring MAML's gradient noise during training), `metajax.runtime`
(re-executing a script with glibc's huge-page malloc, which makes XLA:CPU steps 1.5-2x faster),
`metajax.xla` (`jit` with the compiler options that keep XLA:CPU's meta-gradients correct),
`metajax.norm` (the models' batch-statistics BatchNorm with its compact derivative).
"""

from metajax import (augment, contrastive_pretrain, conv, data, gradient_noise, norm, pretrain,
                     runtime, sharding, theory, umtra, xla)
from metajax.contrastive import batch_hard_triplet, info_nce, supcon, triplet
from metajax.eval import evaluate, evaluate_tasks, mean_confidence_interval, summarize
from metajax.inner import adapt
from metajax.losses import accuracy, cross_entropy, make_loss_fn, mse, mse_onehot
from metajax.meta import (MAML, MetaState, MetaStep, compile_step, make_meta_step, map_tasks,
                          meta_loss, with_zeroing)
from metajax.protonet import ProtoNet
from metajax.reptile import Reptile, make_reptile_step
from metajax.models import Model, conv4, kao_conv, mlp, model_from_encoder
from metajax.types import Task
from metajax.variants import encoder_mask, head_mask, zero_head

__version__ = "0.1.0"

__all__ = [
  "MAML",
  "MetaState",
  "MetaStep",
  "Model",
  "ProtoNet",
  "Reptile",
  "Task",
  "accuracy",
  "adapt",
  "augment",
  "batch_hard_triplet",
  "compile_step",
  "contrastive_pretrain",
  "conv",
  "conv4",
  "cross_entropy",
  "data",
  "encoder_mask",
  "evaluate",
  "evaluate_tasks",
  "gradient_noise",
  "head_mask",
  "info_nce",
  "kao_conv",
  "make_loss_fn",
  "make_meta_step",
  "make_reptile_step",
  "map_tasks",
  "mean_confidence_interval",
  "meta_loss",
  "mlp",
  "model_from_encoder",
  "pretrain",
  "mse",
  "mse_onehot",
  "sharding",
  "summarize",
  "supcon",
  "theory",
  "triplet",
  "umtra",
  "with_zeroing",
  "zero_head",
]
