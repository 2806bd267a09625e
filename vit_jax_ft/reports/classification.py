"""Classification metrics from a split's probabilities (host-side numpy).

Single-label numbers come from `sklearn.metrics.classification_report`: the
per-class rows and the macro / weighted averages run over the classes that
occur in the labels or the predictions (sklearn's default label set, and the
set `vit_jax_ft.training.metrics` averages its macro-F1 over during training); an
undefined precision, recall or F1 counts as 0. Classes that occur in neither
are listed separately instead of diluting the averages.

Operating points are one-vs-rest: class c's probability as the score of
"is c", for single-label and multi-label data alike.
"""

from typing import Optional, Sequence

import numpy as np
from sklearn import metrics as skm

DEFAULT_TOP_K = (1, 3, 5)


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
  """Counts [true class, predicted class] over all `num_classes` classes."""
  return skm.confusion_matrix(labels, preds, labels=np.arange(num_classes))


def classification_report(labels: np.ndarray, preds: np.ndarray,
                          class_names: Sequence[str]) -> dict:
  """sklearn's `classification_report(output_dict=True, zero_division=0)`.

  Returns its dict (rows keyed by class name, 'accuracy', 'macro avg',
  'weighted avg') over the classes present in `labels` or `preds`, plus
  'absent_classes': the classes with neither examples nor predictions.
  """
  present = np.isin(np.arange(len(class_names)), np.r_[labels, preds])
  report = skm.classification_report(
      labels, preds, labels=np.flatnonzero(present), output_dict=True, zero_division=0,
      target_names=[class_names[c] for c in np.flatnonzero(present)])
  report["absent_classes"] = [class_names[c] for c in np.flatnonzero(~present)]
  return report


def top_k_accuracy(probs: np.ndarray, labels: np.ndarray,
                   ks: Sequence[int] = DEFAULT_TOP_K) -> dict:
  """{k: fraction whose true class is among the k most probable}, for k < num_classes.

  Rank = number of classes strictly more probable than the true one (a tie
  counts in the model's favour).
  """
  # Not sklearn's top_k_accuracy_score: it breaks ties by class index, maybe against the model.
  true_prob = probs[np.arange(len(labels)), labels]
  rank = np.sum(probs > true_prob[:, None], axis=1)
  return {str(k): float(np.mean(rank < k)) for k in ks if k < probs.shape[1]}


def precision_at_recall(scores: np.ndarray, positive: np.ndarray,
                        required_recall: float) -> Optional[dict]:
  """Best precision among thresholds whose recall is >= `required_recall`.

  A score >= threshold is predicted positive. Returns {'threshold',
  'precision', 'recall'} (recall as achieved), or None without positives.
  Among equally precise thresholds the highest is taken (fewest alarms).
  """
  if not positive.any():
    return None
  precision, recall, thresholds = skm.precision_recall_curve(positive, scores)
  # The curve's last point (recall 0, precision 1) has no threshold.
  precision, recall = precision[:-1], recall[:-1]
  ok = np.flatnonzero(recall >= required_recall - 1e-12)
  best = ok[precision[ok] == precision[ok].max()].max()
  return {"threshold": float(thresholds[best]), "precision": float(precision[best]),
          "recall": float(recall[best])}


def one_vs_rest(probs: np.ndarray, truth: np.ndarray, class_names: Sequence[str],
                required_recall: dict) -> dict:
  """Per class: average precision, ROC AUC, precision at the required recall.

  Args:
    probs: [N, C] probabilities.
    truth: [N, C] bool, whether each example has each class.
    class_names: C names.
    required_recall: {class index: recall} for the classes to report it for.

  Returns:
    {'per_class': {name: {...}}, 'macro_average_precision', 'macro_roc_auc'}:
    AP and AUC are None for a class without positives (or negatives, for AUC),
    and the macro means run over the classes where they are defined.
  """
  per_class = {}
  for c, name in enumerate(class_names):
    pos = truth[:, c]
    row = {"positives": int(pos.sum()),
           "average_precision": (float(skm.average_precision_score(pos, probs[:, c]))
                                 if pos.any() else None),
           "roc_auc": (float(skm.roc_auc_score(pos, probs[:, c]))
                       if pos.any() and not pos.all() else None)}
    if c in required_recall:
      row["required_recall"] = required_recall[c]
      row["at_required_recall"] = precision_at_recall(probs[:, c], pos, required_recall[c])
    per_class[name] = row
  return {"per_class": per_class,
          "macro_average_precision": _mean_defined(per_class, "average_precision"),
          "macro_roc_auc": _mean_defined(per_class, "roc_auc")}


def _mean_defined(rows: dict, key: str) -> Optional[float]:
  values = [r[key] for r in rows.values() if r[key] is not None]
  return float(np.mean(values)) if values else None


def log_loss(probs: np.ndarray, truth: np.ndarray, multilabel: bool) -> float:
  """Mean negative log-likelihood (sklearn's log_loss; per label for multi-label)."""
  # Not sklearn's log_loss: it clips at dtype eps, not 1e-15, and warns on float32 softmax rows.
  p = np.clip(probs, 1e-15, 1 - 1e-15)
  if multilabel:
    return float(-np.mean(truth * np.log(p) + (1 - truth) * np.log(1 - p)))
  return float(-np.mean(np.log(p[truth.astype(bool)])))


def most_confident_errors(probs: np.ndarray, labels: np.ndarray, ids: Sequence[str],
                          class_names: Sequence[str], limit: int = 10) -> list[dict]:
  """The wrong predictions made with the highest confidence (data problems show up here)."""
  preds = probs.argmax(axis=1)
  wrong = np.flatnonzero(preds != labels)
  order = wrong[np.argsort(-probs[wrong, preds[wrong]], kind="stable")][:limit]
  return [{"id": ids[i], "true": class_names[labels[i]], "predicted": class_names[preds[i]],
           "confidence": float(probs[i, preds[i]])} for i in order]
