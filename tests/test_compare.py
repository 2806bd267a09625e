"""Paired bootstrap comparisons: reports/compare.py, the compare tool, sweep's column."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from sklearn import metrics as skm

from vit_jax_ft import compare as compare_tool
from vit_jax_ft import sweep
from vit_jax_ft.reports import bootstrap
from vit_jax_ft.reports import compare
from vit_jax_ft.training import train

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_train import tiny_demo_config  # pylint: disable=g-import-not-at-top,wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ["a", "b", "c"]


def _labels(n=240, seed=0):
  return np.random.default_rng(seed).choice(3, size=n, p=[0.5, 0.3, 0.2])


def _probs(labels, skill, seed):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(len(labels), 3))
  logits[np.arange(len(labels)), labels] += skill
  return np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)


def _saved(labels, probs, ids=None):
  ids = np.array([f"img_{i:04d}" for i in range(len(labels))]) if ids is None else ids
  return compare.Saved(ids=np.asarray(ids), targets=np.eye(3, dtype=bool)[labels], probs=probs,
                       predicted=np.eye(3, dtype=bool)[probs.argmax(1)], class_names=NAMES,
                       multilabel=False)


def _save(path, s):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  compare.save_predictions(path, s.ids, s.targets, s.probs, s.predicted, s.class_names,
                           s.multilabel)
  return path


def test_identical_runs_differ_by_exactly_zero():
  labels = _labels()
  a = _saved(labels, _probs(labels, 1.0, 1))
  result = compare.paired(*compare.pair(a, a), resamples=300)
  for name, m in result["metrics"].items():
    assert m["difference"] == 0.0 and m["ci95"] == [0.0, 0.0], name
    assert m["verdict"] == compare.NO_DIFFERENCE and m["resamples"] == 300
  assert "no significant difference" in compare.summary_line(result)


def test_perfect_beats_random_and_the_order_of_b_does_not_matter():
  labels = _labels()
  random = _saved(labels, _probs(labels, 0.0, 2))
  perfect = _saved(labels, np.eye(3)[labels] * 0.9 + 0.1 / 3)
  result = compare.paired(*compare.pair(random, perfect), resamples=300)
  for m in result["metrics"].values():
    assert m["verdict"] == compare.B_BETTER and m["ci95"][0] > 0
  assert compare.paired(*compare.pair(perfect, random), resamples=300)["metrics"][
      "macro_f1"]["verdict"] == compare.A_BETTER
  # B's examples stored in another order: paired by id, the same answer.
  order = np.random.default_rng(0).permutation(len(labels))
  shuffled = compare.Saved(ids=perfect.ids[order], targets=perfect.targets[order],
                           probs=perfect.probs[order], predicted=perfect.predicted[order],
                           class_names=NAMES, multilabel=False)
  again = compare.paired(*compare.pair(random, shuffled), resamples=300)
  assert again["metrics"] == result["metrics"]


def test_paired_interval_equals_a_direct_numpy_bootstrap():
  labels = _labels(seed=3)
  a = _saved(labels, _probs(labels, 0.8, 4))
  b = _saved(labels, _probs(labels, 1.2, 5))
  result = compare.paired(a, b, resamples=200, seed=7)
  idx = bootstrap.Resampler(labels, 200, 7).indices()
  pa, pb = a.probs.argmax(1), b.probs.argmax(1)
  diffs = []
  for row in idx:  # The same resampled examples score both runs.
    f1 = lambda p: skm.f1_score(labels[row], p[row], average="macro", zero_division=0,
                                labels=np.unique(np.r_[labels[row], p[row]]))
    diffs.append(f1(pb) - f1(pa))
  m = result["metrics"]["macro_f1"]
  assert m["ci95"] == pytest.approx(list(np.percentile(diffs, [2.5, 97.5])), abs=1e-12)
  assert m["difference"] == pytest.approx(
      skm.f1_score(labels, pb, average="macro") - skm.f1_score(labels, pa, average="macro"))
  assert m["verdict"] == compare.verdict(m["ci95"])


def test_multi_label_runs_compare_by_their_saved_decisions():
  rng = np.random.default_rng(0)
  truth = rng.random((150, 3)) < [0.5, 0.2, 0.1]
  probs = np.clip(truth * 0.4 + rng.random((150, 3)) * 0.6, 0, 1)
  ids = np.array([str(i) for i in range(150)])
  a = compare.Saved(ids, truth, probs, probs >= 0.5, NAMES, True)
  b = compare.Saved(ids, truth, probs, truth.copy(), NAMES, True)  # Perfect decisions.
  result = compare.paired(a, b, resamples=200)
  assert set(result["metrics"]) == {"micro_f1", "macro_f1", "exact_match", "macro_roc_auc"}
  assert result["metrics"]["micro_f1"]["verdict"] == compare.B_BETTER
  assert result["metrics"]["macro_roc_auc"]["ci95"] == [0.0, 0.0]  # Same probabilities.


def test_tool_writes_tables_and_refuses_other_examples(tmp_path, capsys):
  labels = _labels()
  run_a, run_b, run_c = (str(tmp_path / n) for n in ("seed0", "seed1", "other"))
  _save(os.path.join(run_a, "reports", "test_best", compare.PREDICTIONS_FILE),
        _saved(labels, _probs(labels, 1.0, 1)))
  _save(os.path.join(run_b, "reports", "test_best", compare.PREDICTIONS_FILE),
        _saved(labels, _probs(labels, 1.0, 2)))
  result = compare_tool.run(run_a, run_b, resamples=200)
  out = os.path.join(run_b, "reports", "compare_test_best_vs_seed0")
  with open(os.path.join(out, "compare.json")) as f:
    assert json.load(f)["metrics"] == result["metrics"]
  md = open(os.path.join(out, "compare.md")).read()
  assert "| macro_f1 |" in md and "95% CI of B - A" in md
  assert "macro_f1: B - A = " in capsys.readouterr().out

  other = _saved(labels, _probs(labels, 1.0, 2),
                 ids=np.array([f"img_{i:04d}" for i in range(1, len(labels) + 1)]))
  _save(os.path.join(run_c, "reports", "test_best", compare.PREDICTIONS_FILE), other)
  with pytest.raises(ValueError) as e:
    compare_tool.run(run_a, run_c, resamples=10)
  message = str(e.value)
  assert "\n" not in message and run_a in message and run_c in message
  assert "1 ids only in RUN_A" in message and "'img_0000'" in message
  with pytest.raises(FileNotFoundError, match="python -m vit_jax_ft.evaluate --workdir="):
    compare_tool.run(run_a, run_b, split="val")
  with pytest.raises(ValueError, match="--metric='f2'"):
    compare_tool.run(run_a, run_b, metric="f2", resamples=10)


def test_sweep_table_has_the_paired_difference_from_the_first_run(tmp_path):
  runs = sweep.plan(sweep.parse_assignments("seed=0,1,2", "grid"), str(tmp_path))
  labels = _labels()
  for run, probs in zip(runs, (_probs(labels, 1.0, 1), _probs(labels, 1.0, 2),
                               np.eye(3)[labels] * 0.9 + 0.1 / 3)):
    _save(os.path.join(run.workdir, "reports", "test_best", compare.PREDICTIONS_FILE),
          _saved(labels, probs))
    with open(os.path.join(run.workdir, sweep.RESULTS_FILE), "w") as f:
      json.dump({"step": 1, "test_accuracy": 0.5}, f)
  header, rows = sweep.table_rows(runs, {}, ["test_accuracy"])
  col = header.index("test_macro_f1 - seed=0 (95% CI)")
  assert rows[0][col] == "baseline"
  assert rows[1][col].endswith(" ~") or rows[1][col].endswith(" >") or rows[1][col].endswith(" <")
  assert rows[2][col].endswith(" >")  # Perfect predictions: better beyond the noise.
  _, md_path = sweep.write_tables(str(tmp_path), header, rows, ["test_accuracy"])
  assert "'>' better beyond the noise" in open(md_path).read()


def test_two_seeds_of_the_demo_show_no_significant_difference(tmp_path):
  """The tiny demo trained twice, seeds 0 and 1: reports with intervals, then `compare`.

  The demo splits the digits with the run's seed, so both runs share one prepared
  copy (data.dir): otherwise their test sets differ and compare refuses them. 400
  steps (~45 s each on 2 cores) bring both to ~93-94%: runs stopped half-way
  (12 or 80 steps, 50-80%) really do differ by seed, and compare says so.
  """
  workdirs = []
  for seed in (0, 1):
    workdir = str(tmp_path / f"seed{seed}")
    train.train_and_evaluate(tiny_demo_config(**{
        "seed": seed, "total_steps": 400, "batch_size": 64, "optimizer.warmup_steps": 20,
        "log_every_steps": 50, "eval_every_steps": 200, "checkpoint_every_steps": 200,
        "final_report": True, "bootstrap_resamples": 200,
        "data.dir": str(tmp_path / "digits")}), workdir)
    workdirs.append(workdir)
  report_dir = os.path.join(workdirs[0], "reports", "test_best")
  md = open(os.path.join(report_dir, "report.md")).read()
  assert "| accuracy | " in md and "Brackets: 95% confidence intervals" in md
  with open(os.path.join(report_dir, "report.json")) as f:
    report = json.load(f)
  lo, hi = report["intervals"]["accuracy"]["ci95"]
  assert lo <= report["classification_report"]["accuracy"] <= hi
  assert report["bootstrap"]["resamples"] == 200
  assert len(report["classification_report"]["accuracy_ci95"]) == 2

  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "vit_jax_ft.compare", *workdirs,
                         "--resamples=500"], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr
  assert "macro_f1: B - A = " in proc.stdout
  assert "no significant difference" in proc.stdout.split("macro_f1: B - A = ")[1].splitlines()[0]
