"""Classification metrics accumulated exactly over a whole split.

Each eval batch yields sufficient statistics (a confusion matrix for
single-label data; per-class true/false positives and false negatives for
multi-label data); they are summed on the host and turned into metrics once,
so every example counts exactly once whatever the batch size.
"""

import jax
import jax.numpy as jnp
import numpy as np


def batch_stats(logits, targets, mask, per_example_loss, *, multilabel: bool,
                threshold: float = 0.5) -> dict:
  """Sufficient statistics of one (padded) batch; runs inside jit."""
  mask = mask.astype(jnp.float32)
  stats = {"loss_sum": jnp.sum(per_example_loss * mask), "count": jnp.sum(mask)}
  num_classes = logits.shape[-1]
  if multilabel:
    pred = (jax.nn.sigmoid(logits) >= threshold).astype(jnp.float32)
    truth = (targets >= 0.5).astype(jnp.float32)
    m = mask[:, None]
    stats["tp"] = jnp.sum(pred * truth * m, axis=0)
    stats["fp"] = jnp.sum(pred * (1 - truth) * m, axis=0)
    stats["fn"] = jnp.sum((1 - pred) * truth * m, axis=0)
    stats["exact"] = jnp.sum(jnp.all(pred == truth, axis=-1) * mask)
  else:
    truth = jax.nn.one_hot(jnp.argmax(targets, -1), num_classes) * mask[:, None]
    pred = jax.nn.one_hot(jnp.argmax(logits, -1), num_classes)
    stats["confusion"] = truth.T @ pred  # [true class, predicted class]
  return stats


def accumulate(total: dict | None, stats: dict) -> dict:
  """Adds one batch's statistics to the running totals (as float64 numpy)."""
  stats = {k: np.asarray(v, np.float64) for k, v in stats.items()}
  if total is None:
    return stats
  return {k: total[k] + stats[k] for k in total}


def _f1(tp, fp, fn):
  denom = 2 * tp + fp + fn
  return np.where(denom > 0, 2 * tp / np.maximum(denom, 1e-12), 0.0)


def summarize(total: dict) -> dict:
  """Metrics from accumulated statistics, with sklearn's conventions.

  Single-label macro averages run over the classes that occur in the labels
  or the predictions (sklearn's default label set); multi-label ones over all
  label columns (sklearn's multi-label behaviour). An undefined F1 counts as 0.
  """
  count = total["count"]
  out = {"loss": float(total["loss_sum"] / max(count, 1)), "num_examples": int(count)}
  if "confusion" in total:
    cm = total["confusion"]
    tp = np.diag(cm)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    present = (cm.sum(axis=0) + cm.sum(axis=1)) > 0
    out["accuracy"] = float(tp.sum() / max(count, 1))
    out["macro_f1"] = float(_f1(tp, fp, fn)[present].mean()) if present.any() else 0.0
  else:
    tp, fp, fn = total["tp"], total["fp"], total["fn"]
    out["micro_f1"] = float(_f1(tp.sum(), fp.sum(), fn.sum()))
    out["macro_f1"] = float(_f1(tp, fp, fn).mean())
    out["exact_match"] = float(total["exact"] / max(count, 1))
  return out
