"""Bootstrap confidence intervals (reports/bootstrap.py) against a direct numpy/sklearn loop."""

import time

import numpy as np
import pytest
from sklearn import metrics as skm

from vit_jax_ft.reports import bootstrap
from vit_jax_ft.reports import classification
from vit_jax_ft.reports import multilabel


def _single_label_data(n=300, c=4, seed=0, skill=1.0):
  rng = np.random.default_rng(seed)
  labels = rng.choice(c, size=n, p=np.linspace(1, 3, c) / np.linspace(1, 3, c).sum())
  logits = rng.normal(size=(n, c))
  logits[np.arange(n), labels] += skill
  probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
  return labels, np.round(probs, 2)  # Rounded: ties in the scores.


def _direct_ci(values):
  return list(np.percentile(values, [2.5, 97.5]))


def test_resamples_are_stratified_seeded_and_blocked():
  labels = np.array([0] * 7 + [1] * 3 + [2] * 40)
  r = bootstrap.Resampler(labels, resamples=50, seed=3)
  idx = r.indices()
  assert idx.shape == (50, 50)
  for row in idx:  # Every resample keeps each class's count and draws only within it.
    assert np.array_equal(np.bincount(labels[row], minlength=3), [7, 3, 40])
  assert np.array_equal(idx, bootstrap.Resampler(labels, 50, 3).indices())  # Fixed seed.
  assert not np.array_equal(idx, bootstrap.Resampler(labels, 50, 4).indices())
  # Blocks of any size give the same resamples.
  small = bootstrap.Resampler(labels, 50, 3)
  small.block = 7
  assert np.array_equal(np.concatenate(list(small.blocks())), idx)
  # With replacement: some examples drawn twice in most resamples.
  assert np.mean([len(np.unique(row)) < 50 for row in idx]) > 0.9


def test_single_label_intervals_equal_a_direct_sklearn_bootstrap():
  labels, probs = _single_label_data()
  preds = probs.argmax(axis=1)
  r = bootstrap.Resampler(bootstrap.single_label_strata(labels), resamples=200, seed=0)
  got = bootstrap.single_label_values(labels, probs, r, {1: 0.9})
  acc, macro, weighted, per_class_f1, auc, par = [], [], [], [], [], []
  for row in r.indices():  # Independently: sklearn on each resample.
    y, p, s = labels[row], preds[row], probs[row]
    acc.append(skm.accuracy_score(y, p))
    present = np.unique(np.r_[y, p])
    macro.append(skm.f1_score(y, p, labels=present, average="macro", zero_division=0))
    weighted.append(skm.f1_score(y, p, labels=present, average="weighted", zero_division=0))
    per_class_f1.append(skm.f1_score(y, p, labels=[0, 1, 2, 3], average=None, zero_division=0))
    auc.append([skm.roc_auc_score(y == c, s[:, c]) for c in range(4)])
    par.append(classification.precision_at_recall(s[:, 1], y == 1, 0.9)["precision"])
  np.testing.assert_allclose(got["accuracy"], acc, atol=1e-12)
  np.testing.assert_allclose(got["macro_f1-score"], macro, atol=1e-12)
  np.testing.assert_allclose(got["weighted_f1-score"], weighted, atol=1e-12)
  np.testing.assert_allclose(got["f1-score"], per_class_f1, atol=1e-12)
  np.testing.assert_allclose(got["roc_auc"], auc, atol=1e-12)
  np.testing.assert_allclose(got["precision_at_recall"][:, 1], par, atol=1e-12)
  assert np.isnan(got["precision_at_recall"][:, 0]).all()  # Not asked for class 0.
  for ours, direct in ((got["accuracy"], acc), (got["macro_f1-score"], macro)):
    ci = bootstrap.interval(ours)
    assert ci["resamples"] == 200
    assert ci["ci95"] == pytest.approx(_direct_ci(direct), abs=1e-12)


