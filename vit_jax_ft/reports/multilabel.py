"""Multi-label metrics: per-label thresholds, F1 scores, exact match, error co-occurrence.

Thresholds are tuned per label on the validation split (the one that
maximises that label's F1) and then applied unchanged to the test split, so
the test numbers stay an honest estimate. A label without positives in the
validation split keeps the default 0.5 (no F1 to maximise).
"""

import functools
from typing import Sequence

import numpy as np
from sklearn import metrics as skm

DEFAULT_THRESHOLD = 0.5


def _best_f1_threshold(scores: np.ndarray, positive: np.ndarray) -> tuple[float, float]:
  """(threshold, F1) maximising F1 of `scores >= threshold` on one label."""
  order = np.argsort(-scores, kind="stable")
  sorted_scores, sorted_pos = scores[order], positive[order]
  tp = np.cumsum(sorted_pos)
  predicted = np.arange(1, len(scores) + 1)
  # Only the last index of a run of equal scores is a reachable cut.
  last = np.r_[sorted_scores[1:] != sorted_scores[:-1], True]
  # F1 in counts, as sklearn's f1_score computes it: 2 tp / (predicted + actual positives).
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


def metrics_at(probs: np.ndarray, truth: np.ndarray, thresholds: np.ndarray,
               class_names: Sequence[str]) -> dict:
  """Per-label and averaged precision/recall/F1, exact match and Hamming loss.

  sklearn's numbers for multi-label indicator data: micro averages over all
  (example, label) decisions, macro the unweighted mean over all labels; an
  undefined precision, recall or F1 counts as 0.
  """
  pred = probs >= thresholds[None, :]
  truth = truth > 0.5
  exact_match, hamming = skm.accuracy_score(truth, pred), skm.hamming_loss(truth, pred)
  if truth.shape[1] == 1:  # sklearn would read one column as binary 0/1 labels.
    truth, pred = (np.pad(x, ((0, 0), (0, 1))) for x in (truth, pred))
  prf = functools.partial(skm.precision_recall_fscore_support, truth, pred,
                          labels=np.arange(len(class_names)), zero_division=0)
  precision, recall, f1, support = prf(average=None)
  out = {"per_label": {name: {"threshold": float(thresholds[c]), "precision": float(precision[c]),
                              "recall": float(recall[c]), "f1-score": float(f1[c]),
                              "support": int(support[c])}
                       for c, name in enumerate(class_names)}}
  for avg in ("micro", "macro"):
    p, r, f, _ = prf(average=avg)
    out[avg] = {"precision": float(p), "recall": float(r), "f1-score": float(f)}
  return out | {"exact_match": float(exact_match), "hamming_loss": float(hamming)}


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
