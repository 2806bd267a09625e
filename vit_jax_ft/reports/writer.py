"""Writing a run's evaluation reports: WORKDIR/reports/<split>_<checkpoint>/.

Restores a checkpoint ('best', 'last' or a step number) or takes an in-memory
train state, predicts every example of each split and writes report.json,
report.md and the PNGs. The headline numbers also go to TensorBoard under
report/<split>_<checkpoint>/. Multi-label thresholds are tuned per label on
the validation split and saved where `vit_jax_ft.predict` reads them
(workdir.thresholds_path).
"""

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
from vit_jax_ft.reports import curves
from vit_jax_ft.reports import markdown
from vit_jax_ft.reports import multilabel
from vit_jax_ft.reports import report as report_lib


class _Evaluation:
  """One run and checkpoint; caches each split's predictions across reports."""

  def __init__(self, run: workdir_lib.Run, checkpoint: workdir_lib.Checkpoint):
    self.run, self.checkpoint = run, checkpoint
    self._preds = {}

  def predictions(self, split: str) -> workdir_lib.Predictions:
    if split not in self._preds:
      self._preds[split] = workdir_lib.predict_split(self.run, self.checkpoint, split)
    return self._preds[split]

  def thresholds(self) -> tuple[np.ndarray, str]:
    """Per-label thresholds tuned on the validation split, and where they came from."""
    val = self.run.config.data.val_split
    preds = self.predictions(val)
    tuned = multilabel.tune_thresholds(preds.probs, preds.targets > 0.5)
    return tuned, f"tuned per label for F1 on the '{val}' split ({len(preds.probs)} examples)"


def _save_thresholds(ev: _Evaluation, thresholds: np.ndarray, source: str) -> None:
  path = workdir_lib.thresholds_path(ev.run.workdir, ev.checkpoint.label)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump({"checkpoint": ev.checkpoint.label, "step": ev.checkpoint.step, "source": source,
               "thresholds": dict(zip(ev.run.class_names, map(float, thresholds)))}, f, indent=2)


def _split_report(ev: _Evaluation, split: str, options: report_lib.Options) -> dict:
  """The JSON report of one split (without files and run summary)."""
  run, ck = ev.run, ev.checkpoint
  preds = ev.predictions(split)
  if run.multilabel:
    thresholds, source = ev.thresholds()
    if split == run.config.data.val_split:
      source += "; evaluated on that same split, so these numbers are optimistic"
    body = report_lib.multi_label(preds, run.class_names, options, thresholds, source)
    _save_thresholds(ev, thresholds, source)
  else:
    body = report_lib.single_label(preds, run.class_names, options)
  meta = {"workdir": os.path.abspath(run.workdir), "split": split,
          "checkpoint": {"label": ck.label, "step": ck.step, "path": ck.path,
                         "weights": ck.weights},
          "model": run.config.model.name, "multilabel": run.multilabel,
          "class_names": run.class_names}
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


def _write_one(ev: _Evaluation, split: str, options: report_lib.Options,
               scalars: dict, summary: dict) -> str:
  """Writes reports/<split>_<checkpoint>/ and logs its headline; returns the folder."""
  tag = f"{split}_{ev.checkpoint.label}"
  out_dir = os.path.join(ev.run.workdir, workdir_lib.REPORTS_DIR, tag)
  os.makedirs(out_dir, exist_ok=True)
  report = _split_report(ev, split, options)
  headline = report_lib.headline(report, ev.run.multilabel)
  files = report_lib.write_pngs(out_dir, ev.predictions(split), report, ev.run.class_names,
                                f"{split} ({ev.checkpoint.label}, step {ev.checkpoint.step})",
                                scalars, summary.get("best_checkpoint", {}).get("step"))
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
                  options: Optional[report_lib.Options] = None) -> dict[str, str]:
  """Writes the evaluation report of each split; returns {split: report folder}.

  Args:
    config: the config as run (normalisation resolved); None reads WORKDIR/config.json.
    workdir: the run's workdir.
    state: a steps.TrainState to evaluate instead of a checkpoint (reported as 'last').
    splits: default: the config's validation and test splits.
    checkpoint: 'best', 'last' or a step number, when `state` is None.
    options: top-k, required recall, calibration bins.
  """
  if jax.process_index() != 0:  # Evaluation runs on one process, which writes.
    return {}
  run = workdir_lib.load_run(workdir, config)
  ck = (workdir_lib.from_state(state, ema=checkpoints.evaluates_ema(run.config))
        if state is not None else workdir_lib.restore(workdir, checkpoint))
  if splits is None:
    splits = [s for s in (run.config.data.val_split, run.config.data.test_split) if s]
  options = options or report_lib.Options()
  options.recall_targets(run.class_names)  # Fail on a typo before predicting anything.
  scalars = report_lib.training_scalars(curves.read_scalars(workdir))
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(ck.variables["params"]))
  summary = curves.run_summary(workdir, scalars, num_params)
  ev = _Evaluation(run, ck)
  return {split: _write_one(ev, split, options, scalars, summary) for split in splits}
