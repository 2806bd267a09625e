"""The report's PNGs, drawn with matplotlib's object API.

`matplotlib.figure.Figure` renders through Agg without pyplot, so nothing
here touches pyplot's global figure registry or the process-wide backend:
safe to call from a training process or several threads.
"""

import math
from typing import Optional, Sequence

from matplotlib import colors as mcolors
from matplotlib.figure import Figure
import numpy as np
from sklearn import metrics as skm

from vit_jax_ft.reports import curves as curves_lib

MAX_ANNOTATED_CLASSES = 25  # Above this, numbers in the confusion cells are unreadable.
MAX_CURVE_PANELS = 48


def _save(fig: Figure, path: str) -> str:
  fig.savefig(path, dpi=100)
  return path


def _short(name: str, width: int = 18) -> str:
  return name if len(name) <= width else name[:width - 1] + "\u2026"


def _matrix_panel(ax, matrix: np.ndarray, names: Sequence[str], title: str, fmt: str,
                  xlabel: str, ylabel: str, vmax: Optional[float] = None) -> None:
  image = ax.imshow(matrix, cmap="Blues", vmin=0, vmax=vmax)
  ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
  ticks = np.arange(len(names))
  labels = [_short(n) for n in names]
  ax.set_xticks(ticks, labels, rotation=60, ha="right", fontsize=8)
  ax.set_yticks(ticks, labels, fontsize=8)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  if len(names) <= MAX_ANNOTATED_CLASSES:
    threshold = 0.5 * (np.nanmax(matrix) if vmax is None else vmax)
    for (i, j), value in np.ndenumerate(matrix):
      if value:
        ax.text(j, i, format(value, fmt), ha="center", va="center", fontsize=7,
                color="white" if value > threshold else "black")


def confusion_matrix(path: str, cm: np.ndarray, names: Sequence[str], title: str) -> str:
  """Counts and row-normalised (recall per true class) side by side."""
  side = max(5.0, 0.45 * len(names) + 2.5)
  fig = Figure(figsize=(2 * side + 1, side), layout="constrained")
  ax_counts, ax_norm = fig.subplots(1, 2)
  rows = cm.sum(axis=1, keepdims=True)
  normalised = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0)
  _matrix_panel(ax_counts, cm, names, "counts", "d", "predicted", "true")
  _matrix_panel(ax_norm, normalised, names, "row-normalised (recall)", ".2f", "predicted",
                "true", vmax=1.0)
  fig.suptitle(title)
  return _save(fig, path)


def cooccurrence(path: str, matrix: np.ndarray, names: Sequence[str], title: str) -> str:
  """Multi-label error co-occurrence heat map."""
  side = max(5.0, 0.45 * len(names) + 2.5)
  fig = Figure(figsize=(side + 1, side), layout="constrained")
  _matrix_panel(fig.subplots(), np.asarray(matrix), names, title, "d", "label j", "label i")
  return _save(fig, path)


def _grid(num: int, panel: float = 2.6) -> tuple[Figure, np.ndarray]:
  cols = min(num, 4)
  rows = math.ceil(num / cols)
  fig = Figure(figsize=(panel * cols, panel * rows + 0.6), layout="constrained")
  axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
  for ax in axes[num:]:
    ax.set_visible(False)
  return fig, axes


def _panel_classes(truth: np.ndarray) -> np.ndarray:
  """Classes with positives, most frequent first when there are too many to draw."""
  with_pos = np.flatnonzero(truth.sum(axis=0) > 0)
  if len(with_pos) <= MAX_CURVE_PANELS:
    return with_pos
  return np.sort(with_pos[np.argsort(-truth.sum(axis=0)[with_pos], kind="stable")]
                 [:MAX_CURVE_PANELS])


def pr_curves(path: str, probs: np.ndarray, truth: np.ndarray, names: Sequence[str],
              ops: dict, title: str) -> Optional[str]:
  """One-vs-rest precision-recall curve per class, with AP and the required-recall point.

  None (nothing written) when no class has a positive example.
  """
  classes = _panel_classes(truth)
  if not len(classes):
    return None
  fig, axes = _grid(len(classes))
  for ax, c in zip(axes, classes):
    precision, recall, _ = skm.precision_recall_curve(truth[:, c], probs[:, c])
    row = ops["per_class"][names[c]]
    ax.plot(recall, precision, lw=1.5, drawstyle="steps-post")
    ax.axhline(truth[:, c].mean(), color="grey", lw=0.8, ls=":")  # A random ranker.
    point = row.get("at_required_recall")
    if point:
      ax.plot(point["recall"], point["precision"], "o", color="C3", ms=5,
              label=f"R>={row['required_recall']:g}: P={point['precision']:.3f}")
      ax.legend(fontsize=7, loc="lower left")
    ax.set_title(f"{_short(names[c], 22)}  AP={row['average_precision']:.3f}", fontsize=9)
    ax.set_xlim(0, 1.01)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall", fontsize=8)
    ax.set_ylabel("precision", fontsize=8)
  fig.suptitle(title)
  return _save(fig, path)


