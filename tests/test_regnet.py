"""RegNetX/Y (models/regnet.py): presets, converters against the REAL torchvision and timm models, fine-tuning.

The references are torchvision's and timm's own RegNets with random weights
and perturbed BatchNorm statistics (pretrained/testing.py); their state dicts
go through `pretrained.convert` and our logits must match theirs within 1e-4
(float32). Depth-reduced RegNets built from each library's own design-space
parameters keep most checks fast; the 400MF models are checked at full size.
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
from vit_jax_ft import workdir as workdir_lib
from vit_jax_ft.inputs import normalization as normalization_lib
from vit_jax_ft.models import regnet
from vit_jax_ft.pretrained import architecture
from vit_jax_ft.pretrained import hf_export
from vit_jax_ft.pretrained import testing
from vit_jax_ft.reports import saliency
from vit_jax_ft.training import train

from test_pretrained_export import CLASSES, TrainState, _check_transformers_parity, _config  # pylint: disable=g-bad-import-order
from test_train import tiny_demo_config  # pylint: disable=g-bad-import-order
import family_helpers  # pylint: disable=g-bad-import-order

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")

ATOL = 1e-4
SIZE = 64
# torchvision's published parameter counts (its model pages) for 1000 classes.
PUBLISHED = {
    "regnetx_400mf": 5_495_976, "regnetx_800mf": 7_259_656, "regnetx_1_6gf": 9_190_136,
    "regnetx_3_2gf": 15_296_552, "regnetx_8gf": 39_572_648, "regnetx_16gf": 54_278_536,
    "regnetx_32gf": 107_811_560, "regnety_400mf": 4_344_144, "regnety_800mf": 6_432_512,
    "regnety_1_6gf": 11_202_430, "regnety_3_2gf": 19_436_338, "regnety_8gf": 39_381_472,
    "regnety_16gf": 83_590_140, "regnety_32gf": 145_046_770,
}
# timm's counts (its model cards) for its RegNets that torchvision lacks.
PUBLISHED_TIMM = {
    "regnetx_002": 2_684_792, "regnetx_004": 5_157_512, "regnetx_006": 6_196_040,
    "regnetx_040": 22_118_248, "regnetx_064": 26_209_256, "regnetx_120": 46_106_056,
    "regnety_002": 3_162_996, "regnety_006": 6_055_160, "regnety_008": 6_263_168,
    "regnety_040": 20_646_656, "regnety_064": 30_583_252, "regnety_080": 39_180_068,
    "regnety_120": 51_822_544,
}


def torchvision_name(name):
  return f"regnet_{name[6]}_{name[8:]}"  # regnety_400mf -> regnet_y_400mf


def test_every_preset_has_the_published_parameter_count():
  assert set(regnet.REGNET_PRESETS) == set(PUBLISHED) | set(PUBLISHED_TIMM)
  for name, expected in {**PUBLISHED, **PUBLISHED_TIMM}.items():
    model = regnet.RegNet(num_classes=1000, **regnet.regnet_preset(name))
    assert family_helpers.num_params(family_helpers.abstract_params(model)) == expected, name


@pytest.mark.parametrize("name", ["regnety_400mf", "regnety_1_6gf", "regnety_3_2gf",
                                  "regnety_16gf", "regnetx_400mf", "regnetx_8gf"])
def test_presets_are_torchvisions_networks(name):
  tv = getattr(torchvision.models, torchvision_name(name))()
  assert sum(p.numel() for p in tv.parameters()) == PUBLISHED[name]
  # Per stage: depth, width and group width as torchvision builds them.
  depths, widths, group_widths, se_ratio = regnet.REGNET_PRESETS[name]
  for stage, depth, width, group_width in zip(tv.trunk_output, depths, widths, group_widths):
    first = stage[0].f
    assert (len(stage), first.c[0].out_channels) == (depth, width)
    assert first.b[0].in_channels // first.b[0].groups == group_width
    assert hasattr(first, "se") == (se_ratio > 0)


def test_preset_errors_list_every_name():
  with pytest.raises(ValueError, match="regnety_16gf"):
    regnet.regnet_preset("regnety_64gf")
  with pytest.raises(ValueError, match="regnetx_400mf"):
    base_config.regnet_model_config("regnet_y_400mf")
  with pytest.raises(ValueError) as e:
    base_config.model_config("efficientnet_b9")
  for name in ["vit_b16", "resnet50", "resnext50_32x4d", *PUBLISHED]:
    assert name in str(e.value)
  config = base_config.vit_model_config("vit_b16")
  config.name = "regnet_y_400mf"
  with pytest.raises(ValueError) as e:
    models.create_model(config, 5, jnp.float32)
  for name in ["vit_b16", "resnet50", "resnext101_32x8d", *PUBLISHED]:
    assert name in str(e.value)


def _perturbed(model, seed=3):
  testing.perturb_torch_model(model, seed=seed)
  return model


def _assert_parity(label, torch_model, path, fmt, layer_impl="auto"):
  """Converts torch_model's saved state dict; our RegNet of the detected architecture matches it."""
  family_helpers.torch_save(torch_model.state_dict(), path)
  converted = pretrained.convert(str(path))
  meta = converted.metadata
  assert (meta["format"], meta["normalization"]) == (fmt, "imagenet")
  assert meta["model_options"] == {"bn_epsilon": 1e-5}
  assert meta["unused_source_keys"] == []
  arch = meta["architecture"]
  assert arch["family"] == "regnet"
  model = regnet.RegNet(num_classes=meta["num_classes_original"], layer_impl=layer_impl,
                        **{k: arch[k] for k in ("depths", "widths", "group_widths", "se_ratio",
                                                "bottleneck_ratio", "stem_width")},
                        **meta["model_options"])
  family_helpers.assert_parity(
      label, model, {"params": converted.params, "batch_stats": converted.batch_stats},
      torch_model, family_helpers.images(SIZE), ATOL)
  return meta


