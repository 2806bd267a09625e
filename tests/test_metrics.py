"""Tests for vit_jax_ft.training.metrics against scikit-learn on the unpadded examples."""

import warnings

import jax
import numpy as np
import pytest
from sklearn import metrics as skm

from vit_jax_ft.training import metrics

_batch_stats = jax.jit(metrics.batch_stats, static_argnames=('multilabel', 'threshold'))


def _pad_split(n, batch_size):
  """Batch sizes of a split of n examples: full batches, then one partial."""
  sizes = [batch_size] * (n // batch_size)
  if n % batch_size:
    sizes.append(n % batch_size)
  return sizes


def _run(logits, targets, losses, batch_size, pad_logits, *, multilabel, threshold=0.5):
  """Feeds the examples through padded batches; padding carries poison values."""
  total = None
  start = 0
  for size in _pad_split(len(logits), batch_size):
    pad = batch_size - size
    sl = slice(start, start + size)
    start += size
    lg = np.concatenate([logits[sl], np.repeat(pad_logits[None], pad, 0)]).astype(np.float32)
    tg = np.concatenate([targets[sl], np.zeros((pad,) + targets.shape[1:])]).astype(np.float32)
    ls = np.concatenate([losses[sl], np.full(pad, 1e6)]).astype(np.float32)
    mask = (np.arange(batch_size) < size).astype(np.float32)
    stats = _batch_stats(lg, tg, mask, ls, multilabel=multilabel, threshold=threshold)
    total = metrics.accumulate(total, stats)
  return metrics.summarize(total)


def _sk(fn, *args, **kw):
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')  # sklearn's UndefinedMetricWarning
    return fn(*args, **kw)


# ----------------------------------------------------------------------------
# Single-label.
# ----------------------------------------------------------------------------


def _single_label_data(seed=0, n=21, num_classes=6):
  rng = np.random.RandomState(seed)
  # Truth uses classes 0..3; predictions also use 5 (only predicted); 4 never occurs.
  truth = rng.randint(0, 4, size=n)
  pred = np.where(rng.rand(n) < 0.6, truth, rng.choice([0, 1, 2, 3, 5], size=n))
  pred[:2] = 5
  logits = rng.normal(size=(n, num_classes))
  logits[np.arange(n), pred] = 10.0 + rng.rand(n)
  # Soft (label-smoothed) targets: the true class is the arg-max.
  targets = np.full((n, num_classes), 0.02)
  targets[np.arange(n), truth] = 0.9
  losses = rng.rand(n) * 3
  return truth, pred, logits, targets, losses


@pytest.mark.parametrize('batch_size', [4, 8, 21, 32])
def test_single_label_accuracy_and_macro_f1_match_sklearn(batch_size):
  truth, pred, logits, targets, losses = _single_label_data()
  assert 4 not in truth and 4 not in pred and 5 in pred and 5 not in truth
  # Padded rows predict class 4: counting them would change the label set.
  pad_logits = np.eye(6)[4] * 50.0
  out = _run(logits, targets, losses, batch_size, pad_logits, multilabel=False)
  assert out['num_examples'] == 21
  assert out['accuracy'] == pytest.approx(skm.accuracy_score(truth, pred), abs=1e-9)
  assert out['macro_f1'] == pytest.approx(
      _sk(skm.f1_score, truth, pred, average='macro'), abs=1e-9)
  assert out['loss'] == pytest.approx(losses.astype(np.float32).mean(), rel=1e-6)
  # The test can tell: macro over all 6 classes (class 4 counted as 0) differs.
  assert out['macro_f1'] != pytest.approx(
      _sk(skm.f1_score, truth, pred, labels=range(6), average='macro'), abs=1e-6)


def test_single_label_hand_example():
  # truth: 0 0 1 1, pred: 0 1 1 2 -> accuracy 1/2;
  # F1: class0 = 2/3, class1 = 1/2, class2 (only predicted) = 0 -> macro 7/18.
  logits = np.eye(3)[[0, 1, 1, 2]] * 5.0
  targets = np.eye(3)[[0, 0, 1, 1]]
  out = _run(logits, targets, np.array([1.0, 2.0, 3.0, 4.0]), 3, np.eye(3)[2],
             multilabel=False)
  assert out['accuracy'] == pytest.approx(0.5)
  assert out['macro_f1'] == pytest.approx(7 / 18)
  assert out['loss'] == pytest.approx(2.5)
  assert out['num_examples'] == 4


def test_padded_rows_never_count():
  truth, pred, logits, targets, losses = _single_label_data(seed=3, n=10)
  stats = _batch_stats(logits[:10].astype(np.float32), targets.astype(np.float32),
                       np.ones(10, np.float32), losses.astype(np.float32), multilabel=False)
  one_batch = metrics.summarize(metrics.accumulate(None, stats))
  padded = _run(logits, targets, losses, 16, np.eye(6)[4] * 50.0, multilabel=False)
  assert one_batch == pytest.approx(padded)
  cm = metrics.accumulate(None, _batch_stats(
      np.zeros((4, 6), np.float32), np.zeros((4, 6), np.float32), np.zeros(4, np.float32),
      np.full(4, 1e6, np.float32), multilabel=False))['confusion']
  np.testing.assert_array_equal(cm, 0)


def test_accumulate_sums_float64():
  a = {'count': np.float32(2), 'loss_sum': np.float32(1.5)}
  b = {'count': np.float32(3), 'loss_sum': np.float32(0.25)}
  total = metrics.accumulate(metrics.accumulate(None, a), b)
  assert total['count'] == 5 and total['loss_sum'] == 1.75
  assert total['count'].dtype == np.float64


# ----------------------------------------------------------------------------
# Multi-label.
# ----------------------------------------------------------------------------


def _multi_label_data(seed=0, n=19, num_classes=5, soft=False):
  rng = np.random.RandomState(seed)
  truth = (rng.rand(n, num_classes) < 0.4).astype(int)
  logits = rng.normal(size=(n, num_classes)) * 2
  logits[np.abs(logits) < 1e-3] = 0.5  # keep clear of the threshold
  # Some rows predicted exactly right, for a non-trivial exact match.
  logits[:5] = np.where(truth[:5], 3.0, -3.0)
  targets = truth * (0.9 if soft else 1.0) + (1 - truth) * (0.1 if soft else 0.0)
  losses = rng.rand(n)
  return truth, logits, targets, losses


@pytest.mark.parametrize('batch_size,soft', [(4, False), (8, True), (19, False)])
def test_multi_label_matches_sklearn(batch_size, soft):
  truth, logits, targets, losses = _multi_label_data(soft=soft)
  assert truth.sum(0).min() > 0  # every class occurs in the truth
  pred = (logits >= 0).astype(int)  # sigmoid(logit) >= 0.5
  # Padded rows predict every class with empty truth: they would add false positives.
  out = _run(logits, targets, losses, batch_size, np.full(5, 9.0), multilabel=True)
  assert out['num_examples'] == 19
  assert out['micro_f1'] == pytest.approx(skm.f1_score(truth, pred, average='micro'), abs=1e-9)
  assert out['macro_f1'] == pytest.approx(skm.f1_score(truth, pred, average='macro'), abs=1e-9)
  assert out['exact_match'] == pytest.approx(skm.accuracy_score(truth, pred), abs=1e-9)
  assert out['exact_match'] >= 5 / 19
  assert out['loss'] == pytest.approx(losses.astype(np.float32).mean(), rel=1e-6)


def test_multi_label_threshold():
  truth, logits, targets, losses = _multi_label_data(seed=1)
  threshold = 0.8
  pred = (1 / (1 + np.exp(-logits)) >= threshold).astype(int)
  out = _run(logits, targets, losses, 8, np.full(5, 9.0), multilabel=True,
             threshold=threshold)
  assert out['micro_f1'] == pytest.approx(skm.f1_score(truth, pred, average='micro'), abs=1e-9)
  assert out['exact_match'] == pytest.approx(skm.accuracy_score(truth, pred), abs=1e-9)


def test_multi_label_hand_example():
  # truth [1,0,1] pred [1,1,0]; truth [0,0,1] pred [0,0,1] (exact).
  # tp = [1,0,1], fp = [0,1,0], fn = [0,0,1] -> micro 2*2/(4+1+1) = 2/3;
  # F1 per class [1, 0, 2/3] -> macro 5/9; exact 1/2.
  logits = np.array([[4.0, 4.0, -4.0], [-4.0, -4.0, 4.0]])
  targets = np.array([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
  out = _run(logits, targets, np.array([0.5, 1.5]), 4, np.full(3, 9.0), multilabel=True)
  assert out['micro_f1'] == pytest.approx(2 / 3)
  assert out['macro_f1'] == pytest.approx(5 / 9)
  assert out['exact_match'] == pytest.approx(0.5)
  assert out['loss'] == pytest.approx(1.0)


def test_multi_label_macro_f1_with_absent_class_matches_sklearn():
  truth, logits, targets, losses = _multi_label_data(seed=2)
  truth[:, 4] = 0
  targets[:, 4] = 0
  logits[:, 4] = -5.0  # class 4 never in truth nor predictions
  pred = (logits >= 0).astype(int)
  out = _run(logits, targets, losses, 8, np.full(5, -9.0), multilabel=True)
  expected = _sk(skm.f1_score, truth, pred, average='macro')
  assert out['macro_f1'] == pytest.approx(expected, abs=1e-9)
