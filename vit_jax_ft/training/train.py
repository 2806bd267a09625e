"""The training loop: init or resume, train steps, periodic eval, checkpoints, metrics."""

import functools
import json
import math
import os
import time

from absl import logging
from clu import metric_writers
from clu import periodic_actions
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from vit_jax_ft import checkpoints
from vit_jax_ft import config_ranges
from vit_jax_ft import workdir as workdir_lib
from vit_jax_ft.data import class_weights as class_weights_lib
from vit_jax_ft.inputs import dataset
from vit_jax_ft.inputs import pipeline
from vit_jax_ft.models import layer_impl
from vit_jax_ft.reports import writer as report_writer
from vit_jax_ft.training import init_from
from vit_jax_ft.training import losses
from vit_jax_ft.training import metrics as metrics_lib
from vit_jax_ft.training import optim
from vit_jax_ft.training import steps

def total_train_steps(config: ml_collections.ConfigDict, num_train: int) -> int:
  """Steps from exactly one of config.total_steps and config.num_epochs."""
  if (config.total_steps is None) == (config.num_epochs is None):
    raise ValueError("Set exactly one of config.total_steps and config.num_epochs "
                     f"(got total_steps={config.total_steps}, num_epochs={config.num_epochs}).")
  if config.total_steps is not None:
    return config.total_steps
  return math.ceil(config.num_epochs * num_train / config.batch_size)


def check_config(config: ml_collections.ConfigDict, info: dict) -> None:
  if info["multilabel"] and not losses.is_multilabel_loss(config.loss.name):
    raise ValueError(f"The dataset is multi-label but loss.name={config.loss.name!r} is a "
                     "softmax loss; use 'sigmoid_bce' or 'sigmoid_focal'.")
  n = jax.device_count()
  if config.batch_size % (n * config.optimizer.accum_steps):
    raise ValueError(f"batch_size={config.batch_size} must divide evenly over {n} devices x "
                     f"optimizer.accum_steps={config.optimizer.accum_steps}.")
  if config.eval_batch_size % n:
    raise ValueError(f"eval_batch_size={config.eval_batch_size} must divide over {n} devices.")
  if config.data.sampler != "none" and config.loss.name.startswith("weighted"):
    logging.warning("data.sampler=%r and loss.name=%r both correct for class imbalance; "
                    "together they over-correct.", config.data.sampler, config.loss.name)
  if config.best_mode not in ("max", "min"):
    raise ValueError(f"best_mode must be 'max' or 'min', got {config.best_mode!r}.")
  _check_classes(config, info)


def _check_classes(config: ml_collections.ConfigDict, info: dict) -> None:
  """Refuses a single-label train split with fewer than two labelled classes.

  With one class every loss is zero from the first step and accuracy is 1.0:
  a run that looks perfect and learned nothing. Eval splits that miss classes
  train has only get a warning (small sets often do).
  """
  splits = info["splits"]
  train_counts = (splits.get(config.data.train_split) or {}).get("class_counts")
  if info["multilabel"] or train_counts is None:
    return
  names = info["class_names"]
  present = [n for n, c in zip(names, train_counts) if c > 0]
  if len(present) < 2:
    listing = ", ".join(f"{n}: {c}" for n, c in zip(names, train_counts))
    raise ValueError(
        f"The {config.data.train_split!r} split has labelled examples of {len(present)} "
        f"class(es) ({listing}); a classifier needs at least two. Check the source "
        "folders or label column given to vit_jax_ft.data.prepare.")
  for split in (config.data.val_split, config.data.test_split):
    counts = (splits.get(split) or {}).get("class_counts") if split else None
    if counts is None:
      continue
    missing = [n for n, c, e in zip(names, train_counts, counts) if c > 0 and e == 0]
    if missing:
      logging.warning("Split %r has no examples of %d class(es) that %r has: %s; their "
                      "recall there is undefined.", split, len(missing),
                      config.data.train_split, ", ".join(missing))


