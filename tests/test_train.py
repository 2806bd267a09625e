"""The train loop: steps lower the loss, accumulation, resume equality, NaN abort, the demo."""

import functools
import json
import os
import runpy
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from vit_jax_ft import base_config
from vit_jax_ft import models
from vit_jax_ft.inputs import pipeline
from vit_jax_ft.models import resnet
from vit_jax_ft.training import losses
from vit_jax_ft.training import optim
from vit_jax_ft.training import steps
from vit_jax_ft.training import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_demo_config(**overrides):
  """The demo config shrunk to a few seconds of training."""
  config = runpy.run_path(os.path.join(REPO, "configs", "demo.py"))["get_config"]()
  config.model.hidden_size = 32
  config.model.mlp_dim = 64
  config.model.num_layers = 2
  config.model.num_heads = 2
  config.batch_size = 32
  config.eval_batch_size = 64
  config.num_epochs = None
  config.total_steps = 12
  config.optimizer.warmup_steps = 2
  config.log_every_steps = 4
  config.eval_every_steps = 6
  config.checkpoint_every_steps = 4
  config.final_report = False  # Reports have their own tests; keep these fast.
  for key, value in overrides.items():
    node = config
    *path, leaf = key.split(".")
    for p in path:
      node = node[p]
    node[leaf] = value
  return config


def train_until_killed(config, workdir, monkeypatch, batch_index):
  """Runs train_and_evaluate on `workdir` until the fetch of batch `batch_index` (0-based) kills it."""
  real_iterator = pipeline.train_iterator

  def crashing_iterator(*args, **kwargs):
    for i, batch in enumerate(real_iterator(*args, **kwargs)):
      if i == batch_index:
        raise KeyboardInterrupt("simulated kill")
      yield batch

  monkeypatch.setattr(pipeline, "train_iterator", crashing_iterator)
  try:
    with pytest.raises(KeyboardInterrupt):
      train.train_and_evaluate(config, workdir)
  finally:
    monkeypatch.setattr(pipeline, "train_iterator", real_iterator)


def assert_same_leaves(a, b, keys):
  """Every array under each of `keys` is bit-equal between the restored states `a` and `b`."""
  for key in keys:
    leaves_a, leaves_b = jax.tree.leaves(a[key]), jax.tree.leaves(b[key])
    assert len(leaves_a) == len(leaves_b) > 0
    for x, y in zip(leaves_a, leaves_b):
      np.testing.assert_array_equal(x, y)


def fixed_batch(num_classes=4, size=32, n=16, seed=0):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, num_classes, n)
  images = rng.normal(size=(n, size, size, 3)).astype(np.float32)
  images += labels[:, None, None, None]  # Learnable from the mean intensity.
  return {"image": jnp.asarray(images), "targets": jax.nn.one_hot(labels, num_classes)}


def make_step(model, lr=1e-3, accum_steps=1, loss_name="ce"):
  opt = base_config.get_base_config().optimizer
  opt.lr, opt.warmup_steps = lr, 0
  tx = optim.make_optimizer(opt, optim.learning_rate_schedule(opt, 100))
  loss_cfg = base_config.get_base_config().loss
  loss_cfg.name = loss_name
  fn = jax.jit(functools.partial(steps.train_step, model=model, tx=tx,
                                 loss_fn=losses.get_loss_fn(loss_cfg), accum_steps=accum_steps))
  return fn, tx


def tiny_vit(num_classes=4, dropout=0.0):
  cfg = base_config.vit_model_config("vit")
  cfg.patch_size, cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.mlp_dim = 8, 32, 2, 2, 64
  cfg.dropout_rate = dropout
  return models.create_model(cfg, num_classes, jnp.float32)


