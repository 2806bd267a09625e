"""Storage, strict loading, format detection and the command line, on small models."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax_ft import pretrained
from vit_jax_ft.models import resnet
from vit_jax_ft.models import vit
from vit_jax_ft.pretrained import conversion
from vit_jax_ft.pretrained import storage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SMALL = dict(patch_size=8, hidden_size=32, num_heads=2, mlp_dim=64)


def _vit(num_layers=3, num_classes=4, **kw):
  return vit.VisionTransformer(num_classes=num_classes, num_layers=num_layers, **_SMALL, **kw)


def _init(model, size=32):
  return model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)), train=False)


@pytest.fixture(scope="module")
def npz_path(tmp_path_factory):
  """A small vit_jax-style .npz (3 layers, 4-class head)."""
  flat = conversion.flatten(_init(_vit())["params"])
  rng = np.random.default_rng(0)
  path = tmp_path_factory.mktemp("src") / "small.npz"
  np.savez(path, **{k: np.asarray(v) + rng.standard_normal(v.shape).astype(np.float32) * 0.1
                    for k, v in flat.items()})
  return str(path)


def test_storage_roundtrip(npz_path, tmp_path):
  converted = pretrained.convert(npz_path)
  out = storage.save(converted, str(tmp_path / "conv"))
  assert sorted(os.listdir(out)) == ["metadata.json", "state"]
  assert pretrained.detect_format(out) == "converted"
  back = storage.load(out)
  assert back.metadata == json.loads(json.dumps(converted.metadata))
  for k, v in conversion.flatten(converted.params).items():
    np.testing.assert_array_equal(conversion.flatten(back.params)[k], v)
  with pytest.raises(FileExistsError):
    storage.save(converted, out)


def test_load_from_converted_dir_equals_raw_source(npz_path, tmp_path):
  out = storage.save(pretrained.convert(npz_path), str(tmp_path / "conv"))
  model = _vit(num_classes=2)
  params = _init(model)["params"]
  a = pretrained.load_for_finetuning(out, model, params, {}, image_size=32)
  b = pretrained.load_for_finetuning(npz_path, model, params, {}, image_size=32,
                                     cache_dir=str(tmp_path / "cache"))
  assert a.fingerprint == b.fingerprint
  assert len(os.listdir(tmp_path / "cache")) == 1  # The raw source was cached once.
  with pytest.raises(pretrained.PretrainedMismatchError, match="initialised for 17 tokens"):
    pretrained.load_for_finetuning(out, model, params, {}, image_size=48)
  c = pretrained.load_for_finetuning(out, model, _init(model, 48)["params"], {}, image_size=48)
  assert c.fingerprint != a.fingerprint  # Resized position embedding.
  assert a.metadata["source"] == npz_path


def test_head_stays_as_initialised(npz_path, tmp_path, monkeypatch):
  monkeypatch.setenv("VIT_JAX_FT_CACHE", str(tmp_path))  # The default cache_dir.
  model = _vit(num_classes=2, head_init="lecun_normal", head_bias_init=-6.9)
  params = _init(model)["params"]
  result = pretrained.load_for_finetuning(npz_path, model, params, {}, image_size=32,
                                          cache_dir=None)
  np.testing.assert_array_equal(result.params["head"]["kernel"], params["head"]["kernel"])
  np.testing.assert_array_equal(result.params["head"]["bias"], np.float32(-6.9))
  assert len(os.listdir(tmp_path)) == 1
  assert sorted(result.report.skipped_head) == [("params/head/bias", (4,)),
                                               ("params/head/kernel", (32, 4))]


def test_depth_mismatch_strict_and_not(npz_path, tmp_path):
  cache = str(tmp_path)
  shallow = _vit(num_layers=2)
  with pytest.raises(pretrained.PretrainedMismatchError, match=r"num_layers: weights have 3"):
    pretrained.load_for_finetuning(npz_path, shallow, _init(shallow)["params"], {},
                                   image_size=32, cache_dir=cache)
  result = pretrained.load_for_finetuning(npz_path, shallow, _init(shallow)["params"], {},
                                          image_size=32, cache_dir=cache, strict=False)
  assert {p.split("/")[2] for p, _ in result.report.unexpected} == {"encoderblock_2"}
  deep = _vit(num_layers=4)
  result = pretrained.load_for_finetuning(npz_path, deep, _init(deep)["params"], {},
                                          image_size=32, cache_dir=cache, strict=False)
  assert {p.split("/")[2] for p, _ in result.report.missing} == {"encoderblock_3"}
  assert "missing from checkpoint" in str(result.report)


def test_wrong_family_and_options_name_the_config_field(npz_path, tmp_path):
  model = resnet.ResNet(num_classes=2, **resnet.resnet_preset("resnet18"))
  variables = _init(model)
  with pytest.raises(pretrained.PretrainedMismatchError, match=r"set model.name='vit'"):
    pretrained.load_for_finetuning(npz_path, model, variables["params"],
                                   variables["batch_stats"], image_size=32,
                                   cache_dir=str(tmp_path), strict=False)
  exact = _vit(gelu_approximate=False)
  with pytest.raises(pretrained.PretrainedMismatchError,
                     match=r"weights need model.gelu_approximate=True"):
    pretrained.load_for_finetuning(npz_path, exact, _init(exact)["params"], {}, image_size=32,
                                   cache_dir=str(tmp_path))


def test_unused_source_tensors_block_strict_loading(npz_path, tmp_path):
  data = dict(np.load(npz_path))
  data["Transformer/encoderblock_0/LayerScale/gamma"] = np.ones(32, np.float32)
  path = str(tmp_path / "extra.npz")
  np.savez(path, **data)
  with pytest.raises(pretrained.ConversionError, match="LayerScale"):
    pretrained.convert(path)
  converted = storage.save(pretrained.convert(path, strict=False), str(tmp_path / "conv"))
  model = _vit()
  with pytest.raises(pretrained.PretrainedMismatchError, match="LayerScale"):
    pretrained.load_for_finetuning(converted, model, _init(model)["params"], {}, image_size=32)


def test_detect_format(tmp_path, npz_path):
  (tmp_path / "w.h5").write_bytes(b"")
  (tmp_path / "w.pth").write_bytes(b"")
  (tmp_path / "tfjs").mkdir()
  (tmp_path / "tfjs" / "model.json").write_text("{}")
  assert pretrained.detect_format(npz_path) == "npz"
  assert pretrained.detect_format(str(tmp_path / "w.h5")) == "keras_h5"
  assert pretrained.detect_format(str(tmp_path / "w.pth")) == "state_dict"
  assert pretrained.detect_format(str(tmp_path / "tfjs")) == "keras_tfjs"
  assert pretrained.detect_format("google/vit-base-patch16-224") == "hub"
  assert pretrained.detect_format("timm/resnet50.a1_in1k@main") == "hub"
  with pytest.raises(pretrained.CheckpointFileError, match="not found"):
    pretrained.detect_format("checkpoints/vit_b16.npz")  # A typo'd path, not a Hub id.
  with pytest.raises(pretrained.CheckpointFileError, match="not found"):
    pretrained.detect_format(str(tmp_path / "missing" / "file.npz"))
  with pytest.raises(pretrained.ConversionError, match="Cannot tell"):
    pretrained.detect_format(str(tmp_path))


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "vit_jax_ft.pretrained", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=300)


def test_cli_convert_inspect_and_errors(npz_path, tmp_path):
  out = str(tmp_path / "conv")
  wrong = _cli("convert", f"--source={npz_path}", "--model=vit_b16", f"--out={out}")
  assert wrong.returncode == 1 and "error: --model=vit_b16 was requested" in wrong.stderr
  assert "Traceback" not in wrong.stderr
  ok = _cli("convert", f"--source={npz_path}", f"--out={out}")
  assert ok.returncode == 0, ok.stderr
  assert storage.load_metadata(out)["format"] == "vit_jax_npz"
  shown = _cli("inspect", f"--source={out}")
  assert json.loads(shown.stdout)["model_options"]["gelu_approximate"] is True
  again = _cli("convert", f"--source={npz_path}", f"--out={out}")
  assert again.returncode == 1 and "already exists" in again.stderr


def test_origin_names_the_family_users_know():
  from vit_jax_ft.pretrained import sources  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  assert sources.origin_of({"format": "vit_jax_npz", "source": "ViT-B_16.npz"}).startswith(
      "vit_jax")
  augreg = "Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0.npz"
  assert sources.origin_of({"format": "vit_jax_npz", "source": augreg}).startswith("AugReg")
  assert sources.origin_of({"format": "big_vision_npz"}) == "big_vision .npz"
  assert sources.origin_of({"format": "keras_h5"}).startswith("Keras")
  assert sources.origin_of({"format": "tf_model_garden"}).startswith("TF Model Garden")
  assert sources.origin_of({"format": "timm", "origin": "given"}) == "given"
