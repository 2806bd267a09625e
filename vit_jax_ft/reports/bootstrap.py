"""Bootstrap confidence intervals of a split's metrics (host-side numpy, no sklearn).

A resample draws, within each stratum, as many examples as the stratum holds,
with replacement; the strata are the classes for single-label data (so every
resample keeps each class's support, and a class's recall, F1 and one-vs-rest
AUC are defined in every resample where they are on the whole split) and each
example's rarest label (among the split's label frequencies; examples without
labels form their own stratum) for multi-label data. The resamples are a pure
function of the strata, their number and the seed (numpy's default Generator:
one `random(N)` draw per resample), so two runs scored on the same examples
see the same resamples: `reports/compare.py` pairs them that way.

An interval is the percentile interval of the metric over the resamples (2.5th
and 97.5th percentiles, numpy's linear interpolation). A resample where the
metric is undefined (a label without positives, an AUC without negatives) is
left out for that metric, and the number used is reported next to the
interval; with none left the interval is None, never NaN.

Metrics are computed from per-resample counts (confusion matrices via
np.bincount, cumulative sums over the examples sorted by score), in blocks of
resamples so memory stays bounded: 1000 resamples of a few thousand examples
take about a second per metric family.
"""

from typing import Any, Callable, Iterator, Optional

import numpy as np

RESAMPLES = 1000
SEED = 0
CONFIDENCE = 0.95
# Resample rows per block: about this many (resample, example) entries at a time.
_BLOCK_ENTRIES = 1 << 21


def single_label_strata(labels: np.ndarray) -> np.ndarray:
  """The stratum of each example: its class."""
  return np.asarray(labels, np.int64)


def multi_label_strata(truth: np.ndarray) -> np.ndarray:
  """The stratum of each example: its rarest label on this split (C for no label)."""
  truth = np.asarray(truth) > 0.5
  freq = truth.sum(axis=0)
  # Labels an example lacks rank after every label it has.
  rank = np.where(truth, freq[None, :], np.iinfo(np.int64).max)
  return np.where(truth.any(axis=1), rank.argmin(axis=1), truth.shape[1]).astype(np.int64)


