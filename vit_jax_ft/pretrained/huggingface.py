"""Hugging Face `transformers` ViT, DeiT, ResNet and ConvNeXt folders (config.json + weights).

(ConvNeXt's names are mapped by convnext.py.)

Handles ViTModel / ViTForImageClassification, DeiT (`deit.` prefix; the
distilled `DeiTForImageClassificationWithTeacher` adds `distillation_token`
and two heads, `cls_classifier` and `distillation_classifier`, whose average
it returns: our classifier='token_distilled') and ResNetModel /
ResNetForImageClassification, in the names `save_pretrained` writes (and the
renamed in-memory names of transformers 5: `layers.{i}.attention.q_proj`).
`config.json` gives the options our model needs: HF ViTs use exact GELU and
LayerNorm epsilon 1e-12 unless it says otherwise; ResNets stride the 3x3 conv
(v1.5) unless `downsample_in_bottleneck`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from vit_jax_ft.inputs import normalization as normalization_lib
from vit_jax_ft.pretrained import architecture
from vit_jax_ft.pretrained import conversion
from vit_jax_ft.pretrained import convnext
from vit_jax_ft.pretrained import hub
from vit_jax_ft.pretrained import regnet
from vit_jax_ft.pretrained import tensor_files

Target = conversion.Target

# HF activation names -> our `gelu_approximate`.
_GELU_APPROXIMATE = {"gelu": False, "gelu_python": False, "gelu_new": True,
                     "gelu_pytorch_tanh": True, "gelu_fast": True}

_LAYER = r"(?:encoder\.layer|layers)\.(\d+)\."
_BLOCK = "params/Transformer/encoderblock_{}/"
_NORM = {"weight": "scale", "bias": "bias"}
_DENSE = {"weight": "kernel", "bias": "bias"}


def _dense(path: str, kind: str) -> Target:
  return Target(f"{path}/{_DENSE[kind]}", conversion.torch_dense if kind == "weight" else None)


def vit_rules(num_heads: int) -> tuple[conversion.Rule, ...]:
  """Name rules for HF ViT (without the `vit.` prefix)."""
  att_in, att_out = conversion.attention_in(num_heads), conversion.attention_out(num_heads)
  qkv = {"query": "query", "key": "key", "value": "value", "q_proj": "query",
         "k_proj": "key", "v_proj": "value"}
  return (
      (r"embeddings\.cls_token", lambda m: Target("params/cls")),
      (r"embeddings\.distillation_token", lambda m: Target("params/dist")),
      (r"embeddings\.position_embeddings",
       lambda m: Target("params/Transformer/posembed_input/pos_embedding")),
      (r"embeddings\.patch_embeddings\.projection\.weight",
       lambda m: Target("params/embedding/kernel", conversion.torch_conv)),
      (r"embeddings\.patch_embeddings\.projection\.bias",
       lambda m: Target("params/embedding/bias")),
      (_LAYER + r"layernorm_(before|after)\.(weight|bias)",
       lambda m: Target(_BLOCK.format(m[1]) + ("LayerNorm_0" if m[2] == "before" else "LayerNorm_2")
                        + "/" + _NORM[m[3]])),
      (_LAYER + r"attention\.(?:attention\.)?(query|key|value|[qkv]_proj)\.(weight|bias)",
       lambda m: Target(_BLOCK.format(m[1]) + f"MultiHeadDotProductAttention_1/{qkv[m[2]]}/"
                        + _DENSE[m[3]], att_in)),
      (_LAYER + r"attention\.(?:output\.dense|o_proj)\.(weight|bias)",
       lambda m: Target(_BLOCK.format(m[1]) + "MultiHeadDotProductAttention_1/out/" + _DENSE[m[2]],
                        att_out)),
      (_LAYER + r"(?:intermediate\.dense|mlp\.fc1)\.(weight|bias)",
       lambda m: _dense(_BLOCK.format(m[1]) + "MlpBlock_3/Dense_0", m[2])),
      (_LAYER + r"(?:output\.dense|mlp\.fc2)\.(weight|bias)",
       lambda m: _dense(_BLOCK.format(m[1]) + "MlpBlock_3/Dense_1", m[2])),
      (r"layernorm\.(weight|bias)",
       lambda m: Target("params/Transformer/encoder_norm/" + _NORM[m[1]])),
      (r"pooler\.dense\.(weight|bias)", lambda m: _dense("params/pre_logits", m[1])),
      (r"(?:cls_)?classifier\.(weight|bias)", lambda m: _dense("params/head", m[1])),
      (r"distillation_classifier\.(weight|bias)", lambda m: _dense("params/head_dist", m[1])),
  )


def _resnet_block(m) -> str:
  return f"stage{int(m[1]) + 1}_block{int(m[2]) + 1}"


_RESNET_BLOCK = r"encoder\.stages\.(\d+)\.layers\.(\d+)\."
_BN_KINDS = r"(weight|bias|running_mean|running_var)"

RESNET_RULES: tuple[conversion.Rule, ...] = (
    (r"embedder\.embedder\.convolution\.weight",
     lambda m: Target("params/conv_init/kernel", conversion.torch_conv)),
    (r"embedder\.embedder\.normalization\." + _BN_KINDS,
     lambda m: conversion.torch_batchnorm("bn_init", m[1])),
    (_RESNET_BLOCK + r"shortcut\.convolution\.weight",
     lambda m: Target(f"params/{_resnet_block(m)}/proj_conv/kernel", conversion.torch_conv)),
    (_RESNET_BLOCK + r"shortcut\.normalization\." + _BN_KINDS,
     lambda m: conversion.torch_batchnorm(f"{_resnet_block(m)}/proj_bn", m[3])),
    (_RESNET_BLOCK + r"layer\.(\d)\.convolution\.weight",
     lambda m: Target(f"params/{_resnet_block(m)}/conv{int(m[3]) + 1}/kernel",
                      conversion.torch_conv)),
    (_RESNET_BLOCK + r"layer\.(\d)\.normalization\." + _BN_KINDS,
     lambda m: conversion.torch_batchnorm(f"{_resnet_block(m)}/bn{int(m[3]) + 1}", m[4])),
    (r"classifier\.1\.(weight|bias)", lambda m: _dense("params/head", m[1])),
)
_RESNET_IGNORE = (r".*num_batches_tracked",)


def is_transformers_folder(folder: str) -> bool:
  config = read_config(folder)
  return config is not None and "model_type" in config


def read_config(folder: str) -> dict[str, Any] | None:
  path = os.path.join(folder, "config.json")
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def normalization_from_mean_std(mean, std, default: str) -> str:
  """Our normalization name for a preprocessing mean/std on [0, 1] pixels."""
  if mean is None or std is None:
    return default
  mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
  known = normalization_lib.MEAN_STD
  for name, (m, s) in known.items():
    if np.allclose(mean, m, atol=2e-3) and np.allclose(std, s, atol=2e-3):
      return name
  raise conversion.ConversionError(
      f"The weights expect inputs normalised with mean={mean.tolist()} std={std.tolist()}, "
      f"which is none of {list(known)}; the input pipeline cannot feed them.")


def _preprocessing_normalization(folder: str, default: str) -> str:
  path = os.path.join(folder, "preprocessor_config.json")
  if not os.path.isfile(path):
    return default
  with open(path) as f:
    pre = json.load(f)
  if pre.get("do_normalize") is False:
    return "zero_one"
  return normalization_from_mean_std(pre.get("image_mean"), pre.get("image_std"), default)


def convert_folder(folder: str, *, source: str, strict: bool = True) -> conversion.Converted:
  """Converts a transformers ViT/ResNet folder."""
  config = read_config(folder) or {}
  tensors = hub.read_folder_weights(folder)
  model_type = config.get("model_type") or _guess_model_type(tensors)
  if model_type in ("vit", "deit"):  # DeiT was trained on ImageNet mean/std inputs.
    default = "imagenet" if model_type == "deit" else "minus_one_to_one"
    return convert_vit(tensors, config, source=source, strict=strict,
                       normalization=_preprocessing_normalization(folder, default))
  if model_type == "resnet":
    return convert_resnet(tensors, config, source=source, strict=strict,
                          normalization=_preprocessing_normalization(folder, "imagenet"))
  if model_type == "regnet":
    return convert_regnet(tensors, config, source=source, strict=strict,
                          normalization=_preprocessing_normalization(folder, "imagenet"))
  if model_type == "convnext":
    return convnext.convert_huggingface(
        tensors, config, source=source, strict=strict,
        normalization=_preprocessing_normalization(folder, convnext.NORMALIZATION),
        class_names=_id2label(config))
  raise conversion.ConversionError(
      f"{folder}: model_type {model_type!r} is not supported (only 'vit', 'deit', 'resnet', "
      "'regnet' and 'convnext').")


def _guess_model_type(tensors: tensor_files.TensorFile) -> str | None:
  if any("patch_embeddings" in k for k in tensors):
    return "vit"
  if regnet.is_huggingface_regnet(tensors):
    return "regnet"
  if any("embedder.embedder" in k for k in tensors):
    return "resnet"
  return None


def convert_vit(tensors: tensor_files.TensorFile, config: Mapping[str, Any], *, source: str,
                strict: bool, normalization: str) -> conversion.Converted:
  """HF ViT or DeiT weights (+ config.json, ViTConfig defaults where it is silent)."""
  act = config.get("hidden_act", "gelu")
  if act not in _GELU_APPROXIMATE:
    raise conversion.ConversionError(f"{tensors.path}: hidden_act={act!r} is not supported "
                                     f"(one of {sorted(_GELU_APPROXIMATE)}).")
  tensors = conversion.strip_prefix(tensors, ("vit.", "deit."))
  hidden = tensors.shape("embeddings.cls_token")[-1]
  num_heads = int(config.get("num_attention_heads", _default_heads(hidden)))
  # mask_token only serves masked-image-modelling pretraining.
  params, _, unused = conversion.apply_rules(tensors, vit_rules(num_heads),
                                             ignore=(r"embeddings\.mask_token",))
  conversion.check_unused(unused, tensors.path, strict)
  _check_config_agrees(config, architecture.vit_from_params(params), tensors.path, {
      "hidden_size": "hidden_size", "num_hidden_layers": "num_layers",
      "intermediate_size": "mlp_dim", "patch_size": "patch_size"})
  return conversion.make_converted(
      params, {}, source=source, fmt="huggingface", normalization=normalization,
      model_options={"gelu_approximate": _GELU_APPROXIMATE[act],
                     "layer_norm_eps": float(config.get("layer_norm_eps", 1e-12))},
      unused=unused, image_size=config.get("image_size"), class_names=_class_names(config, params))


def _default_heads(hidden: int) -> int:
  # Without config.json: the published sizes (hidden / 64 heads for all of them).
  return max(1, hidden // 64)


def convert_resnet(tensors: tensor_files.TensorFile, config: Mapping[str, Any], *, source: str,
                   strict: bool, normalization: str) -> conversion.Converted:
  """HF ResNet weights (+ config.json)."""
  if config.get("downsample_in_first_stage"):
    raise conversion.ConversionError(
        f"{tensors.path}: downsample_in_first_stage=True ResNets are not supported.")
  if config.get("hidden_act", "relu") != "relu":
    raise conversion.ConversionError(f"{tensors.path}: hidden_act must be relu.")
  tensors = conversion.strip_prefix(tensors, ("resnet.",))
  params, batch_stats, unused = conversion.apply_rules(tensors, RESNET_RULES, _RESNET_IGNORE)
  conversion.check_unused(unused, tensors.path, strict)
  _check_config_agrees(config, architecture.resnet_from_params(params), tensors.path, {
      "depths": "stage_sizes", "layer_type": "block", "embedding_size": "width"})
  variant = "v1" if config.get("downsample_in_bottleneck") else "v1.5"
  return conversion.make_converted(
      params, batch_stats, source=source, fmt="huggingface", normalization=normalization,
      model_options={"variant": variant, "conv_bias": False, "bn_epsilon": 1e-5},
      unused=unused, class_names=_class_names(config, params))


def convert_regnet(tensors: tensor_files.TensorFile, config: Mapping[str, Any], *, source: str,
                   strict: bool, normalization: str) -> conversion.Converted:
  """HF RegNet weights (+ config.json): regnet.py's rules, checked against the config."""
  if config.get("hidden_act", "relu") != "relu" or not config.get("downsample_in_first_stage",
                                                                  True):
    raise conversion.ConversionError(
        f"{tensors.path}: only RegNets with ReLU that downsample in the first stage (every "
        "published one) are supported.")
  converted = regnet.convert(tensors, source=source, strict=strict, normalization=normalization)
  _check_config_agrees(config, converted.metadata["architecture"], tensors.path, {
      "depths": "depths", "hidden_sizes": "widths", "embedding_size": "stem_width"})
  names = _class_names(config, converted.params)
  if names is not None:
    converted.metadata["class_names"] = names
  return converted


def _check_config_agrees(config: Mapping[str, Any], arch: Mapping[str, Any], path: str,
                         fields: Mapping[str, str]) -> None:
  """config.json and the tensors' shapes must describe the same network."""
  for config_key, arch_key in fields.items():
    if config_key in config and list(_listify(config[config_key])) != list(
        _listify(arch[arch_key])):
      raise conversion.ConversionError(
          f"{path}: config.json says {config_key}={config[config_key]!r} but the weights have "
          f"{arch_key}={arch[arch_key]!r}; the folder mixes files of two models.")


def _listify(x):
  return x if isinstance(x, (list, tuple)) else [x]


def _id2label(config: Mapping[str, Any]) -> list[str] | None:
  """config.json's class names in index order, or None."""
  id2label = config.get("id2label")
  return [id2label[str(i)] for i in range(len(id2label))] if id2label else None


def _class_names(config: Mapping[str, Any], params: Mapping[str, Any]) -> list[str] | None:
  id2label = config.get("id2label")
  head = params.get("head")
  if not id2label or not head or len(id2label) != head["kernel"].shape[-1]:
    return None
  return [id2label[str(i)] for i in range(len(id2label))]
