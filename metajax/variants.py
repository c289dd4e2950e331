"""Small pure transforms that turn MAML into its variants, and where the head sits in params.

- `zero_head`: the zeroing trick of Kao et al. (Algorithm 2): the linear head w is set to 0
  before every inner loop (in training and at evaluation), which removes the noise term that a
  random initial head adds to MAML's encoder gradient.
- `head_mask`: the inner-loop mask of ANIL (Raghu et al. 2020): only the head adapts.
- `encoder_mask`: its complement, e.g. to adapt only the body.
- `norm_mask`: the normalisation layers' scales and biases (MAML++'s per-step BatchNorm).

Which leaves are the head is a parameter (`head=`), not a layout. A `HeadSpec` is one of:

- None (the default): every leaf below a key named `"head"`, wherever it is: metajax's own
  `{"encoder": ..., "head": ...}`, Flax's `{"params": {..., "head": ...}}` and an NNX `State`
  with a `head` attribute all work as they are;
- a path: a string `"params/classifier"` or a tuple of keys `("params", "classifier")`, from the
  root of params to the head's subtree;
- a predicate `path -> bool` on each leaf's path, a tuple of key names (strings, or ints for
  sequence indices), True for the head's leaves.

First-order MAML is an argument of `metajax.adapt` (`first_order=True`), not a transform.
"""

from __future__ import annotations

import functools
from typing import Callable, Hashable, Sequence

import jax

from metajax.types import Params, PyTree

HEAD = "head"

# None (a key named "head"), a path ("params/head" or a tuple of keys), or `path -> bool`.
HeadSpec = str | Sequence[Hashable] | Callable[[tuple[Hashable, ...]], bool] | None


def _key_name(key: object) -> Hashable:
  """The name of one pytree path entry: a dict key, an attribute name or a sequence index."""
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return getattr(key, attr)
  return str(key)


def leaf_paths(params: Params) -> list[tuple[Hashable, ...]]:
  """Each leaf's path as a tuple of key names, in `jax.tree.leaves` order.

  An NNX `Variable`'s trailing `.value` attribute is dropped, so that NNX and Linen paths read
  alike (`("head", "kernel")`).
  """
  paths = []
  for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
    names = tuple(_key_name(k) for k in path)
    if names and names[-1] == "value" and isinstance(path[-1], jax.tree_util.GetAttrKey):
      names = names[:-1]
    paths.append(names)
  return paths


def _as_path(head: str | Sequence[Hashable]) -> tuple[Hashable, ...]:
  if isinstance(head, str):
    return tuple(part for part in head.split("/") if part)
  return tuple(head)


def head_flags(params: Params, head: HeadSpec = None) -> list[bool]:
  """One bool per leaf of params (`jax.tree.leaves` order): True for the head's leaves.

  Raises a ValueError naming the leaf paths if `head` selects no leaf, or every leaf.
  """
  paths = leaf_paths(params)
  if head is None:
    flags = [HEAD in path for path in paths]
    what = f"a key named {HEAD!r}"
  elif callable(head):
    flags = [bool(head(path)) for path in paths]
    what = f"the predicate {head!r}"
  elif isinstance(head, (str, Sequence)):
    prefix = _as_path(head)
    if not prefix:
      raise ValueError(f"head must name a subtree, got the empty path {head!r}")
    flags = [path[:len(prefix)] == prefix for path in paths]
    what = f"the path {'/'.join(map(str, prefix))!r}"
  else:
    raise TypeError(f"head must be None, a path (str or tuple of keys) or a predicate "
                    f"path -> bool, got {type(head).__name__} {head!r}")
  if not any(flags):
    shown = ["/".join(map(str, p)) for p in paths[:12]]
    raise ValueError(f"no leaf of params matches {what} (the head); leaf paths are {shown}"
                     f"{' ...' if len(paths) > 12 else ''}; pass head= a path or a predicate "
                     "(metajax.variants.HeadSpec)")
  if all(flags):
    raise ValueError(f"every leaf of params matches {what}: there is no encoder left")
  return flags