def class_weights(config: ml_collections.ConfigDict, info: dict):
  """Class weights for the weighted losses: dataset_info.json's, else from the counts.

  Classes without training examples get weight 1; it never multiplies a loss.
  """
  if not config.loss.name.startswith("weighted"):
    return None
  if info.get("class_weights") is not None:
    return np.asarray([1.0 if w is None else w for w in info["class_weights"]], np.float32)
  counts = np.asarray(info["splits"][config.data.train_split]["class_counts"])
  weights = np.ones(len(counts))
  weights[counts > 0] = class_weights_lib.compute_class_weights(counts[counts > 0])
  return weights


def evaluate(eval_fn, state, config, data_dir, info, split, sharding) -> dict:
  """Exact metrics over a whole split (padded batches, masked)."""
  total = None
  for batch in pipeline.eval_iterator(config.data, data_dir, info, split,
                                            batch_size=config.eval_batch_size,
                                            process_index=jax.process_index(),
                                            process_count=jax.process_count()):
    batch = jax.make_array_from_process_local_data(sharding, batch)
    total = metrics_lib.accumulate(total, eval_fn(state, batch))
  return metrics_lib.summarize(total)


def _last_good(last_saved) -> str:
  """Where a rerun would resume from, for the abort messages."""
  if last_saved is None:
    return ("No checkpoint was saved yet; start again with a lower optimizer.lr (in a fresh "
            "workdir or this one).")
  # Finite is not the same as healthy: a run may have been diverging before it.
  return (f"The last finite checkpoint is step {last_saved} (check train_loss before it: "
          "divergence can start earlier); to continue from it rerun with a lower optimizer.lr "
          "and --config.resume_with_changes=True, or start over in a fresh workdir.")


def _log_train(writer, pending: list, step: int, images_per_sec: float, multilabel: bool,
               last_saved=None):
  """Writes averaged train metrics; aborts if the loss or gradient norm is not finite.

  With float16 loss scaling, skipped (overflowed) steps are counted but left
  out of the averages; only a window in which every step was skipped aborts.
  Without it, a non-finite gradient norm has already poisoned the parameters
  even while the loss is still finite, so it aborts too.
  """
  pending = jax.device_get(pending)
  used = [m for m in pending if not m.get("skipped", 0.0)] or pending
  means = {k: float(np.mean([m[k] for m in used])) for k in pending[0]}
  if "skipped" in means:
    means["skipped"] = float(sum(m["skipped"] for m in pending))
    means["loss_scale"] = float(pending[-1]["loss_scale"])
  if multilabel:
    means.pop("accuracy")
  if not math.isfinite(means["loss"]) or means.get("skipped", 0) == len(pending):
    raise FloatingPointError(
        f"Train loss is {means['loss']} at step {step}. Lower optimizer.lr, check the input "
        f"normalisation, or train in float32/bfloat16. {_last_good(last_saved)}")
  if "skipped" not in means and not math.isfinite(means.get("grad_norm", 0.0)):
    raise FloatingPointError(
        f"Gradient norm is {means['grad_norm']} at step {step} (loss {means['loss']}). Lower "
        f"optimizer.lr or set optimizer.grad_clip_norm. {_last_good(last_saved)}")
  writer.write_scalars(step, {f"train_{k}": v for k, v in means.items()}
                       | {"images_per_sec": images_per_sec})


