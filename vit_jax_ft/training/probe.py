"""The linear probe: pooled backbone features once per split (cached), then a linear head.

The backbone is built and loaded from `config.init_from` exactly as training
does; its pooled features (the classification head's input) are extracted
once per split with the eval preprocessing and cached in WORKDIR/probe/,
keyed by a fingerprint of the weights and the preprocessing; a linear head
(training/linear_fit.py) is fitted for each L2 value of
`config.probe.l2_grid`, the value chosen on the validation split by
`config.best_metric`. The workdir then looks like a training run's
(checkpoints/, checkpoints_best/, config.json, eval_results.json, reports/),
so `vit_jax_ft.evaluate`, `vit_jax_ft.predict` and `config.init_head_from`
(LP-FT) read it unchanged; probe.json holds the grid and timings.
"""

import functools
import glob
import hashlib
import json
import os
import re
import time
from typing import Any

from absl import logging
import flax
import jax
import ml_collections
import numpy as np

from vit_jax_ft import checkpoints
from vit_jax_ft import config_ranges
from vit_jax_ft import workdir as workdir_lib
from vit_jax_ft.inputs import dataset
from vit_jax_ft.inputs import pipeline
from vit_jax_ft.models import layer_impl
from vit_jax_ft.reports import writer as report_writer
from vit_jax_ft.training import init_from
from vit_jax_ft.training import linear_fit
from vit_jax_ft.training import losses
from vit_jax_ft.training import optim
from vit_jax_ft.training import steps
from vit_jax_ft.training import train

PROBE_DIR = "probe"
PROBE_FILE = "probe.json"
CLASS_WEIGHTS = ("auto", "balanced", "none")
# Bump when what a cached feature file holds changes meaning.
_FEATURES_VERSION = 1
_LOG_EVERY_S = 10.0


def backbone_features(model, variables: dict, images: jax.Array, flip: bool) -> jax.Array:
  """Pooled features [B, D] of a num_classes=0 model, optionally averaged with the mirror image."""
  features = model.apply(variables, images, train=False)
  if flip:  # NHWC: axis 2 is the width.
    features = 0.5 * (features + model.apply(variables, images[:, :, ::-1], train=False))
  return features


# One compilation for every split of a run (the model and flip are static); the
# project's convs on a CPU take XLA's own conv kernels (layer_impl.compiler_options).
_jit_features = jax.jit(backbone_features, static_argnums=0, static_argnames="flip")
_jit_features_cpu = jax.jit(backbone_features, static_argnums=0, static_argnames="flip",
                            compiler_options=layer_impl.CPU_COMPILER_OPTIONS)


def features_fn(model):
  """The jitted `backbone_features` for `model` (CPU options for the project's convs)."""
  return _jit_features_cpu if layer_impl.compiler_options(model.layer_impl) else _jit_features


def backbone_variables(state: steps.TrainState) -> dict:
  """The train state's variables without the head: what a num_classes=0 model applies."""
  params = {k: v for k, v in state.params.items() if k != "head"}
  return {"params": params, "batch_stats": state.batch_stats} if state.batch_stats else {
      "params": params}


def _hash_tree(tree: Any, digest) -> None:
  for path, value in sorted(flax.traverse_util.flatten_dict(tree, sep="/").items()):
    value = np.ascontiguousarray(np.asarray(value))
    digest.update(f"{path}:{value.dtype}:{value.shape};".encode())
    digest.update(value.tobytes())


def feature_key(config: ml_collections.ConfigDict, variables: dict, data_dir: str,
                info: dict, split: str) -> str:
  """Fingerprint of everything a split's features depend on (16 hex digits).

  The backbone's weights and architecture, the compute dtype, the eval
  preprocessing (image size, crop fraction, normalisation), flip averaging
  and the split's records (their files' sizes and modification times too).
  """
  digest = hashlib.sha256()
  _hash_tree(variables, digest)
  described = {
      "version": _FEATURES_VERSION, "model": config.model.to_dict(), "dtype": config.dtype,
      "image_size": config.data.image_size,
      "eval_crop_fraction": config.data.eval_crop_fraction,
      "normalization": config.data.normalization, "flip": config.probe.flip,
      "data_dir": os.path.abspath(data_dir), "split": split,
      "records": info["splits"][split], "class_names": info["class_names"],
      "features": info.get("features"),
      # A re-prepared dataset may keep its file names and counts.
      "files": [(s.path, os.stat(s.path).st_size, os.stat(s.path).st_mtime_ns)
                for s in pipeline.split_shards(data_dir, info, split)],
  }
  digest.update(json.dumps(described, sort_keys=True, default=str).encode())
  return digest.hexdigest()[:16]


