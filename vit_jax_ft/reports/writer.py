"""Writing a run's evaluation reports: WORKDIR/reports/<split>_<checkpoint>/.

Restores a checkpoint ('best', 'last' or a step number) or takes an in-memory
train state, predicts every example of each split and writes report.json,
report.md (with 95% bootstrap intervals, reports/bootstrap.py), the PNGs and
predictions.npz (what `vit_jax_ft.compare` pairs runs by). The headline
numbers also go to TensorBoard under report/<split>_<checkpoint>/.
Multi-label thresholds are tuned per label on the validation split and saved
where `vit_jax_ft.predict` reads them (workdir.thresholds_path).

`tta` averages the probabilities over the image and its mirror, or over the
8 rotations/mirrors of the square input (models/tta.py); `calibrate=
'temperature'` fits one temperature T on the validation split
(reports/temperature.py), saves it for `vit_jax_ft.predict`
(workdir.temperature_path), and reports the split with softmax(scores / T)
(sigmoid for multi-label), with the ECE and log loss before and after.
Either adds to the names of the report folder, the TensorBoard tag and the
saved thresholds/temperature files (`_tta-flip`, `_calibrated`), so they
never replace the plain ones.
"""

import dataclasses
import json
import os
from typing import Any, Optional, Sequence

from absl import logging
from clu import metric_writers
import jax
import ml_collections
import numpy as np
from PIL import Image

from vit_jax_ft import checkpoints
from vit_jax_ft import workdir as workdir_lib
from vit_jax_ft.models import tta as tta_lib
from vit_jax_ft.reports import calibration
from vit_jax_ft.reports import classification
from vit_jax_ft.reports import compare
from vit_jax_ft.reports import curves
from vit_jax_ft.reports import markdown
from vit_jax_ft.reports import multilabel
from vit_jax_ft.reports import report as report_lib
from vit_jax_ft.reports import temperature as temperature_lib


CALIBRATIONS = ("none", "temperature")


def check_calibrate(calibrate: str) -> str:
  if calibrate not in CALIBRATIONS:
    raise ValueError(f"--calibrate must be one of {', '.join(CALIBRATIONS)}; got {calibrate!r}.")
  return calibrate


class _Evaluation:
  """One run and checkpoint; caches each split's predictions across reports."""

  def __init__(self, run: workdir_lib.Run, checkpoint: workdir_lib.Checkpoint, tta: str = "none",
               calibrate: str = "none"):
    self.run, self.checkpoint = run, checkpoint
    self.tta, self.calibrate = tta_lib.check_mode(tta), check_calibrate(calibrate)
    self._preds = {}
    self._temperature = None

  def predictions(self, split: str) -> workdir_lib.Predictions:
    """The split's (TTA-averaged) predictions, not temperature-scaled."""
    if split not in self._preds:
      self._preds[split] = workdir_lib.predict_split(self.run, self.checkpoint, split,
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
      path = workdir_lib.temperature_path(self.run.workdir, self.checkpoint.label, self.tta)
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

  def reported(self, split: str) -> workdir_lib.Predictions:
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
  path = workdir_lib.thresholds_path(ev.run.workdir, ev.checkpoint.label, ev.tta)
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
          "checkpoint": {"label": ck.label, "step": ck.step, "path": ck.path,
                         "weights": ck.weights},
          "model": run.config.model.name, "multilabel": run.multilabel,
          "class_names": run.class_names,
          "tta": {"mode": ev.tta, "views": tta_lib.NUM_VIEWS[ev.tta],
                  "description": tta_lib.describe(ev.tta)},
          "temperature_scaling": scaling}
  return meta | body


