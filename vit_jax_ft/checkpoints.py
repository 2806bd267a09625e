"""Orbax checkpoints: the last K for resuming, and the best by a validation metric.

`WORKDIR/checkpoints` holds the full train state (parameters, optimizer state,
batch statistics, RNG, step) of the most recent saves; the data position is a
function of the step (see input_pipeline), so restoring the state is enough to
resume exactly. `WORKDIR/checkpoints_best` holds one state, the best so far by
`config.best_metric`, with its metrics.
"""

import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp


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
      os.path.join(os.path.abspath(workdir), "checkpoints"),
      options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True,
                                           multiprocessing_options=_multiprocessing("last")))
  metric = f"val_{config.best_metric}"
  best = ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), "checkpoints_best"),
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
