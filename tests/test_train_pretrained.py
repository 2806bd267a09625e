"""Fine-tuning from pretrained weights: strict report, fingerprint, normalisation, mismatch."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax_ft import models
from vit_jax_ft import pretrained
from vit_jax_ft.pretrained import conversion
from vit_jax_ft.training import train

from test_train import tiny_demo_config  # pylint: disable=g-bad-import-order


def _write_converted(out_dir, config, *, hidden_size=None, num_classes=1000, seed=1,
                     model_options=None):
  """A converted checkpoint for the tiny demo ViT (random 'pretrained' weights)."""
  model_cfg = config.model.copy_and_resolve_references()
  if hidden_size:
    model_cfg.hidden_size, model_cfg.mlp_dim = hidden_size, 2 * hidden_size
  model = models.create_model(model_cfg, num_classes, jnp.float32)
  x = jnp.zeros((1, config.data.image_size, config.data.image_size, 3))
  params = jax.device_get(model.init(jax.random.PRNGKey(seed), x, train=False)["params"])
  params = jax.tree.map(np.asarray, params)
  converted = conversion.make_converted(
      params, {}, source="test", fmt="test", normalization="minus_one_to_one",
      model_options=model_options or {"gelu_approximate": True, "layer_norm_eps": 1e-6},
      unused=[],
      image_size=config.data.image_size)
  pretrained.save_converted(converted, str(out_dir))
  return params


def test_finetuning_loads_every_backbone_parameter(tmp_path):
  config = tiny_demo_config(total_steps=2, **{"optimizer.warmup_steps": 1})
  source = _write_converted(tmp_path / "weights", config)
  config.init_from = str(tmp_path / "weights")
  config.data.normalization = "auto"
  workdir = tmp_path / "run"
  train.train_and_evaluate(config, str(workdir))

  with open(workdir / "pretrained.json") as f:
    record = json.load(f)
  assert len(record["fingerprint"]) == 16
  assert record["metadata"]["normalization"] == "minus_one_to_one"
  with open(workdir / "config.json") as f:
    assert json.load(f)["data"]["normalization"] == "minus_one_to_one"  # 'auto' resolved.

  # After 2 small steps the backbone is still close to the checkpoint, far
  # from a random init with another seed; the 1000-class head was replaced.
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  mgr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
  params = mgr.restore(mgr.latest_step(), args=ocp.args.StandardRestore())["params"]
  emb, src = params["embedding"]["kernel"], source["embedding"]["kernel"]
  assert np.abs(emb - src).max() < 0.05 * np.abs(src).max()
  assert params["head"]["kernel"].shape[-1] == 10


def test_mismatched_checkpoint_fails_before_the_first_step(tmp_path):
  config = tiny_demo_config(total_steps=2, **{"optimizer.warmup_steps": 1})
  _write_converted(tmp_path / "weights", config, hidden_size=48)
  config.init_from = str(tmp_path / "weights")
  with pytest.raises(pretrained.PretrainedMismatchError):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run" / "checkpoints" / "1")


# What Hugging Face ViT weights record: exact GELU, LayerNorm epsilon 1e-12.
_HF_OPTIONS = {"gelu_approximate": False, "layer_norm_eps": 1e-12}


def test_model_options_come_from_the_weights(tmp_path):
  config = tiny_demo_config(total_steps=2, **{"optimizer.warmup_steps": 1})
  assert config.model.gelu_approximate and config.model.layer_norm_eps == 1e-6
  _write_converted(tmp_path / "weights", config, model_options=_HF_OPTIONS)
  config.init_from = str(tmp_path / "weights")
  train.train_and_evaluate(config, str(tmp_path / "run"))  # A strict load: options must fit.
  with open(tmp_path / "run" / "config.json") as f:
    model = json.load(f)["model"]
  assert (model["gelu_approximate"], model["layer_norm_eps"]) == (False, 1e-12)
  assert config.model.gelu_approximate  # The caller's config is left as it was.

  # Resuming needs neither the weights nor the network: the first run recorded the options.
  shutil.rmtree(tmp_path / "weights")
  config.total_steps = 3
  train.train_and_evaluate(config, str(tmp_path / "run"))
  with open(tmp_path / "run" / "config.json") as f:
    model = json.load(f)["model"]
  assert (model["gelu_approximate"], model["layer_norm_eps"]) == (False, 1e-12)


def test_config_model_options_kept_on_request_and_then_mismatch(tmp_path):
  config = tiny_demo_config(total_steps=2, **{"optimizer.warmup_steps": 1})
  _write_converted(tmp_path / "weights", config, model_options=_HF_OPTIONS)
  config.init_from = str(tmp_path / "weights")
  config.init_model_options = False
  with pytest.raises(pretrained.PretrainedMismatchError, match="gelu_approximate"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
