"""EfficientNet B0-B4 (Tan & Le 2019) in Flax linen.

Layout (as torchvision's and timm's `efficientnet_b*` and timm's TF ports
`tf_efficientnet_b*`):

* stem: 3x3 stride-2 conv, BatchNorm, SiLU;
* seven stages of MBConv blocks: 1x1 expansion conv + BN + SiLU (not when the
  expansion ratio is 1), kxk depthwise conv (the stage's stride on the first
  block) + BN + SiLU, squeeze-and-excitation (global mean, 1x1 reduce to a
  quarter of the block's *input* channels, SiLU, 1x1 expand, sigmoid gate),
  1x1 projection + BN; a residual (with drop path) where stride is 1 and the
  channels stay;
* 1x1 conv to 4x the last stage's channels + BN + SiLU, global average pool, `head`.

Widths scale by `width_mult` (rounded to multiples of 8, never 10% below the
exact product), depths by `depth_mult` (rounded up), as both libraries do.

Weight sources differ in two options: BatchNorm epsilon (`bn_epsilon`: 1e-5
torchvision and timm, 1e-3 the TF ports) and padding (`padding`: 'torch',
symmetric k//2, or 'tf_same', TensorFlow's 'SAME', asymmetric at stride 2,
which the TF ports were trained with).

Parameter names (converters rely on them; stages and blocks are 1-based)::

  conv_init, bn_init             stem
  stage{i}_block{j}/
    [expand_conv, expand_bn]     expansion (ratio > 1)
    dwconv, dw_bn                depthwise
    se_reduce, se_expand         squeeze-and-excitation (Dense layers with bias)
    project_conv, project_bn     projection
  conv_head, bn_head             the 1x1 conv before the pool
  head
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import functools
import math
import types
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_jax_ft.models import depthwise
from vit_jax_ft.models import drop_path
from vit_jax_ft.models import layer_impl as layer_impl_lib

# The B0 stages: (expansion ratio, kernel, stride, output channels, blocks).
B0_STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
             (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))
STEM_WIDTH = 32

# name -> (width multiplier, depth multiplier). Read-only; see `efficientnet_preset`.
EFFICIENTNET_PRESETS: Mapping[str, tuple[float, float]] = types.MappingProxyType({
    'efficientnet_b0': (1.0, 1.0),
    'efficientnet_b1': (1.0, 1.1),
    'efficientnet_b2': (1.1, 1.2),
    'efficientnet_b3': (1.2, 1.4),
    'efficientnet_b4': (1.4, 1.8),
})

_PADDINGS = ('torch', 'tf_same')
_HEAD_INITS = ('zeros', 'lecun_normal')
_conv_kernel_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def efficientnet_preset(name: str) -> dict[str, float]:
  """`EfficientNet` keyword arguments (width_mult, depth_mult) for a named architecture.

  Raises:
    ValueError: for an unknown name; the message lists the valid names.
  """
  if name not in EFFICIENTNET_PRESETS:
    raise ValueError(f'Unknown EfficientNet preset {name!r}; valid names: '
                     f'{sorted(EFFICIENTNET_PRESETS)}')
  width, depth = EFFICIENTNET_PRESETS[name]
  return {'width_mult': width, 'depth_mult': depth}


def preset_name(width_mult: float, depth_mult: float) -> str:
  """The preset with these multipliers, or 'efficientnet' for others."""
  return next((name for name, (w, d) in EFFICIENTNET_PRESETS.items()
               if math.isclose(w, width_mult) and math.isclose(d, depth_mult)), 'efficientnet')


def round_channels(channels: float, divisor: int = 8) -> int:
  """channels rounded to a multiple of `divisor`, at least `divisor`, never 10% below."""
  rounded = max(divisor, int(channels + divisor / 2) // divisor * divisor)
  return rounded + divisor if rounded < 0.9 * channels else rounded


def stage_specs(width_mult: float, depth_mult: float) -> list[tuple[int, int, int, int, int]]:
  """Per stage (expansion, kernel, stride, output channels, blocks) at these multipliers."""
  return [(e, k, s, round_channels(c * width_mult), int(math.ceil(n * depth_mult)))
          for e, k, s, c, n in B0_STAGES]


def _pad(kernel: int, padding: str):
  """Explicit symmetric k//2 padding (PyTorch), or TensorFlow's 'SAME'."""
  return 'SAME' if padding == 'tf_same' else ((kernel // 2, kernel // 2),) * 2


class SqueezeExcite(nn.Module):
  """x * sigmoid(expand(SiLU(reduce(mean(x))))); the gate is computed in float32."""

  squeeze: int
  dense: Any = nn.Dense

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    s = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    s = nn.silu(self.dense(self.squeeze, name='se_reduce')(s))
    gate = nn.sigmoid(self.dense(x.shape[-1], name='se_expand')(s))
    return (x.astype(jnp.float32) * gate[:, None, None, :]).astype(x.dtype)


class MBConv(nn.Module):
  """Mobile inverted bottleneck with squeeze-and-excitation (EfficientNet's block)."""

  features: int
  expansion: int
  kernel: int
  strides: int = 1
  padding: str = 'torch'
  drop_path_rate: float = 0.0
  conv: Any = nn.Conv
  norm: Any = nn.BatchNorm
  depthwise_impl: str = 'project'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    # `train` is positional so that nn.remat can mark it static; BatchNorm's mode is bound
    # into `norm` by the parent, here it only switches drop path.
    cin = x.shape[-1]
    y = x
    if self.expansion != 1:
      y = self.conv(cin * self.expansion, (1, 1), name='expand_conv')(y)
      y = nn.silu(self.norm(name='expand_bn')(y))
    y = depthwise.DepthwiseConv((self.kernel, self.kernel), (self.strides, self.strides),
                                _pad(self.kernel, self.padding), use_bias=False,
                                dtype=self.dtype, kernel_init=_conv_kernel_init,
                                impl=self.depthwise_impl, name='dwconv')(y)
    y = nn.silu(self.norm(name='dw_bn')(y))
    dense = functools.partial(nn.Dense, dtype=jnp.float32, param_dtype=jnp.float32)
    y = SqueezeExcite(max(1, cin // 4), dense, name='se')(y)
    y = self.conv(self.features, (1, 1), name='project_conv')(y)
    if self.strides != 1 or cin != self.features:
      return self.norm(name='project_bn')(y)
    scale = None
    if train and self.drop_path_rate > 0.0:
      scale = drop_path.sample_scale(self.make_rng('dropout'), x.shape[0], self.drop_path_rate)
    # bn(y) * scale + x in one pass (models/batch_norm.py).
    return self.norm(name='project_bn')(y, x, scale)


class EfficientNet(nn.Module):
  """EfficientNet classifier on NHWC images; returns float32 logits.

  Attributes:
    num_classes: head size; 0 returns the pooled features (float32 [B, C]).
    width_mult, depth_mult: the compound-scaling multipliers (B0: 1.0, 1.0).
    bn_epsilon: BatchNorm epsilon (1e-5 torchvision/timm, 1e-3 TF ports).
    bn_momentum: running-average momentum, Flax convention (1 - PyTorch's).
    padding: 'torch' or 'tf_same' (TF ports).
    head_init, head_bias_init: the new head's initialisation.
    remat: recompute each block in the backward pass.
    drop_path_rate: stochastic depth on the residual blocks, linear from 0 at
      the first block to this at the last ('dropout' RNG stream).
    dtype: compute dtype; parameters stay float32, BatchNorm statistics, the
      squeeze-and-excitation gate, the pool and the head run in float32.
    layer_impl: 'auto', 'project' or 'flax' (models/layer_impl.py) for the
      1x1 convs and BatchNorm. Same parameters.
  """

  num_classes: int
  width_mult: float = 1.0
  depth_mult: float = 1.0
  bn_epsilon: float = 1e-5
  bn_momentum: float = 0.9
  padding: str = 'torch'
  head_init: str = 'zeros'
  head_bias_init: float = 0.0
  remat: bool = False
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32
  layer_impl: Any = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    if self.padding not in _PADDINGS:
      raise ValueError(f'padding must be one of {_PADDINGS}, got {self.padding!r}')
    if self.head_init not in _HEAD_INITS:
      raise ValueError(f'head_init must be one of {_HEAD_INITS}, got {self.head_init!r}')
    layers = layer_impl_lib.resolve(self.layer_impl)
    conv = functools.partial(layers.conv_module(), use_bias=False, dtype=self.dtype,
                             param_dtype=jnp.float32, kernel_init=_conv_kernel_init)
    norm = functools.partial(layers.norm_module(), use_running_average=not train,
                             momentum=self.bn_momentum, epsilon=self.bn_epsilon,
                             dtype=self.dtype, param_dtype=jnp.float32)
    x = conv(round_channels(STEM_WIDTH * self.width_mult), (3, 3), (2, 2),
             padding=_pad(3, self.padding), name='conv_init')(x)
    x = nn.silu(norm(name='bn_init')(x))
    self.sow('intermediates', 'stem', x)

    specs = stage_specs(self.width_mult, self.depth_mult)
    block_cls = nn.remat(MBConv, static_argnums=(2,)) if self.remat else MBConv
    rates = iter(drop_path.block_rates(self.drop_path_rate, sum(n for *_, n in specs)))
    for i, (expansion, kernel, stride, features, blocks) in enumerate(specs):
      for j in range(blocks):
        x = block_cls(features=features, expansion=expansion, kernel=kernel,
                      strides=stride if j == 0 else 1, padding=self.padding,
                      drop_path_rate=next(rates), conv=conv, norm=norm,
                      depthwise_impl=layers.conv, dtype=self.dtype,
                      name=f'stage{i + 1}_block{j + 1}')(x, train)

    x = conv(4 * specs[-1][3], (1, 1), name='conv_head')(x)
    x = nn.silu(norm(name='bn_head')(x))
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    if self.num_classes == 0:
      return x
    kernel_init = (nn.initializers.zeros if self.head_init == 'zeros'
                   else nn.initializers.lecun_normal())
    return nn.Dense(self.num_classes, dtype=jnp.float32, param_dtype=jnp.float32,
                    kernel_init=kernel_init,
                    bias_init=nn.initializers.constant(self.head_bias_init), name='head')(x)
