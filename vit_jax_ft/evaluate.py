r"""Evaluation report of a run: `python -m vit_jax_ft.evaluate --workdir=DIR`.

  python -m vit_jax_ft.evaluate --workdir=workdirs/isic --split=test \
      --checkpoint=best --required_recall='melanoma=0.999,basal cell carcinoma=0.99'

Restores a checkpoint ('best', 'last' or a step number), predicts every
example of the split and writes WORKDIR/reports/<split>_<checkpoint>/:
report.json, report.md, confusion_matrix.png (single-label),
error_cooccurrence.png (multi-label), pr_curves.png, roc_curves.png,
reliability.png and learning_curves.png. The headline numbers also go to
TensorBoard under report/<split>_<checkpoint>/. Multi-label thresholds are
tuned per label on the validation split and saved to
WORKDIR/reports/thresholds_<checkpoint>.json, which `vit_jax_ft.predict` uses.

`--tta=flip|dihedral` averages the probabilities over the image and its
mirror, or over the 8 rotations/mirrors of the square input
(evaluators/tta.py); `--calibrate=temperature` fits one temperature T on the
validation split (evaluators/temperature.py), saves it to
WORKDIR/reports/temperature_<checkpoint>.json for `vit_jax_ft.predict`, and
reports the split with softmax(scores / T) (sigmoid for multi-label), with the
ECE and log loss before and after. Either adds to the names of the report
folder, the TensorBoard tag and the saved thresholds/temperature files
(`_tta-flip`, `_calibrated`), so they never replace the plain ones.

From Python (e.g. at the end of training): `write_reports(config, workdir)`.
"""

import os

# Set before TensorFlow is first imported (a no-op when imported by train.py).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import dataclasses  # pylint: disable=g-import-not-at-top,g-bad-import-order
import json  # pylint: disable=g-import-not-at-top,g-bad-import-order
from typing import Any, Optional, Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
import numpy as np

from vit_jax_ft.evaluators import calibration
from vit_jax_ft.evaluators import classification
from vit_jax_ft.evaluators import cli
from vit_jax_ft.evaluators import curves
from vit_jax_ft.evaluators import markdown
from vit_jax_ft.evaluators import multilabel
from vit_jax_ft.evaluators import report as report_lib
from vit_jax_ft.evaluators import restore
from vit_jax_ft.evaluators import temperature as temperature_lib
from vit_jax_ft.evaluators import tta as tta_lib

REPORTS_DIR = "reports"
CALIBRATIONS = ("none", "temperature")


def thresholds_path(workdir: str, label: str, tta: str = "none") -> str:
  """Where the tuned multi-label thresholds of checkpoint `label` (and TTA mode) are kept."""
  return os.path.join(workdir, REPORTS_DIR, f"thresholds_{label}{tta_lib.suffix(tta)}.json")


def temperature_path(workdir: str, label: str, tta: str = "none") -> str:
  """Where the temperature fitted for checkpoint `label` (and TTA mode) is kept."""
  return os.path.join(workdir, REPORTS_DIR, f"temperature_{label}{tta_lib.suffix(tta)}.json")


def check_calibrate(calibrate: str) -> str:
  if calibrate not in CALIBRATIONS:
    raise ValueError(f"--calibrate must be one of {', '.join(CALIBRATIONS)}; got {calibrate!r}.")
  return calibrate


