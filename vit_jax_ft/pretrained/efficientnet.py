"""EfficientNet weights: torchvision `efficientnet_b*` and timm `efficientnet_b*` / `tf_efficientnet_b*`.

torchvision: `features.0.{0,1}` stem conv and BN; `features.{s}.{j}.block.{k}`
with k = expansion (if the ratio is not 1), depthwise, squeeze-and-excitation
(`fc1`, `fc2`), projection, each conv-BN pair as `.0`/`.1`; `features.8.{0,1}`
the head conv; `classifier.1` the Linear.

timm: `conv_stem`, `bn1`; `blocks.{s}.{j}` as `conv_dw, bn1, se.conv_reduce,
se.conv_expand, conv_pw, bn2` in the first stage (no expansion) and `conv_pw,
bn1, conv_dw, bn2, se.*, conv_pwl, bn3` after; `conv_head`, `bn2`, `classifier`.

Both name the tensors of the native and the TF-ported weights alike; the TF
ports (`tf_efficientnet_*`) need BatchNorm epsilon 1e-3 and TensorFlow 'SAME'
padding, which only the architecture name says: a timm folder's
`config.json`, else the file or folder name (`tf_efficientnet_b0...`).
"""

from __future__ import annotations

import os
import re

from absl import logging
import numpy as np

from vit_jax_ft.pretrained import conversion
from vit_jax_ft.pretrained import tensor_files

Target = conversion.Target

NORMALIZATION = "imagenet"
MODEL_OPTIONS = {"bn_epsilon": 1e-5, "padding": "torch"}
TF_MODEL_OPTIONS = {"bn_epsilon": 1e-3, "padding": "tf_same"}
_BN = r"(weight|bias|running_mean|running_var)"


def _dense(x: np.ndarray) -> np.ndarray:
  """1x1 conv [out, in, 1, 1] or Linear [out, in] -> Dense kernel [in, out]."""
  return np.reshape(x, x.shape[:2]).T


# Over the canonical names `_torchvision_view` / `_timm_view` give: "<our module path>.<leaf>".
RULES: tuple[conversion.Rule, ...] = (
    (r"(conv_init|conv_head|stage\d+_block\d+/(?:expand_conv|dwconv|project_conv))\.weight",
     lambda m: Target(f"params/{m[1]}/kernel", conversion.torch_conv)),
    (r"(bn_init|bn_head|stage\d+_block\d+/(?:expand_bn|dw_bn|project_bn))\." + _BN,
     lambda m: conversion.torch_batchnorm(m[1], m[2])),
    (r"(stage\d+_block\d+/se/se_(?:reduce|expand))\.weight",
     lambda m: Target(f"params/{m[1]}/kernel", _dense)),
    (r"(stage\d+_block\d+/se/se_(?:reduce|expand))\.bias", lambda m: Target(f"params/{m[1]}/bias")),
    (r"head\.weight", lambda m: Target("params/head/kernel", _dense)),
    (r"head\.bias", lambda m: Target("params/head/bias")),
)
IGNORE = (r".*num_batches_tracked",)


def is_torchvision_state_dict(names) -> bool:
  return "features.0.0.weight" in names and "features.1.0.block.0.0.weight" in names


def is_timm_state_dict(names) -> bool:
  return "conv_stem.weight" in names and "blocks.0.0.conv_dw.weight" in names


def _view(tensors: tensor_files.TensorFile, rename) -> tensor_files.TensorFile:
  """`tensors` under the names `rename(name)` gives (None keeps the name: reported unused)."""
  names = {}
  for k in tensors:
    names[rename(k) or k] = k
  if len(names) != len(tensors):
    raise conversion.ConversionError(f"{tensors.path}: two tensors map to one EfficientNet name.")
  return tensor_files.TensorFile(tensors.path, {k: tensors.shape(v) for k, v in names.items()},
                                 lambda k: tensors[names[k]], tensors.metadata)


