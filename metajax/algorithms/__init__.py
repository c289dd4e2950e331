"""Meta-learners beside MAML, each implementing the `metajax.types.Learner` protocol.

- `reptile`: Reptile (Nichol et al. 2018), the first-order method that moves the initialisation
  towards the adapted weights; `make_reptile_step`.
- `protonet`: Prototypical Networks (Snell et al. 2017), classification by the nearest class mean.
- `pretrain`: plain (joint) pre-training on the pooled classes or regression tasks, then
  fine-tuning or a linear probe: the baseline MAML is compared with.
- `contrastive_pretrain`: SimCLR- and SupCon-style encoder pre-training, then the same
  fine-tuning.

MAML itself, its first-order variant, ANIL and Meta-SGD are `metajax.MAML` (`metajax.meta`).
"""

from metajax.algorithms import contrastive_pretrain, pretrain, protonet, reptile

__all__ = ["contrastive_pretrain", "pretrain", "protonet", "reptile"]
