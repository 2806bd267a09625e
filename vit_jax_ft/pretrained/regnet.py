"""torchvision, timm and Hugging Face RegNet state dicts (models/regnet.py).

torchvision (`regnet_y_400mf`, ...): `stem.0` / `stem.1` the stem conv and
BatchNorm, `trunk_output.block{i}.block{i}-{j}` the blocks with `f.a`, `f.b`,
`f.c` (each `.0` conv, `.1` BatchNorm), `f.se.fc1/fc2` and `proj.0/1`, `fc`
the head. timm (`regnety_004`, ...): `stem.conv/bn`, `s{i}.b{j}` with
`conv1..3.conv/bn`, `se.fc1/fc2` and `downsample.conv/bn`, `head.fc`.
transformers' RegNetForImageClassification (`facebook/regnet-y-040`): see
HUGGINGFACE_RULES (its folders go through huggingface.py). All three
use BatchNorm epsilon 1e-5, no conv biases and ImageNet mean/std inputs. The
architecture (depths, widths, group widths, SE) is read from the tensor
shapes (pretrained/architecture.py). timm's RegNet variants that this module
cannot express (RegNetZ, pre-activation, average-pool shortcuts) leave
tensors unmapped and are refused.
"""

from __future__ import annotations

import numpy as np

from vit_jax_ft.pretrained import conversion
from vit_jax_ft.pretrained import tensor_files

Target = conversion.Target

MODEL_OPTIONS = {"bn_epsilon": 1e-5}
NORMALIZATION = "imagenet"
_BN = r"(weight|bias|running_mean|running_var)"
IGNORE = (r".*num_batches_tracked",)


def _se_dense(x: np.ndarray) -> np.ndarray:
  """A 1x1 Conv2d weight [out, in, 1, 1] (or a Linear's [out, in]) -> Dense kernel [in, out]."""
  return np.transpose(x.reshape(x.shape[0], x.shape[1]))


def _rules(block_re: str, stage_base: int, block_base: int,
           convs: dict[str, tuple[str, str]], se_re: str, se_fc: dict[str, str],
           stem: tuple[str, str], head: str) -> tuple[conversion.Rule, ...]:
  """A layout's rules.

  `block_re` captures (stage, block), numbered from `stage_base` / `block_base`;
  `convs` maps our conv number (or 'proj') to the layout's (conv, BatchNorm)
  patterns; `se_re` captures the SE layer's index, `se_fc` maps it to fc1/fc2.
  """

  def block(m) -> str:
    return f"stage{int(m[1]) + 1 - stage_base}_block{int(m[2]) + 1 - block_base}"

  rules: list[conversion.Rule] = [
      (stem[0] + r"\.weight", lambda m: Target("params/conv_init/kernel", conversion.torch_conv)),
      (stem[1] + r"\." + _BN, lambda m: conversion.torch_batchnorm("bn_init", m[1])),
      (head + r"\.weight", lambda m: Target("params/head/kernel", conversion.torch_dense)),
      (head + r"\.bias", lambda m: Target("params/head/bias")),
      (block_re + se_re + r"\.weight",
       lambda m: Target(f"params/{block(m)}/se/{se_fc[m[3]]}/kernel", _se_dense)),
      (block_re + se_re + r"\.bias", lambda m: Target(f"params/{block(m)}/se/{se_fc[m[3]]}/bias")),
  ]
  for ours, (conv, bn) in convs.items():
    conv_path = "proj_conv" if ours == "proj" else f"conv{ours}"
    bn_path = "proj_bn" if ours == "proj" else f"bn{ours}"
    rules.append((block_re + conv + r"\.weight",
                  lambda m, p=conv_path: Target(f"params/{block(m)}/{p}/kernel",
                                                conversion.torch_conv)))
    rules.append((block_re + bn + r"\." + _BN,
                  lambda m, p=bn_path: conversion.torch_batchnorm(f"{block(m)}/{p}", m[3])))
  return tuple(rules)


_FC = {"1": "fc1", "2": "fc2"}
TORCHVISION_RULES = _rules(
    r"trunk_output\.block(\d+)\.block\d+-(\d+)\.", 1, 0,
    {"1": (r"f\.a\.0", r"f\.a\.1"), "2": (r"f\.b\.0", r"f\.b\.1"),
     "3": (r"f\.c\.0", r"f\.c\.1"), "proj": (r"proj\.0", r"proj\.1")},
    r"f\.se\.fc([12])", _FC, stem=(r"stem\.0", r"stem\.1"), head=r"fc")
TIMM_RULES = _rules(
    r"s(\d+)\.b(\d+)\.", 1, 1,
    {"1": (r"conv1\.conv", r"conv1\.bn"), "2": (r"conv2\.conv", r"conv2\.bn"),
     "3": (r"conv3\.conv", r"conv3\.bn"), "proj": (r"downsample\.conv", r"downsample\.bn")},
    r"se\.fc([12])", _FC, stem=(r"stem\.conv", r"stem\.bn"), head=r"head\.fc")
# transformers' RegNetForImageClassification: `layer.{0,1}` are the first two
# convs; the last is `layer.2` in an X block and `layer.3` in a Y block, whose
# `layer.2` is the SE (`attention.0` and `attention.2` its two 1x1 convs).
HUGGINGFACE_RULES = _rules(
    r"regnet\.encoder\.stages\.(\d+)\.layers\.(\d+)\.", 0, 0,
    {"1": (r"layer\.0\.convolution", r"layer\.0\.normalization"),
     "2": (r"layer\.1\.convolution", r"layer\.1\.normalization"),
     "3": (r"layer\.[23]\.convolution", r"layer\.[23]\.normalization"),
     "proj": (r"shortcut\.convolution", r"shortcut\.normalization")},
    r"layer\.2\.attention\.([02])", {"0": "fc1", "2": "fc2"},
    stem=(r"regnet\.embedder\.embedder\.convolution",
          r"regnet\.embedder\.embedder\.normalization"),
    head=r"classifier\.1")


def is_huggingface_regnet(names) -> bool:
  return "regnet.embedder.embedder.convolution.weight" in names


def is_torchvision_regnet(names) -> bool:
  return "stem.0.weight" in names and any(n.startswith("trunk_output.block1.") for n in names)


def is_timm_regnet(names) -> bool:
  return "stem.conv.weight" in names and any(n.startswith("s1.b1.") for n in names)


def convert(tensors: tensor_files.TensorFile, *, source: str, strict: bool = True,
            normalization: str = NORMALIZATION, class_names=None) -> conversion.Converted:
  """A torchvision, timm or Hugging Face RegNet state dict (told apart by its names)."""
  if is_torchvision_regnet(tensors):
    rules, fmt = TORCHVISION_RULES, "torchvision"
  elif is_timm_regnet(tensors):
    rules, fmt = TIMM_RULES, "timm"
  elif is_huggingface_regnet(tensors):
    rules, fmt = HUGGINGFACE_RULES, "huggingface"
  else:
    raise conversion.ConversionError(
        f"{tensors.path} is not a torchvision, timm or Hugging Face RegNet state dict; found "
        f"e.g. {sorted(tensors)[:6]}")
  params, batch_stats, unused = conversion.apply_rules(tensors, rules, IGNORE)
  conversion.check_unused(unused, tensors.path, strict)
  return conversion.make_converted(
      params, batch_stats, source=source, fmt=fmt, normalization=normalization,
      model_options=MODEL_OPTIONS, unused=unused, class_names=class_names)
