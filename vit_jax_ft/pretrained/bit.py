"""BiT (Big Transfer) ResNet v2 weights: the released `.npz` files and timm state dicts.

The `.npz` files people download (`BiT-M-R50x1.npz`, `BiT-S-R101x3.npz`, the
ILSVRC2012 fine-tunes, ...; google-research/big_transfer, also read by
vit_jax and big_vision) name TensorFlow variables::

  resnet/root_block/standardized_conv2d/kernel            HWIO
  resnet/block{i}/unit{j:02d}/{a,b,c}/standardized_conv2d/kernel
  resnet/block{i}/unit{j:02d}/{a,b,c}/group_norm/{gamma,beta}
  resnet/block{i}/unit{j:02d}/a/proj/standardized_conv2d/kernel
  resnet/group_norm/{gamma,beta}
  resnet/head/conv2d/{kernel,bias}                         kernel [1, 1, C, classes]

(`a`'s GroupNorm is the unit's pre-activation, before conv `a`; some files
spell a conv `standardized_conv2d_1`, as big_vision notes.) They were trained
with weight-standardisation epsilon 1e-10 on inputs scaled to [-1, 1].

timm's `resnetv2_*_bit` state dicts (`stem.conv`, `stages.{i}.blocks.{j}.
{norm1,conv1,...,downsample.conv}`, `norm`, `head.fc`) hold the same tensors
in PyTorch layouts; timm's StdConv2d uses epsilon 1e-8, and its BiT weights
also expect [-1, 1] inputs (mean = std = 0.5).
"""

from __future__ import annotations

import re

import numpy as np

from vit_jax_ft.pretrained import conversion
from vit_jax_ft.pretrained import tensor_files

Target = conversion.Target

FORMAT = "bit_npz"
ORIGIN = "BiT (Big Transfer, google-research/big_transfer) .npz"
NORMALIZATION = "minus_one_to_one"
NPZ_MODEL_OPTIONS = {"ws_epsilon": 1e-10}
TIMM_MODEL_OPTIONS = {"ws_epsilon": 1e-8}

_ROOT_KEY = "resnet/root_block/standardized_conv2d/kernel"
_UNIT = r"resnet/block(\d+)/unit(\d+)/"
_LETTER = {"a": 1, "b": 2, "c": 3}
_GN = {"gamma": "scale", "beta": "bias", "weight": "scale", "bias": "bias"}


def _vector(x: np.ndarray) -> np.ndarray:
  # GroupNorm parameters are [C] in some exports and [1, 1, 1, C] in others.
  return np.reshape(x, (-1,))


def _head_kernel(x: np.ndarray) -> np.ndarray:
  # A 1x1 conv over the pooled features is a Dense layer: [1, 1, C, K] -> [C, K].
  return np.reshape(x, x.shape[-2:])


def _unit(m) -> str:
  return f"params/stage{int(m[1])}_block{int(m[2])}/"


NPZ_RULES: tuple[conversion.Rule, ...] = (
    (r"resnet/root_block/standardized_conv2d/kernel", lambda m: Target("params/conv_init/kernel")),
    (_UNIT + r"([abc])/standardized_conv2d/kernel",
     lambda m: Target(_unit(m) + f"conv{_LETTER[m[3]]}/kernel")),
    (_UNIT + r"([abc])/group_norm/(gamma|beta)",
     lambda m: Target(_unit(m) + f"norm{_LETTER[m[3]]}/{_GN[m[4]]}", _vector)),
    (_UNIT + r"a/proj/standardized_conv2d/kernel",
     lambda m: Target(_unit(m) + "proj_conv/kernel")),
    (r"resnet/group_norm/(gamma|beta)",
     lambda m: Target(f"params/norm_pre_head/{_GN[m[1]]}", _vector)),
    (r"resnet/head/conv2d/kernel", lambda m: Target("params/head/kernel", _head_kernel)),
    (r"resnet/head/conv2d/bias", lambda m: Target("params/head/bias")),
)

