"""ConvNeXt: presets, and torchvision / timm / Hugging Face weights against the real libraries.

The references are PyPI torchvision's, timm's and transformers' ConvNeXts with
random weights, every LayerNorm's affine parameters and every layer scale
moved off their init (the init's 1e-6 layer scale would hide a dropped or
misplaced block), depth-reduced (one block per stage: every kind of tensor,
the downsampling included) at 64 px, plus a full-size convnext_tiny.
"""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax_ft import base_config
from vit_jax_ft import models
from vit_jax_ft import pretrained
from vit_jax_ft.models import convnext
from vit_jax_ft.pretrained import sources
from vit_jax_ft.pretrained import tensor_files
from vit_jax_ft.pretrained import testing
from vit_jax_ft.reports import saliency

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")
transformers = pytest.importorskip("transformers")
from torchvision.models import convnext as tv_convnext  # pylint: disable=g-import-not-at-top,wrong-import-position

import family_helpers  # pylint: disable=g-bad-import-order,wrong-import-position

ATOL = 1e-4
DEPTHS, DIMS = (1, 1, 1, 1), (16, 32, 48, 64)  # Every kind of block, downsampling included.


def _perturb(model, seed=0):
  """Random weights off init: LayerNorm affine (testing.perturb_torch_model) and layer scales."""
  testing.perturb_torch_model(model, seed=seed)
  gen = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if re.search(r"(gamma|layer_scale|layer_scale_parameter)$", name):
        p.copy_(0.5 + 0.2 * torch.randn(p.shape, generator=gen))
  return model.eval()


def _timm(depths=DEPTHS, dims=DIMS, num_classes=7, seed=0):
  from timm.models.convnext import ConvNeXt  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  return _perturb(ConvNeXt(depths=depths, dims=dims, num_classes=num_classes), seed)


def _torchvision(depths=DEPTHS, dims=DIMS, num_classes=7, seed=0):
  torch.manual_seed(seed)
  setting = [tv_convnext.CNBlockConfig(d, dims[i + 1] if i + 1 < len(dims) else None, n)
             for i, (d, n) in enumerate(zip(dims, depths))]
  return _perturb(tv_convnext.ConvNeXt(setting, num_classes=num_classes), seed)


def _hf(depths=DEPTHS, dims=DIMS, num_classes=7, seed=0):
  torch.manual_seed(seed)
  config = transformers.ConvNextConfig(depths=list(depths), hidden_sizes=list(dims),
                                       num_labels=num_classes)
  return _perturb(transformers.ConvNextForImageClassification(config), seed)


def _ours(converted, num_classes, **kw):
  arch = converted.metadata["architecture"]
  return convnext.ConvNeXt(num_classes=num_classes, depths=tuple(arch["depths"]),
                           dims=tuple(arch["dims"]), **converted.metadata["model_options"], **kw)


def _assert_parity(label, converted, num_classes, reference, size=64):
  family_helpers.assert_parity(label, _ours(converted, num_classes), {"params": converted.params},
                               reference, family_helpers.images(size), ATOL)


@pytest.mark.parametrize("name", sorted(convnext.CONVNEXT_PRESETS))
def test_preset_parameter_counts_match_timm_and_torchvision(name):
  expected = sum(p.numel() for p in timm.create_model(
      name, pretrained=False, num_classes=1000, device="meta").parameters())
  with torch.device("meta"):
    assert sum(p.numel() for p in getattr(torchvision.models, name)().parameters()) == expected
  if name == "convnext_tiny":
    assert expected == 28_589_128  # The published figure.
  shapes = jax.eval_shape(lambda: convnext.ConvNeXt(
      num_classes=1000, **convnext.convnext_preset(name)).init(
          jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False))
  assert list(shapes) == ["params"]  # LayerNorm: no batch statistics.
  assert family_helpers.num_params(shapes) == expected


@pytest.mark.parametrize("library,ext", [("torchvision", ".pth"), ("timm", ".safetensors"),
                                         ("timm", ".pth")])
