"""Networks and the layers they are built from, as pure `init` / `apply` pairs.

- `models`: Conv-4 (`conv4`), Kao et al.'s Omniglot network (`kao_conv`), an MLP, and
  `model_from_encoder` for your own Flax encoder; parameters are `{"encoder": ..., "head": ...}`.
- `resnet`: ResNet-12 (`resnet12`; MetaOptNet's, learn2learn's), the same layout and layers.
- `adapters`: your own Flax model as it is: `linen_model` (Linen, `nn.BatchNorm` included, the
  standard `{"params": ...}` tree) and `nnx_model` (NNX, through `nnx.split` / `nnx.merge`).
- `conv`: convolution as patches + matmul (im2col), exact, and much faster than XLA's grouped
  convolutions on CPU under `vmap` over tasks; the 2x2 max-pool with a one-argmax derivative.
- `norm`: BatchNorm with the batch's statistics (as MAML normalises), with a compact JVP rule.
"""

from metajax.nn import adapters, conv, models, norm, resnet
from metajax.nn.resnet import resnet12

__all__ = ["adapters", "conv", "models", "norm", "resnet", "resnet12"]
