"""k-fold cross-validation (`python -m vit_jax_ft.cv`, training/cv.py) on the digits demo."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from vit_jax_ft import workdir as workdir_lib
from vit_jax_ft.data import digits
from vit_jax_ft.training import cv
from vit_jax_ft.training import train

import test_train  # pylint: disable=g-bad-import-order

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDS = 3


def tiny_cv_config(**overrides):
  return test_train.tiny_demo_config(**{
      "total_steps": 4, "eval_every_steps": 4, "checkpoint_every_steps": 4,
      "log_every_steps": 2, "model.num_layers": 1} | overrides)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A 3-fold cross-validation of the tiny demo model, 4 steps per fold, and its report."""
  workdir = str(tmp_path_factory.mktemp("cv") / "cv")
  # Not the default resamples: the OOF report must take the run's bootstrap settings.
  report = cv.run_cv(tiny_cv_config(bootstrap_resamples=200, bootstrap_seed=3), workdir,
                     num_folds=FOLDS)
  return workdir, report


def _fold_results(workdir):
  out = []
  for k in range(FOLDS):
    with open(os.path.join(workdir, f"fold_{k}", cv.FOLD_RESULTS)) as f:
      out.append(json.load(f))
  return out


def test_report_is_mean_and_std_over_the_folds(finished):
  workdir, report = finished
  with open(os.path.join(workdir, cv.REPORT_JSON)) as f:
    assert json.load(f) == json.loads(json.dumps(report))
  folds = _fold_results(workdir)
  assert report["num_folds"] == FOLDS and [r["fold"] for r in folds] == [0, 1, 2]
  for split in ("val", "test"):
    for metric in ("accuracy", "macro_f1"):
      values = [r[split]["summary"][metric] for r in folds]
      stat = report[split]["summary"][metric]
      assert stat["values"] == pytest.approx(values)
      assert stat["mean"] == pytest.approx(np.mean(values))
      assert stat["std"] == pytest.approx(np.std(values, ddof=1))
    for name in ("0", "7"):
      rows = [r[split]["per_class"][name] for r in folds]
      for metric in ("precision", "recall", "f1"):
        assert report[split]["per_class"][name][metric]["mean"] == pytest.approx(
            np.mean([row[metric] for row in rows]))
        assert report[split]["per_class"][name][metric]["std"] == pytest.approx(
            np.std([row[metric] for row in rows], ddof=1))
      assert report[split]["per_class"][name]["support"] == sum(row["support"] for row in rows)
  md = open(os.path.join(workdir, cv.REPORT_MD)).read()
  stat = report["val"]["summary"]["macro_f1"]
  assert f"| macro_f1 | {stat['mean']:.4f} ± {stat['std']:.4f} |" in md
  assert "## Per class, val (out-of-fold)" in md and "## Per class, test" in md
  # The test split is the same held-out set for every fold.
  assert {r["test"]["num_examples"] for r in folds} == {180}


def test_oof_predictions_cover_every_train_example_once(finished):
  workdir, report = finished
  info = digits.prepare_digits(os.path.join(workdir, "data"))
  with open(os.path.join(workdir, cv.OOF_CSV)) as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 1797 - 180 == report["oof"]["num_examples"]
  assert len({r["id"] for r in rows}) == len(rows)
  for k, entry in enumerate(info["folds"]["folds"]):
    assert sum(r["fold"] == str(k) for r in rows) == entry["num_examples"]
  probs = np.asarray([[float(r[f"prob_{c}"]) for c in range(10)] for r in rows])
  np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
  assert all(r["predicted"] == str(int(p.argmax())) for r, p in zip(rows, probs))
  labels = [int(r["label"]) for r in rows]
  oof_accuracy = np.mean(probs.argmax(axis=1) == labels)
  with open(os.path.join(workdir, cv.OOF_REPORT_DIR, "report.json")) as f:
    oof_report = json.load(f)
  assert oof_report["num_examples"] == len(rows)
  assert oof_report["headline"]["accuracy"] == pytest.approx(oof_accuracy)
  assert (oof_report["bootstrap"]["resamples"], oof_report["bootstrap"]["seed"]) == (200, 3)
  lo, hi = oof_report["intervals"]["accuracy"]["ci95"]
  assert lo <= oof_accuracy <= hi
  assert os.path.exists(os.path.join(workdir, cv.OOF_REPORT_DIR, "report.md"))
  assert os.path.exists(os.path.join(workdir, cv.OOF_REPORT_DIR, "confusion_matrix.png"))


