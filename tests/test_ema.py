"""EMA of the weights: the update by hand, skipped steps, resume, best-by-EMA, evaluation."""

import dataclasses
import functools
import os
import shutil
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from test_train import fixed_batch  # pylint: disable=g-bad-import-order
from test_train import assert_same_leaves
from test_train import tiny_demo_config
from test_train import train_until_killed
from vit_jax_ft import base_config
from vit_jax_ft import config_ranges
from vit_jax_ft import models
from vit_jax_ft import workdir as workdir_lib
from vit_jax_ft.inputs import pipeline
from vit_jax_ft.models import resnet
from vit_jax_ft.pretrained import hf_export
from vit_jax_ft.training import losses
from vit_jax_ft.training import optim
from vit_jax_ft.training import steps
from vit_jax_ft.training import train

EMA_DECAY = 0.9  # With the warmup, min(0.9, (1 + t) / (10 + t)) over 12 steps: never 0.9.


def _loss_fn():
  return losses.get_loss_fn(base_config.get_base_config().loss)


def _saved(workdir, which="checkpoints", step=None):
  """A checkpoint as a plain dict, read by Orbax without a target (not the code under test)."""
  with ocp.CheckpointManager(os.path.join(workdir, which)) as manager:
    step = manager.latest_step() if step is None else step
    return step, manager.restore(step, args=ocp.args.StandardRestore())


@pytest.mark.parametrize("decay,warmup", [(0.2, True), (0.5, False)])
def test_ema_matches_hand_computation(decay, warmup):
  # A ResNet, so that the BatchNorm statistics' average is checked too. With
  # decay 0.2 the warmup (1 + t) / (10 + t) is below it for t = 0, 1 only.
  model = resnet.ResNet(num_classes=4, stage_sizes=(1, 1), block="basic", width=8)
  tx = optax.adam(3e-3)
  step_fn = jax.jit(functools.partial(steps.train_step, model=model, tx=tx, loss_fn=_loss_fn(),
                                      ema=steps.Ema(decay=decay, warmup=warmup)))
  state = steps.init_ema(steps.create_train_state(model, tx, 32, seed=0))
  weights = lambda s: jax.device_get({"params": s.params, "batch_stats": s.batch_stats})
  expected = jax.tree.map(lambda x: np.asarray(x, np.float64), weights(state))
  for t in range(5):
    state, _ = step_fn(state, fixed_batch(seed=t))
    d = min(decay, (1 + t) / (10 + t)) if warmup else decay
    expected = jax.tree.map(lambda e, p: d * e + (1 - d) * np.asarray(p, np.float64),
                            expected, weights(state))
  got = jax.device_get(state.ema)
  assert jax.tree.structure(got) == jax.tree.structure(expected)
  for e, g in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)
  # Not trivially the trained weights: the average lags behind them.
  assert not np.allclose(got["params"]["head"]["kernel"], state.params["head"]["kernel"])
  assert not np.allclose(got["batch_stats"]["bn_init"]["var"],
                         state.batch_stats["bn_init"]["var"])


def test_skipped_float16_step_leaves_the_ema_unchanged():
  model = resnet.ResNet(num_classes=4, stage_sizes=(1,), block="basic", width=8)
  tx = optax.adam(1e-2)
  step_fn = jax.jit(functools.partial(
      steps.train_step, model=model, tx=tx, loss_fn=_loss_fn(),
      scaling=steps.LossScaling(enabled=True), ema=steps.Ema(decay=0.5, warmup=False)))
  state = steps.init_ema(steps.create_train_state(model, tx, 32, seed=0, init_loss_scale=8.0))
  state, _ = step_fn(state, fixed_batch())  # A normal step moves the average.
  before = jax.device_get(state.ema)
  bad = fixed_batch()
  bad["image"] = bad["image"].at[0, 0, 0, 0].set(jnp.nan)  # Non-finite gradients.
  state, m = step_fn(state, bad)
  assert float(m["skipped"]) == 1.0 and int(state.step) == 2
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(state.ema))):
    np.testing.assert_array_equal(a, b)
  state, m = step_fn(state, fixed_batch(seed=1))
  assert float(m["skipped"]) == 0.0
  assert not np.array_equal(before["params"]["head"]["kernel"],
                            state.ema["params"]["head"]["kernel"])