def test_state_dicts_match_the_real_library(tmp_path, library, ext):
  reference = {"torchvision": _torchvision, "timm": _timm}[library]()
  path = family_helpers.save_state_dict(reference, tmp_path / f"convnext{ext}")
  converted = sources.convert(path)
  meta = converted.metadata
  assert (meta["format"], meta["origin"]) == (library, library)
  assert meta["architecture"] == {"family": "convnext", "depths": list(DEPTHS),
                                  "dims": list(DIMS), "name": "convnext"}
  assert meta["normalization"] == "imagenet" and meta["unused_source_keys"] == []
  assert meta["model_options"] == {"head_norm_eps": 1e-6} and meta["num_classes_original"] == 7
  _assert_parity(f"{library} {ext} ConvNeXt", converted, 7, reference)


def test_original_facebook_checkpoint_reads_as_timm_does(tmp_path):
  # facebookresearch/ConvNeXt names, written by inverting timm's checkpoint_filter_fn.
  reference = _timm()
  fb = {}
  for k, v in reference.state_dict().items():
    k = k.replace("stem.", "downsample_layers.0.").replace("conv_dw", "dwconv")
    k = k.replace("mlp.fc", "pwconv").replace("head.fc.", "head.").replace("head.norm.", "norm.")
    k = re.sub(r"stages\.(\d+)\.downsample\.", r"downsample_layers.\1.", k)
    fb[re.sub(r"stages\.(\d+)\.blocks\.(\d+)\.", r"stages.\1.\2.", k)] = v
  from timm.models.convnext import checkpoint_filter_fn  # pylint: disable=g-import-not-at-top
  assert checkpoint_filter_fn(dict(fb), reference).keys() == reference.state_dict().keys()
  path = str(tmp_path / "convnext_tiny_1k_224_ema.pth")
  torch.save({"model": fb}, path)
  converted = sources.convert(path)
  _assert_parity("FB ConvNeXt", converted, 7, reference)


def test_huggingface_folder_matches_transformers(tmp_path):
  reference = _hf()
  folder = tmp_path / "hf"
  reference.save_pretrained(str(folder))
  converted = sources.convert(str(folder))
  meta = converted.metadata
  assert meta["format"] == "huggingface" and meta["architecture"]["depths"] == list(DEPTHS)
  assert meta["model_options"] == {"head_norm_eps": 1e-12}  # HF's layer_norm_eps default.
  assert meta["class_names"] == [f"LABEL_{i}" for i in range(7)]
  _assert_parity("HF ConvNext", converted, 7, reference)
  # config.json that disagrees with the weights is refused.
  config = json.loads((folder / "config.json").read_text())
  config["depths"] = [2, 1, 1, 1]
  (folder / "config.json").write_text(json.dumps(config))
  with pytest.raises(pretrained.ConversionError, match="depths"):
    sources.convert(str(folder))


def test_full_size_convnext_tiny_matches_torchvision(tmp_path):
  torch.manual_seed(0)
  reference = _perturb(torchvision.models.convnext_tiny())
  path = family_helpers.save_state_dict(reference, tmp_path / "convnext_tiny-983f1562.pth")
  converted = sources.convert(path, model_name="convnext_tiny")
  assert converted.metadata["num_classes_original"] == 1000
  _assert_parity("torchvision convnext_tiny", converted, 1000, reference, 64)


def test_strict_load_report_loads_every_backbone_tensor(tmp_path):
  path = family_helpers.save_state_dict(_timm(), tmp_path / "model.safetensors")
  model = convnext.ConvNeXt(num_classes=3, depths=DEPTHS, dims=DIMS)
  params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)["params"]
  report = family_helpers.assert_strict_load_loads_the_backbone(
      path, model, params, {}, str(tmp_path / "cache")).report
  assert sorted(p for p, _ in report.skipped_head) == ["params/head/bias", "params/head/kernel"]
  wide = convnext.ConvNeXt(num_classes=3, depths=DEPTHS, dims=(16, 32, 48, 96))
  wide_params = wide.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)["params"]
  with pytest.raises(pretrained.PretrainedMismatchError, match="model.dims"):
    pretrained.load_for_finetuning(path, wide, wide_params, {}, image_size=32,
                                   cache_dir=str(tmp_path / "cache"))
  with pytest.raises(pretrained.PretrainedMismatchError, match="model.head_norm_eps"):
    pretrained.load_for_finetuning(path, model.clone(head_norm_eps=1e-12), params, {},
                                   image_size=32, cache_dir=str(tmp_path / "cache"))


