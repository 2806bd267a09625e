"""DeiT distilled ViTs: Hugging Face DeiTForImageClassificationWithTeacher and timm deit_*_distilled.

References are the real libraries (transformers, timm from PyPI) with random
weights; the class and distillation tokens and the position embeddings are
pushed far from their initial values, so a converter that swaps the two
tokens, the two heads or the position slots fails parity.
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
from vit_jax_ft.inputs import normalization as normalization_lib
from vit_jax_ft.models import vit
from vit_jax_ft.pretrained import architecture
from vit_jax_ft.pretrained import sources
from vit_jax_ft.pretrained import tensor_files
from vit_jax_ft.pretrained import testing
from vit_jax_ft.training import optim

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

ATOL = 1e-4


def _perturb_tokens(model, names, seed=7):
  """Moves the token and position-embedding parameters far from their (zero or small) init."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if any(name.endswith(n) for n in names):
        p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def _hf_deit(tmp_path, num_labels=5):
  config = transformers.DeiTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=128, image_size=32, patch_size=8,
                                   num_labels=num_labels)
  torch.manual_seed(0)
  model = transformers.DeiTForImageClassificationWithTeacher(config)
  testing.perturb_torch_model(model, seed=3)
  _perturb_tokens(model, ("cls_token", "distillation_token", "position_embeddings"))
  with torch.no_grad():  # Logits of order 1, so that 1e-4 is a tight tolerance.
    for head in (model.cls_classifier, model.distillation_classifier):
      head.weight.mul_(10.0)
  model.eval()
  folder = tmp_path / "deit-tiny-distilled"
  model.save_pretrained(folder, safe_serialization=True)
  return folder, model


def _ours(converted, num_classes):
  arch = converted.metadata["architecture"]
  return vit.VisionTransformer(
      num_classes=num_classes, **{k: arch[k] for k in ("patch_size", "hidden_size", "num_layers",
                                                         "num_heads", "mlp_dim", "classifier")},
      **converted.metadata["model_options"])


def _logits(model, params, x):
  return np.asarray(jax.jit(lambda p, x: model.apply({"params": p}, x, train=False))(params, x))


def test_hf_deit_with_teacher_matches_transformers(tmp_path):
  folder, hf_model = _hf_deit(tmp_path)
  converted = sources.convert(str(folder))
  meta = converted.metadata
  assert meta["architecture"]["classifier"] == "token_distilled"
  assert meta["format"] == "huggingface" and meta["normalization"] == "imagenet"
  assert meta["model_options"] == {"gelu_approximate": False, "layer_norm_eps": 1e-12}
  assert meta["image_size"] == 32 and meta["num_classes_original"] == 5
  assert sorted(converted.params) == ["Transformer", "cls", "dist", "embedding", "head",
                                      "head_dist"]
  x = normalization_lib.normalize(testing.photos(32), "imagenet")
  ours = _ours(converted, 5)
  with torch.no_grad():
    out = hf_model(testing.torch_nchw(x))
  testing.assert_logits_match("HF DeiT distilled", _logits(ours, converted.params, x),
                              out.logits.numpy(), ATOL)
  # The two heads are where HF has them (not swapped): each alone matches its classifier.
  zero = jax.tree.map(np.zeros_like, converted.params["head_dist"])
  cls_only = {**converted.params, "head_dist": zero}  # Logits: head(class token) / 2.
  with torch.no_grad():
    hidden = hf_model.deit(testing.torch_nchw(x)).last_hidden_state
    ref_cls = hf_model.cls_classifier(hidden[:, 0]).numpy()
  np.testing.assert_allclose(2 * _logits(ours, cls_only, x), ref_cls, atol=ATOL, rtol=0)
  # Features (num_classes=0): the average of the two tokens.
  features = np.asarray(ours.clone(num_classes=0).apply({"params": converted.params}, x,
                                                        train=False))
  np.testing.assert_allclose(features, ((hidden[:, 0] + hidden[:, 1]) / 2).numpy(), atol=ATOL)
  # The bare weights file (config.json beside it) converts the same way.
  again = sources.convert(str(folder / "model.safetensors"))
  assert again.metadata["normalization"] == "imagenet"
  assert again.metadata["architecture"] == meta["architecture"]


def test_timm_deit_tiny_distilled_matches_timm(tmp_path):
  torch.manual_seed(0)
  reference = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False,
                                num_classes=6, img_size=64)
  testing.perturb_torch_model(reference, seed=4)
  _perturb_tokens(reference, ("cls_token", "dist_token", "pos_embed"))
  reference.eval()
  path = str(tmp_path / "deit_tiny_distilled.safetensors")
  tensor_files.write_safetensors(path, {k: v.numpy() for k, v in reference.state_dict().items()})
  converted = sources.convert(path)
  meta = converted.metadata
  assert meta["format"] == "timm" and meta["normalization"] == "imagenet"
  assert meta["architecture"]["name"] == "deit_ti16_distilled"
  assert meta["model_options"] == {"gelu_approximate": False, "layer_norm_eps": 1e-6}
  assert meta["image_size"] == 64
  x = normalization_lib.normalize(testing.photos(64), "imagenet")
  with torch.no_grad():
    ref = reference(testing.torch_nchw(x)).numpy()
  testing.assert_logits_match("timm deit_tiny_distilled", _logits(_ours(converted, 6),
                                                                   converted.params, x), ref, ATOL)