class _Evaluation:
  """One run and checkpoint; caches each split's predictions across reports."""

  def __init__(self, run: restore.Run, checkpoint: restore.Checkpoint, tta: str = "none",
               calibrate: str = "none"):
    self.run, self.checkpoint = run, checkpoint
    self.tta, self.calibrate = tta_lib.check_mode(tta), check_calibrate(calibrate)
    self._preds = {}
    self._temperature = None

  def predictions(self, split: str) -> restore.Predictions:
    """The split's (TTA-averaged) predictions, not temperature-scaled."""
    if split not in self._preds:
      self._preds[split] = restore.predict_split(self.run, self.checkpoint, split,
                                                 tta_mode=self.tta)
    return self._preds[split]

  def temperature(self) -> dict:
    """The temperature fitted on the validation split (saved once), with its details."""
    if self._temperature is None:
      val = self.run.config.data.val_split
      if not val:
        raise ValueError("--calibrate=temperature needs a validation split "
                         "(config.data.val_split is empty).")
      preds = self.predictions(val)
      truth = preds.targets > 0.5
      multi = self.run.multilabel
      t = temperature_lib.fit(preds.scores, truth, multi)
      path = temperature_path(self.run.workdir, self.checkpoint.label, self.tta)
      details = {
          "checkpoint": self.checkpoint.label, "step": self.checkpoint.step,
          "tta": self.tta, "fitted_on": val, "num_examples": int(len(preds.scores)),
          "val_nll_before": temperature_lib.nll(preds.scores, truth, multi),
          "val_nll_after": temperature_lib.nll(preds.scores, truth, multi, t),
          "scores": ("logits" if self.tta == "none" else
                     "logit of the TTA-averaged probabilities" if multi else
                     "log of the TTA-averaged probabilities")}
      temperature_lib.save(path, t, details)
      logging.info("Temperature T=%.4f fitted on '%s' (NLL %.4f -> %.4f), saved to %s.", t, val,
                   details["val_nll_before"], details["val_nll_after"], path)
      self._temperature = {"temperature": t, "path": path} | details
    return self._temperature

  def reported(self, split: str) -> restore.Predictions:
    """The predictions the report shows: temperature-scaled when calibrating."""
    preds = self.predictions(split)
    if self.calibrate == "none":
      return preds
    t = self.temperature()["temperature"]
    return dataclasses.replace(
        preds, probs=temperature_lib.scale(preds.scores, t, self.run.multilabel))

  def tag(self, split: str) -> str:
    """<split>_<checkpoint>[_tta-MODE][_calibrated]: report folder and TensorBoard tag."""
    tag = f"{split}_{self.checkpoint.label}{tta_lib.suffix(self.tta)}"
    return tag + ("_calibrated" if self.calibrate != "none" else "")

  def thresholds(self) -> tuple[np.ndarray, str]:
    """Per-label thresholds tuned on the validation split, and where they came from."""
    val = self.run.config.data.val_split
    preds = self.predictions(val)
    tuned = multilabel.tune_thresholds(preds.probs, preds.targets > 0.5)
    return tuned, f"tuned per label for F1 on the '{val}' split ({len(preds.probs)} examples)"


def _save_thresholds(ev: _Evaluation, thresholds: np.ndarray, source: str) -> None:
  path = thresholds_path(ev.run.workdir, ev.checkpoint.label, ev.tta)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  saved = {"checkpoint": ev.checkpoint.label, "step": ev.checkpoint.step, "source": source,
           "thresholds": dict(zip(ev.run.class_names, map(float, thresholds)))}
  if ev.tta != "none":
    saved["tta"] = ev.tta
  with open(path, "w") as f:
    json.dump(saved, f, indent=2)


def _temperature_report(ev: _Evaluation, split: str, options: report_lib.Options) -> dict:
  """T, where it was fitted, and the split's calibration before and after scaling."""
  fitted = ev.temperature()
  raw, scaled = ev.predictions(split), ev.reported(split)
  truth = raw.targets > 0.5
  multi = ev.run.multilabel

  def numbers(probs):
    cal = (calibration.multi_label(probs, truth, options.num_bins) if multi
           else calibration.single_label(probs, raw.labels, options.num_bins))
    return {"log_loss": classification.log_loss(probs, truth, multilabel=multi),
            "ece": cal["ece"], "mce": cal["mce"], "calibration": cal}

  note = ("T minimises the NLL of softmax(scores / T) on the validation split"
          if not multi else "T minimises the mean per-label NLL of sigmoid(scores / T) on the "
          "validation split")
  note += f"; scores: {fitted['scores']}"
  if split == fitted["fitted_on"]:
    note += "; evaluated on that same split, so the calibrated numbers are optimistic"
  keys = ("temperature", "path", "fitted_on", "num_examples", "val_nll_before", "val_nll_after")
  return {k: fitted[k] for k in keys} | {
      "note": note, "before": numbers(raw.probs), "after": numbers(scaled.probs)}


