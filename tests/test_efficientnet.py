"""EfficientNet: presets, and torchvision / timm (native and TF-ported) weights against the real libraries.

References are PyPI torchvision's and timm's EfficientNets with random weights
and perturbed BatchNorm statistics (testing.perturb_torch_model), width and
depth reduced (width 0.25, depth 0.1: one block per stage, a residual block
included) at 64 px, and full-size B0. timm's `tf_efficientnet_b0` differs only
in options (BatchNorm epsilon 1e-3, TensorFlow 'SAME' padding), which the
converter takes from the architecture or file name.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax_ft import base_config
from vit_jax_ft import models
from vit_jax_ft import pretrained
from vit_jax_ft.models import efficientnet
from vit_jax_ft.pretrained import sources
from vit_jax_ft.pretrained import testing
from vit_jax_ft.reports import saliency

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")
from timm.models import efficientnet as timm_efficientnet  # pylint: disable=g-import-not-at-top,wrong-import-position
from torchvision.models import efficientnet as tv_efficientnet  # pylint: disable=g-import-not-at-top,wrong-import-position

import family_helpers  # pylint: disable=g-bad-import-order,wrong-import-position

ATOL = 1e-4
TINY = {"width_mult": 0.25, "depth_mult": 0.1}


def _torchvision(width_mult=0.25, depth_mult=0.1, num_classes=7, seed=0):
  torch.manual_seed(seed)
  setting, last = tv_efficientnet._efficientnet_conf(  # pylint: disable=protected-access
      "efficientnet_b0", width_mult=width_mult, depth_mult=depth_mult)
  model = tv_efficientnet.EfficientNet(setting, dropout=0.2, last_channel=last,
                                       num_classes=num_classes)
  testing.perturb_torch_model(model, seed=seed)
  return model


def _timm(variant="efficientnet_b0", width_mult=0.25, depth_mult=0.1, num_classes=7, seed=0):
  torch.manual_seed(seed)
  kwargs = {}
  if variant.startswith("tf_"):
    kwargs = {"bn_eps": timm_efficientnet.BN_EPS_TF_DEFAULT, "pad_type": "same"}
  model = timm_efficientnet._gen_efficientnet(  # pylint: disable=protected-access
      variant, channel_multiplier=width_mult, depth_multiplier=depth_mult, pretrained=False,
      num_classes=num_classes, **kwargs)
  testing.perturb_torch_model(model, seed=seed)
  return model


def _ours(converted, num_classes, **kw):
  arch = converted.metadata["architecture"]
  return efficientnet.EfficientNet(num_classes=num_classes, width_mult=arch["width_mult"],
                                   depth_mult=arch["depth_mult"],
                                   **converted.metadata["model_options"], **kw)


def _variables(converted):
  return {"params": converted.params, "batch_stats": converted.batch_stats}


@pytest.mark.parametrize("name", sorted(efficientnet.EFFICIENTNET_PRESETS))
def test_preset_parameter_counts_match_timm_and_torchvision(name):
  expected = sum(p.numel() for p in timm.create_model(
      name, pretrained=False, num_classes=1000, device="meta").parameters())
  with torch.device("meta"):
    assert sum(p.numel() for p in getattr(torchvision.models, name)().parameters()) == expected
  if name == "efficientnet_b0":
    assert expected == 5_288_548  # The published figure.
  shapes = jax.eval_shape(lambda: efficientnet.EfficientNet(
      num_classes=1000, **efficientnet.efficientnet_preset(name)).init(
          jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False))
  assert family_helpers.num_params(shapes["params"]) == expected


@pytest.mark.parametrize("library,file_name,options", [
    ("torchvision", "efficientnet_b0_rwightman-7f5810bc.pth", {"bn_epsilon": 1e-5,
                                                                "padding": "torch"}),
    ("timm", "efficientnet_b0.safetensors", {"bn_epsilon": 1e-5, "padding": "torch"}),
    ("tf_timm", "tf_efficientnet_b0.pth", {"bn_epsilon": 1e-3, "padding": "tf_same"})])
def test_state_dicts_match_the_real_library(tmp_path, library, file_name, options):
  reference = (_torchvision() if library == "torchvision"
               else _timm("tf_efficientnet_b0" if library == "tf_timm" else "efficientnet_b0"))
  converted = sources.convert(family_helpers.save_state_dict(reference, tmp_path / file_name))
  meta = converted.metadata
  assert meta["format"] == library.replace("tf_", "")
  assert meta["model_options"] == options and meta["unused_source_keys"] == []
  assert meta["architecture"]["family"] == "efficientnet"
  assert meta["normalization"] == "imagenet" and meta["num_classes_original"] == 7
  family_helpers.assert_parity(f"{library} EfficientNet", _ours(converted, 7),
                               _variables(converted), reference, family_helpers.images(), ATOL)


def test_tf_padding_matters(tmp_path):
  # The TF port's weights with PyTorch padding would be off: the option is not cosmetic.
  reference = _timm("tf_efficientnet_b0")
  converted = sources.convert(family_helpers.save_state_dict(
      reference, tmp_path / "tf_efficientnet_b0.pth"))
  images = family_helpers.images()
  wrong = family_helpers.jax_logits(_ours(converted, 7).clone(padding="torch"),
                                    _variables(converted), images)
  assert np.abs(wrong - family_helpers.torch_logits(reference, images)).max() > 10 * ATOL


def test_full_size_b0_matches_timm_and_torchvision(tmp_path):
  for reference, name in ((_torchvision(1.0, 1.0, 1000), "efficientnet_b0.pth"),
                          (_timm("efficientnet_b0", 1.0, 1.0, 1000), "model.safetensors")):
    converted = sources.convert(family_helpers.save_state_dict(reference, tmp_path / name),
                                model_name="efficientnet_b0")
    images = family_helpers.images(64)
    theirs = family_helpers.torch_logits(reference, images)
    # Random full-size B0s blow activations up (logits ~1e2 here): float32 rounding over
    # 16 blocks then exceeds 1e-4 absolute, so this check is relative to the logit scale
    # (the width/depth-reduced checks above hold 1e-4 absolute).
    ours = family_helpers.jax_logits(_ours(converted, 1000), _variables(converted), images)
    testing.assert_logits_match(f"{name} B0", ours, theirs, ATOL * np.abs(theirs).max())


def test_strict_load_report_and_grad_cam(tmp_path):
  path = family_helpers.save_state_dict(_timm(), tmp_path / "model.safetensors")
  model = efficientnet.EfficientNet(num_classes=3, **TINY)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
  result = family_helpers.assert_strict_load_loads_the_backbone(
      path, model, variables["params"], variables["batch_stats"], str(tmp_path / "cache"))
  with pytest.raises(pretrained.PretrainedMismatchError, match="model.bn_epsilon"):
    pretrained.load_for_finetuning(path, model.clone(bn_epsilon=1e-3), variables["params"],
                                   variables["batch_stats"], image_size=32,
                                   cache_dir=str(tmp_path / "cache"))
  assert saliency.last_block_name(model) == "stage7_block1"
  x = jnp.asarray(family_helpers.images(64))
  _, maps = saliency.explain_batch(model.clone(head_init="lecun_normal"), {
      "params": result.params, "batch_stats": result.batch_stats}, x)
  (name, cam), = maps.items()
  assert name == "Grad-CAM (stage7)" and cam.shape == (2, 2, 2) and np.isfinite(cam).all()


def test_bfloat16_and_create_model():
  model = models.create_model(base_config.model_config("efficientnet_b0"), 10, jnp.bfloat16)
  assert isinstance(model, efficientnet.EfficientNet) and model.width_mult == 1.0
  tiny = efficientnet.EfficientNet(num_classes=4, head_init="lecun_normal", **TINY)
  x = jnp.asarray(family_helpers.images(32))
  variables = tiny.init(jax.random.key(0), x, train=False)
  family_helpers.assert_bfloat16_close_to_float32(tiny, variables, x)
  with pytest.raises(ValueError, match="Unknown model.name .efficientnet_b9.") as e:
    base_config.model_config("efficientnet_b9")
  for name in ("vit_b16", "resnet50", "convnext_tiny", "efficientnet_b0", "efficientnet_b4"):
    assert name in str(e.value)


def test_layer_decay_and_export_refusal():
  from vit_jax_ft.training import optim  # pylint: disable=g-import-not-at-top
  model = efficientnet.EfficientNet(num_classes=3, **TINY)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                             train=False))["params"]
  ids, top = optim.layer_ids(list(pretrained.conversion.flatten(params)))
  assert top == 8 and ids["conv_init/kernel"] == 0 and ids["stage7_block1/dwconv/kernel"] == 7
  assert ids["conv_head/kernel"] == ids["bn_head/scale"] == ids["head/kernel"] == 8
