"""Small pure transforms that turn MAML into its variants.

- `zero_head`: the zeroing trick of Kao et al. (Algorithm 2): the linear head w is set to 0
  before every inner loop (in training and at evaluation), which removes the noise term that a
  random initial head adds to MAML's encoder gradient.
- `head_mask`: the inner-loop mask of ANIL (Raghu et al. 2020): only the head adapts.
- `encoder_mask`: its complement, e.g. to adapt only the body.

First-order MAML is an argument of `metajax.adapt` (`first_order=True`), not a transform.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from metajax.types import Params, PyTree

HEAD = "head"


def _check_split(params: Params) -> None:
  if not isinstance(params, dict) or HEAD not in params:
    keys = list(params) if isinstance(params, dict) else type(params).__name__
    raise ValueError(f"params must be a dict with a {HEAD!r} entry (the linear head), got {keys}; "
                     "build models with metajax.nn.models or metajax.nn.models.model_from_encoder")


def zero_head(params: Params) -> Params:
  """Returns params with every leaf of `params["head"]` (weights and bias) set to 0."""
  _check_split(params)
  # `w * 0` rather than `zeros_like`: with a constant-zero head, XLA:CPU (jaxlib 0.10.2)
  # miscompiles the batch-norm -> dot of a vmapped forward pass once the batch is large (garbage
  # logits; tests/test_meta.py::ZeroHeadRegressionTest). The value and its gradient (0) are the
  # same; a NaN or Inf in the stored head now shows instead of being hidden.
  return {**params, HEAD: jax.tree.map(lambda w: w * 0, params[HEAD])}


def head_mask(params: Params) -> PyTree:
  """Mask with True on the head's leaves and False elsewhere (ANIL's inner loop)."""
  _check_split(params)
  return {k: jax.tree.map(lambda _, on=(k == HEAD): on, v) for k, v in params.items()}


def encoder_mask(params: Params) -> PyTree:
  """Mask with True everywhere but the head."""
  return jax.tree.map(lambda on: not on, head_mask(params))
