"""BiT (Big Transfer, Kolesnikov et al. 2019) ResNets in Flax linen.

A pre-activation ResNet (ResNet v2, He et al. 2016) whose BatchNorms are
GroupNorms (32 groups) and whose convolutions standardise their kernels
(weight standardisation, Qiao et al. 2019): the kernel is shifted and scaled
to zero mean and unit variance over each output channel's fan-in before
every use. Neither layer keeps running statistics, so there is no
`batch_stats` collection and small fine-tuning batches behave as large ones.

Layout (as BiT's own code and its `.npz` files):

* root: 7x7 stride-2 std conv (padding 3), then one row and column of zeros
  on each side and a 3x3 stride-2 max-pool without padding. The zeros take
  part in the max (the root has no ReLU before the pool, so they can win):
  this is what the released weights were trained with;
* bottleneck units `norm1 -> ReLU -> conv1 (1x1) -> norm2 -> ReLU -> conv2
  (3x3, the unit's stride) -> norm3 -> ReLU -> conv3 (1x1, x4 channels)`,
  added to the input; the first unit of a stage projects the *pre-activated*
  input (`proj_conv`, 1x1 with the stride) instead of adding it as is;
* `norm_pre_head` -> ReLU -> global average pool -> `head`.

Parameter names (converters rely on them; stages and blocks are 1-based as
in models/resnet.py, so layer_decay and Grad-CAM treat both alike)::

  conv_init                 BiT npz resnet/root_block/standardized_conv2d
  stage{i}_block{j}/        resnet/block{i}/unit{j:02d}/ (timm stages.{i-1}.blocks.{j-1})
    norm1, conv1            a/group_norm, a/standardized_conv2d
    norm2, conv2            b/...
    norm3, conv3            c/...
    [proj_conv]             a/proj/standardized_conv2d
  norm_pre_head             resnet/group_norm (timm norm)
  head                      resnet/head/conv2d (timm head.fc, a 1x1 conv)

`ws_epsilon` is added to the kernel variance before the square root: 1e-10 in
BiT's own JAX and TF code, 1e-8 in timm's `resnetv2_*_bit`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import types
from typing import Any

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

from vit_jax_ft.models import drop_path
from vit_jax_ft.models import layer_impl as layer_impl_lib
from vit_jax_ft.models import precision

# name -> (units per stage, width factor). Read-only; see `bit_preset`.
BIT_PRESETS: Mapping[str, tuple[tuple[int, ...], int]] = types.MappingProxyType({
    'bit_r50x1': ((3, 4, 6, 3), 1),
    'bit_r50x3': ((3, 4, 6, 3), 3),
    'bit_r101x1': ((3, 4, 23, 3), 1),
    'bit_r101x3': ((3, 4, 23, 3), 3),
    'bit_r152x2': ((3, 8, 36, 3), 2),
    'bit_r152x4': ((3, 8, 36, 3), 4),
})

GROUPS = 32
GN_EPSILON = 1e-5  # BiT's and timm's GroupNorm epsilon.
_HEAD_INITS = ('zeros', 'lecun_normal')
# He init (fan_out), as the ResNet and timm; the standardisation removes the scale anyway.
_conv_kernel_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def bit_preset(name: str) -> dict[str, Any]:
  """`BiT` keyword arguments (stage_sizes, width_factor) for a named architecture.

  Raises:
    ValueError: for an unknown name; the message lists the valid names.
  """
  if name not in BIT_PRESETS:
    raise ValueError(f'Unknown BiT preset {name!r}; valid names: {sorted(BIT_PRESETS)}')
  stage_sizes, width_factor = BIT_PRESETS[name]
  return {'stage_sizes': stage_sizes, 'width_factor': width_factor}


def preset_name(stage_sizes: Sequence[int], width_factor: int) -> str:
  """The preset with these sizes, or 'bit' for any other shape."""
  return next((name for name, (sizes, wf) in BIT_PRESETS.items()
               if tuple(sizes) == tuple(stage_sizes) and wf == width_factor), 'bit')


def standardize_kernel(kernel: jax.Array, epsilon: float) -> jax.Array:
  """HWIO kernel with zero mean and unit (biased) variance per output channel, in float32."""
  k = kernel.astype(jnp.float32)
  mean = jnp.mean(k, axis=(0, 1, 2), keepdims=True)
  var = jnp.mean(jnp.square(k - mean), axis=(0, 1, 2), keepdims=True)
  return (k - mean) * lax.rsqrt(var + epsilon)


class StdConv(nn.Module):
  """Convolution with a weight-standardised kernel (no bias): BiT's `StdConv`.

  The kernel is standardised in float32 and then cast to `dtype`. 1x1 convs
  run as matmuls with float32 accumulation on the project's layers (as
  precision.Conv does, faster on XLA:CPU); other windows use `lax`.
  """

  features: int
  kernel_size: Sequence[int]
  strides: Sequence[int] = (1, 1)
  padding: Any = ((0, 0), (0, 0))
  ws_epsilon: float = 1e-10
  dtype: Any = jnp.float32
  layers: layer_impl_lib.Layers = layer_impl_lib.Layers()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kh, kw = self.kernel_size
    kernel = self.param('kernel', _conv_kernel_init, (kh, kw, x.shape[-1], self.features),
                        jnp.float32)
    kernel = standardize_kernel(kernel, self.ws_epsilon).astype(self.dtype)
    x = x.astype(self.dtype)
    sh, sw = self.strides
    if (kh, kw) == (1, 1) and self.layers.conv == 'project':
      return precision.einsum('bhwc,cd->bhwd', x[:, ::sh, ::sw], kernel[0, 0])
    return lax.conv_general_dilated(x, kernel, (sh, sw), self.padding,
                                    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                    preferred_element_type=jnp.float32).astype(self.dtype)


class GroupNormReLU(nn.Module):
  """GroupNorm (statistics and affine in float32) followed by ReLU; output in `dtype`.

  Per sample, each of `groups` channel groups is normalised over its
  channels and all positions (biased variance), then scaled and shifted per
  channel.
  """

  groups: int = GROUPS
  epsilon: float = GN_EPSILON
  relu: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    if c % self.groups:
      raise ValueError(f'GroupNorm: {c} channels are not divisible into {self.groups} groups.')
    scale = self.param('scale', nn.initializers.ones, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    xf = x.astype(jnp.float32)
    grouped = xf.reshape(x.shape[:-1] + (self.groups, c // self.groups))
    axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
    mean = jnp.mean(grouped, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(grouped - mean), axis=axes, keepdims=True)
    y = ((grouped - mean) * lax.rsqrt(var + self.epsilon)).reshape(x.shape) * scale + bias
    return (jnp.maximum(y, 0.0) if self.relu else y).astype(self.dtype)


class PreActBottleneck(nn.Module):
  """BiT's residual unit: pre-activation bottleneck, stride on the 3x3 conv."""

  features: int  # Bottleneck width; the unit outputs 4x as many channels.
  strides: int = 1
  ws_epsilon: float = 1e-10
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32
  layers: layer_impl_lib.Layers = layer_impl_lib.Layers()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    # `train` is positional so that nn.remat can mark it static; it only switches drop path.
    conv = lambda f, k, s, name, pad=((0, 0), (0, 0)): StdConv(
        f, (k, k), (s, s), pad, self.ws_epsilon, self.dtype, self.layers, name=name)
    norm = lambda name: GroupNormReLU(dtype=self.dtype, name=name)
    out = self.features * 4
    preact = norm('norm1')(x)
    shortcut = x
    if self.strides != 1 or x.shape[-1] != out:
      shortcut = conv(out, 1, self.strides, 'proj_conv')(preact)
    y = conv(self.features, 1, 1, 'conv1')(preact)
    y = conv(self.features, 3, self.strides, 'conv2', ((1, 1), (1, 1)))(norm('norm2')(y))
    y = conv(out, 1, 1, 'conv3')(norm('norm3')(y))
    if train and self.drop_path_rate > 0.0:
      y = drop_path.drop_path(y, self.drop_path_rate, self.make_rng('dropout'))
    # The residual stream is added in float32 (as the ViT's) and kept in `dtype`.
    return (shortcut.astype(jnp.float32) + y.astype(jnp.float32)).astype(self.dtype)


