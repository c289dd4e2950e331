"""metajax: gradient-based meta-learning as pure JAX functions.

The public API, re-exported from its modules:

- models: `conv4`, `kao_conv`, `mlp`, `resnet12`, `model_from_encoder`, `Model`
- inner loop: `adapt`
- outer loop: `MAML`, `with_zeroing`, `meta_loss`, `meta_value_and_grad`, `make_meta_step`,
  `compile_step`, `MetaState`, `map_tasks`, `resolve_task_map`
  (MAML++'s options: `multi_step_loss_weights`, `MAML(learn_inner_lr="step", per_step_params=...)`)
- variants: `zero_head`, `head_mask`, `encoder_mask` (and `..._for(head)` for any params layout),
  `norm_mask`
- adapters: `linen_model`, `nnx_model` (your own Flax model)
- losses: `cross_entropy`, `mse_onehot`, `mse`, `accuracy`, `make_loss_fn`
- evaluation: `evaluate`, `evaluate_tasks`, `mean_confidence_interval`
- contrastive losses: `info_nce`, `supcon`, `clip_loss`, `triplet`, `batch_hard_triplet`
- the family: `Reptile`, `make_reptile_step`, `ProtoNet`, `IMAML` (implicit MAML)
- types: `Task`

Subpackages, by kind:

- `metajax.algorithms`: Reptile, Prototypical Networks, pre-training baselines (joint and
  contrastive) beside MAML;
- `metajax.nn`: the networks (Conv-4, Kao et al.'s net, MLP, your own encoder) and their layers
  (the im2col convolution, batch-statistics BatchNorm);
- `metajax.data`: Omniglot, mini-ImageNet and sinusoid tasks, episode samplers, augmentation,
  UMTRA's unsupervised tasks;
- `metajax.analysis`: MAML's encoder gradient as a noisy contrastive loss (Kao et al.), and its
  noise measured during training;
- `metajax.platform`: `xla.jit` (the compiler options that keep XLA:CPU's meta-gradients
  correct), start-up settings, sharding over devices;
- `metajax.experiment` (imported on demand): configs to objects, the training loop, checkpoints,
  metric writers, used by the binaries in `experiments/`.
"""

from metajax import algorithms, analysis, data, nn, platform
from metajax.contrastive import batch_hard_triplet, clip_loss, info_nce, supcon, triplet
from metajax.eval import evaluate, evaluate_tasks, mean_confidence_interval, summarize
from metajax.inner import adapt
from metajax.losses import accuracy, cross_entropy, make_loss_fn, mse, mse_onehot
from metajax.meta import (MAML, MetaState, MetaStep, compile_step, make_meta_step, map_tasks,
                          meta_loss, meta_value_and_grad, multi_step_loss_weights,
                          resolve_task_map, with_zeroing)
from metajax.algorithms.imaml import IMAML
from metajax.algorithms.protonet import ProtoNet
from metajax.algorithms.reptile import Reptile, make_reptile_step
from metajax.nn.adapters import linen_model, nnx_model
from metajax.nn.models import Model, conv4, kao_conv, mlp, model_from_encoder
from metajax.nn.resnet import resnet12
from metajax.types import Task
from metajax.variants import (encoder_mask, head_mask, head_mask_for, norm_mask, zero_head,
                              zero_head_for)

from importlib import metadata as _metadata

try:  # pyproject.toml is the version's one source
  __version__: str = _metadata.version("metajax")
except _metadata.PackageNotFoundError:  # imported from a source tree that was never installed
  __version__ = "0+unknown"

__all__ = [
  "IMAML",
  "MAML",
  "MetaState",
  "MetaStep",
  "Model",
  "ProtoNet",
  "Reptile",
  "Task",
  "accuracy",
  "adapt",
  "algorithms",
  "analysis",
  "batch_hard_triplet",
  "clip_loss",
  "compile_step",
  "conv4",
  "cross_entropy",
  "data",
  "encoder_mask",
  "evaluate",
  "evaluate_tasks",
  "head_mask",
  "head_mask_for",
  "info_nce",
  "kao_conv",
  "linen_model",
  "make_loss_fn",
  "make_meta_step",
  "make_reptile_step",
  "map_tasks",
  "mean_confidence_interval",
  "meta_loss",
  "meta_value_and_grad",
  "mlp",
  "model_from_encoder",
  "mse",
  "mse_onehot",
  "multi_step_loss_weights",
  "nn",
  "nnx_model",
  "norm_mask",
  "platform",
  "resnet12",
  "resolve_task_map",
  "summarize",
  "supcon",
  "triplet",
  "with_zeroing",
  "zero_head",
  "zero_head_for",
]