def _after_eval(config, state, step: int, best_step: int):
  """Reduce-on-plateau and early stopping; returns (state, stop).

  Both count evaluations since the best one (the plateau also since its last
  reduction), derived from steps, so they survive a restart unchanged.
  """
  every = config.eval_every_steps
  stop = (config.early_stopping_patience > 0
          and (step - best_step) // every >= config.early_stopping_patience)
  since = (step - max(best_step, int(state.lr_scale_step))) // every
  if not stop and config.plateau_patience > 0 and since >= config.plateau_patience:
    state = state.replace(lr_scale=state.lr_scale * config.plateau_factor,
                          lr_scale_step=jnp.copy(state.step))  # Own buffer: donated.
    logging.info("No %s improvement for %d evaluations: learning rate x%g (now x%g).",
                 config.best_metric, since, config.plateau_factor, float(state.lr_scale))
  return state, stop


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (or resumes) and evaluates; returns the final metrics."""
  config = config.copy_and_resolve_references()  # Resolved below; the caller's stays as is.
  config_ranges.check_ranges(config)  # Before anything is written.
  os.makedirs(workdir, exist_ok=True)
  with workdir_lib.lock(workdir):
    return _train_and_evaluate(config, workdir)


def model_param_groups(config: ml_collections.ConfigDict, model) -> tuple[dict, optim.ParamGroups]:
  """The model's abstract variables and config.optimizer's parameter groups over them."""
  abstract_vars = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1,) + (config.data.image_size,) * 2 + (3,)), train=False))
  groups = optim.param_groups(config.optimizer, abstract_vars["params"],
                              abstract_vars.get("batch_stats"))
  return abstract_vars, groups


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """train_and_evaluate, holding the workdir's lock."""
  data_dir, info = dataset.load_data_info(config, workdir)
  check_config(config, info)
  multilabel = info["multilabel"]
  total_steps = total_train_steps(config, info["splits"][config.data.train_split]["num_examples"])
  schedule = optim.learning_rate_schedule(config.optimizer, total_steps)
  init_from.apply_model_options(config, workdir)
  model = workdir_lib.build_model(config, len(info["class_names"]))
  abstract_vars, groups = model_param_groups(config, model)
  tx = optim.make_optimizer(config.optimizer, schedule, groups)
  loss_fn = losses.get_loss_fn(config.loss, class_weights(config, info))

  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  data_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  float16 = config.dtype == "float16"
  ema = steps.Ema(decay=config.ema_decay, warmup=config.ema_warmup)
  state = steps.create_train_state(model, tx, config.data.image_size, config.seed,
                                   config.loss_scale_init if float16 else 1.0)
  state = jax.device_put(steps.init_ema(state) if ema.enabled else state, replicated)
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  logging.info("Model %s: %s parameters, %d classes, %d train steps.", config.model.name,
               f"{num_params:,}", len(info["class_names"]), total_steps)
  for line in optim.describe(config.optimizer, groups, abstract_vars.get("batch_stats")):
    logging.info("%s", line)

  last_ckpt, best_ckpt = checkpoints.make_managers(workdir, config)
  if last_ckpt.latest_step() is not None:
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    state = checkpoints.restore_latest(last_ckpt, abstract)
    bad, total = checkpoints.count_nonfinite(state)
    if bad:  # Saved before saves were checked: resuming would only fail again.
      raise FloatingPointError(
          f"Checkpoint {last_ckpt.directory}/{last_ckpt.latest_step()} holds non-finite values "
          f"in {bad} of {total} arrays; delete it (or the workdir) and rerun with a lower "
          "optimizer.lr.")
    logging.info("Resumed from %s at step %d.", last_ckpt.directory, int(state.step))
    if ema.enabled and not state.ema:
      logging.warning("Checkpoint step %d has no EMA weights: the EMA starts from its weights.",
                      int(state.step))
      state = jax.device_put(steps.init_ema(state), replicated)
  metadata = None
  if last_ckpt.latest_step() is None and config.init_from:
    state, metadata = init_from.load_weights(config, model, state, workdir)
    state = jax.device_put(steps.init_ema(state) if ema.enabled else state, replicated)
  elif not config.init_from:
    logging.warning("No config.init_from: training %s from random initialisation.",
                    config.model.name)
  if last_ckpt.latest_step() is None and config.init_head_from:  # LP-FT: a fitted head.
    state = init_from.load_head(config, state, info, workdir)
    state = jax.device_put(steps.init_ema(state) if ema.enabled else state, replicated)
  config.data.normalization = workdir_lib.resolve_normalization(config, workdir, metadata)
  logging.info("Input normalisation: %s.", config.data.normalization)
  if last_ckpt.latest_step() is not None:
    workdir_lib.check_resume_config(config, workdir, int(state.step))
  workdir_lib.write_config(config, workdir)  # As run ('auto' resolved), to reproduce it.

  # Per-step scalars (the learning rate) go to TensorBoard only; the console
  # sees the averaged metrics every log_every_steps.
  tensorboard = (metric_writers.SummaryWriter(workdir) if jax.process_index() == 0
                 else metric_writers.MultiWriter([]))
  writer = metric_writers.MultiWriter([tensorboard, metric_writers.LoggingWriter()])
  scaling = steps.LossScaling(enabled=float16, period=config.loss_scale_period)
  train_fn = _train_fns(config, model, groups, schedule, abstract_vars, loss_fn=loss_fn,
                        accum_steps=config.optimizer.accum_steps, scaling=scaling, ema=ema)
  eval_fn = jax.jit(functools.partial(steps.eval_step, model=model, loss_fn=loss_fn,
                                      multilabel=multilabel),
                    compiler_options=layer_impl.compiler_options(model.layer_impl))
  run_eval = functools.partial(evaluate, eval_fn, config=config, data_dir=data_dir, info=info,
                               sharding=data_sharding)
  checkpoints.recover_best(last_ckpt, best_ckpt, state, config,
                           lambda s: _val_scalars(run_eval, s, config)[0])
  best = checkpoints.best_value(best_ckpt, checkpoints.best_key(config))

  try:
    state, val_metrics = _train_loop(config, state, train_fn, run_eval, schedule, total_steps,
                                     data_dir, info, (last_ckpt, best_ckpt, best),
                                     (tensorboard, writer), data_sharding, workdir)
  finally:
    # Also on Ctrl-C or an error: let in-flight async saves finish cleanly.
    last_ckpt.wait_until_finished()
    best_ckpt.wait_until_finished()
    writer.flush()
  results = _final_eval(run_eval, state, config, workdir, val_metrics)
  if config.final_report:
    report_writer.write_reports(config, workdir)
  return results


def _train_fns(config, model, groups, schedule, abstract_vars, **step_kwargs):
  """The jitted train step for 1-based step `step`: `train_fn(step)(state, batch)`.

  With optimizer.head_only_steps the first steps use a head-only variant (the
  rest frozen, its BatchNorm layers in inference mode) whose optimizer state
  has the same structure, so a checkpoint resumes on either side of the switch.
  """
  fns = []
  for head_only in (True, False) if groups.head_only_steps else (False,):
    frozen_bn = groups.frozen_batch_norms(abstract_vars.get("batch_stats", {}), head_only)
    fns.append(jax.jit(functools.partial(
        steps.train_step, model=model.clone(frozen_bn=frozen_bn) if frozen_bn else model,
        tx=optim.make_optimizer(config.optimizer, schedule, groups, head_only=head_only),
        frozen=groups.frozen_mask(abstract_vars["params"], head_only), **step_kwargs),
                       donate_argnums=0,
                       compiler_options=layer_impl.compiler_options(model.layer_impl)))
  return lambda step: fns[0] if step <= groups.head_only_steps else fns[-1]


def _train_loop(config, state, train_fn, run_eval, schedule, total_steps, data_dir, info,
                ckpts, writers, data_sharding, workdir):
  """Steps from state.step to total_steps (or an early stop); returns (state, val metrics)."""
  last_ckpt, best_ckpt, best = ckpts
  tensorboard, writer = writers
  start = int(state.step)
  stopped_file = os.path.join(workdir, "early_stopped.json")
  if os.path.exists(stopped_file):
    logging.info("The run stopped early before (%s); evaluating only.", stopped_file)
    return state, None
  train_iter = pipeline.train_iterator(config.data, data_dir, info,
                                             batch_size=config.batch_size, seed=config.seed,
                                             start_step=start,
                                             process_index=jax.process_index(),
                                             process_count=jax.process_count())
  progress = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer,
                                              every_steps=config.log_every_steps)
  best_step = best_ckpt.best_step() or 0
  lr_scale = float(state.lr_scale)
  learning_rate = optim.on_host(schedule)
  pending, val_metrics, t0, t0_step = [], None, time.time(), start
  last_saved = last_ckpt.latest_step()  # Finite: checked on resume and before every save.

  def save(manager, step, state, metrics=None, record=None):
    try:
      checkpoints.save(manager, step, state, metrics, record)
    except checkpoints.NonFiniteError as e:
      raise checkpoints.NonFiniteError(
          f"{e} Lower optimizer.lr or set optimizer.grad_clip_norm. {_last_good(last_saved)}"
      ) from e
  for step in range(start + 1, total_steps + 1):
    batch = jax.make_array_from_process_local_data(data_sharding, next(train_iter))
    state, step_metrics = train_fn(step)(state, batch)
    pending.append(step_metrics)
    tensorboard.write_scalars(step, {"learning_rate": learning_rate(step - 1) * lr_scale})
    progress(step)
    last = step == total_steps
    if step % config.log_every_steps == 0 or last:
      rate = (step - t0_step) * config.batch_size / (time.time() - t0)
      _log_train(writer, pending, step, rate, info["multilabel"], last_saved)
      pending, t0, t0_step = [], time.time(), step
    record = None  # What the last checkpoint of an eval step records of it.
    if step % config.eval_every_steps == 0 or last:
      scalars, val_metrics = _val_scalars(run_eval, state, config)
      writer.write_scalars(step, scalars)
      value = scalars[checkpoints.best_key(config)]
      improved = checkpoints.is_better(value, best, config)
      if improved:
        best, best_step = value, step
        save(best_ckpt, step, state, checkpoints.best_metrics(config, scalars))
      record = checkpoints.eval_record(config, scalars, improved)
      state, stop = _after_eval(config, state, step, best_step)
      lr_scale = float(state.lr_scale)
      if stop and not last:
        logging.info("Early stopping at step %d: no %s improvement since step %d.", step,
                     config.best_metric, best_step)
        save(last_ckpt, step, state, record=record)
        if jax.process_index() == 0:
          with open(stopped_file, "w") as f:
            json.dump({"step": step, "best_step": best_step, "best": best}, f)
        return state, val_metrics
    if step % config.checkpoint_every_steps == 0 or last:
      save(last_ckpt, step, state, record=record)
      last_saved = step
  if start >= total_steps:
    logging.info("Training already complete at step %d; evaluating only.", start)
  return state, val_metrics


