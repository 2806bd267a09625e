"""Recognising a pretrained-weights source and converting it with the right module.

A source is a file, a folder or a Hugging Face Hub id; its format is read from
what it is, never from a flag:

| source | format |
| --- | --- |
| folder with `metadata.json` + `state/` | already converted (storage.py) |
| folder with `config.json` holding `model_type` | Hugging Face transformers |
| folder with `config.json` holding `architecture` | timm Hub folder |
| folder with `model.json`, or a `model.json` file | Keras TF.js layers model |
| `*.npz` | vit_jax / big_vision ViT, or BiT (`resnet/root_block/...`) |
| `*.safetensors`, `*.bin`, `*.pth`, `*.pt` | HF, timm or torchvision, by tensor names |
| `*.h5`, `*.hdf5` | Keras HDF5 |
| `*.tar.gz`, folder with `checkpoint` / `*.index`, `ckpt-N` prefix, its `.index`/`.data-*` | TF Model Garden (TF checkpoint) |
| `owner/name` that is not a path | Hugging Face Hub id (downloaded) |
"""

from __future__ import annotations

import os
import re

from vit_jax_ft.pretrained import architecture
from vit_jax_ft.pretrained import bit
from vit_jax_ft.pretrained import completeness
from vit_jax_ft.pretrained import convnext
from vit_jax_ft.pretrained import efficientnet
from vit_jax_ft.pretrained import conversion
from vit_jax_ft.pretrained import hub
from vit_jax_ft.pretrained import huggingface
from vit_jax_ft.pretrained import keras
from vit_jax_ft.pretrained import regnet
from vit_jax_ft.pretrained import storage
from vit_jax_ft.pretrained import tensor_files
from vit_jax_ft.pretrained import tf_model_garden
from vit_jax_ft.pretrained import timm
from vit_jax_ft.pretrained import torchvision
from vit_jax_ft.pretrained import vit_jax_npz

_TORCH_EXTS = (".safetensors", ".bin", ".pth", ".pt", ".ckpt")

# What a user calls the family and origin of each format (metadata "origin", `inspect`).
ORIGINS = {
    "vit_jax_npz": "vit_jax (google-research/vision_transformer) .npz",
    "big_vision_npz": "big_vision .npz",
    "huggingface": "Hugging Face transformers",
    "timm": "timm",
    "torchvision": "torchvision",
    "keras_h5": "Keras Applications (HDF5)",
    "keras_tfjs": "Keras Applications (TF.js layers model)",
    tf_model_garden.FORMAT: tf_model_garden.ORIGIN,
    bit.FORMAT: bit.ORIGIN,
}
# AugReg ('How to train your ViT') file names: Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-....npz
_AUGREG_NAME = re.compile(r".*-i(1|21)k-\d+ep-lr_.*-aug_.*\.npz", re.I)


def origin_of(metadata: dict) -> str:
  """The family and origin of converted weights, as their users know them."""
  if metadata.get("origin"):
    return metadata["origin"]
  origin = ORIGINS.get(metadata.get("format", ""), metadata.get("format", "unknown"))
  if metadata.get("format") == "vit_jax_npz" and _AUGREG_NAME.fullmatch(
      os.path.basename(str(metadata.get("source", "")))):
    origin = "AugReg (How to train your ViT), vit_jax .npz"
  return origin


def detect_format(source: str) -> str:
  """The format name of a source (see the table in the module docstring)."""
  if os.path.isdir(source):
    if storage.is_converted(source):
      return "converted"
    if os.path.isfile(os.path.join(source, "model.json")):
      return "keras_tfjs"
    if huggingface.is_transformers_folder(source):
      return "huggingface"
    if timm.is_timm_folder(source):
      return "timm_folder"
    if tf_model_garden.is_checkpoint_folder(source):
      return "tf_checkpoint"
    raise conversion.ConversionError(
        f"Cannot tell what {source} holds: expected config.json (Hugging Face / timm), "
        "model.json (TF.js), a TensorFlow checkpoint (ckpt-N.index) or a converted checkpoint; "
        f"found {sorted(os.listdir(source))[:12]}")
  if os.path.isfile(source):
    ext = os.path.splitext(source)[1].lower()
    if os.path.basename(source) == "model.json":
      return "keras_tfjs"
    if tf_model_garden.is_tar(source) or tf_model_garden.is_prefix_file(source):
      return "tf_checkpoint"
    if ext == ".npz":
      return "npz"
    if ext in _TORCH_EXTS:
      return "state_dict"
    if ext in (".h5", ".hdf5"):
      return "keras_h5"
    raise conversion.ConversionError(
        f"Unknown checkpoint file type {ext!r}: {source} (expected .npz, .safetensors, .bin, "
        ".pth, .h5, model.json, a TensorFlow ckpt-N.index / .data-* or a .tar.gz of one)")
  if tf_model_garden.is_prefix(source):
    return "tf_checkpoint"
  if hub.looks_like_hub_id(source):
    return "hub"
  raise tensor_files.CheckpointFileError(f"Pretrained weights not found: {source} is neither a "
                                         "file, a folder nor a Hugging Face Hub id.")