@pytest.mark.parametrize("family", ["vit", "resnet"])
def test_train_step_lowers_loss_on_fixed_batch(family):
  if family == "vit":
    model = tiny_vit()
  else:
    model = resnet.ResNet(num_classes=4, stage_sizes=(1, 1), block="basic", width=8)
  step_fn, tx = make_step(model, lr=3e-3)
  state = steps.create_train_state(model, tx, 32, seed=0)
  batch = fixed_batch()
  first = None
  for _ in range(30):
    state, m = step_fn(state, batch)
    first = float(m["loss"]) if first is None else first
  assert int(state.step) == 30
  assert float(m["loss"]) < 0.5 * first
  if family == "resnet":  # BatchNorm running statistics moved off their init.
    assert not np.allclose(state.batch_stats["bn_init"]["mean"], 0.0)


def test_gradient_accumulation_matches_one_large_batch():
  # Plain SGD makes the update the averaged gradient itself (Adam would blow
  # up float rounding on near-zero gradients).
  model = tiny_vit()
  batch = fixed_batch(n=16)
  loss_fn = losses.get_loss_fn(base_config.get_base_config().loss)
  tx = optax.sgd(1.0)
  results = []
  for accum in (1, 4):
    step_fn = jax.jit(functools.partial(steps.train_step, model=model, tx=tx, loss_fn=loss_fn,
                                        accum_steps=accum))
    state = steps.create_train_state(model, tx, 32, seed=0)
    for _ in range(3):
      state, m = step_fn(state, batch)
    results.append((state.params, float(m["loss"]), float(m["grad_norm"])))
  (p1, l1, g1), (p4, l4, g4) = results
  np.testing.assert_allclose(l1, l4, rtol=1e-5)
  np.testing.assert_allclose(g1, g4, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def _final_params(workdir):
  mgr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
  restored = mgr.restore(mgr.latest_step(), args=ocp.args.StandardRestore())
  return mgr.latest_step(), restored


def test_killed_run_resumes_to_the_same_parameters(tmp_path, monkeypatch):
  config = tiny_demo_config()
  straight = str(tmp_path / "straight")
  train.train_and_evaluate(config, straight)

  # Crash while fetching the batch of step 11: checkpoints exist for steps 4
  # and 8, so steps 9-10 are lost and must be redone identically.
  crashed = str(tmp_path / "crashed")
  train_until_killed(config, crashed, monkeypatch, 10)
  assert _final_params(crashed)[0] == 8
  results = train.train_and_evaluate(config, crashed)

  step_a, state_a = _final_params(straight)
  step_b, state_b = _final_params(crashed)
  assert step_a == step_b == results["step"] == 12
  for key in ("params", "opt_state", "rng"):
    for a, b in zip(jax.tree.leaves(state_a[key]), jax.tree.leaves(state_b[key])):
      np.testing.assert_array_equal(a, b)


def test_nan_loss_aborts_with_clear_error(tmp_path):
  config = tiny_demo_config(**{"optimizer.lr": 1e30, "optimizer.grad_clip_norm": 0.0,
                               "total_steps": 8})
  with pytest.raises(FloatingPointError, match="Train loss is nan at step"):
    train.train_and_evaluate(config, str(tmp_path))


def test_multilabel_data_rejects_softmax_loss(tmp_path):
  info = {"multilabel": True, "class_names": ["a", "b"], "splits": {}}
  config = tiny_demo_config()
  with pytest.raises(ValueError, match="multi-label.*sigmoid_bce"):
    train.check_config(config, info)


def test_total_steps_from_epochs_and_exclusive():
  config = tiny_demo_config()
  assert train.total_train_steps(config, 1000) == 12
  config.total_steps, config.num_epochs = None, 2.0
  assert train.total_train_steps(config, 1000) == 63  # ceil(2 * 1000 / 32)
  config.total_steps = 5
  with pytest.raises(ValueError, match="exactly one of"):
    train.total_train_steps(config, 1000)


def test_demo_command_trains_writes_results_and_resumes(tmp_path):
  """The README's main command, shortened: artefacts, then a rerun resumes."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "vit_jax_ft.main", "--config=configs/demo.py",
         f"--workdir={tmp_path}", "--config.num_epochs=2", "--config.eval_every_steps=20",
         "--config.optimizer.warmup_steps=5"]
  first = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert first.returncode == 0, first.stderr[-2000:]
  assert "orbax" not in first.stderr.lower()  # Library INFO spam is filtered.
  files = os.listdir(tmp_path)
  assert {"config.json", "eval_results.json", "checkpoints", "checkpoints_best"} <= set(files)
  assert any(f.startswith("events.out.tfevents") for f in files)
  report_dirs = os.listdir(tmp_path / "reports")
  assert any(d.startswith("test_") for d in report_dirs)  # The end-of-run report.
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["num_epochs"] == 2.0
  with open(tmp_path / "eval_results.json") as f:
    results = json.load(f)
  assert results["step"] == 45 and results["test_num_examples"] == 180  # ceil(2*1437/64)
  second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert second.returncode == 0
  assert "Resumed from" in second.stderr and "Training already complete at step 45" in second.stderr


def test_tensorboard_has_learning_rate_every_step(tmp_path):
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  config = tiny_demo_config()
  train.train_and_evaluate(config, str(tmp_path))
  acc = event_accumulator.EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
  acc.Reload()
  lr = [(e.step, float(jax.numpy.asarray(tf_value(e)))) for e in acc.Tensors("learning_rate")]
  assert [s for s, _ in lr] == list(range(1, 13))
  assert lr[0][1] == pytest.approx(1e-3 / 2) and lr[1][1] == pytest.approx(1e-3)
  assert {"train_loss", "val_accuracy", "val_macro_f1"} <= set(acc.Tags()["tensors"])


def tf_value(event):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.make_ndarray(event.tensor_proto)


def test_full_demo_reaches_95_percent_test_accuracy(tmp_path):
  """configs/demo.py exactly as the README runs it (about 30 s of training)."""
  config = runpy.run_path(os.path.join(REPO, "configs", "demo.py"))["get_config"]()
  results = train.train_and_evaluate(config, str(tmp_path))
  assert results["test_num_examples"] == 180
  assert results["test_accuracy"] >= 0.95


def test_early_stopping_stops_and_stays_stopped(tmp_path):
  # min_delta is so large that only the first evaluation counts as improving.
  config = tiny_demo_config(total_steps=40, eval_every_steps=2, early_stopping_patience=2,
                            best_metric="loss", best_mode="min", min_delta=100.0)
  results = train.train_and_evaluate(config, str(tmp_path))
  assert results["step"] == 6  # Best at 2; evals at 4 and 6 without improvement.
  with open(tmp_path / "early_stopped.json") as f:
    assert json.load(f)["best_step"] == 2
  again = train.train_and_evaluate(config, str(tmp_path))
  assert again["step"] == 6


def test_reduce_on_plateau_scales_the_updates(tmp_path):
  config = tiny_demo_config(total_steps=10, eval_every_steps=2, plateau_patience=1,
                            plateau_factor=0.5, best_metric="loss", best_mode="min",
                            min_delta=100.0)
  train.train_and_evaluate(config, str(tmp_path))
  _, state = _final_params(str(tmp_path))
  # Best at step 2, then one reduction per evaluation: steps 4, 6, 8, 10.
  assert float(state["lr_scale"]) == 0.5**4 and int(state["lr_scale_step"]) == 10


def test_lr_scale_multiplies_the_update():
  model = tiny_vit()
  step_fn, tx = make_step(model)
  batch = fixed_batch()
  start = steps.create_train_state(model, tx, 32, seed=0)
  full, _ = step_fn(start, batch)
  half, _ = step_fn(start.replace(lr_scale=jnp.float32(0.5)), batch)
  for p0, p1, ph in zip(*(jax.tree.leaves(s.params) for s in (start, full, half))):
    np.testing.assert_allclose(ph - p0, 0.5 * (p1 - p0), rtol=1e-4, atol=1e-7)
