"""Learning curves and the run-level summary, from a run's own files.

The train loop writes its scalars with clu's SummaryWriter, which stores
them as TensorBoard *tensor* events; `read_scalars` reads those (and classic
scalar events, should a run have them) from the event files directly in the
workdir.
"""

import json
import os
from typing import NamedTuple, Optional

from absl import logging
import numpy as np

from vit_jax_ft import checkpoints


class Series(NamedTuple):
  """One scalar's history: steps, values and wall times, sorted by step."""

  steps: np.ndarray
  values: np.ndarray
  wall_times: np.ndarray


def _series(points: list[tuple[int, float, float]]) -> Series:
  # A resumed run rewrites the steps after its last checkpoint: keep the
  # value written last for each step.
  latest = {}
  for step, value, wall in sorted(points, key=lambda p: p[2]):
    latest[step] = (value, wall)
  steps = np.asarray(sorted(latest), np.int64)
  return Series(steps, np.asarray([latest[s][0] for s in steps], np.float64),
                np.asarray([latest[s][1] for s in steps], np.float64))


def read_scalars(workdir: str) -> dict[str, Series]:
  """Every scalar in the event files directly under `workdir`, by tag."""
  # Imported lazily: tensorboard's event reader is only needed here.
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if not any(f.startswith("events.out.tfevents") for f in os.listdir(workdir)):
    return {}
  acc = event_accumulator.EventAccumulator(workdir, size_guidance={"tensors": 0, "scalars": 0})
  acc.Reload()
  out = {}
  tags = acc.Tags()
  for tag in tags.get("tensors", []):
    points = []
    for e in acc.Tensors(tag):
      value = tf.make_ndarray(e.tensor_proto)
      if value.size == 1 and np.issubdtype(value.dtype, np.number):
        points.append((e.step, float(value), e.wall_time))
    if points:
      out[tag] = _series(points)
  for tag in tags.get("scalars", []):
    out[tag] = _series([(e.step, e.value, e.wall_time) for e in acc.Scalars(tag)])
  return out


def _dir_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(root, f))
             for root, _, files in os.walk(path) for f in files)


def _best_checkpoint(workdir: str) -> Optional[dict]:
  try:
    manager, step = checkpoints.find_step(workdir, "best")
  except FileNotFoundError:
    return None
  metrics = manager.metrics(step) or {}
  return {"step": int(step), "metrics": {k: float(v) for k, v in metrics.items()},
          "size_bytes": _dir_bytes(os.path.join(str(manager.directory), str(step)))}


def _last_step(workdir: str) -> Optional[int]:
  try:
    return int(checkpoints.find_step(workdir, "last")[1])
  except FileNotFoundError:
    return None


def run_summary(workdir: str, scalars: dict[str, Series],
                num_params: Optional[int] = None) -> dict:
  """Steps, best validation metric and its step, sizes, throughput, wall time."""
  summary = {"workdir": os.path.abspath(workdir)}
  results_path = os.path.join(workdir, "eval_results.json")
  if os.path.exists(results_path):
    with open(results_path) as f:
      summary["eval_results"] = json.load(f)
  if "learning_rate" in scalars:  # Written every step.
    summary["steps"] = int(scalars["learning_rate"].steps.max())
  else:
    summary["steps"] = _last_step(workdir)
  best = _best_checkpoint(workdir)
  if best is not None:
    summary["best_checkpoint"] = best
  if num_params is not None:
    summary["num_params"] = int(num_params)
    summary["params_bytes_float32"] = int(num_params) * 4
  if "images_per_sec" in scalars:
    summary["train_images_per_sec_mean"] = float(np.mean(scalars["images_per_sec"].values))
  walls = [s.wall_times for s in scalars.values() if len(s.wall_times)]
  if walls:
    # First to last event: includes any pause between a crash and its resume.
    span = max(w.max() for w in walls) - min(w.min() for w in walls)
    summary["wall_time_s"] = float(span)
  logging.info("Run summary: %s", {k: v for k, v in summary.items() if k != "eval_results"})
  return summary