def _louder_head(model):
  """Scales the (narrow) tiny model's head up, so its logits are O(1-10) as a real model's."""
  head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
  with torch.no_grad():
    head.weight.mul_(30.0)
  return model


# Six blocks in four stages (1, 2, 2, 1) of widths 16, 24, 40, 64 in both libraries.
_TINY = {"depth": 6, "w0": 16, "wa": 8.0, "wm": 1.6, "group_width": 8}


def _tiny_torchvision(se_ratio, bottleneck=1.0):
  from torchvision.models import regnet as tv_regnet  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  params = tv_regnet.BlockParams.from_init_params(
      depth=_TINY["depth"], w_0=_TINY["w0"], w_a=_TINY["wa"], w_m=_TINY["wm"],
      group_width=_TINY["group_width"], bottleneck_multiplier=bottleneck, se_ratio=se_ratio)
  return _louder_head(_perturbed(tv_regnet.RegNet(params, num_classes=4, stem_width=16)))


def _tiny_timm(se_ratio):
  from timm.models import regnet as timm_regnet  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  cfg = timm_regnet.RegNetCfg(depth=_TINY["depth"], w0=_TINY["w0"], wa=_TINY["wa"],
                              wm=_TINY["wm"], group_size=_TINY["group_width"],
                              se_ratio=se_ratio, stem_width=16)
  return _louder_head(_perturbed(timm_regnet.RegNet(cfg, num_classes=4)))


