"""Test-time augmentation and temperature scaling, against numpy/scipy/sklearn references."""

import csv
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize
from scipy import special
from sklearn import metrics as skm

from test_evaluate import make_multilabel_workdir  # pylint: disable=g-bad-import-order
from test_predict import _export_split
from test_train import tiny_demo_config
from vit_jax_ft import models
from vit_jax_ft import predict
from vit_jax_ft import workdir as workdir_lib
from vit_jax_ft.models import tta
from vit_jax_ft.reports import calibration
from vit_jax_ft.reports import curves
from vit_jax_ft.reports import temperature
from vit_jax_ft.reports import writer as report_writer
from vit_jax_ft.training import train


def _numpy_views(x, mode):
  """The reference views of an NHWC batch, with numpy's flip and rot90."""
  if mode == "none":
    return [x]
  views = [x, np.flip(x, axis=2)]
  if mode == "flip":
    return views
  return [np.rot90(v, k, axes=(1, 2)) for v in views for k in range(4)]


def _softmax_nll(scores, labels, t):
  """Independent NLL of softmax(scores / t), with scipy's log_softmax."""
  return -np.mean(special.log_softmax(scores / t, axis=1)[np.arange(len(labels)), labels])


def _sigmoid_nll(scores, truth, t):
  z = scores / t
  return -np.mean(truth * special.log_expit(z) + (1 - truth) * special.log_expit(-z))


def _scipy_temperature(nll):
  return optimize.minimize_scalar(nll, bounds=(temperature.MIN_T, temperature.MAX_T),
                                  method="bounded", options={"xatol": 1e-10}).x


def test_flip_and_dihedral_views_match_numpy_and_are_distinct():
  x = np.random.default_rng(0).normal(size=(2, 5, 5, 3)).astype(np.float32)
  got = {}
  for mode in tta.MODES:
    got[mode] = [np.asarray(v) for v in tta.views(jnp.asarray(x), mode)]
    ref = _numpy_views(x, mode)
    assert len(got[mode]) == len(ref) == tta.NUM_VIEWS[mode]
    for g, r in zip(got[mode], ref):
      np.testing.assert_array_equal(g, r)
  np.testing.assert_array_equal(got["none"][0], x)
  # The mirror is left-right: the first column becomes the last.
  np.testing.assert_array_equal(got["flip"][1][:, :, 0], x[:, :, -1])
  assert len({v.tobytes() for v in got["dihedral"]}) == 8
  assert tta.suffix("none") == "" and tta.suffix("dihedral") == "_tta-dihedral"
  with pytest.raises(ValueError, match="--tta must be one of none, flip, dihedral; got 'rot'"):
    tta.check_mode("rot")


@pytest.mark.parametrize("multilabel", [False, True])
def test_tta_probabilities_are_the_numpy_average_over_the_views(multilabel):
  config = tiny_demo_config(**{"model.head_init": "lecun_normal", "data.image_size": 16,
                               "model.patch_size": 4})
  model = models.create_model(config.model, 5, jnp.float32)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)), train=False)
  x = np.random.default_rng(1).normal(size=(3, 16, 16, 3)).astype(np.float32)
  act = special.expit if multilabel else (lambda z: special.softmax(z, axis=1))
  apply_one = jax.jit(lambda images: model.apply(variables, images, train=False))
  # Without TTA: the very probabilities evaluation computed before TTA existed.
  probs, scores = tta.make_apply(model, multilabel, "none")(variables, x)
  np.testing.assert_array_equal(np.asarray(probs),
                                np.asarray(workdir_lib.make_apply(model, multilabel)(variables, x)))
  plain = np.asarray(apply_one(jnp.asarray(x)), np.float64)
  np.testing.assert_allclose(np.asarray(scores), plain, atol=1e-5)
  for mode in ("flip", "dihedral"):
    probs, scores = tta.make_apply(model, multilabel, mode)(variables, x)
    logits = [np.asarray(apply_one(jnp.asarray(v.copy())), np.float64)
              for v in _numpy_views(x, mode)]
    ref = np.mean([act(z) for z in logits], axis=0)
    np.testing.assert_allclose(np.asarray(probs), ref, atol=1e-6)
    # The scores give those probabilities back (what temperature scaling divides).
    np.testing.assert_allclose(act(np.asarray(scores, np.float64)), ref, atol=1e-6)
    assert np.abs(ref - act(plain)).max() > 1e-3  # The views differ, so the test means something.