def test_ema_off_keeps_no_copy_of_the_weights():
  model = resnet.ResNet(num_classes=4, stage_sizes=(1,), block="basic", width=8)
  tx = optax.sgd(0.1)
  state = steps.create_train_state(model, tx, 32, seed=0)
  step_fn = jax.jit(functools.partial(steps.train_step, model=model, tx=tx, loss_fn=_loss_fn()))
  state, _ = step_fn(state, fixed_batch())
  assert state.ema == {}
  n_off = len(jax.tree.leaves(state))
  assert len(jax.tree.leaves(steps.init_ema(state))) == n_off + len(
      jax.tree.leaves((state.params, state.batch_stats)))


def test_ema_decay_range():
  config = tiny_demo_config(ema_decay=1.0)
  with pytest.raises(ValueError, match=r"config.ema_decay=1.0 must be in \[0, 1\)"):
    config_ranges.check_ranges(config)


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
  """An uninterrupted 12-step demo run with EMA (checkpoints at 4, 8, 12; evals at 6, 12)."""
  root = tmp_path_factory.mktemp("ema")
  config = tiny_demo_config(ema_decay=EMA_DECAY, **{"data.dir": str(root / "data"),
                                                    "model.head_init": "lecun_normal"})
  workdir = str(root / "straight")
  results = train.train_and_evaluate(config, workdir)
  return config, workdir, results


def test_killed_run_with_ema_resumes_bit_exactly(ema_run, tmp_path, monkeypatch):
  config, straight, results = ema_run
  assert results["weights"] == "ema"
  crashed = str(tmp_path / "crashed")
  # Batch of step 11: steps 9 and 10 are lost and redone.
  train_until_killed(config, crashed, monkeypatch, 10)
  assert _saved(crashed)[0] == 8
  train.train_and_evaluate(config, crashed)
  (step_a, a), (step_b, b) = _saved(straight), _saved(crashed)
  assert step_a == step_b == 12
  assert_same_leaves(a, b, ("params", "ema", "opt_state"))
  # The EMA is a real second set of weights, not a copy of the trained ones.
  assert not np.array_equal(a["ema"]["params"]["head"]["kernel"], a["params"]["head"]["kernel"])


def test_eval_logs_ema_metrics_and_best_checkpoint_keeps_both(ema_run):
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  _, workdir, results = ema_run
  acc = event_accumulator.EventAccumulator(workdir, size_guidance={"tensors": 0})
  acc.Reload()
  tags = set(acc.Tags()["tensors"])
  assert {"val_accuracy", "val_ema_accuracy", "val_ema_loss", "val_ema_macro_f1"} <= tags
  assert [e.step for e in acc.Tensors("val_ema_accuracy")] == [6, 12]
  with ocp.CheckpointManager(os.path.join(workdir, "checkpoints_best")) as best:
    assert set(best.metrics(best.latest_step())) == {"val_accuracy", "val_ema_accuracy"}
  # The final eval's val numbers are the EMA's at step 12 (eval_ema defaults to True).
  ema_loss = [e for e in acc.Tensors("val_ema_loss") if e.step == 12][0]
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  assert results["val_loss"] == pytest.approx(float(tf.make_ndarray(ema_loss.tensor_proto)))


def test_restore_predict_and_export_use_the_ema_weights(ema_run):
  config, workdir, _ = ema_run
  run = workdir_lib.load_run(workdir)
  ck = workdir_lib.restore(workdir, "best")
  assert ck.weights == "ema"
  _, saved = _saved(workdir, "checkpoints_best", ck.step)
  ema_vars = {"params": saved["ema"]["params"]}
  # Manual apply of the saved EMA parameters on the test split.
  manual = []
  for batch in pipeline.eval_iterator(config.data, run.data_dir, run.info, "test",
                                            batch_size=64):
    logits = run.model.apply(ema_vars, batch["image"], train=False)
    manual.append(np.asarray(jax.nn.softmax(logits))[batch["mask"] > 0])
  manual = np.concatenate(manual)
  preds = workdir_lib.predict_split(run, ck, "test")  # What evaluate and predict run.
  np.testing.assert_allclose(preds.probs, manual, atol=1e-6)
  raw_ck = workdir_lib.restore(workdir, "best", ema=False)
  assert raw_ck.weights == "raw"
  for x, y in zip(jax.tree.leaves(raw_ck.variables["params"]), jax.tree.leaves(saved["params"])):
    np.testing.assert_array_equal(x, y)
  raw = workdir_lib.predict_split(run, raw_ck, "test")
  assert np.abs(raw.probs - manual).max() > 1e-3  # The choice of weights matters here.
  # Export: the last checkpoint's EMA parameters.
  _, params, _, step = hf_export.read_run(workdir)
  _, last = _saved(workdir, "checkpoints")
  assert step == 12
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(last["ema"]["params"])):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("best_on_ema", [True, False])
def test_best_on_ema_selects_by_the_ema_metric(tmp_path, monkeypatch, best_on_ema):
  # Scripted accuracies per evaluation (steps 2, 4, 6): the trained weights
  # peak at step 4, the EMA at step 6.
  scripted = {"raw": [0.5, 0.9, 0.6], "ema": [0.7, 0.6, 0.8]}
  calls = {"raw": 0, "ema": 0}
  real_evaluate = train.evaluate

  def fake_evaluate(eval_fn, state, *args, **kwargs):
    metrics = real_evaluate(eval_fn, state, *args, **kwargs)
    kind = "ema" if state.ema and state.params is state.ema["params"] else "raw"
    if kwargs["split"] == "val" and calls[kind] < 3:
      metrics["accuracy"] = scripted[kind][calls[kind]]
      calls[kind] += 1
    return metrics

  monkeypatch.setattr(train, "evaluate", fake_evaluate)
  config = tiny_demo_config(ema_decay=EMA_DECAY, best_on_ema=best_on_ema, total_steps=6,
                            eval_every_steps=2, checkpoint_every_steps=6)
  train.train_and_evaluate(config, str(tmp_path))
  assert calls == {"raw": 3, "ema": 3}
  with ocp.CheckpointManager(str(tmp_path / "checkpoints_best")) as best:
    step = best.latest_step()
    metrics = best.metrics(step)
  if best_on_ema:
    assert step == 6 and metrics == {"val_accuracy": 0.6, "val_ema_accuracy": 0.8}
  else:
    assert step == 4 and metrics == {"val_accuracy": 0.9, "val_ema_accuracy": 0.6}


