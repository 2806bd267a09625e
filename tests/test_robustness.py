"""A diverging run never leaves (or reads back) a checkpoint with NaN/Inf in it."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from test_train import assert_same_leaves  # pylint: disable=g-bad-import-order
from test_train import tiny_demo_config  # pylint: disable=g-bad-import-order
from test_train import train_until_killed  # pylint: disable=g-bad-import-order
from vit_jax_ft import checkpoints
from vit_jax_ft import models
from vit_jax_ft import workdir as workdir_lib
from vit_jax_ft.pretrained import hf_export
from vit_jax_ft.training import optim
from vit_jax_ft.training import steps
from vit_jax_ft.training import train


def _saved_steps(workdir):
  directory = os.path.join(workdir, "checkpoints")
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def test_diverging_run_keeps_only_finite_checkpoints_and_names_the_last(tmp_path):
  """The issue's reproduction: lr=1e3, a checkpoint every 2 steps."""
  workdir = str(tmp_path)
  config = tiny_demo_config(**{"optimizer.lr": 1e3, "checkpoint_every_steps": 2})
  with pytest.raises(FloatingPointError) as e:
    train.train_and_evaluate(config, workdir)
  saved = _saved_steps(workdir)
  for step in saved:  # Every checkpoint left is one a rerun may resume from.
    tree = ocp.StandardCheckpointer().restore(
        os.path.join(workdir, "checkpoints", str(step), "default"))
    # Checked here with NumPy, not the code under test.
    arrays = [np.asarray(x) for x in jax.tree.leaves(tree)]
    arrays = [x for x in arrays if np.issubdtype(x.dtype, np.floating)]
    bad = sum(not np.isfinite(x).all() for x in arrays)
    assert arrays and bad == 0, f"checkpoint {step}: {bad} of {len(arrays)} arrays not finite"
  message = str(e.value)
  if not saved:
    assert "No checkpoint was saved" in message, message
    return
  assert f"last finite checkpoint is step {max(saved)}" in message, message
  # The advice is accepted: a lower lr with resume_with_changes resumes from that
  # step (whose weights lr=1e3 has already wrecked, so it may diverge again).
  assert "resume_with_changes=True" in message, message
  config = tiny_demo_config(**{"checkpoint_every_steps": 2, "resume_with_changes": True})
  try:
    train.train_and_evaluate(config, workdir)
  except FloatingPointError:
    pass
  with open(os.path.join(workdir, "config_history.jsonl")) as f:
    history = [json.loads(line) for line in f]
  assert history[-1]["step"] == max(saved), history
  assert history[-1]["changes"]["optimizer.lr"][0] == 1e3, history


def _tiny_state():
  config = tiny_demo_config()
  model = models.create_model(config.model, 10, jnp.float32)
  tx = optim.make_optimizer(config.optimizer, optim.learning_rate_schedule(config.optimizer, 10))
  return config, steps.create_train_state(model, tx, config.data.image_size, 0, 1.0)


def test_save_refuses_a_non_finite_state(tmp_path):
  config, state = _tiny_state()
  leaves, treedef = jax.tree.flatten(state.params)
  state = state.replace(params=jax.tree.unflatten(treedef, [leaves[0] * jnp.nan] + leaves[1:]))
  last, _ = checkpoints.make_managers(str(tmp_path), config)
  with pytest.raises(checkpoints.NonFiniteError, match="Step 3: 1 of"):
    checkpoints.save(last, 3, state)
  last.wait_until_finished()
  assert last.latest_step() is None


def test_restore_and_export_refuse_a_checkpoint_with_nan(tmp_path):
  workdir = str(tmp_path)
  config, state = _tiny_state()
  leaves, treedef = jax.tree.flatten(state.params)
  leaves[0] = leaves[0].at[(0,) * leaves[0].ndim].set(jnp.nan)  # One NaN in one array.
  state = state.replace(params=jax.tree.unflatten(treedef, leaves))
  last, best = checkpoints.make_managers(workdir, config)
  # Written past checkpoints.save, as an older version of the code would have.
  for manager in (last, best):
    manager.save(4, args=ocp.args.StandardSave(state),
                 metrics={f"val_{config.best_metric}": 0.5}, force=True)
    manager.wait_until_finished()
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(config.to_dict(), f)
  for which in ("last", "best", "4"):  # What predict and evaluate call.
    with pytest.raises(ValueError, match=r"step 4 of workdir .* 1 of \d+ weight arrays"):
      workdir_lib.restore(workdir, which)
  with pytest.raises(ValueError, match=r"step 4 of workdir .* 1 of \d+ weight arrays"):
    hf_export.read_run(workdir)


