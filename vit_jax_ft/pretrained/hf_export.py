"""Exporting a fine-tuned run as a Hugging Face transformers folder.

A workdir holds `config.json` (the run's config), `checkpoints/<step>` (Orbax
TrainState) and, for class names, `dataset_info.json` under `config.data.dir`
or `WORKDIR/data`. The export writes `config.json` (ViTConfig,
ResNetConfig or ConvNextConfig, class names as `id2label`), `model.safetensors`
and `preprocessor_config.json`, loadable with
`ViTForImageClassification.from_pretrained` /
`ResNetForImageClassification.from_pretrained` /
`RegNetForImageClassification.from_pretrained`, and ConvNeXt
`ConvNextForImageClassification.from_pretrained`. Other families (BiT,
EfficientNet, ResNeXt) are refused with the list of those that export. Neither torch nor
transformers is needed to write it.

What HF's classes cannot express is refused rather than approximated: ViTs
with 'gap' pooling or a pre-logits layer, ResNets with conv biases (Keras) or a
BatchNorm epsilon other than 1e-5, ResNeXts (transformers has no grouped
ResNet), RegNets with per-stage group widths (torchvision's regnet_x_8gf).

A run that chose its EMA weights for evaluation (`ema_decay` > 0 and
`eval_ema`) is exported with them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from absl import logging
import ml_collections
import numpy as np

from vit_jax_ft import workdir as workdir_lib
from vit_jax_ft.inputs import normalization as normalization_lib
from vit_jax_ft.models import regnet as regnet_lib
from vit_jax_ft.models import convnext as convnext_lib
from vit_jax_ft.models import resnet as resnet_lib
from vit_jax_ft.models import vit as vit_lib
from vit_jax_ft.pretrained import tensor_files

class ExportError(ValueError):
  """The run cannot be expressed in the requested format."""


def read_run(workdir: str, step: int | None = None) -> tuple[ml_collections.ConfigDict, dict,
                                                             dict, int]:
  """(config, params, batch_stats, step) of a workdir's latest (or given) checkpoint."""
  config = workdir_lib.load_config(workdir)
  # Refuses NaN weights: an export of them would load fine and predict NaN.
  ck = workdir_lib.restore(workdir, "last" if step is None else str(step))
  params = _as_numpy(ck.variables["params"])
  return config, params, _as_numpy(ck.variables.get("batch_stats") or {}), ck.step


def _as_numpy(tree: Mapping) -> dict:
  return {k: _as_numpy(v) if isinstance(v, Mapping) else np.asarray(v) for k, v in tree.items()}


def class_names(config: ml_collections.ConfigDict, workdir: str, num_classes: int) -> list[str]:
  """Class names from the run's dataset_info.json (LABEL_i when it cannot be found)."""
  data_dir = config.data.get("dir") or os.path.join(workdir, "data")
  path = os.path.join(data_dir, "dataset_info.json")
  if os.path.isfile(path):
    with open(path) as f:
      names = json.load(f).get("class_names")
    if names and len(names) == num_classes:
      return list(names)
    logging.warning("%s has %s class names for a %d-class head; using LABEL_i.", path,
                    len(names or []), num_classes)
  else:
    logging.warning("No dataset_info.json at %s; class names will be LABEL_i.", path)
  return [f"LABEL_{i}" for i in range(num_classes)]


