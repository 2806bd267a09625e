"""Parity of converted Hugging Face ViT-B/16 and ResNet-50 with transformers itself.

The reference models are full size with random weights (seeded, norms and
BatchNorm statistics moved off their initial values), saved with
`save_pretrained` as safetensors, converted, and run on the same two real
photos; logits and pooled features must agree within 1e-4 in float32.
"""

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax_ft import pretrained
from vit_jax_ft.inputs import normalization as normalization_lib
from vit_jax_ft.models import resnet
from vit_jax_ft.models import vit
from vit_jax_ft.pretrained import testing

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ATOL = 1e-4


def _apply(model, variables, x):
  return np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x))


@pytest.fixture(scope="module")
def hf_vit_dir(tmp_path_factory):
  torch.manual_seed(0)
  config = transformers.ViTConfig(num_labels=10)  # ViT-B/16, 224 px.
  model = transformers.ViTForImageClassification(config)
  testing.perturb_torch_model(model, seed=1)
  path = tmp_path_factory.mktemp("hf") / "vit_b16"
  model.save_pretrained(path, safe_serialization=True)
  return path, model


@pytest.fixture(scope="module")
def hf_resnet_dir(tmp_path_factory):
  torch.manual_seed(0)
  config = transformers.ResNetConfig(num_labels=7)  # ResNet-50 (v1.5).
  model = transformers.ResNetForImageClassification(config)
  testing.perturb_torch_model(model, seed=2)
  path = tmp_path_factory.mktemp("hf") / "resnet50"
  model.save_pretrained(path, safe_serialization=True)
  return path, model


def test_vit_b16_logits_and_features_match_transformers(hf_vit_dir):
  path, hf_model = hf_vit_dir
  assert (path / "model.safetensors").exists()
  converted = pretrained.convert(str(path), model_name="vit_b16")
  meta = converted.metadata
  assert meta["format"] == "huggingface" and meta["architecture"]["name"] == "vit_b16"
  assert meta["model_options"] == {"gelu_approximate": False, "layer_norm_eps": 1e-12}
  assert meta["num_classes_original"] == 10 and meta["normalization"] == "minus_one_to_one"

  x = normalization_lib.normalize(testing.photos(224), "minus_one_to_one")
  model = vit.VisionTransformer(num_classes=10, **vit.VIT_PRESETS["vit_b16"],
                                **meta["model_options"])
  logits = _apply(model, {"params": converted.params}, x)
  features = _apply(model.clone(num_classes=0), {"params": converted.params}, x)
  with torch.no_grad():
    out = hf_model(testing.torch_nchw(x), output_hidden_states=True)
    ref_logits = out.logits.numpy()
    ref_features = hf_model.vit.layernorm(out.hidden_states[-1])[:, 0].numpy()
  print("ViT-B/16 max |logits diff|", np.abs(logits - ref_logits).max(),
        "features", np.abs(features - ref_features).max(),
        "max |logit|", np.abs(ref_logits).max())
  assert np.abs(ref_logits).max() > 0.1  # Not a trivially tiny output.
  np.testing.assert_allclose(logits, ref_logits, atol=ATOL, rtol=0)
  np.testing.assert_allclose(features, ref_features, atol=ATOL, rtol=0)


def test_resnet50_logits_and_features_match_transformers(hf_resnet_dir):
  path, hf_model = hf_resnet_dir
  converted = pretrained.convert(str(path), model_name="resnet50")
  meta = converted.metadata
  assert meta["model_options"] == {"variant": "v1.5", "conv_bias": False, "bn_epsilon": 1e-5}
  assert meta["normalization"] == "imagenet" and meta["num_classes_original"] == 7

  x = normalization_lib.normalize(testing.photos(224), "imagenet")
  model = resnet.ResNet(num_classes=7, **resnet.resnet_preset("resnet50"), **meta["model_options"])
  variables = {"params": converted.params, "batch_stats": converted.batch_stats}
  logits = _apply(model, variables, x)
  features = _apply(model.clone(num_classes=0), variables, x)
  with torch.no_grad():
    ref_logits = hf_model(testing.torch_nchw(x)).logits.numpy()
    ref_features = hf_model.resnet(testing.torch_nchw(x)).pooler_output[:, :, 0, 0].numpy()
  print("ResNet-50 max |logits diff|", np.abs(logits - ref_logits).max(),
        "features", np.abs(features - ref_features).max(),
        "max |logit|", np.abs(ref_logits).max())
  assert np.abs(ref_logits).max() > 0.1
  np.testing.assert_allclose(logits, ref_logits, atol=ATOL, rtol=0)
  np.testing.assert_allclose(features, ref_features, atol=ATOL, rtol=0)


