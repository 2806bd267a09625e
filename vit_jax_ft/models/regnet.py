"""RegNetX / RegNetY (Radosavovic et al. 2020, 'Designing Network Design Spaces') in Flax linen.

The network torchvision's ``regnet_{x,y}_*`` and timm's ``regnet{x,y}_0*``
build: a 3x3 stride-2 conv-BN-ReLU stem (32 channels), four stages that each
halve the resolution in their first block, global average pooling and a
linear head. Every block is an 'X block': 1x1 conv -> 3x3 grouped conv
(stride on it; groups of ``group_width`` channels) -> [squeeze-and-excitation,
RegNetY] -> 1x1 conv, BatchNorm after each conv, ReLU after the first two and
after the residual add; the shortcut is a strided 1x1 conv-BN where the shape
changes. Padding is explicit and symmetric, as in PyTorch.

The squeeze-and-excitation bottleneck is ``round(se_ratio * block input width)``
channels wide (torchvision's and timm's choice, not the SE paper's 1/16 of the
gated width). The presets hold the published per-stage depths, widths and
group widths that both libraries derive from each model's (w_0, w_a, w_m,
depth, group width) parameters, so nothing here re-derives them.

Parameter names (stable; converters rely on them), shared with models/resnet.py
so that layer decay, freezing by path and frozen BatchNorm treat both alike::

  conv_init, bn_init                 stem       torchvision stem.0/1, timm stem.conv/bn
  stage{i}_block{j}/                 i, j 1-based: torchvision trunk_output.block{i}.block{i}-{j-1},
                                                   timm s{i}.b{j}
    conv1, bn1                       1x1        torchvision f.a.0/1,  timm conv1.conv/bn
    conv2, bn2                       3x3 group  torchvision f.b.0/1,  timm conv2.conv/bn
    [se/fc1, se/fc2]                 SE (Y)     torchvision f.se.fc1/fc2, timm se.fc1/fc2
    conv3, bn3                       1x1        torchvision f.c.0/1,  timm conv3.conv/bn
    [proj_conv, proj_bn]             shortcut   torchvision proj.0/1, timm downsample.conv/bn
  head                               Dense      torchvision fc, timm head.fc

BatchNorm follows models/resnet.py: running statistics in ``batch_stats``,
``bn_momentum`` in the Flax convention (1 - PyTorch's 0.1), epsilon 1e-5 as
both libraries use.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import functools
import types
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_jax_ft.models import batch_norm
from vit_jax_ft.models import drop_path
from vit_jax_ft.models import layer_impl as layer_impl_lib
from vit_jax_ft.models import precision

# torchvision initialises every conv (the SE's 1x1 convs too) with
# normal(0, sqrt(2 / fan_out)); pretrained weights overwrite it anyway.
_kernel_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
_PAD_3x3 = ((1, 1), (1, 1))
_HEAD_INITS = ('zeros', 'lecun_normal')

# name -> (depths, widths, group_widths, se_ratio), read off the built models.
# 'regnet{x,y}_<flops>': torchvision's regnet_{x,y}_<flops>, which are timm's
# regnet{x,y}_0NN too, except timm's regnetx_004 / regnety_008 / regnety_080
# (pycls' own widths: below under timm's names; timm calls torchvision's
# `_tv`). 'regnet{x,y}_0NN': timm's models that torchvision lacks.
# A read-only mapping of tuples; `regnet_preset` gives RegNet keyword arguments.
REGNET_PRESETS: Mapping[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], float]] = (
    types.MappingProxyType({
        'regnetx_400mf': ((1, 2, 7, 12), (32, 64, 160, 400), (16, 16, 16, 16), 0.0),
        'regnetx_800mf': ((1, 3, 7, 5), (64, 128, 288, 672), (16, 16, 16, 16), 0.0),
        'regnetx_1_6gf': ((2, 4, 10, 2), (72, 168, 408, 912), (24, 24, 24, 24), 0.0),
        'regnetx_3_2gf': ((2, 6, 15, 2), (96, 192, 432, 1008), (48, 48, 48, 48), 0.0),
        'regnetx_8gf': ((2, 5, 15, 1), (80, 240, 720, 1920), (80, 120, 120, 120), 0.0),
        'regnetx_16gf': ((2, 6, 13, 1), (256, 512, 896, 2048), (128, 128, 128, 128), 0.0),
        'regnetx_32gf': ((2, 7, 13, 1), (336, 672, 1344, 2520), (168, 168, 168, 168), 0.0),
        'regnety_400mf': ((1, 3, 6, 6), (48, 104, 208, 440), (8, 8, 8, 8), 0.25),
        'regnety_800mf': ((1, 3, 8, 2), (64, 144, 320, 784), (16, 16, 16, 16), 0.25),
        'regnety_1_6gf': ((2, 6, 17, 2), (48, 120, 336, 888), (24, 24, 24, 24), 0.25),
        'regnety_3_2gf': ((2, 5, 13, 1), (72, 216, 576, 1512), (24, 24, 24, 24), 0.25),
        'regnety_8gf': ((2, 4, 10, 1), (224, 448, 896, 2016), (56, 56, 56, 56), 0.25),
        'regnety_16gf': ((2, 4, 11, 1), (224, 448, 1232, 3024), (112, 112, 112, 112), 0.25),
        'regnety_32gf': ((2, 5, 12, 1), (232, 696, 1392, 3712), (232, 232, 232, 232), 0.25),
        'regnetx_002': ((1, 1, 4, 7), (24, 56, 152, 368), (8, 8, 8, 8), 0.0),
        'regnetx_004': ((1, 2, 7, 12), (32, 64, 160, 384), (16, 16, 16, 16), 0.0),
        'regnetx_006': ((1, 3, 5, 7), (48, 96, 240, 528), (24, 24, 24, 24), 0.0),
        'regnetx_040': ((2, 5, 14, 2), (80, 240, 560, 1360), (40, 40, 40, 40), 0.0),
        'regnetx_064': ((2, 4, 10, 1), (168, 392, 784, 1624), (56, 56, 56, 56), 0.0),
        'regnetx_120': ((2, 5, 11, 1), (224, 448, 896, 2240), (112, 112, 112, 112), 0.0),
        'regnety_002': ((1, 1, 4, 7), (24, 56, 152, 368), (8, 8, 8, 8), 0.25),
        'regnety_006': ((1, 3, 7, 4), (48, 112, 256, 608), (16, 16, 16, 16), 0.25),
        'regnety_008': ((1, 3, 8, 2), (64, 128, 320, 768), (16, 16, 16, 16), 0.25),
        'regnety_040': ((2, 6, 12, 2), (128, 192, 512, 1088), (64, 64, 64, 64), 0.25),
        'regnety_064': ((2, 7, 14, 2), (144, 288, 576, 1296), (72, 72, 72, 72), 0.25),
        'regnety_080': ((2, 4, 10, 1), (168, 448, 896, 2016), (56, 56, 56, 56), 0.25),
        'regnety_120': ((2, 5, 11, 1), (224, 448, 896, 2240), (112, 112, 112, 112), 0.25),
    }))


def regnet_preset(name: str) -> dict[str, Any]:
  """``RegNet`` keyword arguments for a named architecture, e.g. 'regnety_400mf'.

  Raises:
    ValueError: for an unknown name; the message lists the valid names.
  """
  if name not in REGNET_PRESETS:
    raise ValueError(f'Unknown RegNet preset {name!r}; valid names: {sorted(REGNET_PRESETS)}')
  depths, widths, group_widths, se_ratio = REGNET_PRESETS[name]
  return {'depths': depths, 'widths': widths, 'group_widths': group_widths,
          'se_ratio': se_ratio}


def preset_name(depths: Sequence[int], widths: Sequence[int], group_widths: Sequence[int],
                se_ratio: float, stem_width: int = 32, bottleneck_ratio: float = 1.0) -> str:
  """The REGNET_PRESETS name of an architecture, or 'regnet' when none matches."""
  if stem_width != 32 or bottleneck_ratio != 1.0:
    return 'regnet'
  key = (tuple(depths), tuple(widths), tuple(group_widths), float(se_ratio))
  return next((n for n, preset in REGNET_PRESETS.items() if preset == key), 'regnet')


def _frozen_aware(norm: Callable[..., nn.Module], frozen_bn: Sequence[str],
                  prefix: str) -> Callable[..., nn.Module]:
  """`norm` for the modules under `prefix`: in inference mode where frozen_bn lists them."""
  if not frozen_bn:
    return norm

  def make(*, name, **kwargs):
    if prefix + name in frozen_bn:
      kwargs['use_running_average'] = True
    return norm(name=name, **kwargs)

  return make


class SqueezeExcite(nn.Module):
  """x * sigmoid(fc2(relu(fc1(mean over space of x)))): channel gates (RegNetY).

  fc1/fc2 are torchvision's and timm's 1x1 convs with bias, as Dense layers.
  The pooling and the gate run in float32.
  """

  squeeze_features: int
  dense: Callable[..., nn.Module]

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    s = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    s = nn.relu(self.dense(self.squeeze_features, name='fc1')(s))
    gate = jax.nn.sigmoid(self.dense(x.shape[-1], name='fc2')(s).astype(jnp.float32))
    return x * gate.astype(x.dtype)[:, None, None, :]


class XBlock(nn.Module):
  """RegNet's residual block: 1x1 -> 3x3 grouped (strided) -> [SE] -> 1x1, projection shortcut.

  ``features`` is the block's output width; the inner width is
  ``round(features * bottleneck_ratio)`` in groups of ``group_width``.
  """

  features: int
  strides: int
  group_width: int
  se_ratio: float = 0.0
  bottleneck_ratio: float = 1.0
  conv: Callable[..., nn.Module] = precision.Conv
  norm: Callable[..., nn.Module] = batch_norm.BatchNorm
  dense: Callable[..., nn.Module] = precision.DenseGeneral
  drop_path_rate: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    # `train` is positional so that nn.remat can mark it static; BatchNorm's
    # mode is bound into `norm` by RegNet, here it only switches drop path.
    branch_scale = None
    if train and self.drop_path_rate > 0.0:
      branch_scale = drop_path.sample_scale(self.make_rng('dropout'), x.shape[0],
                                            self.drop_path_rate)
    inner = int(round(self.features * self.bottleneck_ratio))
    if inner % self.group_width:
      raise ValueError(f'{self.name}: inner width {inner} is not a multiple of group_width '
                       f'{self.group_width}')
    s = (self.strides, self.strides)
    y = self.conv(inner, (1, 1), name='conv1')(x)
    y = self.norm(name='bn1', relu=True)(y)
    y = self.conv(inner, (3, 3), s, padding=_PAD_3x3, feature_group_count=inner // self.group_width,
                  name='conv2')(y)
    y = self.norm(name='bn2', relu=True)(y)
    if self.se_ratio:
      # Relative to the block's input width, as torchvision and timm do.
      y = SqueezeExcite(int(round(self.se_ratio * x.shape[-1])), self.dense, name='se')(y)
    y = self.conv(self.features, (1, 1), name='conv3')(y)
    residual = x
    if x.shape[-1] != self.features or self.strides != 1:
      residual = self.conv(self.features, (1, 1), s, name='proj_conv')(x)
      residual = self.norm(name='proj_bn')(residual)
    # relu(bn3(y) * branch_scale + residual), one fused pass (models/batch_norm.py).
    return self.norm(name='bn3', relu=True)(y, residual, branch_scale)


class RegNet(nn.Module):
  """RegNetX / RegNetY classifier on NHWC images.

  Attributes:
    num_classes: head size; 0 returns the pooled float32 features [B, C].
    depths: blocks per stage.
    widths: output channels per stage.
    group_widths: channels per group of each stage's 3x3 conv.
    se_ratio: squeeze-and-excitation width relative to the block input
      (0.25 RegNetY; 0: none, RegNetX).
    bottleneck_ratio: inner width / output width of a block (1 in every
      published RegNet).
    stem_width: channels of the 3x3 stride-2 stem conv.
    bn_epsilon, bn_momentum: BatchNorm epsilon and Flax-convention momentum.
    dtype: compute dtype; parameters stay float32, pooling and head run in float32.
    head_init, head_bias_init: the head kernel's init ('zeros' or
      'lecun_normal') and constant bias.
    remat: recompute each block in the backward pass (same parameters, results).
    frozen_bn: BatchNorm paths (e.g. 'bn_init', 'stage1_block1/bn1') run in
      inference mode even in training.
    drop_path_rate: stochastic depth of the last block, linear from 0 (timm).
    layer_impl: 'auto', 'project', 'flax' or a layer_impl.Layers
      (models/layer_impl.py); same parameters either way.
  """

  num_classes: int
  depths: Sequence[int]
  widths: Sequence[int]
  group_widths: Sequence[int]
  se_ratio: float = 0.0
  bottleneck_ratio: float = 1.0
  stem_width: int = 32
  bn_epsilon: float = 1e-5
  bn_momentum: float = 0.9
  dtype: Any = jnp.float32
  head_init: str = 'zeros'
  head_bias_init: float = 0.0
  remat: bool = False
  frozen_bn: Sequence[str] = ()
  drop_path_rate: float = 0.0
  layer_impl: Any = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """float32 logits [B, num_classes] (pooled features when num_classes == 0).

    `train`: BatchNorm on batch statistics, updating the running averages
    (apply with ``mutable=['batch_stats']``); else on the running averages.
    The stem output is sown as ``intermediates/stem``.
    """
    if not len(self.depths) == len(self.widths) == len(self.group_widths):
      raise ValueError(f'depths {self.depths}, widths {self.widths} and group_widths '
                       f'{self.group_widths} must have one entry per stage')
    if self.head_init not in _HEAD_INITS:
      raise ValueError(f'head_init must be one of {_HEAD_INITS}, got {self.head_init!r}')
    block_cls = nn.remat(XBlock, static_argnums=(2,)) if self.remat else XBlock
    layers = layer_impl_lib.resolve(self.layer_impl)
    conv = functools.partial(layers.conv_module(), use_bias=False, dtype=self.dtype,
                             param_dtype=jnp.float32, kernel_init=_kernel_init)
    norm = functools.partial(layers.norm_module(), use_running_average=not train,
                             momentum=self.bn_momentum, epsilon=self.bn_epsilon,
                             dtype=self.dtype, param_dtype=jnp.float32)
    dense = functools.partial(layers.dense_module(), dtype=self.dtype,
                              param_dtype=jnp.float32, kernel_init=_kernel_init)

    x = conv(self.stem_width, (3, 3), (2, 2), padding=_PAD_3x3, name='conv_init')(x)
    x = _frozen_aware(norm, self.frozen_bn, '')(name='bn_init', relu=True)(x)
    self.sow('intermediates', 'stem', x)

    rates = iter(drop_path.block_rates(self.drop_path_rate, sum(self.depths)))
    for i, (depth, width, group_width) in enumerate(
        zip(self.depths, self.widths, self.group_widths)):
      for j in range(depth):
        name = f'stage{i + 1}_block{j + 1}'
        x = block_cls(
            features=width, strides=2 if j == 0 else 1, group_width=group_width,
            se_ratio=self.se_ratio, bottleneck_ratio=self.bottleneck_ratio, conv=conv,
            norm=_frozen_aware(norm, self.frozen_bn, name + '/'), dense=dense,
            drop_path_rate=next(rates), name=name)(x, train)

    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))  # In float32, as the ResNet.
    if self.num_classes == 0:
      return x
    kernel_init = (nn.initializers.zeros if self.head_init == 'zeros'
                   else nn.initializers.lecun_normal())
    return nn.Dense(self.num_classes, dtype=jnp.float32, param_dtype=jnp.float32,
                    kernel_init=kernel_init,
                    bias_init=nn.initializers.constant(self.head_bias_init), name='head')(x)
