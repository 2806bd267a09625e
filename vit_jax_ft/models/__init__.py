"""Flax image classifiers: ViT, ResNet/ResNeXt, RegNet, BiT, ConvNeXt and EfficientNet,
built from `config.model`."""

import logging
from typing import Any, Callable

import flax.linen as nn
import jax
import ml_collections

from vit_jax_ft.models import bit
from vit_jax_ft.models import convnext
from vit_jax_ft.models import efficientnet
from vit_jax_ft.models import layer_impl
from vit_jax_ft.models import regnet
from vit_jax_ft.models import resnet
from vit_jax_ft.models import vit

_VIT_ARCH = ("patch_size", "hidden_size", "num_layers", "num_heads", "mlp_dim")


def _architecture(model_config: ml_collections.ConfigDict, family_name: str,
                  keys: tuple[str, ...], preset_fn: Callable[[str], dict],
                  tuple_keys: tuple[str, ...] = ()) -> dict:
  """A preset's sizes (`preset_fn(model.name)`) with any non-None overrides from the config.

  The bare family name (`family_name`, e.g. 'vit') has no preset, so every one of
  `keys` must be set; the error names the first missing one. Overrides of
  `tuple_keys` are made tuples, as the presets give them.
  """
  name = model_config.name
  if name == family_name:
    missing = [k for k in keys if model_config[k] is None]
    if missing:
      raise ValueError(f"model.name={family_name!r} needs explicit sizes; set model.{missing[0]} "
                       f"(missing: {', '.join(missing)}).")
    arch = {}
  else:
    arch = preset_fn(name)
  for key in keys:
    if model_config[key] is not None:
      arch[key] = tuple(model_config[key]) if key in tuple_keys else model_config[key]
  return arch


def _common_kwargs(model_config: ml_collections.ConfigDict, layers: layer_impl.Layers,
                   dtype: Any) -> dict:
  """The constructor arguments every family takes alike (base_config._common_model_fields)."""
  return dict(
      head_init=model_config.head_init,
      head_bias_init=model_config.head_bias_init,
      remat=model_config.remat,
      drop_path_rate=model_config.drop_path_rate,
      layer_impl=layers,
      dtype=dtype,
  )


def vit_architecture(model_config: ml_collections.ConfigDict) -> dict:
  """The preset's ViT sizes with any non-None overrides from the config."""
  # A copy: the preset dicts are module-level and must not see the overrides.
  return _architecture(model_config, "vit", _VIT_ARCH, lambda name: dict(vit.VIT_PRESETS[name]))


def create_model(model_config: ml_collections.ConfigDict, num_classes: int,
                 dtype: Any) -> nn.Module:
  """Builds the classifier named by `model_config.name` with a fresh head.

  `model_config.layer_impl` ('auto' by default) is resolved here, for the
  backend JAX runs on now (models/layer_impl.py), and logged.
  """
  name = model_config.name
  layers = layer_impl.resolve(model_config.layer_impl)
  logging.info("model.layer_impl=%r on %s: %s layers.", model_config.layer_impl,
               jax.default_backend(), layers.name)
  is_vit = name == "vit" or name in vit.VIT_PRESETS
  if (is_vit or name in resnet.RESNET_PRESETS) and is_vit != ("patch_size" in model_config):
    family = "ViT" if is_vit else "ResNet"
    raise ValueError(
        f"model.name={name!r} is a {family}, but config.model holds the fields of the other "
        f"family; start from a {family} config (base_config.{family.lower()}_model_config).")
  if vit.is_distilled_preset(name) and model_config.classifier != "token_distilled":
    raise ValueError(
        f"model.name={name!r} is a DeiT distilled ViT, which needs "
        f"model.classifier='token_distilled' (got {model_config.classifier!r}; "
        "base_config.vit_model_config sets it).")
  if is_vit:
    return vit.VisionTransformer(
        num_classes=num_classes,
        **vit_architecture(model_config),
        classifier=model_config.classifier,
        representation_size=model_config.representation_size,
        gelu_approximate=model_config.gelu_approximate,
        layer_norm_eps=model_config.layer_norm_eps,
        dropout_rate=model_config.dropout_rate,
        attention_dropout_rate=model_config.attention_dropout_rate,
        **_common_kwargs(model_config, layers, dtype),
    )
  if name in resnet.RESNET_PRESETS:
    return resnet.ResNet(
        num_classes=num_classes,
        **resnet.resnet_preset(name),
        variant=model_config.variant,
        conv_bias=model_config.conv_bias,
        bn_epsilon=model_config.bn_epsilon,
        bn_momentum=model_config.bn_momentum,
        padding=model_config.padding,
        first_block_projection=model_config.first_block_projection,
        **_common_kwargs(model_config, layers, dtype),
    )
  if name in regnet.REGNET_PRESETS:
    return _create_regnet(model_config, num_classes, dtype, layers)
  if name == "bit" or name in bit.BIT_PRESETS:
    return _create_bit(model_config, num_classes, dtype, layers)
  if name == "convnext" or name in convnext.CONVNEXT_PRESETS:
    return _create_convnext(model_config, num_classes, dtype, layers)
  if name in efficientnet.EFFICIENTNET_PRESETS:
    return _create_efficientnet(model_config, num_classes, dtype, layers)
  valid = (sorted(vit.VIT_PRESETS) + ["vit"] + sorted(resnet.RESNET_PRESETS)
           + sorted(regnet.REGNET_PRESETS) + sorted(bit.BIT_PRESETS) + ["bit"]
           + sorted(convnext.CONVNEXT_PRESETS) + ["convnext"]
           + sorted(efficientnet.EFFICIENTNET_PRESETS))
  raise ValueError(f"Unknown model.name {name!r}; valid names: {', '.join(valid)}.")