def root_max_pool(x: jax.Array) -> jax.Array:
  """BiT's root pool: one zero row/column on each side, then a 3x3 stride-2 VALID max-pool."""
  x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding='VALID')


class BiT(nn.Module):
  """BiT ResNet v2 classifier on NHWC images; returns float32 logits.

  Attributes:
    num_classes: head size; 0 returns the pooled features (float32 [B, C]).
    stage_sizes: residual units per stage, e.g. (3, 4, 6, 3) for R50.
    width_factor: the 'xN' of R50xN: root width 64*N, stage i bottleneck
      width 64*N*2**i (0-based), outputs 4x that.
    ws_epsilon: weight-standardisation epsilon (BiT 1e-10, timm 1e-8).
    head_init: 'zeros' (BiT's choice for fine-tuning) or 'lecun_normal'.
    head_bias_init: constant initial head bias.
    remat: recompute each unit in the backward pass (same parameters).
    drop_path_rate: stochastic depth in training, linear from 0 at the first
      unit to this at the last ('dropout' RNG stream).
    dtype: compute dtype; parameters stay float32, GroupNorm statistics,
      the residual additions, the pool and the head run in float32.
    layer_impl: 'auto', 'project' or 'flax' (models/layer_impl.py): decides
      whether 1x1 convs run as float32-accumulating matmuls. Same parameters.
  """

  num_classes: int
  stage_sizes: Sequence[int]
  width_factor: int = 1
  ws_epsilon: float = 1e-10
  head_init: str = 'zeros'
  head_bias_init: float = 0.0
  remat: bool = False
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32
  layer_impl: Any = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    if self.head_init not in _HEAD_INITS:
      raise ValueError(f'head_init must be one of {_HEAD_INITS}, got {self.head_init!r}')
    layers = layer_impl_lib.resolve(self.layer_impl)
    width = 64 * self.width_factor
    x = StdConv(width, (7, 7), (2, 2), ((3, 3), (3, 3)), self.ws_epsilon, self.dtype, layers,
                name='conv_init')(x)
    x = root_max_pool(x)
    self.sow('intermediates', 'stem', x)

    unit_cls = nn.remat(PreActBottleneck, static_argnums=(2,)) if self.remat else PreActBottleneck
    rates = iter(drop_path.block_rates(self.drop_path_rate, sum(self.stage_sizes)))
    for i, num_units in enumerate(self.stage_sizes):
      for j in range(num_units):
        x = unit_cls(features=width * 2**i, strides=2 if i > 0 and j == 0 else 1,
                     ws_epsilon=self.ws_epsilon, drop_path_rate=next(rates), dtype=self.dtype,
                     layers=layers, name=f'stage{i + 1}_block{j + 1}')(x, train)

    x = GroupNormReLU(dtype=jnp.float32, name='norm_pre_head')(x)
    x = jnp.mean(x, axis=(1, 2))
    if self.num_classes == 0:
      return x
    kernel_init = (nn.initializers.zeros if self.head_init == 'zeros'
                   else nn.initializers.lecun_normal())
    return nn.Dense(self.num_classes, dtype=jnp.float32, param_dtype=jnp.float32,
                    kernel_init=kernel_init,
                    bias_init=nn.initializers.constant(self.head_bias_init), name='head')(x)