def _torchvision_view(tensors: tensor_files.TensorFile) -> tensor_files.TensorFile:
  expanded = {m.groups() for m in (re.fullmatch(r"features\.(\d+)\.(\d+)\.block\.3\..*", k)
                                   for k in tensors) if m}
  last = max(int(m[1]) for m in (re.match(r"features\.(\d+)\.", k) for k in tensors) if m)

  def rename(name):
    m = re.fullmatch(r"features\.(\d+)\.(\d+)\.block\.(\d)\.(.*)", name)
    if m:
      stage, block, k, rest = m.groups()
      parts = (["expand"] if (stage, block) in expanded else []) + ["dw", "se", "project"]
      part = parts[int(k)] if int(k) < len(parts) else None
      prefix = f"stage{stage}_block{int(block) + 1}/"
      if part == "se":
        r = re.fullmatch(r"fc([12])\.(weight|bias)", rest)
        return r and prefix + f"se/se_{'reduce' if r[1] == '1' else 'expand'}.{r[2]}"
      r = re.fullmatch(r"([01])\.(.*)", rest)
      if part is None or not r:
        return None
      conv = "dwconv" if part == "dw" else f"{part}_conv"
      return prefix + (conv if r[1] == "0" else f"{part}_bn") + "." + r[2]
    m = re.fullmatch(r"features\.(\d+)\.([01])\.(.*)", name)
    if m and m[1] in ("0", str(last)):
      which = "init" if m[1] == "0" else "head"
      return f"{'conv' if m[2] == '0' else 'bn'}_{which}.{m[3]}"
    m = re.fullmatch(r"classifier\.1\.(weight|bias)", name)
    return m and f"head.{m[1]}"

  return _view(tensors, rename)


_TIMM_DS = {"conv_dw": "dwconv", "bn1": "dw_bn", "conv_pw": "project_conv", "bn2": "project_bn"}
_TIMM_IR = {"conv_pw": "expand_conv", "bn1": "expand_bn", "conv_dw": "dwconv", "bn2": "dw_bn",
            "conv_pwl": "project_conv", "bn3": "project_bn"}
_TIMM_TOP = {"conv_stem": "conv_init", "bn1": "bn_init", "conv_head": "conv_head",
             "bn2": "bn_head", "classifier": "head"}


def _timm_view(tensors: tensor_files.TensorFile) -> tensor_files.TensorFile:
  inverted = {m.groups() for m in (re.fullmatch(r"blocks\.(\d+)\.(\d+)\.conv_pwl\..*", k)
                                   for k in tensors) if m}

  def rename(name):
    m = re.fullmatch(r"blocks\.(\d+)\.(\d+)\.(.*)\.(\w+)", name)
    if m:
      stage, block, part, leaf = m.groups()
      prefix = f"stage{int(stage) + 1}_block{int(block) + 1}/"
      se = re.fullmatch(r"se\.conv_(reduce|expand)", part)
      if se:
        return prefix + f"se/se_{se[1]}.{leaf}"
      table = _TIMM_IR if (stage, block) in inverted else _TIMM_DS
      return part in table and prefix + f"{table[part]}.{leaf}"
    m = re.fullmatch(r"(\w+)\.(\w+)", name)
    return m and m[1] in _TIMM_TOP and f"{_TIMM_TOP[m[1]]}.{m[2]}"

  return _view(tensors, rename)


def is_tf_port(name_or_path: str | None) -> bool:
  """Whether a timm architecture name, or a file's name or folder, says `tf_efficientnet_*`."""
  if not name_or_path:
    return False
  path = os.path.abspath(name_or_path)
  return any("tf_efficientnet" in os.path.basename(p) for p in (path, os.path.dirname(path)))


def _convert(view, *, source: str, strict: bool, fmt: str, model_options,
             normalization: str) -> conversion.Converted:
  params, batch_stats, unused = conversion.apply_rules(view, RULES, IGNORE)
  conversion.check_unused(unused, view.path, strict)
  return conversion.make_converted(params, batch_stats, source=source, fmt=fmt,
                                   normalization=normalization, model_options=model_options,
                                   unused=unused)


def convert_torchvision(tensors: tensor_files.TensorFile, *, source: str, strict: bool = True
                        ) -> conversion.Converted:
  """Converts a torchvision `efficientnet_b*` state dict."""
  return _convert(_torchvision_view(tensors), source=source, strict=strict, fmt="torchvision",
                  model_options=MODEL_OPTIONS, normalization=NORMALIZATION)


def convert_timm(tensors: tensor_files.TensorFile, *, source: str, strict: bool = True,
                 normalization: str = NORMALIZATION, architecture: str | None = None
                 ) -> conversion.Converted:
  """Converts a timm `efficientnet_b*` / `tf_efficientnet_b*` state dict.

  `architecture` (a timm folder's config.json) says whether it is a TF port;
  without it, the file or folder name does (`tf_efficientnet_b0...`).
  """
  tf_port = is_tf_port(architecture) if architecture else is_tf_port(tensors.path)
  logging.info("%s: %s EfficientNet weights (%s).", tensors.path,
               "TF-ported" if tf_port else "native", TF_MODEL_OPTIONS if tf_port else MODEL_OPTIONS)
  return _convert(_timm_view(tensors), source=source, strict=strict, fmt="timm",
                  model_options=TF_MODEL_OPTIONS if tf_port else MODEL_OPTIONS,
                  normalization=normalization)
