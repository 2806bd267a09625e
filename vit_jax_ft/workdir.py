"""The one owner of a run's folder: its paths, config, weights, model and predictions.

A workdir holds `config.json` (the config as run, 'auto' normalisation
resolved), `pretrained.json` (with init_from: the load report and the
weights' metadata), `checkpoints/` (the last K full train states),
`checkpoints_best/` (the best one) and `reports/`. The train loop writes
them; evaluate, predict, explain and export read them back through here.
A run with `ema_decay` > 0 and `eval_ema` (see checkpoints.evaluates_ema) is
evaluated with the EMA of its weights.
"""

import contextlib
import dataclasses
import fcntl
import json
import os
import socket
import time
from typing import Any, Iterator, Optional

from absl import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vit_jax_ft import base_config
from vit_jax_ft import checkpoints
from vit_jax_ft import models
from vit_jax_ft.inputs import dataset
from vit_jax_ft.inputs import pipeline
from vit_jax_ft.models import layer_impl
from vit_jax_ft.models import tta as tta_lib

CONFIG_FILE = "config.json"
CONFIG_HISTORY_FILE = "config_history.jsonl"
LOCK_FILE = "run.lock"
PRETRAINED_FILE = "pretrained.json"
REPORTS_DIR = "reports"
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def thresholds_path(workdir: str, label: str, tta: str = "none") -> str:
  """Where the tuned multi-label thresholds of checkpoint `label` (and TTA mode) are kept."""
  return os.path.join(workdir, REPORTS_DIR, f"thresholds_{label}{tta_lib.suffix(tta)}.json")


def temperature_path(workdir: str, label: str, tta: str = "none") -> str:
  """Where the temperature fitted for checkpoint `label` (and TTA mode) is kept."""
  return os.path.join(workdir, REPORTS_DIR, f"temperature_{label}{tta_lib.suffix(tta)}.json")


def build_model(config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
  """The model of `config` (compute dtype config.dtype; parameters stay float32)."""
  if config.dtype not in DTYPES:
    raise ValueError(f"config.dtype must be one of {sorted(DTYPES)}, got {config.dtype!r}.")
  return models.create_model(config.model, num_classes, DTYPES[config.dtype])


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """WORKDIR/config.json: the config as run ('auto' resolved), to reproduce or read it back."""
  if jax.process_index() == 0:
    with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
      f.write(config.to_json_best_effort(indent=2))


class WorkdirBusyError(ValueError):
  """Another process is training in this workdir (a bad --workdir: one-line error in the tools)."""


@contextlib.contextmanager
def lock(workdir: str) -> Iterator[None]:
  """Holds WORKDIR/run.lock for the duration: one training run per workdir.

  An advisory `flock`, so the operating system releases it when the holder
  dies (kill -9 included): a stale lock file is simply taken over. In a
  multi-host job only process 0 locks (the others share its filesystem).
  The file records the holder (host, pid, start time) for the message the
  next run gets.
  """
  if jax.process_index() != 0:
    yield
    return
  path = os.path.join(workdir, LOCK_FILE)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
      raise WorkdirBusyError(
          f"Workdir {workdir} is in use by {holder}: two runs in one workdir would interleave "
          "their checkpoints. Wait for it to finish, stop it, or use another --workdir.") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, (f"pid {os.getpid()} on {socket.gethostname()} since "
                   f"{time.strftime('%Y-%m-%d %H:%M:%S')}").encode(), 0)
    yield
  finally:
    os.close(fd)  # Releases the flock too.


# Fields a resumed run may change: they do not change what is learned, only
# how it is watched, or they extend the run.
RESUMABLE_CHANGES = ("total_steps", "num_epochs", "log_every_steps", "eval_every_steps",
                     "checkpoint_every_steps", "keep_checkpoints", "eval_batch_size",
                     "final_report", "bootstrap_resamples", "bootstrap_seed",
                     "early_stopping_patience", "resume_with_changes", "init_cache_dir",
                     "data.help",
                     "model.layer_impl")  # Same parameters; results differ by rounding only.


