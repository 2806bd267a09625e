"""k-fold cross-validation: train every fold of a dataset prepared with --folds, then report.

For a dataset prepared with `prepare --folds=K` (data/folds.py), fold k is
trained in WORKDIR/fold_k by the normal train loop with `data.fold=k` (fold k
is its val split, the other folds its train split; the test split, if any,
is the same held-out set for every fold). A fold whose cv_fold.json exists is
finished and reused; an interrupted one resumes from its last checkpoint.

After its training, each fold's best checkpoint predicts its val split (its
out-of-fold examples) and the test split; the numbers go to
WORKDIR/fold_k/cv_fold.json and the probabilities to fold_k/cv_predictions.npz.
Then WORKDIR gets:
  cv_report.md, cv_report.json  per-class precision/recall/F1 and macro-F1,
                                accuracy (multi-label: micro/macro-F1, exact
                                match) as mean +- std over the folds, on the
                                out-of-fold val examples and on the test split,
                                and each fold's numbers;
  oof_predictions.csv           the out-of-fold probabilities of every train+val
                                example (id, fold, label, predicted, one column
                                per class);
  oof_report/                   the usual evaluation report (reports/report.py)
                                over all out-of-fold predictions pooled.
Multi-label decisions use the threshold 0.5 for every label here (thresholds
tuned on a fold's val split would be fitted on the very examples scored).
"""

import csv
import json
import os
import time
from typing import Optional

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from vit_jax_ft import workdir as workdir_lib
from vit_jax_ft.data import digits
from vit_jax_ft.data import folds as folds_lib
from vit_jax_ft.data import tfrecords
from vit_jax_ft.reports import classification
from vit_jax_ft.reports import markdown
from vit_jax_ft.reports import multilabel
from vit_jax_ft.reports import report as report_lib
from vit_jax_ft.training import train

FOLD_DIR = "fold_{}"
FOLD_RESULTS = "cv_fold.json"
FOLD_PREDICTIONS = "cv_predictions.npz"
REPORT_MD, REPORT_JSON = "cv_report.md", "cv_report.json"
OOF_CSV = "oof_predictions.csv"
OOF_REPORT_DIR = "oof_report"
DEFAULT_DIGITS_FOLDS = 5
CHECKPOINT = "best"
STD_NOTE = "sample standard deviation over the folds (ddof=1)"


def fold_dir(workdir: str, k: int) -> str:
  return os.path.join(workdir, FOLD_DIR.format(k))


def fold_config(config: ml_collections.ConfigDict, k: int) -> ml_collections.ConfigDict:
  """The config of fold k's run: `config` with data.fold = k."""
  config = config.copy_and_resolve_references()
  config.data.fold = k
  return config


def resolve_data(config: ml_collections.ConfigDict, workdir: str,
                 num_folds: Optional[int]) -> tuple[ml_collections.ConfigDict, int]:
  """(config with data.dir set, K): checks the dataset has folds (prepares the demo's)."""
  if config.data.fold != -1:
    raise ValueError(f"config.data.fold={config.data.fold}: vit_jax_ft.cv sets data.fold for "
                     "each fold itself; leave it at -1 (to train one fold, use vit_jax_ft.main "
                     "with --config.data.fold=k).")
  if num_folds is not None and num_folds < 2:
    raise ValueError(f"--folds={num_folds}: cross-validation needs at least 2 folds.")
  config = config.copy_and_resolve_references()
  if config.data.source == "digits":
    config.data.dir = config.data.dir or os.path.join(workdir, "data")
    if jax.process_index() == 0:
      digits.prepare_digits(config.data.dir, seed=config.seed,
                            num_folds=num_folds or DEFAULT_DIGITS_FOLDS)
    multihost_utils.sync_global_devices("cv digits prepared")
  elif config.data.source != "tfrecord":
    raise ValueError(f"vit_jax_ft.cv needs a dataset prepared with "
                     f"`python -m vit_jax_ft.data.prepare ... --folds=K` (data.source='tfrecord'),"
                     f" or the digits demo; data.source={config.data.source!r} has no folds.")
  elif not config.data.dir:
    raise ValueError(f"config.data.dir is not set. {config.data.help}".strip())
  info = tfrecords.read_info(config.data.dir, config.data.help)
  k = folds_lib.num_folds(info)
  if not k:
    again = f": {info['command']} --folds=5" if info.get("command") else ""
    raise ValueError(f"The dataset {config.data.dir} was prepared without --folds (its "
                     f"{tfrecords.INFO_FILE} has no folds); prepare it again with --folds=K"
                     f"{again}")
  if num_folds is not None and num_folds != k:
    raise ValueError(f"--folds={num_folds}, but the dataset {config.data.dir} was prepared with "
                     f"--folds={k}; drop --folds (the dataset's folds are used) or prepare it "
                     f"again with --folds={num_folds}.")
  return config, k


