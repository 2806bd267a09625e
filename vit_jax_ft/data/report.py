"""Statistics, plots and the printed summary of a prepared dataset."""

import os
from typing import Optional, Sequence

from absl import logging
from matplotlib.backends import backend_agg
from matplotlib import figure
import numpy as np

from vit_jax_ft.data import class_weights as class_weights_lib
from vit_jax_ft.data import duplicates


def class_weights(counts: Sequence[int]) -> list[Optional[float]]:
  """sklearn 'balanced' weights N / (C * n_c) over the classes present in `counts`.

  A class without train examples has no defined weight: None (JSON null).
  """
  counts = np.asarray(counts, dtype=np.int64)
  present = counts > 0
  weights = [None] * len(counts)
  if present.any():
    for i, w in zip(np.flatnonzero(present), class_weights_lib.compute_class_weights(counts[present])):
      weights[i] = round(float(w), 6)
  return weights


def imbalance_ratio(counts: Sequence[int]) -> Optional[float]:
  """Largest over smallest non-zero class count (None without examples)."""
  nonzero = [c for c in counts if c > 0]
  return round(max(nonzero) / min(nonzero), 3) if nonzero else None


def _stats(values: Sequence[int]) -> dict:
  v = np.asarray(values, dtype=np.float64)
  return dict(min=int(v.min()), max=int(v.max()), mean=round(float(v.mean()), 1),
              median=float(np.median(v)))


def size_stats(sizes: Sequence[tuple[int, int]]) -> dict:
  """{count, width: {min, max, mean, median}, height: {...}} of (width, height) sizes."""
  if not sizes:
    return dict(count=0)
  widths, heights = zip(*sizes)
  return dict(count=len(sizes), width=_stats(widths), height=_stats(heights))


def save_histogram(path: str, class_names: Sequence[str], counts: Sequence[int],
                   title: str) -> None:
  """A horizontal bar chart of examples per class (readable with long class names)."""
  height = 1.0 + 0.3 * len(class_names)
  fig = figure.Figure(figsize=(7, height))
  backend_agg.FigureCanvasAgg(fig)  # Renders without a display (no pyplot state).
  ax = fig.subplots()
  y = np.arange(len(class_names))
  ax.barh(y, counts, color="tab:blue")
  ax.set_yticks(y, labels=list(class_names))
  ax.invert_yaxis()  # First class at the top, as in the class list.
  for yi, c in zip(y, counts):
    ax.text(c, yi, f" {c}", va="center", fontsize=8)
  ax.margins(x=0.12)  # Room for the count labels.
  ax.set_xlabel("examples")
  ax.set_title(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def log_summary(info: dict, out_dir: str) -> None:
  """Logs what was written and what needs a look: imbalance, duplicates, skipped files."""
  splits = info["splits"]
  logging.info("Prepared %s in %s: %s examples, %d classes%s.", info["name"], out_dir,
               {s: v["num_examples"] for s, v in splits.items()}, len(info["class_names"]),
               " (multi-label)" if info["multilabel"] else "")
  logging.info("Train class counts: %s; imbalance ratio (largest/smallest class) %s.",
               dict(zip(info["class_names"], splits["train"]["class_counts"])),
               info["imbalance_ratio"])
  folds = (info.get("folds") or {}).get("folds")
  if folds:
    logging.info("%d cross-validation folds of the train and val examples (val and train are "
                 "fold 0's; data.fold=k picks another): %s examples.", len(folds),
                 [f["num_examples"] for f in folds])
    for k, entry in enumerate(folds):
      empty = [n for n, c in zip(info["class_names"], entry["class_counts"]) if not c]
      if empty:
        logging.warning("Fold %d has no examples of %s (fewer groups than folds).", k, empty)
  for split, entry in splits.items():
    empty = [n for n, c in zip(info["class_names"], entry["class_counts"]) if not c]
    if empty:
      logging.warning("Classes without %s examples%s: %s", split,
                      " (no class weight)" if split == "train" else "", empty)
  dup = info["duplicates"]
  logging.info("Duplicates (sha256): %s. --duplicates=%s dropped %d files.",
               duplicates.summary(dup), dup["policy"], len(dup["dropped"]))
  if info["group_leaks"]:
    logging.warning("%d groups span several splits as the source gives them: %s",
                    len(info["group_leaks"]), list(info["group_leaks"])[:5])
  by_kind = {}
  for s in info["skipped"]:
    by_kind.setdefault(s["kind"], []).append(f"{s['file']} ({s['reason']})")
  for kind, files in sorted(by_kind.items()):
    logging.warning("Skipped %d %s files (all listed in dataset_info.json 'skipped'): %s%s",
                    len(files), kind, "; ".join(files[:5]), " ..." if len(files) > 5 else "")
  if info["conversions"]:
    logging.info("Converted on the way in: %s", info["conversions"])
  logging.info("Wrote %s", os.path.join(out_dir, "dataset_info.json"))