def _flat(tree: dict, prefix: str = "") -> dict:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat |= _flat(value, f"{prefix}{key}.")
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def config_changes(config: ml_collections.ConfigDict, workdir: str) -> dict[str, tuple]:
  """{field: (recorded, now)} for every field that differs from WORKDIR/config.json.

  Fields the recorded config lacks (written by an older version) are not
  compared.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    recorded = _flat(json.load(f))
  now = _flat(json.loads(config.to_json_best_effort()))
  return {k: (recorded[k], v) for k, v in sorted(now.items())
          if k in recorded and recorded[k] != v}


def check_resume_config(config: ml_collections.ConfigDict, workdir: str, step: int) -> None:
  """Refuses to resume a run (at `step`) under a config that changes the experiment.

  A finished or interrupted workdir rerun with another data.dir, lr, seed
  or model would continue training on the new recipe, and config.json would
  then describe a run that never happened. Changes in RESUMABLE_CHANGES are
  allowed and logged; others need `resume_with_changes=True`, which appends
  them to WORKDIR/config_history.jsonl.
  """
  changes = config_changes(config, workdir)
  if not changes:
    return
  listing = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items())
  blocking = [k for k in changes if k not in RESUMABLE_CHANGES]
  if blocking and not config.resume_with_changes:
    raise ValueError(
        f"Workdir {workdir} holds a run at step {step} made with another config "
        f"({', '.join(blocking)} differ: {listing}). Use a new --workdir for a new experiment, "
        "or pass --config.resume_with_changes=True to continue this one with the change "
        f"(recorded in {CONFIG_HISTORY_FILE}).")
  logging.warning("Resuming at step %d with config changes: %s", step, listing)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, CONFIG_HISTORY_FILE), "a") as f:
      f.write(json.dumps({"step": step, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                          "changes": {k: list(v) for k, v in changes.items()}}, default=str)
              + "\n")


def read_pretrained(workdir: str) -> dict:
  """WORKDIR/pretrained.json ({} when the run did not start from pretrained weights)."""
  path = os.path.join(workdir, PRETRAINED_FILE)
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def write_pretrained(workdir: str, record: dict) -> None:
  """WORKDIR/pretrained.json: init_from, the backbone fingerprint, load report and metadata."""
  if jax.process_index() == 0:
    with open(os.path.join(workdir, PRETRAINED_FILE), "w") as f:
      json.dump(record, f, indent=2, default=str)


def resolve_normalization(config: ml_collections.ConfigDict, workdir: str,
                          metadata: dict | None) -> str:
  """data.normalization, with 'auto' taken from the pretrained weights' metadata."""
  mode = config.data.normalization
  if mode != "auto":
    return mode
  if not config.init_from:
    return "imagenet"
  if metadata is None:  # Resuming or evaluating: the first run recorded the weights' metadata.
    recorded = read_pretrained(workdir)
    if not recorded:
      raise FileNotFoundError(
          f"{os.path.join(workdir, PRETRAINED_FILE)} not found: data.normalization='auto' "
          f"needs the metadata of init_from={config.init_from!r}, which the run records there.")
    metadata = recorded["metadata"]
  return metadata["normalization"]


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
  weights: str = "raw"  # 'ema': the weights' moving average, else the optimizer's.


@dataclasses.dataclass(frozen=True)
class Predictions:
  """A split's probabilities [N, C], multi-hot targets [N, C] and example ids.

  `scores` [N, C] (when known) give the probabilities through softmax/sigmoid:
  the logits, or with test-time augmentation see models/tta.py; temperature
  scaling divides them.
  """

  probs: np.ndarray
  targets: np.ndarray
  ids: list[str]
  scores: Optional[np.ndarray] = None

  @property
  def labels(self) -> np.ndarray:
    """Single-label class indices [N]."""
    return self.targets.argmax(axis=1)


def _merge(defaults: dict, recorded: dict, prefix: str, added: list[str]) -> dict:
  merged = dict(recorded)
  for key, value in defaults.items():
    if key not in recorded:
      merged[key] = value
      added.append(prefix + key)
    elif isinstance(value, dict) and isinstance(recorded[key], dict):
      merged[key] = _merge(value, recorded[key], f"{prefix}{key}.", added)
  return merged


def with_current_schema(recorded: dict, source: str) -> ml_collections.ConfigDict:
  """A recorded config (config.json) with the fields added since it was written.

  A run made before a field existed (e.g. model.drop_path_rate, ema_decay)
  ran with that field's default behaviour; evaluate, predict and export fill
  it in from base_config (logged) instead of failing on the missing key.
  """
  model = recorded.get("model") or {}
  try:
    if "patch_size" in model:
      model_defaults = base_config.vit_model_config(model.get("name", "vit_b16"))
    elif "ws_epsilon" in model:  # BiT
      model_defaults = base_config.bit_model_config(model["name"])
    elif model.get("name", "").startswith("efficientnet"):
      model_defaults = base_config.efficientnet_model_config(model["name"])
    elif "head_norm_eps" in model:  # ConvNeXt
      model_defaults = base_config.convnext_model_config(model["name"])
    elif "variant" in model or "name" not in model:
      model_defaults = base_config.resnet_model_config(model.get("name", "resnet50"))
    else:
      model_defaults = base_config.model_config(model["name"])
  except ValueError:  # A model name this version does not know: the recorded fields only.
    model_defaults = ml_collections.ConfigDict()
  defaults = base_config.get_base_config().to_dict() | {"model": model_defaults.to_dict()}
  added = []
  merged = _merge(defaults, recorded, "", added)
  if added:
    logging.info("%s predates config fields %s; using their defaults.", source, ", ".join(added))
  return ml_collections.ConfigDict(merged)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config as run, from WORKDIR/config.json."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: is {workdir!r} the workdir of a training run?")
  with open(path) as f:
    config = with_current_schema(json.load(f), path)
  if config.data.normalization == "auto":  # Written before 'auto' was resolved.
    config.data.normalization = resolve_normalization(config, workdir, None)
  return config