def test_truncated_state_dict_names_the_missing_tensors(tmp_path):
  state = {k: v.numpy() for k, v in _timm().state_dict().items()}
  del state["stages.2.blocks.0.gamma"]
  path = str(tmp_path / "model.safetensors")
  tensor_files.write_safetensors(path, state)
  with pytest.raises(pretrained.ConversionError, match=r"stage3_block1/gamma"):
    sources.convert(path)


def test_bfloat16_runs_with_float32_layer_norm_statistics():
  model = convnext.ConvNeXt(num_classes=4, depths=DEPTHS, dims=DIMS, head_init="lecun_normal")
  x = jnp.asarray(family_helpers.images(32))
  params = model.init(jax.random.key(0), x, train=False)["params"]
  params = jax.tree_util.tree_map_with_path(  # Layer scales that let the blocks count.
      lambda p, v: jnp.full_like(v, 0.5) if p[-1].key == "gamma" else v, params)
  family_helpers.assert_bfloat16_close_to_float32(model, {"params": params}, x)
  # Channels on a large offset (exact in bfloat16: 256, 258, ..., 286), whose variance
  # E[x^2] - E[x]^2 in bfloat16 would be lost to rounding, still normalise.
  norm = convnext.ChannelLayerNorm(dtype=jnp.bfloat16)
  x = jnp.tile(256.0 + 2.0 * jnp.arange(16.0), (1, 2, 2, 1)).astype(jnp.bfloat16)
  y = norm.apply(norm.init(jax.random.key(0), x), x).astype(jnp.float32)
  assert abs(float(jnp.mean(y))) < 0.05 and abs(float(jnp.std(y)) - 1.0) < 0.05


def test_drop_path_and_remat():
  model = convnext.ConvNeXt(num_classes=3, depths=DEPTHS, dims=DIMS, drop_path_rate=0.5,
                            head_init="lecun_normal")
  x = jnp.asarray(family_helpers.images(32))
  params = model.init(jax.random.key(0), x, train=False)["params"]
  params = jax.tree_util.tree_map_with_path(
      lambda p, v: jnp.full_like(v, 0.5) if p[-1].key == "gamma" else v, params)
  run = lambda m, seed: np.asarray(m.apply({"params": params}, x, train=True,
                                           rngs={"dropout": jax.random.key(seed)}))
  outs = [run(model, seed) for seed in range(6)]  # Branches dropped at random, per seed.
  assert any(not np.allclose(outs[0], out) for out in outs[1:])
  np.testing.assert_allclose(run(model.clone(remat=True), 0), run(model, 0), atol=1e-5)
  evaluate = np.asarray(model.apply({"params": params}, x, train=False))
  np.testing.assert_allclose(np.asarray(model.clone(drop_path_rate=0.0).apply(
      {"params": params}, x, train=False)), evaluate, atol=0)


def test_create_model_builds_convnext_from_the_config():
  model = models.create_model(base_config.model_config("convnext_tiny"), 10, jnp.float32)
  assert isinstance(model, convnext.ConvNeXt) and tuple(model.depths) == (3, 3, 9, 3)
  assert tuple(model.dims) == (96, 192, 384, 768) and model.head_norm_eps == 1e-6
  custom = base_config.convnext_model_config("convnext")
  with pytest.raises(ValueError, match="model.depths"):
    models.create_model(custom, 10, jnp.float32)
  custom.depths, custom.dims = DEPTHS, DIMS
  assert tuple(models.create_model(custom, 10, jnp.float32).dims) == DIMS
  wrong = base_config.resnet_model_config("resnet50")
  wrong.name = "convnext_small"
  with pytest.raises(ValueError, match="convnext_model_config"):
    models.create_model(wrong, 10, jnp.float32)
  wrong.name = "convnext_huge"
  with pytest.raises(ValueError, match="Unknown model.name .convnext_huge.") as e:
    models.create_model(wrong, 10, jnp.float32)
  for name in ("vit_b16", "resnet50", "bit_r50x1", "convnext_tiny", "convnext_base", "convnext"):
    assert name in str(e.value)
  with pytest.raises(ValueError, match="Unknown model.name .convnext_huge.") as e:
    base_config.model_config("convnext_huge")
  for name in ("vit_b16", "resnet50", "bit_r50x1", "convnext_tiny", "convnext"):
    assert name in str(e.value)