def test_count_nonfinite_skips_integer_leaves():
  tree = {"a": np.ones(3, np.float32), "b": np.array([np.inf]), "step": np.int32(5)}
  assert checkpoints.count_nonfinite(tree) == (1, 2)
  assert not checkpoints.all_finite(tree)
  assert checkpoints.all_finite({"a": np.zeros(2)})


def test_a_damaged_dataset_info_names_the_file(tmp_path):
  from vit_jax_ft.data import tfrecords  # pylint: disable=g-import-not-at-top
  path = tmp_path / tfrecords.INFO_FILE
  path.write_text('{"class_names": ["a", "b"], "splits": {"train": ')  # Cut off mid-write.
  with pytest.raises(ValueError, match=rf"{path} is not valid JSON .*line 1.*--overwrite"):
    tfrecords.read_info(str(tmp_path))
  path.write_text("[1, 2]")
  with pytest.raises(ValueError, match=rf"{path} holds a list"):
    tfrecords.read_info(str(tmp_path))


def test_a_pickled_npz_is_refused_without_suggesting_allow_pickle(tmp_path):
  from vit_jax_ft.pretrained import tensor_files  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / "weights.npz")
  np.savez(path, params=np.array([{"kernel": np.zeros(3)}], dtype=object))
  with pytest.raises(tensor_files.CheckpointFileError) as e:
    tensor_files.read_npz(path)["params"]
  assert path in str(e.value) and "pickled Python objects" in str(e.value)
  assert "allow_pickle" not in str(e.value)


def _damage(step_dir):
  data = [os.path.join(root, f) for root, _, files in os.walk(step_dir) for f in files
          if os.sep + "d" + os.sep in os.path.join(root, f)]
  assert data, f"no data files under {step_dir}"
  for path in data:
    os.remove(path)


def test_a_damaged_last_checkpoint_falls_back_to_the_previous_one(tmp_path):
  straight = str(tmp_path / "straight")
  damaged = str(tmp_path / "damaged")
  # A constant schedule: stopping at 8 and extending to 12 is the same trajectory.
  constant = {"optimizer.schedule": "constant"}
  train.train_and_evaluate(tiny_demo_config(total_steps=12, **constant), straight)
  train.train_and_evaluate(tiny_demo_config(total_steps=8, **constant), damaged)
  assert _saved_steps(damaged) == [4, 8]
  _damage(os.path.join(damaged, "checkpoints", "8"))
  results = train.train_and_evaluate(tiny_demo_config(total_steps=12, **constant), damaged)
  assert results["step"] == 12
  # Moved aside (kept for inspection), and the rerun from step 4 is the uninterrupted run.
  assert os.path.isdir(os.path.join(damaged, "checkpoints", "8.damaged"))
  want = ocp.CheckpointManager(os.path.join(straight, "checkpoints")).restore(
      12, args=ocp.args.StandardRestore())["params"]
  got = ocp.CheckpointManager(os.path.join(damaged, "checkpoints")).restore(
      12, args=ocp.args.StandardRestore())["params"]
  jax.tree.map(np.testing.assert_array_equal, got, want)


def test_a_damaged_only_checkpoint_is_named(tmp_path):
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(tiny_demo_config(total_steps=4), workdir)
  _damage(os.path.join(workdir, "checkpoints", "4"))
  with pytest.raises(checkpoints.DamagedCheckpointError,
                     match=r"checkpoints/4 is damaged .*no earlier checkpoint"):
    train.train_and_evaluate(tiny_demo_config(total_steps=8), workdir)