@pytest.mark.parametrize("se_ratio", [0.0, 0.25], ids=["X", "Y"])
@pytest.mark.parametrize("layer_impl", ["project", "flax"])
def test_depth_reduced_torchvision_and_timm_regnets(se_ratio, layer_impl, tmp_path):
  meta = _assert_parity(f"torchvision tiny RegNet{'Y' if se_ratio else 'X'} {layer_impl}",
                        _tiny_torchvision(se_ratio), tmp_path / "tv.pth", "torchvision",
                        layer_impl)
  assert meta["architecture"]["name"] == "regnet"  # No preset has these sizes.
  assert meta["architecture"]["depths"] == [1, 2, 2, 1]
  _assert_parity(f"timm tiny RegNet{'Y' if se_ratio else 'X'} {layer_impl}",
                 _tiny_timm(se_ratio), tmp_path / "timm.safetensors", "timm", layer_impl)


def test_bottleneck_ratio_is_read_from_the_shapes(tmp_path):
  meta = _assert_parity("torchvision tiny RegNetY, bottleneck 0.5",
                        _tiny_torchvision(0.25, bottleneck=0.5), tmp_path / "b.pth",
                        "torchvision")
  assert meta["architecture"]["bottleneck_ratio"] == 0.5


@pytest.mark.parametrize("library, name, timm_name", [
    ("torchvision", "regnety_400mf", None), ("timm", "regnety_400mf", "regnety_004"),
    ("torchvision", "regnetx_400mf", None), ("timm", "regnetx_400mf", "regnetx_004_tv"),
    ("timm", "regnetx_004", "regnetx_004"),  # pycls' widths: not torchvision's 400MF.
])
def test_full_size_regnets_match_the_real_library(library, name, timm_name, tmp_path):
  torch.manual_seed(1)
  if library == "torchvision":
    torch_model = getattr(torchvision.models, torchvision_name(name))(num_classes=6)
    path = tmp_path / f"{torchvision_name(name)}.pth"
  else:
    torch_model = timm.create_model(timm_name, num_classes=6)
    path = tmp_path / f"{timm_name}.safetensors"
  meta = _assert_parity(f"{library} {name}", _perturbed(torch_model), path, library)
  assert meta["architecture"]["name"] == name
  pretrained.convert(str(path), model_name=name)  # --model=NAME accepts it.


@pytest.mark.parametrize("timm_name, name", [
    ("regnety_016", "regnety_1_6gf"), ("regnety_032", "regnety_3_2gf"),
    ("regnety_160", "regnety_16gf"), ("regnety_080_tv", "regnety_8gf"),
    ("regnety_080", "regnety_080"), ("regnety_040", "regnety_040"),
])
def test_timm_checkpoints_convert_strictly_to_their_preset(timm_name, name, tmp_path):
  # Names and shapes only (no forward): every tensor has a place, none is missing.
  torch.save(timm.create_model(timm_name).state_dict(), str(tmp_path / f"{timm_name}.pth"))
  meta = pretrained.convert(str(tmp_path / f"{timm_name}.pth"), model_name=name).metadata
  assert meta["num_classes_original"] == 1000


def test_timm_regnet_folder_and_unknown_tensors(tmp_path):
  sd = _tiny_timm(0.25).state_dict()
  folder = tmp_path / "regnety_tiny.pycls_in1k"
  folder.mkdir()
  family_helpers.torch_save(sd, folder / "model.safetensors")
  (folder / "config.json").write_text(json.dumps({
      "architecture": "regnety_004", "num_classes": 4,
      "pretrained_cfg": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}}))
  converted = pretrained.convert(str(folder))
  assert converted.metadata["format"] == "timm"
  assert converted.metadata["timm_architecture"] == "regnety_004"
  # RegNetZ-style extras (here a stray tensor) are refused by name unless strict=False.
  torch.save(dict(sd, **{"s1.b1.conv1.conv.bias": torch.zeros(3)}), str(tmp_path / "z.pth"))
  with pytest.raises(pretrained.ConversionError, match=r"s1\.b1\.conv1\.conv\.bias"):
    pretrained.convert(str(tmp_path / "z.pth"))
  # A missing tensor is named too.
  del sd["s2.b1.se.fc2.weight"]
  torch.save(sd, str(tmp_path / "short.pth"))
  with pytest.raises(pretrained.ConversionError, match="stage2_block1/se/fc2/kernel"):
    pretrained.convert(str(tmp_path / "short.pth"))


