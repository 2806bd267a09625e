"""A finished (or running) run's config, data, model and weights, and its predictions.

A workdir holds `config.json` (the config as run, 'auto' normalisation
resolved), `checkpoints/` (the last K full train states) and
`checkpoints_best/` (the best one). Only the parameters and BatchNorm
statistics are read back: evaluation needs neither the optimizer state nor
the optimizer that made it.
"""

import dataclasses
import json
import os
from typing import Any, Iterator, Optional

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import tensorflow as tf

from vit_jax_ft import checkpoints
from vit_jax_ft import init_from
from vit_jax_ft import input_pipeline
from vit_jax_ft import models
from vit_jax_ft import train
from vit_jax_ft.evaluators import tta

CONFIG_FILE = "config.json"
LAST_DIR = "checkpoints"
BEST_DIR = "checkpoints_best"


@dataclasses.dataclass(frozen=True)
class Run:
  """What evaluating a run needs besides its weights."""

  workdir: str
  config: ml_collections.ConfigDict
  data_dir: str
  info: dict
  model: nn.Module

  @property
  def class_names(self) -> list[str]:
    return list(self.info["class_names"])

  @property
  def multilabel(self) -> bool:
    return bool(self.info["multilabel"])


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  """Restored weights: `variables` for model.apply, the step and how it was chosen."""

  variables: dict
  step: int
  label: str  # 'best', 'last' or the step number: names the report folder.
  path: str


@dataclasses.dataclass(frozen=True)
class Predictions:
  """A split's probabilities [N, C], multi-hot targets [N, C] and example ids.

  `scores` [N, C] (when known) give the probabilities through softmax/sigmoid:
  the logits, or with test-time augmentation see tta.py; temperature scaling
  divides them.
  """

  probs: np.ndarray
  targets: np.ndarray
  ids: list[str]
  scores: Optional[np.ndarray] = None

  @property
  def labels(self) -> np.ndarray:
    """Single-label class indices [N]."""
    return self.targets.argmax(axis=1)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config as run, from WORKDIR/config.json."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: is {workdir!r} the workdir of a training run?")
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  if config.data.normalization == "auto":  # Written before 'auto' was resolved.
    config.data.normalization = init_from.resolve_normalization(config, workdir, None)
  return config


def load_run(workdir: str, config: Optional[ml_collections.ConfigDict] = None) -> Run:
  """Config (default: WORKDIR/config.json), dataset info and model of a run."""
  if config is None:
    config = load_config(workdir)
  elif config.data.normalization == "auto":  # The config as given, not as run.
    config = config.copy_and_resolve_references()
    config.data.normalization = init_from.resolve_normalization(config, workdir, None)
  data_dir, info = train.load_data_info(config, workdir)
  model = models.create_model(config.model, len(info["class_names"]), jnp.dtype(config.dtype))
  return Run(workdir=workdir, config=config, data_dir=data_dir, info=info, model=model)


def _manager(workdir: str, which: str) -> ocp.CheckpointManager:
  directory = os.path.join(os.path.abspath(workdir), BEST_DIR if which == "best" else LAST_DIR)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"No checkpoints at {directory}.")
  return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False),
                               item_handlers=ocp.StandardCheckpointHandler())


def find_step(workdir: str, which: str) -> tuple[ocp.CheckpointManager, int]:
  """(manager, step) for `which`: 'best', 'last' or a step number (in either folder)."""
  if which in ("best", "last"):
    manager = _manager(workdir, which)
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f"No {which} checkpoint in {manager.directory}.")
    return manager, step
  if not which.isdigit():
    raise ValueError(f"--checkpoint must be 'best', 'last' or a step number, got {which!r}.")
  available = []
  for kind in ("last", "best"):
    try:
      manager = _manager(workdir, kind)
    except FileNotFoundError:
      continue
    if int(which) in manager.all_steps():
      return manager, int(which)
    available += manager.all_steps()
  raise FileNotFoundError(f"No checkpoint for step {which} in {workdir}; "
                          f"available: {sorted(set(available))}.")


