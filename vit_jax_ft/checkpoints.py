"""Orbax checkpoints: the last K for resuming, and the best by a validation metric.

`WORKDIR/checkpoints` holds the full train state (parameters, optimizer state,
batch statistics, RNG, step) of the most recent saves; the data position is a
function of the step (see inputs/pipeline.py), so restoring the state is enough to
resume exactly. `WORKDIR/checkpoints_best` holds one state, the best so far by
`config.best_metric`, with its metrics. This module is the only one that
talks to Orbax: the train loop restores full states, the tools read
parameters only (`restore_variables`).

With `config.ema_decay` > 0 the state also holds the weights' moving average
(`ema`); checkpoints written without it (EMA off, or older code) still resume.

A last checkpoint saved at an eval step records that evaluation (`eval_record`)
in its step metadata, so a resume can tell when the best checkpoint of that
step was lost (`recover_best`).
"""

import dataclasses
import os
from typing import Any, Callable, Optional

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp


LAST_DIR = "checkpoints"
BEST_DIR = "checkpoints_best"
_EVAL = "eval"  # Step-metadata key of the evaluation a last checkpoint was saved at.

class DamagedCheckpointError(ValueError):
  """A checkpoint's files are missing or unreadable (a disk error, a copy cut short)."""


class NonFiniteError(FloatingPointError):
  """A train state (or checkpoint) holds NaN or Inf."""


@jax.jit
def _nonfinite_flags(leaves):
  # One fused reduction per array; a single device->host copy for the tree.
  return jnp.stack([~jnp.all(jnp.isfinite(x)) for x in leaves]) if leaves else jnp.zeros(0, bool)


def count_nonfinite(tree: Any) -> tuple[int, int]:
  """(arrays holding NaN/Inf, floating arrays) over the leaves of `tree`.

  Integer leaves (the step, RNG keys) cannot be non-finite and are skipped.
  """
  leaves = [x for x in jax.tree.leaves(tree)
            if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]
  return int(jax.device_get(_nonfinite_flags(leaves)).sum()), len(leaves)


def all_finite(tree: Any) -> bool:
  """Whether every floating array of `tree` is finite."""
  return count_nonfinite(tree)[0] == 0


def _multiprocessing(name: str) -> ocp.options.MultiprocessingOptions:
  # Both managers save the same step asynchronously; with the same barrier
  # names, processes of a multi-host job can pair up one manager's barrier
  # with the other's and hang (seen with two processes, tests/test_data_parallel.py).
  return ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name)


def evaluates_ema(config: ml_collections.ConfigDict) -> bool:
  """Whether the run's final eval, reports, predict, explain and export use its EMA weights.

  Also answers for the config.json of a run older than the EMA fields (False).
  """
  return "ema_decay" in config and config.ema_decay > 0 and bool(config.eval_ema)


def best_key(config: ml_collections.ConfigDict) -> str:
  """The metric that selects the best checkpoint: 'val_[ema_]{best_metric}'."""
  ema = "ema_" if config.ema_decay > 0 and config.best_on_ema else ""
  return f"val_{ema}{config.best_metric}"


def best_metrics(config: ml_collections.ConfigDict, scalars: dict) -> dict:
  """The val scalars a best checkpoint keeps: the best metric, raw and EMA where present."""
  keys = [f"val_{p}{config.best_metric}" for p in ("", "ema_")]
  return {k: scalars[k] for k in keys if k in scalars}


def is_better(value: float, best: Optional[float], config: ml_collections.ConfigDict) -> bool:
  """Whether `value` beats `best` (None: nothing yet) by config.min_delta in config.best_mode."""
  if best is None:
    return True
  if config.best_mode == "max":
    return value > best + config.min_delta
  return value < best - config.min_delta


def make_managers(workdir: str, config: ml_collections.ConfigDict):
  """Returns (last, best) CheckpointManagers under `workdir`."""
  last = ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), LAST_DIR),
      options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True,
                                           multiprocessing_options=_multiprocessing("last")))
  metric = best_key(config)
  # A best checkpoint saved without this metric (EMA turned on since) ranks last.
  worst = -float("inf") if config.best_mode == "max" else float("inf")
  best = ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), BEST_DIR),
      options=ocp.CheckpointManagerOptions(
          max_to_keep=1, create=True, best_fn=lambda m: m.get(metric, worst),
          best_mode=config.best_mode, multiprocessing_options=_multiprocessing("best")))
  return last, best


