"""ConvNeXt weights: torchvision and timm state dicts, Hugging Face `ConvNextForImageClassification`.

torchvision (`convnext_tiny`, ...)::

  features.0.{0,1}                  stem conv 4x4/4, LayerNorm2d
  features.{1,3,5,7}.{j}.block.{0,2,3,5}, .layer_scale [C, 1, 1]
                                    dwconv, LayerNorm, Linear 4x, Linear; layer scale
  features.{2,4,6}.{0,1}            downsampling LayerNorm2d, conv 2x2/2
  classifier.{0,2}                  LayerNorm2d, Linear

timm (`convnext_tiny`, ...): `stem.{0,1}`, `stages.{i}.downsample.{0,1}`,
`stages.{i}.blocks.{j}.{conv_dw,norm,mlp.fc1,mlp.fc2,gamma}`, `head.norm`,
`head.fc` (the `conv_mlp` variants hold the MLP as 1x1 convs, read alike). The
original facebookresearch/ConvNeXt checkpoints (`downsample_layers.*`,
`stages.{i}.{j}.dwconv/pwconv1/...`, `norm`, `head`) are read too: timm's own
`checkpoint_filter_fn` maps them onto the same names.

Hugging Face: `convnext.embeddings.{patch_embeddings,layernorm}`,
`convnext.encoder.stages.{i}.downsampling_layer.{0,1}`,
`convnext.encoder.stages.{i}.layers.{j}.{dwconv,layernorm,pwconv1,pwconv2,layer_scale_parameter}`,
`convnext.layernorm` (epsilon `config.layer_norm_eps`, 1e-12 by default; every
other LayerNorm is 1e-6), `classifier`.

All of them expect ImageNet mean/std inputs and use the exact GELU.
"""

from __future__ import annotations

from collections.abc import Mapping
import re
from typing import Any

import numpy as np

from vit_jax_ft.pretrained import conversion
from vit_jax_ft.pretrained import tensor_files

Target = conversion.Target

NORMALIZATION = "imagenet"
MODEL_OPTIONS = {"head_norm_eps": 1e-6}
_NORM = {"weight": "scale", "bias": "bias"}


def _dense(x: np.ndarray) -> np.ndarray:
  """Linear [out, in] (or a 1x1 conv [out, in, 1, 1]) -> Dense kernel [in, out]."""
  return np.reshape(x, x.shape[:2]).T


def _vector(x: np.ndarray) -> np.ndarray:
  return np.reshape(x, (-1,))  # torchvision's layer scale is [C, 1, 1].


def _leaf(path: str, kind: str, transform=None) -> Target:
  """A conv/linear/norm tensor: weight -> kernel (with `transform`), bias -> bias."""
  if kind == "bias":
    return Target(f"{path}/bias")
  return Target(f"{path}/kernel", transform)


def _norm(path: str, kind: str) -> Target:
  return Target(f"{path}/{_NORM[kind]}")


def _block(stage: int, block: int) -> str:
  """Our block path from 0-based stage and block indices."""
  return f"params/stage{stage + 1}_block{block + 1}"


# Block parts, shared by the three layouts: (our name, kind of tensor).
_PART_KINDS = {"dwconv": "conv", "norm": "norm", "mlp_in": "dense", "mlp_out": "dense"}


def _part(block: str, part: str, kind: str) -> Target:
  if _PART_KINDS[part] == "norm":
    return _norm(f"{block}/{part}", kind)
  return _leaf(f"{block}/{part}", kind,
               conversion.torch_conv if _PART_KINDS[part] == "conv" else _dense)


_TV_PARTS = {"0": "dwconv", "2": "norm", "3": "mlp_in", "5": "mlp_out"}