def test_preset_parameter_count_matches_timm():
  for name, timm_name in (("deit_ti16_distilled", "deit_tiny_distilled_patch16_224"),
                          ("deit_b16_distilled", "deit_base_distilled_patch16_224")):
    reference = timm.create_model(timm_name, pretrained=False, num_classes=1000, device="meta")
    config = base_config.vit_model_config(name)
    assert config.classifier == "token_distilled"
    model = models.create_model(config, 1000, jnp.float32)
    shapes = jax.eval_shape(lambda m=model: m.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)),
                                                   train=False))
    assert (sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
            == sum(p.numel() for p in reference.parameters()))


def test_distilled_preset_needs_its_classifier():
  config = base_config.vit_model_config("deit_s16_distilled")
  config.classifier = "token"
  with pytest.raises(ValueError, match="classifier='token_distilled'"):
    models.create_model(config, 10, jnp.float32)
  # A plain ViT-Ti/16 config can load distilled weights by setting the classifier.
  config = base_config.vit_model_config("vit_ti16")
  config.classifier = "token_distilled"
  model = models.create_model(config, 10, jnp.float32)
  assert architecture.from_model(model)["name"] == "deit_ti16_distilled"


def test_load_for_finetuning_resizes_after_both_tokens_and_reports_both_heads(tmp_path):
  folder, _ = _hf_deit(tmp_path)
  converted = sources.convert(str(folder))
  model = vit.VisionTransformer(num_classes=3, patch_size=8, hidden_size=64, num_layers=2,
                                num_heads=4, mlp_dim=128, classifier="token_distilled",
                                gelu_approximate=False, layer_norm_eps=1e-12)
  params = model.init(jax.random.key(0), jnp.zeros((1, 48, 48, 3)), train=False)["params"]
  result = pretrained.load_for_finetuning(str(folder), model, params, {}, image_size=48,
                                          cache_dir=str(tmp_path / "cache"))
  report = result.report
  assert not report.problems()
  heads = ["params/head/bias", "params/head/kernel", "params/head_dist/bias",
           "params/head_dist/kernel"]
  assert sorted(p for p, _ in report.new) == heads
  assert sorted(p for p, _ in report.skipped_head) == heads
  assert [p for p, *_ in report.resized] == ["params/Transformer/posembed_input/pos_embedding"]
  old = converted.params["Transformer"]["posembed_input"]["pos_embedding"]
  new = result.params["Transformer"]["posembed_input"]["pos_embedding"]
  assert new.shape == (1, 2 + 36, 64)
  np.testing.assert_array_equal(new[:, :2], old[:, :2])  # Class and distillation slots kept.
  # A plain class-token ViT is told which classifier the weights need.
  plain = model.clone(classifier="token")
  plain_params = plain.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)["params"]
  with pytest.raises(pretrained.PretrainedMismatchError,
                     match="model.classifier='token_distilled'"):
    pretrained.load_for_finetuning(str(folder), plain, plain_params, {}, image_size=32,
                                   cache_dir=str(tmp_path / "cache"))


def test_distillation_head_is_a_head_for_the_optimizer():
  model = vit.VisionTransformer(num_classes=3, patch_size=8, hidden_size=32, num_layers=2,
                                num_heads=2, mlp_dim=64, classifier="token_distilled")
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)),
                                             train=False))["params"]
  paths = [optim.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  ids, top = optim.layer_ids(paths)
  assert ids["dist"] == 0 and ids["head_dist/kernel"] == top == ids["head/kernel"]
  config = base_config.get_base_config().optimizer
  config.head_only_steps = 5
  groups = optim.param_groups(config, params)
  assert sorted(groups.head) == ["head/bias", "head/kernel", "head_dist/bias", "head_dist/kernel"]


def test_finetune_through_train_from_hf_deit(tmp_path):
  from vit_jax_ft.training import train  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  from test_train import tiny_demo_config  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  config_hf = transformers.DeiTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, image_size=32, patch_size=16,
                                      num_labels=4)
  torch.manual_seed(0)
  hf_model = transformers.DeiTForImageClassificationWithTeacher(config_hf)
  folder = tmp_path / "deit"
  hf_model.save_pretrained(folder, safe_serialization=True)
  config = tiny_demo_config(total_steps=2, **{"optimizer.warmup_steps": 1})
  config.model.classifier = "token_distilled"
  config.init_from = str(folder)
  config.data.normalization = "auto"
  config.init_cache_dir = str(tmp_path / "cache")
  workdir = tmp_path / "run"
  train.train_and_evaluate(config, str(workdir))
  with open(workdir / "pretrained.json") as f:
    record = json.load(f)
  assert re.search(r"missing from checkpoint\s+0\s", record["report"]), record["report"]
  assert re.search(r"original head \(not loaded\)\s+4\s", record["report"]), record["report"]
  with open(workdir / "config.json") as f:
    run = json.load(f)
  assert run["data"]["normalization"] == "imagenet"
  assert (run["model"]["gelu_approximate"], run["model"]["layer_norm_eps"]) == (False, 1e-12)
  assert os.path.isdir(workdir / "checkpoints")