def _log_to_tensorboard(workdir: str, step: int, tag: str, headline: dict,
                        image_path: Optional[str]) -> None:
  writer = metric_writers.SummaryWriter(workdir)
  prefix = f"{report_lib.REPORT_TAG_PREFIX}{tag}/"
  writer.write_scalars(step, {prefix + k: v for k, v in headline.items()})
  if image_path:
    image = np.asarray(Image.open(image_path).convert("RGB"))
    writer.write_images(step, {prefix + os.path.splitext(os.path.basename(image_path))[0]:
                               image[None]})
  writer.close()


def _save_predictions(out_dir: str, preds: workdir_lib.Predictions, report: dict,
                      run: workdir_lib.Run) -> str:
  """Writes predictions.npz, what `vit_jax_ft.compare` pairs two runs by: ids, targets,
  probabilities and the decisions this report scored."""
  if run.multilabel:
    thresholds = np.array([report["thresholds"]["values"][n] for n in run.class_names])
    predicted = preds.probs >= thresholds[None, :]
  else:
    predicted = np.eye(len(run.class_names), dtype=bool)[preds.probs.argmax(axis=1)]
  compare.save_predictions(os.path.join(out_dir, compare.PREDICTIONS_FILE), preds.ids,
                           preds.targets, preds.probs, predicted, run.class_names,
                           run.multilabel)
  return compare.PREDICTIONS_FILE


def _write_one(ev: _Evaluation, split: str, options: report_lib.Options,
               scalars: dict, summary: dict) -> str:
  """Writes reports/<split>_<checkpoint>/ and logs its headline; returns the folder."""
  tag = ev.tag(split)
  out_dir = os.path.join(ev.run.workdir, workdir_lib.REPORTS_DIR, tag)
  os.makedirs(out_dir, exist_ok=True)
  report = _split_report(ev, split, options)
  headline = report_lib.headline(report, ev.run.multilabel)
  title = f"{split} ({ev.checkpoint.label}, step {ev.checkpoint.step}"
  if ev.tta != "none":
    title += f", TTA {ev.tta}"
  if report["temperature_scaling"]:
    title += f", T={report['temperature_scaling']['temperature']:.3g}"
  preds = ev.reported(split)
  files = report_lib.write_pngs(out_dir, preds, report, ev.run.class_names,
                                title + ")", scalars,
                                summary.get("best_checkpoint", {}).get("step"))
  files["predictions"] = _save_predictions(out_dir, preds, report, ev.run)
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
    options: top-k, required recall, calibration bins, bootstrap resamples and seed (None:
      the run's config.bootstrap_resamples / bootstrap_seed).
    tta: test-time augmentation, 'none', 'flip' or 'dihedral' (evaluators/tta.py).
    calibrate: 'none' or 'temperature' (fitted on the validation split).
  """
  if jax.process_index() != 0:  # Evaluation runs on one process, which writes.
    return {}
  tta_lib.check_mode(tta)  # Fail on a typo before restoring anything.
  check_calibrate(calibrate)
  run = workdir_lib.load_run(workdir, config)
  ck = (workdir_lib.from_state(state, ema=checkpoints.evaluates_ema(run.config))
        if state is not None else workdir_lib.restore(workdir, checkpoint))
  if splits is None:
    splits = [s for s in (run.config.data.val_split, run.config.data.test_split) if s]
  options = options or report_lib.Options()
  if options.bootstrap_resamples is None:
    options = dataclasses.replace(options, bootstrap_resamples=run.config.bootstrap_resamples)
  if options.bootstrap_seed is None:
    options = dataclasses.replace(options, bootstrap_seed=run.config.bootstrap_seed)
  options.recall_targets(run.class_names)  # Fail on a typo before predicting anything.
  scalars = report_lib.training_scalars(curves.read_scalars(workdir))
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(ck.variables["params"]))
  summary = curves.run_summary(workdir, scalars, num_params)
  ev = _Evaluation(run, ck, tta, calibrate)
  logging.info("Evaluating with %s%s.", tta_lib.describe(tta),
               ", temperature-scaled" if calibrate != "none" else "")
  return {split: _write_one(ev, split, options, scalars, summary) for split in splits}