# --- damaged TFRecord shards -------------------------------------------------

def _prepared(tmp_path):
  """A tiny dataset written by the prepare tool (two shards per split); returns (dir, info)."""
  from test_prepare import class_tree, options  # pylint: disable=g-import-not-at-top
  from vit_jax_ft.data import builder  # pylint: disable=g-import-not-at-top
  src = class_tree(tmp_path / "src", {"x": 12, "y": 12})
  out = tmp_path / "prepared"
  return str(out), builder.build(options(src, out, num_shards=2, val_fraction=0.25))


def _shard(data_dir, info, split="train", index=1):
  return os.path.join(data_dir, info["splits"][split]["files"][index])


def _flip_a_middle_byte(path):
  data = bytearray(open(path, "rb").read())
  data[len(data) // 2] ^= 0xFF
  open(path, "wb").write(bytes(data))


def test_a_truncated_shard_is_named_with_the_prepare_command(tmp_path):
  from vit_jax_ft.data import tfrecords  # pylint: disable=g-import-not-at-top
  from vit_jax_ft.inputs import dataset  # pylint: disable=g-import-not-at-top
  data_dir, info = _prepared(tmp_path)
  config = tiny_demo_config(**{"data.source": "tfrecord", "data.dir": data_dir})
  dataset.load_data_info(config, str(tmp_path / "run"))  # Whole: loads.
  path = _shard(data_dir, info)
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.truncate(size - 7)  # A copy cut short.
  with pytest.raises(tfrecords.DamagedShardError) as e:
    dataset.load_data_info(config, str(tmp_path / "run"))
  message = str(e.value)
  assert path in message and f"records {size} bytes, the file has {size - 7}" in message
  assert f"--source={tmp_path / 'src'}" in message and message.endswith("--overwrite")
  assert "\n" not in message


def test_a_corrupt_record_mid_shard_is_named_not_a_dataloss_traceback(tmp_path):
  from vit_jax_ft.data import tfrecords  # pylint: disable=g-import-not-at-top
  from vit_jax_ft.inputs import pipeline  # pylint: disable=g-import-not-at-top
  data_dir, info = _prepared(tmp_path)
  path = _shard(data_dir, info, "val", 0)
  _flip_a_middle_byte(path)  # Same size: only the checksum (and the record's CRC) tell.
  tfrecords.check_shards(data_dir, info, ["val"])  # Sizes only: passes.
  with pytest.raises(tfrecords.DamagedShardError, match=rf"Shard {path} is damaged: its sha256"):
    tfrecords.verify_shards(data_dir, info)
  cfg = tiny_demo_config().data
  with pytest.raises(tfrecords.DamagedShardError, match=rf"Shard {path} is damaged") as e:
    list(pipeline.eval_iterator(cfg, data_dir, info, "val", batch_size=8))
  assert isinstance(e.value.__cause__, tf_errors().DataLossError)
  # An info from before the checks existed: the record's CRC still finds the shard.
  for entry in info["splits"].values():
    del entry["file_bytes"], entry["file_sha256"]
  with pytest.raises(tfrecords.DamagedShardError, match=rf"Shard {path} of split 'val' is "
                     r"damaged \(corrupted record at \d+\); rebuild it with: python -m"):
    list(pipeline.eval_iterator(cfg, data_dir, info, "val", batch_size=8))


def tf_errors():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.errors


def test_an_old_dataset_info_without_shard_sizes_still_loads(tmp_path, caplog):
  from vit_jax_ft.data import tfrecords  # pylint: disable=g-import-not-at-top
  from vit_jax_ft.inputs import dataset  # pylint: disable=g-import-not-at-top
  data_dir, info = _prepared(tmp_path)
  for entry in info["splits"].values():
    del entry["file_bytes"], entry["file_sha256"]
  del info["command"]
  tfrecords.write_info(data_dir, info)
  config = tiny_demo_config(**{"data.source": "tfrecord", "data.dir": data_dir})
  with caplog.at_level("INFO"):
    _, loaded = dataset.load_data_info(config, str(tmp_path / "run"))
  assert loaded["splits"]["train"]["files"] == info["splits"]["train"]["files"]
  assert "records no shard sizes for split 'train'" in caplog.text


def test_training_on_a_damaged_demo_shard_names_it(tmp_path):
  from vit_jax_ft.data import digits  # pylint: disable=g-import-not-at-top
  from vit_jax_ft.data import tfrecords  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path / "digits")
  info = digits.prepare_digits(data_dir)
  path = _shard(data_dir, info, "train", 0)
  _flip_a_middle_byte(path)
  config = tiny_demo_config(**{"data.dir": data_dir})
  with pytest.raises(tfrecords.DamagedShardError,
                     match=rf"Shard {path} is damaged: .*; delete {data_dir} and run again"):
    train.train_and_evaluate(config, str(tmp_path / "run"))


