"""Keras Applications ResNet50 (v1) from HDF5 (`.h5`) and TF.js layers (`model.json`).

The Keras ResNet50 is the original v1 network: the stride sits on the first
1x1 conv of a block, every conv has a bias, and inputs are Caffe-style (RGB to
BGR, then the ImageNet mean [103.939, 116.779, 123.68] subtracted from 0..255
pixels, no scaling): our `variant='v1'`, `conv_bias=True`,
normalization 'caffe_bgr'. Two generations of layer names exist and both are
read:

* keras-applications <= 1.0.7 (and TF.js ports of it): `conv1`, `bn_conv1`,
  `res2a_branch2a`, `bn2a_branch2a`, `res2a_branch1` (shortcut), `fc1000`;
  BatchNorm epsilon 1e-3 (the layer default).
* keras.applications >= 2.2.5 / keras 3 (`resnet.py`): `conv1_conv`,
  `conv1_bn`, `conv2_block1_1_conv`, `conv2_block1_0_conv` (shortcut),
  `predictions`; BatchNorm epsilon 1.001e-5.

Kernels are already HWIO / [in, out] as in Flax. Where a file carries the
Keras model config (TF.js `modelTopology`, the `model_config` attribute of a
full-model `.h5`), the BatchNorm epsilon, the input size and the stride
placement are read from it.

Keras 3's `.weights.h5` files name layers by creation order (`conv2d_17`)
instead of by layer name, so they cannot be mapped reliably and are refused.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from vit_jax_ft.pretrained import conversion
from vit_jax_ft.pretrained import tensor_files

NORMALIZATION = "caffe_bgr"
_EPS_OLD, _EPS_NEW = 1e-3, 1.001e-5

# Keras variable name -> (collection, our variable name).
_VARIABLES = {
    "kernel": ("params", "kernel"), "bias": ("params", "bias"),
    "gamma": ("params", "scale"), "beta": ("params", "bias"),
    "moving_mean": ("batch_stats", "mean"), "moving_variance": ("batch_stats", "var"),
}
# Variable order of Keras layers, for files that store them by position.
_CONV_VARS, _BN_VARS = ("kernel", "bias"), ("gamma", "beta", "moving_mean", "moving_variance")

_OLD_BRANCH = {"2a": "1", "2b": "2", "2c": "3"}


def _old_block_index(letters: str) -> int:
  """'a' -> 1, 'b' -> 2, ... and ResNet-101/152's 'b1' -> 2, 'b22' -> 23."""
  if len(letters) == 1:
    return ord(letters) - ord("a") + 1
  return int(letters[1:]) + 1


def module_path(layer: str) -> str | None:
  """Our module path for a Keras layer name, or None if it has no counterpart."""
  if layer in ("conv1", "conv1_conv"):
    return "conv_init"
  if layer in ("bn_conv1", "conv1_bn"):
    return "bn_init"
  if layer in ("fc1000", "predictions"):
    return "head"
  m = re.fullmatch(r"(res|bn)(\d)([a-z]\d*)_branch(1|2[abc])", layer)
  if m:
    block = f"stage{int(m[2]) - 1}_block{_old_block_index(m[3])}"
    kind = "conv" if m[1] == "res" else "bn"
    if m[4] == "1":
      return f"{block}/proj_{kind}"
    return f"{block}/{kind}{_OLD_BRANCH[m[4]]}"
  m = re.fullmatch(r"conv(\d)_block(\d+)_(\d)_(conv|bn)", layer)
  if m:
    block = f"stage{int(m[1]) - 1}_block{m[2]}"
    return f"{block}/proj_{m[4]}" if m[3] == "0" else f"{block}/{m[4]}{m[3]}"
  return None


def _name_generation(layers) -> str:
  return "old" if any(re.fullmatch(r"res\d[a-z]\d*_branch.*", l) for l in layers) else "new"


def _weights_to_trees(weights: Mapping[str, np.ndarray], path: str, strict: bool
                      ) -> tuple[dict, dict, list[str]]:
  """{'layer/variable': array} -> our params and batch_stats trees."""
  trees: dict[str, dict] = {"params": {}, "batch_stats": {}}
  unused = []
  for name, value in weights.items():
    layer, _, variable = name.partition("/")
    variable = variable.split(":")[0]  # 'kernel:0' in TF2-era files.
    ours = module_path(layer)
    if ours is None or variable not in _VARIABLES:
      unused.append(name)
      continue
    collection, leaf = _VARIABLES[variable]
    conversion.set_path(trees[collection], f"{ours}/{leaf}", np.asarray(value, np.float32))
  conversion.check_unused(sorted(unused), path, strict)
  return trees["params"], trees["batch_stats"], sorted(unused)


def _options_from_config(model_config: Mapping[str, Any] | None, layers) -> dict[str, Any]:
  """BatchNorm epsilon, stride placement and input size from a Keras model config."""
  gen = _name_generation(layers)
  options: dict[str, Any] = {"variant": "v1", "conv_bias": True,
                             "bn_epsilon": _EPS_OLD if gen == "old" else _EPS_NEW}
  image_size = None
  if model_config:
    cfg_layers = model_config.get("config", {}).get("layers", [])
    eps = {l["config"]["epsilon"] for l in cfg_layers if l["class_name"] == "BatchNormalization"}
    if len(eps) > 1:
      raise conversion.ConversionError(f"BatchNorm layers use different epsilons {sorted(eps)}.")
    if eps:
      options["bn_epsilon"] = float(eps.pop())
    for l in cfg_layers:
      cfg = l["config"]
      if l["class_name"] == "InputLayer":
        shape = cfg.get("batch_input_shape") or cfg.get("batch_shape")
        if shape and shape[1]:
          image_size = int(shape[1])
      # The first 3x3 conv of stage 3's first block is strided only in v1.5.
      if l["class_name"] == "Conv2D" and cfg["name"] in ("res3a_branch2b", "conv3_block1_2_conv"):
        if tuple(cfg["strides"]) != (1, 1):
          options["variant"] = "v1.5"
  return {"options": options, "image_size": image_size}