def save(manager: ocp.CheckpointManager, step: int, state: Any,
         metrics: Optional[dict] = None, record: Optional[dict] = None) -> None:
  """Saves `state` as `step`; refuses (NonFiniteError) a state holding NaN/Inf.

  A non-finite state would become the checkpoint a rerun resumes from and
  predict/evaluate read, so it is never written. `record` (see eval_record)
  goes into the step's metadata.
  """
  bad, total = count_nonfinite(state)
  if bad:
    raise NonFiniteError(f"Step {step}: {bad} of {total} arrays of the train state (parameters, "
                         f"BatchNorm statistics, optimizer state, EMA) are not finite; not "
                         f"saved to {manager.directory}.")
  manager.save(step, args=ocp.args.StandardSave(state), metrics=metrics, force=True,
               custom_metadata=record)


def eval_record(config: ml_collections.ConfigDict, scalars: dict, new_best: bool) -> dict:
  """The step metadata of a last checkpoint saved at an eval step (see recover_best)."""
  return {_EVAL: {"metrics": best_metrics(config, scalars), "new_best": bool(new_best)}}


def lost_best(last: ocp.CheckpointManager, best: ocp.CheckpointManager,
              step: int) -> Optional[dict]:
  """Last checkpoint `step`'s eval record if it became the best but no best checkpoint holds it.

  At an eval step the best checkpoint's save starts before the last one's,
  but both write in the background: a process killed in between can land the
  last checkpoint and lose the best. Steps saved without a record (not an
  eval step, or older code) are never reported.
  """
  if step not in last.all_steps() or step in best.all_steps():  # A fresh run, or nothing lost.
    return None
  custom = last.metadata(step).custom_metadata or {}
  record = custom.get(_EVAL) or {}
  return record if record.get("new_best") else None


def recover_best(last: ocp.CheckpointManager, best: ocp.CheckpointManager, state: Any,
                 config: ml_collections.ConfigDict,
                 evaluate: Callable[[Any], dict]) -> bool:
  """If the resumed `state`'s step was a best whose checkpoint was lost, saves it again.

  `evaluate(state)` returns the val scalars ('val_*'); the state is
  re-evaluated (its step's evaluation only survives in the last checkpoint's
  metadata) and the best manager keeps it if it still beats its best. Returns
  whether it evaluated; a normal resume reads one metadata file and returns False.
  """
  step = int(state.step)
  record = lost_best(last, best, step)
  if record is None:
    return False
  key = best_key(config)
  logging.warning("Step %d became the best checkpoint (%s) but its save to %s did not finish "
                  "(the run was killed); re-evaluating it.", step, record["metrics"],
                  best.directory)
  scalars = evaluate(state)
  current = best_value(best, key)
  if not is_better(scalars[key], current, config):
    logging.warning("Step %d re-evaluated: %s=%g does not beat the best checkpoint's %s; kept "
                    "that one.", step, key, scalars[key], current)
    return True
  # The same parameters as the best save would have written (only the
  # plateau's lr_scale can differ, and predict/evaluate read parameters only).
  save(best, step, state, best_metrics(config, scalars))
  best.wait_until_finished()
  logging.info("Step %d (%s=%g) saved as the best checkpoint in %s.", step, key, scalars[key],
               best.directory)
  return True