_TIMM_BLOCK = r"stages\.(\d+)\.blocks\.(\d+)\."


def _timm_unit(m) -> str:
  return f"params/stage{int(m[1]) + 1}_block{int(m[2]) + 1}/"


TIMM_RULES: tuple[conversion.Rule, ...] = (
    (r"stem\.conv\.weight", lambda m: Target("params/conv_init/kernel", conversion.torch_conv)),
    (_TIMM_BLOCK + r"conv([123])\.weight",
     lambda m: Target(_timm_unit(m) + f"conv{m[3]}/kernel", conversion.torch_conv)),
    (_TIMM_BLOCK + r"norm([123])\.(weight|bias)",
     lambda m: Target(_timm_unit(m) + f"norm{m[3]}/{_GN[m[4]]}")),
    (_TIMM_BLOCK + r"downsample\.conv\.weight",
     lambda m: Target(_timm_unit(m) + "proj_conv/kernel", conversion.torch_conv)),
    (r"norm\.(weight|bias)", lambda m: Target(f"params/norm_pre_head/{_GN[m[1]]}")),
    (r"head\.fc\.weight", lambda m: Target("params/head/kernel",
                                          lambda x: np.reshape(x, x.shape[:2]).T)),
    (r"head\.fc\.bias", lambda m: Target("params/head/bias")),
)


def is_bit_npz(names) -> bool:
  """A BiT `.npz` (after `_canonical_names`): it has the root conv under `resnet/`."""
  return any(re.sub(r"standardized_conv2d_\d+", "standardized_conv2d", n) == _ROOT_KEY
             for n in names)


def is_timm_state_dict(names) -> bool:
  """timm ResNetV2 with BiT's 7x7 std-conv stem (not the 'deep' stems of resnetv2_50d)."""
  return "stem.conv.weight" in names and any(n.startswith("stages.0.blocks.0.norm1.")
                                              for n in names)


def _canonical_names(tensors: tensor_files.TensorFile) -> tensor_files.TensorFile:
  """A view in which `standardized_conv2d_N` is `standardized_conv2d`."""
  names = {re.sub(r"/standardized_conv2d_\d+/", "/standardized_conv2d/", k): k for k in tensors}
  if len(names) != len(tensors):
    raise conversion.ConversionError(
        f"{tensors.path}: two kernels of one layer (standardized_conv2d and "
        "standardized_conv2d_N); not a BiT checkpoint we can read.")
  return tensor_files.TensorFile(tensors.path, {k: tensors.shape(v) for k, v in names.items()},
                                 lambda k: tensors[names[k]], tensors.metadata)


def convert_npz(tensors: tensor_files.TensorFile, *, source: str, strict: bool = True
                ) -> conversion.Converted:
  """Converts a BiT `.npz` (big_transfer / vit_jax / big_vision layout)."""
  tensors = _canonical_names(tensors)
  if _ROOT_KEY not in tensors:
    raise conversion.ConversionError(f"{tensors.path} is not a BiT checkpoint: no {_ROOT_KEY}.")
  params, _, unused = conversion.apply_rules(tensors, NPZ_RULES)
  conversion.check_unused(unused, tensors.path, strict)
  return conversion.make_converted(
      params, {}, source=source, fmt=FORMAT, normalization=NORMALIZATION,
      model_options=NPZ_MODEL_OPTIONS, unused=unused)


def convert_timm(tensors: tensor_files.TensorFile, *, source: str, strict: bool = True,
                 normalization: str = NORMALIZATION) -> conversion.Converted:
  """Converts a timm `resnetv2_*_bit` state dict."""
  params, _, unused = conversion.apply_rules(tensors, TIMM_RULES)
  conversion.check_unused(unused, tensors.path, strict)
  return conversion.make_converted(
      params, {}, source=source, fmt="timm", normalization=normalization,
      model_options=TIMM_MODEL_OPTIONS, unused=unused)
