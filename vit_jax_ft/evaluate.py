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

From Python (e.g. at the end of training): `write_reports(config, workdir)`.
"""

import os

# Set before TensorFlow is first imported (a no-op when imported by train.py).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import json  # pylint: disable=g-import-not-at-top,g-bad-import-order
from typing import Any, Optional, Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
import numpy as np

from vit_jax_ft import checkpoints
from vit_jax_ft.evaluators import cli
from vit_jax_ft.evaluators import curves
from vit_jax_ft.evaluators import markdown
from vit_jax_ft.evaluators import multilabel
from vit_jax_ft.evaluators import report as report_lib
from vit_jax_ft.evaluators import restore

REPORTS_DIR = "reports"


def thresholds_path(workdir: str, label: str) -> str:
  """Where the tuned multi-label thresholds of checkpoint `label` are kept."""
  return os.path.join(workdir, REPORTS_DIR, f"thresholds_{label}.json")


class _Evaluation:
  """One run and checkpoint; caches each split's predictions across reports."""

  def __init__(self, run: restore.Run, checkpoint: restore.Checkpoint):
    self.run, self.checkpoint = run, checkpoint
    self._preds = {}

  def predictions(self, split: str) -> restore.Predictions:
    if split not in self._preds:
      self._preds[split] = restore.predict_split(self.run, self.checkpoint, split)
    return self._preds[split]

  def thresholds(self) -> tuple[np.ndarray, str]:
    """Per-label thresholds tuned on the validation split, and where they came from."""
    val = self.run.config.data.val_split
    preds = self.predictions(val)
    tuned = multilabel.tune_thresholds(preds.probs, preds.targets > 0.5)
    return tuned, f"tuned per label for F1 on the '{val}' split ({len(preds.probs)} examples)"


def _save_thresholds(ev: _Evaluation, thresholds: np.ndarray, source: str) -> None:
  path = thresholds_path(ev.run.workdir, ev.checkpoint.label)
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
  tag = f"{split}_{ev.checkpoint.label}"
  out_dir = os.path.join(ev.run.workdir, REPORTS_DIR, tag)
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
  run = restore.load_run(workdir, config)
  ck = (restore.from_state(state, ema=checkpoints.evaluates_ema(run.config)) if state is not None
        else restore.restore(workdir, checkpoint))
  if splits is None:
    splits = [s for s in (run.config.data.val_split, run.config.data.test_split) if s]
  options = options or report_lib.Options()
  options.recall_targets(run.class_names)  # Fail on a typo before predicting anything.
  scalars = report_lib.training_scalars(curves.read_scalars(workdir))
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(ck.variables["params"]))
  summary = curves.run_summary(workdir, scalars, num_params)
  ev = _Evaluation(run, ck)
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
                         options=options)
    for split, path in dirs.items():
      print(f"{split}: {os.path.join(path, 'report.md')}")

  cli.run_main(body)


if __name__ == "__main__":
  define_flags()
  app.run(main)