# --- a best checkpoint lost to a kill ----------------------------------------

# Every eval step is a checkpoint step; with the loss as the metric the best
# step is the one with the lowest val loss (usually the last).
_EVERY_4 = {"eval_every_steps": 4, "checkpoint_every_steps": 4, "best_metric": "loss",
            "best_mode": "min", "optimizer.schedule": "constant"}


def _best(workdir):
  manager = ocp.CheckpointManager(os.path.join(workdir, checkpoints.BEST_DIR))
  step = manager.latest_step()
  return step, manager.metrics(step), manager.restore(step, args=ocp.args.StandardRestore())


def _count_val_evals(monkeypatch):
  calls = []
  real = train.evaluate

  def counting(*args, split, **kwargs):
    calls.append(split)
    return real(*args, split=split, **kwargs)

  monkeypatch.setattr(train, "evaluate", counting)
  return calls


def test_a_best_checkpoint_lost_after_the_last_save_is_recovered_on_resume(tmp_path, monkeypatch):
  """Both saves of an eval step write in the background: a kill can land the last one only."""
  straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
  config = tiny_demo_config(**_EVERY_4)
  train.train_and_evaluate(config, straight)
  best_step, best_metrics, best_state = _best(straight)

  real_save = checkpoints.save
  lost = []

  def save_then_die(manager, step, state, *args, **kwargs):
    if step == best_step and manager.directory.name == checkpoints.BEST_DIR and not lost:
      lost.append(step)  # This write never lands ...
      return None
    real_save(manager, step, state, *args, **kwargs)
    if step == best_step and lost:
      manager.wait_until_finished()  # ... while the last checkpoint's does,
      raise KeyboardInterrupt("simulated kill")  # and then the process dies.
    return None

  monkeypatch.setattr(checkpoints, "save", save_then_die)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(config, killed)
  monkeypatch.setattr(checkpoints, "save", real_save)
  assert lost == [best_step] and _saved_steps(killed)[-1] == best_step
  assert _best(killed)[0] != best_step  # The kill lost it.

  val_evals = _count_val_evals(monkeypatch)
  train.train_and_evaluate(config, killed)
  step, metrics, state = _best(killed)
  assert (step, metrics) == (best_step, best_metrics)
  assert_same_leaves(state, best_state, ["params"])
  # One re-evaluation of the restored state, then the evaluations of the rest.
  later = len([s for s in range(best_step + 1, 13) if s % 4 == 0 or s == 12])
  assert val_evals.count(config.data.val_split) == 1 + later + (later == 0)


@pytest.mark.parametrize("min_delta", [0.0, 100.0])  # 100: only the first eval improves.
def test_a_normal_resume_does_not_re_evaluate(tmp_path, monkeypatch, min_delta):
  config = tiny_demo_config(min_delta=min_delta, **_EVERY_4)
  workdir = str(tmp_path / "run")
  train_until_killed(config, workdir, monkeypatch, 8)  # Killed fetching step 9's batch.
  assert _saved_steps(workdir) == [4, 8]
  assert _best(workdir)[0] == (4 if min_delta else 8)
  val_evals = _count_val_evals(monkeypatch)
  train.train_and_evaluate(config, workdir)
  assert val_evals.count(config.data.val_split) == 1  # Step 12's, reused by the final eval.
