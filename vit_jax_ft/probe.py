r"""Linear probe: `python -m vit_jax_ft.probe --config=C --workdir=D`.

Same flags and config overrides as `vit_jax_ft.main`. The backbone is built
and loaded from `config.init_from` exactly as training does; its pooled
features (the classification head's input) are extracted once per split with
the eval preprocessing and cached in WORKDIR/probe/; a linear head (softmax,
or one sigmoid per label for multi-label data) is fitted with an L2 penalty by
full-batch L-BFGS, the penalty chosen on the validation split from
`config.probe.l2_grid` by `config.best_metric`. The workdir then looks like a
training run's (checkpoints/, checkpoints_best/, config.json,
eval_results.json, reports/), so `vit_jax_ft.evaluate`, `vit_jax_ft.predict`
and `config.init_head_from` (LP-FT) read it unchanged; probe.json holds the
grid and timings.
"""

import os

# Set before TensorFlow is first imported (as in vit_jax_ft.main).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import dataclasses  # pylint: disable=g-import-not-at-top,g-bad-import-order
import functools
import glob
import hashlib
import json
import re
import time
from typing import Any, Optional

from absl import logging
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vit_jax_ft import checkpoints
from vit_jax_ft import config_ranges
from vit_jax_ft import init_from
from vit_jax_ft import input_pipeline
from vit_jax_ft import losses
from vit_jax_ft import metrics as metrics_lib
from vit_jax_ft import models
from vit_jax_ft import optim
from vit_jax_ft import steps
from vit_jax_ft import train

PROBE_DIR = "probe"
PROBE_FILE = "probe.json"
CLASS_WEIGHTS = ("auto", "balanced", "none")
# Bump when what a cached feature file holds changes meaning.
_FEATURES_VERSION = 1
# A class without training examples is never predicted: kernel 0 and a bias
# this far below the smallest fitted one (sklearn leaves such classes out).
_ABSENT_CLASS_GAP = 10.0
_LOG_EVERY_S = 10.0


# ----------------------------------------------------------------------------
# Fitting a linear head on fixed features.


@dataclasses.dataclass(frozen=True)
class LinearFit:
  """A fitted head (logits = x @ kernel + bias) and how the solver ended."""

  kernel: np.ndarray  # [D, C]
  bias: np.ndarray  # [C]
  iterations: int
  grad_max: float  # Largest absolute gradient entry of the objective at the end.
  converged: bool
  seconds: float = 0.0


def parse_l2_grid(text: str) -> list[float]:
  """config.probe.l2_grid ('1e-4,1e-3,...') as floats; ValueError naming the field otherwise."""
  try:
    values = [float(v) for v in text.split(",") if v.strip()]
  except ValueError:
    values = []
  if not values or not all(np.isfinite(v) and v > 0 for v in values):
    raise ValueError(f"config.probe.l2_grid={text!r} must be comma-separated numbers > 0, "
                     "e.g. '1e-5,1e-4,1e-3,1e-2,1e-1'.")
  return values


def sample_weights(targets: np.ndarray, multilabel: bool, balanced: bool) -> np.ndarray:
  """Per-example loss weights: [N] (single-label) or [N, C] (per label and example).

  'balanced' is scikit-learn's class_weight='balanced': n / (classes * count)
  over the classes present in single-label data; for each label of multi-label
  data, the binary version n / (2 * positives) and n / (2 * negatives), as a
  per-label sklearn fit would weight it.
  """
  n = len(targets)
  if multilabel:
    if not balanced:
      return np.ones(targets.shape, np.float64)
    pos = targets.sum(0)
    neg = n - pos
    w_pos = np.where(pos > 0, n / (2.0 * np.maximum(pos, 1)), 1.0)
    w_neg = np.where(neg > 0, n / (2.0 * np.maximum(neg, 1)), 1.0)
    return np.where(targets > 0.5, w_pos, w_neg)
  if not balanced:
    return np.ones(n, np.float64)
  labels = targets.argmax(1)
  counts = np.bincount(labels, minlength=targets.shape[1])
  present = int((counts > 0).sum())
  return n / (present * counts[labels].astype(np.float64))


# Largest curvature of the softmax / sigmoid cross-entropy per unit of logit
# (p(1-p) <= 1/4): sets the preconditioner below.
_LOSS_CURVATURE = 0.25


