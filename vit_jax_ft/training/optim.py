"""Learning-rate schedules and the optimizers (all from optax).

The schedule is checked at start-up: a run whose learning rate would stay at
(or never leave) zero is a configuration error, not something to discover
after a day of training.
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import optax

SCHEDULES = ("cosine", "linear", "constant", "step")
OPTIMIZERS = ("adamw", "adam", "sgd", "adadelta", "rmsprop", "lamb", "lion")


def step_boundaries(opt: ml_collections.ConfigDict) -> list[float]:
  """`optimizer.step_decay_boundaries` as a list of fractions of the decay phase."""
  text = opt.step_decay_boundaries
  try:
    return [float(part) for part in text.split(",") if part.strip()]
  except ValueError:
    raise ValueError(f"optimizer.step_decay_boundaries={text!r} must be comma-separated "
                     "numbers, e.g. '0.5,0.75'.") from None


def _validate_step(opt: ml_collections.ConfigDict) -> None:
  if not 0.0 < opt.step_decay_factor <= 1.0:
    raise ValueError(f"optimizer.step_decay_factor={opt.step_decay_factor} must be in (0, 1]: "
                     "the learning rate would reach zero (or grow).")
  bounds = step_boundaries(opt)
  if not bounds or any(not 0.0 < b < 1.0 for b in bounds) or bounds != sorted(set(bounds)):
    raise ValueError(f"optimizer.step_decay_boundaries={opt.step_decay_boundaries!r} must be "
                     "strictly increasing fractions in (0, 1), e.g. '0.5,0.75'.")
  # Many tiny factors can underflow float32 to zero: that is a zero learning rate too.
  if not jnp.float32(opt.lr) * jnp.float32(opt.step_decay_factor)**len(bounds) > 0:
    raise ValueError(f"optimizer.step_decay_factor={opt.step_decay_factor} over "
                     f"{len(bounds)} boundaries makes the learning rate zero in float32.")


def validate_schedule(opt: ml_collections.ConfigDict, total_steps: int) -> None:
  """Rejects schedules that would leave the learning rate at zero or never at peak."""
  if opt.schedule not in SCHEDULES:
    raise ValueError(f"optimizer.schedule={opt.schedule!r} is unknown; choose from "
                     f"{', '.join(SCHEDULES)}.")
  if total_steps <= 0:
    raise ValueError(f"The run has {total_steps} training steps; set num_epochs or "
                     "total_steps so that at least one step is taken (is the train split "
                     "smaller than batch_size?).")
  if not opt.lr > 0:
    raise ValueError(f"optimizer.lr={opt.lr} must be > 0: the model would never change.")
  if opt.warmup_steps < 0 or opt.warmup_steps >= total_steps:
    raise ValueError(
        f"optimizer.warmup_steps={opt.warmup_steps} must be in [0, total_steps={total_steps}): "
        "the learning rate would never reach its peak or decay.")
  if not 0.0 <= opt.min_lr_ratio <= 1.0:
    raise ValueError(f"optimizer.min_lr_ratio={opt.min_lr_ratio} must be within [0, 1].")
  if opt.schedule == "step":
    _validate_step(opt)


def learning_rate_schedule(opt: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup to `lr`, then `opt.schedule` decay.

  Step 0 already trains: the warmup gives lr * (step + 1) / warmup_steps,
  reaching the peak at step warmup_steps - 1. The decay starts at the peak at
  step warmup_steps. 'cosine' and 'linear' would reach the floor
  lr * min_lr_ratio at step total_steps, one past the last step, so no step
  is spent at a zero learning rate. 'constant' stays at the peak; 'step'
  multiplies it by step_decay_factor at each boundary fraction of the decay
  phase (no floor: the factors set the end value).
  """
  validate_schedule(opt, total_steps)
  peak, floor = opt.lr, opt.lr * opt.min_lr_ratio
  warmup = opt.warmup_steps
  decay_steps = total_steps - warmup
  bounds = step_boundaries(opt) if opt.schedule == "step" else []

  def decay(progress):
    if opt.schedule == "cosine":
      return floor + (peak - floor) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
    if opt.schedule == "linear":
      return floor + (peak - floor) * (1.0 - progress)
    if opt.schedule == "constant":
      return jnp.full_like(progress, peak)
    passed = sum((progress >= b).astype(jnp.float32) for b in bounds)
    return peak * opt.step_decay_factor**passed

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = peak * (step + 1.0) / max(warmup, 1)
    progress = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
    return jnp.where(step < warmup, warm, decay(progress))

  return schedule


def on_host(schedule: optax.Schedule):
  """`schedule` as a step -> float function evaluated on the host CPU.

  The train loop logs the learning rate every step; evaluated on the default
  device, `float(schedule(step))` would queue behind the (asynchronously
  dispatched) train step on a GPU and wait for it.
  """
  cpu = jax.local_devices(backend="cpu")[0]  # This process's own: others' are not addressable.

  def value(step: int) -> float:
    with jax.default_device(cpu):
      return float(schedule(step))

  return value


def _decay_mask(params):
  # Weight decay on Dense/Conv kernels only: not on biases (attention biases
  # are 2-D, so a rank rule would catch them), norm scales, position
  # embeddings or the class token (as timm and big_vision).
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], "key", None) == "kernel", params)


def _base_optimizer(opt: ml_collections.ConfigDict, schedule: optax.Schedule):
  """The optimizer named by `opt.name`, with the kernel-only weight decay."""
  wd = opt.weight_decay
  # These take decoupled weight decay (scaled by the learning rate) themselves.
  decoupled = {
      "adamw": lambda: optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                                   weight_decay=wd, mask=_decay_mask),
      "lamb": lambda: optax.lamb(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                                 weight_decay=wd, mask=_decay_mask),
      "lion": lambda: optax.lion(schedule, b1=opt.b1, b2=opt.b2,
                                 weight_decay=wd, mask=_decay_mask),
  }
  # These get weight decay as an L2 term added to the gradient before the
  # optimizer (as torch's weight_decay for Adam, SGD, RMSprop, Adadelta).
  coupled = {
      "adam": lambda: optax.adam(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps),
      "sgd": lambda: optax.sgd(schedule, momentum=opt.momentum or None,
                               nesterov=opt.nesterov),
      "adadelta": lambda: optax.adadelta(schedule, rho=opt.rms_decay, eps=opt.eps),
      "rmsprop": lambda: optax.rmsprop(schedule, decay=opt.rms_decay, eps=opt.eps),
  }
  if opt.name in decoupled:
    return decoupled[opt.name]()
  if opt.name in coupled:
    if wd > 0:
      return optax.chain(optax.add_decayed_weights(wd, _decay_mask), coupled[opt.name]())
    return coupled[opt.name]()
  raise ValueError(f"optimizer.name={opt.name!r} is unknown; choose from {', '.join(OPTIMIZERS)}.")


def make_optimizer(opt: ml_collections.ConfigDict, schedule: optax.Schedule):
  """The optimizer `opt.name` (default AdamW) with optional global-norm clipping."""
  parts = []
  if opt.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(opt.grad_clip_norm))
  parts.append(_base_optimizer(opt, schedule))
  return optax.chain(*parts)
