r"""Predictions for image files: `python -m vit_jax_ft.predict --workdir=DIR --images=PATH`.

  python -m vit_jax_ft.predict --workdir=workdirs/isic --images='photos/**/*.jpg' \
      --out=preds.csv --top_k=3

`--images` is a file, a folder (searched recursively for image files) or a
glob, or several of them separated by commas. Each image goes through what
training data went through: the dataset preparation's conversion (EXIF
rotation, RGB, the prepared dataset's max_side; `vit_jax_ft.data.images`),
then the eval preprocessing and the run's normalisation from config.json.

The CSV has one row per file: the predicted label(s), the top-k labels with
their probabilities, the true label when the file sits in a folder named
after a class, and for an unreadable file the reason (the others are still
predicted). Multi-label runs predict every label whose probability reaches
its threshold: the ones tuned on the validation split by
`vit_jax_ft.evaluate` (reports/thresholds_<checkpoint>.json), else 0.5.
A PNG grid of sample images with their predicted (and true) labels is
written next to the CSV.

`--tta=flip|dihedral` averages the probabilities over views of each image as
`vit_jax_ft.evaluate --tta` does (and uses the thresholds tuned with that
TTA). `--temperature=auto` (the default) divides the scores by the
temperature `vit_jax_ft.evaluate --calibrate=temperature` saved for the
checkpoint and TTA mode, if any (reports/temperature_<checkpoint>.json);
`none` never scales; a number uses that T. Multi-label thresholds are moved
with T so the predicted labels stay those of the unscaled probabilities.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import csv  # pylint: disable=g-import-not-at-top,g-bad-import-order
import dataclasses
import json
from typing import Optional, Sequence

from absl import app
from absl import flags
from absl import logging
import numpy as np

from vit_jax_ft import cli
from vit_jax_ft import workdir as workdir_lib
from vit_jax_ft.data import images as images_lib
from vit_jax_ft.inputs import image_files
from vit_jax_ft.inputs import pipeline
from vit_jax_ft.models import tta as tta_lib
from vit_jax_ft.reports import plots
from vit_jax_ft.reports import temperature as temperature_lib

GRID_SIZE = 16


@dataclasses.dataclass
class Row:
  """One file's result: probabilities, or the reason it could not be read."""

  path: str
  probs: Optional[np.ndarray] = None
  error: str = ""
  true_label: str = ""


def _sample_indices(n: int, k: int) -> set[int]:
  return set(np.linspace(0, n - 1, min(n, k)).round().astype(int).tolist()) if n else set()


def predict_files(run: workdir_lib.Run, checkpoint: workdir_lib.Checkpoint, paths: Sequence[str],
                  batch_size: int = 64, grid_size: int = GRID_SIZE, tta: str = "none",
                  temperature: Optional[float] = None
                  ) -> tuple[list[Row], list[tuple[np.ndarray, Row]]]:
  """Rows for every path (in order), and (display image, row) pairs for a sample grid.

  `tta`: test-time augmentation mode; `temperature`: T to divide the scores by (None: 1).
  """
  apply = tta_lib.make_apply(run.model, run.multilabel, tta)
  preprocess = image_files.make_preprocess(run.config.data)
  options = images_lib.ImageOptions(max_side=image_files.max_side(run.info))
  sample = _sample_indices(len(paths), grid_size)
  rows, shown, pending = [], [], []

  def flush():
    batch = pipeline.pad_batch({"image": np.stack([x for x, _ in pending])}, batch_size)
    probs, scores = apply(checkpoint.variables, batch["image"])
    probs = np.asarray(probs, np.float64)
    if temperature is not None:
      probs = temperature_lib.scale(np.asarray(scores, np.float64), temperature, run.multilabel)
    for (_, row), p in zip(pending, probs):
      row.probs = p
    pending.clear()

  for i, path in enumerate(paths):
    row = Row(path=path, true_label=image_files.true_label(path, run.class_names))
    image, display, row.error = image_files.load_image(path, options, preprocess)
    rows.append(row)
    if row.error:
      logging.warning("Unreadable: %s: %s", path, row.error)
      continue
    pending.append((image, row))
    if i in sample:
      shown.append((display, row))
    if len(pending) == batch_size:
      flush()
  if pending:
    flush()
  return rows, shown


def load_thresholds(workdir: str, checkpoint: str, class_names: Sequence[str],
                    tta: str = "none") -> tuple[np.ndarray, str]:
  """Tuned multi-label thresholds of `checkpoint` if evaluate saved them, else 0.5."""
  path = workdir_lib.thresholds_path(workdir, checkpoint, tta)
  if not os.path.exists(path):
    run_it = "vit_jax_ft.evaluate" + (f" --tta={tta}" if tta != "none" else "")
    logging.warning("No %s (run %s first): using 0.5 for every label.", path, run_it)
    return np.full(len(class_names), 0.5), "0.5 (no tuned thresholds)"
  with open(path) as f:
    saved = json.load(f)["thresholds"]
  return np.asarray([saved[n] for n in class_names]), path


def predicted_labels(probs: np.ndarray, class_names: Sequence[str],
                     thresholds: Optional[np.ndarray]) -> list[str]:
  """Top class (single-label) or every label at or above its threshold (multi-label)."""
  if thresholds is None:
    return [class_names[int(np.argmax(probs))]]
  return [class_names[c] for c in np.flatnonzero(probs >= thresholds)]


