"""Is run B better than run A? The paired bootstrap difference on the same examples.

Every report folder holds `predictions.npz` (save_predictions: example ids,
targets, probabilities and the decisions the report scored). Two runs scored on
the same split are paired by example id, and each bootstrap resample
(reports/bootstrap.py: stratified by class, or by each example's rarest label
for multi-label data, fixed seed) scores both runs on the same examples, so the
difference B - A per resample keeps out the noise the two runs share (which
test images happen to be hard). The 95% percentile interval of that
difference decides: above 0, "B better than A"; below 0, "A better than B";
containing 0, "no significant difference" (the data cannot tell them apart,
which is not the same as showing they are equal).

Two runs on different examples (another split, another preparation of the
data) are refused: an unpaired comparison is what this module exists to avoid.
"""

import dataclasses
import json
import os
from typing import Optional, Sequence

import numpy as np

from vit_jax_ft.reports import bootstrap
from vit_jax_ft.reports import markdown

PREDICTIONS_FILE = "predictions.npz"
B_BETTER, A_BETTER, NO_DIFFERENCE = (
    "B better than A", "A better than B", "no significant difference")
DEFAULT_METRIC = "macro_f1"


@dataclasses.dataclass(frozen=True)
class Saved:
  """One report's scored predictions.

  ids [N] example ids; targets [N, C] bool; probs [N, C]; predicted [N, C]
  bool, the decisions (single-label: the argmax, one-hot; multi-label: at the
  report's thresholds); where the file came from.
  """

  ids: np.ndarray
  targets: np.ndarray
  probs: np.ndarray
  predicted: np.ndarray
  class_names: list[str]
  multilabel: bool
  path: str = ""


def save_predictions(path: str, ids: Sequence[str], targets: np.ndarray, probs: np.ndarray,
                     predicted: np.ndarray, class_names: Sequence[str],
                     multilabel: bool) -> None:
  """Writes predictions.npz (no pickles: strings as unicode arrays)."""
  np.savez_compressed(
      path, ids=np.asarray(list(ids), dtype=str), targets=np.asarray(targets) > 0.5,
      probs=np.asarray(probs, np.float32), predicted=np.asarray(predicted, bool),
      class_names=np.asarray(list(class_names), dtype=str), multilabel=np.asarray(multilabel))


def load_predictions(path: str) -> Saved:
  with np.load(path, allow_pickle=False) as f:
    return Saved(ids=f["ids"], targets=f["targets"], probs=f["probs"].astype(np.float64),
                 predicted=f["predicted"], class_names=[str(n) for n in f["class_names"]],
                 multilabel=bool(f["multilabel"]), path=path)


def find_predictions(run: str, split: str = "test", checkpoint: str = "best") -> str:
  """predictions.npz of a workdir's reports/<split>_<checkpoint>/, a report folder or the file.

  `checkpoint` may name a report folder's whole suffix, e.g. 'best_tta-flip'.
  """
  candidates = ([run] if run.endswith(".npz") else
                [os.path.join(run, PREDICTIONS_FILE),
                 os.path.join(run, "reports", f"{split}_{checkpoint}", PREDICTIONS_FILE)])
  for path in candidates:
    if os.path.isfile(path):
      return path
  if not os.path.exists(run):
    raise FileNotFoundError(f"{run} does not exist (expected a workdir or a report folder).")
  raise FileNotFoundError(
      f"No {PREDICTIONS_FILE} for split {split!r} ({checkpoint} checkpoint) in {run} (looked "
      f"for {' and '.join(candidates)}); write it with: python -m vit_jax_ft.evaluate "
      f"--workdir={run} --split={split} --checkpoint={checkpoint}")


def _examples(ids: np.ndarray, limit: int = 3) -> str:
  shown = ", ".join(repr(str(i)) for i in ids[:limit])
  return shown + (", ..." if len(ids) > limit else "")


def pair(a: Saved, b: Saved, name_a: str = "A", name_b: str = "B") -> tuple[Saved, Saved]:
  """(a, b) with b's examples in a's order; ValueError unless both hold the same examples."""
  if a.class_names != b.class_names or a.multilabel != b.multilabel:
    raise ValueError(f"{name_a} and {name_b} have different classes ({a.class_names} vs "
                     f"{b.class_names}); compare needs runs on the same data.")
  if not np.array_equal(a.ids, b.ids):
    only_a, only_b = np.setdiff1d(a.ids, b.ids), np.setdiff1d(b.ids, a.ids)
    if len(only_a) or len(only_b) or len(a.ids) != len(b.ids):
      raise ValueError(
          f"{name_a} and {name_b} were scored on different examples: {len(only_a)} ids only in "
          f"{name_a} ({_examples(only_a)}), {len(only_b)} only in {name_b} "
          f"({_examples(only_b)}); compare needs both runs' reports on the same split of the "
          "same prepared data.")
    if len(np.unique(a.ids)) != len(a.ids):
      raise ValueError(f"{name_a} and {name_b} list repeated example ids in different orders; "
                       "they cannot be paired.")
    where = {i: k for k, i in enumerate(b.ids)}
    order = np.array([where[i] for i in a.ids])
    b = dataclasses.replace(b, ids=b.ids[order], targets=b.targets[order],
                            probs=b.probs[order], predicted=b.predicted[order])
  if not np.array_equal(a.targets, b.targets):
    bad = np.flatnonzero(np.any(a.targets != b.targets, axis=1))
    raise ValueError(f"{name_a} and {name_b} give {len(bad)} examples different labels "
                     f"({_examples(a.ids[bad])}): not the same data.")
  return a, b


def _strata(s: Saved) -> np.ndarray:
  return (bootstrap.multi_label_strata(s.targets) if s.multilabel
          else bootstrap.single_label_strata(s.targets.argmax(axis=1)))