def test_rerun_reuses_finished_folds_and_resumes_an_interrupted_one(finished, monkeypatch):
  workdir, report = finished
  calls = []
  real = train.train_and_evaluate

  def counting(config, directory):
    calls.append((config.data.fold, directory))
    return real(config, directory)

  monkeypatch.setattr(train, "train_and_evaluate", counting)
  stamps = {k: os.path.getmtime(os.path.join(workdir, f"fold_{k}", cv.FOLD_RESULTS))
            for k in range(FOLDS)}
  again = cv.run_cv(tiny_cv_config(), workdir)  # K read from the dataset.
  assert calls == []  # Nothing trained again.
  assert stamps == {k: os.path.getmtime(os.path.join(workdir, f"fold_{k}", cv.FOLD_RESULTS))
                    for k in range(FOLDS)}
  assert again["val"] == report["val"]
  # Fold 1 killed in its final evaluation (last checkpoint saved, no results): the train loop
  # finds it complete and only evaluates (no step trained again).
  fold1 = os.path.join(workdir, "fold_1")
  for name in (cv.FOLD_RESULTS, "eval_results.json"):
    os.remove(os.path.join(fold1, name))
  again = cv.run_cv(tiny_cv_config(), workdir, num_folds=FOLDS)
  assert calls == [(1, fold1)]
  assert again["val"]["summary"] == report["val"]["summary"]
  with open(os.path.join(fold1, "eval_results.json")) as f:
    assert json.load(f)["step"] == 4


def test_errors(finished, tmp_path):
  workdir, _ = finished
  with pytest.raises(ValueError, match=r"--folds=4, but the dataset .* was prepared with "
                     r"--folds=3"):
    cv.run_cv(tiny_cv_config(), workdir, num_folds=4)
  with pytest.raises(ValueError, match=r"data.fold=1: vit_jax_ft.cv sets data.fold"):
    cv.run_cv(tiny_cv_config(**{"data.fold": 1}), str(tmp_path / "x"))
  with pytest.raises(ValueError, match=r"Fold 0 in .*fold_0 was trained with another config "
                     r"\(optimizer.lr: 0.001 -> 0.5\)"):
    cv.run_cv(tiny_cv_config(**{"optimizer.lr": 0.5}), workdir)
  plain = str(tmp_path / "plain")
  digits.prepare_digits(plain)
  with pytest.raises(ValueError, match=r"The dataset .*plain was prepared without --folds"):
    cv.run_cv(tiny_cv_config(**{"data.source": "tfrecord", "data.dir": plain}),
              str(tmp_path / "y"))


