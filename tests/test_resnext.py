"""ResNeXt (grouped 3x3 convs in models/resnet.py) and the ResNet converters against the REAL libraries.

torchvision's and timm's own models (random weights, perturbed BatchNorm
statistics: pretrained/testing.py) are the references: their state dicts go
through `pretrained.convert` and our logits must match theirs within 1e-4
(float32). 64 px images keep the full-size models fast.
"""

import json
import os
import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax_ft import base_config
from vit_jax_ft import explain
from vit_jax_ft import models
from vit_jax_ft import pretrained
from vit_jax_ft.models import layer_impl
from vit_jax_ft.models import resnet
from vit_jax_ft.pretrained import architecture
from vit_jax_ft.pretrained import hf_export
from vit_jax_ft.pretrained import testing
from vit_jax_ft.reports import saliency
from vit_jax_ft.training import train

from test_train import tiny_demo_config  # pylint: disable=g-bad-import-order
import family_helpers  # pylint: disable=g-bad-import-order

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")

ATOL = 1e-4
SIZE = 64


@pytest.mark.parametrize("name, expected", [
    ("resnext50_32x4d", 25_028_904),
    ("resnext101_32x8d", 88_791_336),
    ("resnext101_64x4d", 83_455_272),
])
def test_resnext_param_counts_are_the_published_ones(name, expected):
  model = resnet.ResNet(num_classes=1000, **resnet.resnet_preset(name))
  assert family_helpers.num_params(family_helpers.abstract_params(model)) == expected
  # ... which are torchvision's (the figures on its model pages).
  assert sum(p.numel() for p in getattr(torchvision.models, name)().parameters()) == expected


def test_resnext_kernels_are_grouped():
  params = family_helpers.abstract_params(
      resnet.ResNet(num_classes=10, **resnet.resnet_preset("resnext50_32x4d")))
  # Stage 1: 32 groups of 4 channels; stage 4: 32 groups of 32 (inner width 1024).
  assert params["stage1_block1"]["conv2"]["kernel"].shape == (3, 3, 4, 128)
  assert params["stage4_block1"]["conv2"]["kernel"].shape == (3, 3, 32, 1024)
  assert params["stage4_block3"]["conv3"]["kernel"].shape == (1, 1, 1024, 2048)
  assert resnet.resnet_preset("resnet50") == {"block": "bottleneck", "stage_sizes": (3, 4, 6, 3)}
  with pytest.raises(ValueError, match="resnext101_64x4d"):
    resnet.resnet_preset("resnext200")
  with pytest.raises(ValueError, match="groups"):
    jax.eval_shape(lambda: resnet.ResNet(num_classes=2, block="basic", stage_sizes=(1,),
                                         groups=2).init(jax.random.key(0),
                                                        jnp.zeros((1, 32, 32, 3)), train=False))


def _perturbed(model, seed):
  torch.manual_seed(seed)
  testing.perturb_torch_model(model, seed=seed)
  return model


def _parity(label, torch_model, path, preset, num_classes):
  """Saves torch_model's state dict, converts it and compares logits on two photos."""
  family_helpers.torch_save(torch_model.state_dict(), path)
  converted = pretrained.convert(str(path), model_name=preset)
  meta = converted.metadata
  assert meta["model_options"] == {"variant": "v1.5", "conv_bias": False, "bn_epsilon": 1e-5}
  assert meta["normalization"] == "imagenet"
  model = resnet.ResNet(num_classes=num_classes, **resnet.resnet_preset(preset),
                        **meta["model_options"])
  family_helpers.assert_parity(
      label, model, {"params": converted.params, "batch_stats": converted.batch_stats},
      torch_model, family_helpers.images(SIZE), ATOL)
  return converted