def values(s: Saved, resampler: bootstrap.Resampler) -> dict[str, np.ndarray]:
  """{headline metric: [R]} of one run over the resamples (report.headline's names)."""
  if s.multilabel:
    v = bootstrap.multi_label_values(s.targets, s.probs, s.predicted, resampler)
  else:
    v = bootstrap.single_label_values(s.targets.argmax(axis=1), s.probs, resampler)
  return bootstrap.headline(v, s.multilabel)


def verdict(ci: Optional[Sequence[float]]) -> str:
  if ci is None:
    return "undefined"
  return B_BETTER if ci[0] > 0 else A_BETTER if ci[1] < 0 else NO_DIFFERENCE


def paired(a: Saved, b: Saved, resamples: int = bootstrap.RESAMPLES,
           seed: int = bootstrap.SEED) -> dict:
  """Per headline metric: A, B, B - A and its paired 95% interval and verdict.

  a, b: paired (pair()) predictions on the same examples.
  """
  resampler = bootstrap.Resampler(_strata(a), resamples, seed)
  whole = bootstrap.Whole(len(a.ids))
  point_a, point_b = values(a, whole), values(b, whole)
  diff = {k: v_b - v_a for (k, v_a), v_b in zip(values(a, resampler).items(),
                                               values(b, resampler).values())}
  metrics = {}
  for name, d in diff.items():
    ci = bootstrap.interval(d)
    va, vb = float(point_a[name][0]), float(point_b[name][0])
    metrics[name] = {"a": va if np.isfinite(va) else None, "b": vb if np.isfinite(vb) else None,
                     "difference": (vb - va) if np.isfinite(vb - va) else None,
                     "ci95": ci["ci95"], "resamples": ci["resamples"],
                     "verdict": verdict(ci["ci95"])}
  return {"num_examples": len(a.ids), "multilabel": a.multilabel,
          "bootstrap": bootstrap.describe(resampler, a.multilabel) | {
              "paired": "both runs scored on the same resampled examples"},
          "metrics": metrics}


def compare_files(path_a: str, path_b: str, resamples: int = bootstrap.RESAMPLES,
                  seed: int = bootstrap.SEED, name_a: str = "A", name_b: str = "B") -> dict:
  """paired() of two predictions.npz files, with where they came from."""
  a, b = pair(load_predictions(path_a), load_predictions(path_b), name_a, name_b)
  return {"a": path_a, "b": path_b} | paired(a, b, resamples, seed)


def _signed(x: Optional[float]) -> str:
  return "-" if x is None else f"{x:+.4f}"


def _plain(x: Optional[float]) -> str:
  return "-" if x is None else f"{x:.4f}"


def summary_line(result: dict, metric: str = DEFAULT_METRIC) -> str:
  """'macro_f1: B - A = +0.0123, 95% CI [-0.0201, +0.0412]: no significant difference'."""
  m = result["metrics"][metric]
  ci = m["ci95"]
  shown = "undefined" if ci is None else f"[{_signed(ci[0])}, {_signed(ci[1])}]"
  return f"{metric}: B - A = {_signed(m['difference'])}, 95% CI {shown}: {m['verdict']}"


def cell(result: dict, metric: str = DEFAULT_METRIC) -> str:
  """A table cell: '+0.0123 [-0.0201, +0.0412] ~' (>: B better, <: A better, ~: no difference)."""
  m = result["metrics"][metric]
  ci = m["ci95"]
  if ci is None:
    return "-"
  mark = {B_BETTER: ">", A_BETTER: "<", NO_DIFFERENCE: "~"}[m["verdict"]]
  return f"{_signed(m['difference'])} [{_signed(ci[0])}, {_signed(ci[1])}] {mark}"


def render(result: dict, metric: str = DEFAULT_METRIC) -> str:
  """compare.md."""
  boot = result["bootstrap"]
  lines = ["# Is B better than A?", "", f"- A: `{result['a']}`", f"- B: `{result['b']}`", "",
           f"{result['num_examples']} examples scored by both runs, paired by example id; "
           f"{boot['resamples']} bootstrap resamples stratified by {boot['stratified_by']} "
           f"(seed {boot['seed']}), each scoring both runs on the same examples.", "",
           f"**{summary_line(result, metric)}**", ""]
  rows = []
  for name, m in result["metrics"].items():
    ci = m["ci95"]
    shown = "-" if ci is None else f"[{_signed(ci[0])}, {_signed(ci[1])}]"
    rows.append([name, _plain(m["a"]), _plain(m["b"]), _signed(m["difference"]), shown,
                 m["verdict"]])
  lines += markdown.table(["metric", "A", "B", "B - A", "95% CI of B - A", "verdict"], rows)
  lines += ["How to read it: B - A is the difference on this split; the interval is where "
            "it would fall on 95% of test sets like this one. If the interval contains 0 the "
            "split cannot tell the runs apart (with a few hundred images, differences of a few "
            "points usually cannot be told apart); an interval above 0 says B is better beyond "
            "the noise of the test set (not of training: another seed of either run may move "
            "it).", ""]
  return "\n".join(lines)


def write(out_dir: str, result: dict, metric: str = DEFAULT_METRIC) -> tuple[str, str]:
  """OUT/compare.json and OUT/compare.md; returns their paths."""
  os.makedirs(out_dir, exist_ok=True)
  json_path, md_path = os.path.join(out_dir, "compare.json"), os.path.join(out_dir, "compare.md")
  with open(json_path, "w") as f:
    json.dump(result | {"metric": metric}, f, indent=2)
  with open(md_path, "w") as f:
    f.write(render(result, metric))
  return json_path, md_path
