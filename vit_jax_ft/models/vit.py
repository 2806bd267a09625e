"""Vision Transformer (Dosovitskiy et al. 2020), pre-LayerNorm, in Flax linen.

Parameter names follow google-research/vision_transformer (`vit_jax`) so its
`.npz` checkpoints map one to one: `embedding`, `cls`,
`Transformer/posembed_input/pos_embedding`, `Transformer/encoderblock_{i}/
{LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3}`,
`Transformer/encoder_norm`, `pre_logits`, `head`.

The details that differ between weight sources are fields, not constants:
`gelu_approximate` (vit_jax/big_vision weights were trained with Flax's tanh
GELU; Hugging Face and timm use the exact erf form) and `layer_norm_eps`
(1e-6 in vit_jax and timm, 1e-12 in Hugging Face's ViTConfig).

`classifier='token_distilled'` is DeiT's distilled ViT (Touvron et al. 2021):
a distillation token `dist` follows the class token (position embeddings
cover both, then the patches), `head` classifies the class token and
`head_dist` the distillation token, and the logits are the two heads'
average, as DeiT and timm compute them at inference. Fine-tuning here has
no teacher: both heads start fresh and are trained through that average on
the labels (what timm does without `distilled_training`). With
`num_classes=0` the features are the two tokens' average, so a linear head
W fitted on them is the model with W in both heads.
"""

import functools
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from vit_jax_ft.models import drop_path
from vit_jax_ft.models import layer_impl as layer_impl_lib

Dtype = Any

# Architecture of the published ViT sizes: (patch, hidden, layers, heads, mlp).
VIT_PRESETS = {
    "vit_ti16": dict(patch_size=16, hidden_size=192, num_layers=12, num_heads=3, mlp_dim=768),
    "vit_s16": dict(patch_size=16, hidden_size=384, num_layers=12, num_heads=6, mlp_dim=1536),
    "vit_b16": dict(patch_size=16, hidden_size=768, num_layers=12, num_heads=12, mlp_dim=3072),
    "vit_b32": dict(patch_size=32, hidden_size=768, num_layers=12, num_heads=12, mlp_dim=3072),
    "vit_l16": dict(patch_size=16, hidden_size=1024, num_layers=24, num_heads=16, mlp_dim=4096),
    # DeiT distilled (classifier='token_distilled'; see is_distilled_preset).
    "deit_ti16_distilled": dict(patch_size=16, hidden_size=192, num_layers=12, num_heads=3,
                                mlp_dim=768),
    "deit_s16_distilled": dict(patch_size=16, hidden_size=384, num_layers=12, num_heads=6,
                               mlp_dim=1536),
    "deit_b16_distilled": dict(patch_size=16, hidden_size=768, num_layers=12, num_heads=12,
                               mlp_dim=3072),
}
CLASSIFIERS = ("token", "gap", "token_distilled")


def is_distilled_preset(name: str) -> bool:
  """Presets whose weights have DeiT's distillation token (classifier='token_distilled')."""
  return name in VIT_PRESETS and name.endswith("_distilled")


def num_prefix_tokens(classifier: str) -> int:
  """Tokens before the patches: the class token, and DeiT's distillation token."""
  return {"token": 1, "gap": 0, "token_distilled": 2}[classifier]


class MlpBlock(nn.Module):
  """Transformer MLP: Dense, GELU, dropout, Dense, dropout."""

  mlp_dim: int
  gelu_approximate: bool
  dropout_rate: float
  dtype: Dtype
  layers: layer_impl_lib.Layers = layer_impl_lib.Layers()

  @nn.compact
  def __call__(self, x, *, train: bool):
    out_dim = x.shape[-1]
    dense = functools.partial(
        self.layers.dense_module(),
        dtype=self.dtype,
        kernel_init=nn.initializers.xavier_uniform(),
        bias_init=nn.initializers.normal(stddev=1e-6),
    )
    x = dense(self.mlp_dim, name="Dense_0")(x)
    # In float32: more accurate, and XLA:CPU's bfloat16 elementwise code is slower
    # (a bf16 ViT-B/16 step ran 5% faster this way).
    x = nn.gelu(x.astype(jnp.float32), approximate=self.gelu_approximate).astype(self.dtype)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = dense(out_dim, name="Dense_1")(x)
    return nn.Dropout(self.dropout_rate, deterministic=not train)(x)