def test_single_label_point_values_on_the_whole_split_match_the_report():
  labels, probs = _single_label_data(seed=1)
  preds = probs.argmax(axis=1)
  whole = np.arange(len(labels))[None]
  cm = bootstrap.confusion_matrices(labels, preds, 4, whole)[0]
  assert np.array_equal(cm, classification.confusion_matrix(labels, preds, 4))
  values = bootstrap.from_confusion(cm[None])
  report = classification.classification_report(labels, preds, ["a", "b", "c", "d"])
  assert values["accuracy"][0] == pytest.approx(report["accuracy"], abs=1e-12)
  assert values["macro_f1-score"][0] == pytest.approx(report["macro avg"]["f1-score"], abs=1e-12)
  assert bootstrap.roc_auc(probs[:, 2], labels == 2, whole)[0] == pytest.approx(
      skm.roc_auc_score(labels == 2, probs[:, 2]), abs=1e-12)


def test_multi_label_intervals_equal_a_direct_loop_and_skip_undefined_resamples():
  rng = np.random.default_rng(5)
  n = 120
  truth = rng.random((n, 3)) < [0.5, 0.2, 0.0]
  truth[0, 2] = True  # One positive of label 2: most resamples keep it (stratified), not all AUCs.
  probs = np.round(np.clip(truth * 0.35 + rng.random((n, 3)) * 0.65, 0, 1), 2)
  pred = probs >= 0.5
  strata = bootstrap.multi_label_strata(truth)
  assert strata[0] == 2  # Its rarest label.
  r = bootstrap.Resampler(strata, resamples=100, seed=1)
  got = bootstrap.multi_label_values(truth, probs, pred, r)
  micro, macro, per_label_f1 = [], [], []
  for row in r.indices():
    t, p = truth[row], pred[row]
    m = multilabel.metrics_at(probs[row], t, np.full(3, 0.5), ["a", "b", "c"])
    micro.append(m["micro"]["f1-score"])
    macro.append(m["macro"]["f1-score"])
    per_label_f1.append([m["per_label"][k]["f1-score"] if t[:, c].any() else np.nan
                         for c, k in enumerate("abc")])
    assert t[:, 2].sum() >= 1  # The stratum of the rarest label keeps its example.
  np.testing.assert_allclose(got["micro_f1-score"], micro, atol=1e-12)
  np.testing.assert_allclose(got["macro_f1-score"], macro, atol=1e-12)
  np.testing.assert_allclose(got["f1-score"], per_label_f1, atol=1e-12)
  assert bootstrap.interval(got["micro_f1-score"])["ci95"] == pytest.approx(_direct_ci(micro))


def test_undefined_resamples_are_left_out_and_counted_never_nan():
  values = np.array([0.5, np.nan, 0.7, np.nan, 0.6])
  assert bootstrap.interval(values) == {
      "ci95": pytest.approx(_direct_ci([0.5, 0.7, 0.6])), "resamples": 3}
  assert bootstrap.interval(np.full(4, np.nan)) == {"ci95": None, "resamples": 0}
  # Unstratified resamples of a rare class lose its positives in some resamples: AUC undefined.
  labels = np.array([1] + [0] * 29)
  scores = np.linspace(0, 1, 30)
  r = bootstrap.Resampler(np.zeros(30, np.int64), resamples=200, seed=0)
  aucs = r.values(lambda idx: bootstrap.roc_auc(scores, labels == 1, idx))
  ci = bootstrap.interval(aucs)
  assert 100 < ci["resamples"] < 200 and all(np.isfinite(ci["ci95"]))


def test_a_thousand_resamples_of_a_few_thousand_examples_take_seconds():
  labels, probs = _single_label_data(n=3000, c=7, seed=2)
  r = bootstrap.Resampler(labels, resamples=1000, seed=0)
  start = time.perf_counter()
  values = bootstrap.single_label_values(labels, probs, r, {c: 0.95 for c in range(7)})
  assert time.perf_counter() - start < 30  # ~2 s on a quiet 2-core machine.
  assert values["macro_f1-score"].shape == (1000,) and values["roc_auc"].shape == (1000, 7)