def _val_scalars(run_eval, state, config) -> tuple[dict, dict]:
  """(the 'val_*' and 'val_ema_*' scalars, the metrics the final eval reports) of `state`."""
  val_metrics = run_eval(state, split=config.data.val_split)
  scalars = {f"val_{k}": v for k, v in val_metrics.items()}
  if state.ema:  # The EMA weights too: val_ema_*.
    ema_metrics = run_eval(steps.ema_weights(state), split=config.data.val_split)
    scalars |= {f"val_ema_{k}": v for k, v in ema_metrics.items()}
    if checkpoints.evaluates_ema(config):  # What the final eval reports.
      val_metrics = ema_metrics
  return scalars, val_metrics


def _final_eval(run_eval, state, config, workdir, val_metrics) -> dict:
  """Evaluates the final state (its EMA weights if config.eval_ema) on val and test.

  Writes eval_results.json, whose "weights" says which: 'ema' or 'raw'.
  `val_metrics` are those of the same weights when already computed.
  """
  use_ema = checkpoints.evaluates_ema(config)
  if use_ema:
    state = steps.ema_weights(state)
  if val_metrics is None:
    val_metrics = run_eval(state, split=config.data.val_split)
  results = {"step": int(state.step), "weights": "ema" if use_ema else "raw"}
  results |= {f"val_{k}": v for k, v in val_metrics.items()}
  if config.data.test_split:
    test_metrics = run_eval(state, split=config.data.test_split)
    results |= {f"test_{k}": v for k, v in test_metrics.items()}
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "eval_results.json"), "w") as f:
      json.dump(results, f, indent=2)
  logging.info("Final metrics: %s", results)
  return results