class SelfAttention(nn.Module):
  """Multi-head self-attention with the parameters of Flax's MultiHeadDotProductAttention.

  `query`/`key`/`value` kernels are [hidden, heads, head_dim] and `out` is
  [heads, head_dim, hidden], as in vit_jax checkpoints. Written out (rather
  than nn.MultiHeadDotProductAttention) so every projection goes through
  the chosen dense layer (`precision.DenseGeneral` on the project path).
  `sow_weights=True` sows the softmax weights into
  'intermediates/attention_weights' (for attention maps).
  """

  num_heads: int
  dropout_rate: float
  dtype: Dtype
  layers: layer_impl_lib.Layers = layer_impl_lib.Layers()

  @nn.compact
  def __call__(self, x, *, deterministic: bool, sow_weights: bool = False):
    hidden = x.shape[-1]
    if hidden % self.num_heads:
      raise ValueError(f"hidden size {hidden} is not divisible by num_heads={self.num_heads}")
    dense = functools.partial(self.layers.dense_module(), dtype=self.dtype,
                              kernel_init=nn.initializers.xavier_uniform())
    q, k, v = (dense((self.num_heads, hidden // self.num_heads), name=name)(x)
               for name in ("query", "key", "value"))
    use_dropout = not deterministic and self.dropout_rate > 0.0
    attention_fn = self.layers.attention_fn(self.dtype)
    y = attention_fn(q, k, v, dropout_rng=self.make_rng("dropout") if use_dropout else None,
                     dropout_rate=self.dropout_rate, deterministic=not use_dropout,
                     dtype=self.dtype, module=self if sow_weights else None)
    return dense(hidden, axis=(-2, -1), name="out")(y)


class Encoder1DBlock(nn.Module):
  """Pre-LN transformer block: x + MHA(LN(x)), then x + MLP(LN(x)).

  In training, `drop_path_rate` drops each branch (MHA, MLP) per sample
  (stochastic depth, models/drop_path.py).
  """

  num_heads: int
  mlp_dim: int
  gelu_approximate: bool
  layer_norm_eps: float
  dropout_rate: float
  attention_dropout_rate: float
  dtype: Dtype
  drop_path_rate: float = 0.0
  layers: layer_impl_lib.Layers = layer_impl_lib.Layers()

  def _drop_path(self, y, train: bool):
    if not train or self.drop_path_rate == 0.0:
      return y
    return drop_path.drop_path(y, self.drop_path_rate, self.make_rng("dropout"))

  @nn.compact
  def __call__(self, x, train: bool):
    # `train` is positional so nn.remat can mark it static.
    # Names are spelled out so that they stay the vit_jax ones under nn.remat.
    y = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="LayerNorm_0")(x)
    y = SelfAttention(
        num_heads=self.num_heads,
        dropout_rate=self.attention_dropout_rate,
        dtype=self.dtype,
        layers=self.layers,
        name="MultiHeadDotProductAttention_1",
    )(y, deterministic=not train)
    y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
    x = x + self._drop_path(y, train)
    y = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="LayerNorm_2")(x)
    y = MlpBlock(
        mlp_dim=self.mlp_dim,
        gelu_approximate=self.gelu_approximate,
        dropout_rate=self.dropout_rate,
        dtype=self.dtype,
        layers=self.layers,
        name="MlpBlock_3",
    )(y, train=train)
    return x + self._drop_path(y, train)


class AddPositionEmbs(nn.Module):
  """Adds learned position embeddings (one per token, class token included)."""

  @nn.compact
  def __call__(self, x):
    pos_embedding = self.param(
        "pos_embedding", nn.initializers.normal(stddev=0.02), (1,) + x.shape[1:]
    )
    return x + pos_embedding.astype(x.dtype)


class Transformer(nn.Module):
  """Position embeddings, a stack of encoder blocks and the final LayerNorm."""

  num_layers: int
  num_heads: int
  mlp_dim: int
  gelu_approximate: bool
  layer_norm_eps: float
  dropout_rate: float
  attention_dropout_rate: float
  remat: bool
  dtype: Dtype
  drop_path_rate: float = 0.0
  layers: layer_impl_lib.Layers = layer_impl_lib.Layers()

  @nn.compact
  def __call__(self, x, *, train: bool):
    x = AddPositionEmbs(name="posembed_input")(x)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    # `train` is a static argument (argnum 2 counting self) under remat.
    block_cls = nn.remat(Encoder1DBlock, static_argnums=(2,)) if self.remat else Encoder1DBlock
    rates = drop_path.block_rates(self.drop_path_rate, self.num_layers)
    for i in range(self.num_layers):
      x = block_cls(
          num_heads=self.num_heads,
          mlp_dim=self.mlp_dim,
          gelu_approximate=self.gelu_approximate,
          layer_norm_eps=self.layer_norm_eps,
          dropout_rate=self.dropout_rate,
          attention_dropout_rate=self.attention_dropout_rate,
          dtype=self.dtype,
          drop_path_rate=rates[i],
          layers=self.layers,
          name=f"encoderblock_{i}",
      )(x, train)
    return nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="encoder_norm")(x)


