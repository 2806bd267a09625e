"""Configs: the base is locked and documented; overrides and typos on the command line."""

import os
import runpy
import subprocess
import sys

import pytest
from ml_collections import config_dict

from vit_jax_ft import base_config
from vit_jax_ft import main as main_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ["demo", "vit_artdl", "vit_skin_cancer", "resnet_artdl", "resnet_skin_cancer",
           "convnext_skin_cancer", "resnet_multilabel_csv",
           "vit_multilabel_csv", "vit_food101"]


def load(name):
  return runpy.run_path(os.path.join(REPO, "configs", f"{name}.py"))["get_config"]()


def run_main(*args, timeout=300):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "vit_jax_ft.main", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_field_is_documented(name):
  keys = base_config.flatten_keys(load(name))
  assert [k for k in keys if k not in base_config.FIELD_DOCS] == []


def test_base_config_is_locked_against_typos():
  config = base_config.get_base_config()
  with pytest.raises(AttributeError, match="lrr"):
    config.optimizer.lrr = 1.0
  with pytest.raises(AttributeError):
    _ = config.optimizer.lrr


def test_experiment_configs_use_the_paper_recipe():
  for name, model in [("vit_artdl", "vit_b16"), ("vit_skin_cancer", "vit_b16"),
                      ("resnet_artdl", "resnet50"), ("resnet_skin_cancer", "resnet50")]:
    config = load(name)
    assert (config.model.name, config.data.image_size, config.batch_size) == (model, 224, 16)
    assert config.optimizer.lr == 1e-4 and config.data.dir is None


def test_unknown_override_keys_suggest_closest():
  config = load("demo")
  unknown = main_lib.unknown_override_keys(
      ["--config.optimizer.lrr=1", "--config.batch_size=8", "--config.optimzer.lr=2"], config)
  assert [k for k, _ in unknown] == ["optimizer.lrr", "optimzer.lr"]
  assert unknown[0][1][0] == "optimizer.lr" and unknown[1][1][0] == "optimizer.lr"


def test_cli_typo_is_one_line_error_naming_key():
  result = run_main("--config=configs/demo.py", "--workdir=/tmp/unused", "--config.optimizer.lrr=1")
  assert result.returncode != 0
  err = result.stderr.strip()
  assert err.splitlines() == ["error: unknown config key 'optimizer.lrr' (in configs/demo.py); "
                              "did you mean optimizer.lr, optimizer.b2, optimizer.b1?"]


def test_cli_config_file_argument_reaches_get_config():
  """'FILE:ARG' is FILE's get_config(ARG): a typo is checked against that config."""
  result = run_main("--config=configs/convnext_skin_cancer.py:convnext_small",
                    "--workdir=/tmp/unused", "--config.model.depthz=1")
  assert result.returncode != 0
  assert result.stderr.strip().splitlines()[-1].startswith(
      "error: unknown config key 'model.depthz' (in configs/convnext_skin_cancer.py)")
  result = run_main("--config=configs/nonexistent.py:x", "--workdir=/tmp/unused")
  assert result.stderr.strip().splitlines()[-1] == (
      "error: config file 'configs/nonexistent.py' does not exist")


def test_skin_cancer_recipe_takes_any_model_name():
  """configs/vit_skin_cancer.py:NAME is the same recipe with NAME's family config."""
  get_config = runpy.run_path(os.path.join(REPO, "configs", "vit_skin_cancer.py"))["get_config"]
  vit, effnet = get_config(), get_config("efficientnet_b0")
  assert vit.model.name == "vit_b16" and "patch_size" in vit.model
  assert effnet.model.to_dict() == base_config.efficientnet_model_config("efficientnet_b0").to_dict()
  for key in ("loss", "optimizer", "data"):
    assert effnet[key].to_dict() == vit[key].to_dict()
  with pytest.raises(ValueError, match="Unknown model.name 'efficientnet_b9'"):
    get_config("efficientnet_b9")


