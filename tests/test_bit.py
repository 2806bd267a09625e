"""BiT ResNet v2: presets, the released .npz layout and timm state dicts against timm's ResNetV2.

The reference is timm's `ResNetV2` (PyPI timm, random weights with GroupNorm
affine parameters moved off their init). BiT `.npz` files are written here
from a timm model by inverting timm's own npz loader (`resnetv2._load_weights`,
which reads the layout of the released `BiT-M-R50x1.npz`), and that loader,
run on the written file, must rebuild the model exactly: so the file is the
real layout, not one this project made up.
"""

import functools
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax_ft import base_config
from vit_jax_ft import models
from vit_jax_ft import pretrained
from vit_jax_ft.models import bit
from vit_jax_ft.pretrained import sources

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
from timm.layers import StdConv2d  # pylint: disable=g-import-not-at-top,wrong-import-position
from timm.models import resnetv2  # pylint: disable=g-import-not-at-top,wrong-import-position

import family_helpers  # pylint: disable=g-bad-import-order,wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ATOL = 1e-4
TINY = (1, 1, 1, 1)  # One unit per stage: every kind of unit, projection and stride.


def _perturb(model, seed):
  """Noise on every weight, GroupNorm affine parameters off init (no BatchNorm to calibrate)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    for m in model.modules():
      if isinstance(m, torch.nn.GroupNorm):
        m.weight.copy_(1.0 + 0.2 * torch.randn(m.weight.shape, generator=gen))
        m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=gen))
  return model.eval()


def _timm_bit(layers, width_factor=1, num_classes=7, ws_epsilon=1e-8, seed=0):
  """timm's BiT ResNetV2 (as `_create_resnetv2_bit` builds it), random and perturbed."""
  torch.manual_seed(seed)
  model = resnetv2.ResNetV2(layers=list(layers), width_factor=width_factor,
                            num_classes=num_classes, stem_type="fixed",
                            conv_layer=functools.partial(StdConv2d, eps=ws_epsilon))
  return _perturb(model, seed + 1)


def bit_npz_from_timm(model) -> dict:
  """The BiT .npz tensors of a timm ResNetV2: timm's `_load_weights` mapping, inverted."""
  sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  hwio = lambda w: np.transpose(w, (2, 3, 1, 0))
  out = {"resnet/root_block/standardized_conv2d/kernel": hwio(sd["stem.conv.weight"]),
         "resnet/group_norm/gamma": sd["norm.weight"], "resnet/group_norm/beta": sd["norm.bias"],
         "resnet/head/conv2d/kernel": hwio(sd["head.fc.weight"]),
         "resnet/head/conv2d/bias": sd["head.fc.bias"]}
  for name, value in sd.items():
    m = re.fullmatch(r"stages\.(\d+)\.blocks\.(\d+)\.(.*)", name)
    if not m:
      continue
    unit = f"resnet/block{int(m[1]) + 1}/unit{int(m[2]) + 1:02d}/"
    part = m[3]
    if part == "downsample.conv.weight":
      out[unit + "a/proj/standardized_conv2d/kernel"] = hwio(value)
      continue
    kind, index, leaf = re.fullmatch(r"(conv|norm)([123])\.(weight|bias)", part).groups()
    letter = "abc"[int(index) - 1]
    if kind == "conv":
      out[unit + f"{letter}/standardized_conv2d/kernel"] = hwio(value)
    else:
      out[unit + f"{letter}/group_norm/" + {"weight": "gamma", "bias": "beta"}[leaf]] = value
  return out


def _write_npz(model, path) -> str:
  np.savez(path, **bit_npz_from_timm(model))
  return str(path)


def _ours(converted, num_classes, **kw):
  arch = converted.metadata["architecture"]
  return bit.BiT(num_classes=num_classes, stage_sizes=tuple(arch["stage_sizes"]),
                 width_factor=arch["width_factor"], **converted.metadata["model_options"], **kw)


def _images(size=64):
  return family_helpers.images(size, "minus_one_to_one")


@pytest.mark.parametrize("name,timm_name", [
    ("bit_r50x1", "resnetv2_50x1_bit"), ("bit_r50x3", "resnetv2_50x3_bit"),
    ("bit_r101x1", "resnetv2_101x1_bit"), ("bit_r101x3", "resnetv2_101x3_bit"),
    ("bit_r152x2", "resnetv2_152x2_bit"), ("bit_r152x4", "resnetv2_152x4_bit")])