def _split_report(ev: _Evaluation, split: str, options: report_lib.Options) -> dict:
  """The JSON report of one split (without files and run summary)."""
  run, ck = ev.run, ev.checkpoint
  preds = ev.reported(split)
  scaling = _temperature_report(ev, split, options) if ev.calibrate != "none" else None
  if run.multilabel:
    thresholds, source = ev.thresholds()
    if split == run.config.data.val_split:
      source += "; evaluated on that same split, so these numbers are optimistic"
    _save_thresholds(ev, thresholds, source)
    if scaling:  # Tuned (and saved) on unscaled probabilities: the same decisions after T.
      thresholds = temperature_lib.scale_thresholds(thresholds, scaling["temperature"])
      source += "; moved to sigmoid(logit(t) / T) for the temperature-scaled probabilities"
    body = report_lib.multi_label(preds, run.class_names, options, thresholds, source)
  else:
    body = report_lib.single_label(preds, run.class_names, options)
  meta = {"workdir": os.path.abspath(run.workdir), "split": split,
          "checkpoint": {"label": ck.label, "step": ck.step, "path": ck.path},
          "model": run.config.model.name, "multilabel": run.multilabel,
          "class_names": run.class_names,
          "tta": {"mode": ev.tta, "views": tta_lib.NUM_VIEWS[ev.tta],
                  "description": tta_lib.describe(ev.tta)},
          "temperature_scaling": scaling}
  return meta | body


def _log_to_tensorboard(workdir: str, step: int, tag: str, headline: dict,
                        image_path: Optional[str]) -> None:
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  writer = metric_writers.SummaryWriter(workdir)
  prefix = f"{report_lib.REPORT_TAG_PREFIX}{tag}/"
  writer.write_scalars(step, {prefix + k: v for k, v in headline.items()})
  if image_path:
    image = np.asarray(Image.open(image_path).convert("RGB"))
    writer.write_images(step, {prefix + os.path.splitext(os.path.basename(image_path))[0]:
                               image[None]})
  writer.close()


def _write_one(ev: _Evaluation, split: str, options: report_lib.Options,
               scalars: dict, summary: dict) -> str:
  """Writes reports/<split>_<checkpoint>/ and logs its headline; returns the folder."""
  tag = ev.tag(split)
  out_dir = os.path.join(ev.run.workdir, REPORTS_DIR, tag)
  os.makedirs(out_dir, exist_ok=True)
  report = _split_report(ev, split, options)
  headline = report_lib.headline(report, ev.run.multilabel)
  title = f"{split} ({ev.checkpoint.label}, step {ev.checkpoint.step}"
  if ev.tta != "none":
    title += f", TTA {ev.tta}"
  if report["temperature_scaling"]:
    title += f", T={report['temperature_scaling']['temperature']:.3g}"
  files = report_lib.write_pngs(out_dir, ev.reported(split), report, ev.run.class_names,
                                title + ")", scalars,
                                summary.get("best_checkpoint", {}).get("step"))
  report |= {"headline": headline, "files": files, "run": summary}
  with open(os.path.join(out_dir, "report.json"), "w") as f:
    json.dump(report, f, indent=2)
  with open(os.path.join(out_dir, "report.md"), "w") as f:
    f.write(markdown.render(report, files, headline, summary))
  main_figure = files.get("confusion_matrix") or files.get("error_cooccurrence")
  _log_to_tensorboard(ev.run.workdir, ev.checkpoint.step, tag, headline,
                      os.path.join(out_dir, main_figure) if main_figure else None)
  logging.info("Report for %s: %s (%s)", tag, out_dir,
               ", ".join(f"{k}={v:.4f}" for k, v in headline.items()))
  return out_dir


