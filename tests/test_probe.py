"""Linear probe: the fit against scikit-learn, features, the cache, checkpoints, LP-FT heads."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from test_predict import _export_split  # pylint: disable=g-bad-import-order
from test_train import tiny_demo_config
from test_train_pretrained import _write_converted
from vit_jax_ft import base_config
from vit_jax_ft import models
from vit_jax_ft import predict
from vit_jax_ft import workdir as workdir_lib
from vit_jax_ft.inputs import dataset
from vit_jax_ft.reports import writer as report_writer
from vit_jax_ft.training import init_from
from vit_jax_ft.training import linear_fit
from vit_jax_ft.training import optim
from vit_jax_ft.training import probe
from vit_jax_ft.training import steps
from vit_jax_ft.training import train


def _features(n=240, d=12, c=4, seed=0):
  """Overlapping Gaussian classes with unequal sizes (so balancing changes the fit)."""
  rng = np.random.default_rng(seed)
  labels = rng.choice(c, n, p=np.linspace(1, 3, c) / np.linspace(1, 3, c).sum())
  x = rng.normal(size=(n, d)) + 1.5 * rng.normal(size=(c, d))[labels] + 0.3
  return x, labels


@pytest.mark.parametrize("balanced", [False, True])
def test_softmax_fit_matches_sklearn(balanced):
  x, labels = _features()
  n, c, l2 = len(x), 4, 3e-3
  targets = np.eye(c)[labels]
  fit = linear_fit.fit_linear(x, targets, l2=l2, multilabel=False, tol=1e-9,
                         weights=linear_fit.sample_weights(targets, False, balanced))
  assert fit.converged
  ref = LogisticRegression(C=1.0 / (n * l2), max_iter=10_000, tol=1e-12,
                           class_weight="balanced" if balanced else None).fit(x, labels)
  np.testing.assert_allclose(fit.kernel, ref.coef_.T, atol=1e-5 * np.abs(ref.coef_).max())
  # Softmax biases are defined up to a common shift (it changes no probability), and
  # flat directions leave sklearn's lbfgs (stopping on ftol too) ~1e-5 from the optimum.
  np.testing.assert_allclose(fit.bias - fit.bias.mean(), ref.intercept_ - ref.intercept_.mean(),
                             atol=1e-4)
  probs = jax.nn.softmax(x @ fit.kernel + fit.bias)
  np.testing.assert_allclose(probs, ref.predict_proba(x), atol=1e-6)
  np.testing.assert_array_equal(np.argmax(probs, 1), ref.predict(x))


@pytest.mark.parametrize("balanced", [False, True])
def test_multilabel_fit_matches_per_label_sklearn(balanced):
  x, _ = _features(d=8, seed=1)
  n, l2 = len(x), 1e-2
  rng = np.random.default_rng(2)
  w_true = rng.normal(size=(8, 3))
  targets = (x @ w_true + rng.normal(size=(n, 3)) > 1.0).astype(np.float64)
  targets = np.concatenate([targets, np.zeros((n, 1))], 1)  # A label nobody has.
  fit = linear_fit.fit_linear(x, targets, l2=l2, multilabel=True, tol=1e-9,
                         weights=linear_fit.sample_weights(targets, True, balanced))
  assert fit.converged and targets[:, :3].mean(0).min() < 0.35  # Imbalanced labels.
  for label in range(3):
    ref = LogisticRegression(C=1.0 / (n * l2), max_iter=10_000, tol=1e-12,
                             class_weight="balanced" if balanced else None
                             ).fit(x, targets[:, label])
    np.testing.assert_allclose(fit.kernel[:, label], ref.coef_[0],
                               atol=1e-5 * np.abs(ref.coef_).max())
    np.testing.assert_allclose(fit.bias[label], ref.intercept_[0], atol=1e-5)
    probs = jax.nn.sigmoid(x @ fit.kernel[:, label] + fit.bias[label])
    np.testing.assert_allclose(probs, ref.predict_proba(x)[:, 1], atol=1e-6)
    np.testing.assert_array_equal(probs >= 0.5, ref.predict(x) > 0.5)
  # No positives: no finite optimum, so a zero kernel and the smoothed log-odds.
  np.testing.assert_array_equal(fit.kernel[:, 3], 0.0)
  assert fit.bias[3] == pytest.approx(np.log(0.5 / (n + 0.5)))


def test_standardized_fit_folds_into_a_raw_feature_head():
  x, labels = _features(seed=3)
  x = x * np.arange(1, 13) + 5.0  # Very different feature scales.
  mean, scale = linear_fit.standardize(x)
  fit = linear_fit.fit_linear((x - mean) / scale, np.eye(4)[labels], l2=1e-3, multilabel=False)
  kernel, bias = linear_fit.fold_head(fit, mean, scale)
  np.testing.assert_allclose(x @ kernel + bias, (x - mean) / scale @ fit.kernel + fit.bias,
                             atol=1e-9)


def test_bad_l2_grid_is_one_line_naming_the_field():
  assert linear_fit.parse_l2_grid("1e-3, 1e-2,") == [1e-3, 1e-2]
  for text in ("", "0.1,-1", "a,b", "1e-3,nan"):
    with pytest.raises(ValueError, match="probe.l2_grid"):
      linear_fit.parse_l2_grid(text)


def _tiny_state(family):
  """A fresh train state of a tiny ViT or ResNet-18 for the digits config."""
  config = tiny_demo_config()
  if family == "resnet":
    config.model = base_config.resnet_model_config("resnet18")
  model = models.create_model(config.model, 10, jnp.float32)
  tx = optim.make_optimizer(config.optimizer, optim.learning_rate_schedule(config.optimizer, 10))
  return config, models.create_model(config.model, 0, jnp.float32), steps.create_train_state(
      model, tx, config.data.image_size, seed=0)


@pytest.mark.parametrize("family", ["vit", "resnet"])
def test_features_are_the_head_input_and_flip_averages(family):
  config, feature_model, state = _tiny_state(family)
  images = np.random.default_rng(0).normal(size=(3, 32, 32, 3)).astype(np.float32)
  variables = probe.backbone_variables(state)
  features = np.asarray(probe.backbone_features(feature_model, variables, images, flip=False))
  # Reference: the full classifier with an identity head returns its head's input.
  dim = features.shape[1]
  identity = models.create_model(config.model, dim, jnp.float32)
  params = dict(variables["params"], head={"kernel": np.eye(dim, dtype=np.float32),
                                           "bias": np.zeros(dim, np.float32)})
  full = dict(variables, params=params)

  def manual(x):
    return np.asarray(identity.apply(full, x, train=False))

  np.testing.assert_allclose(features, manual(images), atol=1e-5)
  flipped = np.asarray(probe.backbone_features(feature_model, variables, images, flip=True))
  np.testing.assert_allclose(flipped, 0.5 * (manual(images) + manual(images[:, :, ::-1])),
                             atol=1e-5)
  assert np.abs(flipped - features).max() > 1e-3  # Random images are not symmetric.


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
  """A probe of tiny pretrained ViT weights on the digits (report included), and its config."""
  root = tmp_path_factory.mktemp("probe")
  config = tiny_demo_config(**{"final_report": True, "probe.l2_grid": "3e-1,3e-2,3e-3",
                              "probe.tol": 1e-8})
  _write_converted(root / "weights", config)
  config.init_from = str(root / "weights")
  config.data.normalization = "auto"
  workdir = str(root / "probe")
  results = probe.run_probe(config, workdir)
  return config, workdir, results


def _summary(workdir):
  with open(os.path.join(workdir, probe.PROBE_FILE)) as f:
    return json.load(f)


def _cached(workdir, split):
  with np.load(_summary(workdir)["features"][split]["path"]) as f:
    return f["features"], f["targets"]


def test_probe_chooses_on_val_and_writes_a_run(probed):
  _, workdir, results = probed
  summary = _summary(workdir)
  assert [row["l2"] for row in summary["grid"]] == [3e-1, 3e-2, 3e-3]
  assert all(row["converged"] for row in summary["grid"])
  best = max(row["val_accuracy"] for row in summary["grid"])
  assert summary["chosen"]["val_accuracy"] == best == results["val_accuracy"]
  assert results["val_num_examples"] == 180 and results["test_num_examples"] == 180
  assert not any(summary["features"][s]["cached"] for s in ("train", "val", "test"))
  with open(os.path.join(workdir, "eval_results.json")) as f:
    assert json.load(f) == results
  with open(os.path.join(workdir, "config.json")) as f:  # 'auto' resolved from the weights.
    assert json.load(f)["data"]["normalization"] == "minus_one_to_one"
  with open(os.path.join(workdir, "pretrained.json")) as f:
    assert len(json.load(f)["fingerprint"]) == 16
  for split in ("val", "test"):
    assert os.path.exists(os.path.join(workdir, "reports", f"{split}_best", "report.md"))


def test_checkpoint_logits_are_features_times_head(probed):
  _, workdir, _ = probed
  run = workdir_lib.load_run(workdir)
  for which in ("best", "last"):
    head = workdir_lib.restore(workdir, which).variables["params"]["head"]
    features, targets = _cached(workdir, "val")
    probs = jax.nn.softmax(features @ np.asarray(head["kernel"]) + np.asarray(head["bias"]))
    # Through the model, the eval pipeline and its padding (180 = 64 + 64 + 52).
    preds = workdir_lib.predict_split(run, workdir_lib.restore(workdir, which), "val")
    np.testing.assert_allclose(preds.probs, probs, atol=1e-5)
    np.testing.assert_array_equal(preds.targets, targets)
  # The chosen head is the sklearn fit on standardised train features, scaling folded in.
  x, y = (a.astype(np.float64) for a in _cached(workdir, "train"))
  mean, std = x.mean(0), x.std(0)
  ref = LogisticRegression(C=1.0 / (len(x) * _summary(workdir)["chosen_l2"]), max_iter=10_000,
                           tol=1e-10).fit((x - mean) / std, y.argmax(1))
  val = _cached(workdir, "val")[0]
  np.testing.assert_allclose(probs, ref.predict_proba((val - mean) / std), atol=2e-5)
  with open(os.path.join(workdir, "reports", "val_best", "report.json")) as f:
    assert json.load(f)["headline"]["accuracy"] == pytest.approx(
        _summary(workdir)["chosen"]["val_accuracy"])


def test_evaluate_and_predict_read_the_probe_workdir(probed, tmp_path):
  _, workdir, _ = probed
  dirs = report_writer.write_reports(None, workdir, splits=["test"])
  assert os.path.exists(os.path.join(dirs["test"], "report.json"))
  run = workdir_lib.load_run(workdir)
  _export_split(run, "test", str(tmp_path / "images"), limit=6)
  rows = predict.predict(workdir, str(tmp_path / "images"), str(tmp_path / "preds.csv"))
  assert len(rows) == 6 and not any(r.error for r in rows)


def test_features_are_cached_until_the_preprocessing_changes(probed, tmp_path, monkeypatch):
  config, source, _ = probed
  workdir = str(tmp_path / "probe")
  config = config.copy_and_resolve_references()
  config.final_report = False
  config.data.dir = os.path.join(source, "data")  # The probed fixture's copy of the digits.
  probe.run_probe(config, workdir)
  first = _summary(workdir)["features"]

  def fail(*args, **kwargs):
    raise AssertionError("features were extracted again")

  with monkeypatch.context() as patch:
    patch.setattr(probe, "extract_split", fail)
    probe.run_probe(config, workdir)
  second = _summary(workdir)["features"]
  assert all(second[s]["cached"] and second[s]["key"] == first[s]["key"] for s in first)
  # The same weights and data in another workdir: the same key.
  assert first["train"]["key"] == _summary(source)["features"]["train"]["key"]

  config.data.eval_crop_fraction = 0.875  # The same weights, other inputs.
  probe.run_probe(config, workdir)
  assert not any(_summary(workdir)["features"][s]["cached"] for s in first)

  config.data.image_size = 48
  probe.run_probe(config, workdir)
  third = _summary(workdir)["features"]
  assert not any(third[s]["cached"] for s in third)
  assert all(third[s]["key"] != first[s]["key"] for s in third)
  assert sorted(os.listdir(os.path.join(workdir, probe.PROBE_DIR))) == sorted(
      os.path.basename(third[s]["path"]) for s in third)  # The stale files are gone.


def _fresh_state(config, workdir):
  data_dir, info = dataset.load_data_info(config, workdir)
  model = models.create_model(config.model, len(info["class_names"]), jnp.float32)
  tx = optim.make_optimizer(config.optimizer, optim.learning_rate_schedule(config.optimizer, 10))
  return steps.create_train_state(model, tx, config.data.image_size, seed=5), info


def test_init_head_from_copies_exactly_the_probe_head(probed, tmp_path):
  config, source, _ = probed
  config = config.copy_and_resolve_references()
  config.init_head_from = source
  state, info = _fresh_state(config, str(tmp_path))
  new = init_from.load_head(config, state, info, str(tmp_path))
  head = workdir_lib.restore(source, "best").variables["params"]["head"]
  for key in ("kernel", "bias"):
    np.testing.assert_array_equal(new.params["head"][key], head[key])
  assert np.abs(np.asarray(head["kernel"])).max() > 0.1
  same = jax.tree.map(np.array_equal, {k: v for k, v in new.params.items() if k != "head"},
                      {k: v for k, v in state.params.items() if k != "head"})
  assert all(jax.tree.leaves(same))


def test_training_starts_from_the_probe_head(probed, tmp_path):
  config, source, _ = probed
  config = config.copy_and_resolve_references()
  config.init_head_from = source
  config.final_report = False
  config.total_steps, config.optimizer.warmup_steps = 1, 0
  config.optimizer.lr, config.optimizer.weight_decay = 1e-9, 0.0  # Keeps the head as it starts.
  workdir = str(tmp_path / "lpft")
  results = train.train_and_evaluate(config, workdir)
  probe_head = workdir_lib.restore(source, "best").variables["params"]["head"]
  head = workdir_lib.restore(workdir, "last").variables["params"]["head"]
  np.testing.assert_allclose(head["kernel"], probe_head["kernel"], atol=1e-6)
  with open(os.path.join(source, "eval_results.json")) as f:
    assert results["val_accuracy"] == pytest.approx(json.load(f)["val_accuracy"])


def test_init_head_from_refuses_other_classes(probed, tmp_path):
  config, source, _ = probed
  config = config.copy_and_resolve_references()
  config.init_head_from = source
  state, info = _fresh_state(config, str(tmp_path))
  renamed = dict(info, class_names=["zero"] + info["class_names"][1:])
  with pytest.raises(ValueError, match="same classes in the same order"):
    init_from.load_head(config, state, renamed, str(tmp_path))
  fewer = dict(info, class_names=info["class_names"][:9])
  with pytest.raises(ValueError, match="has 10 single-label classes.*dataset has 9"):
    init_from.load_head(config, state, fewer, str(tmp_path))


def test_multilabel_probe_with_flips_balancing_and_a_fine_tuning_recipe(tmp_path):
  from test_evaluate import _write_multilabel_dataset  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path / "data")
  _write_multilabel_dataset(data_dir, np.random.default_rng(0))
  config = tiny_demo_config(**{
      "data.source": "tfrecord", "data.dir": data_dir, "data.image_size": 16,
      "model.patch_size": 8, "loss.name": "sigmoid_bce", "eval_batch_size": 16,
      "best_metric": "macro_f1", "final_report": True, "probe.flip": True,
      "probe.class_weight": "balanced", "probe.l2_grid": "1e-2,1e-1",
      # A shipped fine-tuning recipe's controls (configs/resnet_skin_cancer.py) must not stop
      # the probe of the same config, and its EMA must not leak into the probe's run.
      "optimizer.freeze": "^embedding/", "optimizer.head_only_steps": 2,
      "optimizer.layer_decay": 0.7, "optimizer.lr_mults": "head/=10", "ema_decay": 0.99})
  workdir = str(tmp_path / "probe")
  results = probe.run_probe(config, workdir)
  assert not workdir_lib.run_uses_ema(workdir)
  assert workdir_lib.restore(workdir, "best").weights == "raw"
  summary = _summary(workdir)
  assert summary["class_weight"] == "balanced" and summary["flip"]
  assert summary["chosen"]["val_macro_f1"] == max(r["val_macro_f1"] for r in summary["grid"])
  assert results["val_macro_f1"] == summary["chosen"]["val_macro_f1"] > 0.6  # Bright channels.
  assert {"val_micro_f1", "test_exact_match"} <= set(results)
  assert os.path.exists(workdir_lib.thresholds_path(workdir, "best"))  # The multi-label report.


def test_grid_edge_names_the_end_a_choice_sits_at():
  grid = [1e-1, 1e-2, 1e-3]
  assert probe.grid_edge(1e-1, grid) == "largest"
  assert probe.grid_edge(1e-3, grid) == "smallest"
  assert probe.grid_edge(1e-2, grid) == ""
  assert probe.grid_edge(1e-1, [1e-1, 1e-2]) == ""  # Too few values to call it an edge.
