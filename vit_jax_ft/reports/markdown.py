"""report.md: the JSON report as tables and linked figures."""

from typing import Any, Optional, Sequence

from vit_jax_ft.reports import calibration

ECE_DEFINITION = (
    f"Expected calibration error over {calibration.NUM_BINS} equal-width confidence bins "
    "((k-1)/M, k/M]: ECE = sum_k n_k/N * |accuracy_k - mean confidence_k| (Guo et al. 2017). "
    "Single-label: the confidence is the top class's probability and correct means the top "
    "class is the true one. Multi-label: every (example, label) pair counts, with its sigmoid "
    "probability and whether the label is present. MCE is the largest bin gap.")


def _fmt(value: Any) -> str:
  if value is None:
    return "-"
  if isinstance(value, float):
    return f"{value:.4f}"
  return str(value)


def _ci(row: dict, key: str) -> Any:
  """row[key], as '0.5530 [0.471, 0.630]' when the report has its 95% interval."""
  value, ci = row.get(key), row.get(f"{key}_ci95")
  if value is None or ci is None:
    return value
  return f"{value:.4f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def _interval_note(report: dict) -> list[str]:
  """What the intervals are, and the metrics some resamples were left out of."""
  boot = report.get("bootstrap")
  if not boot or not boot.get("resamples"):
    return []
  note = (f"Brackets: 95% confidence intervals, {boot['method']} over {boot['resamples']} "
          f"resamples of this split stratified by {boot['stratified_by']} (seed "
          f"{boot['seed']}): the spread these numbers would show on another test set of the "
          "same size and class mix. Two runs compare by the paired difference on the same "
          "examples (`python -m vit_jax_ft.compare RUN_A RUN_B`), not by overlapping intervals.")
  short = sorted(k for k, v in (report.get("intervals") or {}).items()
                 if v["resamples"] < boot["resamples"])
  if short:
    note += (f" Some resamples left out (metric undefined there) for: {', '.join(short)}; "
             "report.json's `*_ci95_resamples` count those used.")
  return [note, ""]


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
  """A markdown table (floats to 4 decimals, None as '-') and a blank line."""
  lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
  lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
  return lines + [""]


def _image(files: dict, key: str, caption: str) -> list[str]:
  return [f"![{caption}]({files[key]})", ""] if key in files else []


def _operating_cells(ops: dict, name: str) -> list[Any]:
  row = ops["per_class"][name]
  point = row.get("at_required_recall")
  cells = [row["average_precision"], _ci(row, "roc_auc")]
  if "required_recall" not in row:
    return cells + [None, None]
  if point is None:
    return cells + ["no positives", None]
  precision = _ci(point, "precision")
  precision = precision if isinstance(precision, str) else f"{precision:.4f}"
  return cells + [f"{precision} (R={point['recall']:.4f})", point["threshold"]]


def _single_label(report: dict, names: Sequence[str], files: dict) -> list[str]:
  cr, ops = report["classification_report"], report["operating_points"]
  recall = sorted({r["required_recall"] for r in ops["per_class"].values()
                   if "required_recall" in r})
  at = "/".join(f"{r:g}" for r in recall) or "-"
  header = ["class", "precision", "recall", "F1", "support", "AP", "ROC AUC",
            f"precision at recall >= {at}", "threshold"]
  rows = [[n, _ci(cr[n], "precision"), _ci(cr[n], "recall"), _ci(cr[n], "f1-score"),
           int(cr[n]["support"])] + _operating_cells(ops, n) for n in names if n in cr]
  for avg in ("macro avg", "weighted avg"):
    r = cr[avg]
    extra = ([ops["macro_average_precision"], _ci(ops, "macro_roc_auc")] if avg == "macro avg"
             else [None, None])
    rows.append([f"**{avg}**", _ci(r, "precision"), _ci(r, "recall"), _ci(r, "f1-score"),
                 int(r["support"])] + extra + [None, None])
  lines = ["## Per class", ""] + table(header, rows)
  lines += [f"Accuracy: **{_fmt(_ci(cr, 'accuracy'))}**. Averages run over the classes "
            "present in the labels or the predictions (as sklearn's classification_report). "
            "Thresholds: predict the class when its probability is >= the threshold (one vs "
            "rest).", ""]
  if cr["absent_classes"]:
    lines += [f"Classes with no examples and no predictions: {', '.join(cr['absent_classes'])}.",
              ""]
  lines += ["## Top-k accuracy", ""]
  lines += table(["k", "accuracy"], [[k, v] for k, v in report["top_k_accuracy"].items()])
  lines += ["## Confusion matrix", ""] + _image(files, "confusion_matrix", "confusion matrix")
  errors = report["most_confident_errors"]
  if errors:
    lines += ["## Most confident errors", ""]
    lines += table(["id", "true", "predicted", "confidence"],
                    [[e["id"], e["true"], e["predicted"], e["confidence"]] for e in errors])
  return lines


