"""timm state dicts: `vit_*_patch*` VisionTransformers, resnet50-style ResNets and ResNeXts,
RegNets, BiT ResNetV2s, ConvNeXts.

timm ViT names: `cls_token`, `pos_embed` (class token slot included unless the
model was built with `no_embed_class`), `patch_embed.proj`, `blocks.{i}.norm1`,
`attn.qkv` (query, key and value fused as one [3D, D] Linear, in that order),
`attn.proj`, `norm2`, `mlp.fc1/fc2`, `norm`, `head`; the distilled DeiTs
(`deit_*_distilled_patch16_224`) add `dist_token` after the class token and
`head_dist` (our classifier='token_distilled'). timm ViTs use exact GELU
and LayerNorm epsilon 1e-6. Models our ViT cannot express (layer scale
`ls1`/`ls2`, `fc_norm` after pooling, register tokens, ...) leave tensors
unmapped and are refused.

timm ResNets and ResNeXts share torchvision's names (see torchvision.py);
timm RegNets (`regnety_004`, ...) are converted by regnet.py, timm's BiT
ResNetV2s (`resnetv2_50x1_bit`, ...) by bit.py, its ConvNeXts by convnext.py. A timm Hub folder
(`config.json` with `architecture` and `pretrained_cfg`) also says the input
normalisation and the class count.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np

from vit_jax_ft.pretrained import bit
from vit_jax_ft.pretrained import conversion
from vit_jax_ft.pretrained import convnext
from vit_jax_ft.pretrained import efficientnet
from vit_jax_ft.pretrained import hub
from vit_jax_ft.pretrained import huggingface
from vit_jax_ft.pretrained import regnet
from vit_jax_ft.pretrained import tensor_files
from vit_jax_ft.pretrained import torchvision

Target = conversion.Target

VIT_MODEL_OPTIONS = {"gelu_approximate": False, "layer_norm_eps": 1e-6}
# Most timm `vit_*` weights (augreg, the original JAX ports) use mean=std=0.5;
# a timm folder's pretrained_cfg overrides this.
VIT_NORMALIZATION = "minus_one_to_one"

_BLOCK = r"blocks\.(\d+)\."
_OUT = "params/Transformer/encoderblock_{}/"
_NORM = {"weight": "scale", "bias": "bias"}
_DENSE = {"weight": "kernel", "bias": "bias"}


def _dense(path: str, kind: str, transform=conversion.torch_dense) -> Target:
  return Target(f"{path}/{_DENSE[kind]}", transform if kind == "weight" else None)


def vit_rules(num_heads: int) -> tuple[conversion.Rule, ...]:
  att_in, att_out = conversion.attention_in(num_heads), conversion.attention_out(num_heads)
  return (
      (r"cls_token", lambda m: Target("params/cls")),
      (r"dist_token", lambda m: Target("params/dist")),
      (r"pos_embed", lambda m: Target("params/Transformer/posembed_input/pos_embedding")),
      (r"patch_embed\.proj\.weight", lambda m: Target("params/embedding/kernel",
                                                       conversion.torch_conv)),
      (r"patch_embed\.proj\.bias", lambda m: Target("params/embedding/bias")),
      (_BLOCK + r"norm([12])\.(weight|bias)",
       lambda m: Target(_OUT.format(m[1]) + ("LayerNorm_0" if m[2] == "1" else "LayerNorm_2")
                        + "/" + _NORM[m[3]])),
      # attn.q/k/v are the three thirds of attn.qkv, split by `_split_qkv`.
      (_BLOCK + r"attn\.([qkv])\.(weight|bias)",
       lambda m: Target(_OUT.format(m[1]) + "MultiHeadDotProductAttention_1/"
                        + {"q": "query", "k": "key", "v": "value"}[m[2]] + "/" + _DENSE[m[3]],
                        att_in)),
      (_BLOCK + r"attn\.proj\.(weight|bias)",
       lambda m: Target(_OUT.format(m[1]) + "MultiHeadDotProductAttention_1/out/" + _DENSE[m[2]],
                        att_out)),
      (_BLOCK + r"mlp\.fc([12])\.(weight|bias)",
       lambda m: _dense(_OUT.format(m[1]) + f"MlpBlock_3/Dense_{int(m[2]) - 1}", m[3])),
      (r"norm\.(weight|bias)", lambda m: Target("params/Transformer/encoder_norm/" + _NORM[m[1]])),
      (r"pre_logits\.fc\.(weight|bias)", lambda m: _dense("params/pre_logits", m[1])),
      (r"head\.(weight|bias)", lambda m: _dense("params/head", m[1])),
      (r"head_dist\.(weight|bias)", lambda m: _dense("params/head_dist", m[1])),
  )


def is_vit_state_dict(names) -> bool:
  return "patch_embed.proj.weight" in names and any(n.startswith("blocks.") for n in names)


def is_timm_folder(folder: str) -> bool:
  config = huggingface.read_config(folder)
  return config is not None and "architecture" in config and "model_type" not in config


def _split_qkv(tensors: tensor_files.TensorFile) -> tensor_files.TensorFile:
  """A view in which each fused `attn.qkv` is three tensors `attn.q/k/v`."""
  sources: dict[str, tuple[str, int | None]] = {}
  shapes = {}
  for name in tensors:
    shape = tensors.shape(name)
    if name.endswith("attn.qkv.weight") or name.endswith("attn.qkv.bias"):
      stem, kind = name.rsplit(".", 2)[0], name.rsplit(".", 1)[1]
      for i, part in enumerate("qkv"):
        sources[f"{stem}.{part}.{kind}"] = (name, i)
        shapes[f"{stem}.{part}.{kind}"] = (shape[0] // 3,) + tuple(shape[1:])
    else:
      sources[name], shapes[name] = (name, None), shape

  def load(key: str) -> np.ndarray:
    name, part = sources[key]
    value = tensors[name]
    if part is None:
      return value
    d = value.shape[0] // 3
    return value[part * d:(part + 1) * d]

  return tensor_files.TensorFile(tensors.path, shapes, load, tensors.metadata)


def _num_heads(tensors: tensor_files.TensorFile, num_heads: int | None) -> int:
  if num_heads:
    return num_heads
  # timm's published ViTs all use 64-wide heads (ViT-Ti 3, S 6, B 12, L 16, H 16 of 80!).
  hidden = tensors.shape("patch_embed.proj.weight")[0]
  if hidden == 1280:
    return 16
  return max(1, hidden // 64)


def _fix_pos_embed(tensors: tensor_files.TensorFile) -> tensor_files.TensorFile:
  """Adds a zero class-token slot to `pos_embed` of `no_embed_class` models."""
  if "pos_embed" not in tensors or "cls_token" not in tensors:
    return tensors
  shape = tensors.shape("pos_embed")
  if math.isqrt(shape[1]) ** 2 != shape[1]:
    return tensors  # Class token slot present (N + 1 is never a square).
  shapes = {k: tensors.shape(k) for k in tensors}
  shapes["pos_embed"] = (shape[0], shape[1] + 1, shape[2])

  def load(key: str) -> np.ndarray:
    value = tensors[key]
    if key == "pos_embed":
      value = np.concatenate([np.zeros_like(value[:, :1]), value], axis=1)
    return value

  return tensor_files.TensorFile(tensors.path, shapes, load, tensors.metadata)


def convert_vit(tensors: tensor_files.TensorFile, *, source: str, strict: bool = True,
                num_heads: int | None = None, normalization: str = VIT_NORMALIZATION,
                image_size: int | None = None, class_names=None) -> conversion.Converted:
  """Converts a timm VisionTransformer state dict."""
  heads = _num_heads(tensors, num_heads)
  tensors = _fix_pos_embed(_split_qkv(tensors))
  params, _, unused = conversion.apply_rules(tensors, vit_rules(heads))
  conversion.check_unused(unused, tensors.path, strict)
  return conversion.make_converted(
      params, {}, source=source, fmt="timm", normalization=normalization,
      model_options=VIT_MODEL_OPTIONS, unused=unused, image_size=image_size,
      class_names=class_names)


def convert_state_dict(tensors: tensor_files.TensorFile, *, source: str, strict: bool = True,
                       normalization: str | None = None, **kwargs) -> conversion.Converted:
  """A timm ViT or ResNet state dict, told apart by its names."""
  tensors = conversion.strip_prefix(tensors, ("model.",))
  if is_vit_state_dict(tensors):
    # timm's DeiTs (distilled ones have dist_token) expect ImageNet mean/std inputs.
    default = "imagenet" if "dist_token" in tensors else VIT_NORMALIZATION
    return convert_vit(tensors, source=source, strict=strict,
                       normalization=normalization or default, **kwargs)
  if bit.is_timm_state_dict(tensors):
    return bit.convert_timm(tensors, source=source, strict=strict,
                            normalization=normalization or bit.NORMALIZATION)
  if efficientnet.is_timm_state_dict(tensors):
    return efficientnet.convert_timm(tensors, source=source, strict=strict,
                                     normalization=normalization or efficientnet.NORMALIZATION,
                                     architecture=kwargs.get("architecture"))
  if convnext.is_timm_state_dict(tensors):
    return convnext.convert_timm(tensors, source=source, strict=strict,
                                 normalization=normalization or convnext.NORMALIZATION)
  if torchvision.is_resnet_state_dict(tensors):
    return torchvision.convert(tensors, source=source, strict=strict, fmt="timm",
                               normalization=normalization or torchvision.NORMALIZATION)
  if regnet.is_timm_regnet(tensors):
    return regnet.convert(tensors, source=source, strict=strict,
                          normalization=normalization or regnet.NORMALIZATION)
  raise conversion.ConversionError(f"{tensors.path} is neither a timm ViT, ResNet/ResNeXt, "
                                   f"RegNet, BiT ResNetV2 nor ConvNeXt state dict; found e.g. "
                                   f"{sorted(tensors)[:6]}")


def convert_folder(folder: str, *, source: str, strict: bool = True) -> conversion.Converted:
  """timm's BiT ResNetV2s (`resnetv2_50x1_bit`, ...) are converted by bit.py.

A timm Hub folder: config.json (architecture, pretrained_cfg) + weights."""
  with open(os.path.join(folder, "config.json")) as f:
    config: dict[str, Any] = json.load(f)
  cfg = config.get("pretrained_cfg", {})
  family_default = ("minus_one_to_one" if config["architecture"].startswith("vit")
                    or config["architecture"].endswith("_bit") else "imagenet")
  normalization = huggingface.normalization_from_mean_std(
      cfg.get("mean"), cfg.get("std"), family_default)
  tensors = hub.read_folder_weights(folder)
  kwargs = {}
  if efficientnet.is_timm_state_dict(conversion.strip_prefix(tensors, ("model.",))):
    kwargs = {"architecture": config["architecture"]}  # tf_efficientnet_*: TF options.
  if is_vit_state_dict(conversion.strip_prefix(tensors, ("model.",))):
    input_size = cfg.get("input_size")
    kwargs = {"num_heads": (config.get("model_args") or {}).get("num_heads"),
              "image_size": input_size[-1] if input_size else None,
              "class_names": config.get("label_names")}
  converted = convert_state_dict(tensors, source=source, strict=strict,
                                 normalization=normalization, **kwargs)
  converted.metadata["timm_architecture"] = config["architecture"]
  return converted
