"""TF Model Garden checkpoints: parity with the real Model Garden models, the forms, the errors.

The checkpoints in tests/fixtures/tfmg were written by
tests/fixtures/make_tfmg_checkpoints.py with tf-models-official 2.20.0 (its own
venv; see that script): Model Garden's ResNet-18 (reduced width, ImageNet
1001-class head, BatchNorm epsilon/momentum in a params.yaml), ResNet-50
(reduced width), a small ViT with class token and tanh pre_logits saved as the
trainer saves (optimizer slots, top-level backbone), and a ResNet-RS-style
backbone (another architecture), each with TF's logits for fixed inputs.
`VIT_JAX_FT_TFMG_FULL=DIR` (written by the script's --full) adds the full-size
ResNet-18/50, ViT-Ti/16 and DeiT-recipe ViT-B/16 at 224 px.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax_ft import pretrained
from vit_jax_ft.models import resnet as resnet_lib
from vit_jax_ft.models import vit as vit_lib
from vit_jax_ft.pretrained import sources

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures", "tfmg")
FULL = os.environ.get("VIT_JAX_FT_TFMG_FULL")


def model_for(metadata):
  """Our model as the converted metadata describes it (head included)."""
  arch, options = metadata["architecture"], metadata["model_options"]
  num_classes = metadata["num_classes_original"]
  if arch["family"] == "resnet":
    return resnet_lib.ResNet(num_classes=num_classes, block=arch["block"],
                             stage_sizes=tuple(arch["stage_sizes"]), width=arch["width"],
                             **options)
  return vit_lib.VisionTransformer(
      num_classes=num_classes, patch_size=arch["patch_size"], hidden_size=arch["hidden_size"],
      num_layers=arch["num_layers"], num_heads=arch["num_heads"], mlp_dim=arch["mlp_dim"],
      classifier=arch["classifier"], representation_size=arch.get("representation_size"),
      **options)


def max_logit_difference(folder):
  converted = sources.convert(folder)
  model = model_for(converted.metadata)
  reference = np.load(os.path.join(folder, "reference.npz"))
  worst = 0.0
  for key in reference:
    if key.startswith("input_"):
      logits = model.apply({"params": converted.params, "batch_stats": converted.batch_stats},
                           jnp.asarray(reference[key]), train=False)
      expected = reference["logits_" + key.split("_", 1)[1]]
      worst = max(worst, float(np.abs(np.asarray(logits) - expected).max()))
  return converted, worst


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "vit"])
def test_logits_match_model_garden(name):
  converted, worst = max_logit_difference(os.path.join(FIXTURES, name))
  assert worst < 1e-4, worst
  meta = converted.metadata
  assert meta["format"] == "tf_model_garden" and "TF Model Garden" in meta["origin"]
  assert meta["normalization"] == "imagenet"
  assert meta["unused_source_keys"] == []


def test_resnet_options_and_background_class():
  meta = sources.convert(os.path.join(FIXTURES, "resnet18")).metadata
  assert meta["model_options"] == {
      "variant": "v1.5", "conv_bias": False, "bn_epsilon": 1e-3, "bn_momentum": 0.99,
      "padding": "tf_same", "first_block_projection": True}
  assert meta["batch_norm_options_from"] == "params.yaml"
  assert meta["num_classes_original"] == 1001 and "background" in meta["head"]
  meta50 = sources.convert(os.path.join(FIXTURES, "resnet50")).metadata
  assert meta50["model_options"]["bn_epsilon"] == 1e-5
  assert meta50["model_options"]["bn_momentum"] == 0.9
  assert "assumed" in meta50["batch_norm_options_from"]


def test_vit_options_and_ignored_optimizer_slots():
  meta = sources.convert(os.path.join(FIXTURES, "vit")).metadata
  assert meta["model_options"] == {"gelu_approximate": True, "layer_norm_eps": 1e-6}
  assert meta["architecture"]["representation_size"] == 24
  assert meta["image_size"] == 32
  ignored = meta["ignored_training_state"]
  assert ignored["count"] > 20 and any(".OPTIMIZER_SLOT" in k for k in ignored["examples"])


def _copy_fixture(name, tmp_path):
  out = tmp_path / name
  shutil.copytree(os.path.join(FIXTURES, name), out)
  return out


def test_tar_gz_folder_prefix_and_files_give_the_same_weights(tmp_path):
  folder = _copy_fixture("resnet18", tmp_path)
  archive = tmp_path / "resnet-18-i32.tar.gz"
  with tarfile.open(archive, "w:gz") as tar:
    tar.add(folder, arcname="resnet-18-i32")  # A top folder inside, as downloads have.
  prefix = folder / "ckpt-1234"
  forms = [archive, folder, prefix, f"{prefix}.index", f"{prefix}.data-00000-of-00001"]
  assert {sources.detect_format(str(f)) for f in forms} == {"tf_checkpoint"}
  reference = sources.convert(str(folder))
  for form in forms:
    converted = sources.convert(str(form))
    a = converted.params["stage2_block1"]["proj_conv"]["kernel"]
    np.testing.assert_array_equal(a, reference.params["stage2_block1"]["proj_conv"]["kernel"])
    np.testing.assert_array_equal(converted.batch_stats["bn_init"]["var"],
                                  reference.batch_stats["bn_init"]["var"])
    assert converted.metadata["model_options"]["bn_epsilon"] == 1e-3  # params.yaml found.
  assert "resnet-18-i32/ckpt-1234" in sources.convert(str(archive)).metadata["tf_checkpoint"]


def test_truncated_data_file_names_the_file(tmp_path):
  folder = _copy_fixture("resnet50", tmp_path)
  data = folder / "ckpt-1234.data-00000-of-00001"
  data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
  with pytest.raises(pretrained.CheckpointFileError) as e:
    sources.convert(str(folder))
  message = str(e.value)
  assert "\n" not in message and "ckpt-1234" in message and "truncated" in message


def test_truncated_index_and_archive_name_the_file(tmp_path):
  folder = _copy_fixture("vit", tmp_path)
  archive = tmp_path / "vit.tar.gz"
  with tarfile.open(archive, "w:gz") as tar:
    tar.add(folder, arcname="vit")
  archive.write_bytes(archive.read_bytes()[:4000])
  with pytest.raises(pretrained.CheckpointFileError, match="vit.tar.gz"):
    sources.convert(str(archive))
  index = folder / "ckpt-1234.index"
  index.write_bytes(index.read_bytes()[:100])
  with pytest.raises(pretrained.CheckpointFileError) as e:
    sources.convert(str(folder))
  assert "\n" not in str(e.value) and "ckpt-1234" in str(e.value)


def test_checkpoint_with_only_optimizer_state_is_refused(tmp_path):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  optimizer = tf.Module()
  optimizer.iterations = tf.Variable(7, dtype=tf.int64)
  optimizer.momentum = [tf.Variable(np.ones((3, 3, 3, 8), np.float32))]
  prefix = tf.train.Checkpoint(optimizer=optimizer, global_step=tf.Variable(7)).save(
      str(tmp_path / "ckpt"))
  with pytest.raises(pretrained.ConversionError) as e:
    sources.convert(prefix)
  message = str(e.value)
  assert "\n" not in message and "ckpt-1" in message and "only training state" in message


def test_another_architecture_is_refused():
  with pytest.raises(pretrained.ConversionError) as e:
    sources.convert(os.path.join(FIXTURES, "resnet_rs"))
  message = str(e.value)
  assert "\n" not in message and "resnet_rs" in message and "neither" in message


def test_load_for_finetuning_loads_every_backbone_tensor(tmp_path):
  folder = os.path.join(FIXTURES, "resnet18")
  meta = sources.convert(folder).metadata
  arch = meta["architecture"]
  model = resnet_lib.ResNet(num_classes=3, block=arch["block"],
                            stage_sizes=tuple(arch["stage_sizes"]), width=arch["width"],
                            **meta["model_options"])
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)
  result = pretrained.load_for_finetuning(
      folder, model, variables["params"], variables["batch_stats"], image_size=32,
      cache_dir=str(tmp_path))
  assert not result.report.problems()
  assert sorted(p for p, _ in result.report.new) == ["params/head/bias", "params/head/kernel"]
  assert {p for p, _ in result.report.skipped_head} == {"params/head/bias", "params/head/kernel"}
  # The model options are checked: a torch-padded model is refused, naming the field.
  torch_model = model.clone(padding="torch")
  with pytest.raises(pretrained.PretrainedMismatchError, match="model.padding"):
    pretrained.load_for_finetuning(folder, torch_model, variables["params"],
                                   variables["batch_stats"], image_size=32,
                                   cache_dir=str(tmp_path))


def test_finetune_through_main_from_a_model_garden_vit(tmp_path):
  from vit_jax_ft.training import train  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  from test_train import tiny_demo_config  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  config = tiny_demo_config(total_steps=2, **{"optimizer.warmup_steps": 1})
  config.model.patch_size, config.model.representation_size = 8, 24
  config.init_from = str(_copy_fixture("vit", tmp_path) / "ckpt-1234")
  config.data.normalization = "auto"
  config.init_cache_dir = str(tmp_path / "cache")
  workdir = tmp_path / "run"
  train.train_and_evaluate(config, str(workdir))
  with open(workdir / "pretrained.json") as f:
    record = json.load(f)
  assert record["metadata"]["format"] == "tf_model_garden"
  assert re.search(r"missing from checkpoint\s+0\s", record["report"]), record["report"]
  with open(workdir / "config.json") as f:
    assert json.load(f)["data"]["normalization"] == "imagenet"


def test_command_line_convert_and_inspect(tmp_path):
  folder = _copy_fixture("resnet50", tmp_path)
  archive = tmp_path / "resnet-50-i32.tar.gz"
  with tarfile.open(archive, "w:gz") as tar:
    tar.add(folder, arcname="resnet-50-i32")
  env = {**os.environ, "PYTHONPATH": REPO}
  out = tmp_path / "converted"
  result = subprocess.run(
      [sys.executable, "-m", "vit_jax_ft.pretrained", "convert", f"--source={archive}",
       f"--out={out}"], capture_output=True, text=True, env=env, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  with open(out / "metadata.json") as f:
    assert json.load(f)["origin"].startswith("TF Model Garden")
  shown = subprocess.run(
      [sys.executable, "-m", "vit_jax_ft.pretrained", "inspect", f"--source={out}"],
      capture_output=True, text=True, env=env, timeout=300, check=False)
  assert shown.returncode == 0 and json.loads(shown.stdout)["format"] == "tf_model_garden"
  assert "TF Model Garden" in shown.stderr and "stage_sizes=[3, 4, 6, 3]" in shown.stderr
  bad = subprocess.run(
      [sys.executable, "-m", "vit_jax_ft.pretrained", "inspect",
       f"--source={os.path.join(FIXTURES, 'resnet_rs')}"],
      capture_output=True, text=True, env=env, timeout=300, check=False)
  assert bad.returncode == 1
  assert bad.stderr.strip().splitlines()[-1].startswith("error: ")


@pytest.mark.skipif(not FULL, reason="set VIT_JAX_FT_TFMG_FULL to the --full fixtures")
@pytest.mark.parametrize("name", ["resnet18", "resnet50", "vit_ti16", "deit_b16"])
def test_full_size_logits_match_model_garden(name):
  converted, worst = max_logit_difference(os.path.join(FULL, name))
  assert worst < 1e-4, worst
  expected = {"resnet18": "resnet18", "resnet50": "resnet50", "vit_ti16": "vit_ti16",
              "deit_b16": "vit_b16"}[name]
  assert converted.metadata["architecture"]["name"] == expected
