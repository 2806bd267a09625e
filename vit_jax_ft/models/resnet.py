"""ResNet family (v1 / v1.5) and ResNeXt in Flax linen.

The module is written so that pretrained weights from torchvision, timm,
HuggingFace and Keras can be mapped onto it one tensor at a time:

* The stem and every strided/3x3 convolution use *explicit symmetric* padding,
  exactly like PyTorch. Flax's ``'SAME'`` padding pads ``(2, 3)`` for a 7x7
  stride-2 conv on an even input (and ``(0, 1)`` for the 3x3 stride-2
  max-pool), which shifts the sampling grid by one pixel and silently degrades
  converted PyTorch weights.
* ``variant`` selects where the stride of a bottleneck block sits: on the 3x3
  conv ('v1.5', torchvision/timm/HF) or on the first 1x1 conv ('v1', the
  original paper and ``tf.keras.applications.ResNet50``).
* ``conv_bias`` and ``bn_epsilon`` cover the Keras flavour (biases on every
  conv, ``epsilon=1.001e-5`` in keras.applications' ResNet50, ``1e-3`` for the
  layer default).
* ``groups`` / ``width_per_group`` make the bottleneck's 3x3 conv grouped:
  ResNeXt (Xie et al. 2017), as torchvision's and timm's ``resnext*`` build
  it (inner width ``int(planes * width_per_group / 64) * groups``).
* ``padding='tf_same'`` is TensorFlow's 'SAME' instead (the TF Model Garden
  ResNets): computed from the input size, so at stride 2 on an even input the
  extra row and column go after (the 7x7 stem pads (2, 3), 3x3 convs and the
  max-pool (0, 1)); ``first_block_projection`` gives the first basic block a
  projection shortcut as Model Garden's ResNet-18/34 have.

Parameter names (stable; converters rely on them)::

  conv_init, bn_init                 torchvision conv1/bn1, Keras conv1_conv/bn
  stage{i}_block{j}/                 i, j are 1-based:
                                       torchvision layer{i}.{j-1}
                                       timm        layer{i}.{j-1}
                                       HF          encoder.stages.{i-1}.layers.{j-1}
                                       Keras       conv{i+1}_block{j}
    conv1, bn1, conv2, bn2           residual branch (bottleneck adds conv3/bn3)
    [conv3, bn3]
    [proj_conv, proj_bn]             shortcut projection, torchvision
                                     ``downsample.0`` / ``downsample.1``,
                                     Keras ``_0_conv`` / ``_0_bn``
  head                               final Dense (torchvision ``fc``)

Stages are 1-based to match torchvision's ``layer1..layer4``; blocks are
1-based to match Keras' ``conv2_block1`` (torchvision indexes blocks from 0,
so a converter subtracts one).

BatchNorm running statistics live in the ``batch_stats`` collection.
``bn_momentum`` follows the Flax convention ``ra = m * ra + (1 - m) * batch``,
i.e. Flax momentum = 1 - PyTorch momentum (PyTorch default 0.1 -> 0.9). Note
that Flax tracks the *biased* batch variance while PyTorch tracks the unbiased
one; for ImageNet-sized feature maps the difference is negligible.
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

# torchvision initializes convs with kaiming_normal_(mode='fan_out',
# nonlinearity='relu'); we match it so that training from scratch behaves
# like the reference implementations. Pretrained weights overwrite it anyway.
_conv_kernel_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')

# Explicit PyTorch-style padding for 3x3 convs (stride 1 or 2).
_PAD_3x3 = ((1, 1), (1, 1))

# name -> (block, stage_sizes, groups, width_per_group). A read-only mapping of
# tuples, so callers cannot mutate the table; use `resnet_preset` to get ResNet
# keyword arguments. ResNeXt 'AxBd' is A groups of B channels in the first stage.
RESNET_PRESETS: Mapping[str, tuple[str, tuple[int, ...], int, int]] = (
    types.MappingProxyType({
        'resnet18': ('basic', (2, 2, 2, 2), 1, 64),
        'resnet34': ('basic', (3, 4, 6, 3), 1, 64),
        'resnet50': ('bottleneck', (3, 4, 6, 3), 1, 64),
        'resnet101': ('bottleneck', (3, 4, 23, 3), 1, 64),
        'resnet152': ('bottleneck', (3, 8, 36, 3), 1, 64),
        'resnext50_32x4d': ('bottleneck', (3, 4, 6, 3), 32, 4),
        'resnext101_32x8d': ('bottleneck', (3, 4, 23, 3), 32, 8),
        'resnext101_64x4d': ('bottleneck', (3, 4, 23, 3), 64, 4),
    }))

_VARIANTS = ('v1', 'v1.5')
_PADDINGS = ('torch', 'tf_same')
_HEAD_INITS = ('zeros', 'lecun_normal')


def resnet_preset(name: str) -> dict[str, Any]:
  """Returns ``ResNet`` keyword arguments for a named architecture.

  Usage: ``ResNet(num_classes=1000, **resnet_preset('resnet50'))``.

  Args:
    name: a key of ``RESNET_PRESETS`` ('resnet18' ... 'resnet152',
      'resnext50_32x4d', 'resnext101_32x8d', 'resnext101_64x4d').

  Returns:
    A fresh dict with keys ``block`` and ``stage_sizes``, plus ``groups`` and
    ``width_per_group`` for a ResNeXt.

  Raises:
    ValueError: for an unknown name; the message lists the valid names.
  """
  if name not in RESNET_PRESETS:
    raise ValueError(
        f'Unknown ResNet preset {name!r}; valid names: '
        f'{sorted(RESNET_PRESETS)}')
  block, stage_sizes, groups, width_per_group = RESNET_PRESETS[name]
  preset = {'block': block, 'stage_sizes': stage_sizes}
  if groups != 1 or width_per_group != 64:
    preset.update(groups=groups, width_per_group=width_per_group)
  return preset


def preset_name(block: str, stage_sizes: Sequence[int], width: int = 64, groups: int = 1,
                width_per_group: int = 64) -> str:
  """The RESNET_PRESETS name of an architecture, or 'resnet' when none matches."""
  for name, (b, sizes, g, wpg) in RESNET_PRESETS.items():
    if (b, tuple(sizes), g, wpg, 64) == (block, tuple(stage_sizes), groups, width_per_group,
                                         width):
      return name
  return 'resnet'


def max_pool_3x3_s2(x: jax.Array, padding: str = 'torch') -> jax.Array:
  """PyTorch ``MaxPool2d(3, stride=2, padding=1)`` on NHWC inputs.

  ``padding='tf_same'``: TensorFlow's ``MaxPool2D(3, 2, 'same')`` instead
  (one -inf pad after an even side, one on each side of an odd one; the output
  size is the same).

  Padding is symmetric and uses -inf, so padded positions never win the max.
  Written as a 1-D pool over rows and then over columns (the max is
  separable), each the max of three strided slices, in float32, rather than
  ``nn.max_pool``: on XLA:CPU reduce_window's gradient (an argmax over index
  iotas), a nine-slice max and bfloat16 elementwise gradients are all slower.
  The ResNet-50 stem's pool forward and backward ran ~3x faster than
  nn.max_pool, and 2.4x faster than nine slices in bfloat16
  (`python benchmarks/layers.py`). Where several inputs tie for the max, the
  gradient is shared among them instead of going to one; ties happen at
  ReLU's zeros, whose own gradient is zero.
  """
  if padding not in _PADDINGS:
    raise ValueError(f'padding must be one of {_PADDINGS}, got {padding!r}')
  tf_same = padding == 'tf_same'
  return _max_pool_3_s2(_max_pool_3_s2(x.astype(jnp.float32), 1, tf_same), 2,
                        tf_same).astype(x.dtype)


def _branch_scale(module: nn.Module, x: jax.Array, rate: float,
                  train: bool) -> jax.Array | None:
  """Drop path's per-sample factor for a block's residual branch, or None when off.

  The last BatchNorm of the block applies it to its output before the
  residual add, keeping the add and the ReLU fused (models/batch_norm.py).
  """
  if not train or rate == 0.0:
    return None
  return drop_path.sample_scale(module.make_rng('dropout'), x.shape[0], rate)


def _max_pool_3_s2(x: jax.Array, axis: int, tf_same: bool = False) -> jax.Array:
  """Max over windows of 3 with stride 2 and one -inf pad on each side, along `axis`.

  With `tf_same`, an even side gets its one pad after (TensorFlow 'SAME').
  """
  out = (x.shape[axis] - 1) // 2 + 1
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, 1) if tf_same and x.shape[axis] % 2 == 0 else (1, 1)
  x = jnp.pad(x, pad, constant_values=-jnp.inf)
  taps = [jax.lax.slice_in_dim(x, i, i + 2 * out - 1, 2, axis) for i in range(3)]
  return jnp.maximum(jnp.maximum(taps[0], taps[1]), taps[2])


class BasicBlock(nn.Module):
  """ResNet-18/34 residual block: 3x3 -> 3x3, with optional projection.

  The stride sits on the first 3x3 conv in every ResNet flavour, so ``variant``
  does not apply here. ``drop_path_rate``: stochastic depth of the residual
  branch in training.
  """

  features: int
  strides: int = 1
  conv: Callable[..., nn.Module] = precision.Conv
  norm: Callable[..., nn.Module] = batch_norm.BatchNorm
  drop_path_rate: float = 0.0
  pad_3x3: Any = _PAD_3x3
  projection: bool = False  # A projection shortcut even where the shape stays.

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    # `train` is positional (not keyword-only) so that nn.remat can mark it
    # static via static_argnums. BatchNorm's mode is already bound into `norm`
    # by the parent (see ResNet); here it only switches drop path.
    branch_scale = _branch_scale(self, x, self.drop_path_rate, train)
    s = (self.strides, self.strides)
    residual = x
    y = self.conv(self.features, (3, 3), s, padding=self.pad_3x3, name='conv1')(x)
    y = self.norm(name='bn1', relu=True)(y)
    y = self.conv(self.features, (3, 3), padding=self.pad_3x3, name='conv2')(y)
    if self.projection or residual.shape != y.shape:
      residual = self.conv(self.features, (1, 1), s, name='proj_conv')(residual)
      residual = self.norm(name='proj_bn')(residual)
    # relu(bn2(y) * branch_scale + residual)
    return self.norm(name='bn2', relu=True)(y, residual, branch_scale)


class BottleneckBlock(nn.Module):
  """ResNet-50/101 residual block: 1x1 -> 3x3 -> 1x1 (x4 channels).

  ResNeXt: the 3x3 conv has ``groups`` groups and the inner width is
  ``int(features * width_per_group / 64) * groups`` (torchvision, timm).
  """

  features: int
  strides: int = 1
  variant: str = 'v1.5'
  conv: Callable[..., nn.Module] = precision.Conv
  norm: Callable[..., nn.Module] = batch_norm.BatchNorm
  drop_path_rate: float = 0.0
  pad_3x3: Any = _PAD_3x3
  projection: bool = False
  groups: int = 1
  width_per_group: int = 64

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    # BatchNorm's mode is already bound into `norm` (see ResNet).
    branch_scale = _branch_scale(self, x, self.drop_path_rate, train)
    s = (self.strides, self.strides)
    # v1 strides the first 1x1 conv, which simply drops 3/4 of the positions;
    # v1.5 strides the 3x3 conv instead (slightly more FLOPs, ~+0.5% top-1).
    s1, s2 = (s, (1, 1)) if self.variant == 'v1' else ((1, 1), s)
    inner = int(self.features * (self.width_per_group / 64)) * self.groups
    residual = x
    y = self.conv(inner, (1, 1), s1, name='conv1')(x)
    y = self.norm(name='bn1', relu=True)(y)
    y = self.conv(inner, (3, 3), s2, padding=self.pad_3x3, name='conv2',
                  feature_group_count=self.groups)(y)
    y = self.norm(name='bn2', relu=True)(y)
    y = self.conv(self.features * 4, (1, 1), name='conv3')(y)
    if self.projection or residual.shape != y.shape:
      residual = self.conv(
          self.features * 4, (1, 1), s, name='proj_conv')(residual)
      residual = self.norm(name='proj_bn')(residual)
    # relu(bn3(y) * branch_scale + residual)
    return self.norm(name='bn3', relu=True)(y, residual, branch_scale)


class ResNet(nn.Module):
  """ResNet v1 / v1.5 classifier operating on NHWC images.

  Attributes:
    num_classes: size of the classification head. 0 means no head: the model
      returns the globally pooled features (float32, [B, C]).
    stage_sizes: number of residual blocks per stage, e.g. (3, 4, 6, 3).
    block: 'basic' (ResNet-18/34) or 'bottleneck' (ResNet-50/101/...).
    variant: 'v1.5' (torchvision/timm/HF: stride on the bottleneck's 3x3 conv)
      or 'v1' (original paper/Keras: stride on the first 1x1 conv). Only
      affects bottleneck blocks.
    conv_bias: add a bias to every conv (Keras ResNet50 has them; torchvision
      does not, since the following BatchNorm makes them redundant).
    bn_epsilon: BatchNorm epsilon (PyTorch 1e-5; Keras layer default 1e-3,
      keras.applications ResNet50 uses 1.001e-5).
    bn_momentum: BatchNorm running-average momentum in the Flax convention
      (1 - PyTorch momentum; the same number as Keras' momentum).
    padding: 'torch' (explicit symmetric padding, as PyTorch) or 'tf_same'
      (TensorFlow 'SAME': TF Model Garden ResNets).
    first_block_projection: give the first block of the first stage a
      projection shortcut even where its shape does not change (TF Model
      Garden ResNet-18/34, `use_first_projection`).
    width: channels of the stem and of the first stage's blocks; stage i
      (0-based) uses ``width * 2**i``.
    groups: groups of the bottleneck's 3x3 conv (ResNeXt cardinality; 1 for a
      ResNet).
    width_per_group: channels per group of that conv in the first stage
      (64 for a ResNet: the inner width is then the stage's width).
    dtype: compute dtype. Parameters are always stored in float32; the
      pooling and the head run in float32.
    head_init: 'zeros' (common for fine-tuning) or 'lecun_normal' for the head
      kernel.
    head_bias_init: constant initial head bias (0 by default; e.g. -6.9 ~
      log(1/1000) for sigmoid multi-label training).
    remat: wrap each residual block in ``nn.remat`` to trade compute for
      activation memory. Does not change parameter names or results.
    frozen_bn: BatchNorm module paths (e.g. 'bn_init', 'stage1_block1/bn1')
      that run in inference mode even when training: frozen layers (see
      optim.ParamGroups.frozen_batch_norms).
    drop_path_rate: stochastic depth in training: the last block's rate of
      dropping its residual branch per sample, ramping linearly from 0 over
      all blocks of all stages (timm). Draws from the 'dropout' RNG stream.
    layer_impl: 'auto' (per backend), 'project' (the XLA:CPU-tuned convs,
      BatchNorm and max-pool) or 'flax' (nn.Conv, nn.BatchNorm, nn.max_pool),
      or a layer_impl.Layers; see models/layer_impl.py. Same parameters.
  """

  num_classes: int
  stage_sizes: Sequence[int]
  block: str
  variant: str = 'v1.5'
  conv_bias: bool = False
  bn_epsilon: float = 1e-5
  bn_momentum: float = 0.9
  width: int = 64
  dtype: Any = jnp.float32
  head_init: str = 'zeros'
  head_bias_init: float = 0.0
  remat: bool = False
  frozen_bn: Sequence[str] = ()
  drop_path_rate: float = 0.0
  layer_impl: Any = 'auto'
  padding: str = 'torch'
  first_block_projection: bool = False
  groups: int = 1
  width_per_group: int = 64

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """Applies the network.

    Args:
      x: images, [B, H, W, C].
      train: if True, BatchNorm uses batch statistics and updates the running
        averages (call with ``mutable=['batch_stats']``); otherwise it uses the
        stored running averages.

    Returns:
      float32 logits [B, num_classes], or pooled features [B, C] when
      ``num_classes == 0``.

    The stem output (after max-pool) is sown as ``intermediates/stem``.
    """
    if self.block == 'basic':
      block_cls, block_kw = BasicBlock, {}
    elif self.block == 'bottleneck':
      block_cls, block_kw = BottleneckBlock, {'variant': self.variant, 'groups': self.groups,
                                              'width_per_group': self.width_per_group}
    else:
      raise ValueError(
          f"block must be 'basic' or 'bottleneck', got {self.block!r}")
    if self.block == 'basic' and (self.groups, self.width_per_group) != (1, 64):
      raise ValueError('basic blocks have no grouped conv: groups=1 and width_per_group=64 '
                       f'only, got {self.groups} and {self.width_per_group}')
    if self.variant not in _VARIANTS:
      raise ValueError(f'variant must be one of {_VARIANTS}, got '
                       f'{self.variant!r}')
    if self.padding not in _PADDINGS:
      raise ValueError(f'padding must be one of {_PADDINGS}, got {self.padding!r}')
    if self.head_init not in _HEAD_INITS:
      raise ValueError(f'head_init must be one of {_HEAD_INITS}, got '
                       f'{self.head_init!r}')
    if self.remat:
      # Arg 0 is `self`, 1 is `x`, 2 is `train` (a Python bool -> static).
      block_cls = nn.remat(block_cls, static_argnums=(2,))

    layers = layer_impl_lib.resolve(self.layer_impl)
    conv = functools.partial(
        layers.conv_module(), use_bias=self.conv_bias, dtype=self.dtype,
        param_dtype=jnp.float32, kernel_init=_conv_kernel_init)
    norm = functools.partial(
        layers.norm_module(), use_running_average=not train,
        momentum=self.bn_momentum, epsilon=self.bn_epsilon, dtype=self.dtype,
        param_dtype=jnp.float32)

    # Stem: 7x7/2 conv (pad 3) -> BN -> ReLU -> 3x3/2 max-pool (pad 1).
    tf_same = self.padding == 'tf_same'
    x = conv(self.width, (7, 7), (2, 2),
             padding='SAME' if tf_same else ((3, 3), (3, 3)), name='conv_init')(x)
    x = self._norm_at(norm, '')(name='bn_init', relu=True)(x)
    x = (max_pool_3x3_s2(x, self.padding) if layers.max_pool == 'project'
         else layer_impl_lib.flax_max_pool_3x3_s2(x, self.padding))
    self.sow('intermediates', 'stem', x)

    rates = iter(drop_path.block_rates(self.drop_path_rate, sum(self.stage_sizes)))
    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        # The first block of every stage but the first halves the resolution
        # (the stem's max-pool already downsampled before stage 1).
        strides = 2 if i > 0 and j == 0 else 1
        x = block_cls(
            features=self.width * 2**i, strides=strides, conv=conv,
            norm=self._norm_at(norm, f'stage{i + 1}_block{j + 1}/'),
            drop_path_rate=next(rates), name=f'stage{i + 1}_block{j + 1}',
            pad_3x3='SAME' if tf_same else _PAD_3x3,
            projection=self.first_block_projection and i == 0 and j == 0,
            **block_kw)(x, train)

    # Global average pooling in float32: summing 49+ bf16 values loses
    # precision, and the head is tiny compared to the trunk.
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    if self.num_classes == 0:
      return x

    kernel_init = (nn.initializers.zeros if self.head_init == 'zeros'
                   else nn.initializers.lecun_normal())
    return nn.Dense(self.num_classes, dtype=jnp.float32,
                    param_dtype=jnp.float32, kernel_init=kernel_init,
                    bias_init=nn.initializers.constant(self.head_bias_init),
                    name='head')(x)

  def _norm_at(self, norm, prefix: str):
    """`norm` for the module at `prefix`: in inference mode where frozen_bn lists it."""
    if not self.frozen_bn:
      return norm

    def make(*, name, **kwargs):
      if prefix + name in self.frozen_bn:
        kwargs['use_running_average'] = True
      return norm(name=name, **kwargs)

    return make
