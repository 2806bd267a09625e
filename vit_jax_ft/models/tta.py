"""Test-time augmentation (TTA): average the probabilities over flipped/rotated views.

The views are made from the preprocessed NHWC batch inside the jitted apply
(cheap array flips/rotations, no extra decoding):

  none      the batch as is (1 view)
  flip      the batch and its horizontal mirror (2 views)
  dihedral  the 8 symmetries of the square: rotations by 0/90/180/270 degrees
            of the batch and of its mirror (for orientation-free images such
            as dermoscopy or microscopy)

The probabilities (softmax, or sigmoid for multi-label runs) of the views are
averaged. Temperature scaling needs scores whose activation gives those
averaged probabilities; TTA has no single logit, so the scores are

  single-label  log(mean_v softmax(z_v)) (softmax of it is the mean again)
  multi-label   logit(mean_v sigmoid(z_v)) per label

computed stably with logsumexp. Without TTA they are the model's logits.
"""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

MODES = ("none", "flip", "dihedral")
NUM_VIEWS = {"none": 1, "flip": 2, "dihedral": 8}


def check_mode(mode: str) -> str:
  """`mode` if it is a TTA mode, else a one-line ValueError."""
  if mode not in MODES:
    raise ValueError(f"--tta must be one of {', '.join(MODES)}; got {mode!r}.")
  return mode


def suffix(mode: str) -> str:
  """What report folders and saved files of a TTA evaluation add to their names."""
  return "" if check_mode(mode) == "none" else f"_tta-{mode}"


def describe(mode: str) -> str:
  """One phrase for logs and reports."""
  if check_mode(mode) == "none":
    return "no test-time augmentation"
  what = "image and horizontal mirror" if mode == "flip" else "4 rotations x mirror"
  return (f"test-time augmentation '{mode}' ({NUM_VIEWS[mode]} views: {what}; "
          "probabilities averaged)")


def views(images: jnp.ndarray, mode: str) -> Sequence[jnp.ndarray]:
  """The views of an NHWC batch (the first one is the batch itself)."""
  if check_mode(mode) == "none":
    return [images]
  mirrored = jnp.flip(images, axis=2)  # Width axis: left-right mirror.
  if mode == "flip":
    return [images, mirrored]
  return [jnp.rot90(v, k, axes=(1, 2)) for v in (images, mirrored) for k in range(4)]


def make_apply(model: nn.Module, multilabel: bool, mode: str = "none"):
  """jitted (variables, images) -> (probabilities, scores), both [B, C].

  With mode 'none' the probabilities are computed exactly as
  workdir.make_apply computes them, and the scores are the logits.
  """
  check_mode(mode)
  activation = jax.nn.sigmoid if multilabel else jax.nn.softmax

  if mode == "none":
    def apply(variables, images):
      logits = model.apply(variables, images, train=False)
      return activation(logits), logits.astype(jnp.float32)
    return jax.jit(apply)

  log_views = float(np.log(NUM_VIEWS[mode]))

  def apply_tta(variables, images):
    stacked = jnp.stack(views(images, mode))
    # One view at a time: the memory of a single batch, one compiled model body.
    logits = jax.lax.map(lambda x: model.apply(variables, x, train=False), stacked)
    logits = logits.astype(jnp.float32)  # [V, B, C]
    probs = jnp.mean(activation(logits), axis=0)
    if multilabel:
      log_p = jax.nn.logsumexp(jax.nn.log_sigmoid(logits), axis=0) - log_views
      log_q = jax.nn.logsumexp(jax.nn.log_sigmoid(-logits), axis=0) - log_views
      return probs, log_p - log_q
    return probs, jax.nn.logsumexp(jax.nn.log_softmax(logits, axis=-1), axis=0) - log_views

  return jax.jit(apply_tta)