def convert(source: str, *, strict: bool = True, normalization: str | None = None,
            model_name: str | None = None) -> conversion.Converted:
  """Converts any supported source to our layout.

  Args:
    source: path or Hub id.
    strict: refuse checkpoints with tensors our model has no place for.
    normalization: override the input normalisation recorded in the metadata
      (for bare state dicts whose preprocessing the file does not say).
    model_name: if set (e.g. 'vit_b16'), the checkpoint's architecture must be it.

  Returns:
    The converted weights and metadata (`source` is the given string).
  """
  fmt = detect_format(source)
  if fmt == "converted":
    converted = storage.load(source)
  elif fmt == "hub":
    converted = _convert_folder(hub.download(source), source, strict)
  elif fmt == "tf_checkpoint":
    converted = tf_model_garden.convert(source, strict=strict)
  elif os.path.isdir(source) and fmt != "keras_tfjs":
    converted = _convert_folder(source, source, strict)
  else:
    converted = _convert_file(source, fmt, strict)
  if fmt != "converted":
    completeness.check_complete(converted, strict)
    converted.metadata["origin"] = origin_of(converted.metadata)
  if normalization is not None:
    if normalization not in conversion.NORMALIZATIONS:
      raise ValueError(f"normalization must be one of {conversion.NORMALIZATIONS}, "
                       f"got {normalization!r}")
    converted.metadata["normalization"] = normalization
  if model_name is not None:
    check_model_name(converted.metadata, model_name)
  return converted


def _convert_folder(folder: str, source: str, strict: bool) -> conversion.Converted:
  if huggingface.is_transformers_folder(folder):
    return huggingface.convert_folder(folder, source=source, strict=strict)
  if timm.is_timm_folder(folder):
    return timm.convert_folder(folder, source=source, strict=strict)
  if os.path.isfile(os.path.join(folder, "model.json")):
    return keras.convert_tfjs(os.path.join(folder, "model.json"), source=source, strict=strict)
  raise conversion.ConversionError(f"{folder} has no config.json or model.json.")


def _convert_file(path: str, fmt: str, strict: bool) -> conversion.Converted:
  if fmt == "keras_tfjs":
    model_json = path if os.path.isfile(path) else os.path.join(path, "model.json")
    return keras.convert_tfjs(model_json, source=path, strict=strict)
  if fmt == "keras_h5":
    return keras.convert_h5(path, source=path, strict=strict)
  tensors = tensor_files.read_tensor_file(path)
  if fmt == "npz":
    if bit.is_bit_npz(tensors):
      return bit.convert_npz(tensors, source=path, strict=strict)
    return vit_jax_npz.convert(tensors, source=path, strict=strict)
  return convert_state_dict(tensors, source=path, strict=strict)


def convert_state_dict(tensors: tensor_files.TensorFile, *, source: str, strict: bool
                       ) -> conversion.Converted:
  """A bare PyTorch-style state dict: HF, timm or torchvision, told by its names."""
  names = set(tensors)
  # ConvNeXt first: an unprefixed HF ConvNextModel also has `embeddings.patch_embeddings`.
  converted = _convert_convnext(tensors, source=source, strict=strict)
  if converted is not None:
    return converted
  if any(n.split(".")[0] in ("vit", "deit", "resnet", "embeddings", "embedder") for n in names):
    config = _sibling_config(tensors.path)
    if any("patch_embeddings" in n for n in names):
      deit = any(n.startswith("deit.") for n in names)  # DeiT: ImageNet mean/std inputs.
      return huggingface.convert_vit(tensors, config, source=source, strict=strict,
                                     normalization="imagenet" if deit else "minus_one_to_one")
    return huggingface.convert_resnet(tensors, config, source=source, strict=strict,
                                      normalization="imagenet")
  if timm.is_vit_state_dict(conversion.strip_prefix(tensors, ("model.",))) or \
      bit.is_timm_state_dict(conversion.strip_prefix(tensors, ("model.",))):
    return timm.convert_state_dict(tensors, source=source, strict=strict)
  if torchvision.is_resnet_state_dict(names):
    return torchvision.convert(tensors, source=source, strict=strict)
  if (regnet.is_torchvision_regnet(names) or regnet.is_timm_regnet(names)
      or regnet.is_huggingface_regnet(names)):
    return regnet.convert(tensors, source=source, strict=strict)
  raise conversion.ConversionError(
      f"{tensors.path}: not a ViT, ResNet/ResNeXt or RegNet state dict in a known layout "
      "(HF, timm, torchvision); "
      f"found e.g. {sorted(names)[:6]}")


def _convert_convnext(tensors: tensor_files.TensorFile, *, source: str, strict: bool
                      ) -> conversion.Converted | None:
  """A ConvNeXt state dict in HF, timm (or original FB) or torchvision names; else None."""
  if convnext.is_hf_state_dict(tensors):
    return convnext.convert_huggingface(tensors, _sibling_config(tensors.path), source=source,
                                        strict=strict, normalization=convnext.NORMALIZATION)
  stripped = conversion.strip_prefix(tensors, ("model.",))
  if convnext.is_timm_state_dict(stripped):
    return convnext.convert_timm(stripped, source=source, strict=strict)
  if convnext.is_torchvision_state_dict(tensors):
    return convnext.convert_torchvision(tensors, source=source, strict=strict)
  # EfficientNet (pretrained/efficientnet.py), told apart by names as ConvNeXt is.
  if efficientnet.is_timm_state_dict(stripped):
    return efficientnet.convert_timm(stripped, source=source, strict=strict)
  if efficientnet.is_torchvision_state_dict(tensors):
    return efficientnet.convert_torchvision(tensors, source=source, strict=strict)
  return None


def _sibling_config(path: str) -> dict:
  return huggingface.read_config(os.path.dirname(os.path.abspath(path))) or {}


def check_model_name(metadata: dict, model_name: str) -> None:
  """Raises if the converted architecture is not the requested preset."""
  arch = metadata["architecture"]
  if arch["name"] != model_name:
    raise conversion.ConversionError(
        f"--model={model_name} was requested but the checkpoint is {architecture.describe(arch)}.")
