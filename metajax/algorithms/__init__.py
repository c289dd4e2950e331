"""Meta-learners beside MAML, each implementing the `metajax.types.Learner` protocol.

- `imaml`: implicit MAML (Rajeswaran et al. 2019), the meta-gradient of a proximally regularised
  inner problem by conjugate gradient with Hessian-vector products; memory flat in the inner steps.
- `learned_optimizers`: inner optimizers with learned parameters: Ravi & Larochelle's
  meta-learner LSTM (`meta_lstm`) and Andrychowicz et al.'s coordinate-wise LSTM
  (`lstm_optimizer`), for `metajax.MAML(learned_optimizer=...)`.
- `reptile`: Reptile (Nichol et al. 2018), the first-order method that moves the initialisation
  towards the adapted weights; `make_reptile_step`.
- `protonet`: Prototypical Networks (Snell et al. 2017), classification by the nearest class mean.
- `matching`: Matching Networks (Vinyals et al. 2016), attention over cosine similarities to the
  support set; full-context embeddings optional.
- `relation`: Relation Networks (Sung et al. 2018), a learned relation module on (class map,
  query map) pairs, squared error to one-hot.
- `siamese`: Siamese networks (Koch et al. 2015), weighted-L1 verification training, one-shot
  classification by the most similar support image.
- `pretrain`: plain (joint) pre-training on the pooled classes or regression tasks, then
  fine-tuning or a linear probe: the baseline MAML is compared with.
- `contrastive_pretrain`: SimCLR- and SupCon-style encoder pre-training, then the same
  fine-tuning.
- `selfsup`: the objectives of MoCo v2 (queue of negatives, momentum encoder), BYOL (regression
  to an EMA target, its momentum schedule), Barlow Twins (cross-correlation towards the identity)
  and SwAV (Sinkhorn-Knopp codes, swapped prediction, prototypes), as pure functions.
- `selfsup_pretrain`: BYOL, MoCo v2, Barlow Twins and SwAV pre-training of an encoder, their
  momentum targets, queue of negatives and prototypes in the training state, then few-shot by
  prototypes or a linear probe on the online encoder.

MAML itself, its first-order variant, ANIL, Meta-SGD and MAML++ are `metajax.MAML`
(`metajax.meta`).
"""

from metajax.algorithms import (
  contrastive_pretrain,
  imaml,
  learned_optimizers,
  matching,
  pretrain,
  protonet,
  relation,
  reptile,
  selfsup,
  selfsup_pretrain,
  siamese,
)

__all__ = ["contrastive_pretrain", "imaml", "learned_optimizers", "matching", "pretrain",
           "protonet", "relation", "reptile", "selfsup", "selfsup_pretrain", "siamese"]
