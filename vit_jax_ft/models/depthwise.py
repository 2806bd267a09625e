"""Depthwise convolution (one kxk filter per channel), shared by ConvNeXt and EfficientNet.

Parameters are nn.Conv's for `feature_group_count=channels` (kernel
[kh, kw, 1, C], optional bias [C]), so a PyTorch depthwise weight [C, 1, kh,
kw] converts with the usual OIHW -> HWIO transpose. The convolution
accumulates in float32 in every compute dtype and returns `dtype`.
"""

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp


class DepthwiseConv(nn.Module):
  """kxk depthwise convolution over NHWC inputs.

  Attributes:
    kernel_size: (kh, kw).
    strides: (sh, sw).
    padding: explicit ((top, bottom), (left, right)) or 'SAME' (TensorFlow's,
      asymmetric at stride 2 on even inputs) or 'VALID'.
    use_bias: add a per-channel bias.
    dtype: compute and output dtype; the kernel is stored in float32.
  """

  kernel_size: Sequence[int]
  strides: Sequence[int] = (1, 1)
  padding: Any = 'SAME'
  use_bias: bool = True
  dtype: Any = jnp.float32
  kernel_init: Callable = nn.linear.default_kernel_init

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    kh, kw = self.kernel_size
    kernel = self.param('kernel', self.kernel_init, (kh, kw, 1, c), jnp.float32)
    y = lax.conv_general_dilated(
        x.astype(self.dtype), kernel.astype(self.dtype), tuple(self.strides), self.padding,
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=c,
        preferred_element_type=jnp.float32)
    if self.use_bias:
      y = y + self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    return y.astype(self.dtype)