def restore(workdir: str, which: str = "best") -> Checkpoint:
  """Parameters and BatchNorm statistics of checkpoint `which` (on the default device)."""
  manager, step = find_step(workdir, which)
  path = os.path.join(str(manager.directory), str(step), "default")
  tree = manager.item_metadata(step)
  tree = getattr(tree, "tree", tree)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          {"params": tree["params"], "batch_stats": tree["batch_stats"]})
  # partial_restore reads only these two entries, not the optimizer state.
  restored = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
      item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
      partial_restore=True))
  variables = {"params": restored["params"]}
  if restored["batch_stats"]:
    variables["batch_stats"] = restored["batch_stats"]
  check_finite(variables, workdir, step)
  logging.info("Restored %s checkpoint at step %d from %s.", which, step, manager.directory)
  return Checkpoint(variables=variables, step=step, label=which, path=path)


def check_finite(variables: Any, workdir: str, step: int) -> None:
  """Refuses weights holding NaN/Inf: they would predict NaN without any error."""
  bad, total = checkpoints.count_nonfinite(variables)
  if bad:
    raise ValueError(f"Checkpoint step {step} of workdir {workdir} is not finite: {bad} of "
                     f"{total} weight arrays hold NaN or Inf (did training diverge?); pick an "
                     "earlier --checkpoint or retrain with a lower optimizer.lr.")


def from_state(state: Any) -> Checkpoint:
  """A Checkpoint of an in-memory steps.TrainState (at the end of training: 'last')."""
  variables = {"params": state.params}
  if state.batch_stats:
    variables["batch_stats"] = state.batch_stats
  return Checkpoint(variables=variables, step=int(state.step), label="last", path="")


def make_apply(model: nn.Module, multilabel: bool):
  """jitted (variables, images) -> probabilities (sigmoid or softmax, float32)."""
  activation = jax.nn.sigmoid if multilabel else jax.nn.softmax
  return jax.jit(lambda v, x: activation(model.apply(v, x, train=False)))


def split_ids(data_dir: str, info: dict, split: str) -> list[str]:
  """Example ids of `split` in eval order (its records' 'id'; the index if absent)."""
  ids = []
  spec = {"id": tf.io.FixedLenFeature([], tf.string, default_value="")}
  for shard in input_pipeline.split_shards(data_dir, info, split):
    records = tf.data.TFRecordDataset(shard.path).skip(shard.skip).take(shard.take)
    ds = records.map(lambda r: tf.io.parse_single_example(r, spec)["id"]).batch(1024)
    for batch in ds.as_numpy_iterator():
      ids += [b.decode("utf-8", "replace") for b in batch]
  return [i or f"#{n}" for n, i in enumerate(ids)]


def _batches(run: Run, split: str, batch_size: int) -> Iterator[dict]:
  return input_pipeline.eval_iterator(run.config.data, run.data_dir, run.info, split,
                                      batch_size=batch_size)


def predict_split(run: Run, checkpoint: Checkpoint, split: str,
                  batch_size: Optional[int] = None, tta_mode: str = "none") -> Predictions:
  """Probabilities and scores over every example of `split` (padding rows dropped).

  `tta_mode`: test-time augmentation ('none', 'flip', 'dihedral'; tta.py).
  """
  apply = tta.make_apply(run.model, run.multilabel, tta_mode)
  probs, scores, targets = [], [], []
  for batch in _batches(run, split, batch_size or run.config.eval_batch_size):
    keep = batch["mask"] > 0
    out, score = apply(checkpoint.variables, batch["image"])
    probs.append(np.asarray(out, np.float64)[keep])
    scores.append(np.asarray(score, np.float64)[keep])
    targets.append(batch["targets"][keep])
  ids = split_ids(run.data_dir, run.info, split)
  probs, targets = np.concatenate(probs), np.concatenate(targets)
  if len(ids) != len(probs):  # An id per record; eval visits each record once.
    raise ValueError(f"Split {split!r}: {len(probs)} predictions but {len(ids)} records.")
  return Predictions(probs=probs, targets=targets, ids=ids, scores=np.concatenate(scores))
