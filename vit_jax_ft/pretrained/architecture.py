"""What architecture a converted parameter tree (or a model instance) is.

Shapes say nearly everything: a ViT's patch size, width, depth, heads and MLP
width, a ResNet's block type, stage sizes and width. Options that shapes do
not show (GELU form, LayerNorm/BatchNorm epsilon, where a ResNet strides) come
from the checkpoint's own config or the source's known defaults, and are
reported separately as `model_options`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from vit_jax_ft.models import bit as bit_lib
from vit_jax_ft.models import regnet as regnet_lib
from vit_jax_ft.models import convnext as convnext_lib
from vit_jax_ft.models import efficientnet as efficientnet_lib
from vit_jax_ft.models import resnet as resnet_lib
from vit_jax_ft.models import vit as vit_lib

_VIT_FIELDS = ("patch_size", "hidden_size", "num_layers", "num_heads", "mlp_dim")
_REGNET_FIELDS = ("depths", "widths", "group_widths", "se_ratio", "bottleneck_ratio",
                  "stem_width")


class ConversionError(ValueError):
  """A checkpoint cannot be mapped onto our models."""


def vit_from_params(params: Mapping[str, Any]) -> dict[str, Any]:
  """ViT architecture from a tree in our (vit_jax) layout."""
  try:
    kernel = params["embedding"]["kernel"]
    blocks = params["Transformer"]
    block0 = blocks["encoderblock_0"]
    query = block0["MultiHeadDotProductAttention_1"]["query"]["kernel"]
    mlp = block0["MlpBlock_3"]["Dense_0"]["kernel"]
    posemb = blocks["posembed_input"]["pos_embedding"]
  except KeyError as e:
    raise ConversionError(f"Not a complete ViT parameter tree: missing {e}.") from e
  arch = {
      "family": "vit",
      "patch_size": int(kernel.shape[0]),
      "hidden_size": int(kernel.shape[-1]),
      "num_layers": sum(1 for k in blocks if re.fullmatch(r"encoderblock_\d+", k)),
      "num_heads": int(query.shape[1]),
      "mlp_dim": int(mlp.shape[-1]),
      "classifier": ("token_distilled" if "dist" in params else "token") if "cls" in params
                    else "gap",
  }
  arch["name"] = _vit_preset_name(arch)
  num_tokens = posemb.shape[1] - vit_lib.num_prefix_tokens(arch["classifier"])
  grid = math.isqrt(num_tokens)
  arch["image_size"] = grid * arch["patch_size"] if grid * grid == num_tokens else None
  if "pre_logits" in params:
    arch["representation_size"] = int(params["pre_logits"]["kernel"].shape[-1])
  return arch


def resnet_from_params(params: Mapping[str, Any]) -> dict[str, Any]:
  """ResNet architecture from a tree in our layout."""
  if "conv_init" not in params:
    raise ConversionError("Not a ResNet parameter tree: no conv_init.")
  stage_sizes = []
  for i in range(1, 10):
    n = sum(1 for k in params if re.fullmatch(rf"stage{i}_block\d+", k))
    if not n:
      break
    stage_sizes.append(n)
  block = "bottleneck" if "conv3" in params.get("stage1_block1", {}) else "basic"
  width = int(params["conv_init"]["kernel"].shape[-1])
  groups, width_per_group = 1, 64
  if block == "bottleneck" and "conv2" in params.get("stage1_block1", {}):
    # ResNeXt: the first stage's 3x3 kernel is [3, 3, inner / groups, inner],
    # with inner = width_per_group * groups * width / 64.
    _, _, per_group, inner = params["stage1_block1"]["conv2"]["kernel"].shape
    groups = int(inner) // int(per_group)
    width_per_group = int(per_group) * 64 // width
  arch = {
      "family": "resnet",
      "block": block,
      "stage_sizes": stage_sizes,
      "width": width,
      "groups": groups,
      "width_per_group": width_per_group,
  }
  arch["name"] = resnet_lib.preset_name(block, stage_sizes, width, groups, width_per_group)
  return arch


def regnet_from_params(params: Mapping[str, Any]) -> dict[str, Any]:
  """RegNet architecture from a tree in our layout (models/regnet.py)."""
  depths, widths, group_widths = [], [], []
  try:
    for i in range(1, 10):
      n = sum(1 for k in params if re.fullmatch(rf"stage{i}_block\d+", k))
      if not n:
        break
      depths.append(n)
      first = params[f"stage{i}_block1"]
      widths.append(int(first["conv3"]["kernel"].shape[-1]))
      group_widths.append(int(first["conv2"]["kernel"].shape[2]))  # [3, 3, in / groups, out]
    block = params["stage1_block1"]
    stem_width = int(params["conv_init"]["kernel"].shape[-1])
    inner = int(block["conv2"]["kernel"].shape[-1])
    # The SE width is relative to the block input: the stem's width for the first block.
    se_ratio = (int(block["se"]["fc1"]["kernel"].shape[-1]) / stem_width if "se" in block
                else 0.0)
  except KeyError as e:
    raise ConversionError(f"Not a complete RegNet parameter tree: missing {e}.") from e
  arch = {"family": "regnet", "depths": depths, "widths": widths, "group_widths": group_widths,
          "se_ratio": se_ratio, "bottleneck_ratio": inner / widths[0], "stem_width": stem_width}
  arch["name"] = regnet_lib.preset_name(depths, widths, group_widths, se_ratio, stem_width,
                                        arch["bottleneck_ratio"])
  return arch


def bit_from_params(params: Mapping[str, Any]) -> dict[str, Any]:
  """BiT architecture (units per stage, width factor) from a tree in our layout."""
  stage_sizes = []
  for i in range(1, 10):
    n = sum(1 for k in params if re.fullmatch(rf"stage{i}_block\d+", k))
    if not n:
      break
    stage_sizes.append(n)
  width = int(params["conv_init"]["kernel"].shape[-1])
  if width % 64:
    raise ConversionError(f"Not a BiT parameter tree: root width {width} is not a multiple of 64.")
  arch = {"family": "bit", "stage_sizes": stage_sizes, "width_factor": width // 64}
  arch["name"] = bit_lib.preset_name(stage_sizes, arch["width_factor"])
  return arch


def from_params(params: Mapping[str, Any]) -> dict[str, Any]:
  """The architecture of a converted tree: a ViT, a BiT (norm before the head), a RegNet
  (3x3 stem) or a ResNet (7x7 stem)."""
  if "embedding" in params:
    return vit_from_params(params)
  if "norm_init" in params:  # ConvNeXt's stem ends in a LayerNorm.
    return convnext_from_params(params)
  if "conv_head" in params:  # EfficientNet's 1x1 conv before the pool.
    return efficientnet_from_params(params)
  if "norm_pre_head" in params:  # Only BiT's pre-activation ResNet has a norm before the head.
    return bit_from_params(params)
  if "conv_init" in params and params["conv_init"]["kernel"].shape[0] == 3:
    return regnet_from_params(params)
  return resnet_from_params(params)


# ---- ConvNeXt (models/convnext.py) ----

def convnext_from_params(params: Mapping[str, Any]) -> dict[str, Any]:
  """ConvNeXt architecture (blocks and channels per stage) from a tree in our layout."""
  depths, dims = [], []
  for i in range(1, 10):
    n = sum(1 for k in params if re.fullmatch(rf"stage{i}_block\d+", k))
    if not n:
      break
    depths.append(n)
    try:
      dims.append(int(params[f"stage{i}_block1"]["dwconv"]["kernel"].shape[-1]))
    except KeyError as e:
      raise ConversionError(f"Not a complete ConvNeXt parameter tree: stage{i}_block1 lacks {e}.")
  arch = {"family": "convnext", "depths": depths, "dims": dims}
  arch["name"] = convnext_lib.preset_name(depths, dims)
  return arch


# ---- EfficientNet (models/efficientnet.py) ----

def _efficientnet_shapes(width_mult: float, depth_mult: float) -> tuple:
  specs = efficientnet_lib.stage_specs(width_mult, depth_mult)
  return (efficientnet_lib.round_channels(efficientnet_lib.STEM_WIDTH * width_mult),
          tuple(c for _, _, _, c, _ in specs), tuple(n for *_, n in specs))


def _efficientnet_arch(width_mult: float, depth_mult: float) -> dict[str, Any]:
  """The multipliers, and the shapes they give (what two architectures are compared by)."""
  stem, channels, depths = _efficientnet_shapes(width_mult, depth_mult)
  return {"family": "efficientnet", "width_mult": width_mult, "depth_mult": depth_mult,
          "stem_width": stem, "stage_channels": list(channels), "stage_depths": list(depths),
          "name": efficientnet_lib.preset_name(width_mult, depth_mult)}


def efficientnet_from_params(params: Mapping[str, Any]) -> dict[str, Any]:
  """EfficientNet multipliers from a tree in our layout.

  The tree gives the stem width, each stage's channels and blocks; the
  multipliers are those of the preset with these shapes, else the first
  (width, depth) on a 0.05 grid that yields them (any such pair builds the
  same network).
  """
  try:
    stages = len(efficientnet_lib.B0_STAGES)
    depths = tuple(sum(1 for k in params if re.fullmatch(rf"stage{i}_block\d+", k))
                   for i in range(1, stages + 1))
    channels = tuple(int(params[f"stage{i}_block1"]["project_conv"]["kernel"].shape[-1])
                     for i in range(1, stages + 1))
    shapes = (int(params["conv_init"]["kernel"].shape[-1]), channels, depths)
  except KeyError as e:
    raise ConversionError(f"Not a complete EfficientNet parameter tree: missing {e}.") from e
  candidates = list(efficientnet_lib.EFFICIENTNET_PRESETS.values()) + [
      (round(w * 0.05, 2), round(d * 0.05, 2)) for w in range(1, 61) for d in range(1, 61)]
  for width, depth in candidates:
    if _efficientnet_shapes(width, depth) == shapes:
      return _efficientnet_arch(width, depth)
  raise ConversionError(f"No EfficientNet width/depth multipliers give stem {shapes[0]}, stage "
                        f"channels {list(channels)} and blocks {list(depths)}.")


def _vit_preset_name(arch: Mapping[str, Any]) -> str:
  # DeiT distilled presets have the sizes of plain ones; the classifier tells them apart.
  distilled = arch.get("classifier") == "token_distilled"
  for name, preset in vit_lib.VIT_PRESETS.items():
    if (all(preset[k] == arch[k] for k in _VIT_FIELDS)
        and vit_lib.is_distilled_preset(name) == distilled):
      return name
  return "vit"


def num_classes_of(params: Mapping[str, Any]) -> int:
  """Size of the checkpoint's classification head (0 when it has none)."""
  head = params.get("head")
  return int(head["kernel"].shape[-1]) if head else 0


