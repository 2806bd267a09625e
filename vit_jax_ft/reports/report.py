"""Assembling one split's report: the numbers (JSON-ready) and the PNGs."""

import dataclasses
import os
from typing import Optional, Sequence

import numpy as np

from vit_jax_ft import workdir as workdir_lib
from vit_jax_ft.reports import bootstrap
from vit_jax_ft.reports import calibration
from vit_jax_ft.reports import classification
from vit_jax_ft.reports import curves
from vit_jax_ft.reports import multilabel
from vit_jax_ft.reports import plots

# TensorBoard tags of the reports' scalars: report/<split>_<checkpoint>/<metric>.
REPORT_TAG_PREFIX = "report/"


@dataclasses.dataclass(frozen=True)
class Options:
  """What to compute beyond the fixed metrics.

  Attributes:
    top_k: k values for top-k accuracy (those >= the number of classes are skipped).
    required_recall: recall at which to report the best precision and its threshold.
    recall_classes: the classes to report it for, by name; empty: every class.
      Per-class recalls may be given as {name: recall} instead.
    num_bins: calibration bins.
    bootstrap_resamples: resamples for the 95% confidence intervals
      (reports/bootstrap.py); 0: no intervals; None: bootstrap.RESAMPLES.
    bootstrap_seed: seed of the resamples; None: bootstrap.SEED.
  """

  top_k: Sequence[int] = classification.DEFAULT_TOP_K
  required_recall: float = 0.99
  recall_classes: Sequence[str] | dict = ()
  num_bins: int = calibration.NUM_BINS
  bootstrap_resamples: Optional[int] = None
  bootstrap_seed: Optional[int] = None

  def resampler(self, strata: np.ndarray) -> Optional[bootstrap.Resampler]:
    """The bootstrap resamples of a split with these strata; None when off (or no examples)."""
    n = bootstrap.RESAMPLES if self.bootstrap_resamples is None else self.bootstrap_resamples
    if not n or not len(strata):
      return None
    seed = bootstrap.SEED if self.bootstrap_seed is None else self.bootstrap_seed
    return bootstrap.Resampler(strata, n, seed)

  def recall_targets(self, class_names: Sequence[str]) -> dict[int, float]:
    """{class index: required recall}; unknown names fail with the valid ones."""
    if isinstance(self.recall_classes, dict):
      wanted = dict(self.recall_classes)
    else:
      wanted = {n: self.required_recall for n in (self.recall_classes or class_names)}
    unknown = sorted(set(wanted) - set(class_names))
    if unknown:
      raise ValueError(f"Unknown class names {unknown} for the required recall; "
                       f"classes: {list(class_names)}.")
    return {class_names.index(n): float(r) for n, r in wanted.items()}


def single_label(preds: workdir_lib.Predictions, class_names: Sequence[str],
                 options: Options) -> dict:
  """Per-class report, top-k, confusion matrix, operating points, calibration."""
  labels, probs = preds.labels, preds.probs
  predicted = probs.argmax(axis=1)
  cm = classification.confusion_matrix(labels, predicted, len(class_names))
  truth = preds.targets > 0.5
  report = {
      "num_examples": int(len(labels)),
      "log_loss": classification.log_loss(probs, truth, multilabel=False),
      "classification_report": classification.classification_report(labels, predicted,
                                                                     class_names),
      "top_k_accuracy": classification.top_k_accuracy(probs, labels, options.top_k),
      "confusion_matrix": cm.tolist(),
      "operating_points": classification.one_vs_rest(
          probs, truth, class_names, options.recall_targets(class_names)),
      "calibration": calibration.single_label(probs, labels, options.num_bins),
      "most_confident_errors": classification.most_confident_errors(
          probs, labels, preds.ids, class_names),
  }
  resampler = options.resampler(bootstrap.single_label_strata(labels))
  report["bootstrap"] = bootstrap.describe(resampler, multilabel=False)
  if resampler:
    values = bootstrap.single_label_values(labels, probs, resampler,
                                           options.recall_targets(class_names))
    cr = report["classification_report"]
    for c, name in enumerate(class_names):
      if name in cr:
        for key in ("precision", "recall", "f1-score"):
          _attach(cr[name], key, values[key][:, c])
    for avg in ("macro", "weighted"):
      for key in ("precision", "recall", "f1-score"):
        _attach(cr[f"{avg} avg"], key, values[f"{avg}_{key}"])
    _attach(cr, "accuracy", values["accuracy"])
    _attach_scores(report["operating_points"], class_names, values)
    report["intervals"] = _intervals(values, multilabel_data=False)
  return report


def _attach(row: dict, key: str, values: np.ndarray) -> None:
  """Adds '<key>_ci95' ([lo, hi] or None) and '<key>_ci95_resamples' next to row[key]."""
  if row.get(key) is None:  # Undefined on the whole split: no interval either.
    return
  ci = bootstrap.interval(values)
  row[f"{key}_ci95"], row[f"{key}_ci95_resamples"] = ci["ci95"], ci["resamples"]


def _attach_scores(ops: dict, class_names: Sequence[str], values: dict) -> None:
  """Intervals of the one-vs-rest ROC AUCs and the precisions at the required recall."""
  for c, name in enumerate(class_names):
    row = ops["per_class"][name]
    _attach(row, "roc_auc", values["roc_auc"][:, c])
    if row.get("at_required_recall"):
      _attach(row["at_required_recall"], "precision", values["precision_at_recall"][:, c])
  _attach(ops, "macro_roc_auc", values["macro_roc_auc"])


def _intervals(values: dict, multilabel_data: bool) -> dict:
  """{headline metric: {'ci95', 'resamples'}} (report.json's 'intervals')."""
  return {name: bootstrap.interval(v)
          for name, v in bootstrap.headline(values, multilabel_data).items()}


