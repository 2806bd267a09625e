"""Is a converted tree complete: does every tensor our model needs exist?

A source file missing some tensors (a truncated export, a hand-edited state
dict) used to convert with exit code 0 into a partial copy that only a later
`init_from` noticed. The check builds the model the weights describe
(shapes only, nothing is computed) and lists what the converted tree lacks.
"""

import dataclasses

from absl import logging
import jax
import jax.numpy as jnp

from vit_jax_ft.models import bit as bit_lib
from vit_jax_ft.models import regnet as regnet_lib
from vit_jax_ft.models import convnext as convnext_lib
from vit_jax_ft.models import efficientnet as efficientnet_lib
from vit_jax_ft.models import resnet as resnet_lib
from vit_jax_ft.models import vit as vit_lib
from vit_jax_ft.pretrained import conversion


def _model_for(metadata: dict):
  arch = metadata["architecture"]
  num_classes = max(int(metadata.get("num_classes_original") or 0), 1)
  if arch["family"] == "vit":
    cls, fields = vit_lib.VisionTransformer, dict(
        patch_size=arch["patch_size"], hidden_size=arch["hidden_size"],
        num_layers=arch["num_layers"], num_heads=arch["num_heads"], mlp_dim=arch["mlp_dim"],
        classifier=arch["classifier"], representation_size=arch.get("representation_size"))
  elif arch["family"] == "bit":
    cls, fields = bit_lib.BiT, dict(stage_sizes=tuple(arch["stage_sizes"]),
                                    width_factor=arch["width_factor"])
  elif arch["family"] == "regnet":
    cls, fields = regnet_lib.RegNet, {k: arch[k] for k in (
        "depths", "widths", "group_widths", "se_ratio", "bottleneck_ratio", "stem_width")}
  elif arch["family"] == "efficientnet":
    cls, fields = efficientnet_lib.EfficientNet, dict(width_mult=arch["width_mult"],
                                                      depth_mult=arch["depth_mult"])
  elif arch["family"] == "convnext":
    cls, fields = convnext_lib.ConvNeXt, dict(depths=tuple(arch["depths"]),
                                              dims=tuple(arch["dims"]))
  else:
    cls, fields = resnet_lib.ResNet, dict(
        block=arch["block"], stage_sizes=tuple(arch["stage_sizes"]), width=arch["width"],
        groups=arch.get("groups", 1), width_per_group=arch.get("width_per_group", 64))
  names = {f.name for f in dataclasses.fields(cls)}
  options = {k: v for k, v in metadata.get("model_options", {}).items() if k in names}
  return cls(num_classes=num_classes, **fields, **options)


def missing_tensors(converted: conversion.Converted) -> list[str]:
  """Paths ('params/...', 'batch_stats/...') the described model has and the tree lacks.

  The classification head is not required (backbone-only weights are common).
  """
  model = _model_for(converted.metadata)
  size = int(converted.metadata.get("image_size") or 224)
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)), train=False))
  have = {**conversion.flatten(converted.params, "params/"),
          **conversion.flatten(converted.batch_stats or {}, "batch_stats/")}
  missing = []
  for collection in ("params", "batch_stats"):
    for path in conversion.flatten(shapes.get(collection, {}), collection + "/"):
      if path not in have and not path.startswith("params/head/"):
        missing.append(path)
  return missing


def check_complete(converted: conversion.Converted, strict: bool) -> None:
  """Raises ConversionError (strict) naming the missing tensors, else warns."""
  missing = missing_tensors(converted)
  if not missing:
    return
  shown = ", ".join(missing[:12]) + (f", ... ({len(missing)} in all)" if len(missing) > 12 else "")
  message = (f"{converted.metadata['source']} lacks {len(missing)} tensors that "
             f"{conversion_name(converted.metadata)} needs: {shown}. The file is incomplete or "
             "not this architecture. (--strict=False converts it anyway; a fine-tuning run "
             "then needs --config.init_strict=False and starts those from scratch.)")
  if strict:
    raise conversion.ConversionError(message)
  logging.warning(message)


def conversion_name(metadata: dict) -> str:
  return metadata["architecture"].get("name", metadata["architecture"]["family"])
