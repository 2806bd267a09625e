"""Depthwise convolution (one kxk filter per channel), shared by ConvNeXt and EfficientNet.

Parameters are nn.Conv's for `feature_group_count=channels` (kernel
[kh, kw, 1, C], optional bias [C]), so a PyTorch depthwise weight [C, 1, kh,
kw] converts with the usual OIHW -> HWIO transpose. The convolution
accumulates in float32 in every compute dtype and returns `dtype`.

`impl='project'` (the CPU path, models/layer_impl.py) writes it as the kh*kw
shifted windows of the float32 input times their per-channel tap, summed:
XLA:CPU fuses that, forward and backward, into a few elementwise loops, where
its own depthwise convolution's gradient is 3-11x slower (fwd+bwd of
EfficientNet/ConvNeXt shapes, `python benchmarks/layers.py --depthwise`).
`impl='flax'` is `lax.conv_general_dilated` with one group per channel.
"""

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

from vit_jax_ft.models import precision


class DepthwiseConv(nn.Module):
  """kxk depthwise convolution over NHWC inputs.

  Attributes:
    kernel_size: (kh, kw).
    strides: (sh, sw).
    padding: explicit ((top, bottom), (left, right)) or 'SAME' (TensorFlow's,
      asymmetric at stride 2 on even inputs) or 'VALID'.
    use_bias: add a per-channel bias.
    dtype: compute and output dtype; the kernel is stored in float32.
    impl: 'project' (shifted windows, float32) or 'flax' (lax's grouped conv).
  """

  kernel_size: Sequence[int]
  strides: Sequence[int] = (1, 1)
  padding: Any = 'SAME'
  use_bias: bool = True
  dtype: Any = jnp.float32
  kernel_init: Callable = nn.linear.default_kernel_init
  impl: str = 'project'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    kh, kw = self.kernel_size
    kernel = self.param('kernel', self.kernel_init, (kh, kw, 1, c), jnp.float32)
    if self.impl == 'project':
      y = shifted_depthwise(x.astype(self.dtype), kernel.astype(self.dtype),
                            tuple(self.strides), self.padding)
    elif self.impl == 'flax':
      y = lax.conv_general_dilated(
          x.astype(self.dtype), kernel.astype(self.dtype), tuple(self.strides), self.padding,
          dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=c,
          preferred_element_type=jnp.float32)
    else:
      raise ValueError(f"DepthwiseConv {self.name}: impl must be 'project' or 'flax', "
                       f"got {self.impl!r}.")
    if self.use_bias:
      y = y + self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    return y.astype(self.dtype)


def shifted_depthwise(x: jax.Array, kernel: jax.Array, strides: Sequence[int],
                      padding: Any) -> jax.Array:
  """Depthwise conv of NHWC `x` with an [kh, kw, 1, C] kernel as a float32 sum of shifted taps.

  The operands are rounded to their dtype first (as a bfloat16 conv sees them),
  then everything runs in float32, so the input's gradient is summed in float32.
  """
  kh, kw = kernel.shape[:2]
  windows = precision.shifted_windows(x.astype(jnp.float32), (kh, kw), strides, padding)
  taps = kernel.astype(jnp.float32)[:, :, 0].reshape(kh * kw, -1)
  y = windows[0] * taps[0]
  for window, tap in zip(windows[1:], taps[1:]):
    y = y + window * tap
  return y