def _tiny_regnet(**kwargs):
  return regnet.RegNet(num_classes=3, depths=(1, 2), widths=(16, 32), group_widths=(8, 8),
                       se_ratio=0.25, stem_width=8, **kwargs)


def _variables(x):
  variables = flax.core.unfreeze(_tiny_regnet().init(jax.random.key(0), x, train=False))
  variables["params"]["head"]["kernel"] = jax.random.normal(jax.random.key(2), (32, 3))
  return variables


def test_layer_impls_bfloat16_and_remat_agree():
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  variables = _variables(x)
  assert (jax.tree.map(jnp.shape, variables) == jax.tree.map(
      jnp.shape, _tiny_regnet(layer_impl="flax").init(jax.random.key(0), x, train=False)))

  def loss_and_grads(model):
    def loss(params):
      logits, _ = model.apply({**variables, "params": params}, x, train=True,
                              mutable=["batch_stats"])
      return jnp.sum(logits ** 2), logits
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])

  (_, ref), ref_grads = loss_and_grads(_tiny_regnet(layer_impl="project"))
  for kwargs in ({"layer_impl": "flax"}, {"remat": True}):
    (_, out), grads = loss_and_grads(_tiny_regnet(**kwargs))
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):  # float32 rounding only
      np.testing.assert_allclose(a, b, atol=1e-5 * float(np.abs(b).max()), rtol=1e-4)
  assert np.abs(ref_grads["stage2_block1"]["se"]["fc1"]["kernel"]).max() > 0
  full = jax.jit(lambda v: _tiny_regnet().apply(v, x, train=False))(variables)
  for impl in ("project", "flax"):
    low = jax.jit(lambda v, m=_tiny_regnet(dtype=jnp.bfloat16, layer_impl=impl): m.apply(
        v, x, train=False))(variables)
    assert low.dtype == jnp.float32
    np.testing.assert_allclose(low, full, atol=0.05 * float(jnp.abs(full).max()))


def test_parameter_names_follow_the_resnet():
  params = family_helpers.abstract_params(
      regnet.RegNet(num_classes=10, **regnet.regnet_preset("regnety_400mf")))
  assert {"conv_init", "bn_init", "head"} < set(params)
  assert set(params["stage1_block1"]) == {"conv1", "bn1", "conv2", "bn2", "se", "conv3", "bn3",
                                          "proj_conv", "proj_bn"}
  assert "proj_conv" not in params["stage2_block2"]
  # SE width: a quarter of the block input (the stem's 32 for the first block, then 48).
  assert params["stage1_block1"]["se"]["fc1"]["kernel"].shape == (48, 8)
  assert params["stage2_block2"]["se"]["fc1"]["kernel"].shape == (104, 26)
  x_params = family_helpers.abstract_params(
      regnet.RegNet(num_classes=10, **regnet.regnet_preset("regnetx_400mf")))
  assert "se" not in x_params["stage1_block1"]


def test_create_model_from_regnet_and_resnet_configs():
  config = base_config.regnet_model_config("regnety_1_6gf")
  model = models.create_model(config, 7, jnp.bfloat16)
  assert isinstance(model, regnet.RegNet) and model.depths == (2, 6, 17, 2)
  assert architecture.from_model(model)["name"] == "regnety_1_6gf"
  assert saliency.last_block_name(model) == "stage4_block2"
  # A ResNet experiment config can switch to a RegNet by name ...
  config = base_config.resnet_model_config("resnet50")
  config.name = "regnetx_400mf"
  assert isinstance(models.create_model(config, 7, jnp.float32), regnet.RegNet)
  # ... unless it sets an option a RegNet does not have.
  config.variant = "v1"
  with pytest.raises(ValueError, match="no model.variant"):
    models.create_model(config, 7, jnp.float32)
  for name in ("regnety_400mf", "regnetx_32gf"):
    assert name in base_config.FIELD_DOCS["model.name"]