def write_reports(config: Optional[ml_collections.ConfigDict], workdir: str, *,
                  state: Any = None, splits: Optional[Sequence[str]] = None,
                  checkpoint: str = "best",
                  options: Optional[report_lib.Options] = None,
                  tta: str = "none", calibrate: str = "none") -> dict[str, str]:
  """Writes the evaluation report of each split; returns {split: report folder}.

  Args:
    config: the config as run (normalisation resolved); None reads WORKDIR/config.json.
    workdir: the run's workdir.
    state: a steps.TrainState to evaluate instead of a checkpoint (reported as 'last').
    splits: default: the config's validation and test splits.
    checkpoint: 'best', 'last' or a step number, when `state` is None.
    options: top-k, required recall, calibration bins.
    tta: test-time augmentation, 'none', 'flip' or 'dihedral' (evaluators/tta.py).
    calibrate: 'none' or 'temperature' (fitted on the validation split).
  """
  if jax.process_index() != 0:  # Evaluation runs on one process, which writes.
    return {}
  tta_lib.check_mode(tta)  # Fail on a typo before restoring anything.
  check_calibrate(calibrate)
  run = restore.load_run(workdir, config)
  ck = restore.from_state(state) if state is not None else restore.restore(workdir, checkpoint)
  if splits is None:
    splits = [s for s in (run.config.data.val_split, run.config.data.test_split) if s]
  options = options or report_lib.Options()
  options.recall_targets(run.class_names)  # Fail on a typo before predicting anything.
  scalars = report_lib.training_scalars(curves.read_scalars(workdir))
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(ck.variables["params"]))
  summary = curves.run_summary(workdir, scalars, num_params)
  ev = _Evaluation(run, ck, tta, calibrate)
  logging.info("Evaluating with %s%s.", tta_lib.describe(tta),
               ", temperature-scaled" if calibrate != "none" else "")
  return {split: _write_one(ev, split, options, scalars, summary) for split in splits}


def define_flags() -> None:
  """The command-line flags; defined only when run as a program, so that importing
  this module (train.py does) never clashes with the importer's own flags."""
  flags.DEFINE_string("workdir", None, "Workdir of a training run.", required=True)
  flags.DEFINE_list("split", ["test"], "Split(s) to report on, comma-separated.")
  flags.DEFINE_string("checkpoint", "best", "'best', 'last' or a step number.")
  flags.DEFINE_string(
      "required_recall", "0.99",
      "Recall to keep when reporting the best precision and its threshold: one number for "
      "every class, or NAME=RECALL pairs, e.g. 'melanoma=0.999,basal cell carcinoma=0.99'.")
  flags.DEFINE_list("top_k", ["1", "3", "5"], "k values for top-k accuracy.")
  flags.DEFINE_string(
      "tta", "none", "Test-time augmentation: 'none', 'flip' (image + mirror) or 'dihedral' "
      "(8 rotations/mirrors); probabilities averaged over the views.")
  flags.DEFINE_string(
      "calibrate", "none", "'temperature': fit one temperature on the validation split, save "
      "it for predict and report the split temperature-scaled; 'none': off.")


def parse_required_recall(text: str) -> tuple[float, Any]:
  """(required_recall, recall_classes) for report.Options from the flag's text."""
  try:
    return float(text), ()
  except ValueError:
    pass
  per_class = {}
  for item in text.split(","):
    name, sep, value = item.rpartition("=")
    if not sep or not name.strip():
      raise ValueError(f"--required_recall: expected NAME=RECALL, got {item!r}.")
    per_class[name.strip()] = float(value)
  return 0.0, per_class


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")

  f = flags.FLAGS

  def body():
    recall, classes = parse_required_recall(f.required_recall)
    options = report_lib.Options(top_k=tuple(int(k) for k in f.top_k),
                                 required_recall=recall, recall_classes=classes)
    dirs = write_reports(None, f.workdir, splits=f.split, checkpoint=f.checkpoint,
                         options=options, tta=f.tta, calibrate=f.calibrate)
    for split, path in dirs.items():
      print(f"{split}: {os.path.join(path, 'report.md')}")

  cli.run_main(body)


if __name__ == "__main__":
  define_flags()
  app.run(main)
