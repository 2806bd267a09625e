"""Exporting a fine-tuned workdir as a Hugging Face folder that transformers loads.

The workdirs are built the way a training run leaves them: `config.json` (the
run config as ml_collections JSON), `checkpoints/<step>` (Orbax StandardSave
of a TrainState with step, params, batch_stats, opt_state, rng) and
`data/dataset_info.json` with the class names.
"""

import os
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from vit_jax_ft import base_config
from vit_jax_ft import models
from vit_jax_ft import pretrained
from vit_jax_ft.inputs import normalization as normalization_lib
from vit_jax_ft.pretrained import conversion
from vit_jax_ft.pretrained import hf_export
from vit_jax_ft.pretrained import testing

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ["melanoma", "nevus", "keratosis"]


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: dict
  batch_stats: dict
  opt_state: object
  rng: jax.Array


def _config(model_config, image_size):
  config = base_config.get_base_config()
  with config.unlocked():
    config.model = model_config
  config.data.image_size = image_size
  config.data.normalization = "imagenet"  # train.py writes config.json with 'auto' resolved.
  return config


def _make_workdir(path, config, image_size, seed=0):
  """A workdir like train.py leaves, with non-trivial (random) weights and head."""
  model = models.create_model(config.model, len(CLASSES), jnp.float32)
  variables = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, image_size, image_size, 3)),
                         train=False)
  rng = np.random.default_rng(seed)
  noisy = lambda t: jax.tree.map(
      lambda v: np.asarray(v) + rng.standard_normal(v.shape, dtype=np.float32) * 0.05, t)
  params, batch_stats = noisy(variables["params"]), noisy(variables.get("batch_stats", {}))
  if batch_stats:
    # Running statistics measured on real photos (momentum 0 keeps the batch's),
    # then jittered: a trained network's scale, but not batch statistics.
    x = normalization_lib.normalize(testing.photos(image_size), config.data.normalization)
    _, mutated = model.clone(bn_momentum=0.0).apply(
        {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"])
    batch_stats = jax.tree.map(
        lambda v: np.asarray(v) * rng.uniform(0.8, 1.2, v.shape).astype(np.float32),
        mutated["batch_stats"])
  tx = optax.adamw(1e-3)
  state = TrainState(step=jnp.asarray(7), params=params, batch_stats=batch_stats,
                     opt_state=tx.init(params), rng=jax.random.PRNGKey(1))
  os.makedirs(path / "data")
  (path / "config.json").write_text(config.to_json_best_effort(indent=2))
  (path / "data" / "dataset_info.json").write_text(
      '{"class_names": ["melanoma", "nevus", "keratosis"], "multilabel": false}')
  with ocp.CheckpointManager(str(path / "checkpoints")) as manager:
    manager.save(7, args=ocp.args.StandardSave(state))
    manager.wait_until_finished()
  return model, params, batch_stats


def _check_transformers_parity(model, params, batch_stats, out_dir, hf_class, image_size,
                               normalization):
  hf_model = hf_class.from_pretrained(out_dir).eval()
  assert hf_model.config.id2label == dict(enumerate(CLASSES))
  x = normalization_lib.normalize(testing.photos(image_size), normalization)
  variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
  ours = np.asarray(model.apply(variables, x, train=False))
  with torch.no_grad():
    theirs = hf_model(testing.torch_nchw(x)).logits.numpy()
  assert np.abs(ours).max() > 0.05
  testing.assert_logits_match(hf_class.__name__, ours, theirs, 1e-4)


def test_vit_export_loads_in_transformers(tmp_path):
  model_config = base_config.vit_model_config("vit")
  model_config.update(dict(patch_size=8, hidden_size=96, num_layers=3, num_heads=4, mlp_dim=192))
  config = _config(model_config, 48)  # vit_jax-style: tanh GELU, eps 1e-6.
  config.data.normalization = "minus_one_to_one"
  workdir = tmp_path / "run"
  model, params, _ = _make_workdir(workdir, config, 48)
  out = str(tmp_path / "hf")
  # Through the command line, as a user would.
  subprocess.run([sys.executable, "-m", "vit_jax_ft.pretrained", "export",
                  f"--workdir={workdir}", "--format=huggingface", f"--out={out}"],
                 check=True, cwd=REPO, timeout=300)
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors",
                                     "preprocessor_config.json"]
  _check_transformers_parity(model, params, {}, out, transformers.ViTForImageClassification, 48,
                             "minus_one_to_one")
  # Converting the export back gives the exact same tree.
  back = pretrained.convert(out)
  assert back.metadata["model_options"] == {"gelu_approximate": True, "layer_norm_eps": 1e-6}
  assert back.metadata["class_names"] == CLASSES
  for path, value in conversion.flatten(params).items():
    np.testing.assert_array_equal(conversion.flatten(back.params)[path], value)


def test_resnet_export_loads_in_transformers(tmp_path):
  config = _config(base_config.resnet_model_config("resnet18"), 64)
  workdir = tmp_path / "run"
  model, params, batch_stats = _make_workdir(workdir, config, 64, seed=3)
  out = str(tmp_path / "hf")
  hf_export.export_huggingface(str(workdir), out)
  _check_transformers_parity(model, params, batch_stats, out,
                             transformers.ResNetForImageClassification, 64, "imagenet")
  back = pretrained.convert(out)  # HF basic-block ResNets convert back exactly.
  assert back.metadata["architecture"]["name"] == "resnet18"
  for ours, theirs in ((params, back.params), (batch_stats, back.batch_stats)):
    for path, value in conversion.flatten(ours).items():
      np.testing.assert_array_equal(conversion.flatten(theirs)[path], value)


def test_keras_style_resnet_is_refused(tmp_path):
  model_config = base_config.resnet_model_config("resnet18")
  model_config.update(dict(conv_bias=True, bn_epsilon=1e-3))
  workdir = tmp_path / "run"
  _make_workdir(workdir, _config(model_config, 32), 32)
  with pytest.raises(hf_export.ExportError, match="conv_bias=True"):
    hf_export.export_huggingface(str(workdir), str(tmp_path / "hf"))


@pytest.mark.parametrize("family", ["efficientnet", "bit"])
def test_families_transformers_lacks_are_refused_naming_what_exports(tmp_path, family):
  """EfficientNet and BiT runs have no Hugging Face export: a clear error, nothing written."""
  if family == "efficientnet":
    model_config = base_config.efficientnet_model_config("efficientnet_b0")
  else:
    model_config = base_config.bit_model_config("bit")
    model_config.update(dict(stage_sizes=(1, 1, 1, 1), width_factor=1))
  workdir = tmp_path / "run"
  _make_workdir(workdir, _config(model_config, 32), 32)
  out = tmp_path / "hf"
  with pytest.raises(hf_export.ExportError,
                     match=rf"{model_config.name}\).*exports ViT, ResNet-18/34/50/101/152, "
                           "RegNet and ConvNeXt"):
    hf_export.export_huggingface(str(workdir), str(out))
  assert not out.exists()