def vit_state_dict(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Our ViT params -> ViTForImageClassification tensor names (torch layouts)."""
  out = {
      "vit.embeddings.cls_token": params["cls"],
      "vit.embeddings.position_embeddings":
          params["Transformer"]["posembed_input"]["pos_embedding"],
      "vit.embeddings.patch_embeddings.projection.weight":
          np.transpose(params["embedding"]["kernel"], (3, 2, 0, 1)),
      "vit.embeddings.patch_embeddings.projection.bias": params["embedding"]["bias"],
      "vit.layernorm.weight": params["Transformer"]["encoder_norm"]["scale"],
      "vit.layernorm.bias": params["Transformer"]["encoder_norm"]["bias"],
      "classifier.weight": params["head"]["kernel"].T,
      "classifier.bias": params["head"]["bias"],
  }
  i = 0
  while f"encoderblock_{i}" in params["Transformer"]:
    block = params["Transformer"][f"encoderblock_{i}"]
    pre = f"vit.encoder.layer.{i}."
    att = block["MultiHeadDotProductAttention_1"]
    for ours, theirs in (("query", "query"), ("key", "key"), ("value", "value")):
      kernel = att[ours]["kernel"]
      out[pre + f"attention.attention.{theirs}.weight"] = kernel.reshape(kernel.shape[0], -1).T
      out[pre + f"attention.attention.{theirs}.bias"] = att[ours]["bias"].reshape(-1)
    kernel = att["out"]["kernel"]
    out[pre + "attention.output.dense.weight"] = kernel.reshape(-1, kernel.shape[-1]).T
    out[pre + "attention.output.dense.bias"] = att["out"]["bias"]
    for ours, theirs in (("LayerNorm_0", "layernorm_before"), ("LayerNorm_2", "layernorm_after")):
      out[pre + f"{theirs}.weight"] = block[ours]["scale"]
      out[pre + f"{theirs}.bias"] = block[ours]["bias"]
    for ours, theirs in (("Dense_0", "intermediate.dense"), ("Dense_1", "output.dense")):
      out[pre + f"{theirs}.weight"] = block["MlpBlock_3"][ours]["kernel"].T
      out[pre + f"{theirs}.bias"] = block["MlpBlock_3"][ours]["bias"]
    i += 1
  return out


def _bn(out: dict, prefix: str, params: Mapping, stats: Mapping) -> None:
  out[prefix + "weight"], out[prefix + "bias"] = params["scale"], params["bias"]
  out[prefix + "running_mean"], out[prefix + "running_var"] = stats["mean"], stats["var"]
  out[prefix + "num_batches_tracked"] = np.zeros((), np.int64)


def resnet_state_dict(params: Mapping[str, Any], batch_stats: Mapping[str, Any]
                      ) -> dict[str, np.ndarray]:
  """Our ResNet params -> ResNetForImageClassification tensor names."""
  conv = lambda k: np.transpose(k, (3, 2, 0, 1))
  out = {"resnet.embedder.embedder.convolution.weight": conv(params["conv_init"]["kernel"]),
         "classifier.1.weight": params["head"]["kernel"].T,
         "classifier.1.bias": params["head"]["bias"]}
  _bn(out, "resnet.embedder.embedder.normalization.", params["bn_init"], batch_stats["bn_init"])
  for name, block in params.items():
    if not name.startswith("stage"):
      continue
    stage, index = (int(x) for x in name[len("stage"):].split("_block"))
    pre = f"resnet.encoder.stages.{stage - 1}.layers.{index - 1}."
    stats = batch_stats[name]
    for k in range(1, 4):
      if f"conv{k}" in block:
        out[pre + f"layer.{k - 1}.convolution.weight"] = conv(block[f"conv{k}"]["kernel"])
        _bn(out, pre + f"layer.{k - 1}.normalization.", block[f"bn{k}"], stats[f"bn{k}"])
    if "proj_conv" in block:
      out[pre + "shortcut.convolution.weight"] = conv(block["proj_conv"]["kernel"])
      _bn(out, pre + "shortcut.normalization.", block["proj_bn"], stats["proj_bn"])
  return out


def vit_config(model: vit_lib.VisionTransformer, image_size: int) -> dict[str, Any]:
  if model.classifier != "token" or model.representation_size is not None:
    raise ExportError("Hugging Face ViTForImageClassification classifies the class token with "
                      "no pre-logits layer; this model has classifier="
                      f"{model.classifier!r}, representation_size={model.representation_size}.")
  return {
      "architectures": ["ViTForImageClassification"], "model_type": "vit",
      "hidden_size": model.hidden_size, "num_hidden_layers": model.num_layers,
      "num_attention_heads": model.num_heads, "intermediate_size": model.mlp_dim,
      "hidden_act": "gelu_pytorch_tanh" if model.gelu_approximate else "gelu",
      "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
      "layer_norm_eps": model.layer_norm_eps, "image_size": image_size,
      "patch_size": model.patch_size, "num_channels": 3, "qkv_bias": True,
      "encoder_stride": model.patch_size, "initializer_range": 0.02,
  }


# What the refusals below tell a user of a family transformers cannot take from us yet.
_WHAT_EXPORTS = ("--format=huggingface exports ViT, ResNet-18/34/50/101/152, RegNet and "
                 "ConvNeXt runs "
                 "(the only export format); the run's own checkpoint (WORKDIR/checkpoints) "
                 "works as is with vit_jax_ft.evaluate, predict and explain, and as init_from")


def resnet_config(model: resnet_lib.ResNet) -> dict[str, Any]:
  if model.groups != 1:
    raise ExportError(
        f"Hugging Face transformers has no ResNeXt (its ResNet has no grouped convolutions; "
        f"this model has groups={model.groups}): {_WHAT_EXPORTS}.")
  if model.conv_bias or not np.isclose(model.bn_epsilon, 1e-5, rtol=1e-9, atol=0):
    raise ExportError(
        "Hugging Face ResNet has no conv biases and BatchNorm epsilon 1e-5; this model has "
        f"conv_bias={model.conv_bias}, bn_epsilon={model.bn_epsilon} (Keras-style weights).")
  if model.padding != "torch" or model.first_block_projection:
    raise ExportError(
        "Hugging Face ResNet pads symmetrically and has no projection on a shape-preserving "
        f"first block; this model has padding={model.padding!r}, first_block_projection="
        f"{model.first_block_projection} (TF Model Garden weights).")
  expansion = 4 if model.block == "bottleneck" else 1
  return {
      "architectures": ["ResNetForImageClassification"], "model_type": "resnet",
      "num_channels": 3, "embedding_size": model.width,
      "hidden_sizes": [model.width * 2**i * expansion for i in range(len(model.stage_sizes))],
      "depths": list(model.stage_sizes), "layer_type": model.block, "hidden_act": "relu",
      "downsample_in_first_stage": False, "downsample_in_bottleneck": model.variant == "v1",
  }


def regnet_config(model: regnet_lib.RegNet) -> dict[str, Any]:
  """RegNetConfig: one group width for all stages, SE a quarter of the block input, eps 1e-5."""
  problems = []
  if len(set(model.group_widths)) != 1:
    problems.append(f"one group width for every stage (this model has {list(model.group_widths)})")
  if model.se_ratio not in (0.0, 0.25):
    problems.append(f"SE at 1/4 of the block input or none (this model has {model.se_ratio})")
  if model.bottleneck_ratio != 1.0:
    problems.append(f"no bottleneck (this model has ratio {model.bottleneck_ratio})")
  if not np.isclose(model.bn_epsilon, 1e-5, rtol=1e-9, atol=0):
    problems.append(f"BatchNorm epsilon 1e-5 (this model has {model.bn_epsilon})")
  if problems:
    raise ExportError("Hugging Face RegNet needs " + "; ".join(problems) + f": {_WHAT_EXPORTS}.")
  return {
      "architectures": ["RegNetForImageClassification"], "model_type": "regnet",
      "num_channels": 3, "embedding_size": model.stem_width,
      "hidden_sizes": list(model.widths), "depths": list(model.depths),
      "groups_width": model.group_widths[0], "layer_type": "y" if model.se_ratio else "x",
      "hidden_act": "relu", "downsample_in_first_stage": True,
  }


def regnet_state_dict(params: Mapping[str, Any], batch_stats: Mapping[str, Any]
                      ) -> dict[str, np.ndarray]:
  """Our RegNet params -> RegNetForImageClassification tensor names (pretrained/regnet.py's inverse)."""
  conv = lambda k: np.transpose(k, (3, 2, 0, 1))
  out = {"regnet.embedder.embedder.convolution.weight": conv(params["conv_init"]["kernel"]),
         "classifier.1.weight": params["head"]["kernel"].T,
         "classifier.1.bias": params["head"]["bias"]}
  _bn(out, "regnet.embedder.embedder.normalization.", params["bn_init"], batch_stats["bn_init"])
  for name, block in params.items():
    if not name.startswith("stage"):
      continue
    stage, index = (int(x) for x in name[len("stage"):].split("_block"))
    pre = f"regnet.encoder.stages.{stage - 1}.layers.{index - 1}."
    stats = batch_stats[name]
    # The last conv is layer.3 behind a Y block's SE (layer.2), else layer.2.
    for k, layer in ((1, 0), (2, 1), (3, 3 if "se" in block else 2)):
      out[pre + f"layer.{layer}.convolution.weight"] = conv(block[f"conv{k}"]["kernel"])
      _bn(out, pre + f"layer.{layer}.normalization.", block[f"bn{k}"], stats[f"bn{k}"])
    if "se" in block:
      for fc, index_ in (("fc1", 0), ("fc2", 2)):
        kernel = block["se"][fc]["kernel"]
        out[pre + f"layer.2.attention.{index_}.weight"] = kernel.T[:, :, None, None]
        out[pre + f"layer.2.attention.{index_}.bias"] = block["se"][fc]["bias"]
    if "proj_conv" in block:
      out[pre + "shortcut.convolution.weight"] = conv(block["proj_conv"]["kernel"])
      _bn(out, pre + "shortcut.normalization.", block["proj_bn"], stats["proj_bn"])
  return out


# ---- ConvNeXt ----

def convnext_state_dict(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Our ConvNeXt params -> ConvNextForImageClassification tensor names."""
  conv = lambda k: np.transpose(k, (3, 2, 0, 1))
  out = {"convnext.embeddings.patch_embeddings.weight": conv(params["conv_init"]["kernel"]),
         "convnext.embeddings.patch_embeddings.bias": params["conv_init"]["bias"],
         "convnext.embeddings.layernorm.weight": params["norm_init"]["scale"],
         "convnext.embeddings.layernorm.bias": params["norm_init"]["bias"],
         "convnext.layernorm.weight": params["norm_pre_head"]["scale"],
         "convnext.layernorm.bias": params["norm_pre_head"]["bias"],
         "classifier.weight": params["head"]["kernel"].T,
         "classifier.bias": params["head"]["bias"]}
  for name, block in params.items():
    if not name.startswith("stage"):
      continue
    stage, index = (int(x) for x in name[len("stage"):].split("_block"))
    pre = f"convnext.encoder.stages.{stage - 1}."
    if "downsample_conv" in block:
      out[pre + "downsampling_layer.0.weight"] = block["downsample_norm"]["scale"]
      out[pre + "downsampling_layer.0.bias"] = block["downsample_norm"]["bias"]
      out[pre + "downsampling_layer.1.weight"] = conv(block["downsample_conv"]["kernel"])
      out[pre + "downsampling_layer.1.bias"] = block["downsample_conv"]["bias"]
    pre += f"layers.{index - 1}."
    out[pre + "dwconv.weight"] = conv(block["dwconv"]["kernel"])
    out[pre + "dwconv.bias"] = block["dwconv"]["bias"]
    out[pre + "layernorm.weight"] = block["norm"]["scale"]
    out[pre + "layernorm.bias"] = block["norm"]["bias"]
    for ours, theirs in (("mlp_in", "pwconv1"), ("mlp_out", "pwconv2")):
      out[pre + f"{theirs}.weight"] = block[ours]["kernel"].T
      out[pre + f"{theirs}.bias"] = block[ours]["bias"]
    out[pre + "layer_scale_parameter"] = block["gamma"]
  return out


def convnext_config(model: convnext_lib.ConvNeXt, image_size: int) -> dict[str, Any]:
  return {
      "architectures": ["ConvNextForImageClassification"], "model_type": "convnext",
      "num_channels": 3, "patch_size": 4, "num_stages": len(model.depths),
      "hidden_sizes": list(model.dims), "depths": list(model.depths), "hidden_act": "gelu",
      "layer_norm_eps": model.head_norm_eps, "layer_scale_init_value": 1e-6,
      "drop_path_rate": 0.0, "image_size": image_size, "initializer_range": 0.02,
  }


def _preprocessor_config(normalization: str, image_size: int, is_vit: bool) -> dict | None:
  if normalization not in normalization_lib.MEAN_STD:
    return None
  mean, std = normalization_lib.MEAN_STD[normalization]
  return {"image_processor_type": "ViTImageProcessor" if is_vit else "ConvNextImageProcessor",
          "do_resize": True, "size": ({"height": image_size, "width": image_size} if is_vit
                                      else {"shortest_edge": image_size}),
          "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
          "image_mean": mean, "image_std": std}


def export_huggingface(workdir: str, out_dir: str, *, step: int | None = None) -> str:
  """Writes the run's fine-tuned model as a transformers folder; returns out_dir."""
  config, params, batch_stats, step = read_run(workdir, step)
  num_classes = int(params["head"]["kernel"].shape[-1])
  model = workdir_lib.build_model(config, num_classes)
  image_size = int(config.data.image_size)
  if isinstance(model, vit_lib.VisionTransformer):
    hf_config, state = vit_config(model, image_size), vit_state_dict(params)
  elif isinstance(model, regnet_lib.RegNet):
    hf_config, state = regnet_config(model), regnet_state_dict(params, batch_stats)
  elif isinstance(model, resnet_lib.ResNet):
    hf_config, state = resnet_config(model), resnet_state_dict(params, batch_stats)
  elif isinstance(model, convnext_lib.ConvNeXt):
    hf_config, state = convnext_config(model, image_size), convnext_state_dict(params)
  else:
    raise ExportError(f"Exporting a {type(model).__name__} ({config.model.name}) to Hugging Face "
                      f"is not supported yet: {_WHAT_EXPORTS}.")
  names = class_names(config, workdir, num_classes)
  hf_config.update({
      "id2label": {str(i): n for i, n in enumerate(names)},
      "label2id": {n: i for i, n in enumerate(names)},
      "torch_dtype": "float32",
  })
  if config.loss.name.startswith("sigmoid"):
    hf_config["problem_type"] = "multi_label_classification"
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(hf_config, f, indent=2)
  tensor_files.write_safetensors(
      os.path.join(out_dir, "model.safetensors"),
      {k: np.asarray(v, np.int64 if k.endswith("num_batches_tracked") else np.float32)
       for k, v in state.items()})
  pre = _preprocessor_config(config.data.normalization, image_size, "patch_size" in config.model)
  if pre is None:
    logging.warning("No preprocessor_config.json: normalization %r has no mean/std form.",
                    config.data.normalization)
  else:
    with open(os.path.join(out_dir, "preprocessor_config.json"), "w") as f:
      json.dump(pre, f, indent=2)
  logging.info("Exported %s step %d (%d classes) to %s", workdir, step, num_classes, out_dir)
  return out_dir