def test_finetune_from_a_torchvision_regnet_checkpoint(tmp_path):
  """Digits, from a converted torchvision regnet_x_400mf: strict load, options, explain, export."""
  torch.manual_seed(0)
  path = tmp_path / "regnet_x_400mf.pth"
  torch.save(_perturbed(torchvision.models.regnet_x_400mf()).state_dict(), str(path))
  config = tiny_demo_config(total_steps=2, **{"optimizer.warmup_steps": 1,
                                              "optimizer.lr": 1e-4,
                                              "eval_every_steps": 2, "batch_size": 8})
  config.model = base_config.regnet_model_config("regnetx_400mf")
  config.model.bn_epsilon = 1e-3  # The weights' own 1e-5 must win (init_model_options).
  config.init_from = str(path)
  config.init_cache_dir = str(tmp_path / "cache")
  config.data.normalization = "auto"
  workdir = tmp_path / "run"
  train.train_and_evaluate(config, str(workdir))
  record = json.loads((workdir / "pretrained.json").read_text())
  assert record["metadata"]["architecture"]["name"] == "regnetx_400mf"
  for row in ("missing from checkpoint", "unexpected in checkpoint", "shape mismatch"):
    assert re.search(rf"{row}\s+0\s+0", record["report"]), record["report"]
  run = workdir_lib.load_run(str(workdir))
  assert isinstance(run.model, regnet.RegNet)
  # Every backbone value: the 5,495,976 parameters less the 1000-class head, and BN statistics.
  shapes = jax.eval_shape(lambda: run.model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                                 train=False))
  loaded = re.search(r"loaded\s+\d+\s+([\d,]+)", record["report"])
  assert int(loaded[1].replace(",", "")) == (5_495_976 - (400 * 1000 + 1000)
                                             + family_helpers.num_params(shapes["batch_stats"]))
  run_config = workdir_lib.load_config(str(workdir))
  assert run_config.model.bn_epsilon == 1e-5
  assert run_config.data.normalization == "imagenet"
  hf_export.export_huggingface(str(workdir), str(tmp_path / "hf"))
  hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
  assert (hf_config["model_type"], hf_config["layer_type"]) == ("regnet", "x")
  # Grad-CAM on the last block (stage 4 of regnetx_400mf: 1x1 at 32 px, 2x2 at 64).
  written = explain.explain(str(workdir), str(tmp_path / "explain"), split="test", num_images=1)
  assert len(written) == 1 and os.path.getsize(written[0]) > 5000
  model = regnet.RegNet(num_classes=3, **regnet.regnet_preset("regnetx_400mf"))
  variables = model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False)
  _, maps = saliency.explain_batch(model, variables, np.ones((1, 64, 64, 3), np.float32))
  assert list(maps) == ["Grad-CAM (stage4)"] and maps["Grad-CAM (stage4)"].shape == (1, 2, 2)


