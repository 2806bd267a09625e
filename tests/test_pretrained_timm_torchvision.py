"""timm ViT and torchvision/timm ResNet state dicts: parity, file formats, safety.

torchvision has no CPU build on the registry and timm imports torchvision, so
neither is imported. Their state dicts are built from a Hugging Face torch
model's weights with the documented key mapping (the inverse of transformers'
`convert_vit_timm_to_pytorch.py` and `convert_resnet_to_pytorch.py`: timm's
fused `attn.qkv` is query, key and value stacked in that order), and the HF
model, configured with timm's LayerNorm epsilon, is the reference forward pass.
"""

import json
import os
import sys
import zipfile

import jax
import numpy as np
import pytest

from vit_jax_ft import pretrained
from vit_jax_ft.inputs import normalization as normalization_lib
from vit_jax_ft.models import resnet
from vit_jax_ft.models import vit
from vit_jax_ft.pretrained import tensor_files
from vit_jax_ft.pretrained import testing

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ATOL = 1e-4


def _apply(model, variables, x):
  return np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x))


def timm_vit_state_dict(hf_state):
  """ViTForImageClassification weights under timm's VisionTransformer names."""
  sd = {"cls_token": hf_state["vit.embeddings.cls_token"],
        "pos_embed": hf_state["vit.embeddings.position_embeddings"],
        "patch_embed.proj.weight": hf_state["vit.embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": hf_state["vit.embeddings.patch_embeddings.projection.bias"],
        "norm.weight": hf_state["vit.layernorm.weight"],
        "norm.bias": hf_state["vit.layernorm.bias"],
        "head.weight": hf_state["classifier.weight"], "head.bias": hf_state["classifier.bias"]}
  i = 0
  while f"vit.encoder.layer.{i}.layernorm_before.weight" in hf_state:
    hf = lambda name: hf_state[f"vit.encoder.layer.{i}.{name}"]
    b = f"blocks.{i}."
    for kind in ("weight", "bias"):
      sd[b + f"norm1.{kind}"] = hf(f"layernorm_before.{kind}")
      sd[b + f"norm2.{kind}"] = hf(f"layernorm_after.{kind}")
      sd[b + f"attn.qkv.{kind}"] = torch.cat(
          [hf(f"attention.attention.{p}.{kind}") for p in ("query", "key", "value")])
      sd[b + f"attn.proj.{kind}"] = hf(f"attention.output.dense.{kind}")
      sd[b + f"mlp.fc1.{kind}"] = hf(f"intermediate.dense.{kind}")
      sd[b + f"mlp.fc2.{kind}"] = hf(f"output.dense.{kind}")
    i += 1
  return sd


def torchvision_resnet_state_dict(hf_state):
  """ResNetForImageClassification weights under torchvision's resnet names."""
  sd = {}
  bn_kinds = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
  for kind in bn_kinds:
    sd[f"bn1.{kind}"] = hf_state[f"resnet.embedder.embedder.normalization.{kind}"]
  sd["conv1.weight"] = hf_state["resnet.embedder.embedder.convolution.weight"]
  for key, value in hf_state.items():
    parts = key.split(".")
    if parts[:3] != ["resnet", "encoder", "stages"]:
      continue
    stage, block = int(parts[3]), int(parts[5])
    prefix = f"layer{stage + 1}.{block}."
    if parts[6] == "shortcut":
      name = "downsample.0" if parts[7] == "convolution" else "downsample.1"
      sd[prefix + name + "." + parts[8]] = value
    else:  # layer.{k}.convolution / normalization
      k = int(parts[7]) + 1
      name = f"conv{k}" if parts[8] == "convolution" else f"bn{k}"
      sd[prefix + name + "." + parts[9]] = value
  sd["fc.weight"], sd["fc.bias"] = hf_state["classifier.1.weight"], hf_state["classifier.1.bias"]
  return sd


def _saved_state(model, tmp_path_factory):
  """The tensors as `save_pretrained` writes them (transformers 5 renames some in memory)."""
  import safetensors.torch  # pylint: disable=g-import-not-at-top
  folder = tmp_path_factory.mktemp("hf")
  model.save_pretrained(folder, safe_serialization=True)
  return safetensors.torch.load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def vit_s16(tmp_path_factory):
  """A ViT-S/16 (timm's vit_small_patch16_224 shapes) with timm's LayerNorm eps 1e-6."""
  torch.manual_seed(0)
  config = transformers.ViTConfig(hidden_size=384, num_attention_heads=6, intermediate_size=1536,
                                  layer_norm_eps=1e-6, num_labels=5)
  model = transformers.ViTForImageClassification(config)
  testing.perturb_torch_model(model, seed=3)
  return model, timm_vit_state_dict(_saved_state(model, tmp_path_factory))


@pytest.fixture(scope="module")
def resnet50(tmp_path_factory):
  torch.manual_seed(0)
  model = transformers.ResNetForImageClassification(transformers.ResNetConfig(num_labels=6))
  testing.perturb_torch_model(model, seed=4)
  return model, torchvision_resnet_state_dict(_saved_state(model, tmp_path_factory))


def test_timm_vit_safetensors_parity(vit_s16, tmp_path):
  import safetensors.torch  # pylint: disable=g-import-not-at-top
  hf_model, sd = vit_s16
  assert sd["blocks.0.attn.qkv.weight"].shape == (3 * 384, 384)
  path = str(tmp_path / "vit_small_patch16_224.safetensors")
  safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, path)
  converted = pretrained.convert(path, model_name="vit_s16")
  meta = converted.metadata
  assert meta["format"] == "timm" and meta["normalization"] == "minus_one_to_one"
  assert meta["model_options"] == {"gelu_approximate": False, "layer_norm_eps": 1e-6}
  x = normalization_lib.normalize(testing.photos(224), "minus_one_to_one")
  model = vit.VisionTransformer(num_classes=5, **vit.VIT_PRESETS["vit_s16"],
                                **meta["model_options"])
  logits = _apply(model, {"params": converted.params}, x)
  with torch.no_grad():
    ref = hf_model(testing.torch_nchw(x)).logits.numpy()
  testing.assert_logits_match("timm ViT-S/16", logits, ref, ATOL)


