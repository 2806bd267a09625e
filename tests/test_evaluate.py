"""Evaluation reports: numbers against sklearn and hand computations, end to end on the demo."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import metrics as skm

from test_train import tiny_demo_config  # pylint: disable=g-bad-import-order
from vit_jax_ft import checkpoints
from vit_jax_ft import evaluate
from vit_jax_ft import models
from vit_jax_ft import workdir as workdir_lib
from vit_jax_ft.data import tfrecords
from vit_jax_ft.reports import calibration
from vit_jax_ft.reports import classification
from vit_jax_ft.reports import curves
from vit_jax_ft.reports import multilabel
from vit_jax_ft.reports import report as report_lib
from vit_jax_ft.reports import writer as report_writer
from vit_jax_ft.training import optim
from vit_jax_ft.training import steps
from vit_jax_ft.training import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _random_probs(rng, n, c, sharpness=3.0):
  logits = rng.normal(size=(n, c)) * sharpness
  e = np.exp(logits - logits.max(1, keepdims=True))
  return e / e.sum(1, keepdims=True)


def test_classification_report_matches_sklearn():
  rng = np.random.default_rng(0)
  names = ["cat", "dog", "fox", "owl", "eel"]
  labels = rng.choice(4, size=300, p=[0.6, 0.25, 0.1, 0.05])  # 'eel' never occurs...
  preds = labels.copy()
  flip = rng.random(300) < 0.35
  flip |= labels == 3  # ...and 'owl' is never predicted.
  preds[flip] = rng.choice([0, 1, 2], size=flip.sum())
  cm = classification.confusion_matrix(labels, preds, len(names))
  assert cm.shape == (5, 5) and cm[4].sum() == cm[:, 4].sum() == 0
  assert cm[3, 3] == 0 and cm.sum() == 300 and np.trace(cm) == np.sum(labels == preds)
  ours = classification.classification_report(labels, preds, names)
  theirs = skm.classification_report(labels, preds, target_names=names[:4], output_dict=True,
                                     zero_division=0)
  assert ours.pop("absent_classes") == ["eel"]
  assert set(ours) == set(theirs)
  assert ours["owl"]["precision"] == 0.0 and ours["owl"]["support"] == theirs["owl"]["support"]
  for key, row in theirs.items():
    if key == "accuracy":
      assert ours[key] == pytest.approx(row, abs=1e-12)
    else:
      for metric, value in row.items():
        assert ours[key][metric] == pytest.approx(value, abs=1e-12), (key, metric)


def test_top_k_and_log_loss_match_sklearn():
  rng = np.random.default_rng(1)
  probs = _random_probs(rng, 200, 6)
  labels = rng.integers(0, 6, 200)
  topk = classification.top_k_accuracy(probs, labels, ks=(1, 2, 5, 6))
  assert set(topk) == {"1", "2", "5"}  # k >= num_classes is trivially 1 and left out.
  for k in (1, 2, 5):
    assert topk[str(k)] == pytest.approx(skm.top_k_accuracy_score(labels, probs, k=k))
  truth = np.eye(6)[labels]
  assert classification.log_loss(probs, truth, multilabel=False) == pytest.approx(
      skm.log_loss(labels, probs, labels=range(6)))


def test_top_k_counts_a_tie_in_the_models_favour():
  # sklearn's top_k_accuracy_score breaks ties by class index instead (row 0 would miss).
  probs = np.array([[0.4, 0.4, 0.2, 0.0],    # true 0 tied with 1 for first place
                    [0.3, 0.3, 0.3, 0.1],    # true 2 tied three ways
                    [0.1, 0.2, 0.3, 0.4],    # true 1 third
                    [0.1, 0.5, 0.2, 0.2],    # true 2 second, tied with 3
                    [0.25, 0.25, 0.25, 0.25]])
  labels = np.array([0, 2, 1, 2, 3])
  assert classification.top_k_accuracy(probs, labels, ks=(1, 2, 3)) == {
      "1": 0.6, "2": 0.8, "3": 1.0}


def test_log_loss_clips_at_1e15_without_renormalising():
  # sklearn clips at the dtype's eps and warns about rows of a float32 softmax, which sum
  # to 1 only within ~1e-7; here a certain miss costs -log(1e-15) and rows are taken as they are.
  probs = np.array([[0.0, 1.0], [0.7, 0.3 + 1e-7]])
  truth = np.array([[1, 0], [1, 0]], bool)
  assert classification.log_loss(probs, truth, multilabel=False) == pytest.approx(
      (-np.log(1e-15) - np.log(0.7)) / 2, rel=1e-12)
  # Multi-label: the mean over labels of each label's binary log loss.
  rng = np.random.default_rng(5)
  probs = rng.uniform(0.01, 0.99, (50, 3))
  truth = rng.random((50, 3)) < 0.4
  expected = np.mean([skm.log_loss(truth[:, c], probs[:, c], labels=[False, True])
                      for c in range(3)])
  assert classification.log_loss(probs, truth, multilabel=True) == pytest.approx(expected)
  old = -np.log(probs[0, 0] if truth[0, 0] else 1 - probs[0, 0])
  truth[0, 0], probs[0, 0] = True, 0.0  # A missed label predicted with certainty.
  assert classification.log_loss(probs, truth, multilabel=True) == pytest.approx(
      expected + (-np.log(1e-15) - old) / 150, rel=1e-12)


def test_precision_at_recall_is_the_most_precise_threshold_keeping_recall():
  rng = np.random.default_rng(2)
  positive = rng.random(400) < 0.2
  scores = np.round(np.clip(rng.normal(0.35 + 0.3 * positive, 0.2), 0, 1), 2)  # With ties.
  for required in (0.5, 0.9, 0.999):
    got = classification.precision_at_recall(scores, positive, required)
    # Brute force: every distinct score as a threshold.
    best = None
    for t in np.unique(scores):
      pred = scores >= t
      recall = (pred & positive).sum() / positive.sum()
      precision = (pred & positive).sum() / pred.sum()
      if recall >= required and (best is None or precision > best[1]
                                 or (precision == best[1] and t > best[0])):
        best = (t, precision, recall)
    assert got["threshold"] == pytest.approx(best[0])
    assert got["precision"] == pytest.approx(best[1])
    assert got["recall"] == pytest.approx(best[2]) and got["recall"] >= required
  assert classification.precision_at_recall(scores, np.zeros(400, bool), 0.9) is None


def test_ece_matches_a_hand_computation():
  # 15 bins of width 1/15. Confidences and whether the top class was right:
  #   0.05 (bin 0, wrong), 0.2 = 3/15 exactly (right-closed: bin 2, right),
  #   0.9 and 0.92 (bin 13, one right), 1.0 (bin 14, right).
  conf = np.array([0.05, 0.2, 0.9, 0.92, 1.0])
  correct = np.array([0, 1, 1, 0, 1])
  # bin 0: |0 - 0.05| * 1/5; bin 2: |1 - 0.2| * 1/5; bin 13: |0.5 - 0.91| * 2/5; bin 14: 0.
  expected = (0.05 + 0.8 + 2 * 0.41) / 5
  result = calibration.calibration_errors(conf, correct)
  assert result["ece"] == pytest.approx(expected)
  assert result["mce"] == pytest.approx(0.8)
  assert [b["count"] for b in result["bins"]] == [1, 0, 1] + [0] * 10 + [2, 1]
  assert list(calibration.bin_index(np.array([0.0, 1 / 15, 1 / 15 + 1e-9, 1.0]))) == [0, 0, 1, 14]
  # Single-label wrapper: confidence = top probability, correct = argmax == label.
  probs = np.array([[0.7, 0.2, 0.1], [0.4, 0.6, 0.0]])
  single = calibration.single_label(probs, np.array([0, 0]))
  assert single["ece"] == pytest.approx((0.3 + 0.6) / 2)


def test_multilabel_metrics_match_sklearn():
  rng = np.random.default_rng(3)
  truth = rng.random((150, 5)) < [0.5, 0.3, 0.1, 0.05, 0.0]  # The last label never occurs.
  probs = np.clip(truth * 0.4 + rng.random((150, 5)) * 0.6, 0, 1)
  thresholds = np.array([0.5, 0.6, 0.4, 0.55, 0.5])
  names = list("abcde")
  got = multilabel.metrics_at(probs, truth, thresholds, names)
  pred = probs >= thresholds
  p, r, f, s = skm.precision_recall_fscore_support(truth, pred, average=None, zero_division=0)
  for c, n in enumerate(names):
    row = got["per_label"][n]
    assert (row["precision"], row["recall"], row["f1-score"], row["support"]) == pytest.approx(
        (p[c], r[c], f[c], s[c]))
  for avg in ("micro", "macro"):
    p, r, f, _ = skm.precision_recall_fscore_support(truth, pred, average=avg, zero_division=0)
    assert (got[avg]["precision"], got[avg]["recall"], got[avg]["f1-score"]) == pytest.approx(
        (p, r, f))
  assert got["exact_match"] == pytest.approx(skm.accuracy_score(truth, pred))
  assert got["hamming_loss"] == pytest.approx(skm.hamming_loss(truth, pred))


def test_multilabel_metrics_of_a_single_label():
  # One indicator column reads to sklearn as binary 0/1 targets; it is still one label.
  rng = np.random.default_rng(6)
  truth = rng.random((60, 1)) < 0.3
  probs = rng.random((60, 1))
  got = multilabel.metrics_at(probs, truth, np.array([0.4]), ["cat"])
  pred = probs[:, 0] >= 0.4
  expected = skm.precision_recall_fscore_support(truth[:, 0], pred, average="binary",
                                                 zero_division=0)[:3]
  assert list(got["per_label"]) == ["cat"] and got["per_label"]["cat"]["support"] == truth.sum()
  for key in ("micro", "macro"):
    assert (got[key]["precision"], got[key]["recall"], got[key]["f1-score"]) == pytest.approx(
        expected)
  row = got["per_label"]["cat"]
  assert (row["precision"], row["recall"], row["f1-score"]) == pytest.approx(expected)
  assert got["hamming_loss"] == pytest.approx(np.mean(pred != truth[:, 0]))
  assert got["exact_match"] == pytest.approx(1 - got["hamming_loss"])


def test_tuned_thresholds_maximise_f1_per_label():
  rng = np.random.default_rng(4)
  truth = rng.random((120, 3)) < [0.4, 0.15, 0.0]
  probs = np.round(np.clip(truth * 0.3 + rng.random((120, 3)) * 0.7, 0, 1), 2)
  tuned = multilabel.tune_thresholds(probs, truth)
  assert tuned[2] == 0.5  # No positives: the default stays.
  for c in range(2):
    f1 = lambda t: skm.f1_score(truth[:, c], probs[:, c] >= t, zero_division=0)
    assert f1(tuned[c]) == pytest.approx(max(f1(t) for t in np.unique(probs[:, c])))
    # Strictly between two observed scores, so ties in new data do not flip.
    assert tuned[c] not in set(probs[:, c]) or tuned[c] == probs[:, c].min()
    # The sweep's F1 is sklearn's F1 at the threshold it returns.
    threshold, best = multilabel._best_f1_threshold(probs[:, c], truth[:, c])
    assert threshold == tuned[c] and best == pytest.approx(f1(threshold), abs=1e-12)


def test_error_analysis_counts_by_hand():
  truth = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 1], [0, 0, 0]], bool)
  probs = np.array([[0.2, 0.9, 0.1],    # missed a, predicted b instead
                    [0.8, 0.7, 0.1],    # b wrong
                    [0.1, 0.9, 0.9],    # right
                    [0.1, 0.1, 0.1]])   # right
  errors = multilabel.error_analysis(probs, truth, np.full(3, 0.5), ["a", "b", "c"])
  assert errors["cooccurrence"] == [[1, 1, 0], [1, 2, 0], [0, 0, 0]]
  assert errors["missed_for"][0][1] == 1 and np.sum(errors["missed_for"]) == 1
  assert errors["top_pairs"] == [{"labels": ["a", "b"], "examples": 1}]
  assert errors["top_swaps"] == [{"missed": "a", "predicted_instead": "b", "examples": 1}]


def test_required_recall_flag_and_unknown_class():
  assert evaluate.parse_required_recall("0.999") == (0.999, ())
  assert evaluate.parse_required_recall("basal cell=0.99,mel=0.999") == (
      0.0, {"basal cell": 0.99, "mel": 0.999})
  options = report_lib.Options(recall_classes={"mel": 0.999})
  assert options.recall_targets(["nv", "mel"]) == {1: 0.999}
  assert report_lib.Options(required_recall=0.9).recall_targets(["a", "b"]) == {0: 0.9, 1: 0.9}
  with pytest.raises(ValueError, match="Unknown class names \\['melanoma'\\]"):
    report_lib.Options(recall_classes=("melanoma",)).recall_targets(["nv", "mel"])
  with pytest.raises(ValueError, match="NAME=RECALL"):
    evaluate.parse_required_recall("mel")


@pytest.mark.parametrize("n", [1, 3])
def test_figures_of_a_tiny_split_skip_undefined_curves(tmp_path, n):
  # A one-example val split (a few hundred paintings split 80/10/10 can give one):
  # no class has both positives and negatives, so there is no ROC curve to draw.
  names = ["a", "b", "c"]
  probs = _random_probs(np.random.default_rng(0), n, 3)
  preds = workdir_lib.Predictions(probs=probs, targets=np.eye(3)[np.arange(n) % 3], ids=[
      str(i) for i in range(n)])
  report = report_lib.single_label(preds, names, report_lib.Options())
  files = report_lib.write_pngs(str(tmp_path), preds, report, names, "val")
  assert ("roc_curves" in files) == (n > 1)
  assert "pr_curves" in files and "confusion_matrix" in files
  assert sorted(os.listdir(tmp_path)) == sorted(files.values())


def _tensorboard_tags(workdir):
  return set(curves.read_scalars(workdir))


def test_report_end_to_end_matches_training_metrics_and_sklearn(tmp_path):
  # The tiny demo, 12 steps: checkpoints kept at 8 and 12, evaluations at 6 and 12.
  workdir = str(tmp_path)
  results = train.train_and_evaluate(tiny_demo_config(), workdir)
  dirs = report_writer.write_reports(None, workdir, splits=("val", "test"), checkpoint="last")
  assert set(dirs) == {"val", "test"}
  out = dirs["test"]
  assert out == os.path.join(workdir, "reports", "test_last")
  with open(os.path.join(out, "report.json")) as f:
    report = json.load(f)
  # The same final weights as eval_results.json's test numbers (in-training metrics.py).
  assert report["checkpoint"]["step"] == results["step"] == 12
  cr = report["classification_report"]
  assert cr["accuracy"] == pytest.approx(results["test_accuracy"], abs=1e-9)
  assert cr["macro avg"]["f1-score"] == pytest.approx(results["test_macro_f1"], abs=1e-9)
  assert report["log_loss"] == pytest.approx(results["test_loss"], rel=1e-4)
  assert np.sum(report["confusion_matrix"]) == report["num_examples"] == 180  # Padding dropped.
  # And sklearn on the same predictions.
  run = workdir_lib.load_run(workdir)
  preds = workdir_lib.predict_split(run, workdir_lib.restore(workdir, "last"), "test")
  theirs = skm.classification_report(preds.labels, preds.probs.argmax(1), output_dict=True,
                                     target_names=[run.class_names[c] for c in np.unique(
                                         np.r_[preds.labels, preds.probs.argmax(1)])],
                                     zero_division=0)
  for key in ("macro avg", "weighted avg"):
    assert cr[key]["f1-score"] == pytest.approx(theirs[key]["f1-score"], abs=1e-12)
  assert preds.ids[0].startswith("digit_") and len(set(preds.ids)) == 180
  for name in ("report.md", "confusion_matrix.png", "pr_curves.png", "roc_curves.png",
               "reliability.png", "learning_curves.png"):
    assert os.path.getsize(os.path.join(out, name)) > 1000, name
  md = open(os.path.join(out, "report.md")).read()
  for section in ("## Per class", "## Top-k accuracy", "## Calibration", "## Run summary",
                  "| **macro avg** |", "![confusion matrix](confusion_matrix.png)"):
    assert section in md
  summary = report["run"]
  assert summary["steps"] == 12 and summary["num_params"] > 0
  best = summary["best_checkpoint"]
  assert best["step"] in (6, 12) and best["size_bytes"] > summary["params_bytes_float32"]
  assert {"report/test_last/accuracy", "report/val_last/ece"} <= _tensorboard_tags(workdir)

  # Another kept step, with options (one training for both: it is the slow part).
  options = report_lib.Options(top_k=(2,), recall_classes={"3": 0.999})
  out = report_writer.write_reports(None, workdir, splits=("val",), checkpoint="8",
                               options=options)["val"]
  assert out.endswith(os.path.join("reports", "val_8"))
  with open(os.path.join(out, "report.json")) as f:
    report = json.load(f)
  assert report["checkpoint"]["label"] == "8" and report["checkpoint"]["step"] == 8
  ops = report["operating_points"]["per_class"]
  assert ops["3"]["required_recall"] == 0.999 and "required_recall" not in ops["4"]
  assert ops["3"]["at_required_recall"]["recall"] >= 0.999
  assert list(report["top_k_accuracy"]) == ["2"]
  with pytest.raises(FileNotFoundError, match="available: \\[8, 12\\]"):
    checkpoints.find_step(workdir, "5")


def test_command_line_fails_with_one_line(tmp_path):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "vit_jax_ft.evaluate", f"--workdir={tmp_path}", "--split=val"]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1] == (
      f"error: {tmp_path}/config.json not found: is '{tmp_path}' the workdir of a training run?")


# Runs built directly (no training): untrained weights with a random head.


def _write_multilabel_dataset(data_dir, rng, sizes=(("train", 32), ("val", 60), ("test", 50))):
  """16x16 PNGs whose label k (of 3) is present when colour channel k is bright."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  import io  # pylint: disable=g-import-not-at-top
  splits = {}
  for split, n in sizes:
    labels = rng.random((n, 3)) < 0.4
    examples = []
    for i in range(n):
      pixels = rng.integers(0, 80, (16, 16, 3)) + 150 * labels[i]
      buf = io.BytesIO()
      Image.fromarray(pixels.astype(np.uint8)).save(buf, format="PNG")
      examples.append((buf.getvalue(), list(np.flatnonzero(labels[i])), f"{split}_{i}"))
    files = tfrecords.write_split(data_dir, split, examples, num_shards=1)
    splits[split] = dict(num_examples=n, files=files,
                         class_counts=labels.sum(0).astype(int).tolist())
  tfrecords.write_info(data_dir, dict(name="colours", class_names=["red", "green", "blue"],
                                      multilabel=True, splits=splits))