def _check_finished_config(config: ml_collections.ConfigDict, directory: str, k: int) -> None:
  """Refuses to reuse a finished fold trained with another recipe."""
  changes = workdir_lib.config_changes(config, directory)
  if config.data.normalization == "auto":  # Recorded resolved ('auto' -> the weights' own).
    changes.pop("data.normalization", None)
  blocking = [f for f in changes if f not in workdir_lib.RESUMABLE_CHANGES]
  if blocking:
    listing = "; ".join(f"{f}: {changes[f][0]!r} -> {changes[f][1]!r}" for f in blocking)
    raise ValueError(f"Fold {k} in {directory} was trained with another config ({listing}); "
                     "use a new --workdir for a new experiment.")


def split_metrics(preds: workdir_lib.Predictions, class_names: list[str], multi: bool) -> dict:
  """{'summary': {metric: value}, 'per_class': {class: {metric: value}}} of one split."""
  if multi:
    at = multilabel.metrics_at(preds.probs, preds.targets > 0.5,
                               np.full(len(class_names), multilabel.DEFAULT_THRESHOLD),
                               class_names)
    summary = {"micro_f1": at["micro"]["f1-score"], "macro_f1": at["macro"]["f1-score"],
               "macro_precision": at["macro"]["precision"],
               "macro_recall": at["macro"]["recall"], "exact_match": at["exact_match"]}
    rows = at["per_label"]
  else:
    cr = classification.classification_report(preds.labels, preds.probs.argmax(axis=1),
                                              class_names)
    summary = {"accuracy": cr["accuracy"], "macro_f1": cr["macro avg"]["f1-score"],
               "macro_precision": cr["macro avg"]["precision"],
               "macro_recall": cr["macro avg"]["recall"],
               "weighted_f1": cr["weighted avg"]["f1-score"]}
    rows = {n: cr[n] for n in class_names if n in cr}  # Absent classes: no row.
  per_class = {n: {"precision": float(r["precision"]), "recall": float(r["recall"]),
                   "f1": float(r["f1-score"]), "support": int(r["support"])}
               for n, r in rows.items()}
  return {"num_examples": int(len(preds.probs)),
          "summary": {k: float(v) for k, v in summary.items()}, "per_class": per_class}


def _save_predictions(path: str, splits: dict) -> None:
  arrays = {}
  for split, preds in splits.items():
    arrays |= {f"{split}_probs": preds.probs, f"{split}_targets": preds.targets,
               f"{split}_ids": np.asarray(preds.ids, dtype=str)}
  tmp = path + ".tmp.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def load_predictions(directory: str, split: str) -> Optional[workdir_lib.Predictions]:
  """A finished fold's predictions of 'val' (its out-of-fold examples) or 'test'."""
  with np.load(os.path.join(directory, FOLD_PREDICTIONS), allow_pickle=False) as z:
    if f"{split}_probs" not in z:
      return None
    return workdir_lib.Predictions(probs=z[f"{split}_probs"], targets=z[f"{split}_targets"],
                                   ids=[str(i) for i in z[f"{split}_ids"]])