def test_preset_parameter_counts_match_timm(name, timm_name):
  reference = timm.create_model(timm_name, pretrained=False, num_classes=1000, device="meta")
  expected = sum(p.numel() for p in reference.parameters())
  shapes = jax.eval_shape(lambda: bit.BiT(num_classes=1000, **bit.bit_preset(name)).init(
      jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False))
  assert list(shapes) == ["params"]  # GroupNorm: no batch statistics.
  assert family_helpers.num_params(shapes) == expected


@pytest.mark.parametrize("layers", [TINY, (3, 4, 6, 3)], ids=["tiny", "r50x1"])
def test_bit_npz_matches_timm(tmp_path, layers):
  reference = _timm_bit(layers, ws_epsilon=1e-10)  # BiT's own epsilon, as the npz records.
  path = _write_npz(reference, tmp_path / "BiT-M-R50x1.npz")
  # timm's own npz loader rebuilds the model from the file: it is the released layout.
  fresh = _timm_bit(layers, ws_epsilon=1e-10, seed=5)
  with torch.no_grad():
    resnetv2._load_weights(fresh, path)
  for key, value in reference.state_dict().items():
    torch.testing.assert_close(fresh.state_dict()[key], value, rtol=0, atol=0, msg=key)

  converted = sources.convert(path)
  meta = converted.metadata
  assert meta["format"] == "bit_npz" and meta["origin"].startswith("BiT (Big Transfer")
  assert meta["normalization"] == "minus_one_to_one"
  assert meta["model_options"] == {"ws_epsilon": 1e-10}
  assert meta["architecture"]["stage_sizes"] == list(layers)
  assert meta["architecture"]["name"] == ("bit_r50x1" if layers == (3, 4, 6, 3) else "bit")
  assert meta["num_classes_original"] == 7 and meta["unused_source_keys"] == []
  family_helpers.assert_parity(f"BiT npz {layers}", _ours(converted, 7),
                               {"params": converted.params}, reference, _images(), ATOL)


def test_timm_resnetv2_50x1_bit_state_dict_matches_timm(tmp_path):
  reference = _perturb(timm.create_model("resnetv2_50x1_bit", pretrained=False, num_classes=5), 3)
  path = family_helpers.save_state_dict(reference, tmp_path / "model.safetensors")
  converted = sources.convert(path)
  meta = converted.metadata
  assert (meta["format"], meta["architecture"]["name"]) == ("timm", "bit_r50x1")
  assert meta["model_options"] == {"ws_epsilon": 1e-8}
  assert meta["normalization"] == "minus_one_to_one"
  family_helpers.assert_parity("timm resnetv2_50x1_bit", _ours(converted, 5),
                               {"params": converted.params}, reference, _images(), ATOL)


def test_strict_load_report_loads_every_backbone_tensor(tmp_path):
  path = _write_npz(_timm_bit(TINY), tmp_path / "BiT-S-tiny.npz")
  model = bit.BiT(num_classes=3, stage_sizes=TINY)
  params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)["params"]
  report = family_helpers.assert_strict_load_loads_the_backbone(
      path, model, params, {}, str(tmp_path / "cache")).report
  assert sorted(p for p, _ in report.skipped_head) == ["params/head/bias", "params/head/kernel"]
  # Another width is refused, naming the field to set.
  wide = bit.BiT(num_classes=3, stage_sizes=TINY, width_factor=2)
  wide_params = wide.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)["params"]
  with pytest.raises(pretrained.PretrainedMismatchError, match="model.width_factor"):
    pretrained.load_for_finetuning(path, wide, wide_params, {}, image_size=32,
                                   cache_dir=str(tmp_path / "cache"))
  # As does another weight-standardisation epsilon (an option the metadata records).
  with pytest.raises(pretrained.PretrainedMismatchError, match="model.ws_epsilon"):
    pretrained.load_for_finetuning(path, model.clone(ws_epsilon=1e-5), params, {},
                                   image_size=32, cache_dir=str(tmp_path / "cache"))


def test_truncated_npz_names_the_missing_tensors(tmp_path):
  tensors = bit_npz_from_timm(_timm_bit(TINY))
  del tensors["resnet/block3/unit01/b/group_norm/gamma"]
  path = tmp_path / "BiT-M-R50x1.npz"
  np.savez(path, **tensors)
  with pytest.raises(pretrained.ConversionError, match=r"stage3_block1/norm2/scale"):
    sources.convert(str(path))