@pytest.mark.parametrize("library, name", [
    ("torchvision", "resnet18"), ("torchvision", "resnet50"),
    ("timm", "resnet18"), ("timm", "resnet50"),
    ("torchvision", "resnext50_32x4d"), ("timm", "resnext50_32x4d"),
])
def test_converted_weights_match_the_real_library(library, name, tmp_path):
  if library == "torchvision":
    torch_model = getattr(torchvision.models, name)(num_classes=5)
    path = tmp_path / f"{name}.pth"
  else:
    torch_model = timm.create_model(name, num_classes=5)
    path = tmp_path / f"{name}.safetensors"
  converted = _parity(f"{library} {name}", _perturbed(torch_model, 3), path, name, 5)
  arch = converted.metadata["architecture"]
  assert arch["name"] == name
  assert (arch["groups"], arch["width_per_group"]) == ((32, 4) if "resnext" in name else (1, 64))


def test_timm_resnext101_64x4d_pth_is_detected(tmp_path):
  # Shapes only (no forward): the 64x4d variant's kernels say 64 groups of 4.
  sd = timm.create_model("resnext101_64x4d", num_classes=3).state_dict()
  torch.save(sd, str(tmp_path / "resnext101_64x4d.pth"))
  meta = pretrained.convert(str(tmp_path / "resnext101_64x4d.pth")).metadata
  assert meta["architecture"]["name"] == "resnext101_64x4d"
  assert "groups=64, width_per_group=4" in architecture.describe(meta["architecture"])


def _tiny_resnext(**kwargs):
  return resnet.ResNet(num_classes=3, block="bottleneck", stage_sizes=(1, 1), width=16,
                       groups=4, width_per_group=8, **kwargs)


def test_grouped_conv_gives_the_same_numbers_in_both_layer_impls():
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  project, flax_model = _tiny_resnext(layer_impl="project"), _tiny_resnext(layer_impl="flax")
  variables = project.init(jax.random.key(0), x, train=False)
  assert (jax.tree.map(jnp.shape, variables)
          == jax.tree.map(jnp.shape, flax_model.init(jax.random.key(0), x, train=False)))
  # Nudge the head off zero so that gradients reach the trunk.
  variables = flax.core.unfreeze(variables)
  variables["params"]["head"]["kernel"] = jax.random.normal(jax.random.key(2), (128, 3))

  def loss(params, model):
    logits, _ = model.apply({**variables, "params": params}, x, train=True,
                            mutable=["batch_stats"])
    return jnp.sum(logits ** 2), logits

  grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
  (_, out1), g1 = grad_fn(variables["params"], project)
  (_, out2), g2 = grad_fn(variables["params"], flax_model)
  np.testing.assert_allclose(out1, out2, atol=1e-5, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):  # float32 rounding only
    np.testing.assert_allclose(a, b, atol=1e-5 * float(np.abs(b).max()), rtol=1e-4)
  assert np.abs(g1["stage1_block1"]["conv2"]["kernel"]).max() > 0


def test_bfloat16_and_remat():
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  variables = _tiny_resnext().init(jax.random.key(0), x, train=False)
  variables = flax.core.unfreeze(variables)
  variables["params"]["head"]["kernel"] = jax.random.normal(jax.random.key(2), (128, 3))
  ref = _tiny_resnext().apply(variables, x, train=False)
  for impl in ("project", "flax"):
    low = _tiny_resnext(dtype=jnp.bfloat16, layer_impl=impl).apply(variables, x, train=False)
    assert low.dtype == jnp.float32  # The head runs in float32.
    np.testing.assert_allclose(low, ref, atol=0.05 * float(jnp.abs(ref).max()))

  def grads(model):
    return jax.jit(jax.grad(lambda p: jnp.sum(model.apply({**variables, "params": p}, x, train=True,
                                                  mutable=["batch_stats"])[0] ** 2)))(
                                                      variables["params"])

  for a, b in zip(jax.tree.leaves(grads(_tiny_resnext())),
                  jax.tree.leaves(grads(_tiny_resnext(remat=True)))):
    np.testing.assert_allclose(a, b, atol=1e-5 * float(np.abs(b).max()), rtol=1e-5)


def test_create_model_and_config():
  config = base_config.resnet_model_config("resnext50_32x4d")
  model = models.create_model(config, 7, jnp.float32)
  assert (model.groups, model.width_per_group) == (32, 4)
  assert architecture.from_model(model)["name"] == "resnext50_32x4d"
  assert "resnext101_32x8d" in base_config.FIELD_DOCS["model.name"]
  assert saliency.last_block_name(model) == "stage4_block3"