# RegNet: what a RegNet config lacks and a ResNet config has, at the values that
# mean "as a RegNet does it" (so a ResNet experiment config can switch model.name).
_RESNET_ONLY_DEFAULTS = {"variant": "v1.5", "conv_bias": False, "padding": "torch",
                         "first_block_projection": False}


def _create_regnet(model_config: ml_collections.ConfigDict, num_classes: int, dtype: Any,
                   layers: layer_impl.Layers) -> nn.Module:
  """A RegNet preset from a RegNet config (base_config.regnet_model_config) or a ResNet one."""
  name = model_config.name
  if "patch_size" in model_config:
    raise ValueError(
        f"model.name={name!r} is a RegNet, but config.model holds the fields of a ViT; start "
        "from a RegNet config (base_config.regnet_model_config).")
  for key, needed in _RESNET_ONLY_DEFAULTS.items():
    if key in model_config and model_config[key] != needed:
      raise ValueError(f"model.name={name!r} is a RegNet, which has no model.{key}: it must be "
                       f"{needed!r} (the ResNet default), got {model_config[key]!r}.")
  return regnet.RegNet(
      num_classes=num_classes,
      **regnet.regnet_preset(name),
      bn_epsilon=model_config.bn_epsilon,
      bn_momentum=model_config.bn_momentum,
      **_common_kwargs(model_config, layers, dtype),
  )


# ---- BiT (models/bit.py) ----

def bit_architecture(model_config: ml_collections.ConfigDict) -> dict:
  """The BiT preset's stage sizes and width factor, with any non-None overrides."""
  return _architecture(model_config, "bit", ("stage_sizes", "width_factor"), bit.bit_preset,
                       tuple_keys=("stage_sizes",))


def _create_bit(model_config: ml_collections.ConfigDict, num_classes: int, dtype: Any,
                layers: layer_impl.Layers) -> nn.Module:
  """A BiT ResNet v2 from a BiT config (base_config.bit_model_config)."""
  if "ws_epsilon" not in model_config:
    raise ValueError(
        f"model.name={model_config.name!r} is a BiT ResNet, but config.model holds the fields of "
        "another family; start from a BiT config (base_config.bit_model_config).")
  return bit.BiT(
      num_classes=num_classes,
      **bit_architecture(model_config),
      ws_epsilon=model_config.ws_epsilon,
      **_common_kwargs(model_config, layers, dtype),
  )


# ---- ConvNeXt (models/convnext.py) ----

def convnext_architecture(model_config: ml_collections.ConfigDict) -> dict:
  """The ConvNeXt preset's depths and dims, with any non-None overrides."""
  return _architecture(model_config, "convnext", ("depths", "dims"), convnext.convnext_preset,
                       tuple_keys=("depths", "dims"))


def _create_convnext(model_config: ml_collections.ConfigDict, num_classes: int, dtype: Any,
                     layers: layer_impl.Layers) -> nn.Module:
  """A ConvNeXt from a ConvNeXt config (base_config.convnext_model_config)."""
  if "head_norm_eps" not in model_config:
    raise ValueError(
        f"model.name={model_config.name!r} is a ConvNeXt, but config.model holds the fields of "
        "another family; start from a ConvNeXt config (base_config.convnext_model_config).")
  return convnext.ConvNeXt(
      num_classes=num_classes,
      **convnext_architecture(model_config),
      head_norm_eps=model_config.head_norm_eps,
      **_common_kwargs(model_config, layers, dtype),
  )


# ---- EfficientNet (models/efficientnet.py) ----

def _create_efficientnet(model_config: ml_collections.ConfigDict, num_classes: int, dtype: Any,
                         layers: layer_impl.Layers) -> nn.Module:
  """An EfficientNet from an EfficientNet config (base_config.efficientnet_model_config)."""
  if "padding" not in model_config or "variant" in model_config:
    raise ValueError(
        f"model.name={model_config.name!r} is an EfficientNet, but config.model holds the fields "
        "of another family; start from base_config.efficientnet_model_config.")
  return efficientnet.EfficientNet(
      num_classes=num_classes,
      **efficientnet.efficientnet_preset(model_config.name),
      bn_epsilon=model_config.bn_epsilon,
      bn_momentum=model_config.bn_momentum,
      padding=model_config.padding,
      **_common_kwargs(model_config, layers, dtype),
  )
