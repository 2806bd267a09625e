"""torchvision (and timm, which uses the same names) ResNet and ResNeXt state dicts.

`conv1`/`bn1` is the stem, `layer{i}.{j}` the blocks (`conv1..3`, `bn1..3`,
`downsample.0/1` the projection shortcut), `fc` the head. torchvision and timm
ResNets stride the bottleneck's 3x3 conv (v1.5), have no conv biases, use
BatchNorm epsilon 1e-5 and expect ImageNet mean/std inputs. A ResNeXt
(`resnext50_32x4d`, ...) has the same names; its grouped 3x3 kernels
([out, in / groups, 3, 3]) give the groups and the width per group
(pretrained/architecture.py). RegNets are converted by regnet.py. Variants with
other stems (`resnet50d`'s `conv1.0`, ...) leave tensors unmapped and are
refused.
"""

from __future__ import annotations

from vit_jax_ft.pretrained import conversion
from vit_jax_ft.pretrained import tensor_files

Target = conversion.Target

MODEL_OPTIONS = {"variant": "v1.5", "conv_bias": False, "bn_epsilon": 1e-5}
NORMALIZATION = "imagenet"

_BLOCK = r"layer(\d+)\.(\d+)\."
_BN_KINDS = r"(weight|bias|running_mean|running_var)"


def _block(m) -> str:
  return f"stage{int(m[1])}_block{int(m[2]) + 1}"


RESNET_RULES: tuple[conversion.Rule, ...] = (
    (r"conv1\.weight", lambda m: Target("params/conv_init/kernel", conversion.torch_conv)),
    (r"bn1\." + _BN_KINDS, lambda m: conversion.torch_batchnorm("bn_init", m[1])),
    (_BLOCK + r"conv(\d)\.weight",
     lambda m: Target(f"params/{_block(m)}/conv{m[3]}/kernel", conversion.torch_conv)),
    (_BLOCK + r"bn(\d)\." + _BN_KINDS,
     lambda m: conversion.torch_batchnorm(f"{_block(m)}/bn{m[3]}", m[4])),
    (_BLOCK + r"downsample\.0\.weight",
     lambda m: Target(f"params/{_block(m)}/proj_conv/kernel", conversion.torch_conv)),
    (_BLOCK + r"downsample\.1\." + _BN_KINDS,
     lambda m: conversion.torch_batchnorm(f"{_block(m)}/proj_bn", m[3])),
    (r"fc\.weight", lambda m: Target("params/head/kernel", conversion.torch_dense)),
    (r"fc\.bias", lambda m: Target("params/head/bias")),
)
IGNORE = (r".*num_batches_tracked",)


def is_resnet_state_dict(names) -> bool:
  return "conv1.weight" in names and any(n.startswith("layer1.") for n in names)


def convert(tensors: tensor_files.TensorFile, *, source: str, strict: bool = True,
            fmt: str = "torchvision", normalization: str = NORMALIZATION
            ) -> conversion.Converted:
  """Converts a torchvision/timm ResNet state dict."""
  params, batch_stats, unused = conversion.apply_rules(tensors, RESNET_RULES, IGNORE)
  conversion.check_unused(unused, tensors.path, strict)
  return conversion.make_converted(
      params, batch_stats, source=source, fmt=fmt, normalization=normalization,
      model_options=MODEL_OPTIONS, unused=unused)