def make_workdir(workdir, config, num_classes):
  """A workdir with config.json and best/last checkpoints (step 0) of an untrained model."""
  os.makedirs(workdir)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  model = models.create_model(config.model, num_classes, jnp.float32)
  tx = optim.make_optimizer(config.optimizer, optim.learning_rate_schedule(config.optimizer, 10))
  state = steps.create_train_state(model, tx, config.data.image_size, seed=0)
  last, best = checkpoints.make_managers(workdir, config)
  checkpoints.save(last, 0, state)
  checkpoints.save(best, 0, state, {f"val_{config.best_metric}": 0.5})
  last.wait_until_finished()
  best.wait_until_finished()
  return workdir


def make_multilabel_workdir(root):
  """An untrained tiny ViT (random head) on 3-label colour images."""
  data_dir = os.path.join(root, "data")
  _write_multilabel_dataset(data_dir, np.random.default_rng(0))
  config = tiny_demo_config(**{"data.source": "tfrecord", "data.dir": data_dir,
                               "data.image_size": 16, "loss.name": "sigmoid_bce",
                               "model.patch_size": 8, "model.head_init": "lecun_normal",
                               "eval_batch_size": 16, "best_metric": "macro_f1"})
  return make_workdir(os.path.join(root, "run"), config, 3)