def _cache_path(workdir: str, split: str, key: str) -> str:
  safe = re.sub(r"[^A-Za-z0-9_.-]", "_", split)
  return os.path.join(workdir, PROBE_DIR, f"features_{safe}_{key}.npz")


def extract_split(model, variables: dict, config: ml_collections.ConfigDict, data_dir: str,
                  info: dict, split: str) -> tuple[np.ndarray, np.ndarray]:
  """(features [N, D] float32, targets [N, C]) of every example of `split`, in order."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  apply = functools.partial(features_fn(model), model, flip=config.probe.flip)
  total = info["splits"][split]["num_examples"]
  features, targets, pending = [], [], None
  done, t0, last_log = 0, time.time(), time.time()
  warm = None  # (images, time) once the first batch is out: the rate leaves compilation out.

  def collect(item):
    out, batch = item
    keep = batch["mask"] > 0
    features.append(np.asarray(out, np.float32)[keep])
    targets.append(batch["targets"][keep])
    return int(keep.sum())

  for batch in pipeline.eval_iterator(config.data, data_dir, info, split,
                                            batch_size=config.eval_batch_size):
    out = apply(variables, jax.make_array_from_process_local_data(sharding, batch["image"]))
    if pending is not None:  # Copy the previous batch out while this one computes.
      done += collect(pending)
      warm = warm or (done, time.time())
    pending = (out, batch)
    if warm and time.time() - last_log > _LOG_EVERY_S and done > warm[0]:
      last_log = time.time()
      rate = (done - warm[0]) / (last_log - warm[1])
      logging.info("Probe features of %r: %d/%d images, %.1f images/s, ETA %.0fs.", split,
                   done, total, rate, (total - done) / max(rate, 1e-9))
  if pending is not None:
    done += collect(pending)
  if done != total:
    raise ValueError(f"Split {split!r}: extracted {done} examples but the dataset info says "
                     f"num_examples={total}; re-prepare the dataset.")
  seconds = time.time() - t0
  logging.info("Probe features of %r: %d images in %.1fs (%.1f images/s).", split, done,
               seconds, done / max(seconds, 1e-9))
  return np.concatenate(features), np.concatenate(targets)


def cached_features(model, variables: dict, config: ml_collections.ConfigDict, workdir: str,
                    data_dir: str, info: dict, split: str) -> tuple[np.ndarray, np.ndarray, dict]:
  """A split's (features, targets, record for probe.json), from the cache when the key matches.

  A miss extracts, saves WORKDIR/probe/features_<split>_<key>.npz and deletes
  the split's files with other keys.
  """
  t0 = time.time()
  key = feature_key(config, variables, data_dir, info, split)
  path = _cache_path(workdir, split, key)
  if os.path.exists(path):
    with np.load(path) as cached:
      features, targets = cached["features"], cached["targets"]
    logging.info("Probe features of %r: reusing %s (%d x %d).", split, path, *features.shape)
    return features, targets, {"path": path, "key": key, "cached": True,
                               "seconds": time.time() - t0}
  features, targets = extract_split(model, variables, config, data_dir, info, split)
  own = re.compile(re.escape(_cache_path(workdir, split, "")[:-len(".npz")]) + r"[0-9a-f]{16}\.npz")
  for stale in glob.glob(_cache_path(workdir, split, "*")):
    if own.fullmatch(stale):  # Not another split whose name starts like this one.
      logging.info("Removing stale probe features %s.", stale)
      os.remove(stale)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp.npz"  # Written whole, then renamed: an interrupted save is no cache hit.
  np.savez(tmp, features=features, targets=targets)
  os.replace(tmp, path)
  return features, targets, {"path": path, "key": key, "cached": False,
                             "seconds": time.time() - t0}


def _is_balanced(config: ml_collections.ConfigDict) -> bool:
  mode = config.probe.class_weight
  if mode not in CLASS_WEIGHTS:
    raise ValueError(f"config.probe.class_weight must be one of {CLASS_WEIGHTS}, got {mode!r}.")
  return mode == "balanced" or (mode == "auto" and config.loss.name.startswith("weighted"))


def _check_workdir(managers) -> None:
  """A probe writes step 0; it never overwrites a training run's checkpoints."""
  for manager in managers:
    trained = [s for s in manager.all_steps() if s != 0]
    if trained:
      raise ValueError(f"{manager.directory} holds training checkpoints (steps {trained}); "
                       "run the probe in a workdir of its own.")


def grid_edge(chosen: float, grid: list[float]) -> str:
  """'largest' or 'smallest' when `chosen` is at that end of a grid of 3+ values, else ''."""
  if len(set(grid)) < 3:
    return ""
  return "largest" if chosen == max(grid) else "smallest" if chosen == min(grid) else ""


