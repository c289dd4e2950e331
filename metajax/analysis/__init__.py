"""Measurement of what MAML computes; nothing here trains.

- `theory`: MAML's encoder gradient written out as a supervised contrastive loss plus a noise
  term from the initial head (Kao, Chiu and Chen, ICLR 2022), equal to `jax.grad` of the real
  meta-loss.
- `gradient_noise`: that noise term and the task features' similarity, measured along training.
"""

from metajax.analysis import gradient_noise, theory

__all__ = ["gradient_noise", "theory"]
