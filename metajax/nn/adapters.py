"""Your own Flax model as metajax's pure `init(key) -> params`, `apply(params, x) -> outputs`.

- `linen_model`: a Linen module, `nn.BatchNorm` included; params are Flax's standard
  `{"params": {...}}` tree.
- `nnx_model`: an NNX module (or a `rngs -> module` factory), through `nnx.split` / `nnx.merge`;
  params are the module's `nnx.Param` state.

BatchNorm, two conventions (`batch_norm=`):

- `"batch"` (MAML's usual, transductive): every call normalises with the statistics of the batch
  it is given (the support and the query of a task separately); running averages are neither
  read nor kept, so `apply` stays a pure function of `(params, x)`.
- `"stored"` (inductive): normalise with fixed stored statistics, e.g. for evaluation one query
  example at a time. For Linen they are the `batch_stats=` collection you pass (from your own
  training, or `linen_batch_stats`); for NNX, those held by the module you pass.

The head is found by `metajax.variants.HeadSpec`: by default, a submodule named `head`, so
`metajax.head_mask` (ANIL) and `metajax.with_zeroing` work on these params as they are.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Mapping, Sequence

import flax.core
import flax.linen as nn
import jax
import jax.numpy as jnp

from metajax.nn.models import Model
from metajax.types import Array, Params, PRNGKey

BatchNormMode = Literal["batch", "stored"]
_MODES = ("batch", "stored")


def _check_mode(batch_norm: Any) -> None:
  if batch_norm not in _MODES:
    raise ValueError(f"batch_norm must be one of {_MODES} (batch: statistics of each batch, "
                     f"MAML's convention; stored: fixed statistics), got {batch_norm!r}")


def linen_model(module: nn.Module, input_shape: Sequence[int], *,
                batch_norm: BatchNormMode = "batch",
                batch_stats: Mapping[str, Any] | None = None,
                call_kwargs: Mapping[str, Any] | None = None,
                features_method: str | Callable[..., Any] | None = None,
                dtype: Any = jnp.float32) -> Model:
  """A Linen module `x [N, ...] -> outputs` as a `Model` whose params are `{"params": {...}}`.

  Args:
    module: an unbound Linen module, e.g. a CNN with `nn.BatchNorm` layers and a final
      `nn.Dense(ways, name="head")`.
    input_shape: shape of one input example, e.g. `(28, 28, 1)`.
    batch_norm: "batch" (each batch's own statistics; the module's other collections are
      mutable and their updates dropped) or "stored" (`batch_stats` is read, nothing mutates).
      Your module decides which it does from `call_kwargs`, as Flax modules do, e.g.
      `nn.BatchNorm(use_running_average=not train)` with `call_kwargs={"train": True}` for
      "batch" and `{"train": False}` for "stored".
    batch_stats: the stored statistics (the `batch_stats` collection); needed by "stored" only.
    call_kwargs: keyword arguments of every call of the module (init and apply).
    features_method: the module's method (or its name) giving the encoder output `[N, D]`,
      for `Model.features` (the theory module needs it); None: no `features`.
    dtype: dtype of the dummy input init traces the module with (float64 under
      `jax.enable_x64` for exactness checks, with a module that follows its input's dtype or
      was built with `param_dtype=jnp.float64`).

  Returns:
    A `Model`; `head` and `feature_dim` are None unless `features_method` gives features.
  """
  _check_mode(batch_norm)
  if not isinstance(module, nn.Module):
    raise TypeError(f"module must be a flax.linen Module, got {type(module).__name__}")
  if batch_norm == "stored" and batch_stats is None:
    raise ValueError("batch_norm='stored' needs batch_stats= (the batch_stats collection, e.g. "
                     "from metajax.nn.adapters.linen_batch_stats)")
  if batch_norm == "batch" and batch_stats is not None:
    raise ValueError("batch_stats= is read only with batch_norm='stored'")
  input_shape = tuple(int(d) for d in input_shape)
  kwargs = dict(call_kwargs or {})
  dummy = jnp.zeros((2, *input_shape), dtype)

  @jax.jit  # eager flax initialisers compile one small program per op
  def init(key: PRNGKey) -> Params:
    return {"params": module.init(key, dummy, **kwargs)["params"]}

  def _variables(params: Params) -> dict[str, Any]:
    if not isinstance(params, Mapping) or "params" not in params:
      raise ValueError(f"params must be Flax's {{'params': ...}} tree, got "
                       f"{type(params).__name__} {list(params) if isinstance(params, Mapping) else ''}")
    if batch_norm == "stored":
      return {"params": params["params"], "batch_stats": batch_stats}
    return {"params": params["params"]}

  def _call(params: Params, x: Array, method: Any = None) -> Array:
    variables = _variables(params)
    if batch_norm == "stored":
      return module.apply(variables, x, method=method, **kwargs)
    # Every collection but params is mutable: BatchNorm's running averages are created, updated
    # and dropped, so the output depends on this batch's statistics only.
    out, _ = module.apply(variables, x, method=method, mutable=_NOT_PARAMS, **kwargs)
    return out

  def apply(params: Params, x: Array) -> Array:
    return _call(params, x)

  features = feature_dim = None
  if features_method is not None:
    def features(params: Params, x: Array) -> Array:
      return _call(params, x, features_method)

    shapes = jax.eval_shape(init, jax.random.key(0))
    feature_dim = int(jax.eval_shape(features, shapes, dummy).shape[-1])
  return Model(init=init, apply=apply, features=features, head=None, feature_dim=feature_dim,
               input_shape=input_shape)


_NOT_PARAMS = flax.core.DenyList("params")


def linen_batch_stats(module: nn.Module, params: Params, x: Array, *,
                      batch_stats: Mapping[str, Any] | None = None,
                      call_kwargs: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """The `batch_stats` collection after one forward pass of `x` (e.g. a large training batch).

  It is the module's own update (`nn.BatchNorm`'s momentum average, from `batch_stats`, or from
  init's values when None); call it on several batches to average over them, or build the module
  with `momentum=0.0` to get the statistics of `x` alone. Pass the result to
  `linen_model(..., batch_norm="stored", batch_stats=...)`.
  """
  variables = {"params": params["params"]}
  if batch_stats is not None:
    variables["batch_stats"] = batch_stats
  _, updates = module.apply(variables, x, mutable=["batch_stats"], **dict(call_kwargs or {}))
  if "batch_stats" not in updates:
    raise ValueError("the module keeps no batch_stats collection (is call_kwargs selecting its "
                     "training mode, e.g. {'train': True}?)")
  return dict(updates["batch_stats"])


def nnx_model(module: Any, input_shape: Sequence[int], *,
              batch_norm: BatchNormMode = "batch",
              features_method: str | None = None) -> Model:
  """An NNX module as a `Model`: params are its `nnx.Param` state, `apply` merges and calls it.

  Args:
    module: an `nnx.Module`, or a factory `rngs -> nnx.Module` (then `init(key)` builds a fresh
      module from `nnx.Rngs(key)`; without a factory, `init` returns the module's own params
      whatever the key).
    input_shape: shape of one input example.
    batch_norm: "batch": the module runs in training mode (`module.train()`: `nnx.BatchNorm`
      uses each batch's statistics; their running averages are dropped); "stored": evaluation
      mode (`module.eval()`: the running statistics held by `module`, or by the factory's
      module for `nnx.Rngs(0)`, are used). Dropout layers follow the same switch, with the rng
      state fixed at construction.
    features_method: the module's method name giving the encoder output `[N, D]`, for
      `Model.features`; None: no `features`.
  """
  from flax import nnx  # local: NNX is only needed by this adapter

  _check_mode(batch_norm)
  factory = None
  if not isinstance(module, nnx.Module):
    if not callable(module):
      raise TypeError(f"module must be an nnx.Module or a factory rngs -> nnx.Module, got "
                      f"{type(module).__name__}")
    factory = module
    module = factory(nnx.Rngs(0))
    if not isinstance(module, nnx.Module):
      raise TypeError(f"the factory must return an nnx.Module, got {type(module).__name__}")
  graphdef, own_params, rest = nnx.split(module, nnx.Param, ...)
  input_shape = tuple(int(d) for d in input_shape)

  if factory is None:
    def init(key: PRNGKey) -> Params:
      del key  # the module's own params
      return jax.tree.map(jnp.array, own_params)
  else:
    @jax.jit
    def init(key: PRNGKey) -> Params:
      return nnx.split(factory(nnx.Rngs(key)), nnx.Param, ...)[1]

  def _merged(params: Params) -> Any:
    # copy=True: fresh Variables at the caller's trace level (the mode's writes, e.g. batch
    # statistics, land on this copy and are dropped).
    m = nnx.merge(graphdef, params, rest, copy=True)
    if batch_norm == "batch":
      m.train()
    else:
      m.eval()
    return m

  def apply(params: Params, x: Array) -> Array:
    return _merged(params)(x)

  features = feature_dim = None
  if features_method is not None:
    def features(params: Params, x: Array) -> Array:
      return getattr(_merged(params), features_method)(x)

    dummy = jax.ShapeDtypeStruct((2, *input_shape), jnp.result_type(*jax.tree.leaves(own_params)))
    feature_dim = int(jax.eval_shape(features, own_params, dummy).shape[-1])
  return Model(init=init, apply=apply, features=features, head=None, feature_dim=feature_dim,
               input_shape=input_shape)


__all__ = ["BatchNormMode", "linen_batch_stats", "linen_model", "nnx_model"]