def _select(rows: list[dict], metric: str, mode: str) -> dict:
  """The grid row with the best val metric; ties go to the stronger penalty (listed first)."""
  best = None
  for row in rows:
    value = row[f"val_{metric}"]
    if best is None or (value > best[f"val_{metric}"] if mode == "max"
                        else value < best[f"val_{metric}"]):
      best = row
  return best


def _save_checkpoints(config, workdir: str, state, best_value: float) -> None:
  """checkpoints/0 and checkpoints_best/0, as the train loop writes them (rerun: replaced)."""
  last_ckpt, best_ckpt = checkpoints.make_managers(workdir, config)
  for manager, metrics in ((last_ckpt, None),
                           (best_ckpt, {f"val_{config.best_metric}": best_value})):
    if 0 in manager.all_steps():
      manager.delete(0)
    checkpoints.save(manager, 0, state, metrics)
    manager.wait_until_finished()


def run_probe(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Fits the linear probe of config's backbone into `workdir`; returns eval_results.json's dict."""
  t_start = time.time()
  config = config.copy_and_resolve_references()  # Resolved below; the caller's stays as is.
  if config.ema_decay:
    # The probe's head is a closed-form fit with nothing to average; its config.json must not
    # send evaluate, predict or init_head_from looking for EMA weights.
    logging.info("config.ema_decay=%s does not apply to a probe; its checkpoints hold the fit.",
                 config.ema_decay)
    config.ema_decay = 0.0
  config_ranges.check_ranges(config)
  grid = linear_fit.parse_l2_grid(config.probe.l2_grid)
  balanced = _is_balanced(config)
  if jax.process_count() > 1:
    raise ValueError("vit_jax_ft.probe runs on one process (features fit in one host's memory); "
                     "start it without the multi-host environment.")
  os.makedirs(workdir, exist_ok=True)
  data_dir, info = dataset.load_data_info(config, workdir)
  train.check_config(config, info)
  _check_workdir(checkpoints.make_managers(workdir, config))
  multilabel = info["multilabel"]
  num_classes = len(info["class_names"])

  # The state a training run would start from, loaded the same way.
  init_from.apply_model_options(config, workdir)
  model = workdir_lib.build_model(config, num_classes)
  total_steps = train.total_train_steps(
      config, info["splits"][config.data.train_split]["num_examples"])
  # The optimizer a training run builds (freezing etc. included), so that the saved state
  # has the structure the train loop expects.
  _, groups = train.model_param_groups(config, model)
  tx = optim.make_optimizer(config.optimizer,
                            optim.learning_rate_schedule(config.optimizer, total_steps), groups)
  state = steps.create_train_state(model, tx, config.data.image_size, config.seed,
                                   config.loss_scale_init if config.dtype == "float16" else 1.0)
  metadata = None
  if config.init_from:
    state, metadata = init_from.load_weights(config, model, state, workdir)
  else:
    logging.warning("No config.init_from: probing the features of a randomly initialised %s.",
                    config.model.name)
  config.data.normalization = workdir_lib.resolve_normalization(config, workdir, metadata)
  logging.info("Input normalisation: %s.", config.data.normalization)
  workdir_lib.write_config(config, workdir)

  # Features, once per split (cached).
  feature_model = workdir_lib.build_model(config, 0)
  variables = jax.device_put(backbone_variables(state))  # Once, not with every batch.
  splits = {"train": config.data.train_split, "val": config.data.val_split}
  if config.data.test_split:
    splits["test"] = config.data.test_split
  data, feature_records = {}, {}
  for role, split in splits.items():
    features, targets, record = cached_features(feature_model, variables, config, workdir,
                                                data_dir, info, split)
    data[role] = (features, targets)
    feature_records[split] = record | {"num_examples": len(features)}
  t_fit = time.time()

  # The head: one fit per L2 value (strongest first, each warm-starting the next).
  x_train, y_train = data["train"]
  mean, scale = linear_fit.standardize(x_train)
  z_train = (x_train - mean) / scale
  weights = linear_fit.sample_weights(y_train, multilabel, balanced)
  # The loss the train loop's eval reports (weighted for weighted_* losses).
  class_weights = train.class_weights(config, info)
  loss_fn = losses.get_loss_fn(config.loss, class_weights)
  l2s = sorted(set(grid), reverse=True)
  fits = linear_fit.fit_grid(z_train, y_train, l2s, multilabel=multilabel, weights=weights,
                  max_iter=config.probe.max_iter, tol=config.probe.tol)
  rows, heads = [], {}
  for l2, fit in zip(l2s, fits):
    kernel, bias = linear_fit.fold_head(fit, mean, scale)
    heads[l2] = (kernel.astype(np.float32), bias.astype(np.float32))
    val = linear_fit.split_metrics(data["val"][0] @ heads[l2][0] + heads[l2][1], data["val"][1], loss_fn,
                        multilabel)
    if config.best_metric not in val:
      raise ValueError(f"config.best_metric={config.best_metric!r} is not a validation metric "
                       f"(choose from {sorted(k for k in val if k != 'num_examples')}).")
    train_metrics = linear_fit.split_metrics(x_train @ heads[l2][0] + heads[l2][1], y_train, loss_fn,
                                  multilabel)
    rows.append({"l2": l2, "C_sklearn": 1.0 / (len(x_train) * l2),
                 "iterations": fit.iterations, "grad_max": fit.grad_max,
                 "converged": fit.converged, "seconds": fit.seconds}
                | {f"train_{k}": v for k, v in train_metrics.items()}
                | {f"val_{k}": v for k, v in val.items()})
    logging.info("Probe l2=%g: val %s=%.4f, train %s=%.4f (%d L-BFGS iterations, %.1fs).", l2,
                 config.best_metric, val[config.best_metric], config.best_metric,
                 train_metrics.get(config.best_metric, float("nan")), fit.iterations,
                 fit.seconds)
    if not fit.converged:
      logging.warning("Probe l2=%g: L-BFGS stopped after %d iterations with gradient %.2g > "
                      "probe.tol=%g; raise probe.max_iter.", l2, fit.iterations,
                      fit.grad_max, config.probe.tol)
  chosen = _select(rows, config.best_metric, config.best_mode)
  kernel, bias = heads[chosen["l2"]]
  logging.info("Probe: chose l2=%g (val %s=%.4f).", chosen["l2"], config.best_metric,
               chosen[f"val_{config.best_metric}"])
  edge = grid_edge(chosen["l2"], [row["l2"] for row in rows])
  if edge:
    logging.warning("Probe: the chosen l2=%g is the %s value of probe.l2_grid; the best may lie "
                    "beyond it: extend the grid.", chosen["l2"], edge)
  t_save = time.time()

  # The head into the train state; the same checkpoints and results as a training run.
  head = state.params["head"]
  if (np.shape(head["kernel"]), np.shape(head["bias"])) != (kernel.shape, bias.shape):
    raise ValueError(f"Fitted head {kernel.shape} does not fit the model's head "
                     f"{np.shape(head['kernel'])}.")
  fitted = {"kernel": kernel, "bias": bias}
  # A DeiT distilled ViT averages head and head_dist over features that are the average of
  # its two tokens: the fitted head in both is exactly the probe.
  heads = {name: fitted for name in ("head", "head_dist") if name in state.params}
  state = state.replace(params={**state.params, **heads})
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  state = jax.device_put(state, device)
  _save_checkpoints(config, workdir, state, chosen[f"val_{config.best_metric}"])
  results = {"step": 0}
  for role in ("val", "test"):
    if role in data:
      metrics = linear_fit.split_metrics(data[role][0] @ kernel + bias, data[role][1], loss_fn, multilabel)
      results |= {f"{role}_{k}": v for k, v in metrics.items()}
  with open(os.path.join(workdir, "eval_results.json"), "w") as f:
    json.dump(results, f, indent=2)
  logging.info("Final metrics: %s", results)

  t_report = time.time()
  if config.final_report:
    report_writer.write_reports(config, workdir)
  t_end = time.time()
  summary = {
      "best_metric": config.best_metric, "best_mode": config.best_mode,
      "chosen_l2": chosen["l2"], "chosen_at_grid_edge": edge or None, "chosen": chosen,
      "grid": rows,
      "multilabel": bool(multilabel),
      "class_weight": "balanced" if balanced else "none", "flip": config.probe.flip,
      "feature_dim": int(x_train.shape[1]), "standardized": True,
      "note": ("Features are standardised with the train mean/std before the fit (the penalty "
               "applies there); the saved head has the scaling folded in. With probe.flip the "
               "metrics above average each image with its mirror image; the checkpoint, "
               "evaluate and predict do not."),
      "features": feature_records,
      "timings_s": {"setup_and_features": t_fit - t_start, "fit": t_save - t_fit,
                    "save": t_report - t_save, "report": t_end - t_report,
                    "total": t_end - t_start},
  }
  with open(os.path.join(workdir, PROBE_FILE), "w") as f:
    json.dump(summary, f, indent=2)
  logging.info("Probe done in %.1fs (features %.1fs, fit %.1fs): %s", t_end - t_start,
               t_fit - t_start, t_save - t_fit, os.path.join(workdir, PROBE_FILE))
  return results