def from_model(model: Any) -> dict[str, Any]:
  """Architecture of one of our Flax model instances."""
  if isinstance(model, vit_lib.VisionTransformer):
    arch = {"family": "vit", **{k: getattr(model, k) for k in _VIT_FIELDS},
            "classifier": model.classifier}
    arch["name"] = _vit_preset_name(arch)
    return arch
  if isinstance(model, resnet_lib.ResNet):
    return {"family": "resnet", "block": model.block, "stage_sizes": list(model.stage_sizes),
            "width": model.width, "groups": model.groups,
            "width_per_group": model.width_per_group,
            "name": resnet_lib.preset_name(model.block, model.stage_sizes, model.width,
                                           model.groups, model.width_per_group)}
  if isinstance(model, bit_lib.BiT):
    return {"family": "bit", "stage_sizes": list(model.stage_sizes),
            "width_factor": model.width_factor,
            "name": bit_lib.preset_name(model.stage_sizes, model.width_factor)}
  if isinstance(model, regnet_lib.RegNet):
    arch = {"family": "regnet", **{k: getattr(model, k) for k in _REGNET_FIELDS}}
    arch.update({k: list(arch[k]) for k in ("depths", "widths", "group_widths")})
    arch["name"] = regnet_lib.preset_name(**{k: arch[k] for k in _REGNET_FIELDS})
    return arch
  if isinstance(model, efficientnet_lib.EfficientNet):
    return _efficientnet_arch(model.width_mult, model.depth_mult)
  if isinstance(model, convnext_lib.ConvNeXt):
    return {"family": "convnext", "depths": list(model.depths), "dims": list(model.dims),
            "name": convnext_lib.preset_name(model.depths, model.dims)}
  raise TypeError(f"Unsupported model type {type(model).__name__}")