def test_bfloat16_runs_with_float32_statistics():
  model = bit.BiT(num_classes=4, stage_sizes=TINY, head_init="lecun_normal")
  x = jnp.asarray(_images(32))
  params = model.init(jax.random.key(0), x, train=False)["params"]
  family_helpers.assert_bfloat16_close_to_float32(model, {"params": params}, x)
  # GroupNorm normalises in float32 even for bfloat16 inputs: constant-offset inputs that
  # bfloat16 statistics would round away still come out zero-mean, unit-variance.
  gn = bit.GroupNormReLU(groups=1, relu=False, dtype=jnp.bfloat16)
  x = (1000.0 + jnp.arange(64, dtype=jnp.float32).reshape(1, 2, 2, 16) / 16).astype(jnp.bfloat16)
  y = gn.apply(gn.init(jax.random.key(0), x), x)
  assert y.dtype == jnp.bfloat16
  assert abs(float(jnp.mean(y.astype(jnp.float32)))) < 0.05
  assert abs(float(jnp.std(y.astype(jnp.float32))) - 1.0) < 0.05


def test_create_model_builds_bit_from_the_config():
  config = base_config.bit_model_config("bit_r50x1")
  model = models.create_model(config, 10, jnp.float32)
  assert isinstance(model, bit.BiT) and tuple(model.stage_sizes) == (3, 4, 6, 3)
  assert model.width_factor == 1 and model.ws_epsilon == 1e-10
  tiny = base_config.bit_model_config("bit")
  with pytest.raises(ValueError, match="model.stage_sizes"):
    models.create_model(tiny, 10, jnp.float32)
  tiny.stage_sizes, tiny.width_factor = TINY, 1
  assert tuple(models.create_model(tiny, 10, jnp.float32).stage_sizes) == TINY
  resnet_config = base_config.resnet_model_config("resnet50")
  resnet_config.name = "bit_r50x1"
  with pytest.raises(ValueError, match="bit_model_config"):
    models.create_model(resnet_config, 10, jnp.float32)
  resnet_config.name = "bit_r999"
  with pytest.raises(ValueError, match="Unknown model.name .bit_r999.") as e:
    models.create_model(resnet_config, 10, jnp.float32)
  for name in ("vit_b16", "resnet50", "bit_r101x3", "bit"):
    assert name in str(e.value)


def test_command_line_convert_and_inspect_name_bit(tmp_path):
  path = _write_npz(_timm_bit(TINY), tmp_path / "BiT-M-R50x1.npz")
  env = {**os.environ, "PYTHONPATH": REPO}
  out = tmp_path / "converted"
  result = subprocess.run(
      [sys.executable, "-m", "vit_jax_ft.pretrained", "convert", f"--source={path}",
       f"--out={out}"], capture_output=True, text=True, env=env, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  shown = subprocess.run(
      [sys.executable, "-m", "vit_jax_ft.pretrained", "inspect", f"--source={out}"],
      capture_output=True, text=True, env=env, timeout=300, check=False)
  assert shown.returncode == 0, shown.stderr[-2000:]
  assert json.loads(shown.stdout)["format"] == "bit_npz"
  assert "BiT (Big Transfer" in shown.stderr and "width_factor=1" in shown.stderr


def test_finetune_through_train_from_a_bit_npz(tmp_path):
  from vit_jax_ft.training import train  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  from test_train import tiny_demo_config  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  path = _write_npz(_timm_bit(TINY), tmp_path / "BiT-S-tiny.npz")
  config = tiny_demo_config(total_steps=2, **{"optimizer.warmup_steps": 1})
  config.model = base_config.bit_model_config("bit")
  config.model.stage_sizes, config.model.width_factor = TINY, 1
  config.model.ws_epsilon = 1e-5  # Not the weights' 1e-10: init_model_options must fix it.
  config.init_from = path
  config.data.normalization = "auto"
  config.init_cache_dir = str(tmp_path / "cache")
  workdir = tmp_path / "run"
  train.train_and_evaluate(config, str(workdir))
  with open(workdir / "pretrained.json") as f:
    record = json.load(f)
  assert record["metadata"]["format"] == "bit_npz"
  assert re.search(r"missing from checkpoint\s+0\s", record["report"]), record["report"]
  assert re.search(r"original head \(not loaded\)\s+2\s", record["report"]), record["report"]
  with open(workdir / "config.json") as f:
    run = json.load(f)
  assert run["data"]["normalization"] == "minus_one_to_one"
  assert run["model"]["ws_epsilon"] == 1e-10