def roc_curves(path: str, probs: np.ndarray, truth: np.ndarray, names: Sequence[str],
               ops: dict, title: str) -> Optional[str]:
  """One-vs-rest ROC curve per class with its AUC.

  None (nothing written) when no class has both positives and negatives, e.g. a
  one-example split: ROC is undefined there.
  """
  classes = [c for c in _panel_classes(truth) if not truth[:, c].all()]
  if not classes:
    return None
  fig, axes = _grid(len(classes))
  for ax, c in zip(axes, classes):
    fpr, tpr, _ = skm.roc_curve(truth[:, c], probs[:, c])
    ax.plot(fpr, tpr, lw=1.5)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
    auc = ops["per_class"][names[c]]["roc_auc"]
    ax.set_title(f"{_short(names[c], 22)}  AUC={auc:.3f}", fontsize=9)
    ax.set_xlabel("false positive rate", fontsize=8)
    ax.set_ylabel("true positive rate", fontsize=8)
  fig.suptitle(title)
  return _save(fig, path)


def reliability(path: str, calibration: dict, title: str, multilabel: bool = False) -> str:
  """Reliability diagram (accuracy per confidence bin) over a confidence histogram.

  Multi-label: each bin holds (example, label) probabilities; its bar is the
  fraction of those labels that are present.
  """
  bins = calibration["bins"]
  lows = np.asarray([b["low"] for b in bins])
  width = lows[1] - lows[0]
  acc = np.asarray([np.nan if b["accuracy"] is None else b["accuracy"] for b in bins])
  conf = np.asarray([np.nan if b["confidence"] is None else b["confidence"] for b in bins])
  fig = Figure(figsize=(5.5, 6.5), layout="constrained")
  top, bottom = fig.subplots(2, 1, height_ratios=(3, 1), sharex=True)
  top.bar(lows, np.nan_to_num(acc), width=width, align="edge", edgecolor="black",
          color="C0", label="present" if multilabel else "accuracy")
  gap_low = np.where(np.isnan(acc), 0, np.minimum(acc, conf))
  # Outlined, not filled: a translucent fill over the blue bars reads as a third colour.
  top.bar(lows, np.nan_to_num(np.abs(conf - acc)), bottom=gap_low, width=width,
          align="edge", fill=False, edgecolor="C3", hatch="//", lw=0.8,
          label="gap to mean confidence")
  top.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
  top.set_ylabel("fraction of labels present" if multilabel else "fraction correct")
  top.set_ylim(0, 1)
  top.legend(loc="upper left", fontsize=8)
  top.set_title(f"{title}\nECE={calibration['ece']:.4f} "
                f"({calibration['num_bins']} bins), MCE={calibration['mce']:.3f}")
  bottom.bar(lows, [b["count"] for b in bins], width=width, align="edge", color="grey")
  bottom.set_yscale("symlog")
  bottom.set_xlabel("predicted probability" if multilabel else "confidence (top probability)")
  bottom.set_ylabel("label decisions" if multilabel else "examples")
  bottom.set_xlim(0, 1)
  return _save(fig, path)


_LEARNING_PANELS = (
    ("loss", ("train_loss", "val_loss")),
    ("accuracy", ("train_accuracy", "val_accuracy")),
    ("F1", ("val_macro_f1", "val_micro_f1", "val_exact_match")),
    ("learning rate", ("learning_rate",)),
)


def learning_curves(path: str, scalars: dict[str, curves_lib.Series], title: str,
                    best_step: Optional[int] = None) -> Optional[str]:
  """Train/val loss, accuracy, F1 and the learning rate over steps (None without data).

  A dotted vertical line marks `best_step` (the kept best checkpoint).
  """
  panels = [(name, [t for t in tags if t in scalars]) for name, tags in _LEARNING_PANELS]
  panels = [(name, tags) for name, tags in panels if tags]
  if not panels:
    return None
  fig, axes = _grid(len(panels), panel=3.6)
  for ax, (name, tags) in zip(axes, panels):
    for tag in tags:
      s = scalars[tag]
      style = dict(marker="o", ms=3) if tag.startswith("val_") else {}
      ax.plot(s.steps, s.values, lw=1.2, label=tag, **style)
    if best_step is not None:
      ax.axvline(best_step, color="grey", ls=":", lw=1, label=f"best (step {best_step})")
    ax.set_title(name)
    ax.set_xlabel("step")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
  if "train_loss" in scalars and np.all(scalars["train_loss"].values > 0):
    axes[0].set_yscale("log")
  fig.suptitle(title)
  return _save(fig, path)


def image_grid(path: str, images: Sequence[np.ndarray], titles: Sequence[str],
               colors: Sequence[str], title: str = "") -> str:
  """Images (uint8 HWC) with a coloured caption each, four per row."""
  fig, axes = _grid(len(images), panel=2.8)
  for ax, image, caption, color in zip(axes, images, titles, colors):
    ax.imshow(image)
    ax.set_title(caption, fontsize=8, color=color)
    ax.axis("off")
  if title:
    fig.suptitle(title)
  return _save(fig, path)


def overlays(path: str, image: np.ndarray, maps: dict[str, np.ndarray], title: str) -> str:
  """The image, then each heat map (values in [0, 1], image-sized) laid over it."""
  fig = Figure(figsize=(3.2 * (len(maps) + 1), 3.6), layout="constrained")
  axes = np.atleast_1d(fig.subplots(1, len(maps) + 1))
  axes[0].imshow(image)
  axes[0].set_title("input", fontsize=9)
  norm = mcolors.Normalize(0.0, 1.0)
  for ax, (name, heat) in zip(axes[1:], maps.items()):
    ax.imshow(image)
    ax.imshow(heat, cmap="jet", alpha=0.5, norm=norm, interpolation="bilinear")
    ax.set_title(name, fontsize=9)
  for ax in axes:
    ax.axis("off")
  fig.suptitle(title, fontsize=10)
  return _save(fig, path)
