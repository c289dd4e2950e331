"""Few-shot models as pure functions: `init(key) -> params`, `apply(params, x) -> outputs`.

Flax linen modules are used only to build these functions. Params are always a dict
`{"encoder": ..., "head": ...}` so that the encoder phi and the linear head w can be told apart
(head-only adaptation, the zeroing trick, the contrastive decomposition all rely on it).

BatchNorm here always normalises with the statistics of the batch it is given and keeps no
running averages: that is how MAML uses it (support and query are normalised separately), and it
keeps `apply` a pure function of `(params, x)`.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from metajax.nn.conv import ConvFn, default_conv_impl, max_pool_2x2
from metajax.nn.norm import batch_stat_norm
from metajax.types import ApplyFn, Array, Params, PRNGKey


class Model(NamedTuple):
  """A model as a bundle of pure functions.

  Attributes:
    init: `key -> params`, params being `{"encoder": ..., "head": ...}` for metajax's models
      (the adapters of `metajax.nn.adapters` give their framework's own tree).
    apply: `(params, x) -> outputs`, i.e. `head(params["head"], features(params, x))`.
    features: `(params, x) -> phi(x)`, the encoder output `[N, D]` (None if unknown).
    head: `(head_params, phi) -> outputs`, the linear head alone (None if unknown).
    feature_dim: D, the width of phi(x) (None if unknown).
    input_shape: shape of one input example, e.g. `(28, 28, 1)`.
  """

  init: Callable[[PRNGKey], Params]
  apply: ApplyFn
  features: ApplyFn | None
  head: ApplyFn | None
  feature_dim: int | None
  input_shape: tuple[int, ...]


class BatchStatNorm(nn.Module):
  """BatchNorm that always uses the current batch's statistics (no running averages).

  Normalises over every axis but the last (N, H, W for images), then applies a learned per-channel
  scale and bias (`metajax.nn.norm.batch_stat_norm`; `fused=False` differentiates the plain formula).
  """

  epsilon: float = 1e-5
  fused: bool = True

  @nn.compact
  def __call__(self, x: Array) -> Array:
    features = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (features,), x.dtype)
    bias = self.param("bias", nn.initializers.zeros, (features,), x.dtype)
    return batch_stat_norm(x, scale, bias, self.epsilon, fused=self.fused)


class Conv4Encoder(nn.Module):
  """The standard few-shot Conv-4 (Vinyals et al. 2016; Finn et al. 2017).

  Four blocks of 3x3 conv (SAME) -> BatchNorm (batch statistics) -> ReLU -> 2x2 max-pool, then
  flatten. 28x28x1 gives 64 features with 64 filters; 84x84x3 gives 5*5*32 = 800 with 32.
  `conv_fn=None` (the default) uses `metajax.nn.conv.default_conv_impl()` for the backend it is
  traced on (see `conv4`).
  """

  filters: int = 64
  num_blocks: int = 4
  conv_fn: ConvFn | None = None
  activation: Callable[[Array], Array] = nn.relu
  fused_norm: bool = True
  dtype: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    for i in range(self.num_blocks):
      x = nn.Conv(self.filters, (3, 3), padding="SAME", dtype=self.dtype,
                  param_dtype=_param_dtype(self.dtype),
                  conv_general_dilated=_resolve_conv(self.conv_fn), name=f"conv{i}")(x)
      x = BatchStatNorm(fused=self.fused_norm, name=f"norm{i}")(x)
      x = self.activation(x)
      x = max_pool_2x2(x)
    return x.reshape(x.shape[0], -1)


class KaoConvEncoder(nn.Module):
  """The Omniglot encoder of Kao et al.'s official code.

  Three 3x3 convs with stride 2 and no padding (28 -> 13 -> 6 -> 2), then a 2x2 conv (2 -> 1),
  each followed by ReLU then BatchNorm (batch statistics); no pooling; 64 features. `conv_fn`
  as `Conv4Encoder`'s.
  """

  filters: int = 64
  conv_fn: ConvFn | None = None
  activation: Callable[[Array], Array] = nn.relu
  fused_norm: bool = True
  dtype: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    specs = [((3, 3), (2, 2))] * 3 + [((2, 2), (1, 1))]
    for i, (kernel, strides) in enumerate(specs):
      x = nn.Conv(self.filters, kernel, strides=strides, padding="VALID", dtype=self.dtype,
                  param_dtype=_param_dtype(self.dtype),
                  conv_general_dilated=_resolve_conv(self.conv_fn), name=f"conv{i}")(x)
      x = self.activation(x)
      x = BatchStatNorm(fused=self.fused_norm, name=f"norm{i}")(x)
    return x.reshape(x.shape[0], -1)


class MLPEncoder(nn.Module):
  """A ReLU MLP encoder (e.g. 1 -> 40 -> 40 for the sinusoid tasks of Finn et al.)."""

  hidden: Sequence[int] = (40, 40)
  activation: Callable[[Array], Array] = nn.relu
  dtype: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = x.reshape(x.shape[0], -1)
    for i, width in enumerate(self.hidden):
      dense = nn.Dense(width, dtype=self.dtype, param_dtype=_param_dtype(self.dtype),
                       name=f"dense{i}")
      x = self.activation(dense(x))
    return x


class _Classifier(nn.Module):
  encoder: nn.Module
  num_outputs: int
  dtype: Any = None

  def setup(self):
    self.head = nn.Dense(self.num_outputs, dtype=self.dtype,
                         param_dtype=_param_dtype(self.dtype))

  def __call__(self, x: Array) -> Array:
    return self.head(self.encoder(x))

  def features(self, x: Array) -> Array:
    return self.encoder(x)


def model_from_encoder(encoder: nn.Module, num_outputs: int,
                       input_shape: Sequence[int], *, dtype: Any = None) -> Model:
  """Wraps a linen encoder `x [N, ...] -> phi [N, D]` and a linear head into a `Model`.

  Use this to run metajax on your own Flax encoder. The encoder module must be unbound and have
  no mutable collections (use `BatchStatNorm` rather than `nn.BatchNorm`, or wrap the whole
  model with `metajax.nn.adapters.linen_model`). `dtype`: that of the head's params and
  computation and of the dummy input init traces with (float64 for exactness checks, under
  `jax.enable_x64`); None: float32 params, computed in the dtype of the inputs and params.
  """
  input_shape = tuple(int(d) for d in input_shape)
  module = _Classifier(encoder=encoder.clone(name="encoder"), num_outputs=num_outputs,
                       dtype=dtype)
  dummy = jnp.zeros((2, *input_shape), _param_dtype(dtype))

  # Jitted: run eagerly, flax's initialisers compile one small XLA program per op (seconds).
  @jax.jit
  def init(key: PRNGKey) -> Params:
    variables = module.init(key, dummy)
    extra = set(variables) - {"params"}
    if extra:
      raise ValueError(f"the encoder has mutable collections {sorted(extra)}; metajax models must "
                       "be pure functions of params (use metajax.nn.models.BatchStatNorm, or "
                       "metajax.nn.adapters.linen_model for a module with nn.BatchNorm)")
    return dict(variables["params"])

  def apply(params: Params, x: Array) -> Array:
    return module.apply({"params": params}, x)

  def features(params: Params, x: Array) -> Array:
    return module.apply({"params": params}, x, method=_Classifier.features)

  head_module = nn.Dense(num_outputs, dtype=dtype, param_dtype=_param_dtype(dtype))

  def head(head_params: Params, phi: Array) -> Array:
    return head_module.apply({"params": head_params}, phi)

  feature_dim = _feature_dim(module, dummy)
  return Model(init=init, apply=apply, features=features, head=head, feature_dim=feature_dim,
               input_shape=input_shape)


def _feature_dim(module: _Classifier, dummy: Array) -> int:
  enc = module.encoder.clone(parent=None)
  variables = jax.eval_shape(enc.init, jax.random.key(0), dummy)
  out = jax.eval_shape(enc.apply, variables, dummy)
  if out.ndim != 2 or out.shape[-1] < 1:
    raise ValueError(f"the encoder maps inputs of shape {dummy.shape[1:]} to {out.shape[1:]}; it "
                     "must give a non-empty feature vector [N, D] (is the image too small for its "
                     "pooling layers?)")
  return int(out.shape[-1])


def conv4(num_classes: int, *, filters: int = 64, input_shape: Sequence[int] = (28, 28, 1),
          conv_fn: ConvFn | None = None,
          activation: Callable[[Array], Array] = nn.relu, fused_norm: bool = True,
          dtype: Any = None) -> Model:
  """Conv-4 + linear head. Use `filters=64, input_shape=(28, 28, 1)` for Omniglot and
  `filters=32, input_shape=(84, 84, 3)` for mini-ImageNet.

  Args:
    num_classes: outputs of the linear head (the number of ways).
    filters: channels of every conv layer.
    input_shape: `(H, W, C)` of one image.
    conv_fn: a function with `jax.lax.conv_general_dilated`'s signature; None picks the fastest
      one measured for the backend (`metajax.nn.conv.default_conv_impl`). Either is right under
      `metajax.platform.xla.jit`; on CPU plain `jax.jit` computed second-order meta-gradients through
      `jax.lax.conv_general_dilated` up to 60% off (jaxlib 0.10.2, `metajax.platform.xla`).
    activation: the nonlinearity. With ReLU the MAML meta-loss is only piecewise smooth (the
      inner gradient jumps where a pre-activation changes sign); a smooth one such as softplus
      makes it smooth, which finite-difference checks need.
    fused_norm: BatchNorm differentiated through its compact JVP rule (`metajax.nn.norm`, faster);
      False differentiates the plain formula (a reference; the same values within rounding).
    dtype: dtype of the params and the computation (`jnp.float64` under `jax.enable_x64` for
      exactness checks); None: float32 params, computed in the dtype of the inputs and params.
  """
  _check_positive(num_classes=num_classes, filters=filters)
  encoder = Conv4Encoder(filters=filters, conv_fn=conv_fn, activation=activation,
                         fused_norm=fused_norm, dtype=dtype)
  return model_from_encoder(encoder, num_classes, input_shape, dtype=dtype)


def kao_conv(num_classes: int, *, filters: int = 64, input_shape: Sequence[int] = (28, 28, 1),
             conv_fn: ConvFn | None = None,
             activation: Callable[[Array], Array] = nn.relu, fused_norm: bool = True,
             dtype: Any = None) -> Model:
  """Kao et al.'s Omniglot network (see `KaoConvEncoder`) + linear head; arguments as `conv4`."""
  _check_positive(num_classes=num_classes, filters=filters)
  encoder = KaoConvEncoder(filters=filters, conv_fn=conv_fn, activation=activation,
                           fused_norm=fused_norm, dtype=dtype)
  return model_from_encoder(encoder, num_classes, input_shape, dtype=dtype)


def mlp(num_outputs: int, *, hidden: Sequence[int] = (40, 40), input_shape: Sequence[int] = (1,),
        activation: Callable[[Array], Array] = nn.relu, dtype: Any = None) -> Model:
  """ReLU MLP + linear head; the sinusoid model of Finn et al. is `mlp(1, hidden=(40, 40))`.

  `dtype`: that of the params and the computation (as `conv4`'s).
  """
  _check_positive(num_outputs=num_outputs, **{f"hidden[{i}]": h for i, h in enumerate(hidden)})
  return model_from_encoder(MLPEncoder(hidden=tuple(hidden), activation=activation, dtype=dtype),
                            num_outputs, input_shape, dtype=dtype)


def _param_dtype(dtype: Any) -> Any:
  return jnp.float32 if dtype is None else dtype


def _resolve_conv(conv_fn: ConvFn | None) -> ConvFn:
  # Resolved when the model is traced, for the backend JAX runs it on.
  if conv_fn is None:
    return default_conv_impl()
  return conv_fn


def _check_positive(**values: Any) -> None:
  for name, value in values.items():
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"{name} must be a positive int, got {value!r}")
