"""Multi-label metrics: per-label thresholds, F1 scores, exact match, error co-occurrence.

Thresholds are tuned per label on the validation split (the one that
maximises that label's F1) and then applied unchanged to the test split, so
the test numbers stay an honest estimate. A label without positives in the
validation split keeps the default 0.5 (no F1 to maximise).
"""

from typing import Sequence

import numpy as np

DEFAULT_THRESHOLD = 0.5


def _best_f1_threshold(scores: np.ndarray, positive: np.ndarray) -> tuple[float, float]:
  """(threshold, F1) maximising F1 of `scores >= threshold` on one label."""
  order = np.argsort(-scores, kind="stable")
  sorted_scores, sorted_pos = scores[order], positive[order]
  tp = np.cumsum(sorted_pos)
  predicted = np.arange(1, len(scores) + 1)
  # Only the last index of a run of equal scores is a reachable cut.
  last = np.r_[sorted_scores[1:] != sorted_scores[:-1], True]
  f1 = np.where(last, 2 * tp / (predicted + positive.sum()), -1.0)
  best = int(np.argmax(f1))  # First maximum: the highest threshold among ties.
  threshold = sorted_scores[best]
  if best + 1 < len(scores):
    # Halfway to the next lower score: the same cut on these examples, with
    # a margin on both sides for new ones.
    threshold = 0.5 * (threshold + sorted_scores[best + 1])
  return float(threshold), float(f1[best])


def tune_thresholds(probs: np.ndarray, truth: np.ndarray) -> np.ndarray:
  """Per-label thresholds [C] maximising each label's F1 on (probs, truth)."""
  thresholds = np.full(probs.shape[1], DEFAULT_THRESHOLD)
  for c in range(probs.shape[1]):
    if truth[:, c].any():
      thresholds[c] = _best_f1_threshold(probs[:, c], truth[:, c].astype(bool))[0]
  return thresholds


def _prf(tp, fp, fn) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  tp, fp, fn = (np.asarray(x, np.float64) for x in (tp, fp, fn))
  safe = lambda n, d: np.where(d > 0, n / np.maximum(d, 1e-300), 0.0)
  return safe(tp, tp + fp), safe(tp, tp + fn), safe(2 * tp, 2 * tp + fp + fn)


def metrics_at(probs: np.ndarray, truth: np.ndarray, thresholds: np.ndarray,
               class_names: Sequence[str]) -> dict:
  """Per-label and averaged precision/recall/F1, exact match and Hamming loss.

  Averages follow sklearn for multi-label indicator data: micro over all
  (example, label) decisions, macro as the unweighted mean over all labels.
  """
  pred = probs >= thresholds[None, :]
  truth = truth > 0.5
  tp = np.sum(pred & truth, axis=0)
  fp = np.sum(pred & ~truth, axis=0)
  fn = np.sum(~pred & truth, axis=0)
  precision, recall, f1 = _prf(tp, fp, fn)
  micro_p, micro_r, micro_f1 = _prf(tp.sum(), fp.sum(), fn.sum())
  per_label = {name: {"threshold": float(thresholds[c]), "precision": float(precision[c]),
                      "recall": float(recall[c]), "f1-score": float(f1[c]),
                      "support": int(truth[:, c].sum())}
               for c, name in enumerate(class_names)}
  return {
      "per_label": per_label,
      "micro": {"precision": float(micro_p), "recall": float(micro_r), "f1-score": float(micro_f1)},
      "macro": {"precision": float(precision.mean()), "recall": float(recall.mean()),
                "f1-score": float(f1.mean())},
      "exact_match": float(np.mean(np.all(pred == truth, axis=1))),
      "hamming_loss": float(np.mean(pred != truth)),
  }


def error_analysis(probs: np.ndarray, truth: np.ndarray, thresholds: np.ndarray,
                   class_names: Sequence[str], limit: int = 10) -> dict:
  """Which labels go wrong together.

  Returns:
    'cooccurrence': [C, C] examples wrong on both label i and label j (the
      diagonal: examples wrong on label i);
    'missed_for': [C, C] examples where label i was missed while label j was
      wrongly predicted (multi-label's analogue of a confusion);
    'top_pairs' / 'top_swaps': the largest off-diagonal entries, named.
  """
  pred = probs >= thresholds[None, :]
  truth = truth > 0.5
  wrong = (pred != truth).astype(np.int64)
  cooc = wrong.T @ wrong
  swaps = (~pred & truth).astype(np.int64).T @ (pred & ~truth).astype(np.int64)
  upper = [(int(cooc[i, j]), i, j) for i in range(len(class_names))
           for j in range(i + 1, len(class_names)) if cooc[i, j]]
  off = [(int(swaps[i, j]), i, j) for i in range(len(class_names))
         for j in range(len(class_names)) if i != j and swaps[i, j]]
  return {
      "cooccurrence": cooc.tolist(),
      "missed_for": swaps.tolist(),
      "top_pairs": [{"labels": [class_names[i], class_names[j]], "examples": n}
                    for n, i, j in sorted(upper, key=lambda t: -t[0])[:limit]],
      "top_swaps": [{"missed": class_names[i], "predicted_instead": class_names[j],
                     "examples": n} for n, i, j in sorted(off, key=lambda t: -t[0])[:limit]],
  }