def _convert(weights: Mapping[str, np.ndarray], model_config, *, path: str, source: str,
             fmt: str, strict: bool) -> conversion.Converted:
  layers = {n.split("/")[0] for n in weights}
  info = _options_from_config(model_config, layers)
  params, batch_stats, unused = _weights_to_trees(weights, path, strict)
  if "conv_init" not in params:
    raise conversion.ConversionError(
        f"{path} is not a Keras ResNet (no conv1/conv1_conv layer); layers: {sorted(layers)[:8]}")
  info["options"]["conv_bias"] = "bias" in params["conv_init"]
  return conversion.make_converted(
      params, batch_stats, source=source, fmt=fmt, normalization=NORMALIZATION,
      model_options=info["options"], unused=unused, image_size=info["image_size"])


# --- HDF5 -------------------------------------------------------------------


def read_h5(path: str) -> tuple[dict[str, np.ndarray], dict | None]:
  """Reads a legacy Keras HDF5 file (weights-only or full model)."""
  import h5py  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    raise tensor_files.CheckpointFileError(f"Checkpoint file not found: {path}")
  try:
    with h5py.File(path, "r") as f:
      if "layers" in f and "layer_names" not in f.attrs and "model_weights" not in f:
        raise conversion.ConversionError(
            f"{path} is a Keras 3 `.weights.h5` file: it names layers by creation order "
            "(conv2d_17, ...) rather than by layer name, so it cannot be mapped reliably. "
            "Save the model with model.save('model.h5') (legacy HDF5) instead.")
      model_config = f.attrs.get("model_config")
      group = f["model_weights"] if "model_weights" in f else f
      weights = {}
      for layer in _decode_all(group.attrs["layer_names"]):
        for weight in _decode_all(group[layer].attrs["weight_names"]):
          name = weight if weight.startswith(layer + "/") else f"{layer}/{weight.split('/')[-1]}"
          weights[name] = np.asarray(group[layer][weight])
  except (OSError, KeyError) as e:
    raise tensor_files.CheckpointFileError(
        f"Cannot read Keras HDF5 file {path} (truncated, corrupted or not a Keras weights "
        f"file?): {type(e).__name__}: {e}") from e
  if isinstance(model_config, bytes):
    model_config = model_config.decode()
  return weights, (json.loads(model_config) if model_config else None)


def _decode_all(values) -> list[str]:
  return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def convert_h5(path: str, *, source: str, strict: bool = True) -> conversion.Converted:
  weights, model_config = read_h5(path)
  return _convert(weights, model_config, path=path, source=source, fmt="keras_h5", strict=strict)


# --- TF.js layers format ----------------------------------------------------

_TFJS_DTYPES = {"float32": np.float32, "int32": np.int32, "bool": np.bool_,
                "uint8": np.uint8, "uint16": np.uint16, "float16": np.float16}


def read_tfjs(model_json: str) -> tuple[dict[str, np.ndarray], dict | None]:
  """Reads a TF.js layers model: model.json (topology + manifest) and its shards."""
  try:
    with open(model_json) as f:
      model = json.load(f)
  except (OSError, ValueError) as e:
    raise tensor_files.CheckpointFileError(f"Cannot read TF.js model {model_json}: {e}") from e
  if model.get("format") not in (None, "layers-model"):
    raise conversion.ConversionError(
        f"{model_json} is a TF.js {model.get('format')!r}; only layers models map onto ours.")
  folder = os.path.dirname(model_json)
  weights = {}
  for group in model["weightsManifest"]:
    data = b"".join(_read_shard(os.path.join(folder, p)) for p in group["paths"])
    offset = 0
    for spec in group["weights"]:
      value, offset = _tfjs_tensor(data, offset, spec, model_json)
      weights[spec["name"]] = value
    if offset != len(data):
      raise tensor_files.CheckpointFileError(
          f"{model_json}: the shards hold {len(data)} bytes but the manifest describes {offset}.")
  topology = model.get("modelTopology") or {}
  return weights, topology.get("model_config", topology or None)


def _read_shard(path: str) -> bytes:
  if not os.path.isfile(path):
    raise tensor_files.CheckpointFileError(f"TF.js weight shard missing: {path}")
  with open(path, "rb") as f:
    return f.read()


def _tfjs_tensor(data: bytes, offset: int, spec: Mapping[str, Any], model_json: str):
  """One tensor of a manifest (dequantising uint8/uint16/float16 weights)."""
  quant = spec.get("quantization")
  dtype = np.dtype(_TFJS_DTYPES[quant["dtype"] if quant else spec["dtype"]])
  count = int(np.prod(spec["shape"], dtype=np.int64))
  end = offset + count * dtype.itemsize
  if end > len(data):
    raise tensor_files.CheckpointFileError(
        f"{model_json}: weight {spec['name']!r} runs past the end of the shards "
        "(truncated download?)")
  value = np.frombuffer(data, dtype, count, offset).reshape(spec["shape"])
  if quant:
    if "scale" in quant:
      value = value.astype(np.float32) * quant["scale"] + quant["min"]
    value = value.astype(np.float32)
  return value, end


def convert_tfjs(model_json: str, *, source: str, strict: bool = True) -> conversion.Converted:
  weights, model_config = read_tfjs(model_json)
  return _convert(weights, model_config, path=model_json, source=source, fmt="keras_tfjs",
                  strict=strict)