def load_run(workdir: str, config: Optional[ml_collections.ConfigDict] = None) -> Run:
  """Config (default: WORKDIR/config.json), dataset info and model of a run."""
  if config is None:
    config = load_config(workdir)
  elif config.data.normalization == "auto":  # The config as given, not as run.
    config = config.copy_and_resolve_references()
    config.data.normalization = resolve_normalization(config, workdir, None)
  data_dir, info = dataset.load_data_info(config, workdir)
  model = build_model(config, len(info["class_names"]))
  return Run(workdir=workdir, config=config, data_dir=data_dir, info=info, model=model)


def run_uses_ema(workdir: str) -> bool:
  """Whether the run in `workdir` chose its EMA weights for evaluation (config.json)."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return False
  with open(path) as f:
    return checkpoints.evaluates_ema(ml_collections.ConfigDict(json.load(f)))


def restore(workdir: str, which: str = "best", ema: Optional[bool] = None) -> Checkpoint:
  """Parameters and BatchNorm statistics of checkpoint `which` (on the default device).

  ema: read the EMA weights instead of the optimizer's; None: what the run
  chose (run_uses_ema).
  """
  ema = run_uses_ema(workdir) if ema is None else ema
  variables, step, path = checkpoints.restore_variables(workdir, which, ema=ema)
  check_finite(variables, workdir, step)
  return Checkpoint(variables=variables, step=step, label=which, path=path,
                    weights="ema" if ema else "raw")


def check_finite(variables: Any, workdir: str, step: int) -> None:
  """Refuses weights holding NaN/Inf: they would predict NaN without any error."""
  bad, total = checkpoints.count_nonfinite(variables)
  if bad:
    raise ValueError(f"Checkpoint step {step} of workdir {workdir} is not finite: {bad} of "
                     f"{total} weight arrays hold NaN or Inf (did training diverge?); pick an "
                     "earlier --checkpoint or retrain with a lower optimizer.lr.")


def from_state(state: Any, ema: bool = False) -> Checkpoint:
  """A Checkpoint of an in-memory steps.TrainState (at the end of training: 'last').

  ema: its EMA weights instead of the optimizer's.
  """
  params, batch_stats = ((state.ema["params"], state.ema["batch_stats"]) if ema
                         else (state.params, state.batch_stats))
  variables = {"params": params}
  if batch_stats:
    variables["batch_stats"] = batch_stats
  return Checkpoint(variables=variables, step=int(state.step), label="last", path="",
                    weights="ema" if ema else "raw")


def make_apply(model: nn.Module, multilabel: bool):
  """jitted (variables, images) -> probabilities (sigmoid or softmax, float32)."""
  activation = jax.nn.sigmoid if multilabel else jax.nn.softmax
  return jax.jit(lambda v, x: activation(model.apply(v, x, train=False)),
                 compiler_options=layer_impl.compiler_options(model.layer_impl))


def _batches(run: Run, split: str, batch_size: int) -> Iterator[dict]:
  return pipeline.eval_iterator(run.config.data, run.data_dir, run.info, split,
                                      batch_size=batch_size)


def predict_split(run: Run, checkpoint: Checkpoint, split: str,
                  batch_size: Optional[int] = None, tta_mode: str = "none") -> Predictions:
  """Probabilities and scores over every example of `split` (padding rows dropped).

  `tta_mode`: test-time augmentation ('none', 'flip', 'dihedral'; models/tta.py).
  """
  apply = tta_lib.make_apply(run.model, run.multilabel, tta_mode)
  probs, scores, targets = [], [], []
  for batch in _batches(run, split, batch_size or run.config.eval_batch_size):
    keep = batch["mask"] > 0
    out, score = apply(checkpoint.variables, batch["image"])
    probs.append(np.asarray(out, np.float64)[keep])
    scores.append(np.asarray(score, np.float64)[keep])
    targets.append(batch["targets"][keep])
  ids = pipeline.split_ids(run.data_dir, run.info, split)
  probs, targets = np.concatenate(probs), np.concatenate(targets)
  if len(ids) != len(probs):  # An id per record; eval visits each record once.
    raise ValueError(f"Split {split!r}: {len(probs)} predictions but {len(ids)} records.")
  return Predictions(probs=probs, targets=targets, ids=ids, scores=np.concatenate(scores))