class VisionTransformer(nn.Module):
  """ViT classifier. `__call__` takes NHWC images and returns float32 logits.

  Attributes:
    num_classes: Size of the classification head; 0 returns pre-head features.
    classifier: 'token' (class token), 'gap' (global average pool) or
      'token_distilled' (DeiT: class and distillation tokens, two heads averaged).
    representation_size: If set, a tanh `pre_logits` layer (i21k checkpoints).
    head_init: 'zeros' (standard for fine-tuning) or 'lecun_normal'.
    head_bias_init: Initial head bias, e.g. -6.9 for sigmoid multi-label.
    drop_path_rate: Stochastic depth in training: the last block's rate of
      dropping a branch per sample; earlier blocks ramp linearly from 0.
    dtype: Compute dtype; parameters are always float32.
    layer_impl: 'auto' (per backend), 'project' (the XLA:CPU-tuned matmul
      layers) or 'flax' (nn.Conv, nn.Dense, nn.dot_product_attention), or a
      layer_impl.Layers; see models/layer_impl.py. Same parameters.
  """

  num_classes: int
  patch_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  classifier: str = "token"
  representation_size: Optional[int] = None
  gelu_approximate: bool = True
  layer_norm_eps: float = 1e-6
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  head_init: str = "zeros"
  head_bias_init: float = 0.0
  remat: bool = False
  dtype: Dtype = jnp.float32
  layer_impl: Any = "auto"

  @nn.compact
  def __call__(self, images, *, train: bool):
    if self.classifier not in CLASSIFIERS:
      raise ValueError(f"model.classifier must be one of {CLASSIFIERS}, got {self.classifier!r}")
    distilled = self.classifier == "token_distilled"
    if distilled and self.representation_size is not None:
      raise ValueError("classifier='token_distilled' (DeiT) has no pre-logits layer; set "
                       "model.representation_size=None.")
    layers = layer_impl_lib.resolve(self.layer_impl)
    x = images.astype(self.dtype)
    p = self.patch_size
    x = layers.conv_module()(self.hidden_size, (p, p), strides=(p, p), padding="VALID",
                       dtype=self.dtype, name="embedding")(x)
    b, h, w, c = x.shape
    # The residual stream stays float32 (as under torch.autocast): blocks compute in
    # `dtype` and their outputs are added in float32. As fast on XLA:CPU, and the
    # sum of 24 block outputs is not rounded to bfloat16 at every step.
    x = jnp.reshape(x, (b, h * w, c)).astype(jnp.float32)
    if self.classifier in ("token", "token_distilled"):
      tokens = [self.param("cls", nn.initializers.zeros, (1, 1, c))]
      if distilled:  # DeiT's distillation token, right after the class token.
        tokens.append(self.param("dist", nn.initializers.zeros, (1, 1, c)))
      x = jnp.concatenate([jnp.tile(t.astype(x.dtype), (b, 1, 1)) for t in tokens] + [x], axis=1)
    x = Transformer(
        num_layers=self.num_layers,
        num_heads=self.num_heads,
        mlp_dim=self.mlp_dim,
        gelu_approximate=self.gelu_approximate,
        layer_norm_eps=self.layer_norm_eps,
        dropout_rate=self.dropout_rate,
        attention_dropout_rate=self.attention_dropout_rate,
        remat=self.remat,
        dtype=self.dtype,
        drop_path_rate=self.drop_path_rate,
        layers=layers,
        name="Transformer",
    )(x, train=train)
    if distilled:
      return self._distilled_heads(x[:, 0], x[:, 1], layers)
    x = x[:, 0] if self.classifier == "token" else jnp.mean(x, axis=1)
    if self.representation_size is not None:
      x = nn.tanh(layers.dense_module()(self.representation_size, dtype=self.dtype,
                                         name="pre_logits")(x))
    if self.num_classes == 0:
      return x.astype(jnp.float32)
    logits = layers.dense_module()(
        self.num_classes,
        dtype=self.dtype,
        kernel_init=_head_kernel_init(self.head_init),
        bias_init=nn.initializers.constant(self.head_bias_init),
        name="head",
    )(x)
    return logits.astype(jnp.float32)

  def _distilled_heads(self, cls, dist, layers):
    """DeiT: the average of `head` on the class token and `head_dist` on the distillation one."""
    if self.num_classes == 0:
      return ((cls.astype(jnp.float32) + dist.astype(jnp.float32)) / 2)
    head = functools.partial(
        layers.dense_module(), self.num_classes, dtype=self.dtype,
        kernel_init=_head_kernel_init(self.head_init),
        bias_init=nn.initializers.constant(self.head_bias_init))
    logits = (head(name="head")(cls).astype(jnp.float32)
              + head(name="head_dist")(dist).astype(jnp.float32))
    return logits / 2


def _head_kernel_init(name: str):
  if name == "zeros":
    return nn.initializers.zeros
  if name == "lecun_normal":
    return nn.initializers.lecun_normal()
  raise ValueError(f"model.head_init must be 'zeros' or 'lecun_normal', got {name!r}")