@functools.partial(jax.jit, static_argnames=("multilabel",))
def _lbfgs(z, y, sw, l2, precond, rotation, u0, b0, max_iter, tol, *, multilabel: bool):
  """L-BFGS on the fit's objective in the preconditioned principal basis.

  The kernel is rotation @ (precond[:, None] * u): `rotation` [D, r] spans the
  centred features' principal directions (a kernel part outside them changes
  no logit, so the penalty alone sets it to zero), `z` [N, r] are the features
  in that basis, and `precond` = 1 / sqrt(curvature * variance + l2) scales
  each direction so that the objective's Hessian in `u` is roughly the
  identity: correlated features (ResNet's 2048) take tens of iterations
  instead of thousands. Stops when every entry of the objective's gradient
  with respect to the kernel and bias is at most `tol`.
  """
  n = z.shape[0]

  def objective(params):
    kernel = precond * params["u"]
    logits = z @ kernel + params["b"]
    if multilabel:
      per = jnp.sum(sw * optax.sigmoid_binary_cross_entropy(logits, y), axis=-1)
    else:
      per = sw * optax.softmax_cross_entropy(logits, y)
    return jnp.sum(per) / n + 0.5 * l2 * jnp.sum(kernel ** 2)

  def grad_max(grad):
    # d/du = precond * d/d(basis kernel); the full kernel's gradient is rotation @ that.
    kernel_grad = rotation @ (grad["u"] / precond)
    return jnp.maximum(jnp.max(jnp.abs(kernel_grad)), jnp.max(jnp.abs(grad["b"])))

  solver = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(objective)

  def cond(carry):
    _, state = carry
    count = optax.tree.get(state, "count")
    return (count == 0) | ((count < max_iter) & (grad_max(optax.tree.get(state, "grad")) > tol))

  def body(carry):
    params, state = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = solver.update(grad, state, params, value=value, grad=grad,
                                   value_fn=objective)
    return optax.apply_updates(params, updates), state

  params = {"u": u0, "b": b0}
  params, state = jax.lax.while_loop(cond, body, (params, solver.init(params)))
  grad = jax.grad(objective)(params)
  return params, optax.tree.get(state, "count"), grad_max(grad)


class _Problem:
  """One set of features and targets, prepared once for fits at several L2 strengths."""

  def __init__(self, features: np.ndarray, targets: np.ndarray, multilabel: bool,
               weights: Optional[np.ndarray]):
    self.targets = np.asarray(targets, np.float64)
    self.multilabel = multilabel
    n = len(self.targets)
    self.counts = self.targets.sum(0)
    # Labels without a finite optimum are left out (see fit_linear).
    self.fit = (self.counts > 0) & (self.counts < n) if multilabel else self.counts > 0
    if weights is None:
      weights = np.ones(self.targets.shape if multilabel else n)
    self.weights = weights[:, self.fit] if multilabel else weights
    x = np.asarray(features, np.float64)
    self.mean = x.mean(0)
    centred = x - self.mean  # Its offset goes to the (unpenalised) bias.
    variance, rotation = np.linalg.eigh(centred.T @ centred / n)
    keep = variance > 1e-12 * max(float(variance.max(initial=0.0)), 1e-300)
    self.variance, self.rotation = variance[keep], rotation[:, keep]
    self.z = centred @ self.rotation

  def solve(self, l2: float, init: Optional["LinearFit"], max_iter: int,
            tol: float) -> "LinearFit":
    t0 = time.time()
    fit, c = self.fit, len(self.fit)
    if init is not None:  # In this basis: the kernel's rotated coordinates, the centred bias.
      k0 = self.rotation.T @ init.kernel[:, fit]
      b0 = init.bias[fit] + self.mean @ init.kernel[:, fit]
    else:
      k0, b0 = np.zeros((len(self.variance), int(fit.sum()))), np.zeros(int(fit.sum()))
    precond = 1.0 / np.sqrt(_LOSS_CURVATURE * self.variance[:, None] + l2)
    u0 = k0 / precond
    with jax.enable_x64(True):
      args = [jnp.asarray(a, jnp.float64) for a in (
          self.z, self.targets[:, fit], self.weights, l2, precond, self.rotation, u0, b0)]
      params, count, gmax = _lbfgs(*args, jnp.int64(max_iter), jnp.float64(tol),
                                   multilabel=self.multilabel)
      kernel_fit = self.rotation @ (precond * np.asarray(params["u"]))
      bias_fit = np.asarray(params["b"]) - self.mean @ kernel_fit
      count, gmax = int(count), float(gmax)
    kernel = np.zeros((len(self.mean), c))
    kernel[:, fit] = kernel_fit
    if self.multilabel:
      n = len(self.targets)
      bias = np.log((self.counts + 0.5) / (n - self.counts + 0.5))
    else:
      bias = np.full(c, bias_fit.min() - _ABSENT_CLASS_GAP if fit.any() else 0.0)
    bias[fit] = bias_fit
    return LinearFit(kernel=kernel, bias=bias, iterations=count, grad_max=gmax,
                     converged=gmax <= tol, seconds=time.time() - t0)