def test_resnet_weights_into_a_resnext_name_the_preset_to_use():
  weights = architecture.from_model(resnet.ResNet(num_classes=1, **resnet.resnet_preset("resnet50")))
  model = architecture.from_model(
      resnet.ResNet(num_classes=1, **resnet.resnet_preset("resnext50_32x4d")))
  problems = architecture.mismatches(weights, model)
  assert problems and all("set model.name='resnet50'" in p for p in problems)
  assert any(p.startswith("groups: weights have 1, model has 32") for p in problems)


def test_layer_impls_resolve_for_grouped_convs_on_every_backend():
  # 'auto' picks the project's Conv on CPU and nn.Conv elsewhere: both take feature_group_count.
  for backend in ("cpu", "gpu"):
    conv = layer_impl.resolve("auto", backend).conv_module()
    params = conv(8, (3, 3), feature_group_count=4).init(jax.random.key(0),
                                                          jnp.zeros((1, 5, 5, 8)))
    assert params["params"]["kernel"].shape == (3, 3, 2, 8)


def test_finetune_from_a_torchvision_resnext_checkpoint(tmp_path):
  """Digits from a converted torchvision resnext50_32x4d: strict load, Grad-CAM, export refused."""
  torch.manual_seed(0)
  path = tmp_path / "resnext50_32x4d.pth"
  torch.save(_perturbed(torchvision.models.resnext50_32x4d(), 1).state_dict(), str(path))
  config = tiny_demo_config(total_steps=2, **{"optimizer.warmup_steps": 1, "optimizer.lr": 1e-4,
                                              "eval_every_steps": 2, "batch_size": 8,
                                              "dtype": "bfloat16"})
  config.model = base_config.resnet_model_config("resnext50_32x4d")
  config.init_from = str(path)
  config.init_cache_dir = str(tmp_path / "cache")
  config.data.normalization = "auto"
  workdir = tmp_path / "run"
  train.train_and_evaluate(config, str(workdir))
  record = json.loads((workdir / "pretrained.json").read_text())
  assert record["metadata"]["architecture"]["name"] == "resnext50_32x4d"
  for row in ("missing from checkpoint", "unexpected in checkpoint", "shape mismatch"):
    assert re.search(rf"{row}\s+0\s+0", record["report"]), record["report"]
  # Every backbone value: 25,028,904 parameters less the 2048 x 1000 head, and BN statistics.
  model = resnet.ResNet(num_classes=10, **resnet.resnet_preset("resnext50_32x4d"))
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                             train=False))
  loaded = re.search(r"loaded\s+\d+\s+([\d,]+)", record["report"])
  assert int(loaded[1].replace(",", "")) == (25_028_904 - 2_049_000
                                             + family_helpers.num_params(shapes["batch_stats"]))
  written = explain.explain(str(workdir), str(tmp_path / "explain"), split="test", num_images=1)
  assert len(written) == 1 and os.path.getsize(written[0]) > 5000
  with pytest.raises(hf_export.ExportError, match="no ResNeXt.*groups=32"):
    hf_export.export_huggingface(str(workdir), str(tmp_path / "hf"))


@pytest.mark.parametrize("shape,groups,k,stride,padding", [
    ((2, 15, 17, 32), 4, 3, 1, "SAME"),
    ((2, 15, 17, 32), 8, 3, 2, ((1, 1), (1, 1))),
    ((2, 14, 14, 48), 3, 3, 2, "SAME"),
    ((2, 9, 9, 16), 2, 1, 1, "VALID"),
])
def test_grouped_conv_as_windows_equals_lax(shape, groups, k, stride, padding):
  """The project's grouped conv (shifted windows x per-group matmul) is lax's grouped conv."""
  from vit_jax_ft.models import precision  # pylint: disable=g-import-not-at-top
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  w = jax.random.normal(jax.random.PRNGKey(1), (k, k, shape[-1] // groups, 24))
  ref = jax.lax.conv_general_dilated(x, w, (stride, stride), padding,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     feature_group_count=groups)
  got = precision._grouped_conv(x, w, (stride, stride), padding, groups)  # pylint: disable=protected-access
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-4, rtol=1e-5)
