"""Per-class loss weights from class counts (dataset_info.json records them; weighted losses use them)."""

from typing import Sequence, Union

import numpy as np

CLASS_WEIGHT_MODES = ("inverse_frequency", "inverse_sqrt_frequency")


def compute_class_weights(
    counts: Union[Sequence[float], np.ndarray],
    mode: str = "inverse_frequency",
) -> np.ndarray:
  """Per-class loss weights from training-set class counts.

  Weights are normalised so that the count-weighted mean weight is 1,
  sum_c n_c w_c / sum_c n_c = 1, i.e. the average loss scale over the
  training distribution is unchanged by weighting.

  Modes:
    'inverse_frequency': w_c = N / (C n_c). This already has count-weighted
      mean 1 and equals sklearn's compute_class_weight('balanced').
    'inverse_sqrt_frequency': w_c proportional to 1 / sqrt(n_c) (milder
      reweighting for long-tailed data), normalised as above.

  Args:
    counts: [C] number of training examples per class (all > 0).
    mode: one of CLASS_WEIGHT_MODES.

  Returns:
    [C] float64 numpy array.

  Raises:
    ValueError: on an unknown mode, malformed counts, or a class with zero
      (or negative) count, naming the offending class indices.
  """
  counts = np.asarray(counts, dtype=np.float64)
  if counts.ndim != 1 or counts.size == 0:
    raise ValueError(f"counts must be a non-empty [C] vector, got shape "
                     f"{counts.shape}.")
  if not np.all(np.isfinite(counts)):
    raise ValueError("counts must be finite.")
  bad = np.flatnonzero(counts <= 0)
  if bad.size:
    raise ValueError(
        f"Class(es) {bad.tolist()} have zero or negative count "
        f"{counts[bad].tolist()}; class weights are undefined for classes "
        "absent from the training set.")
  total, num_classes = counts.sum(), counts.size
  if mode == "inverse_frequency":
    # Same expression (and float ops) as sklearn's 'balanced'.
    return total / (num_classes * counts)
  if mode == "inverse_sqrt_frequency":
    w = 1.0 / np.sqrt(counts)
    return w * (total / np.sum(counts * w))
  raise ValueError(f"Unknown class weight mode {mode!r}; valid modes are: "
                   f"{', '.join(CLASS_WEIGHT_MODES)}.")