def _multi_label(report: dict, names: Sequence[str], files: dict) -> list[str]:
  tuned, half, ops = report["at_tuned_thresholds"], report["at_0.5"], report["operating_points"]
  header = ["label", "threshold", "precision", "recall", "F1", "support", "F1 at 0.5", "AP",
            "ROC AUC", "precision at required recall", "its threshold"]
  rows = []
  for n in names:
    t = tuned["per_label"][n]
    rows.append([n, t["threshold"], _ci(t, "precision"), _ci(t, "recall"), _ci(t, "f1-score"),
                 t["support"], half["per_label"][n]["f1-score"]] + _operating_cells(ops, n))
  for avg in ("micro", "macro"):
    rows.append([f"**{avg}**", None, _ci(tuned[avg], "precision"), _ci(tuned[avg], "recall"),
                 _ci(tuned[avg], "f1-score"), None, half[avg]["f1-score"], None,
                 _ci(ops, "macro_roc_auc") if avg == "macro" else None, None, None])
  lines = ["## Per label", "", f"Thresholds: {report['thresholds']['source']}.", ""]
  lines += table(header, rows)
  lines += table(["", "tuned thresholds", "0.5"],
                  [["exact match", _ci(tuned, "exact_match"), half["exact_match"]],
                   ["Hamming loss", tuned["hamming_loss"], half["hamming_loss"]]])
  errors = report["errors"]
  lines += ["## Errors that occur together", ""]
  if errors["top_pairs"]:
    lines += table(["labels wrong together", "examples"],
                    [[" + ".join(p["labels"]), p["examples"]] for p in errors["top_pairs"]])
  if errors["top_swaps"]:
    lines += table(["missed", "predicted instead", "examples"],
                    [[s["missed"], s["predicted_instead"], s["examples"]]
                     for s in errors["top_swaps"]])
  return lines + _image(files, "error_cooccurrence", "error co-occurrence")


def _temperature_scaling(scaling: dict, files: dict) -> list[str]:
  before, after = scaling["before"], scaling["after"]
  lines = ["### Temperature scaling", "",
           f"T = **{scaling['temperature']:.4f}**, fitted on the `{scaling['fitted_on']}` split "
           f"({scaling['num_examples']} examples; NLL {scaling['val_nll_before']:.4f} -> "
           f"{scaling['val_nll_after']:.4f}) and saved to `{scaling['path']}`. "
           f"{scaling['note'][0].upper() + scaling['note'][1:]}. Dividing the scores by T keeps "
           "their order, so the predictions (the top class; for multi-label the labels at "
           "thresholds moved with T) and accuracy/F1 do not change.", ""]
  lines += table(["on this split", "before", "after"],
                  [["ECE", before["ece"], after["ece"]], ["MCE", before["mce"], after["mce"]],
                   ["log loss", before["log_loss"], after["log_loss"]]])
  return lines + _image(files, "reliability_uncalibrated", "reliability before scaling")


def _run_summary(summary: dict) -> list[str]:
  rows = [["steps", summary.get("steps")]]
  best = summary.get("best_checkpoint")
  if best:
    rows += [[f"best {k}", f"{v:.4f} at step {best['step']}"] for k, v in best["metrics"].items()]
    rows.append(["best checkpoint on disk (with optimizer state)",
                 f"{best['size_bytes'] / 2**20:.1f} MiB"])
  if "num_params" in summary:
    rows.append(["parameters", f"{summary['num_params']:,} "
                 f"({summary['params_bytes_float32'] / 2**20:.1f} MiB as float32)"])
  if "train_images_per_sec_mean" in summary:
    rows.append(["train images/s (mean)", f"{summary['train_images_per_sec_mean']:.1f}"])
  if "wall_time_s" in summary:
    rows.append(["wall time, first to last event", f"{summary['wall_time_s'] / 60:.1f} min"])
  return ["## Run summary", ""] + table(["", "value"], rows)


def render(report: dict, files: dict, headline: dict,
           run_summary: Optional[dict] = None) -> str:
  """The whole report.md."""
  ck = report["checkpoint"]
  names = report["class_names"]
  weights = ", EMA weights" if ck.get("weights") == "ema" else ""
  tta = (report.get("tta") or {}).get("mode", "none")
  scaling = report.get("temperature_scaling")
  title = (f"# Evaluation: split `{report['split']}`, {ck['label']} checkpoint "
           f"(step {ck['step']}{weights})")
  title += f", TTA `{tta}`" if tta != "none" else ""
  title += f", temperature-scaled (T = {scaling['temperature']:.4f})" if scaling else ""
  lines = [title,
           "", f"Workdir `{report['workdir']}`, model `{report['model']}`, "
           f"{report['num_examples']} examples, {len(names)} "
           f"{'labels (multi-label)' if report['multilabel'] else 'classes'}.", ""]
  if tta != "none":
    lines += [f"Predictions with {report['tta']['description']}.", ""]
  if scaling:
    lines += ["The report's probabilities are temperature-scaled (see Calibration); the "
              "`*_uncalibrated` numbers are before scaling.", ""]
  intervals = report.get("intervals") or {}
  summary = [[k, _ci({k: v, f"{k}_ci95": (intervals.get(k) or {}).get("ci95")}, k)]
             for k, v in headline.items()]
  lines += ["## Summary", ""] + table(["metric", "value"], summary) + _interval_note(report)
  body = _multi_label if report["multilabel"] else _single_label
  lines += body(report, names, files)
  lines += ["## Operating points", "",
            "One vs rest per class: average precision (area under the precision-recall curve) "
            "and ROC AUC; the red point is the most precise threshold that keeps the required "
            "recall.", ""]
  lines += _image(files, "pr_curves", "precision-recall curves")
  lines += _image(files, "roc_curves", "ROC curves")
  cal = report["calibration"]
  lines += ["## Calibration", "", f"ECE = **{cal['ece']:.4f}**, MCE = {cal['mce']:.4f}. "
            f"{ECE_DEFINITION}", ""] + _image(files, "reliability", "reliability diagram")
  if scaling:
    lines += _temperature_scaling(scaling, files)
  lines += ["## Learning curves", ""] + (
      _image(files, "learning_curves", "learning curves")
      or ["No training scalars in the workdir's TensorBoard event files.", ""])
  if run_summary:
    lines += _run_summary(run_summary)
  return "\n".join(lines)