class Resampler:
  """Stratified bootstrap resamples of N examples, in blocks of [k, N] indices."""

  def __init__(self, strata: np.ndarray, resamples: int = RESAMPLES, seed: int = SEED):
    strata = np.asarray(strata)
    if strata.ndim != 1 or not len(strata):
      raise ValueError(f"Bootstrap needs a non-empty 1-D array of strata; got shape "
                       f"{strata.shape}.")
    if resamples < 1:
      raise ValueError(f"Bootstrap resamples must be >= 1; got {resamples}.")
    self.n, self.resamples, self.seed = len(strata), int(resamples), int(seed)
    # Examples sorted by stratum (stably); position j of a resample draws from
    # the stratum that position j holds in this order.
    self._order = np.argsort(strata, kind="stable")
    _, start, size = np.unique(strata[self._order], return_index=True, return_counts=True)
    self._start = np.repeat(start, size)
    self._size = np.repeat(size, size)
    self.block = max(1, min(self.resamples, _BLOCK_ENTRIES // self.n))

  def blocks(self) -> Iterator[np.ndarray]:
    """[k, N] example indices, k <= block, for all resamples in order."""
    rng = np.random.default_rng(self.seed)
    for first in range(0, self.resamples, self.block):
      k = min(self.block, self.resamples - first)
      u = np.stack([rng.random(self.n) for _ in range(k)])
      pos = self._start + np.minimum((u * self._size).astype(np.int64), self._size - 1)
      yield self._order[pos]

  def indices(self) -> np.ndarray:
    """All [R, N] resample indices (for tests and small splits)."""
    return np.concatenate(list(self.blocks()))

  def values(self, metric: Callable[[np.ndarray], Any]) -> Any:
    """metric(indices [k, N]) -> [k, ...] (or a dict of them) per block, joined to [R, ...]."""
    parts = [metric(idx) for idx in self.blocks()]
    if isinstance(parts[0], dict):
      return {key: np.concatenate([np.asarray(p[key], np.float64) for p in parts])
              for key in parts[0]}
    return np.concatenate([np.asarray(p, np.float64) for p in parts])


class Whole:
  """The split itself as the only 'resample': point estimates through the same code."""

  def __init__(self, n: int):
    self.n, self.resamples = n, 1

  def blocks(self) -> Iterator[np.ndarray]:
    yield np.arange(self.n)[None]

  values = Resampler.values


def counts(idx: np.ndarray, n: int) -> np.ndarray:
  """[k, N] indices -> [k, n] how often each example was drawn."""
  k = idx.shape[0]
  flat = (idx + n * np.arange(k)[:, None]).ravel()
  return np.bincount(flat, minlength=k * n).reshape(k, n)


def interval(values: np.ndarray, confidence: float = CONFIDENCE) -> dict:
  """{'ci95': [lo, hi] or None, 'resamples': how many were defined} of [R] values.

  NaN marks a resample where the metric is undefined; those are left out.
  """
  values = np.asarray(values, np.float64)
  ok = values[np.isfinite(values)]
  if not len(ok):
    return {"ci95": None, "resamples": 0}
  tail = 100 * (1 - confidence) / 2
  lo, hi = np.percentile(ok, [tail, 100 - tail])
  return {"ci95": [float(lo), float(hi)], "resamples": int(len(ok))}


def _divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
  """num / den, 0 where den is 0 (sklearn's zero_division=0)."""
  return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den > 0)


# Single-label: everything from per-resample confusion matrices.

def confusion_matrices(labels: np.ndarray, preds: np.ndarray, num_classes: int,
                       idx: np.ndarray) -> np.ndarray:
  """[k, C, C] counts [true, predicted] of each resample."""
  cell = np.asarray(labels, np.int64) * num_classes + np.asarray(preds, np.int64)
  k, cells = idx.shape[0], num_classes * num_classes
  flat = (cell[idx] + cells * np.arange(k)[:, None]).ravel()
  return np.bincount(flat, minlength=k * cells).reshape(k, num_classes, num_classes)


def from_confusion(cm: np.ndarray) -> dict[str, np.ndarray]:
  """Per-resample metrics of [k, C, C] confusion matrices.

  As `classification.classification_report`: per class precision, recall, F1
  [k, C] (0 where undefined); accuracy, and macro / weighted averages [k] over
  the classes present in the resample's labels or predictions.
  """
  tp = np.diagonal(cm, axis1=1, axis2=2).astype(np.float64)
  support, predicted = cm.sum(axis=2).astype(np.float64), cm.sum(axis=1).astype(np.float64)
  precision, recall = _divide(tp, predicted), _divide(tp, support)
  f1 = _divide(2 * tp, support + predicted)
  present = (support + predicted) > 0
  n_present = present.sum(axis=1)
  out = {"accuracy": tp.sum(axis=1) / support.sum(axis=1),
         "precision": precision, "recall": recall, "f1-score": f1}
  for key, per_class in (("precision", precision), ("recall", recall), ("f1-score", f1)):
    out[f"macro_{key}"] = np.sum(per_class * present, axis=1) / n_present
    out[f"weighted_{key}"] = np.sum(per_class * support, axis=1) / support.sum(axis=1)
  return out


# Multi-label: per-label counts of decisions.

def multi_label_counts(truth: np.ndarray, pred: np.ndarray, w: np.ndarray) -> dict:
  """Per-resample tp, fp, fn [k, C] and exact-match count [k] of bool decisions;
  w: [k, N] counts(idx, N)."""
  w = np.asarray(w, np.float64)
  truth, pred = np.asarray(truth) > 0.5, np.asarray(pred, bool)
  return {"tp": w @ (truth & pred), "fp": w @ (~truth & pred), "fn": w @ (truth & ~pred),
          "exact": w @ np.all(truth == pred, axis=1), "n": w.sum(axis=1)}


def from_multi_label_counts(c: dict) -> dict[str, np.ndarray]:
  """As `multilabel.metrics_at`: per label P/R/F1 [k, C], NaN in resamples without
  positives of that label (undefined there); micro and macro averages (undefined
  per-label values counting as 0, as sklearn) and exact match [k]."""
  tp, fp, fn = c["tp"], c["fp"], c["fn"]
  precision, recall = _divide(tp, tp + fp), _divide(tp, tp + fn)
  f1 = _divide(2 * tp, 2 * tp + fp + fn)
  undefined = (tp + fn) == 0
  out = {}
  for key, per in (("precision", precision), ("recall", recall), ("f1-score", f1)):
    out[f"macro_{key}"] = per.mean(axis=1)
    out[key] = np.where(undefined, np.nan, per)
  stp, sfp, sfn = tp.sum(axis=1), fp.sum(axis=1), fn.sum(axis=1)
  out["micro_precision"], out["micro_recall"] = _divide(stp, stp + sfp), _divide(stp, stp + sfn)
  out["micro_f1-score"] = _divide(2 * stp, 2 * stp + sfp + sfn)
  out["exact_match"] = c["exact"] / c["n"]
  return out


# Scores: one vs rest, from the examples sorted by score and grouped by ties.

def _grouped(scores: np.ndarray, positive: np.ndarray, idx: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray]:
  """Per-resample counts of positives and negatives [k, G] at each distinct score,
  in increasing order of score (one gather and one bincount over [k, N])."""
  _, group = np.unique(scores, return_inverse=True)
  groups = int(group.max()) + 1
  cell = group.ravel() * 2 + np.asarray(positive, bool).ravel()
  k = idx.shape[0]
  flat = (cell[idx] + 2 * groups * np.arange(k)[:, None]).ravel()
  c = np.bincount(flat, minlength=k * 2 * groups).reshape(k, groups, 2).astype(np.float64)
  return c[:, :, 1], c[:, :, 0]


def roc_auc(scores: np.ndarray, positive: np.ndarray, idx: np.ndarray) -> np.ndarray:
  """[k] ROC AUC of each resample idx [k, N] (ties count half), NaN where a
  resample lacks positives or negatives."""
  gp, gn = _grouped(np.asarray(scores), positive, idx)
  below = np.cumsum(gn, axis=1) - gn
  num = np.sum(gp * (below + 0.5 * gn), axis=1)
  den = gp.sum(axis=1) * gn.sum(axis=1)
  return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def precision_at_recall(scores: np.ndarray, positive: np.ndarray, required_recall: float,
                        idx: np.ndarray) -> np.ndarray:
  """[k] best precision of `score >= t` among thresholds t keeping recall >= required
  (as `classification.precision_at_recall`) in each resample idx [k, N], NaN where a
  resample lacks positives."""
  gp, gn = _grouped(np.asarray(scores), positive, idx)
  gp, gn = gp[:, ::-1], gn[:, ::-1]  # Highest score first: thresholds from the top.
  tp, predicted = np.cumsum(gp, axis=1), np.cumsum(gp + gn, axis=1)
  total = tp[:, -1:]
  recall = _divide(tp, total)
  precision = np.where(predicted > 0, _divide(tp, predicted), -np.inf)
  ok = (recall >= required_recall - 1e-12) & (predicted > 0)
  best = np.max(np.where(ok, precision, -np.inf), axis=1)
  return np.where(total[:, 0] > 0, best, np.nan)


def describe(resampler: Optional[Resampler], multilabel: bool) -> dict:
  """What the report's intervals are (report.json's 'bootstrap')."""
  if resampler is None:
    return {"resamples": 0, "note": "confidence intervals off (bootstrap_resamples=0)"}
  return {"resamples": resampler.resamples, "seed": resampler.seed, "confidence": CONFIDENCE,
          "method": "percentile bootstrap",
          "stratified_by": ("each example's rarest label" if multilabel else "class"),
          "note": ("resamples where a metric is undefined (e.g. a label without positives) "
                   "are left out for that metric; '<key>_ci95_resamples' counts those used")}


# Everything a report or a comparison needs, per resample.

def _nanmean(x: np.ndarray) -> np.ndarray:
  defined = np.isfinite(x)
  n = defined.sum(axis=1)
  total = np.where(defined, x, 0).sum(axis=1)
  return np.where(n > 0, total / np.maximum(n, 1), np.nan)


def _scores(probs: np.ndarray, truth: np.ndarray, idx: np.ndarray,
            recall_targets: dict[int, float]) -> dict[str, np.ndarray]:
  """One-vs-rest ROC AUC [k, C], its macro mean [k] and precision at recall [k, C]."""
  num_classes = probs.shape[1]
  auc = np.stack([roc_auc(probs[:, c], truth[:, c], idx) for c in range(num_classes)], axis=1)
  par = np.full(auc.shape, np.nan)
  for c, required in recall_targets.items():
    par[:, c] = precision_at_recall(probs[:, c], truth[:, c], required, idx)
  return {"roc_auc": auc, "macro_roc_auc": _nanmean(auc), "precision_at_recall": par}


def single_label_values(labels: np.ndarray, probs: np.ndarray, resampler: Resampler,
                        recall_targets: Optional[dict[int, float]] = None
                        ) -> dict[str, np.ndarray]:
  """Per resample: from_confusion()'s metrics of the argmax, and _scores()' (probabilities)."""
  labels, probs = np.asarray(labels, np.int64), np.asarray(probs)
  preds, num_classes = probs.argmax(axis=1), probs.shape[1]
  truth = np.eye(num_classes, dtype=bool)[labels]

  def metric(idx):
    out = from_confusion(confusion_matrices(labels, preds, num_classes, idx))
    return out | _scores(probs, truth, idx, recall_targets or {})

  return resampler.values(metric)


def multi_label_values(truth: np.ndarray, probs: np.ndarray, pred: np.ndarray,
                       resampler: Resampler,
                       recall_targets: Optional[dict[int, float]] = None
                       ) -> dict[str, np.ndarray]:
  """Per resample: from_multi_label_counts()' metrics of the decisions `pred`, and
  _scores()' (probabilities)."""
  truth, probs = np.asarray(truth) > 0.5, np.asarray(probs)

  def metric(idx):
    w = counts(idx, len(truth))
    out = from_multi_label_counts(multi_label_counts(truth, pred, w))
    return out | _scores(probs, truth, idx, recall_targets or {})

  return resampler.values(metric)


# The headline metrics (report.headline's names) in those values.
SINGLE_LABEL_HEADLINE = {"accuracy": "accuracy", "macro_f1": "macro_f1-score",
                         "weighted_f1": "weighted_f1-score", "macro_roc_auc": "macro_roc_auc"}
MULTI_LABEL_HEADLINE = {"micro_f1": "micro_f1-score", "macro_f1": "macro_f1-score",
                        "exact_match": "exact_match", "macro_roc_auc": "macro_roc_auc"}


def headline(values: dict[str, np.ndarray], multilabel: bool) -> dict[str, np.ndarray]:
  """{headline metric: [R] values}."""
  keys = MULTI_LABEL_HEADLINE if multilabel else SINGLE_LABEL_HEADLINE
  return {name: values[key] for name, key in keys.items()}