def test_fitted_temperature_matches_scipy_and_keeps_the_argmax():
  rng = np.random.default_rng(0)
  true_logits = rng.normal(size=(400, 5)) * 1.5
  labels = np.array([rng.choice(5, p=p) for p in special.softmax(true_logits, axis=1)])
  onehot = np.eye(5)[labels]
  for scale_factor in (3.0, 0.4):  # Over- and under-confident scores.
    scores = true_logits * scale_factor
    t = temperature.fit(scores, onehot, multilabel=False)
    nll = lambda t, s=scores: _softmax_nll(s, labels, t)
    ref = _scipy_temperature(nll)
    assert t == pytest.approx(ref, rel=1e-3)
    assert t == pytest.approx(scale_factor, rel=0.3)  # It undoes the scale.
    scaled = temperature.scale(scores, t, multilabel=False)
    assert temperature.nll(scores, onehot, False, t) == pytest.approx(
        skm.log_loss(labels, scaled, labels=range(5)), rel=1e-9)
    assert temperature.nll(scores, onehot, False, t) < temperature.nll(scores, onehot, False)
    np.testing.assert_array_equal(scaled.argmax(axis=1), scores.argmax(axis=1))
  # Multi-label: one T for every label's sigmoid.
  true_logits = rng.normal(size=(300, 4)) * 2
  truth = (rng.random((300, 4)) < special.expit(true_logits)).astype(float)
  scores = true_logits * 2.5
  t = temperature.fit(scores, truth, multilabel=True)
  assert t == pytest.approx(_scipy_temperature(lambda t: _sigmoid_nll(scores, truth, t)),
                            rel=1e-3)
  assert temperature.nll(scores, truth, True, t) == pytest.approx(_sigmoid_nll(scores, truth, t))
  assert temperature.nll(scores, truth, True, t) < temperature.nll(scores, truth, True)
  # Optima outside the range are clipped to it.
  assert temperature.fit(10 * onehot, onehot, False) == temperature.MIN_T  # Separable.
  assert temperature.fit(-onehot, onehot, False) == temperature.MAX_T  # Worse than chance.


def test_ece_of_scaled_probabilities_by_hand():
  # Two classes, T = 2: softmax([d, 0] / 2) gives sigmoid(d / 2) to the first class.
  # d = 2 ln 3 -> 0.75 (bin 11 of 15: (11/15, 12/15]); d = 2 ln 9 -> 0.9 (bin 13).
  d3, d9 = 2 * np.log(3), 2 * np.log(9)
  scores = np.array([[d3, 0], [d9, 0], [0, d3], [d9, 0]])
  labels = np.array([0, 1, 1, 0])  # Right, wrong, right, right.
  probs = temperature.scale(scores, 2.0, multilabel=False)
  np.testing.assert_allclose(probs.max(axis=1), [0.75, 0.9, 0.75, 0.9])
  # bin 11: accuracy 1, confidence 0.75; bin 13: accuracy 1/2, confidence 0.9; 2 of 4 each.
  result = calibration.single_label(probs, labels)
  assert result["ece"] == pytest.approx(0.5 * 0.25 + 0.5 * 0.4)
  assert result["mce"] == pytest.approx(0.4)
  # Unscaled: 0.9 (bin 13) and 81/82 (bin 14).
  before = calibration.single_label(temperature.scale(scores, 1.0, False), labels)
  assert before["ece"] == pytest.approx(0.5 * 0.1 + 0.5 * abs(0.5 - 81 / 82))


def test_moved_thresholds_keep_the_multilabel_decisions():
  rng = np.random.default_rng(2)
  scores = rng.normal(size=(200, 5)) * 3
  thresholds = np.array([0.0, 0.2, 0.5, 0.93, 1.01])  # Always, ..., never.
  for t in (0.3, 2.5):
    moved = temperature.scale_thresholds(thresholds, t)
    assert moved[0] == 0.0 and moved[-1] == 1.01 and moved[2] == 0.5
    np.testing.assert_array_equal(temperature.scale(scores, t, True) >= moved,
                                  special.expit(scores) >= thresholds)


def test_temperature_flag():
  assert temperature.parse_flag("auto") == "auto"
  assert temperature.parse_flag("none") is None
  assert temperature.parse_flag("1.5") == 1.5
  for bad in ("0", "-1", "nan", "inf", "hot"):
    with pytest.raises(ValueError, match="--temperature must be 'auto', 'none' or a positive"):
      temperature.parse_flag(bad)