def multi_label(preds: workdir_lib.Predictions, class_names: Sequence[str], options: Options,
                thresholds: np.ndarray, thresholds_source: str) -> dict:
  """Metrics at 0.5 and at the tuned thresholds, error analysis, operating points."""
  probs, truth = preds.probs, preds.targets > 0.5
  half = np.full(len(class_names), multilabel.DEFAULT_THRESHOLD)
  report = {
      "num_examples": int(len(probs)),
      "log_loss": classification.log_loss(probs, truth, multilabel=True),
      "thresholds": {"source": thresholds_source,
                     "values": dict(zip(class_names, map(float, thresholds)))},
      "at_tuned_thresholds": multilabel.metrics_at(probs, truth, thresholds, class_names),
      "at_0.5": multilabel.metrics_at(probs, truth, half, class_names),
      "errors": multilabel.error_analysis(probs, truth, thresholds, class_names),
      "operating_points": classification.one_vs_rest(
          probs, truth, class_names, options.recall_targets(class_names)),
      "calibration": calibration.multi_label(probs, truth, options.num_bins),
  }
  resampler = options.resampler(bootstrap.multi_label_strata(truth))
  report["bootstrap"] = bootstrap.describe(resampler, multilabel=True)
  if resampler:
    values = bootstrap.multi_label_values(truth, probs, probs >= thresholds[None, :], resampler,
                                          options.recall_targets(class_names))
    tuned = report["at_tuned_thresholds"]
    for c, name in enumerate(class_names):
      for key in ("precision", "recall", "f1-score"):
        _attach(tuned["per_label"][name], key, values[key][:, c])
    for avg in ("micro", "macro"):
      for key in ("precision", "recall", "f1-score"):
        _attach(tuned[avg], key, values[f"{avg}_{key}"])
    _attach(tuned, "exact_match", values["exact_match"])
    _attach_scores(report["operating_points"], class_names, values)
    report["intervals"] = _intervals(values, multilabel_data=True)
  return report


def headline(report: dict, multilabel_data: bool) -> dict[str, float]:
  """The report's main scalars (for TensorBoard and comparisons)."""
  out = {"log_loss": report["log_loss"], "ece": report["calibration"]["ece"]}
  scaling = report.get("temperature_scaling")
  if scaling:  # log_loss and ece above are after scaling.
    out |= {"temperature": scaling["temperature"],
            "log_loss_uncalibrated": scaling["before"]["log_loss"],
            "ece_uncalibrated": scaling["before"]["ece"]}
  ops = report["operating_points"]
  for key in ("macro_average_precision", "macro_roc_auc"):
    if ops[key] is not None:
      out[key] = ops[key]
  if multilabel_data:
    tuned, half = report["at_tuned_thresholds"], report["at_0.5"]
    out |= {"micro_f1": tuned["micro"]["f1-score"], "macro_f1": tuned["macro"]["f1-score"],
            "exact_match": tuned["exact_match"], "micro_f1_at_0.5": half["micro"]["f1-score"],
            "macro_f1_at_0.5": half["macro"]["f1-score"]}
  else:
    cr = report["classification_report"]
    out |= {"accuracy": cr["accuracy"], "macro_f1": cr["macro avg"]["f1-score"],
            "weighted_f1": cr["weighted avg"]["f1-score"]}
    out |= {f"top{k}_accuracy": v for k, v in report["top_k_accuracy"].items()}
  return out


def write_pngs(out_dir: str, preds: workdir_lib.Predictions, report: dict,
               class_names: Sequence[str], title: str, scalars: Optional[dict] = None,
               best_step: Optional[int] = None) -> dict[str, str]:
  """Draws the report's figures into `out_dir`; returns {what: file name}."""
  truth = preds.targets > 0.5
  ops = report["operating_points"]
  files = {}

  def add(key, path):
    if path:
      files[key] = os.path.basename(path)

  if "confusion_matrix" in report:
    add("confusion_matrix", plots.confusion_matrix(
        os.path.join(out_dir, "confusion_matrix.png"), np.asarray(report["confusion_matrix"]),
        class_names, f"{title}: confusion matrix"))
  if "errors" in report:
    add("error_cooccurrence", plots.cooccurrence(
        os.path.join(out_dir, "error_cooccurrence.png"), report["errors"]["cooccurrence"],
        class_names, f"{title}: examples wrong on both labels"))
  if truth.any():
    add("pr_curves", plots.pr_curves(os.path.join(out_dir, "pr_curves.png"), preds.probs, truth,
                                     class_names, ops, f"{title}: precision-recall, one vs rest"))
    add("roc_curves", plots.roc_curves(os.path.join(out_dir, "roc_curves.png"), preds.probs,
                                       truth, class_names, ops, f"{title}: ROC, one vs rest"))
  add("reliability", plots.reliability(os.path.join(out_dir, "reliability.png"),
                                       report["calibration"], f"{title}: reliability",
                                       multilabel="errors" in report))
  if report.get("temperature_scaling"):
    add("reliability_uncalibrated", plots.reliability(
        os.path.join(out_dir, "reliability_uncalibrated.png"),
        report["temperature_scaling"]["before"]["calibration"],
        f"{title}: reliability before temperature scaling", multilabel="errors" in report))
  if scalars:
    add("learning_curves", plots.learning_curves(
        os.path.join(out_dir, "learning_curves.png"), scalars, "learning curves", best_step))
  return files


def training_scalars(scalars: dict[str, curves.Series]) -> dict[str, curves.Series]:
  """The scalars the train loop wrote (not the reports' own)."""
  return {k: v for k, v in scalars.items() if not k.startswith(REPORT_TAG_PREFIX)}