def test_grad_cam_uses_the_last_block():
  model = convnext.ConvNeXt(num_classes=3, depths=(1, 1, 2, 2), dims=DIMS,
                            head_init="lecun_normal")
  assert saliency.last_block_name(model) == "stage4_block2"
  x = jnp.asarray(family_helpers.images(64))
  variables = model.init(jax.random.key(0), x, train=False)
  logits, maps = saliency.explain_batch(model, variables, x)
  (name, cam), = maps.items()
  assert name == "Grad-CAM (stage4)" and cam.shape == (2, 2, 2)  # 64 px / 32.
  assert np.isfinite(cam).all() and logits.shape == (2, 3)


def test_layer_decay_groups_convnext_by_stage():
  from vit_jax_ft.training import optim  # pylint: disable=g-import-not-at-top
  model = convnext.ConvNeXt(num_classes=3, depths=DEPTHS, dims=DIMS)
  params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)["params"]
  paths = list(pretrained.conversion.flatten(params))
  ids, top = optim.layer_ids(paths)
  assert top == 5
  assert ids["conv_init/kernel"] == ids["norm_init/scale"] == 0
  assert ids["stage2_block1/downsample_conv/kernel"] == ids["stage2_block1/gamma"] == 2
  assert ids["norm_pre_head/scale"] == ids["head/kernel"] == 5


def test_export_huggingface_round_trips_through_transformers(tmp_path):
  from test_pretrained_export import _check_transformers_parity, _config, _make_workdir  # pylint: disable=g-import-not-at-top
  model_config = base_config.convnext_model_config("convnext")
  model_config.depths, model_config.dims = DEPTHS, DIMS
  config = _config(model_config, 64)
  workdir = tmp_path / "run"
  model, params, _ = _make_workdir(workdir, config, 64, seed=2)
  out = str(tmp_path / "hf")
  from vit_jax_ft.pretrained import hf_export  # pylint: disable=g-import-not-at-top
  hf_export.export_huggingface(str(workdir), out)
  _check_transformers_parity(model, params, {}, out,
                             transformers.ConvNextForImageClassification, 64, "imagenet")
  back = pretrained.convert(out)
  for path, value in pretrained.conversion.flatten(params).items():
    np.testing.assert_array_equal(pretrained.conversion.flatten(back.params)[path], value)


def test_finetune_through_train_from_a_timm_checkpoint(tmp_path):
  from vit_jax_ft.training import train  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  from test_train import tiny_demo_config  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  path = family_helpers.save_state_dict(_timm(), tmp_path / "convnext_tiny.safetensors")
  config = tiny_demo_config(total_steps=2, **{"optimizer.warmup_steps": 1})
  config.model = base_config.convnext_model_config("convnext")
  config.model.depths, config.model.dims = DEPTHS, DIMS
  config.model.head_norm_eps = 1e-3  # Not the weights' 1e-6: init_model_options must fix it.
  config.init_from = path
  config.data.normalization = "auto"
  config.init_cache_dir = str(tmp_path / "cache")
  workdir = tmp_path / "run"
  train.train_and_evaluate(config, str(workdir))
  with open(workdir / "pretrained.json") as f:
    record = json.load(f)
  assert record["metadata"]["format"] == "timm"
  assert re.search(r"missing from checkpoint\s+0\s", record["report"]), record["report"]
  assert re.search(r"original head \(not loaded\)\s+2\s", record["report"]), record["report"]
  with open(workdir / "config.json") as f:
    run = json.load(f)
  assert run["data"]["normalization"] == "imagenet"
  assert run["model"]["head_norm_eps"] == 1e-6