def test_bad_flags_fail_before_any_work(tmp_path):
  with pytest.raises(ValueError, match="--tta must be one of"):
    report_writer.write_reports(None, str(tmp_path), tta="rotate")
  with pytest.raises(ValueError, match="--calibrate must be one of none, temperature"):
    report_writer.write_reports(None, str(tmp_path), calibrate="platt")
  with pytest.raises(ValueError, match="--temperature"):
    predict.predict(str(tmp_path), "x.jpg", str(tmp_path / "p.csv"), temperature="-2")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """The tiny demo trained for 12 steps: confident enough to have a temperature to fit."""
  workdir = str(tmp_path_factory.mktemp("tta") / "run")
  train.train_and_evaluate(tiny_demo_config(), workdir)
  return workdir


def test_tta_on_the_eval_pipeline_matches_numpy(trained):
  run = workdir_lib.load_run(trained)
  ck = workdir_lib.restore(trained, "last")
  preds = workdir_lib.predict_split(run, ck, "val", tta_mode="dihedral")
  apply_one = jax.jit(lambda images: run.model.apply(ck.variables, images, train=False))
  ref = []
  for batch in workdir_lib._batches(run, "val", 64):  # pylint: disable=protected-access
    views = _numpy_views(np.asarray(batch["image"]), "dihedral")
    probs = np.mean([special.softmax(np.asarray(apply_one(jnp.asarray(v.copy())), np.float64),
                                     axis=1) for v in views], axis=0)
    ref.append(probs[batch["mask"] > 0])
  np.testing.assert_allclose(preds.probs, np.concatenate(ref), atol=1e-6)


def _read(folder):
  with open(os.path.join(folder, "report.json")) as f:
    return json.load(f)


def test_calibrated_tta_report_and_predict_with_the_saved_temperature(trained, tmp_path):
  workdir = trained
  out = report_writer.write_reports(None, workdir, splits=("test",), checkpoint="last", tta="flip",
                               calibrate="temperature")["test"]
  assert out == os.path.join(workdir, "reports", "test_last_tta-flip_calibrated")
  plain_out = report_writer.write_reports(None, workdir, splits=("test",), checkpoint="last",
                                     tta="flip")["test"]
  assert plain_out == os.path.join(workdir, "reports", "test_last_tta-flip")
  report, plain = _read(out), _read(plain_out)
  assert report["tta"]["mode"] == plain["tta"]["mode"] == "flip" and report["tta"]["views"] == 2
  assert plain["temperature_scaling"] is None
  scaling = report["temperature_scaling"]
  t = scaling["temperature"]
  with open(workdir_lib.temperature_path(workdir, "last", "flip")) as f:
    saved = json.load(f)
  assert saved["temperature"] == t and saved["tta"] == "flip" and saved["fitted_on"] == "val"
  assert not os.path.exists(workdir_lib.temperature_path(workdir, "last"))  # Plain one untouched.
  # scipy's T on the log of the TTA-averaged validation probabilities.
  run = workdir_lib.load_run(workdir)
  ck = workdir_lib.restore(workdir, "last")
  val = workdir_lib.predict_split(run, ck, "val", tta_mode="flip")
  log_val = np.log(val.probs)
  assert t == pytest.approx(_scipy_temperature(lambda t: _softmax_nll(log_val, val.labels, t)),
                            rel=1e-3)
  assert not 0.9 < t < 1.1  # Something to calibrate: the check above is not trivial.
  assert saved["val_nll_after"] < saved["val_nll_before"]
  val_probs = val.probs / val.probs.sum(axis=1, keepdims=True)  # float32 sums: not quite 1.
  assert saved["val_nll_before"] == pytest.approx(skm.log_loss(val.labels, val_probs,
                                                               labels=range(10)), rel=1e-5)
  # The argmax is unchanged: accuracy, F1 and the confusion matrix equal the unscaled ones.
  assert report["confusion_matrix"] == plain["confusion_matrix"]
  for key in ("accuracy", "macro avg", "weighted avg"):
    assert report["classification_report"][key] == plain["classification_report"][key]
  # Before = the unscaled report; after = sklearn/hand numbers on softmax(log p / T).
  assert scaling["before"]["ece"] == plain["calibration"]["ece"]
  assert scaling["before"]["log_loss"] == plain["log_loss"]
  test = workdir_lib.predict_split(run, ck, "test", tta_mode="flip")
  scaled = special.softmax(np.log(test.probs) / t, axis=1)
  assert report["log_loss"] == scaling["after"]["log_loss"] == pytest.approx(
      skm.log_loss(test.labels, scaled, labels=range(10)), rel=1e-5)
  assert report["calibration"]["ece"] == scaling["after"]["ece"] != scaling["before"]["ece"]
  assert report["headline"]["ece_uncalibrated"] == plain["headline"]["ece"]
  md = open(os.path.join(out, "report.md")).read()
  assert md.splitlines()[0].endswith(f", TTA `flip`, temperature-scaled (T = {t:.4f})")
  assert "### Temperature scaling" in md and "![reliability before scaling]" in md
  assert os.path.getsize(os.path.join(out, "reliability_uncalibrated.png")) > 1000
  assert "report/test_last_tta-flip_calibrated/temperature" in set(curves.read_scalars(workdir))

  # predict: the saved T for its TTA mode (auto), none, or a given number.
  images = str(tmp_path / "images")
  _export_split(run, "test", images, limit=12)
  csv_out = str(tmp_path / "p.csv")
  by_id = {i: n for n, i in enumerate(test.ids)}

  def predicted(**kwargs):
    rows = predict.predict(workdir, images, csv_out, top_k=2, checkpoint="last", **kwargs)
    index = [by_id[os.path.splitext(os.path.basename(r.path))[0]] for r in rows]
    return np.array([r.probs for r in rows]), np.array(index)

  probs, index = predicted(tta="flip")
  np.testing.assert_allclose(probs, scaled[index], atol=2e-5)
  with open(csv_out) as f:
    first = next(csv.DictReader(f))
  assert float(first["prob_1"]) == pytest.approx(probs[0].max(), abs=1e-6)
  probs, index = predicted(tta="flip", temperature="none")
  np.testing.assert_allclose(probs, test.probs[index], atol=2e-6)
  plain_test = workdir_lib.predict_split(run, ck, "test")
  probs, index = predicted()  # No TTA: no saved temperature for it, so unscaled.
  np.testing.assert_allclose(probs, plain_test.probs[index], atol=2e-6)
  probs, index = predicted(temperature=2.0)
  np.testing.assert_allclose(probs, special.softmax(plain_test.scores[index] / 2, axis=1),
                             atol=2e-6)