def head_subtree(params: Params, head: HeadSpec = None) -> Params:
  """The smallest subtree of params that holds exactly the head's leaves (e.g. its Dense layer).

  Raises a ValueError if the head's leaves do not form one subtree (then no single linear layer
  can be named, e.g. by a predicate that picks leaves of two layers).
  """
  flags = head_flags(params, head)
  paths = leaf_paths(params)
  selected = [p for p, f in zip(paths, flags) if f]
  if head is None:
    prefix = selected[0][:selected[0].index(HEAD) + 1]
  elif not callable(head):
    prefix = _as_path(head)
  else:
    prefix = selected[0]
    for p in selected[1:]:
      n = 0
      while n < min(len(prefix), len(p)) and prefix[n] == p[n]:
        n += 1
      prefix = prefix[:n]
    if len(selected) == 1:
      prefix = prefix[:-1]  # one leaf: its layer, not the array
  under = [p[:len(prefix)] == prefix for p in paths]
  if under != flags:
    raise ValueError(f"the head's leaves do not form one subtree of params (their common path "
                     f"{'/'.join(map(str, prefix))!r} also holds encoder leaves)")
  node = params
  for name in prefix:
    node = node[name] if _is_mapping(node) or isinstance(node, (list, tuple)) else getattr(
      node, name)
  return _plain(node)


def _is_mapping(node: object) -> bool:
  return hasattr(node, "keys") and hasattr(node, "__getitem__")


def _plain(node: object) -> object:
  """Mappings as dicts and NNX variables as their arrays, so the head reads `head["kernel"]`."""
  if _is_mapping(node):
    return {k: _plain(node[k]) for k in node.keys()}
  if type(node).__module__.startswith("flax.nnx") and hasattr(node, "get_value"):
    return node.get_value()
  return node


def split_head(params: Params, head: HeadSpec = None) -> tuple[list, list]:
  """`params -> (encoder_leaves, head_leaves)`, each in `jax.tree.leaves` order."""
  flags = head_flags(params, head)
  leaves = jax.tree.leaves(params)
  return ([w for w, f in zip(leaves, flags) if not f], [w for w, f in zip(leaves, flags) if f])


def zero_head(params: Params, head: HeadSpec = None) -> Params:
  """Returns params with every leaf of the head (weights and bias) set to 0.

  Args:
    params: any params pytree.
    head: which leaves are the head (`HeadSpec`); None: those below a key named "head".
  """
  flags = head_flags(params, head)
  leaves, treedef = jax.tree.flatten(params)
  # `w * 0` rather than `zeros_like`: with a constant-zero head, XLA:CPU (jaxlib 0.10.2)
  # miscompiles the batch-norm -> dot of a vmapped forward pass once the batch is large (garbage
  # logits; tests/test_meta.py::ZeroHeadRegressionTest). The value and its gradient (0) are the
  # same; a NaN or Inf in the stored head now shows instead of being hidden.
  return treedef.unflatten([w * 0 if f else w for w, f in zip(leaves, flags)])


def head_mask(params: Params, head: HeadSpec = None) -> PyTree:
  """Mask with True on the head's leaves and False elsewhere (ANIL's inner loop).

  Pass it as `adapt_mask=metajax.head_mask`, or `adapt_mask=metajax.head_mask_for(head)` for a
  head that is not below a key named "head".
  """
  flags = head_flags(params, head)
  return jax.tree.structure(params).unflatten(flags)


def encoder_mask(params: Params, head: HeadSpec = None) -> PyTree:
  """Mask with True everywhere but the head."""
  flags = head_flags(params, head)
  return jax.tree.structure(params).unflatten([not f for f in flags])


def head_mask_for(head: HeadSpec) -> Callable[[Params], PyTree]:
  """`head_mask` bound to a head spec: `params -> mask`, for `MAML(adapt_mask=...)`."""
  return functools.partial(head_mask, head=head)


def zero_head_for(head: HeadSpec) -> Callable[[Params], Params]:
  """`zero_head` bound to a head spec: `params -> params`, a `params_transforms` entry."""
  return functools.partial(zero_head, head=head)


def norm_mask(params: Params) -> PyTree:
  """Mask with True on the leaves of normalisation layers: those below a key whose name contains
  "norm" (any case: metajax's `norm0`, Flax's `BatchNorm_0`, `LayerNorm_0`) or is `bn` followed
  by digits, as PyTorch ports name them. For `MAML(per_step_params=metajax.norm_mask)`."""
  def is_norm(name: Hashable) -> bool:
    name = str(name).lower()
    return "norm" in name or (name.startswith("bn") and name[2:].isdigit())

  flags = [any(is_norm(name) for name in path[:-1]) for path in leaf_paths(params)]
  return jax.tree.structure(params).unflatten(flags)