def evaluate_fold(directory: str, k: int) -> dict:
  """Predicts fold k's val and test splits with its best checkpoint; writes its results."""
  run = workdir_lib.load_run(directory)
  ck = workdir_lib.restore(directory, CHECKPOINT)
  data = run.config.data
  splits = {"val": workdir_lib.predict_split(run, ck, data.val_split)}
  if data.test_split and data.test_split in run.info["splits"]:
    splits["test"] = workdir_lib.predict_split(run, ck, data.test_split)
  results = {"fold": k, "checkpoint": CHECKPOINT, "step": ck.step, "weights": ck.weights,
             "model": run.config.model.name, "class_names": run.class_names,
             "multilabel": run.multilabel}
  results |= {split: split_metrics(p, run.class_names, run.multilabel)
              for split, p in splits.items()}
  _save_predictions(os.path.join(directory, FOLD_PREDICTIONS), splits)
  with open(os.path.join(directory, FOLD_RESULTS + ".tmp"), "w") as f:
    json.dump(results, f, indent=2)
  os.replace(os.path.join(directory, FOLD_RESULTS + ".tmp"),
             os.path.join(directory, FOLD_RESULTS))  # Last: marks the fold finished.
  return results


def _finished(directory: str) -> bool:
  return all(os.path.exists(os.path.join(directory, f)) for f in (FOLD_RESULTS, FOLD_PREDICTIONS))


def _stats(values: list) -> dict:
  v = np.asarray([np.nan if x is None else x for x in values], np.float64)
  present = v[~np.isnan(v)]
  return {"mean": float(present.mean()) if len(present) else None,
          "std": float(present.std(ddof=1)) if len(present) > 1 else None,
          "values": [None if np.isnan(x) else float(x) for x in v]}


def aggregate(fold_results: list[dict], split: str) -> Optional[dict]:
  """Mean and std over folds of each summary metric and per-class metric of `split`.

  A class with no row in a fold (neither examples nor predictions there) is
  left out of that fold's values (None).
  """
  if not all(split in r for r in fold_results):
    return None
  names = fold_results[0]["class_names"]
  metrics = list(fold_results[0][split]["summary"])
  out = {"summary": {m: _stats([r[split]["summary"][m] for r in fold_results]) for m in metrics},
         "per_class": {}}
  for name in names:
    rows = [r[split]["per_class"].get(name) for r in fold_results]
    out["per_class"][name] = {m: _stats([row[m] if row else None for row in rows])
                              for m in ("precision", "recall", "f1")}
    out["per_class"][name]["support"] = int(sum(row["support"] for row in rows if row))
  return out


def pooled(directory_of: list[str], split: str) -> tuple[workdir_lib.Predictions, list[int]]:
  """The folds' predictions of `split` concatenated, and the fold of each row."""
  parts = [load_predictions(d, split) for d in directory_of]
  fold = [k for k, p in enumerate(parts) for _ in p.ids]
  return workdir_lib.Predictions(
      probs=np.concatenate([p.probs for p in parts]),
      targets=np.concatenate([p.targets for p in parts]),
      ids=[i for p in parts for i in p.ids]), fold


def write_oof_csv(path: str, preds: workdir_lib.Predictions, fold: list[int],
                  class_names: list[str], multi: bool) -> None:
  """id, fold, label, predicted, then each class's probability (prob_<class>)."""
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["id", "fold", "label", "predicted"] + [f"prob_{n}" for n in class_names])
    for i, (example_id, k) in enumerate(zip(preds.ids, fold)):
      probs, truth = preds.probs[i], preds.targets[i] > 0.5
      if multi:
        label = ";".join(n for n, t in zip(class_names, truth) if t)
        predicted = ";".join(n for n, p in zip(class_names, probs)
                             if p >= multilabel.DEFAULT_THRESHOLD)
      else:
        label, predicted = class_names[int(truth.argmax())], class_names[int(probs.argmax())]
      writer.writerow([example_id, k, label, predicted] + [repr(float(p)) for p in probs])