def _report(multilabel, resamples):
  from vit_jax_ft import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  from vit_jax_ft.reports import markdown  # pylint: disable=g-import-not-at-top
  from vit_jax_ft.reports import report as report_lib  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  names = ["a", "b", "c"]
  if multilabel:
    truth = rng.random((90, 3)) < [0.5, 0.3, 0.0]  # Label c: no positives at all.
    probs = np.clip(truth * 0.4 + rng.random((90, 3)) * 0.6, 0, 1)
  else:
    labels, probs = _single_label_data(n=90, c=3)
    truth = np.eye(3, dtype=bool)[labels]
  preds = workdir_lib.Predictions(probs=probs, targets=truth.astype(np.float32),
                                  ids=[str(i) for i in range(90)])
  options = report_lib.Options(recall_classes={"a": 0.9}, bootstrap_resamples=resamples)
  report = (report_lib.multi_label(preds, names, options, np.full(3, 0.5), "fixed")
            if multilabel else report_lib.single_label(preds, names, options))
  report |= {"workdir": "w", "split": "test", "checkpoint": {"label": "best", "step": 1},
             "model": "vit", "multilabel": multilabel, "class_names": names}
  return report, markdown.render(report, {}, report_lib.headline(report, multilabel))


def test_reports_carry_intervals_next_to_each_value():
  report, md = _report(multilabel=False, resamples=100)
  cr, ops = report["classification_report"], report["operating_points"]
  for row in (cr["a"], cr["macro avg"], cr["weighted avg"]):
    for key in ("precision", "recall", "f1-score"):
      lo, hi = row[f"{key}_ci95"]
      assert lo <= hi and row[f"{key}_ci95_resamples"] == 100
  assert cr["accuracy_ci95"][0] <= cr["accuracy"] <= cr["accuracy_ci95"][1]
  assert len(ops["per_class"]["b"]["roc_auc_ci95"]) == 2 and len(ops["macro_roc_auc_ci95"]) == 2
  assert len(ops["per_class"]["a"]["at_required_recall"]["precision_ci95"]) == 2
  assert set(report["intervals"]) == {"accuracy", "macro_f1", "weighted_f1", "macro_roc_auc"}
  assert report["bootstrap"]["stratified_by"] == "class"
  acc = f"| accuracy | {cr['accuracy']:.4f} [{cr['accuracy_ci95'][0]:.3f}, "
  assert acc in md and "Brackets: 95% confidence intervals" in md

  report, md = _report(multilabel=True, resamples=100)
  tuned, ops = report["at_tuned_thresholds"], report["operating_points"]
  assert len(tuned["micro"]["f1-score_ci95"]) == 2 and len(tuned["exact_match_ci95"]) == 2
  # A label without positives: undefined in every resample, no interval and never NaN.
  assert tuned["per_label"]["c"]["f1-score_ci95"] is None
  assert tuned["per_label"]["c"]["f1-score_ci95_resamples"] == 0
  assert ops["per_class"]["c"]["roc_auc"] is None and "roc_auc_ci95" not in ops["per_class"]["c"]
  assert report["bootstrap"]["stratified_by"] == "each example's rarest label"
  assert "| **micro** | - | " in md and "nan" not in md.lower()

  report, md = _report(multilabel=False, resamples=0)  # Off: the report as before.
  assert "intervals" not in report and "accuracy_ci95" not in report["classification_report"]
  assert "Brackets" not in md


def test_config_range_of_the_resamples():
  from vit_jax_ft import base_config  # pylint: disable=g-import-not-at-top
  from vit_jax_ft import config_ranges  # pylint: disable=g-import-not-at-top
  config = base_config.get_base_config()
  assert (config.bootstrap_resamples, config.bootstrap_seed) == (1000, 0)
  config_ranges.check_ranges(config)
  for bad in (-1, 10):
    config.bootstrap_resamples = bad
    with pytest.raises(ValueError, match=f"config.bootstrap_resamples={bad} must be 0"):
      config_ranges.check_ranges(config)
  config.bootstrap_resamples = 0
  config_ranges.check_ranges(config)
