"""Temperature scaling (Guo et al. 2017): one T > 0 fitted on the validation split.

Calibrated probabilities are softmax(s / T) (sigmoid(s / T) per label for
multi-label runs), where s are the scores of tta.make_apply: the logits, or
with test-time augmentation the log of the averaged probabilities (their
logit for multi-label). T minimises the validation NLL; dividing by T keeps
the order of the scores, so the argmax (and each label's decisions at
correspondingly moved thresholds) stays the same.

With b = 1 / T the NLL is convex in b (a log-sum-exp of linear functions
minus a linear one; the same for the binary cross-entropy), so the optimum is
the zero of its derivative, found by bisection on log b.
"""

import json
import os
from typing import Optional

from absl import logging
import numpy as np
from scipy import special

# T is searched in [MIN_T, MAX_T]; an optimum outside is clipped with a warning.
MIN_T = 0.01
MAX_T = 100.0
_BISECTIONS = 100  # log(MAX_T / MIN_T) / 2**100: far below float64 resolution.


def scale(scores: np.ndarray, temperature: float, multilabel: bool) -> np.ndarray:
  """Calibrated probabilities: softmax or sigmoid of scores / T (float64)."""
  z = np.asarray(scores, np.float64) / temperature
  return special.expit(z) if multilabel else special.softmax(z, axis=1)


def nll(scores: np.ndarray, truth: np.ndarray, multilabel: bool,
        temperature: float = 1.0) -> float:
  """Mean NLL of the scaled probabilities (per label for multi-label), computed stably."""
  z = np.asarray(scores, np.float64) / temperature
  truth = np.asarray(truth, np.float64)
  if multilabel:
    # -[y log sigmoid(z) + (1 - y) log sigmoid(-z)] = y softplus(-z) + (1 - y) softplus(z).
    return float(np.mean(truth * np.logaddexp(0, -z) + (1 - truth) * np.logaddexp(0, z)))
  return float(np.mean(special.logsumexp(z, axis=1) - np.sum(truth * z, axis=1)))


def _slope(scores: np.ndarray, truth: np.ndarray, multilabel: bool, b: float) -> float:
  """d NLL(b * scores) / d b."""
  if multilabel:
    return float(np.mean((special.expit(b * scores) - truth) * scores))
  p = special.softmax(b * scores, axis=1)
  return float(np.mean(np.sum(p * scores, axis=1) - np.sum(truth * scores, axis=1)))


def fit(scores: np.ndarray, truth: np.ndarray, multilabel: bool) -> float:
  """The T in [MIN_T, MAX_T] minimising nll(scores, truth, multilabel, T).

  Args:
    scores: [N, C] scores (logits or the log of TTA-averaged probabilities).
    truth: [N, C] one-hot (single-label) or multi-hot targets.
    multilabel: sigmoid per label instead of softmax.
  """
  scores = np.asarray(scores, np.float64)
  truth = (np.asarray(truth) > 0.5).astype(np.float64)
  if not len(scores):
    raise ValueError("Temperature scaling needs a non-empty validation split.")
  if not np.all(np.isfinite(scores)):
    raise ValueError("Temperature scaling: the validation scores are not all finite.")
  lo, hi = np.log(1 / MAX_T), np.log(1 / MIN_T)  # In log b = -log T.
  if _slope(scores, truth, multilabel, np.exp(lo)) >= 0:
    logging.warning("Temperature scaling: the validation NLL still falls above T=%g "
                    "(predictions no better than chance?); using T=%g.", MAX_T, MAX_T)
    return MAX_T
  if _slope(scores, truth, multilabel, np.exp(hi)) <= 0:
    logging.warning("Temperature scaling: the validation NLL still falls below T=%g "
                    "(validation split perfectly separated?); using T=%g.", MIN_T, MIN_T)
    return MIN_T
  for _ in range(_BISECTIONS):
    mid = 0.5 * (lo + hi)
    if _slope(scores, truth, multilabel, np.exp(mid)) < 0:
      lo = mid
    else:
      hi = mid
  return float(np.exp(-0.5 * (lo + hi)))


def scale_thresholds(thresholds: np.ndarray, temperature: float) -> np.ndarray:
  """Multi-label thresholds moved so that sigmoid(s / T) >= t' iff sigmoid(s) >= t.

  t' = sigmoid(logit(t) / T); thresholds at or outside [0, 1] (always or
  never) are kept.
  """
  t = np.asarray(thresholds, np.float64)
  inside = (t > 0) & (t < 1)
  moved = special.expit(special.logit(np.where(inside, t, 0.5)) / temperature)
  return np.where(inside, moved, t)


def save(path: str, temperature: float, details: dict) -> None:
  """Writes {"temperature": T, **details} as JSON."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump({"temperature": float(temperature)} | details, f, indent=2)


def load(path: str) -> Optional[float]:
  """The temperature saved at `path`, or None when there is no such file."""
  if not os.path.exists(path):
    return None
  with open(path) as f:
    value = float(json.load(f)["temperature"])
  if not (np.isfinite(value) and value > 0):
    raise ValueError(f"{path}: temperature must be a positive number, got {value}.")
  return value


def parse_flag(text: str) -> Optional[float] | str:
  """--temperature: 'auto', 'none' (None) or a positive number."""
  if text in ("auto", "none"):
    return None if text == "none" else "auto"
  try:
    value = float(text)
  except ValueError:
    value = float("nan")
  if not (np.isfinite(value) and value > 0):
    raise ValueError(f"--temperature must be 'auto', 'none' or a positive number, got {text!r}.")
  return value