def write_oof_report(out_dir: str, preds: workdir_lib.Predictions, class_names: list[str],
                     multi: bool, workdir: str, model: str, num_folds: int,
                     options: Optional[report_lib.Options] = None) -> dict:
  """The usual evaluation report (report.md, report.json, PNGs) of the pooled OOF predictions.

  `options` (default: the report defaults) carries e.g. the run's bootstrap settings.
  """
  os.makedirs(out_dir, exist_ok=True)
  options = options or report_lib.Options()
  if multi:
    body = report_lib.multi_label(
        preds, class_names, options, np.full(len(class_names), multilabel.DEFAULT_THRESHOLD),
        "0.5 for every label (thresholds tuned on a fold's val split would be fitted on the "
        "examples scored here)")
  else:
    body = report_lib.single_label(preds, class_names, options)
  split = f"out-of-fold (train+val, {num_folds} folds)"
  report = {"workdir": os.path.abspath(workdir), "split": split,
            "checkpoint": {"label": f"{CHECKPOINT} of each fold", "step": "per fold",
                           "path": "", "weights": "per fold"},
            "model": model, "multilabel": multi, "class_names": class_names,
            "tta": {"mode": "none"}, "temperature_scaling": None} | body
  headline = report_lib.headline(report, multi)
  files = report_lib.write_pngs(out_dir, preds, report, class_names, split)
  report |= {"headline": headline, "files": files}
  with open(os.path.join(out_dir, "report.json"), "w") as f:
    json.dump(report, f, indent=2)
  with open(os.path.join(out_dir, "report.md"), "w") as f:
    f.write(markdown.render(report, files, headline))
  return headline


def _fmt(stat: Optional[dict]) -> str:
  if not stat or stat["mean"] is None:
    return "-"
  return f"{stat['mean']:.4f} ± {stat['std']:.4f}" if stat["std"] is not None else \
      f"{stat['mean']:.4f}"


def render(report: dict) -> str:
  """cv_report.md."""
  k, names = report["num_folds"], report["class_names"]
  val, test = report["val"], report.get("test")
  lines = [f"# {k}-fold cross-validation", "",
           f"Workdir `{report['workdir']}`, dataset `{report['data_dir']}`, model "
           f"`{report['model']}`, {len(names)} "
           f"{'labels (multi-label, threshold 0.5)' if report['multilabel'] else 'classes'}. "
           f"Fold k's run (`fold_k/`) trained on the other folds; its {CHECKPOINT} checkpoint "
           "(by val) scored fold k (out-of-fold, *val* below) and the held-out test split. "
           f"Values are mean ± {STD_NOTE}.", ""]
  header = ["metric", "val (out-of-fold), mean ± std"]
  header += ["test, mean ± std"] if test else []
  header += ["pooled out-of-fold"]
  rows = []
  oof = report["oof"]["headline"]
  for m, stat in val["summary"].items():
    row = [m, _fmt(stat)] + ([_fmt(test["summary"].get(m))] if test else [])
    rows.append(row + [f"{oof[m]:.4f}" if m in oof else "-"])
  lines += ["## Summary", ""] + markdown.table(header, rows)
  for split, agg in (("val (out-of-fold)", val), ("test", test)):
    if not agg:
      continue
    rows = [[n, _fmt(c["precision"]), _fmt(c["recall"]), _fmt(c["f1"]), c["support"]]
            for n, c in agg["per_class"].items()]
    lines += [f"## Per class, {split}", "",
              "Support: examples over all folds" + (" (the test split once per fold)"
                                                    if split == "test" else "") + ".", ""]
    lines += markdown.table(["class", "precision", "recall", "F1", "support"], rows)
  metric = "macro_f1"
  rows = [[r["fold"], r["step"], r["val"]["num_examples"], f"{r['val']['summary'][metric]:.4f}"]
          + ([f"{r['test']['summary'][metric]:.4f}"] if "test" in r else [])
          + [f"`{FOLD_DIR.format(r['fold'])}/`"] for r in report["folds"]]
  header = ["fold", "best step", "val examples", f"val {metric}"]
  header += [f"test {metric}"] if test else []
  lines += ["## Folds", ""] + markdown.table(header + ["run"], rows)
  lines += ["## Out-of-fold predictions", "",
            f"`{OOF_CSV}` holds the out-of-fold probabilities of all "
            f"{report['oof']['num_examples']} train+val examples (each scored once, by the fold "
            f"that did not train on it); `{OOF_REPORT_DIR}/report.md` is the evaluation report "
            "over them pooled (confusion matrix, PR/ROC curves, calibration).", ""]
  return "\n".join(lines)