def test_multilabel_thresholds_tuned_on_val_and_applied_to_test(tmp_path):
  workdir = make_multilabel_workdir(str(tmp_path))
  out = report_writer.write_reports(None, workdir, splits=("test",))["test"]
  with open(os.path.join(out, "report.json")) as f:
    report = json.load(f)
  run = workdir_lib.load_run(workdir)
  ck = workdir_lib.restore(workdir, "best")
  val = workdir_lib.predict_split(run, ck, "val")
  test = workdir_lib.predict_split(run, ck, "test")
  expected = multilabel.tune_thresholds(val.probs, val.targets > 0.5)
  got = np.array([report["thresholds"]["values"][n] for n in run.class_names])
  np.testing.assert_allclose(got, expected)
  assert "'val' split" in report["thresholds"]["source"]
  pred, truth = test.probs >= got, test.targets > 0.5
  tuned = report["at_tuned_thresholds"]
  assert tuned["micro"]["f1-score"] == pytest.approx(skm.f1_score(truth, pred, average="micro"))
  assert tuned["macro"]["f1-score"] == pytest.approx(
      skm.f1_score(truth, pred, average="macro", zero_division=0))
  assert tuned["exact_match"] == pytest.approx(skm.accuracy_score(truth, pred))
  assert report["at_0.5"]["exact_match"] == pytest.approx(
      skm.accuracy_score(truth, test.probs >= 0.5))
  with open(workdir_lib.thresholds_path(workdir, "best")) as f:
    saved = json.load(f)
  assert saved["thresholds"] == report["thresholds"]["values"]
  assert os.path.exists(os.path.join(out, "error_cooccurrence.png"))
  assert "## Errors that occur together" in open(os.path.join(out, "report.md")).read()
