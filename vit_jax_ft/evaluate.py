r"""Evaluation report of a run: `python -m vit_jax_ft.evaluate --workdir=DIR`.

  python -m vit_jax_ft.evaluate --workdir=workdirs/isic --split=test \
      --checkpoint=best --required_recall='melanoma=0.999,basal cell carcinoma=0.99'

Restores a checkpoint ('best', 'last' or a step number), predicts every
example of the split and writes WORKDIR/reports/<split>_<checkpoint>/:
report.json, report.md, confusion_matrix.png (single-label),
error_cooccurrence.png (multi-label), pr_curves.png, roc_curves.png,
reliability.png, learning_curves.png and predictions.npz (for
`vit_jax_ft.compare`); report.md and report.json give 95% bootstrap intervals
(`--bootstrap_resamples`, default config.bootstrap_resamples). The headline
numbers also go to TensorBoard under report/<split>_<checkpoint>/. Multi-label thresholds are
tuned per label on the validation split and saved to
WORKDIR/reports/thresholds_<checkpoint>.json, which `vit_jax_ft.predict` uses.

`--tta=flip|dihedral` averages the probabilities over the image and its
mirror, or over the 8 rotations/mirrors of the square input;
`--calibrate=temperature` fits one temperature on the validation split, saves
it for `vit_jax_ft.predict` and reports the split temperature-scaled, with the
ECE and log loss before and after (reports/writer.py says more).

From Python (the train loop does, at the end): `reports.writer.write_reports(config, workdir)`.
"""

import os

# Set before TensorFlow is first imported.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from typing import Any  # pylint: disable=g-import-not-at-top,g-bad-import-order

from absl import app
from absl import flags

from vit_jax_ft import cli
from vit_jax_ft.reports import report as report_lib
from vit_jax_ft.reports import writer


def define_flags() -> None:
  """The command-line flags; defined only when run as a program, so that importing
  this module never clashes with the importer's own flags."""
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
  flags.DEFINE_integer(
      "bootstrap_resamples", None, "Resamples for the reports' 95% bootstrap confidence "
      "intervals (0: none); default: the run's config.bootstrap_resamples (1000).")


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
    if f.bootstrap_resamples is not None and f.bootstrap_resamples < 0:
      raise ValueError(f"--bootstrap_resamples must be >= 0; got {f.bootstrap_resamples}.")
    options = report_lib.Options(top_k=tuple(int(k) for k in f.top_k),
                                 required_recall=recall, recall_classes=classes,
                                 bootstrap_resamples=f.bootstrap_resamples)
    dirs = writer.write_reports(None, f.workdir, splits=f.split, checkpoint=f.checkpoint,
                                options=options, tta=f.tta, calibrate=f.calibrate)
    for split, path in dirs.items():
      print(f"{split}: {os.path.join(path, 'report.md')}")

  cli.run_main(body)


if __name__ == "__main__":
  define_flags()
  app.run(main)