def test_export_loads_in_transformers_and_converts_back(tmp_path):
  """A workdir holding a converted (perturbed, random) torchvision regnet_y_400mf with a 3-class head."""
  import optax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(2)
  torch.save(_perturbed(torchvision.models.regnet_y_400mf(num_classes=3)).state_dict(),
             str(tmp_path / "w.pth"))
  converted = pretrained.convert(str(tmp_path / "w.pth"))
  params, batch_stats = converted.params, converted.batch_stats
  config = _config(base_config.regnet_model_config("regnety_400mf"), SIZE)
  model = models.create_model(config.model, 3, jnp.float32)
  run = tmp_path / "run"
  (run / "data").mkdir(parents=True)
  (run / "config.json").write_text(config.to_json_best_effort(indent=2))
  (run / "data" / "dataset_info.json").write_text(json.dumps({"class_names": CLASSES,
                                                               "multilabel": False}))
  with ocp.CheckpointManager(str(run / "checkpoints")) as manager:
    manager.save(7, args=ocp.args.StandardSave(TrainState(
        step=jnp.asarray(7), params=params, batch_stats=batch_stats,
        opt_state=optax.adamw(1e-3).init(params), rng=jax.random.PRNGKey(1))))
    manager.wait_until_finished()
  out = str(tmp_path / "hf")
  hf_export.export_huggingface(str(tmp_path / "run"), out)
  _check_transformers_parity(model, params, batch_stats, out,
                             transformers.RegNetForImageClassification, SIZE, "imagenet")
  back = pretrained.convert(out)
  assert (back.metadata["format"], back.metadata["class_names"]) == ("huggingface", CLASSES)
  assert back.metadata["architecture"]["name"] == "regnety_400mf"
  for ours, theirs in ((params, back.params), (batch_stats, back.batch_stats)):
    for path, value in flax.traverse_util.flatten_dict(ours, sep="/").items():
      np.testing.assert_array_equal(flax.traverse_util.flatten_dict(theirs, sep="/")[path], value)


def test_export_refuses_what_transformers_cannot_express():
  model = regnet.RegNet(num_classes=3, **regnet.regnet_preset("regnetx_8gf"))
  with pytest.raises(hf_export.ExportError, match=r"one group width.*\[80, 120, 120, 120\]"):
    hf_export.regnet_config(model)
  with pytest.raises(hf_export.ExportError, match="epsilon 1e-5.*ViT, ResNet-18"):
    hf_export.regnet_config(model.clone(group_widths=(8,) * 4, bn_epsilon=1e-3))
  assert hf_export.regnet_config(model.clone(group_widths=(8,) * 4))["layer_type"] == "x"


def test_huggingface_regnet_folder_matches_transformers(tmp_path):
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  hf_model = transformers.RegNetForImageClassification(transformers.RegNetConfig(
      embedding_size=16, hidden_sizes=[16, 24, 40, 64], depths=[1, 2, 2, 1], groups_width=8,
      layer_type="y", num_labels=4))
  testing.perturb_torch_model(_louder_head(hf_model), seed=5)
  hf_model.save_pretrained(str(tmp_path / "hf"))
  converted = pretrained.convert(str(tmp_path / "hf"))
  arch = converted.metadata["architecture"]
  assert (arch["depths"], arch["widths"], arch["se_ratio"]) == ([1, 2, 2, 1], [16, 24, 40, 64], 0.25)
  model = regnet.RegNet(num_classes=4, **{k: arch[k] for k in (
      "depths", "widths", "group_widths", "se_ratio", "bottleneck_ratio", "stem_width")})
  x = normalization_lib.normalize(testing.photos(SIZE), "imagenet")
  logits = np.asarray(model.apply({"params": converted.params,
                                   "batch_stats": converted.batch_stats}, x, train=False))
  with torch.no_grad():
    ref = hf_model(testing.torch_nchw(x)).logits.numpy()
  testing.assert_logits_match("transformers tiny RegNetY", logits, ref, ATOL)


def test_mismatched_weights_name_the_preset_to_set():
  def arch(preset):
    return architecture.from_model(regnet.RegNet(num_classes=1, **regnet.regnet_preset(preset)))

  problems = architecture.mismatches(arch("regnetx_400mf"), arch("regnety_400mf"))
  assert problems and all("set model.name='regnetx_400mf'" in p for p in problems)
  resnet50 = architecture.from_model(models.resnet.ResNet(
      num_classes=1, **models.resnet.resnet_preset("resnet50")))
  assert architecture.mismatches(resnet50, arch("regnety_400mf")) == [
      "the weights are a resnet (resnet50 (block=bottleneck, stage_sizes=[3, 4, 6, 3], "
      "width=64)) but the model is a regnet: set model.name='resnet50'"]
  assert "group_widths=[8, 8, 8, 8], se_ratio=0.25" in architecture.describe(arch("regnety_400mf"))