def fit_linear(features: np.ndarray, targets: np.ndarray, *, l2: float, multilabel: bool,
               weights: Optional[np.ndarray] = None, init: Optional[LinearFit] = None,
               max_iter: int = 1000, tol: float = 1e-5) -> LinearFit:
  """Fits logits = features @ kernel + bias with an L2 penalty on the kernel, in float64.

  Minimises (1/N) sum_i w_i loss_i + l2 / 2 * |kernel|^2, loss the softmax
  cross-entropy (single-label) or the sum of per-label sigmoid cross-entropies
  (multi-label); the same minimiser as scikit-learn's LogisticRegression with
  C = 1 / (N * l2) (lbfgs, multinomial; per label for multi-label data).
  Classes (single-label) without a training example, and labels (multi-label)
  that are all positive or all negative, have no finite optimum: they get a
  zero kernel column and a fixed bias (see _ABSENT_CLASS_GAP; the smoothed
  log-odds for such labels) and are left out of the fit.

  Args:
    features: [N, D].
    targets: [N, C] one-hot (single-label) or multi-hot.
    l2: penalty strength (> 0).
    multilabel: sigmoid per label instead of softmax.
    weights: per-example (or, multi-label, per example and label) loss weights.
    init: a previous fit to start from (warm start along a grid).
    max_iter: L-BFGS iteration limit.
    tol: stop when every gradient entry (kernel and bias) is at most this.
  """
  return _Problem(features, targets, multilabel, weights).solve(l2, init, max_iter, tol)


def fit_grid(features: np.ndarray, targets: np.ndarray, l2s: list[float], *, multilabel: bool,
             weights: Optional[np.ndarray] = None, max_iter: int = 1000,
             tol: float = 1e-5) -> list[LinearFit]:
  """fit_linear at each of `l2s` in turn, each fit starting from the previous one."""
  problem = _Problem(features, targets, multilabel, weights)
  fits, previous = [], None
  for l2 in l2s:
    previous = problem.solve(l2, previous, max_iter, tol)
    fits.append(previous)
  return fits


