"""Config ranges and dataset sanity checks that stop a run before it starts."""

import os

import pytest
from absl import logging

from vit_jax_ft import base_config
from vit_jax_ft import config_ranges
from vit_jax_ft.training import train
from test_train import tiny_demo_config  # pylint: disable=g-bad-import-order


@pytest.mark.parametrize("key,value,match", [
    ("batch_size", 0, r"config.batch_size=0 must be an integer >= 1"),
    ("eval_batch_size", 0, r"config.eval_batch_size=0 must be an integer >= 1"),
    ("batch_size", -16, r"config.batch_size=-16"),
    ("total_steps", -5, r"config.total_steps=-5"),
    ("optimizer.lr", float("nan"), r"config.optimizer.lr=nan must be > 0"),
    ("optimizer.b2", 1.0, r"config.optimizer.b2=1.0 must be in \[0, 1\)"),
    ("data.mix_prob", 1.5, r"config.data.mix_prob=1.5"),
    ("plateau_factor", 0.0, r"config.plateau_factor=0.0 must be in \(0, 1\)"),
])
def test_out_of_range_field_is_named_and_nothing_is_written(tmp_path, key, value, match):
  config = tiny_demo_config(**{key: value})
  workdir = tmp_path / "run"
  with pytest.raises(ValueError, match=match):
    train.train_and_evaluate(config, str(workdir))
  assert not workdir.exists()


def test_every_shipped_config_is_in_range():
  configs = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs")
  import runpy  # pylint: disable=g-import-not-at-top
  for name in sorted(os.listdir(configs)):
    if name.endswith(".py"):
      config_ranges.check_ranges(runpy.run_path(os.path.join(configs, name))["get_config"]())
  config_ranges.check_ranges(base_config.get_base_config())


def test_fields_of_the_other_model_family_are_skipped():
  config = base_config.get_base_config()
  config.model = base_config.resnet_model_config("resnet18")
  config.model.bn_momentum = 1.0
  with pytest.raises(ValueError, match="model.bn_momentum"):
    config_ranges.check_ranges(config)


def _info(train_counts, val_counts=None):
  splits = {"train": {"num_examples": sum(train_counts), "class_counts": train_counts}}
  if val_counts is not None:
    splits["val"] = {"num_examples": sum(val_counts), "class_counts": val_counts}
  return {"multilabel": False, "class_names": ["cat", "dog", "owl"], "splits": splits}


def test_one_class_train_split_is_refused_with_the_class_list():
  config = tiny_demo_config()
  with pytest.raises(ValueError, match=r"1 class\(es\) \(cat: 0, dog: 40, owl: 0\)"):
    train.check_config(config, _info([0, 40, 0]))


def test_eval_split_missing_a_train_class_warns(monkeypatch):
  config = tiny_demo_config()
  warnings = []
  monkeypatch.setattr(logging, "warning", lambda msg, *a: warnings.append(msg % a))
  train.check_config(config, _info([5, 40, 3], [2, 7, 0]))
  assert any("'val' has no examples of 1 class(es)" in w and "owl" in w for w in warnings)
  warnings.clear()
  train.check_config(config, _info([5, 40, 3], [2, 7, 1]))
  assert not [w for w in warnings if "no examples" in w]