def write_report(workdir: str, config: ml_collections.ConfigDict, num_folds: int) -> dict:
  """Aggregates the finished folds into cv_report.{md,json}, oof_predictions.csv, oof_report/."""
  dirs = [fold_dir(workdir, k) for k in range(num_folds)]
  fold_results = []
  for d in dirs:
    with open(os.path.join(d, FOLD_RESULTS)) as f:
      fold_results.append(json.load(f))
  names, multi = fold_results[0]["class_names"], fold_results[0]["multilabel"]
  oof, fold_of = pooled(dirs, "val")
  if len(set(oof.ids)) != len(oof.ids):
    raise ValueError(f"Out-of-fold ids repeat across the folds of {workdir}: the folds' val "
                     "splits overlap; were the folds trained on different datasets?")
  write_oof_csv(os.path.join(workdir, OOF_CSV), oof, fold_of, names, multi)
  headline = write_oof_report(os.path.join(workdir, OOF_REPORT_DIR), oof, names, multi, workdir,
                              fold_results[0]["model"], num_folds,
                              report_lib.Options(bootstrap_resamples=config.bootstrap_resamples,
                                                 bootstrap_seed=config.bootstrap_seed))
  report = {"num_folds": num_folds, "workdir": os.path.abspath(workdir),
            "data_dir": os.path.abspath(config.data.dir), "model": fold_results[0]["model"],
            "class_names": names, "multilabel": multi, "checkpoint": CHECKPOINT,
            "std": STD_NOTE, "val": aggregate(fold_results, "val"),
            "test": aggregate(fold_results, "test"),
            "oof": {"num_examples": len(oof.ids), "headline": headline,
                    "predictions": OOF_CSV, "report": f"{OOF_REPORT_DIR}/report.md"},
            "folds": fold_results}
  with open(os.path.join(workdir, REPORT_JSON), "w") as f:
    json.dump(report, f, indent=2)
  with open(os.path.join(workdir, REPORT_MD), "w") as f:
    f.write(render(report))
  return report


def run_cv(config: ml_collections.ConfigDict, workdir: str,
           num_folds: Optional[int] = None) -> dict:
  """Trains (or reuses, or resumes) every fold, then writes the aggregate report."""
  os.makedirs(workdir, exist_ok=True)
  with workdir_lib.lock(workdir):
    config, k = resolve_data(config, workdir, num_folds)
    logging.info("Cross-validation over the %d folds of %s in %s.", k, config.data.dir, workdir)
    trained_seconds, trained = 0.0, 0
    for fold in range(k):
      directory, cfg = fold_dir(workdir, fold), fold_config(config, fold)
      if _finished(directory):
        _check_finished_config(cfg, directory, fold)
        logging.info("Fold %d/%d: finished (%s exists): reused, not trained again.", fold + 1,
                     k, os.path.join(directory, FOLD_RESULTS))
        continue
      start = time.time()
      if os.path.exists(os.path.join(directory, "eval_results.json")):
        _check_finished_config(cfg, directory, fold)
        logging.info("Fold %d/%d: trained already; predicting its out-of-fold examples.",
                     fold + 1, k)
      else:
        logging.info("Fold %d/%d: training in %s (data.fold=%d).", fold + 1, k, directory, fold)
        train.train_and_evaluate(cfg, directory)
        trained += 1
      if jax.process_index() == 0:
        evaluate_fold(directory, fold)
      trained_seconds += time.time() - start
      left = sum(not _finished(fold_dir(workdir, j)) for j in range(fold + 1, k))
      eta = trained_seconds / max(trained, 1) * left
      logging.info("Fold %d/%d done in %.0f s; %d fold(s) left, ETA %.0f min.", fold + 1, k,
                   time.time() - start, left, eta / 60)
    if jax.process_index() != 0:
      return {}
    report = write_report(workdir, config, k)
  val = report["val"]["summary"]
  logging.info("Cross-validation (%d folds): %s. Report: %s", k,
               ", ".join(f"{m}={_fmt(s)}" for m, s in val.items()),
               os.path.join(workdir, REPORT_MD))
  return report
