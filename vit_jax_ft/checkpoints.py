"""Orbax checkpoints: the last K for resuming, and the best by a validation metric.

`WORKDIR/checkpoints` holds the full train state (parameters, optimizer state,
batch statistics, RNG, step) of the most recent saves; the data position is a
function of the step (see inputs/pipeline.py), so restoring the state is enough to
resume exactly. `WORKDIR/checkpoints_best` holds one state, the best so far by
`config.best_metric`, with its metrics. This module is the only one that
talks to Orbax: the train loop restores full states, the tools read
parameters only (`restore_variables`).
"""

import os
from typing import Any, Optional

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp


LAST_DIR = "checkpoints"
BEST_DIR = "checkpoints_best"


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


def make_managers(workdir: str, config: ml_collections.ConfigDict):
  """Returns (last, best) CheckpointManagers under `workdir`."""
  last = ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), LAST_DIR),
      options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True,
                                           multiprocessing_options=_multiprocessing("last")))
  metric = f"val_{config.best_metric}"
  best = ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), BEST_DIR),
      options=ocp.CheckpointManagerOptions(
          max_to_keep=1, create=True, best_fn=lambda m: m[metric],
          best_mode=config.best_mode, multiprocessing_options=_multiprocessing("best")))
  return last, best


def save(manager: ocp.CheckpointManager, step: int, state: Any,
         metrics: Optional[dict] = None) -> None:
  """Saves `state` as `step`; refuses (NonFiniteError) a state holding NaN/Inf.

  A non-finite state would become the checkpoint a rerun resumes from and
  predict/evaluate read, so it is never written.
  """
  bad, total = count_nonfinite(state)
  if bad:
    raise NonFiniteError(f"Step {step}: {bad} of {total} arrays of the train state (parameters, "
                         f"BatchNorm statistics, optimizer state) are not finite; not saved "
                         f"to {manager.directory}.")
  manager.save(step, args=ocp.args.StandardSave(state), metrics=metrics, force=True)


def restore(manager: ocp.CheckpointManager, abstract_state: Any,
            step: Optional[int] = None) -> Any:
  """Restores `step` (default: latest) into the structure of `abstract_state`."""
  step = manager.latest_step() if step is None else step
  try:
    return manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
  except (ValueError, KeyError) as e:
    raise ValueError(
        f"Checkpoint {manager.directory}/{step} does not match the model built from the "
        f"config (was the workdir used with another model or dataset?): {e}") from e


def best_value(manager: ocp.CheckpointManager, metric: str) -> Optional[float]:
  """The metric value of the kept best checkpoint, or None if there is none."""
  step = manager.best_step()
  if step is None:
    return None
  return manager.metrics(step)[f"val_{metric}"]


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


def restore_variables(workdir: str, which: str = "best") -> tuple[dict, int, str]:
  """(variables, step, path) of checkpoint `which`: parameters and BatchNorm statistics only.

  Evaluation needs neither the optimizer state nor the optimizer that made
  it, so only these two entries are read (on the default device).
  """
  manager, step = find_step(workdir, which)
  path = os.path.join(str(manager.directory), str(step), "default")
  tree = manager.item_metadata(step)
  tree = getattr(tree, "tree", tree)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          {"params": tree["params"], "batch_stats": tree["batch_stats"]})
  restored = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
      item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
      partial_restore=True))
  variables = {"params": restored["params"]}
  if restored["batch_stats"]:
    variables["batch_stats"] = restored["batch_stats"]
  logging.info("Restored %s checkpoint at step %d from %s.", which, step, manager.directory)
  return variables, step, path