def describe(arch: Mapping[str, Any]) -> str:
  if arch["family"] == "vit":
    sizes = ", ".join(f"{k}={arch[k]}" for k in _VIT_FIELDS + ("classifier",))
  elif arch["family"] == "bit":
    sizes = f"BiT, stage_sizes={list(arch['stage_sizes'])}, width_factor={arch['width_factor']}"
  elif arch["family"] == "regnet":
    sizes = ", ".join(f"{k}={arch[k]}" for k in _REGNET_FIELDS)
  elif arch["family"] == "efficientnet":
    sizes = f"EfficientNet, width_mult={arch['width_mult']}, depth_mult={arch['depth_mult']}"
  elif arch["family"] == "convnext":
    sizes = f"ConvNeXt, depths={list(arch['depths'])}, dims={list(arch['dims'])}"
  else:
    sizes = f"block={arch['block']}, stage_sizes={list(arch['stage_sizes'])}, width={arch['width']}"
    if arch.get("groups", 1) != 1:
      sizes += f", groups={arch['groups']}, width_per_group={arch['width_per_group']}"
  return f"{arch['name']} ({sizes})"


def mismatches(weights: Mapping[str, Any], model: Mapping[str, Any]) -> list[str]:
  """Differences between two architectures, each naming the config field to set."""
  if weights["family"] != model["family"]:
    return [f"the weights are a {weights['family']} ({describe(weights)}) but the model is a "
            f"{model['family']}: set model.name={weights['name']!r}"]
  keys = {"vit": _VIT_FIELDS + ("classifier",), "bit": ("stage_sizes", "width_factor"),
          "regnet": _REGNET_FIELDS, "convnext": ("depths", "dims"),
          "efficientnet": ("stem_width", "stage_channels", "stage_depths")}.get(
      weights["family"], ("block", "stage_sizes", "width", "groups", "width_per_group"))
  out = []
  for k in keys:
    if k in ("groups", "width_per_group") and k not in weights:
      continue  # Converted before ResNeXt existed: a plain ResNet.
    if list(_as_list(weights[k])) != list(_as_list(model[k])):
      if weights["name"] in ("vit", "bit", "convnext") or k == "classifier":
        field, value = f"model.{k}", weights[k]
      else:
        field, value = "model.name", weights["name"]
      out.append(f"{k}: weights have {weights[k]!r}, model has {model[k]!r} "
                 f"(set {field}={value!r})")
  return out


def _as_list(x):
  return x if isinstance(x, (list, tuple)) else [x]