def standardize(train_features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(mean, scale) of the train features; constant features get scale 1.

  Fitting on standardised features makes one l2 grid fit every backbone (and
  L-BFGS converge faster); `fold_head` moves the scaling into the head.
  """
  x = np.asarray(train_features, np.float64)
  mean, scale = x.mean(0), x.std(0)
  scale[scale < 1e-6 * max(float(scale.max(initial=0.0)), 1e-12)] = 1.0
  return mean, scale


def fold_head(fit: LinearFit, mean: np.ndarray, scale: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray]:
  """(kernel, bias) on raw features of a fit on (features - mean) / scale."""
  kernel = fit.kernel / scale[:, None]
  return kernel, fit.bias - mean @ kernel


def split_metrics(logits: np.ndarray, targets: np.ndarray, loss_fn, multilabel: bool) -> dict:
  """The train loop's eval metrics (metrics.summarize) of one whole split's logits."""
  logits, targets = jnp.asarray(logits, jnp.float32), jnp.asarray(targets, jnp.float32)
  stats = metrics_lib.batch_stats(logits, targets, jnp.ones(len(logits)),
                                  loss_fn(logits, targets), multilabel=multilabel)
  return metrics_lib.summarize(metrics_lib.accumulate(None, stats))


# ----------------------------------------------------------------------------
# Features.


def backbone_features(model, variables: dict, images: jax.Array, flip: bool) -> jax.Array:
  """Pooled features [B, D] of a num_classes=0 model, optionally averaged with the mirror image."""
  features = model.apply(variables, images, train=False)
  if flip:  # NHWC: axis 2 is the width.
    features = 0.5 * (features + model.apply(variables, images[:, :, ::-1], train=False))
  return features


# One compilation for every split of a run (the model and flip are static).
_jit_features = jax.jit(backbone_features, static_argnums=0, static_argnames="flip")


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
                for s in input_pipeline.split_shards(data_dir, info, split)],
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
  apply = functools.partial(_jit_features, model, flip=config.probe.flip)
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

  for batch in input_pipeline.eval_iterator(config.data, data_dir, info, split,
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


# ----------------------------------------------------------------------------
# The program.


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
  config_ranges.check_ranges(config)
  grid = parse_l2_grid(config.probe.l2_grid)
  balanced = _is_balanced(config)
  if jax.process_count() > 1:
    raise ValueError("vit_jax_ft.probe runs on one process (features fit in one host's memory); "
                     "start it without the multi-host environment.")
  os.makedirs(workdir, exist_ok=True)
  data_dir, info = train.load_data_info(config, workdir)
  train._check_config(config, info)  # pylint: disable=protected-access
  _check_workdir(checkpoints.make_managers(workdir, config))
  multilabel = info["multilabel"]
  num_classes = len(info["class_names"])

  # The state a training run would start from, loaded the same way.
  init_from.apply_model_options(config, workdir)
  dtype = train._DTYPES[config.dtype]  # pylint: disable=protected-access
  model = models.create_model(config.model, num_classes, dtype)
  total_steps = train.total_train_steps(
      config, info["splits"][config.data.train_split]["num_examples"])
  tx = optim.make_optimizer(config.optimizer,
                            optim.learning_rate_schedule(config.optimizer, total_steps))
  state = steps.create_train_state(model, tx, config.data.image_size, config.seed,
                                   config.loss_scale_init if config.dtype == "float16" else 1.0)
  metadata = None
  if config.init_from:
    state, metadata = init_from.load_weights(config, model, state, workdir)
  else:
    logging.warning("No config.init_from: probing the features of a randomly initialised %s.",
                    config.model.name)
  config.data.normalization = init_from.resolve_normalization(config, workdir, metadata)
  logging.info("Input normalisation: %s.", config.data.normalization)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))

  # Features, once per split (cached).
  feature_model = models.create_model(config.model, 0, dtype)
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
  mean, scale = standardize(x_train)
  z_train = (x_train - mean) / scale
  weights = sample_weights(y_train, multilabel, balanced)
  # The loss the train loop's eval reports (weighted for weighted_* losses).
  class_weights = train._class_weights(config, info)  # pylint: disable=protected-access
  loss_fn = losses.get_loss_fn(config.loss, class_weights)
  l2s = sorted(set(grid), reverse=True)
  fits = fit_grid(z_train, y_train, l2s, multilabel=multilabel, weights=weights,
                  max_iter=config.probe.max_iter, tol=config.probe.tol)
  rows, heads = [], {}
  for l2, fit in zip(l2s, fits):
    kernel, bias = fold_head(fit, mean, scale)
    heads[l2] = (kernel.astype(np.float32), bias.astype(np.float32))
    val = split_metrics(data["val"][0] @ heads[l2][0] + heads[l2][1], data["val"][1], loss_fn,
                        multilabel)
    if config.best_metric not in val:
      raise ValueError(f"config.best_metric={config.best_metric!r} is not a validation metric "
                       f"(choose from {sorted(k for k in val if k != 'num_examples')}).")
    train_metrics = split_metrics(x_train @ heads[l2][0] + heads[l2][1], y_train, loss_fn,
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
  t_save = time.time()

  # The head into the train state; the same checkpoints and results as a training run.
  head = state.params["head"]
  if (np.shape(head["kernel"]), np.shape(head["bias"])) != (kernel.shape, bias.shape):
    raise ValueError(f"Fitted head {kernel.shape} does not fit the model's head "
                     f"{np.shape(head['kernel'])}.")
  state = state.replace(params={**state.params, "head": {"kernel": kernel, "bias": bias}})
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  state = jax.device_put(state, device)
  _save_checkpoints(config, workdir, state, chosen[f"val_{config.best_metric}"])
  results = {"step": 0}
  for role in ("val", "test"):
    if role in data:
      metrics = split_metrics(data[role][0] @ kernel + bias, data[role][1], loss_fn, multilabel)
      results |= {f"{role}_{k}": v for k, v in metrics.items()}
  with open(os.path.join(workdir, "eval_results.json"), "w") as f:
    json.dump(results, f, indent=2)
  logging.info("Final metrics: %s", results)

  t_report = time.time()
  if config.final_report:
    from vit_jax_ft import evaluate as evaluate_lib  # pylint: disable=g-import-not-at-top
    evaluate_lib.write_reports(config, workdir)
  t_end = time.time()
  summary = {
      "best_metric": config.best_metric, "best_mode": config.best_mode,
      "chosen_l2": chosen["l2"], "chosen": chosen, "grid": rows,
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


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  from vit_jax_ft import main as main_lib  # pylint: disable=g-import-not-at-top
  app.run(functools.partial(main_lib.main, entry=run_probe), flags_parser=main_lib.parse_flags)
