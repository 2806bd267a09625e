"""Calibration: expected calibration error (ECE) and reliability-diagram bins.

Definition (Guo et al. 2017, "On Calibration of Modern Neural Networks"):
confidences in [0, 1] fall into `num_bins` equal-width bins
B_k = ((k-1)/M, k/M] for k = 1..M (B_1 also holds confidence 0). With n_k
examples in bin k, acc_k the fraction of them that are correct and conf_k
their mean confidence,

  ECE = sum_k (n_k / N) * |acc_k - conf_k|,
  MCE = max over non-empty bins of |acc_k - conf_k|.

Single-label: the confidence is the top softmax probability and "correct"
means the top class is the true class. Multi-label: every (example, label)
pair counts once, with its sigmoid probability as the confidence that the
label is present and "correct" meaning that it is.
"""

import numpy as np

NUM_BINS = 15


def bin_index(confidence: np.ndarray, num_bins: int = NUM_BINS) -> np.ndarray:
  """Bin of each confidence: k - 1 for B_k = ((k-1)/M, k/M]; 0 holds 0 too."""
  # ceil(c * M) - 1 puts a confidence exactly on an edge k/M into bin k - 1,
  # i.e. bins are closed on the right, as in Guo et al.
  index = np.ceil(np.asarray(confidence, np.float64) * num_bins).astype(np.int64) - 1
  return np.clip(index, 0, num_bins - 1)


def reliability_bins(confidence: np.ndarray, correct: np.ndarray,
                     num_bins: int = NUM_BINS) -> dict:
  """Per-bin counts, mean confidence and accuracy (NaN for empty bins)."""
  confidence = np.asarray(confidence, np.float64).ravel()
  correct = np.asarray(correct, np.float64).ravel()
  index = bin_index(confidence, num_bins)
  counts = np.bincount(index, minlength=num_bins).astype(np.float64)
  conf_sum = np.bincount(index, weights=confidence, minlength=num_bins)
  correct_sum = np.bincount(index, weights=correct, minlength=num_bins)
  with np.errstate(invalid="ignore", divide="ignore"):
    mean_conf = np.where(counts > 0, conf_sum / counts, np.nan)
    accuracy = np.where(counts > 0, correct_sum / counts, np.nan)
  return {"edges": np.linspace(0.0, 1.0, num_bins + 1), "counts": counts,
          "confidence": mean_conf, "accuracy": accuracy}


def calibration_errors(confidence: np.ndarray, correct: np.ndarray,
                       num_bins: int = NUM_BINS) -> dict:
  """{'ece', 'mce', 'num_bins', 'bins': [...]} with the bins as JSON-ready rows."""
  bins = reliability_bins(confidence, correct, num_bins)
  counts = bins["counts"]
  total = counts.sum()
  filled = counts > 0
  gaps = np.abs(bins["accuracy"][filled] - bins["confidence"][filled])
  ece = float(np.sum(counts[filled] / max(total, 1) * gaps))
  mce = float(gaps.max()) if filled.any() else 0.0
  rows = [{"low": float(bins["edges"][k]), "high": float(bins["edges"][k + 1]),
           "count": int(counts[k]),
           "confidence": None if not filled[k] else float(bins["confidence"][k]),
           "accuracy": None if not filled[k] else float(bins["accuracy"][k])}
          for k in range(num_bins)]
  return {"ece": ece, "mce": mce, "num_bins": num_bins, "bins": rows}


def single_label(probs: np.ndarray, labels: np.ndarray, num_bins: int = NUM_BINS) -> dict:
  """Top-label calibration of softmax probabilities [N, C] against labels [N]."""
  return calibration_errors(probs.max(axis=1), probs.argmax(axis=1) == labels, num_bins)


def multi_label(probs: np.ndarray, truth: np.ndarray, num_bins: int = NUM_BINS) -> dict:
  """Calibration of every sigmoid probability [N, C] against the multi-hot truth."""
  return calibration_errors(probs.ravel(), truth.ravel() > 0.5, num_bins)
