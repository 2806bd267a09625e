"""Classification losses.

Every loss here is a pure function of `logits` [..., C] (any float dtype) and
`targets` [..., C] (float: one-hot, label-smoothed, mixup-mixed or multi-hot)
and returns the PER-EXAMPLE loss, shape [...] (i.e. [B] for [B, C] inputs), in
float32. Reduction (masking padded examples, averaging over the batch, psum
across devices) is deliberately left to the train step, which is the only
place that knows about padding and device layout.

Computation is always done in float32, even for bf16/fp16 logits: log-softmax
and log-sigmoid in half precision lose most of their mantissa for confident
predictions.

Conventions worth knowing when switching between losses:

* Softmax losses ('ce', 'focal', and their 'weighted_' variants) sum over
  classes of `-t_c * log p_c`, so for any target rows summing to 1 the loss is
  an ordinary cross-entropy.
* Sigmoid losses ('sigmoid_bce', 'sigmoid_focal') SUM the per-label binary
  losses over the C classes (as big_vision's `sigmoid_xent`), they do not
  average them. Their magnitude therefore grows with C; this is the
  convention ViT/BiT were trained with, and it keeps the gradient per
  positive label independent of the number of classes.
* Class weights multiply the per-example loss and are NOT renormalised by the
  sum of the weights in the batch; see `softmax_cross_entropy`.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional, Union

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

Array = jax.Array
ArrayLike = Union[jax.Array, np.ndarray, float]
LossFn = Callable[[ArrayLike, ArrayLike], Array]

# Names accepted by `get_loss_fn`, in the order they are listed in errors.
SOFTMAX_LOSSES = ("ce", "weighted_ce", "focal", "weighted_focal")
SIGMOID_LOSSES = ("sigmoid_bce", "sigmoid_focal")
LOSS_NAMES = SOFTMAX_LOSSES + SIGMOID_LOSSES


# Lower clamp for (1 - p) before raising it to `gamma`: keeps the gradient of
# x**gamma finite (it is infinite at x=0 for gamma < 1) and costs nothing in
# value, since the clamped term is multiplied by -log(p) ~ 0 anyway.
_TINY = float(np.finfo(np.float32).tiny)


def _prepare(logits: ArrayLike, targets: ArrayLike,
             class_weights: Optional[ArrayLike]):
  """Casts inputs to float32 and checks shapes (statically, at trace time)."""
  logits = jnp.asarray(logits, jnp.float32)
  targets = jnp.asarray(targets, jnp.float32)
  if logits.ndim < 1 or logits.shape != targets.shape:
    raise ValueError(
        f"logits and targets must have the same shape [..., C], got "
        f"logits {logits.shape} and targets {targets.shape}. Integer labels "
        "must be converted to one-hot targets first.")
  if class_weights is not None:
    class_weights = jnp.asarray(class_weights, jnp.float32)
    num_classes = logits.shape[-1]
    if class_weights.shape != (num_classes,):
      raise ValueError(
          f"class_weights must have shape [num_classes]=({num_classes},), "
          f"got {class_weights.shape}.")
  return logits, targets, class_weights


def _modulator(one_minus_p: Array, gamma: float) -> Array:
  """Focal modulating factor (1 - p)^gamma, finite in value and gradient."""
  if isinstance(gamma, (int, float)) and gamma == 0:
    # Exactly 1 (no clamp), so gamma=0 reduces bit-for-bit to cross-entropy.
    return jnp.ones_like(one_minus_p)
  return jnp.power(jnp.maximum(one_minus_p, _TINY), gamma)


def _example_weights(targets: Array, class_weights: Array) -> Array:
  """Per-example weight sum_c t_c w_c: w_y for one-hot, the mix for mixup."""
  return jnp.einsum("...c,c->...", targets, class_weights)


def softmax_cross_entropy(
    logits: ArrayLike,
    targets: ArrayLike,
    *,
    label_smoothing: float = 0.0,
    class_weights: Optional[ArrayLike] = None,
) -> Array:
  """Per-example softmax cross-entropy, -sum_c t_c log softmax(logits)_c.

  Label smoothing follows optax/PyTorch: t <- t * (1 - ls) + ls / C.

  Class weights: the per-example weight is sum_c targets_c * w_c, computed
  from the targets as given (before label smoothing), so it is w_y for a
  one-hot target and the mixup mix of the two class weights for mixed
  targets. It multiplies the per-example loss. The weighted losses are NOT
  renormalised by the sum of the weights: if the train step takes a plain
  mean over the batch, the result is sum_i w_i l_i / B, whereas torch's
  `CrossEntropyLoss(weight=w, reduction='mean')` returns
  sum_i w_i l_i / sum_i w_i. Ours keeps the loss scale (and so the effective
  learning rate) independent of the batch's class composition; with weights
  from `data.class_weights.compute_class_weights` (count-weighted mean 1), E[w_i] = 1 over the
  training distribution, so both agree in expectation.

  Args:
    logits: [..., C] unnormalised scores, any float dtype.
    targets: [..., C] float targets (one-hot, soft, mixed or multi-hot).
    label_smoothing: amount of uniform smoothing in [0, 1).
    class_weights: optional [C] per-class weights.

  Returns:
    [...] float32 per-example losses.
  """
  logits, targets, class_weights = _prepare(logits, targets, class_weights)
  smoothed = targets
  if label_smoothing:
    num_classes = logits.shape[-1]
    smoothed = targets * (1.0 - label_smoothing) + label_smoothing / num_classes
  loss = -jnp.sum(smoothed * jax.nn.log_softmax(logits, axis=-1), axis=-1)
  if class_weights is not None:
    loss = loss * _example_weights(targets, class_weights)
  return loss


def softmax_focal_loss(
    logits: ArrayLike,
    targets: ArrayLike,
    *,
    gamma: float = 2.0,
    alpha: Optional[ArrayLike] = None,
    class_weights: Optional[ArrayLike] = None,
) -> Array:
  """Per-example multi-class focal loss (Lin et al. 2017), soft targets.

  loss = sum_c -t_c * alpha * (1 - p_c)^gamma * log p_c, p = softmax(logits).

  With gamma=0 and alpha=None this is exactly `softmax_cross_entropy`. For
  soft targets every class with t_c > 0 is down-weighted by its own
  (1 - p_c)^gamma, which is the natural generalisation of the one-hot form.

  Args:
    logits: [..., C] unnormalised scores, any float dtype.
    targets: [..., C] float targets (one-hot, soft, mixed or multi-hot).
    gamma: focusing parameter >= 0.
    alpha: optional scalar (or [C]) balancing factor; None means 1. Unlike the
      sigmoid form there are no negatives to balance against, so a scalar
      alpha is just a loss scale.
    class_weights: optional [C] per-class weights, applied per example as in
      `softmax_cross_entropy` (sum_c t_c w_c, not renormalised).

  Returns:
    [...] float32 per-example losses.
  """
  logits, targets, class_weights = _prepare(logits, targets, class_weights)
  log_p = jax.nn.log_softmax(logits, axis=-1)
  # 1 - exp(log p) via expm1: accurate when p is close to 1.
  one_minus_p = -jnp.expm1(log_p)
  per_class = -targets * _modulator(one_minus_p, gamma) * log_p
  if alpha is not None:
    per_class = jnp.asarray(alpha, jnp.float32) * per_class
  loss = jnp.sum(per_class, axis=-1)
  if class_weights is not None:
    loss = loss * _example_weights(targets, class_weights)
  return loss


def _sigmoid_bce_elementwise(logits: Array, targets: Array) -> Array:
  # -[t log s(x) + (1-t) log s(-x)], with log-sigmoid so that |x| ~ 100 does
  # not produce log(0).
  return -(targets * jax.nn.log_sigmoid(logits)
           + (1.0 - targets) * jax.nn.log_sigmoid(-logits))


def sigmoid_binary_cross_entropy(
    logits: ArrayLike,
    targets: ArrayLike,
    *,
    class_weights: Optional[ArrayLike] = None,
) -> Array:
  """Per-example sigmoid (independent binary) cross-entropy, SUMMED over C.

  loss = sum_c w_c * -[t_c log s(x_c) + (1 - t_c) log s(-x_c)].

  The sum over labels (not the mean) matches big_vision's `sigmoid_xent`;
  divide by C to get the torch `BCEWithLogitsLoss(reduction='mean')` scale.

  Args:
    logits: [..., C] unnormalised scores, any float dtype.
    targets: [..., C] float targets in [0, 1] (multi-hot or soft).
    class_weights: optional [C] weights, one per label column (applied to both
      the positive and the negative term of that label).

  Returns:
    [...] float32 per-example losses.
  """
  logits, targets, class_weights = _prepare(logits, targets, class_weights)
  per_label = _sigmoid_bce_elementwise(logits, targets)
  if class_weights is not None:
    per_label = per_label * class_weights
  return jnp.sum(per_label, axis=-1)


def sigmoid_focal_loss(
    logits: ArrayLike,
    targets: ArrayLike,
    *,
    gamma: float = 2.0,
    alpha: Optional[float] = 0.25,
    class_weights: Optional[ArrayLike] = None,
) -> Array:
  """Per-example sigmoid focal loss (RetinaNet form), SUMMED over C.

  Per label: -alpha_t * (1 - p_t)^gamma * log(p_t), with p = s(x),
  p_t = t p + (1 - t)(1 - p) and alpha_t = t alpha + (1 - t)(1 - alpha).
  For soft targets -log(p_t) is replaced by the binary cross-entropy, as in
  torchvision/optax (identical for hard targets). Summed over labels for
  consistency with `sigmoid_binary_cross_entropy`.

  Args:
    logits: [..., C] unnormalised scores, any float dtype.
    targets: [..., C] float targets in [0, 1].
    gamma: focusing parameter >= 0; gamma=0, alpha=None gives the BCE.
    alpha: weight of positives (negatives get 1 - alpha); None disables the
      balancing (alpha_t = 1). Default 0.25 as in RetinaNet.
    class_weights: optional [C] weights, one per label column.

  Returns:
    [...] float32 per-example losses.
  """
  logits, targets, class_weights = _prepare(logits, targets, class_weights)
  ce = _sigmoid_bce_elementwise(logits, targets)
  # 1 - p_t = t s(-x) + (1 - t) s(x); sigmoid of +-x avoids 1 - s(x)
  # cancellation for confident positives.
  one_minus_p_t = (targets * jax.nn.sigmoid(-logits)
                   + (1.0 - targets) * jax.nn.sigmoid(logits))
  per_label = _modulator(one_minus_p_t, gamma) * ce
  if alpha is not None:
    per_label = (alpha * targets + (1.0 - alpha) * (1.0 - targets)) * per_label
  if class_weights is not None:
    per_label = per_label * class_weights
  return jnp.sum(per_label, axis=-1)


def is_multilabel_loss(name: str) -> bool:
  """True for sigmoid (independent per-label) losses, False for softmax ones.

  The train/eval loop uses this to decide e.g. whether to evaluate with
  argmax accuracy (softmax) or per-label metrics, and whether mixup targets
  may sum to more than 1.

  Raises:
    ValueError: for an unknown loss name.
  """
  if name not in LOSS_NAMES:
    raise ValueError(_unknown_name_message(name))
  return name in SIGMOID_LOSSES


def _unknown_name_message(name: str) -> str:
  return (f"Unknown loss name {name!r}; valid names are: "
          f"{', '.join(LOSS_NAMES)}.")


def get_loss_fn(
    loss_config: ml_collections.ConfigDict,
    class_weights: Optional[ArrayLike] = None,
) -> LossFn:
  """Returns `fn(logits, targets) -> [B] float32 per-example losses`.

  Args:
    loss_config: ConfigDict with `name` (one of LOSS_NAMES), and, depending on
      the name, `label_smoothing` ('ce', 'weighted_ce'), `focal_gamma` and
      `focal_alpha` (float or None; the focal and sigmoid_focal losses). Only
      the fields the chosen loss uses are read.
    class_weights: [C] per-class weights, e.g. from `data.class_weights.compute_class_weights`.
      Required by the 'weighted_*' losses. The sigmoid losses apply them per
      label column if given. 'ce' and 'focal' ignore them (with a warning),
      so the train loop may pass them unconditionally.

  Returns:
    A jit-compatible function of (logits, targets); class weights are closed
    over as a constant.

  Raises:
    ValueError: for an unknown name, a 'weighted_*' loss without
      class_weights, or malformed class weights.
  """
  name = loss_config.name
  if name not in LOSS_NAMES:
    raise ValueError(_unknown_name_message(name))

  if name.startswith("weighted_") and class_weights is None:
    raise ValueError(
        f"Loss {name!r} requires class_weights (e.g. from "
        "class_weights.compute_class_weights(train_class_counts)), got None.")
  if class_weights is not None:
    if name in ("ce", "focal"):
      logging.warning(
          "Loss %r ignores class_weights; use 'weighted_%s' to apply them.",
          name, name)
      class_weights = None
    else:
      class_weights = _check_class_weights(class_weights)

  if name in ("ce", "weighted_ce"):
    label_smoothing = float(loss_config.label_smoothing)
    def loss_fn(logits, targets):
      return softmax_cross_entropy(
          logits, targets, label_smoothing=label_smoothing,
          class_weights=class_weights)
  elif name in ("focal", "weighted_focal"):
    gamma, alpha = loss_config.focal_gamma, loss_config.focal_alpha
    def loss_fn(logits, targets):
      return softmax_focal_loss(
          logits, targets, gamma=gamma, alpha=alpha,
          class_weights=class_weights)
  elif name == "sigmoid_bce":
    def loss_fn(logits, targets):
      return sigmoid_binary_cross_entropy(
          logits, targets, class_weights=class_weights)
  else:  # sigmoid_focal
    gamma, alpha = loss_config.focal_gamma, loss_config.focal_alpha
    def loss_fn(logits, targets):
      return sigmoid_focal_loss(
          logits, targets, gamma=gamma, alpha=alpha,
          class_weights=class_weights)
  return loss_fn


def _check_class_weights(class_weights: ArrayLike) -> Array:
  """Validates concrete class weights once, at loss construction time."""
  w = np.asarray(class_weights, dtype=np.float64)
  if w.ndim != 1 or w.size == 0:
    raise ValueError(f"class_weights must be a non-empty [C] vector, got "
                     f"shape {w.shape}.")
  if not np.all(np.isfinite(w)) or np.any(w < 0):
    raise ValueError("class_weights must be finite and non-negative.")
  return jnp.asarray(w, jnp.float32)
