"""The allowed range of every numeric config field, checked in one place.

A zero batch size used to surface as a ZeroDivisionError and a negative one as
"-319 training steps"; checking the ranges before anything is built turns each
into one line that names the field and the value.
"""

import math
from typing import Callable

import ml_collections

from vit_jax_ft.models import layer_impl

# (dotted field, test, what the test means). Optional fields (None) are checked
# only when set. Fields of one model family are skipped when the config's model
# section has no such field.
_RANGES: tuple[tuple[str, Callable[[float], bool], str], ...] = (
    ("batch_size", lambda v: v >= 1, "an integer >= 1"),
    ("eval_batch_size", lambda v: v >= 1, "an integer >= 1"),
    ("num_epochs", lambda v: v > 0, "> 0"),
    ("total_steps", lambda v: v >= 1, "an integer >= 1"),
    ("log_every_steps", lambda v: v >= 1, "an integer >= 1"),
    ("eval_every_steps", lambda v: v >= 1, "an integer >= 1"),
    ("checkpoint_every_steps", lambda v: v >= 1, "an integer >= 1"),
    ("keep_checkpoints", lambda v: v >= 1, "an integer >= 1"),
    ("loss_scale_init", lambda v: v >= 1, ">= 1"),
    ("loss_scale_period", lambda v: v >= 1, "an integer >= 1"),
    ("min_delta", lambda v: v >= 0, ">= 0"),
    ("early_stopping_patience", lambda v: v >= 0, "an integer >= 0"),
    ("plateau_patience", lambda v: v >= 0, "an integer >= 0"),
    ("plateau_factor", lambda v: 0 < v < 1, "in (0, 1)"),
    ("ema_decay", lambda v: 0 <= v < 1, "in [0, 1) (0 disables)"),
    ("bootstrap_resamples", lambda v: v == 0 or 100 <= v <= 100_000,
     "0 (no intervals) or an integer in [100, 100000]"),
    ("bootstrap_seed", lambda v: v >= 0, "an integer >= 0"),
    ("data.fold", lambda v: v >= -1 and v == int(v),
     "an integer >= -1 (-1: no cross-validation; k: fold k of a dataset prepared with --folds)"),
    ("data.image_size", lambda v: v >= 1, "an integer >= 1"),
    ("data.shuffle_buffer", lambda v: v >= 1, "an integer >= 1"),
    ("data.crop_min_scale", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("data.eval_crop_fraction", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("data.randaugment_layers", lambda v: v >= 0, "an integer >= 0"),
    ("data.randaugment_magnitude", lambda v: 0 <= v <= 10, "in [0, 10]"),
    ("data.mixup_alpha", lambda v: v >= 0, ">= 0"),
    ("data.cutmix_alpha", lambda v: v >= 0, ">= 0"),
    ("data.mix_prob", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("data.mix_switch_prob", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("model.dropout_rate", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("model.attention_dropout_rate", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("model.drop_path_rate", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("model.layer_norm_eps", lambda v: v > 0, "> 0"),
    ("model.bn_epsilon", lambda v: v > 0, "> 0"),
    ("model.bn_momentum", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("optimizer.lr", lambda v: v > 0, "> 0"),
    ("optimizer.warmup_steps", lambda v: v >= 0, "an integer >= 0"),
    ("optimizer.eps", lambda v: v > 0, "> 0"),
    ("optimizer.b1", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("optimizer.b2", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("optimizer.weight_decay", lambda v: v >= 0, ">= 0"),
    ("optimizer.grad_clip_norm", lambda v: v >= 0, ">= 0 (0 disables)"),
    ("optimizer.accum_steps", lambda v: v >= 1, "an integer >= 1"),
    ("optimizer.head_only_steps", lambda v: v >= 0, "an integer >= 0"),
    ("optimizer.layer_decay", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("loss.label_smoothing", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("loss.focal_gamma", lambda v: v >= 0, ">= 0"),
    ("probe.max_iter", lambda v: v >= 1, "an integer >= 1"),
    ("probe.tol", lambda v: v > 0, "> 0"),
)


# (dotted field, allowed values) for string fields checked before the model is built.
_CHOICES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("model.layer_impl", layer_impl.LAYER_IMPLS),
)


def _lookup(config: ml_collections.ConfigDict, dotted: str):
  node = config
  for part in dotted.split("."):
    if part not in node:
      return _MISSING
    node = node[part]
  return node


_MISSING = object()


def check_ranges(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first numeric field outside its range (or string field
  outside its choices)."""
  for field, ok, meaning in _RANGES:
    value = _lookup(config, field)
    if value is _MISSING or value is None:
      continue
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ValueError(f"config.{field}={value!r} must be a number ({meaning}).")
    if not math.isfinite(value) or not ok(value):
      raise ValueError(f"config.{field}={value!r} must be {meaning}.")
  for field, allowed in _CHOICES:
    value = _lookup(config, field)
    if value is not _MISSING and value not in allowed:
      raise ValueError(f"config.{field}={value!r} must be one of "
                       f"{', '.join(map(repr, allowed))}.")
