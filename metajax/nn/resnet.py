"""ResNet-12, the backbone of current few-shot work, as a pure `init` / `apply` `Model`.

The network of MetaOptNet (Lee et al. 2019) and of learn2learn's `ResNet12`: four residual
blocks, each

    x -> [3x3 conv -> BatchNorm -> LeakyReLU(0.1)] x 2 -> 3x3 conv -> BatchNorm -> (+) -> LeakyReLU
    x -> 1x1 conv -> BatchNorm (the shortcut) -------------------------------------^
      -> 2x2 max-pool

with 64, 160, 320 and 640 channels, then a global average pool (640 features) and the linear
head. 84x84 images end as 5x5 maps (learn2learn's 5x5 average pool is this global one) and
28x28 ones as 1x1. Params are `{"encoder": ..., "head": ...}` as every metajax model's
(`metajax.nn.models`), so MAML, ANIL, the zeroing trick and the theory module use it unchanged.

As metajax's Conv-4: BatchNorm normalises with the statistics of the batch it is given (MAML's
convention; `metajax.nn.norm`), convolutions are the im2col ones on CPU
(`metajax.nn.conv.default_conv_impl`) and max-pooling is `metajax.nn.conv.max_pool_2x2`. As
learn2learn's: convolutions have no bias (BatchNorm follows each) and their kernels start from
He's normal initialisation over the fan-out. DropBlock and dropout are not implemented: `apply`
is a deterministic function of `(params, x)`.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from metajax.nn.conv import ConvFn, max_pool_2x2
from metajax.nn.models import (BatchStatNorm, Model, _check_positive, _param_dtype,
                               _resolve_conv, model_from_encoder)
from metajax.types import Array

__all__ = ["DEFAULT_WIDTHS", "NARROW_WIDTHS", "ResNet12Encoder", "ResidualBlock", "leaky_relu",
           "resnet12"]

# Channels of the four blocks: MetaOptNet's and learn2learn's (`wider=True`).
DEFAULT_WIDTHS = (64, 160, 320, 640)
# A narrower variant for Omniglot's 28x28 characters and for quick runs.
NARROW_WIDTHS = (16, 32, 64, 128)

# learn2learn's `kaiming_normal_(mode="fan_out", nonlinearity="leaky_relu")`: variance 2 / fan_out.
_KERNEL_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def leaky_relu(x: Array) -> Array:
  """LeakyReLU with slope 0.1 for negative inputs, ResNet-12's nonlinearity."""
  return nn.leaky_relu(x, negative_slope=0.1)


class ResidualBlock(nn.Module):
  """One ResNet-12 block: three 3x3 convs with a 1x1-conv shortcut, then a 2x2 max-pool.

  Halves H and W (floor) and maps C to `features` channels.
  """

  features: int
  conv_fn: ConvFn | None = None
  activation: Callable[[Array], Array] = leaky_relu
  fused_norm: bool = True
  dtype: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    def conv(kernel: tuple[int, int], name: str) -> nn.Conv:
      return nn.Conv(self.features, kernel, padding="SAME", use_bias=False, dtype=self.dtype,
                     param_dtype=_param_dtype(self.dtype), kernel_init=_KERNEL_INIT,
                     conv_general_dilated=_resolve_conv(self.conv_fn), name=name)

    y = x
    for i in range(3):
      y = conv((3, 3), f"conv{i}")(y)
      y = BatchStatNorm(fused=self.fused_norm, name=f"norm{i}")(y)
      if i < 2:  # the third conv's output is added to the shortcut before the nonlinearity
        y = self.activation(y)
    shortcut = conv((1, 1), "shortcut_conv")(x)
    shortcut = BatchStatNorm(fused=self.fused_norm, name="shortcut_norm")(shortcut)
    return max_pool_2x2(self.activation(y + shortcut))


class ResNet12Encoder(nn.Module):
  """Four `ResidualBlock`s of `widths` channels, then a global average pool: `[N, widths[-1]]`.

  `conv_fn`, `activation`, `fused_norm` and `dtype` as in `resnet12`.
  """

  widths: Sequence[int] = DEFAULT_WIDTHS
  conv_fn: ConvFn | None = None
  activation: Callable[[Array], Array] = leaky_relu
  fused_norm: bool = True
  dtype: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    for i, width in enumerate(self.widths):
      x = ResidualBlock(width, conv_fn=self.conv_fn, activation=self.activation,
                        fused_norm=self.fused_norm, dtype=self.dtype, name=f"block{i}")(x)
    return jnp.mean(x, axis=(1, 2))  # [N, H, W, C] -> [N, C]


def resnet12(num_classes: int, *, widths: Sequence[int] = DEFAULT_WIDTHS,
             input_shape: Sequence[int] = (84, 84, 3), conv_fn: ConvFn | None = None,
             activation: Callable[[Array], Array] = leaky_relu, fused_norm: bool = True,
             dtype: Any = None) -> Model:
  """ResNet-12 + linear head (see the module docstring).

  Use the default `widths` for mini-ImageNet (84x84x3, 640 features, about 12.4M params) and
  `NARROW_WIDTHS` (or narrower) for Omniglot (28x28x1) and tests.

  Args:
    num_classes: outputs of the linear head (the number of ways).
    widths: channels of the four blocks; the features are `widths[-1]` wide.
    input_shape: `(H, W, C)` of one image; H and W at least 16 (four 2x2 max-pools).
    conv_fn: as `metajax.nn.models.conv4`'s (None: the fastest for the backend).
    activation: the nonlinearity (LeakyReLU(0.1)). A smooth one makes the MAML meta-loss smooth,
      as for `conv4`.
    fused_norm: as `conv4`'s.
    dtype: dtype of the params and the computation (`jnp.float64` under `jax.enable_x64` for
      exactness checks); None: float32 params, computed in the dtype of the inputs and params.

  Raises:
    ValueError: `widths` is not four positive ints, or the images are smaller than 16x16.
  """
  widths = tuple(widths)
  if len(widths) != 4:
    raise ValueError(f"widths must give the channels of ResNet-12's 4 blocks, got {widths!r}")
  _check_positive(num_classes=num_classes, **{f"widths[{i}]": w for i, w in enumerate(widths)})
  input_shape = tuple(int(d) for d in input_shape)
  if len(input_shape) != 3 or min(input_shape[:2]) < 16:
    raise ValueError(f"resnet12 needs input_shape (H, W, C) with H, W >= 16 (four 2x2 "
                     f"max-pools), got {input_shape}")
  encoder = ResNet12Encoder(widths=widths, conv_fn=conv_fn, activation=activation,
                            fused_norm=fused_norm, dtype=dtype)
  return model_from_encoder(encoder, num_classes, input_shape, dtype=dtype)