def test_timm_no_embed_class_pos_embed_gets_zero_class_slot(vit_s16, tmp_path):
  _, sd = vit_s16
  sd = dict(sd, pos_embed=sd["pos_embed"][:, 1:])  # 196 patch positions only.
  path = str(tmp_path / "deit3.pth")
  torch.save(sd, path)
  posemb = pretrained.convert(path).params["Transformer"]["posembed_input"]["pos_embedding"]
  assert posemb.shape == (1, 197, 384)
  np.testing.assert_array_equal(posemb[0, 0], 0)
  np.testing.assert_array_equal(posemb[:, 1:], sd["pos_embed"].numpy())


@pytest.mark.parametrize("without_torch", [False, True], ids=["torch.load", "numpy-unpickler"])
def test_torchvision_resnet50_pth_parity(resnet50, tmp_path, monkeypatch, without_torch):
  hf_model, sd = resnet50
  path = str(tmp_path / "resnet50-11ad3fa6.pth")
  torch.save(sd, path)
  if without_torch:
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError.
  converted = pretrained.convert(path, model_name="resnet50")
  monkeypatch.undo()
  meta = converted.metadata
  assert meta["format"] == "torchvision" and meta["normalization"] == "imagenet"
  assert meta["model_options"] == {"variant": "v1.5", "conv_bias": False, "bn_epsilon": 1e-5}
  x = normalization_lib.normalize(testing.photos(224), "imagenet")
  model = resnet.ResNet(num_classes=6, **resnet.resnet_preset("resnet50"), **meta["model_options"])
  logits = _apply(model, {"params": converted.params, "batch_stats": converted.batch_stats}, x)
  with torch.no_grad():
    ref = hf_model(testing.torch_nchw(x)).logits.numpy()
  testing.assert_logits_match("torchvision ResNet-50", logits, ref, ATOL)