def test_load_for_finetuning_resizes_and_keeps_new_head(hf_vit_dir, tmp_path):
  path, _ = hf_vit_dir
  model = vit.VisionTransformer(num_classes=3, **vit.VIT_PRESETS["vit_b16"],
                                gelu_approximate=False, layer_norm_eps=1e-12)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                             jnp.zeros((1, 256, 256, 3)), train=False))
  params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes["params"])
  result = pretrained.load_for_finetuning(str(path), model, params, {}, image_size=256,
                                          cache_dir=str(tmp_path))
  report = result.report
  assert [p for p, *_ in report.resized] == ["params/Transformer/posembed_input/pos_embedding"]
  assert result.params["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, 257, 768)
  assert {p for p, _ in report.new} == {"params/head/kernel", "params/head/bias"}
  assert {p for p, _ in report.skipped_head} == {"params/head/kernel", "params/head/bias"}
  assert not report.missing and not report.unexpected and not report.shape_mismatch
  assert len(report.loaded) == 12 * 16 + 5  # blocks, embedding, cls, encoder_norm
  assert np.all(result.params["head"]["kernel"] == 0)
  assert result.metadata["format"] == "huggingface"
  assert "loaded" in str(report) and len(result.fingerprint) == 16
  # The second load comes from the Orbax cache and gives the same weights.
  again = pretrained.load_for_finetuning(str(path), model, params, {}, image_size=256,
                                         cache_dir=str(tmp_path))
  assert again.fingerprint == result.fingerprint


def test_resnet_options_are_checked(hf_resnet_dir, tmp_path):
  path, _ = hf_resnet_dir
  model = resnet.ResNet(num_classes=3, **resnet.resnet_preset("resnet50"), variant="v1")
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)),
                                             train=False))
  zeros = lambda t: jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), t)
  with pytest.raises(pretrained.PretrainedMismatchError, match=r"model.variant='v1.5'"):
    pretrained.load_for_finetuning(str(path), model, zeros(shapes["params"]),
                                   zeros(shapes["batch_stats"]), image_size=64,
                                   cache_dir=str(tmp_path))
  result = pretrained.load_for_finetuning(str(path), model, zeros(shapes["params"]),
                                          zeros(shapes["batch_stats"]), image_size=64,
                                          cache_dir=str(tmp_path), strict=False)
  assert result.report.option_mismatch
  assert len(result.report.loaded) == 53 * 5  # 53 convs + 53 BNs x 4


def test_hub_id_fails_fast_offline(monkeypatch, tmp_path):
  monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  start = time.monotonic()
  with pytest.raises(pretrained.SourceUnavailableError, match=r"hf download google/vit-base"):
    pretrained.convert("google/vit-base-patch16-224")
  assert time.monotonic() - start < 10


def test_hub_id_fails_fast_when_unreachable(monkeypatch, tmp_path):
  monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
  monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
  monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False, raising=False)
  # Nothing listens on port 9 of loopback: the connection is refused at once.
  monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
  start = time.monotonic()
  with pytest.raises(pretrained.SourceUnavailableError, match=r"Cannot reach.*--local-dir"):
    pretrained.convert("google/vit-base-patch16-224")
  assert time.monotonic() - start < 10


def _tiny_vit_config(**kw):
  return transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, image_size=32, patch_size=8, **kw)


def test_vit_model_without_head_keeps_pooler_as_pre_logits(tmp_path):
  torch.manual_seed(0)
  model = transformers.ViTModel(_tiny_vit_config(hidden_act="gelu_pytorch_tanh"))
  testing.perturb_torch_model(model)
  model.save_pretrained(tmp_path, safe_serialization=True)
  converted = pretrained.convert(str(tmp_path))
  meta = converted.metadata
  assert meta["num_classes_original"] == 0 and meta["architecture"]["representation_size"] == 32
  assert meta["model_options"]["gelu_approximate"] is True
  ours = vit.VisionTransformer(num_classes=0, patch_size=8, hidden_size=32, num_layers=2,
                               num_heads=2, mlp_dim=64, representation_size=32,
                               **meta["model_options"])
  x = np.random.default_rng(0).standard_normal((2, 32, 32, 3), dtype=np.float32)
  with torch.no_grad():
    ref = model(testing.torch_nchw(x)).pooler_output.numpy()
  np.testing.assert_allclose(_apply(ours, {"params": converted.params}, x), ref, atol=ATOL)


def test_config_that_disagrees_with_weights_is_refused(tmp_path):
  model = transformers.ViTForImageClassification(_tiny_vit_config(num_labels=3))
  model.save_pretrained(tmp_path, safe_serialization=True)
  config = json.loads((tmp_path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps(dict(config, num_hidden_layers=12)))
  with pytest.raises(pretrained.ConversionError, match="num_hidden_layers=12"):
    pretrained.convert(str(tmp_path))
