"""ConvNeXt (Liu et al. 2022, "A ConvNet for the 2020s") in Flax linen.

Layout (as torchvision's, timm's and Hugging Face's `convnext_*`):

* stem: 4x4 stride-4 conv (with bias), then LayerNorm over channels;
* stages of blocks `x + drop_path(gamma * Linear(GELU(Linear_4x(LN(dwconv7x7(x))))))`:
  a 7x7 depthwise conv (padding 3, bias), LayerNorm, a 4x wide MLP with the
  exact (erf) GELU, and a per-channel layer scale `gamma`;
* between stages, LayerNorm then a 2x2 stride-2 conv; here it is the start of
  the stage's first block (`downsample_norm`, `downsample_conv`), before the
  block's residual, so that every stage is a run of `stage{i}_block{j}`
  modules as in the ResNets (layer decay and Grad-CAM treat them alike);
* global average pool, LayerNorm (`norm_pre_head`), `head`.

Every LayerNorm has epsilon 1e-6, except that Hugging Face's final LayerNorm
takes `config.layer_norm_eps` (1e-12 by default): `head_norm_eps`.

Parameter names (converters rely on them; stages and blocks are 1-based)::

  conv_init, norm_init          torchvision features.0.{0,1}, timm stem.{0,1},
                                HF convnext.embeddings.{patch_embeddings,layernorm}
  stage{i}_block{j}/            torchvision features.{2i-1}.{j-1}, timm stages.{i-1}.blocks.{j-1},
                                HF convnext.encoder.stages.{i-1}.layers.{j-1}
    [downsample_norm,           (j = 1, i > 1) torchvision features.{2i-2}.{0,1},
     downsample_conv]           timm stages.{i-1}.downsample.{0,1}, HF ...downsampling_layer.{0,1}
    dwconv, norm                depthwise 7x7 conv, LayerNorm
    mlp_in, mlp_out             Linear C -> 4C, 4C -> C
    gamma                       layer scale [C]
  norm_pre_head                 torchvision classifier.0, timm head.norm, HF convnext.layernorm
  head                          torchvision classifier.2, timm head.fc, HF classifier
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import types
from typing import Any

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

from vit_jax_ft.models import depthwise
from vit_jax_ft.models import drop_path
from vit_jax_ft.models import layer_impl as layer_impl_lib

# name -> (blocks per stage, channels per stage). Read-only; see `convnext_preset`.
CONVNEXT_PRESETS: Mapping[str, tuple[tuple[int, ...], tuple[int, ...]]] = types.MappingProxyType({
    'convnext_tiny': ((3, 3, 9, 3), (96, 192, 384, 768)),
    'convnext_small': ((3, 3, 27, 3), (96, 192, 384, 768)),
    'convnext_base': ((3, 3, 27, 3), (128, 256, 512, 1024)),
    'convnext_large': ((3, 3, 27, 3), (192, 384, 768, 1536)),
})

LN_EPSILON = 1e-6
LAYER_SCALE_INIT = 1e-6  # The paper's, torchvision's, timm's and HF's initial gamma.
_HEAD_INITS = ('zeros', 'lecun_normal')
# timm initialises convs and linears with trunc_normal(std=0.02); so do we (from scratch only).
_init = nn.initializers.truncated_normal(0.02)


def convnext_preset(name: str) -> dict[str, Any]:
  """`ConvNeXt` keyword arguments (depths, dims) for a named architecture.

  Raises:
    ValueError: for an unknown name; the message lists the valid names.
  """
  if name not in CONVNEXT_PRESETS:
    raise ValueError(f'Unknown ConvNeXt preset {name!r}; valid names: {sorted(CONVNEXT_PRESETS)}')
  depths, dims = CONVNEXT_PRESETS[name]
  return {'depths': depths, 'dims': dims}


def preset_name(depths: Sequence[int], dims: Sequence[int]) -> str:
  """The preset with these sizes, or 'convnext' for any other shape."""
  return next((name for name, (d, w) in CONVNEXT_PRESETS.items()
               if tuple(d) == tuple(depths) and tuple(w) == tuple(dims)), 'convnext')


class ChannelLayerNorm(nn.Module):
  """LayerNorm over the last (channel) axis, statistics and affine in float32; output in `dtype`."""

  epsilon: float = LN_EPSILON
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    return ((xf - mean) * lax.rsqrt(var + self.epsilon) * scale + bias).astype(self.dtype)


class ConvNeXtBlock(nn.Module):
  """One ConvNeXt block, optionally preceded by the stage's downsampling (LN + 2x2/2 conv)."""

  features: int
  downsample: bool = False
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32
  layers: layer_impl_lib.Layers = layer_impl_lib.Layers()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    # `train` is positional so that nn.remat can mark it static; it only switches drop path.
    dense = lambda f, name: self.layers.dense_module()(
        f, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=_init, name=name)
    if self.downsample:
      x = ChannelLayerNorm(dtype=self.dtype, name='downsample_norm')(x)
      x = self.layers.conv_module()(self.features, (2, 2), (2, 2), padding='VALID',
                                    dtype=self.dtype, param_dtype=jnp.float32,
                                    kernel_init=_init, name='downsample_conv')(x)
    y = depthwise.DepthwiseConv((7, 7), padding=((3, 3), (3, 3)), dtype=self.dtype,
                                kernel_init=_init, impl=self.layers.conv, name='dwconv')(x)
    y = ChannelLayerNorm(dtype=self.dtype, name='norm')(y)
    y = dense(4 * self.features, 'mlp_in')(y)
    # Exact GELU in float32 (timm, torchvision and HF use nn.GELU's erf form).
    y = nn.gelu(y.astype(jnp.float32), approximate=False).astype(self.dtype)
    y = dense(self.features, 'mlp_out')(y)
    gamma = self.param('gamma', nn.initializers.constant(LAYER_SCALE_INIT), (self.features,),
                       jnp.float32)
    y = y.astype(jnp.float32) * gamma
    if train and self.drop_path_rate > 0.0:
      y = drop_path.drop_path(y, self.drop_path_rate, self.make_rng('dropout'))
    # The residual stream is added in float32 (as the ViT's) and kept in `dtype`.
    return (x.astype(jnp.float32) + y).astype(self.dtype)


