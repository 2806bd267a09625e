"""ViT `.npz` checkpoints of google-research/vision_transformer and big_vision.

vit_jax files already use our names (`Transformer/encoderblock_0/
MultiHeadDotProductAttention_1/query/kernel`, ...), possibly under the
`opt/target/` prefix of old optimizer checkpoints. big_vision files differ in
four ways, all undone here:

* a `params/` (or `params/img/` for two-tower models) prefix;
* sub-module indices count per type: `MultiHeadDotProductAttention_0`,
  `LayerNorm_1`, `MlpBlock_0` instead of `_1`, `_2`, `_3`;
* the position embedding is top-level `pos_embedding` and covers the patches
  only (big_vision adds it before prepending the class token), so the class
  token's slot is filled with zeros (adding zero to `cls` is what big_vision
  computes);
* with `scan=True` the blocks are stacked on a leading axis under
  `Transformer/encoderblock/`; they are unstacked into `encoderblock_{i}`.

Both were trained with Flax's default tanh GELU and LayerNorm epsilon 1e-6
and expect inputs in [-1, 1].
"""

from __future__ import annotations

import functools
import re

import numpy as np

from vit_jax_ft.pretrained import conversion
from vit_jax_ft.pretrained import tensor_files

MODEL_OPTIONS = {"gelu_approximate": True, "layer_norm_eps": 1e-6}
NORMALIZATION = "minus_one_to_one"

# big_vision sub-module name -> vit_jax name inside an encoder block.
_BIG_VISION_BLOCK_NAMES = {
    "LayerNorm_0": "LayerNorm_0",
    "MultiHeadDotProductAttention_0": "MultiHeadDotProductAttention_1",
    "LayerNorm_1": "LayerNorm_2",
    "MlpBlock_0": "MlpBlock_3",
}

_BLOCK = r"Transformer/encoderblock_(\d+)/"

# Every vit_jax name, mapped onto itself (anything else is reported as unused).
_VIT_JAX_RULES: tuple[conversion.Rule, ...] = tuple(
    (pattern, lambda m: conversion.Target("params/" + m[0]))
    for pattern in (
        r"embedding/(kernel|bias)",
        r"cls",
        r"Transformer/posembed_input/pos_embedding",
        _BLOCK + r"LayerNorm_[02]/(scale|bias)",
        _BLOCK + r"MultiHeadDotProductAttention_1/(query|key|value|out)/(kernel|bias)",
        _BLOCK + r"MlpBlock_3/Dense_[01]/(kernel|bias)",
        r"Transformer/encoder_norm/(scale|bias)",
        r"pre_logits/(kernel|bias)",
        r"head/(kernel|bias)",
    ))


def is_big_vision(names) -> bool:
  return any("MultiHeadDotProductAttention_0" in n or n == "pos_embedding"
             or "/encoderblock/" in n for n in names)


def convert(tensors: tensor_files.TensorFile, *, source: str, strict: bool = True
            ) -> conversion.Converted:
  """Converts a vit_jax or big_vision ViT `.npz` to our parameter tree."""
  tensors = conversion.strip_prefix(tensors, ("opt/target/", "params/img/", "params/"))
  fmt = "vit_jax_npz"
  if is_big_vision(tensors):
    tensors = _big_vision_to_vit_jax(tensors)
    fmt = "big_vision_npz"
  if not any(n.startswith("Transformer/") for n in tensors):
    raise conversion.ConversionError(
        f"{tensors.path} is not a ViT checkpoint (no Transformer/ weights); found e.g. "
        f"{sorted(tensors)[:5]}")
  params, _, unused = conversion.apply_rules(tensors, _VIT_JAX_RULES)
  conversion.check_unused(unused, tensors.path, strict)
  return conversion.make_converted(
      params, {}, source=source, fmt=fmt, normalization=NORMALIZATION,
      model_options=MODEL_OPTIONS, unused=unused)


def _big_vision_to_vit_jax(tensors: tensor_files.TensorFile) -> tensor_files.TensorFile:
  """A view of a big_vision file under vit_jax names (lazy; unstacks scanned blocks)."""
  sources: dict[str, tuple[str, int | None]] = {}  # our name -> (bv name, layer or None)
  shapes: dict[str, tuple[int, ...]] = {}
  for name in tensors:
    shape = tensors.shape(name)
    if name == "pos_embedding":
      has_cls = "cls" in tensors
      sources["Transformer/posembed_input/pos_embedding"] = (name, None)
      shapes["Transformer/posembed_input/pos_embedding"] = (
          shape[0], shape[1] + int(has_cls), shape[2])
      continue
    scanned = re.fullmatch(r"Transformer/encoderblock/([^/]+)/(.*)", name)
    if scanned:
      for i in range(shape[0]):
        ours = f"Transformer/encoderblock_{i}/{_block_name(scanned[1])}/{scanned[2]}"
        sources[ours], shapes[ours] = (name, i), shape[1:]
      continue
    looped = re.fullmatch(r"Transformer/encoderblock_(\d+)/([^/]+)/(.*)", name)
    ours = (f"Transformer/encoderblock_{looped[1]}/{_block_name(looped[2])}/{looped[3]}"
            if looped else name)
    sources[ours], shapes[ours] = (name, None), shape

  @functools.lru_cache(maxsize=1)
  def load_stacked(name: str) -> np.ndarray:
    return tensors[name]

  def load(ours: str) -> np.ndarray:
    name, layer = sources[ours]
    if layer is not None:
      # Names are grouped by stacked array, so the one-entry cache holds each
      # stacked array exactly while its layers are taken out.
      return np.array(load_stacked(name)[layer])
    value = tensors[name]
    if name == "pos_embedding" and "cls" in tensors:
      value = np.concatenate([np.zeros_like(value[:, :1]), value], axis=1)
    return value

  return tensor_files.TensorFile(tensors.path, shapes, load, tensors.metadata)


def _block_name(bv_name: str) -> str:
  return _BIG_VISION_BLOCK_NAMES.get(bv_name, bv_name)