def write_csv(path: str, rows: Sequence[Row], class_names: Sequence[str], top_k: int,
              thresholds: Optional[np.ndarray]) -> None:
  """file, predicted (';'-joined), true, top-k label/probability pairs, error."""
  k = min(top_k, len(class_names))
  header = ["file", "predicted", "true"]
  header += [f"{kind}_{i}" for i in range(1, k + 1) for kind in ("label", "prob")] + ["error"]
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    for row in rows:
      cells = [row.path, "", row.true_label]
      top = []
      if row.probs is not None:
        cells[1] = ";".join(predicted_labels(row.probs, class_names, thresholds))
        for c in np.argsort(-row.probs, kind="stable")[:k]:
          top += [class_names[c], f"{row.probs[c]:.6f}"]
      writer.writerow(cells + (top or [""] * 2 * k) + [row.error])


def write_grid(path: str, shown: Sequence[tuple[np.ndarray, Row]], class_names: Sequence[str],
               thresholds: Optional[np.ndarray]) -> Optional[str]:
  """Sample images captioned 'predicted (p)' and the true label; green right, red wrong."""
  if not shown:
    return None
  captions, colors = [], []
  for _, row in shown:
    labels = predicted_labels(row.probs, class_names, thresholds)
    best = float(row.probs.max())
    caption = f"{os.path.basename(row.path)}\npred: {', '.join(labels) or '-'} ({best:.2f})"
    color = "black"
    if row.true_label:
      caption += f"\ntrue: {row.true_label}"
      color = "green" if row.true_label in labels else "red"
    captions.append(caption)
    colors.append(color)
  return plots.image_grid(path, [image for image, _ in shown], captions, colors,
                          "predictions (model input crops)")


def resolve_temperature(workdir: str, checkpoint: str, tta: str,
                        flag: Optional[float] | str = "auto") -> Optional[float]:
  """The T to use: the saved one for 'auto' (None without one), None, or the number given."""
  if flag != "auto":
    if flag is not None:
      logging.info("Temperature scaling with T=%g (from --temperature).", flag)
    return flag
  path = workdir_lib.temperature_path(workdir, checkpoint, tta)
  value = temperature_lib.load(path)
  if value is None:
    logging.info("No saved temperature at %s: probabilities are not temperature-scaled.", path)
  else:
    logging.info("Temperature scaling with the saved T=%.4f from %s.", value, path)
  return value


def predict(workdir: str, images: str, out: str, top_k: int = 5, checkpoint: str = "best",
            grid: Optional[str] = None, tta: str = "none",
            temperature: Optional[float] | str = "auto") -> list[Row]:
  """Predicts every file of `images` into the CSV `out` and a sample grid PNG.

  `tta`: 'none', 'flip' or 'dihedral'. `temperature`: 'auto' (the one
  `evaluate --calibrate=temperature` saved for this checkpoint and TTA, if
  any), None (unscaled) or a positive number.
  """
  tta_lib.check_mode(tta)
  if isinstance(temperature, str):
    temperature = temperature_lib.parse_flag(temperature)
  run = workdir_lib.load_run(workdir)
  ck = workdir_lib.restore(workdir, checkpoint)
  paths = image_files.list_images(images)
  t = resolve_temperature(workdir, ck.label, tta, temperature)
  if tta != "none":
    logging.info("Predicting with %s.", tta_lib.describe(tta))
  rows, shown = predict_files(run, ck, paths, batch_size=run.config.eval_batch_size, tta=tta,
                              temperature=t)
  thresholds = (load_thresholds(workdir, ck.label, run.class_names, tta)[0] if run.multilabel
                else None)
  if thresholds is not None and t is not None:
    # Tuned on unscaled probabilities: moved so the same labels are predicted.
    thresholds = temperature_lib.scale_thresholds(thresholds, t)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  write_csv(out, rows, run.class_names, top_k, thresholds)
  grid = grid or os.path.splitext(out)[0] + "_grid.png"
  write_grid(grid, shown, run.class_names, thresholds)
  bad = [r for r in rows if r.error]
  logging.info("Predicted %d of %d files into %s (%d unreadable); grid: %s.",
               len(rows) - len(bad), len(rows), out, len(bad), grid)
  for row in bad:
    print(f"unreadable: {row.path}: {row.error}")
  return rows


def define_flags() -> None:
  """Command-line flags (only when run as a program)."""
  flags.DEFINE_string("workdir", None, "Workdir of a training run.", required=True)
  flags.DEFINE_string("images", None, "Image file, folder or glob (comma-separated list).",
                      required=True)
  flags.DEFINE_string("out", "predictions.csv", "Output CSV.")
  flags.DEFINE_integer("top_k", 5, "Labels with probabilities per row.")
  flags.DEFINE_string("checkpoint", "best", "'best', 'last' or a step number.")
  flags.DEFINE_string("grid", None, "Sample grid PNG (default: next to --out, *_grid.png).")
  flags.DEFINE_string("tta", "none", "Test-time augmentation: 'none', 'flip' or 'dihedral'.")
  flags.DEFINE_string(
      "temperature", "auto", "'auto': the temperature saved by evaluate --calibrate=temperature "
      "for this checkpoint and --tta, if any; 'none': no scaling; or T > 0.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  cli.run_main(lambda: predict(f.workdir, f.images, f.out, f.top_k, f.checkpoint, f.grid,
                               f.tta, f.temperature))


if __name__ == "__main__":
  define_flags()
  app.run(main)