class ConvNeXt(nn.Module):
  """ConvNeXt classifier on NHWC images; returns float32 logits.

  Attributes:
    num_classes: head size; 0 returns the pooled, normalised features (float32 [B, C]).
    depths: blocks per stage, e.g. (3, 3, 9, 3) for ConvNeXt-T.
    dims: channels per stage, e.g. (96, 192, 384, 768).
    head_norm_eps: epsilon of the LayerNorm before the head (1e-6 torchvision
      and timm; HF's config.layer_norm_eps, 1e-12 by default).
    head_init: 'zeros' or 'lecun_normal'.
    head_bias_init: constant initial head bias.
    remat: recompute each block in the backward pass (same parameters).
    drop_path_rate: stochastic depth in training, linear from 0 at the first
      block to this at the last ('dropout' RNG stream), as timm.
    dtype: compute dtype; parameters stay float32, LayerNorm statistics, the
      residual additions, the pool and the head run in float32.
    layer_impl: 'auto', 'project' or 'flax' (models/layer_impl.py): the
      linears and the 4x4 / 2x2 patchify convs as float32-accumulating
      matmuls, or Flax's. Same parameters.
  """

  num_classes: int
  depths: Sequence[int]
  dims: Sequence[int]
  head_norm_eps: float = LN_EPSILON
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
    if len(self.depths) != len(self.dims):
      raise ValueError(f'depths {tuple(self.depths)} and dims {tuple(self.dims)} must have one '
                       'entry per stage.')
    layers = layer_impl_lib.resolve(self.layer_impl)
    x = layers.conv_module()(self.dims[0], (4, 4), (4, 4), padding='VALID', dtype=self.dtype,
                             param_dtype=jnp.float32, kernel_init=_init, name='conv_init')(x)
    x = ChannelLayerNorm(dtype=self.dtype, name='norm_init')(x)
    self.sow('intermediates', 'stem', x)

    block_cls = nn.remat(ConvNeXtBlock, static_argnums=(2,)) if self.remat else ConvNeXtBlock
    rates = iter(drop_path.block_rates(self.drop_path_rate, sum(self.depths)))
    for i, (depth, dim) in enumerate(zip(self.depths, self.dims)):
      for j in range(depth):
        x = block_cls(features=dim, downsample=i > 0 and j == 0, drop_path_rate=next(rates),
                      dtype=self.dtype, layers=layers,
                      name=f'stage{i + 1}_block{j + 1}')(x, train)

    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    x = ChannelLayerNorm(epsilon=self.head_norm_eps, dtype=jnp.float32, name='norm_pre_head')(x)
    if self.num_classes == 0:
      return x
    kernel_init = (nn.initializers.zeros if self.head_init == 'zeros'
                   else nn.initializers.lecun_normal())
    return nn.Dense(self.num_classes, dtype=jnp.float32, param_dtype=jnp.float32,
                    kernel_init=kernel_init,
                    bias_init=nn.initializers.constant(self.head_bias_init), name='head')(x)