def test_command_line_one_line_error(finished):
  workdir, _ = finished
  proc = subprocess.run(
      [sys.executable, "-m", "vit_jax_ft.cv", "--config=configs/demo.py", f"--workdir={workdir}",
       "--folds=4"], cwd=REPO, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert "error: --folds=4, but the dataset" in proc.stderr
  assert "Traceback" not in proc.stderr


def test_multilabel_metrics_csv_and_oof_report(tmp_path):
  """Multi-label folds, from synthetic predictions (threshold 0.5 throughout)."""
  names = ["red", "shirt", "dress"]
  rng = np.random.default_rng(0)
  targets = (rng.random((40, 3)) < 0.4).astype(np.float32)
  probs = np.clip(targets * 0.7 + rng.random((40, 3)) * 0.4, 0, 1)
  preds = workdir_lib.Predictions(probs=probs, targets=targets,
                                     ids=[f"x{i}" for i in range(40)])
  metrics = cv.split_metrics(preds, names, True)
  decided = probs >= 0.5
  assert metrics["summary"]["exact_match"] == pytest.approx(
      np.mean((decided == (targets > 0.5)).all(axis=1)))
  tp = (decided & (targets > 0.5)).sum(axis=0)
  assert metrics["per_class"]["red"]["recall"] == pytest.approx(tp[0] / targets[:, 0].sum())
  path = tmp_path / "oof.csv"
  cv.write_oof_csv(str(path), preds, [i % 2 for i in range(40)], names, True)
  rows = list(csv.DictReader(open(path)))
  assert rows[0]["label"] == ";".join(n for n, t in zip(names, targets[0]) if t)
  assert rows[0]["predicted"] == ";".join(n for n, d in zip(names, decided[0]) if d)
  headline = cv.write_oof_report(str(tmp_path / "oof"), preds, names, True, str(tmp_path),
                                 "vit", 2)
  assert headline["macro_f1_at_0.5"] == pytest.approx(metrics["summary"]["macro_f1"])
  assert os.path.exists(tmp_path / "oof" / "report.md")
  folds = [{"fold": k, "class_names": names, "val": cv.split_metrics(
      workdir_lib.Predictions(probs=probs[k::2], targets=targets[k::2], ids=[]), names, True)}
           for k in range(2)]
  agg = cv.aggregate(folds, "val")
  f1 = [f["val"]["summary"]["micro_f1"] for f in folds]
  assert agg["summary"]["micro_f1"]["std"] == pytest.approx(np.std(f1, ddof=1))
  assert cv.aggregate(folds, "test") is None


def test_ham10000_sample_five_folds_end_to_end(shared_data, tmp_path):
  """prepare --folds=5 --group_column=lesion_id on the HAM10000 sample, then the CV command."""
  from vit_jax_ft.data import builder  # pylint: disable=g-import-not-at-top
  from vit_jax_ft.data import images  # pylint: disable=g-import-not-at-top
  from vit_jax_ft.data import sources  # pylint: disable=g-import-not-at-top
  table = os.path.join(shared_data, "ham10000_sample", "HAM10000_metadata_sample.csv")
  data = tmp_path / "ham"
  builder.build(builder.Options(
      source=table, out_dir=str(data), folds=5, num_workers=1,
      image=images.ImageOptions(max_side=48),
      table=sources.TableOptions(columns=sources.TableColumns(
          id="image_id", label="dx", group="lesion_id"))))
  config = tiny_cv_config(**{"data.source": "tfrecord", "data.dir": str(data),
                             "total_steps": 2, "optimizer.warmup_steps": 1, "batch_size": 8,
                             "eval_batch_size": 16,
                             "eval_every_steps": 2, "checkpoint_every_steps": 2})
  report = cv.run_cv(config, str(tmp_path / "cv"), num_folds=5)
  assert report["num_folds"] == 5 and len(report["folds"]) == 5
  assert report["oof"]["num_examples"] == 63  # 70 images, 7 held out for test.
  assert set(report["val"]["per_class"]) == {"akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"}
  with open(os.path.join(tmp_path, "cv", cv.OOF_CSV)) as f:
    rows = list(csv.DictReader(f))
  assert len({r["id"] for r in rows}) == 63
  assert os.path.exists(tmp_path / "cv" / cv.REPORT_MD)


def test_a_fold_killed_mid_training_resumes_from_its_checkpoint(tmp_path, monkeypatch):
  from vit_jax_ft.inputs import pipeline  # pylint: disable=g-import-not-at-top
  real = pipeline.train_iterator
  starts = []

  def killed_in_fold_1(cfg, *args, **kwargs):
    starts.append((cfg.fold, kwargs["start_step"]))
    for i, batch in enumerate(real(cfg, *args, **kwargs)):
      if cfg.fold == 1 and kwargs["start_step"] == 0 and i == 5:  # After the step-4 checkpoint.
        raise KeyboardInterrupt("simulated kill")
      yield batch

  monkeypatch.setattr(pipeline, "train_iterator", killed_in_fold_1)
  config = tiny_cv_config(total_steps=8)
  workdir = str(tmp_path / "cv")
  # Fold 0 trained beforehand by the train entry point (as `main --config.data.fold=0` would).
  digits.prepare_digits(os.path.join(workdir, "data"), num_folds=2)
  fold0 = cv.fold_config(config, 0)
  fold0.data.dir = os.path.join(workdir, "data")
  train.train_and_evaluate(fold0, os.path.join(workdir, "fold_0"))
  with pytest.raises(KeyboardInterrupt):
    cv.run_cv(config, workdir, num_folds=2)
  assert os.path.exists(os.path.join(workdir, "fold_0", cv.FOLD_RESULTS))  # Picked up, scored.
  assert not os.path.exists(os.path.join(workdir, "fold_1", cv.FOLD_RESULTS))
  assert not os.path.exists(os.path.join(workdir, cv.REPORT_JSON))
  report = cv.run_cv(config, workdir)
  # Fold 0 trained once (outside cv, then only scored); fold 1 went on from step 4.
  assert starts == [(0, 0), (1, 0), (1, 4)]
  assert [r["fold"] for r in report["folds"]] == [0, 1]
  with open(os.path.join(workdir, "fold_1", "eval_results.json")) as f:
    assert json.load(f)["step"] == 8