def test_multilabel_tta_thresholds_and_temperature(tmp_path):
  workdir = make_multilabel_workdir(str(tmp_path))
  out = report_writer.write_reports(None, workdir, splits=("test",), tta="dihedral",
                               calibrate="temperature")["test"]
  plain = _read(report_writer.write_reports(None, workdir, splits=("test",), tta="dihedral")["test"])
  report = _read(out)
  assert not os.path.exists(workdir_lib.thresholds_path(workdir, "best"))  # Plain ones untouched.
  with open(workdir_lib.thresholds_path(workdir, "best", "dihedral")) as f:
    saved = json.load(f)
  assert saved["tta"] == "dihedral"
  names = ["red", "green", "blue"]
  tuned = np.array([saved["thresholds"][n] for n in names])
  t = report["temperature_scaling"]["temperature"]
  run = workdir_lib.load_run(workdir)
  ck = workdir_lib.restore(workdir, "best")
  val = workdir_lib.predict_split(run, ck, "val", tta_mode="dihedral")
  logit_val = special.logit(val.probs)
  ref = _scipy_temperature(lambda t: _sigmoid_nll(logit_val, val.targets, t))
  assert t == pytest.approx(ref, rel=1e-3)
  # The report's thresholds are the saved ones moved with T: the same decisions.
  got = np.array([report["thresholds"]["values"][n] for n in names])
  np.testing.assert_allclose(got, temperature.scale_thresholds(tuned, t))
  for avg in ("micro", "macro"):
    assert report["at_tuned_thresholds"][avg]["f1-score"] == pytest.approx(
        plain["at_tuned_thresholds"][avg]["f1-score"], abs=1e-12)
  test = workdir_lib.predict_split(run, ck, "test", tta_mode="dihedral")
  truth = test.targets > 0.5
  assert report["at_tuned_thresholds"]["micro"]["f1-score"] == pytest.approx(
      skm.f1_score(truth, test.probs >= tuned, average="micro"))
  scaled = special.expit(special.logit(test.probs) / t)
  assert report["log_loss"] == pytest.approx(skm.log_loss(truth.ravel(), scaled.ravel()),
                                             rel=1e-5)