def restore(manager: ocp.CheckpointManager, abstract_state: Any,
            step: Optional[int] = None) -> Any:
  """Restores `step` (default: latest) into the structure of `abstract_state`.

  A checkpoint without EMA weights (EMA off, or written before the field
  existed) comes back with ema={}: the caller starts the average if it wants
  one. One with EMA weights into a state without: they are read and dropped.
  """
  step = manager.latest_step() if step is None else step
  target = abstract_state
  saved = _saved_ema(manager, step)
  if saved is None or bool(saved) != bool(abstract_state.ema):
    target = {f.name: getattr(abstract_state, f.name) for f in dataclasses.fields(abstract_state)}
    if saved is None:
      del target["ema"]
    else:
      target["ema"] = ({"params": abstract_state.params,
                        "batch_stats": abstract_state.batch_stats} if saved else {})
  try:
    restored = manager.restore(step, args=ocp.args.StandardRestore(target))
  except (ValueError, KeyError) as e:
    raise ValueError(
        f"Checkpoint {manager.directory}/{step} does not match the model built from the "
        f"config (was the workdir used with another model or dataset?): {e}") from e
  except Exception as e:  # pylint: disable=broad-except
    # TensorStore reports a missing or corrupt data file as a bare Exception.
    first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
    raise DamagedCheckpointError(
        f"Checkpoint {manager.directory}/{step} is damaged (a data file is missing or "
        f"unreadable: {first})") from e
  if target is abstract_state:
    return restored
  if saved:
    logging.info("Checkpoint %s/%d holds EMA weights; not used (config.ema_decay is 0).",
                 manager.directory, step)
  restored["ema"] = {}
  return abstract_state.replace(**restored)


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any) -> Any:
  """The newest checkpoint that reads back; a damaged one is moved aside, naming it.

  A damaged checkpoint is renamed to `<step>.damaged` (kept for inspection,
  no longer a step) and the one before it is tried; with none left the
  error says which checkpoint is damaged.
  """
  steps = sorted(manager.all_steps(), reverse=True)
  for i, step in enumerate(steps):
    try:
      return restore(manager, abstract_state, step)
    except DamagedCheckpointError as e:
      if i + 1 == len(steps):
        raise DamagedCheckpointError(
            f"{e}; no earlier checkpoint to fall back to: delete {manager.directory} (or the "
            "workdir) to start again.") from e
      aside = os.path.join(str(manager.directory), f"{step}.damaged")
      if jax.process_index() == 0:
        os.replace(os.path.join(str(manager.directory), str(step)), aside)
      manager.reload()
      logging.warning("%s; moved it to %s and falling back to step %d.", e, aside, steps[i + 1])
  raise FileNotFoundError(f"No checkpoint in {manager.directory}.")


def _saved_ema(manager: ocp.CheckpointManager, step: int) -> Optional[dict]:
  """The EMA entry of checkpoint `step`'s metadata: {} (EMA off) or a tree; None if absent."""
  path = os.path.join(str(manager.directory), str(step), "default")
  metadata = ocp.StandardCheckpointer().metadata(path)
  tree = getattr(metadata, "item_metadata", metadata)
  tree = getattr(tree, "tree", tree)
  if tree is None:  # Orbax could not read the tree's metadata: the files are damaged.
    raise DamagedCheckpointError(f"Checkpoint {manager.directory}/{step} is damaged (its "
                                 "metadata cannot be read)")
  return tree.get("ema") if "ema" in tree else None


def best_value(manager: ocp.CheckpointManager, key: str) -> Optional[float]:
  """The `key` metric (see best_key) of the kept best checkpoint, or None if there is none."""
  step = manager.best_step()
  if step is None:
    return None
  metrics = manager.metrics(step) or {}
  if key not in metrics:  # Saved while the best checkpoint was chosen by another metric.
    logging.warning("The best checkpoint (step %d) has no %s; the next evaluation replaces it.",
                    step, key)
    return None
  return metrics[key]


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


def restore_variables(workdir: str, which: str = "best",
                      ema: bool = False) -> tuple[dict, int, str]:
  """(variables, step, path) of checkpoint `which`: parameters and BatchNorm statistics only.

  Evaluation needs neither the optimizer state nor the optimizer that made
  it, so only these entries are read (on the default device). ema: read the
  moving average of the weights instead of the optimizer's.
  """
  manager, step = find_step(workdir, which)
  path = os.path.join(str(manager.directory), str(step), "default")
  tree = manager.item_metadata(step)
  tree = getattr(tree, "tree", tree)
  if ema and not tree.get("ema"):
    raise ValueError(f"Checkpoint step {step} of workdir {workdir} holds no EMA weights (was "
                     "it trained with ema_decay=0?).")
  source = tree["ema"] if ema else tree
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          {"params": source["params"], "batch_stats": source["batch_stats"]})
  item = {"ema": abstract} if ema else abstract
  # partial_restore reads only these entries, not the optimizer state.
  restored = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
      item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
      partial_restore=True))
  restored = restored["ema"] if ema else restored
  variables = {"params": restored["params"]}
  if restored["batch_stats"]:
    variables["batch_stats"] = restored["batch_stats"]
  logging.info("Restored %s checkpoint at step %d (%s weights) from %s.", which, step,
               "EMA" if ema else "raw", manager.directory)
  return variables, step, path