def test_timm_resnet_folder_reads_pretrained_cfg(resnet50, tmp_path):
  import safetensors.torch  # pylint: disable=g-import-not-at-top
  _, sd = resnet50
  folder = tmp_path / "resnet50.a1_in1k"
  folder.mkdir()
  safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()},
                              str(folder / "model.safetensors"))
  (folder / "config.json").write_text(json.dumps({
      "architecture": "resnet50", "num_classes": 6,
      "pretrained_cfg": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                         "input_size": [3, 224, 224]}}))
  assert pretrained.detect_format(str(folder)) == "timm_folder"
  converted = pretrained.convert(str(folder))
  assert converted.metadata["format"] == "timm"
  assert converted.metadata["normalization"] == "imagenet"
  assert converted.metadata["timm_architecture"] == "resnet50"


def test_numpy_unpickler_matches_torch_load(tmp_path, monkeypatch):
  sd = {"a": torch.randn(3, 4), "b": torch.randn(5).to(torch.bfloat16),
        "c": torch.randn(4, 3).t(), "n": torch.tensor(7)}
  path = str(tmp_path / "mixed.pth")
  torch.save(sd, path)
  monkeypatch.setitem(sys.modules, "torch", None)
  loaded = tensor_files.read_torch(path)
  for k, v in sd.items():
    np.testing.assert_array_equal(np.asarray(loaded[k], np.float32), v.float().numpy())


class _RunsCode:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("without_torch", [False, True], ids=["torch.load", "numpy-unpickler"])
def test_pickles_that_run_code_are_refused(tmp_path, monkeypatch, without_torch):
  marker = tmp_path / "pwned"
  path = str(tmp_path / "evil.pth")
  torch.save({"weight": torch.zeros(2), "payload": _RunsCode(marker)}, path)
  if without_torch:
    monkeypatch.setitem(sys.modules, "torch", None)
  with pytest.raises(pretrained.CheckpointFileError, match="evil.pth"):
    tensor_files.read_torch(path)
  assert not marker.exists()


@pytest.mark.parametrize("ext", [".pth", ".safetensors", ".npz"])
def test_truncated_files_give_a_clear_error(tmp_path, ext):
  import safetensors.torch  # pylint: disable=g-import-not-at-top
  arrays = {"conv1.weight": torch.randn(64, 3, 7, 7), "layer1.0.conv1.weight": torch.randn(8, 8)}
  path = tmp_path / f"model{ext}"
  if ext == ".pth":
    torch.save(arrays, str(path))
  elif ext == ".safetensors":
    safetensors.torch.save_file(arrays, str(path))
  else:
    np.savez(path, **{k: v.numpy() for k, v in arrays.items()})
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])
  with pytest.raises(pretrained.CheckpointFileError, match=f"model{ext}"):
    converted = pretrained.convert(str(path))
    del converted


def test_unknown_layout_is_refused(tmp_path):
  import safetensors.torch  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / "bert.safetensors")
  safetensors.torch.save_file({"bert.embeddings.word_embeddings.weight": torch.zeros(4, 4)}, path)
  with pytest.raises(pretrained.ConversionError, match="not a ViT, ResNet/ResNeXt or RegNet"):
    pretrained.convert(path)


def test_extra_tensors_are_refused_unless_not_strict(resnet50, tmp_path):
  _, sd = resnet50
  path = str(tmp_path / "resnet50d.pth")
  torch.save(dict(sd, **{"conv1.1.weight": torch.zeros(3)}), path)
  with pytest.raises(pretrained.ConversionError, match=r"conv1\.1\.weight"):
    pretrained.convert(path)
  converted = pretrained.convert(path, strict=False)
  assert converted.metadata["unused_source_keys"] == ["conv1.1.weight"]
  assert zipfile.is_zipfile(path)
