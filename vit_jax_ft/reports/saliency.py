"""Where the model looks: ViT attention rollout and class-token attention, CNN Grad-CAM.

(CNN: ResNet/ResNeXt, RegNet, BiT, ConvNeXt and EfficientNet, on their last block's output.)

Both hook into the unmodified models with `flax.linen.intercept_methods`:
for the ViT, every SelfAttention call gets `sow_weights=True`
(its attention function then sows the softmax weights into 'intermediates',
in float32 and low precision alike); for the CNNs (ResNet, ResNeXt, RegNet), the last residual block's
output gets a zero perturbation added, whose gradient is the gradient with
respect to the last stage's activations.

Maps come back on the token / feature grid, non-negative; `to_image` upsamples
them and scales each to [0, 1] for overlays.
"""

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax_ft.models import bit as bit_lib
from vit_jax_ft.models import regnet as regnet_lib
from vit_jax_ft.models import convnext as convnext_lib
from vit_jax_ft.models import efficientnet as efficientnet_lib
from vit_jax_ft.models import resnet as resnet_lib
from vit_jax_ft.models import vit as vit_lib


def is_vit(model: nn.Module) -> bool:
  return isinstance(model, vit_lib.VisionTransformer)


def _sow_attention(next_fun, args, kwargs, context):
  if isinstance(context.module, vit_lib.SelfAttention) and \
      context.method_name == "__call__":
    kwargs = dict(kwargs, sow_weights=True)
  return next_fun(*args, **kwargs)


def vit_attentions(model: nn.Module, variables: dict, images: jax.Array
                   ) -> tuple[jax.Array, list[jax.Array]]:
  """(logits, per-layer attention weights [B, heads, T, T] in layer order)."""
  with nn.intercept_methods(_sow_attention):
    logits, state = model.apply(variables, images, train=False, mutable=["intermediates"])
  blocks = state["intermediates"]["Transformer"]
  return logits, [blocks[f"encoderblock_{i}"]["MultiHeadDotProductAttention_1"]
                  ["attention_weights"][0].astype(jnp.float32)
                  for i in range(model.num_layers)]


def attention_rollout(attentions: list[jax.Array]) -> jax.Array:
  """Abnar & Zuidema (2020) rollout [B, T, T]: heads averaged, residual as identity.

  Each layer's head-averaged attention A becomes 0.5 * A + 0.5 * I (the skip
  connection carries the token itself), rows renormalised, and the layers
  are multiplied from the first to the last: R = A_L ... A_1.
  """
  rollout = None
  for weights in attentions:
    a = weights.mean(axis=1)
    a = 0.5 * a + 0.5 * jnp.eye(a.shape[-1], dtype=a.dtype)
    a = a / a.sum(axis=-1, keepdims=True)
    rollout = a if rollout is None else a @ rollout
  return rollout


def _token_grid(model: nn.Module, relevance: jax.Array, image_size: tuple[int, int]) -> jax.Array:
  """[B, num patches] (class token dropped) -> [B, grid_h, grid_w]."""
  gh, gw = image_size[0] // model.patch_size, image_size[1] // model.patch_size
  return relevance.reshape(relevance.shape[0], gh, gw)


def vit_maps(model: nn.Module, variables: dict, images: jax.Array) -> tuple[jax.Array, dict]:
  """(logits, {'attention rollout', 'last-layer class-token attention'}) on the patch grid.

  With classifier='gap' there is no class token: the maps average over all
  query tokens instead. A DeiT distilled ViT's maps are its class token's.
  """
  logits, attentions = vit_attentions(model, variables, images)
  rollout = attention_rollout(attentions)
  last = attentions[-1].mean(axis=1)
  if model.classifier in ("token", "token_distilled"):
    # The class token's row over the patches (after DeiT's distillation token, if any).
    p = vit_lib.num_prefix_tokens(model.classifier)
    rows_rollout, rows_last = rollout[:, 0, p:], last[:, 0, p:]
    names = ("attention rollout", "last-layer [CLS] attention")
  else:
    rows_rollout, rows_last = rollout.mean(axis=1), last.mean(axis=1)
    names = ("attention rollout (mean over tokens)", "last-layer attention (mean over tokens)")
  size = images.shape[1:3]
  return logits, {names[0]: _token_grid(model, rows_rollout, size),
                  names[1]: _token_grid(model, rows_last, size)}