def test_cli_missing_data_names_dataset_and_how_to_get_it(tmp_path):
  result = run_main("--config=configs/resnet_artdl.py", f"--workdir={tmp_path}")
  assert result.returncode != 0
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: config.data.dir is not set.") and "ArtDL" in last
  assert "Traceback" not in result.stderr


def test_cli_overrides_reach_the_run(tmp_path):
  result = run_main("--config=configs/demo.py", f"--workdir={tmp_path}",
                    "--config.optimizer.warmup_steps=100000")
  assert result.returncode != 0
  assert "optimizer.warmup_steps=100000" in result.stderr.strip().splitlines()[-1]


def test_cli_unparsable_value_is_one_line(tmp_path):
  result = run_main("--config=configs/demo.py", f"--workdir={tmp_path}", "--config.batch_size=abc")
  assert result.returncode != 0 and "Traceback" not in result.stderr
  assert result.stderr.strip().splitlines() == [
      "error: flag --config.batch_size=abc: invalid literal for int() with base 10: 'abc'"]
  result = run_main("--config=configs/demo.py", f"--workdir={tmp_path}", "--config.batch_size=None")
  assert result.stderr.strip().splitlines() == [
      "error: config.batch_size cannot be None (it is 64; not an optional field)"]


def test_cli_switches_from_epochs_to_total_steps(tmp_path):
  # The run gets as far as the schedule check, which names total_steps=7.
  result = run_main("--config=configs/demo.py", f"--workdir={tmp_path}",
                    "--config.num_epochs=None", "--config.total_steps=7")
  assert result.returncode != 0 and "Traceback" not in result.stderr
  assert "total_steps=7)" in result.stderr.strip().splitlines()[-1]


def test_tfds_config_fails_fast_without_prepared_data(tmp_path):
  result = run_main("--config=configs/vit_food101.py", f"--workdir={tmp_path}",
                    f"--config.data.tfds_dir={tmp_path}/no_tfds", timeout=60)
  assert result.returncode != 0
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error:") and "food101" in last and "tfds build" in last


def test_model_family_switch_replaces_fields():
  config = load("resnet_artdl")
  assert "patch_size" not in config.model and config.model.variant == "v1.5"
  assert isinstance(config.model, config_dict.ConfigDict)


def test_readme_config_reference_is_current():
  with open(os.path.join(REPO, "README.md")) as f:
    readme = f.read()
  start = readme.index("<!-- config-reference:start -->\n") + len("<!-- config-reference:start -->\n")
  end = readme.index("\n<!-- config-reference:end -->")
  assert readme[start:end] == base_config.reference_table(), (
      "README config reference is stale; paste the output of `python -m vit_jax_ft.base_config`")


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_optimizer_controls_resolve_on_their_model(name):
  """A freeze pattern that matches nothing, or a head-only phase without a head,
  would only fail at the first step of a real run: resolve them here."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from vit_jax_ft import workdir  # pylint: disable=import-outside-toplevel
  from vit_jax_ft.training import optim  # pylint: disable=import-outside-toplevel
  config = load(name)
  model = workdir.build_model(config, 9)
  size = config.data.image_size
  variables = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)), train=False))
  groups = optim.param_groups(config.optimizer, variables["params"],
                              variables.get("batch_stats"))
  if config.model.name == "resnet50" and config.optimizer.freeze:  # resnet_small_data
    # Every BatchNorm layer in inference mode; only stages 3-4 and the head train.
    assert len(groups.frozen_batch_norms(variables["batch_stats"])) == 53
    trained = sorted(set(groups.shapes) - groups.frozen)
    assert trained and all(p.startswith(("stage3_", "stage4_", "head/")) for p in trained)
    assert any(p.startswith("stage3_") for p in trained) and "head/kernel" in trained
    assert not any("bn" in p for p in trained)