TORCHVISION_RULES: tuple[conversion.Rule, ...] = (
    (r"features\.0\.0\.(weight|bias)", lambda m: _leaf("params/conv_init", m[1],
                                                       conversion.torch_conv)),
    (r"features\.0\.1\.(weight|bias)", lambda m: _norm("params/norm_init", m[1])),
    (r"features\.(\d*[13579])\.(\d+)\.block\.([0235])\.(weight|bias)",
     lambda m: _part(_block(int(m[1]) // 2, int(m[2])), _TV_PARTS[m[3]], m[4])),
    (r"features\.(\d*[13579])\.(\d+)\.layer_scale",
     lambda m: Target(_block(int(m[1]) // 2, int(m[2])) + "/gamma", _vector)),
    (r"features\.(\d*[2468]|\d+0)\.0\.(weight|bias)",
     lambda m: _norm(_block(int(m[1]) // 2, 0) + "/downsample_norm", m[2])),
    (r"features\.(\d*[2468]|\d+0)\.1\.(weight|bias)",
     lambda m: _leaf(_block(int(m[1]) // 2, 0) + "/downsample_conv", m[2],
                     conversion.torch_conv)),
    (r"classifier\.0\.(weight|bias)", lambda m: _norm("params/norm_pre_head", m[1])),
    (r"classifier\.2\.(weight|bias)", lambda m: _leaf("params/head", m[1], _dense)),
)

_TIMM_PARTS = {"conv_dw": "dwconv", "norm": "norm", "mlp.fc1": "mlp_in", "mlp.fc2": "mlp_out"}

TIMM_RULES: tuple[conversion.Rule, ...] = (
    (r"stem\.0\.(weight|bias)", lambda m: _leaf("params/conv_init", m[1], conversion.torch_conv)),
    (r"stem\.1\.(weight|bias)", lambda m: _norm("params/norm_init", m[1])),
    (r"stages\.(\d+)\.downsample\.0\.(weight|bias)",
     lambda m: _norm(_block(int(m[1]), 0) + "/downsample_norm", m[2])),
    (r"stages\.(\d+)\.downsample\.1\.(weight|bias)",
     lambda m: _leaf(_block(int(m[1]), 0) + "/downsample_conv", m[2], conversion.torch_conv)),
    (r"stages\.(\d+)\.blocks\.(\d+)\.(conv_dw|norm|mlp\.fc[12])\.(weight|bias)",
     lambda m: _part(_block(int(m[1]), int(m[2])), _TIMM_PARTS[m[3]], m[4])),
    (r"stages\.(\d+)\.blocks\.(\d+)\.gamma",
     lambda m: Target(_block(int(m[1]), int(m[2])) + "/gamma", _vector)),
    (r"head\.norm\.(weight|bias)", lambda m: _norm("params/norm_pre_head", m[1])),
    (r"head\.fc\.(weight|bias)", lambda m: _leaf("params/head", m[1], _dense)),
)

_HF_PARTS = {"dwconv": "dwconv", "layernorm": "norm", "pwconv1": "mlp_in", "pwconv2": "mlp_out"}
_HF_STAGE = r"encoder\.stages\.(\d+)\."

HF_RULES: tuple[conversion.Rule, ...] = (
    (r"embeddings\.patch_embeddings\.(weight|bias)",
     lambda m: _leaf("params/conv_init", m[1], conversion.torch_conv)),
    (r"embeddings\.layernorm\.(weight|bias)", lambda m: _norm("params/norm_init", m[1])),
    (_HF_STAGE + r"downsampling_layer\.0\.(weight|bias)",
     lambda m: _norm(_block(int(m[1]), 0) + "/downsample_norm", m[2])),
    (_HF_STAGE + r"downsampling_layer\.1\.(weight|bias)",
     lambda m: _leaf(_block(int(m[1]), 0) + "/downsample_conv", m[2], conversion.torch_conv)),
    (_HF_STAGE + r"layers\.(\d+)\.(dwconv|layernorm|pwconv[12])\.(weight|bias)",
     lambda m: _part(_block(int(m[1]), int(m[2])), _HF_PARTS[m[3]], m[4])),
    (_HF_STAGE + r"layers\.(\d+)\.layer_scale_parameter",
     lambda m: Target(_block(int(m[1]), int(m[2])) + "/gamma", _vector)),
    (r"layernorm\.(weight|bias)", lambda m: _norm("params/norm_pre_head", m[1])),
    (r"classifier\.(weight|bias)", lambda m: _leaf("params/head", m[1], _dense)),
)


def is_torchvision_state_dict(names) -> bool:
  """torchvision ConvNeXt: a stem at features.0 and layer-scaled blocks at features.1."""
  return "features.0.0.weight" in names and "features.1.0.layer_scale" in names


def is_timm_state_dict(names) -> bool:
  """timm ConvNeXt (`stem.0`, `stages.0.blocks.0.conv_dw`) or an original FB checkpoint."""
  return ("stem.0.weight" in names and "stages.0.blocks.0.conv_dw.weight" in names) or \
      is_fb_state_dict(names)


def is_fb_state_dict(names) -> bool:
  """facebookresearch/ConvNeXt: `downsample_layers.0.0` and `stages.0.0.dwconv`."""
  return "downsample_layers.0.0.weight" in names and "stages.0.0.dwconv.weight" in names


def is_hf_state_dict(names) -> bool:
  """transformers ConvNextModel / ConvNextForImageClassification (prefix `convnext.` or none)."""
  return any(n.endswith("embeddings.patch_embeddings.weight") for n in names) and any(
      ".downsampling_layer." in n or "layer_scale_parameter" in n for n in names)


def _fb_to_timm(tensors: tensor_files.TensorFile) -> tensor_files.TensorFile:
  """A view of an original FB checkpoint under timm's names (as timm's checkpoint_filter_fn)."""
  names = {}
  for k in tensors:
    new = k.replace("downsample_layers.0.", "stem.")
    new = re.sub(r"stages\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2.", new)
    new = re.sub(r"downsample_layers\.(\d+)\.(\d+)\.", r"stages.\1.downsample.\2.", new)
    new = new.replace("dwconv", "conv_dw").replace("pwconv", "mlp.fc")
    new = re.sub(r"^head\.", "head.fc.", new)
    new = re.sub(r"^norm\.", "head.norm.", new)
    names[new] = k
  return tensor_files.TensorFile(tensors.path, {k: tensors.shape(v) for k, v in names.items()},
                                 lambda k: tensors[names[k]], tensors.metadata)


def _convert(tensors: tensor_files.TensorFile, rules, *, source: str, strict: bool, fmt: str,
             normalization: str, model_options: Mapping[str, Any] = MODEL_OPTIONS,
             class_names=None) -> conversion.Converted:
  params, _, unused = conversion.apply_rules(tensors, rules)
  conversion.check_unused(unused, tensors.path, strict)
  head = params.get("head", {}).get("kernel")
  if class_names is not None and (head is None or len(class_names) != head.shape[-1]):
    class_names = None  # config.json's labels are not this head's.
  return conversion.make_converted(params, {}, source=source, fmt=fmt,
                                   normalization=normalization, model_options=model_options,
                                   unused=unused, class_names=class_names)


def convert_torchvision(tensors: tensor_files.TensorFile, *, source: str, strict: bool = True
                        ) -> conversion.Converted:
  """Converts a torchvision `convnext_*` state dict."""
  return _convert(tensors, TORCHVISION_RULES, source=source, strict=strict, fmt="torchvision",
                  normalization=NORMALIZATION)


def convert_timm(tensors: tensor_files.TensorFile, *, source: str, strict: bool = True,
                 normalization: str = NORMALIZATION) -> conversion.Converted:
  """Converts a timm `convnext_*` state dict (or an original facebookresearch one)."""
  if is_fb_state_dict(tensors):
    tensors = _fb_to_timm(tensors)
  return _convert(tensors, TIMM_RULES, source=source, strict=strict, fmt="timm",
                  normalization=normalization)


def convert_huggingface(tensors: tensor_files.TensorFile, config: Mapping[str, Any], *,
                        source: str, strict: bool, normalization: str,
                        class_names=None) -> conversion.Converted:
  """Converts HF ConvNeXt weights (+ config.json: activation and final LayerNorm epsilon)."""
  act = config.get("hidden_act", "gelu")
  if act != "gelu":
    raise conversion.ConversionError(f"{tensors.path}: hidden_act={act!r}; only 'gelu' (exact) "
                                     "ConvNeXts are supported.")
  if config.get("num_stages", 4) != len(config.get("depths", [0] * 4)):
    raise conversion.ConversionError(f"{tensors.path}: config.json num_stages and depths disagree.")
  tensors = conversion.strip_prefix(tensors, ("convnext.",))
  options = {"head_norm_eps": float(config.get("layer_norm_eps", 1e-12))}
  converted = _convert(tensors, HF_RULES, source=source, strict=strict, fmt="huggingface",
                       normalization=normalization, model_options=options,
                       class_names=class_names)
  arch = converted.metadata["architecture"]
  for key, ours in (("depths", "depths"), ("hidden_sizes", "dims")):
    if key in config and list(config[key]) != list(arch[ours]):
      raise conversion.ConversionError(
          f"{tensors.path}: config.json says {key}={config[key]!r} but the weights have "
          f"{ours}={arch[ours]!r}; the folder mixes files of two models.")
  return converted