def last_block_name(model: nn.Module) -> str:
  """The last block of a ResNet, RegNet, BiT, ConvNeXt or EfficientNet: Grad-CAM's layer.

  (EfficientNet's 1x1 conv_head after it only mixes channels, position by position.)
  """
  if isinstance(model, efficientnet_lib.EfficientNet):
    sizes = [n for *_, n in efficientnet_lib.stage_specs(model.width_mult, model.depth_mult)]
  elif isinstance(model, (regnet_lib.RegNet, convnext_lib.ConvNeXt)):
    sizes = model.depths
  else:
    sizes = model.stage_sizes
  return f"stage{len(sizes)}_block{sizes[-1]}"


def gradcam(model: nn.Module, variables: dict, images: jax.Array,
            targets: Optional[jax.Array] = None,
            multilabel: bool = False) -> tuple[jax.Array, jax.Array]:
  """(logits, Grad-CAM [B, h, w]) on the last stage's output (Selvaraju et al. 2017).

  cam = ReLU(sum_k alpha_k A_k) with alpha_k the spatial mean of d score / d A_k;
  the target is the predicted class unless `targets` [B] is given. The score
  is the target's log-softmax for single-label models: evidence for the
  class *against the others*. (With the raw logit, a model that learnt
  "class 1 unless the class 0 pattern is present" has no positive evidence
  for class 1 anywhere and its map is empty.) Multi-label models score each
  label's own logit, as the labels do not compete.
  """
  name = last_block_name(model)

  def forward(delta):
    captured = {}

    def perturb(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if context.method_name == "__call__" and context.module.name == name:
        captured["activation"] = out
        out = out + delta.astype(out.dtype)
      return out

    with nn.intercept_methods(perturb):
      logits = model.apply(variables, images, train=False)
    chosen = jnp.argmax(logits, -1) if targets is None else targets
    scores = logits if multilabel else jax.nn.log_softmax(logits.astype(jnp.float32))
    score = jnp.sum(jnp.take_along_axis(scores, chosen[:, None], axis=1))
    return score, (captured["activation"], logits)

  shape = jax.eval_shape(lambda: forward(jnp.zeros((), jnp.float32))[1][0])
  grads, (activation, logits) = jax.grad(forward, has_aux=True)(
      jnp.zeros(shape.shape, jnp.float32))
  alpha = grads.mean(axis=(1, 2), keepdims=True)
  cam = jax.nn.relu(jnp.sum(alpha * activation.astype(jnp.float32), axis=-1))
  return logits, cam


def make_explainer(model: nn.Module, multilabel: bool = False):
  """A jitted (variables, images) -> (logits, {map name: [B, h, w]}) for a ViT, ResNet or RegNet."""
  if is_vit(model):
    return jax.jit(functools.partial(vit_maps, model))
  if isinstance(model, (resnet_lib.ResNet, bit_lib.BiT, regnet_lib.RegNet, convnext_lib.ConvNeXt,
                        efficientnet_lib.EfficientNet)):
    name = f"Grad-CAM ({last_block_name(model).split('_')[0]})"

    def resnet_maps(variables, images):
      logits, cam = gradcam(model, variables, images, multilabel=multilabel)
      return logits, {name: cam}

    return jax.jit(resnet_maps)
  raise ValueError(f"No explanation method for {type(model).__name__}.")


def explain_batch(model: nn.Module, variables: dict, images: Any,
                  multilabel: bool = False) -> tuple[np.ndarray, dict]:
  """make_explainer's maps for one batch, as numpy (compiles each call)."""
  logits, maps = make_explainer(model, multilabel)(variables, jnp.asarray(images, jnp.float32))
  return np.asarray(logits), {k: np.asarray(v) for k, v in maps.items()}


def to_image(maps: np.ndarray, size: tuple[int, int], method: str = "bilinear") -> np.ndarray:
  """[B, h, w] -> [B, H, W] in [0, 1]: upsampled, then min-max scaled per map.

  'bilinear' for display; 'nearest' keeps each cell's value on the pixels it
  covers. Min-max, as Grad-CAM and rollout visualisations usually do: the
  floor every cell shares (rollout's identity share, Grad-CAM's diffuse
  positive evidence) says nothing about where the model looks.
  """
  maps = np.asarray(maps, np.float32)
  up = np.asarray(jax.image.resize(maps, (maps.shape[0],) + tuple(size), method))
  flat = up.reshape(len(up), -1)
  low, span = flat.min(axis=1), flat.max(axis=1) - flat.min(axis=1)
  return (up - low[:, None, None]) / np.where(span > 0, span, 1.0)[:, None, None]


def mass_inside(heat: np.ndarray, region: np.ndarray) -> np.ndarray:
  """Fraction of each map's (non-negative) mass inside a boolean region [B, H, W]."""
  heat = np.maximum(heat, 0.0)
  total = heat.reshape(len(heat), -1).sum(axis=1)
  inside = (heat * region).reshape(len(heat), -1).sum(axis=1)
  return inside / np.maximum(total, 1e-12)
