"""The inner loop: a few steps of gradient descent on one task's support set.

`adapt` is written for a single task; map it over tasks with `jax.vmap` (see `metajax.meta`).
Its derivative wrt `params` is the exact second-order MAML meta-gradient unless
`first_order=True`, which stops the gradient through the inner gradients (FOMAML).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from metajax.types import Array, LossFn, Params, PyTree

# A mask is a pytree of bools with the structure of params (True = adapted in the inner loop), or
# a function `params -> mask`, e.g. `metajax.head_mask` for ANIL.
Mask = PyTree | Callable[[Params], PyTree]


def resolve_mask(mask: Mask | None, params: Params) -> list[bool]:
  """Flattens `mask` against `params` into one bool per leaf (all True when mask is None)."""
  leaves, treedef = jax.tree.flatten(params)
  if mask is None:
    return [True] * len(leaves)
  if callable(mask):
    mask = mask(params)
  try:
    flags = treedef.flatten_up_to(mask)
  except (ValueError, TypeError) as e:
    raise ValueError(f"adapt_mask must have the structure of params ({treedef}); got {mask!r}"
                     ) from e
  flags = [bool(f) for f in flags]
  if not any(flags):
    raise ValueError("adapt_mask selects no parameter to adapt")
  return flags


def _partition(params: Params, flags: list[bool]) -> tuple[list[Array], Callable[[list], Params]]:
  """Splits params into the adapted leaves and a function that puts adapted leaves back."""
  leaves, treedef = jax.tree.flatten(params)
  adapted = [leaf for leaf, f in zip(leaves, flags) if f]

  def merge(new_adapted: list[Array]) -> Params:
    it = iter(new_adapted)
    return treedef.unflatten([next(it) if f else leaf for leaf, f in zip(leaves, flags)])

  return adapted, merge


def _lr_leaves(inner_lr: Any, params: Params, flags: list[bool]) -> list[Any]:
  """One learning rate per adapted leaf: a scalar, or a pytree with the structure of params."""
  if jax.tree_util.treedef_is_leaf(jax.tree.structure(inner_lr)):
    return [inner_lr] * sum(flags)  # one scalar (or array) for every adapted leaf
  treedef = jax.tree.structure(params)
  try:
    lrs = treedef.flatten_up_to(inner_lr)
  except (ValueError, TypeError) as e:
    raise ValueError("inner_lr must be a scalar or a pytree with the structure of params "
                     f"({treedef})") from e
  return [lr for lr, f in zip(lrs, flags) if f]


def check_inner_lr(inner_lr: Any, *, allow_nonpositive: bool = False) -> None:
  """Refuses a string, and (unless `allow_nonpositive`) a Python number <= 0, as `inner_lr`.

  Arrays (possibly traced, e.g. learned lrs) are not value-checked: that would need a host sync.
  """
  if isinstance(inner_lr, (str, bytes)):
    raise TypeError(f"inner_lr must be a number or a pytree of arrays, got the string "
                    f"{inner_lr!r}")
  if isinstance(inner_lr, bool):
    raise TypeError(f"inner_lr must be a number or a pytree of arrays, got the bool {inner_lr!r}")
  if isinstance(inner_lr, (int, float)) and not allow_nonpositive and not inner_lr > 0:
    raise ValueError(f"inner_lr must be > 0, got {inner_lr!r} (pass allow_nonpositive_inner_lr="
                     "True to take steps of that size on purpose)")


def check_examples(arrays: dict[str, Any]) -> None:
  """Raises a ValueError unless the named arrays (or pytrees of arrays) agree on the size of
  their leading axis, the number of examples; scalar leaves are not counted."""
  sizes = {jnp.shape(a)[0] for value in arrays.values() for a in jax.tree.leaves(value)
           if jnp.ndim(a)}
  if len(sizes) > 1:
    shapes = ", ".join(f"{name} {_shapes(value)}" for name, value in arrays.items())
    raise ValueError(f"inputs and targets disagree on the number of examples (the size of their "
                     f"leading axis): {shapes}; each example needs its target")


def _shapes(value: Any) -> Any:
  leaves = jax.tree.leaves(value)
  return jnp.shape(leaves[0]) if len(leaves) == 1 else [jnp.shape(a) for a in leaves]


def adapt(
  params: Params,
  x: Array,
  y: Array,
  *,
  loss_fn: LossFn,
  num_inner_steps: int = 1,
  inner_lr: Any = None,
  optimizer: optax.GradientTransformation | None = None,
  first_order: bool = False,
  adapt_mask: Mask | None = None,
  remat: bool | Callable[..., Any] = False,
  unroll: int | bool = 1,
  return_losses: bool = False,
  allow_nonpositive_inner_lr: bool = False,
  per_step_lr: bool = False,
  per_step: Mask | None = None,
  observe: Callable[[Params], Any] | None = None,
) -> Params | tuple[Any, ...]:
  """Adapts `params` to one task by `num_inner_steps` gradient steps on `loss_fn(params, x, y)`.

  The steps run in `lax.scan`, so the program size does not grow with the number of steps.

  Args:
    params: the initial parameters theta (any pytree).
    x: support inputs of one task, e.g. `[ways * shots, H, W, C]`.
    y: support targets of the same task.
    loss_fn: `(params, x, y) -> scalar` (see `metajax.losses.make_loss_fn`).
    num_inner_steps: number of inner gradient steps, >= 1.
    inner_lr: plain gradient descent step size: a scalar, or a pytree with the structure of
      `params` whose leaves broadcast against each parameter (per-tensor scalars, or full-shape
      arrays as in Meta-SGD). Differentiable, so it can be meta-learned. Exclusive with
      `optimizer`.
    optimizer: any optax transformation to use instead of gradient descent; its state starts
      fresh for each task; one that takes extra arguments gets the support loss as `value=`.
      Differentiating through `optax.adam` needs `eps_root > 0` (sqrt at 0
      has an infinite derivative; https://github.com/google-deepmind/optax/issues/882).
    first_order: if True, the inner gradients are treated as constants (FOMAML): the
      meta-gradient is then the query gradient at the adapted params.
    adapt_mask: which leaves adapt (pytree of bools, or `params -> mask`); the others stay
      fixed in the inner loop but still get outer gradients through the adapted leaves. Use
      `metajax.head_mask` for ANIL.
    remat: rematerialise each inner step (`jax.checkpoint`) in the backward pass: memory no
      longer grows with the inner activations of every step, at the cost of recomputing them.
      True recomputes everything but the step's input; a `jax.checkpoint_policies` policy
      (e.g. `dots_saveable`) keeps what it allows and recomputes the rest.
    unroll: `lax.scan`'s unroll: how many inner steps one loop iteration runs (True: all).
      Unrolled, XLA skips the loop's stacked copies of each step's residuals (faster for
      several inner steps, `docs/BENCHMARKS.md`); rolled (the default), the program and its compile
      time stay the same size however many steps. Compile unrolled steps with
      `metajax.platform.xla.jit`: plain `jax.jit` miscompiles unrolled second-order Conv-4
      meta-gradients on CPU (jaxlib 0.10.2, `metajax.platform.xla`); rolled is right under either.
    return_losses: also return the support loss before each step, `[num_inner_steps]`.
    allow_nonpositive_inner_lr: accept a Python-number `inner_lr` <= 0 (refused by default: a
      step of that size ascends the support loss or does nothing).
    per_step_lr: every leaf of `inner_lr` has a leading axis of learning rates, one per step:
      step k uses entry k (the last entry for steps beyond it). With a learned `inner_lr` of
      shape `[num_inner_steps]` per tensor, the per-layer per-step learning rates of MAML++
      (Antoniou et al. 2019).
    per_step: which leaves of `params` carry a leading axis of values, one per step (a mask as
      `adapt_mask`, e.g. `metajax.norm_mask` for MAML++'s per-step BatchNorm weights and biases):
      step k computes its support loss with entry k of each (the last entry for steps beyond
      it), and the params returned hold the entry of the last step. These leaves never adapt in
      the inner loop; the outer loop learns them.
    observe: `params -> pytree`, evaluated at the params after each step (e.g. the query loss,
      for MAML++'s multi-step loss); its values are returned stacked along a leading step axis.

  Returns:
    The adapted params (the structure of `params`; `per_step` leaves without their step axis),
    then the inner losses if `return_losses`, then the observed values if `observe`: the params
    alone, or a tuple of these.

  Raises:
    ValueError: `x` and `y` disagree on the number of examples (their leading axis), or an
      argument is out of range; TypeError: an `inner_lr` that is not a number or arrays. Before
      anything is traced. (`MAML.adapt` also checks the labels against its loss and model.)
  """
  if not isinstance(num_inner_steps, int) or num_inner_steps < 1:
    raise ValueError(f"num_inner_steps must be an int >= 1, got {num_inner_steps!r}")
  if (inner_lr is None) == (optimizer is None):
    raise ValueError("give exactly one of inner_lr (plain gradient descent) or optimizer "
                     f"(an optax transformation); got inner_lr={inner_lr!r}, "
                     f"optimizer={optimizer!r}")
  if inner_lr is not None:
    check_inner_lr(inner_lr, allow_nonpositive=allow_nonpositive_inner_lr)
  if not (isinstance(remat, bool) or callable(remat)):
    raise ValueError("remat must be a bool or a jax.checkpoint_policies policy (a callable), got "
                     f"{remat!r}")
  check_examples({"x": x, "y": y})
  flags = resolve_mask(adapt_mask, params)
  if per_step is not None or per_step_lr or observe is not None:
    return _adapt_by_step(params, x, y, flags, loss_fn=loss_fn, num_inner_steps=num_inner_steps,
                          inner_lr=inner_lr, optimizer=optimizer, first_order=first_order,
                          remat=remat, unroll=unroll, return_losses=return_losses,
                          per_step_lr=per_step_lr, per_step=per_step, observe=observe)
  adapted, merge = _partition(params, flags)

  def support_loss(leaves: list[Array]) -> Array:
    return loss_fn(merge(leaves), x, y)

  grad_fn = jax.value_and_grad(support_loss)

  if optimizer is None:
    lrs = _lr_leaves(inner_lr, params, flags)

    def step(leaves, _):
      loss, grads = grad_fn(leaves)
      if first_order:
        grads = jax.lax.stop_gradient(grads)
      return [w - lr * g for w, lr, g in zip(leaves, lrs, grads)], loss

    carry = adapted
  else:

    def step(carry, _):
      leaves, opt_state = carry
      loss, grads = grad_fn(leaves)
      if first_order:
        grads = jax.lax.stop_gradient(grads)
      updates, opt_state = _update(optimizer, grads, opt_state, leaves, loss)
      return (optax.apply_updates(leaves, updates), opt_state), loss

    carry = (adapted, optimizer.init(adapted))

  step = _rematerialised(step, remat)
  carry, losses = jax.lax.scan(step, carry, None, length=num_inner_steps, unroll=unroll)
  leaves = carry if optimizer is None else carry[0]
  new_params = merge(leaves)
  return (new_params, losses) if return_losses else new_params


def _update(optimizer: optax.GradientTransformation, grads: Any, state: Any, params: Any,
            loss: Array) -> tuple[Any, Any]:
  """`optimizer.update`, given the support loss as `value=` where it takes extra arguments (as
  optax's line searches and metajax's learned optimizers do; other optax transforms ignore it)."""
  if isinstance(optimizer, optax.GradientTransformationExtraArgs):
    return optimizer.update(grads, state, params, value=loss)
  return optimizer.update(grads, state, params)


def _rematerialised(step: Callable, remat: bool | Callable[..., Any]) -> Callable:
  if callable(remat):
    return jax.checkpoint(step, policy=remat)
  return jax.checkpoint(step) if remat else step


def _at_step(leaf: Array, k: Array) -> Array:
  """Entry `k` of a per-step leaf's leading axis (its last entry for `k` beyond it)."""
  return jax.lax.dynamic_index_in_dim(leaf, jnp.minimum(k, jnp.shape(leaf)[0] - 1),
                                      keepdims=False)


def per_step_flags(per_step: Mask | None, params: Params) -> list[bool]:
  """Flattens a `per_step` mask against `params` (all False when None); refuses scalar leaves."""
  leaves, treedef = jax.tree.flatten(params)
  if per_step is None:
    return [False] * len(leaves)
  mask = per_step(params) if callable(per_step) else per_step
  try:
    flags = [bool(f) for f in treedef.flatten_up_to(mask)]
  except (ValueError, TypeError) as e:
    raise ValueError(f"per_step must have the structure of params ({treedef}); got {mask!r}"
                     ) from e
  flat = [f"leaf {i} {jnp.shape(leaf)}" for i, (leaf, f) in enumerate(zip(leaves, flags))
          if f and not jnp.ndim(leaf)]
  if flat:
    raise ValueError(f"per_step leaves need a leading step axis; scalars: {', '.join(flat)}")
  return flags


def _adapt_by_step(params: Params, x: Array, y: Array, flags: list[bool], *, loss_fn: LossFn,
                   num_inner_steps: int, inner_lr: Any,
                   optimizer: optax.GradientTransformation | None, first_order: bool,
                   remat: bool | Callable[..., Any], unroll: int | bool, return_losses: bool,
                   per_step_lr: bool, per_step: Mask | None,
                   observe: Callable[[Params], Any] | None) -> Params | tuple[Any, ...]:
  """`adapt` with what depends on the step index: per-step lrs and leaves, and observations."""
  leaves, treedef = jax.tree.flatten(params)
  step_flags = per_step_flags(per_step, params)
  flags = [f and not s for f, s in zip(flags, step_flags)]  # per-step leaves stay fixed
  if not any(flags):
    raise ValueError("adapt_mask selects no parameter to adapt besides the per_step ones")
  lrs = None if optimizer is not None else _lr_leaves(inner_lr, params, flags)
  if per_step_lr:
    if lrs is None:
      raise ValueError("per_step_lr needs inner_lr (plain gradient descent), not an optimizer")
    bad = [jnp.shape(lr) for lr in lrs if not jnp.ndim(lr)]
    if bad:
      raise ValueError("per_step_lr needs a leading step axis on every inner_lr leaf, got "
                       f"scalar learning rates: {bad}")

  def merge_at(new_adapted: list[Array], k: Array) -> Params:
    it = iter(new_adapted)
    return treedef.unflatten([next(it) if f else _at_step(w, k) if s else w
                              for w, f, s in zip(leaves, flags, step_flags)])

  def support_loss(adapted: list[Array], k: Array) -> Array:
    return loss_fn(merge_at(adapted, k), x, y)

  grad_fn = jax.value_and_grad(support_loss)

  def step(carry, k):
    adapted, opt_state = carry
    loss, grads = grad_fn(adapted, k)
    if first_order:
      grads = jax.lax.stop_gradient(grads)
    if optimizer is None:
      step_lrs = [_at_step(lr, k) for lr in lrs] if per_step_lr else lrs
      adapted = [w - lr * g for w, lr, g in zip(adapted, step_lrs, grads)]
    else:
      updates, opt_state = _update(optimizer, grads, opt_state, adapted, loss)
      adapted = optax.apply_updates(adapted, updates)
    out = (loss, observe(merge_at(adapted, k))) if observe is not None else (loss,)
    return (adapted, opt_state), out

  start = [w for w, f in zip(leaves, flags) if f]
  carry = (start, None if optimizer is None else optimizer.init(start))
  (adapted, _), outs = jax.lax.scan(_rematerialised(step, remat), carry,
                                    jnp.arange(num_inner_steps), unroll=unroll)
  new_params = merge_at(adapted, jnp.asarray(num_inner_steps - 1))
  extra = ((outs[0],) if return_losses else ()) + ((outs[1],) if observe is not None else ())
  return (new_params, *extra) if extra else new_params
