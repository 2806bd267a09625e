"""Learning-rate schedule and the AdamW optimizer.

The schedule is checked at start-up: a run whose learning rate would stay at
(or never leave) zero is a configuration error, not something to discover
after a day of training.
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import optax


def validate_schedule(opt: ml_collections.ConfigDict, total_steps: int) -> None:
  """Rejects schedules that would leave the learning rate at zero or never at peak."""
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


def learning_rate_schedule(opt: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup to `lr`, then cosine decay to `lr * min_lr_ratio`.

  Step 0 already trains: the warmup gives lr * (step + 1) / warmup_steps,
  reaching the peak at step warmup_steps - 1. The cosine starts at the peak at
  step warmup_steps and would reach the floor at step total_steps, one past
  the last step, so no step is spent at a zero learning rate.
  """
  validate_schedule(opt, total_steps)
  peak, floor = opt.lr, opt.lr * opt.min_lr_ratio
  warmup = opt.warmup_steps
  decay_steps = total_steps - warmup

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = peak * (step + 1.0) / max(warmup, 1)
    progress = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
    cosine = floor + (peak - floor) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
    return jnp.where(step < warmup, warm, cosine)

  return schedule


def _decay_mask(params):
  # Weight decay on Dense/Conv kernels only: not on biases (attention biases
  # are 2-D, so a rank rule would catch them), norm scales, position
  # embeddings or the class token (as timm and big_vision).
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], "key", None) == "kernel", params)


def make_optimizer(opt: ml_collections.ConfigDict, schedule: optax.Schedule):
  """AdamW with optional global-norm clipping."""
  parts = []
  if opt.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(opt.grad_clip_norm))
  parts.append(optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                           weight_decay=opt.weight_decay, mask=_decay_mask))
  return optax.chain(*parts)