@flax.struct.dataclass
class OldTrainState:
  """steps.TrainState as checkpoints were written before the EMA field existed."""

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array
  loss_scale: jax.Array
  good_steps: jax.Array
  lr_scale: jax.Array
  lr_scale_step: jax.Array


def test_checkpoint_without_ema_field_resumes_to_the_same_result(tmp_path, caplog):
  data = str(tmp_path / "data")
  config = tiny_demo_config(keep_checkpoints=3, **{"data.dir": data})
  straight = str(tmp_path / "straight")
  results = train.train_and_evaluate(config, straight)
  assert results["weights"] == "raw" and "val_ema_accuracy" not in results
  step, final = _saved(straight)
  assert step == 12 and final["ema"] == {}  # EMA off: no copy of the weights saved.

  # Step 8 rewritten as the code before the EMA field wrote it.
  model = models.create_model(config.model, 10, jnp.float32)
  tx = optim.make_optimizer(config.optimizer, optim.learning_rate_schedule(config.optimizer, 12))
  target = steps.create_train_state(model, tx, config.data.image_size, seed=1)
  with ocp.CheckpointManager(os.path.join(straight, "checkpoints")) as manager:
    at8 = manager.restore(8, args=ocp.args.StandardRestore(target))
  fields = {f.name: getattr(at8, f.name) for f in dataclasses.fields(OldTrainState)}
  old = str(tmp_path / "old")
  with ocp.CheckpointManager(os.path.join(old, "checkpoints")) as manager:
    manager.save(8, args=ocp.args.StandardSave(OldTrainState(**fields)))
    manager.wait_until_finished()
  metadata = ocp.StandardCheckpointer().metadata(os.path.join(old, "checkpoints", "8", "default"))
  assert "ema" not in metadata.item_metadata.tree and "opt_state" in metadata.item_metadata.tree
  with_ema = str(tmp_path / "old_ema")
  shutil.copytree(old, with_ema)

  train.train_and_evaluate(config, old)
  _, resumed = _saved(old)
  for key in ("params", "opt_state", "rng"):
    for x, y in zip(jax.tree.leaves(final[key]), jax.tree.leaves(resumed[key])):
      np.testing.assert_array_equal(x, y)
  assert resumed["ema"] == {}

  # Turning EMA on for such a checkpoint starts the average from its weights.
  caplog.set_level("WARNING")
  ema_results = train.train_and_evaluate(tiny_demo_config(
      keep_checkpoints=3, ema_decay=EMA_DECAY, **{"data.dir": data}), with_ema)
  assert "has no EMA weights" in caplog.text and ema_results["weights"] == "ema"
  _, resumed = _saved(with_ema)
  for x, y in zip(jax.tree.leaves(final["params"]), jax.tree.leaves(resumed["params"])):
    np.testing.assert_array_equal(x, y)  # EMA does not change the training itself.
  assert jax.tree.structure(resumed["ema"]["params"]) == jax.tree.structure(final["params"])
