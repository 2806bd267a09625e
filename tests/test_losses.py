"""Tests for vit_jax_ft.training.losses against independent float64 numpy references."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import scipy.special
import sklearn.metrics
import sklearn.utils.class_weight

from vit_jax_ft.data import class_weights as class_weights_lib
from vit_jax_ft.training import losses

B, C = 6, 5


# ----------------------------------------------------------------------------
# Literal float64 references: loops over examples/classes, np.log of
# probabilities. Deliberately written without the tricks used in losses.py.
# ----------------------------------------------------------------------------


def ref_softmax_probs(z):
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max())  # shift only to avoid float64 overflow
  return e / e.sum()


def ref_softmax_ce(logits, targets, label_smoothing=0.0, class_weights=None):
  logits = np.asarray(logits, np.float64)
  targets = np.asarray(targets, np.float64)
  out = np.zeros(logits.shape[0])
  n = logits.shape[1]
  for i in range(logits.shape[0]):
    p = ref_softmax_probs(logits[i])
    loss = 0.0
    for c in range(n):
      t = targets[i, c] * (1 - label_smoothing) + label_smoothing / n
      if t != 0:
        loss -= t * np.log(p[c])
    if class_weights is not None:
      loss *= sum(targets[i, c] * class_weights[c] for c in range(n))
    out[i] = loss
  return out


def ref_softmax_focal(logits, targets, gamma, alpha=None, class_weights=None):
  logits = np.asarray(logits, np.float64)
  targets = np.asarray(targets, np.float64)
  a = 1.0 if alpha is None else alpha
  out = np.zeros(logits.shape[0])
  for i in range(logits.shape[0]):
    p = ref_softmax_probs(logits[i])
    loss = 0.0
    for c in range(logits.shape[1]):
      if targets[i, c] != 0:
        loss -= targets[i, c] * a * (1 - p[c]) ** gamma * np.log(p[c])
    if class_weights is not None:
      loss *= float(np.dot(targets[i], class_weights))
    out[i] = loss
  return out


def ref_sigmoid_bce(logits, targets, class_weights=None):
  logits = np.asarray(logits, np.float64)
  targets = np.asarray(targets, np.float64)
  out = np.zeros(logits.shape[0])
  for i in range(logits.shape[0]):
    for c in range(logits.shape[1]):
      p = scipy.special.expit(logits[i, c])
      q = scipy.special.expit(-logits[i, c])  # == 1 - p, without cancellation
      t = targets[i, c]
      l = -(t * np.log(p) + (1 - t) * np.log(q))
      out[i] += l * (1.0 if class_weights is None else class_weights[c])
  return out


def ref_sigmoid_focal(logits, targets, gamma, alpha, class_weights=None):
  """Hard (0/1) targets only: the RetinaNet definition verbatim."""
  logits = np.asarray(logits, np.float64)
  out = np.zeros(logits.shape[0])
  for i in range(logits.shape[0]):
    for c in range(logits.shape[1]):
      if targets[i, c] == 1:
        p_t = scipy.special.expit(logits[i, c])
        alpha_t = 1.0 if alpha is None else alpha
      else:
        p_t = scipy.special.expit(-logits[i, c])
        alpha_t = 1.0 if alpha is None else 1 - alpha
      l = -alpha_t * (1 - p_t) ** gamma * np.log(p_t)
      out[i] += l * (1.0 if class_weights is None else class_weights[c])
  return out


# ----------------------------------------------------------------------------
# Inputs.
# ----------------------------------------------------------------------------

RNG = np.random.default_rng(0)


def make_logits(scale):
  return (RNG.standard_normal((B, C)) * scale).astype(np.float32)


def extreme_logits():
  # Mix of +-50 and moderate values, so that softmax probabilities of the
  # target class range from ~1 to ~e^-100.
  z = RNG.choice([-50.0, 50.0, 0.0, 3.0], size=(B, C)).astype(np.float32)
  z[0] = [50, -50, -50, -50, -50]
  z[1] = [-50, 50, 50, -50, 0]
  return z


def one_hot_targets():
  labels = np.arange(B) % C
  return np.eye(C, dtype=np.float32)[labels]


def soft_targets():
  t = RNG.random((B, C)).astype(np.float32)
  return t / t.sum(-1, keepdims=True)


def mixup_targets():
  t = one_hot_targets()
  lam = 0.7
  return lam * t + (1 - lam) * t[::-1]


def multi_hot_targets():
  t = (RNG.random((B, C)) < 0.4).astype(np.float32)
  t[0] = 0  # an example with no positive label
  t[1] = 1
  return t


LOGITS = {"moderate": make_logits(2.0), "extreme": extreme_logits()}
SOFTMAX_TARGETS = {"one_hot": one_hot_targets(), "soft": soft_targets(),
                   "mixup": mixup_targets()}
WEIGHTS = np.array([0.5, 2.0, 1.0, 3.0, 0.25], np.float32)

TOL = dict(rtol=2e-5, atol=2e-5)


def check(got, want):
  got = np.asarray(got)
  assert got.dtype == np.float32
  assert got.shape == (B,)
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(got, want, **TOL)


# ----------------------------------------------------------------------------
# softmax_cross_entropy
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("logits_kind", LOGITS)
@pytest.mark.parametrize("targets_kind", SOFTMAX_TARGETS)
@pytest.mark.parametrize("ls", [0.0, 0.1])
@pytest.mark.parametrize("weighted", [False, True])
def test_softmax_ce_matches_reference(logits_kind, targets_kind, ls, weighted):
  logits, targets = LOGITS[logits_kind], SOFTMAX_TARGETS[targets_kind]
  w = WEIGHTS if weighted else None
  got = losses.softmax_cross_entropy(
      logits, targets, label_smoothing=ls, class_weights=w)
  check(got, ref_softmax_ce(logits, targets, ls, w))


def test_softmax_ce_matches_optax():
  logits, targets = LOGITS["moderate"], SOFTMAX_TARGETS["soft"]
  np.testing.assert_allclose(
      losses.softmax_cross_entropy(logits, targets),
      optax.softmax_cross_entropy(logits, targets), rtol=1e-6)
  smoothed = optax.smooth_labels(targets, 0.2)
  np.testing.assert_allclose(
      losses.softmax_cross_entropy(logits, targets, label_smoothing=0.2),
      optax.softmax_cross_entropy(logits, smoothed), rtol=1e-6)


def test_softmax_ce_two_class_by_hand():
  # logits [0, ln 3] -> p = [1/4, 3/4].
  logits = np.array([[0.0, math.log(3.0)]], np.float32)
  target = np.array([[1.0, 0.0]], np.float32)
  # Class 0: -ln(1/4) = ln 4 = 1.3862944.
  np.testing.assert_allclose(
      losses.softmax_cross_entropy(logits, target), [1.3862944], rtol=1e-6)
  # ls=0.1 -> t = [0.95, 0.05]:
  # 0.95 * ln 4 + 0.05 * ln(4/3) = 1.3169796 + 0.0143841 = 1.3313637.
  np.testing.assert_allclose(
      losses.softmax_cross_entropy(logits, target, label_smoothing=0.1),
      [1.3313637], rtol=1e-6)
  # Class weights [2, 0.5]: one-hot on class 0 -> 2 * ln 4 = 2.7725887
  # (not renormalised by the weight sum, unlike torch's reduction='mean').
  np.testing.assert_allclose(
      losses.softmax_cross_entropy(logits, target, class_weights=[2.0, 0.5]),
      [2.7725887], rtol=1e-6)


def test_class_weights_mixup_and_no_renormalisation():
  logits = LOGITS["moderate"]
  targets = mixup_targets()
  unweighted = np.asarray(losses.softmax_cross_entropy(logits, targets))
  weighted = np.asarray(
      losses.softmax_cross_entropy(logits, targets, class_weights=WEIGHTS))
  labels_a = np.arange(B) % C
  labels_b = labels_a[::-1]
  example_w = 0.7 * WEIGHTS[labels_a] + 0.3 * WEIGHTS[labels_b]
  np.testing.assert_allclose(weighted, unweighted * example_w, rtol=1e-6)


def test_class_weights_shape_mismatch_raises():
  with pytest.raises(ValueError, match="class_weights"):
    losses.softmax_cross_entropy(
        LOGITS["moderate"], one_hot_targets(), class_weights=np.ones(C + 1))
  with pytest.raises(ValueError, match="same shape"):
    losses.softmax_cross_entropy(LOGITS["moderate"], np.zeros(B))


def test_half_precision_inputs_computed_in_float32():
  logits = LOGITS["moderate"]
  targets = one_hot_targets()
  want = ref_softmax_ce(jnp.asarray(logits, jnp.bfloat16).astype(np.float32),
                        targets)
  got = losses.softmax_cross_entropy(
      jnp.asarray(logits, jnp.bfloat16), jnp.asarray(targets, jnp.bfloat16))
  check(got, want)


# ----------------------------------------------------------------------------
# softmax_focal_loss
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("logits_kind", LOGITS)
@pytest.mark.parametrize("targets_kind", SOFTMAX_TARGETS)
@pytest.mark.parametrize("gamma,alpha,weighted", [
    (2.0, None, False), (2.0, 0.25, True), (0.5, None, True),
    (1.0, 0.75, False)])
def test_softmax_focal_matches_reference(logits_kind, targets_kind, gamma,
                                         alpha, weighted):
  logits, targets = LOGITS[logits_kind], SOFTMAX_TARGETS[targets_kind]
  w = WEIGHTS if weighted else None
  got = losses.softmax_focal_loss(
      logits, targets, gamma=gamma, alpha=alpha, class_weights=w)
  check(got, ref_softmax_focal(logits, targets, gamma, alpha, w))


@pytest.mark.parametrize("logits_kind", LOGITS)
@pytest.mark.parametrize("weighted", [False, True])
def test_softmax_focal_gamma0_is_ce(logits_kind, weighted):
  logits, targets = LOGITS[logits_kind], soft_targets()
  w = WEIGHTS if weighted else None
  np.testing.assert_array_equal(
      losses.softmax_focal_loss(logits, targets, gamma=0.0, class_weights=w),
      losses.softmax_cross_entropy(logits, targets, class_weights=w))


def test_softmax_focal_two_class_by_hand():
  # p = [1/4, 3/4], target 0, gamma 2: (3/4)^2 * ln 4 = 0.5625 * 1.3862944
  # = 0.7797906.
  logits = np.array([[0.0, math.log(3.0)]], np.float32)
  target = np.array([[1.0, 0.0]], np.float32)
  np.testing.assert_allclose(
      losses.softmax_focal_loss(logits, target, gamma=2.0), [0.7797906],
      rtol=1e-6)


# ----------------------------------------------------------------------------
# sigmoid losses
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("logits_kind", LOGITS)
@pytest.mark.parametrize("targets_kind", ["multi_hot", "soft"])
@pytest.mark.parametrize("weighted", [False, True])
def test_sigmoid_bce_matches_reference(logits_kind, targets_kind, weighted):
  logits = LOGITS[logits_kind]
  targets = (multi_hot_targets() if targets_kind == "multi_hot"
             else RNG.random((B, C)).astype(np.float32))
  w = WEIGHTS if weighted else None
  got = losses.sigmoid_binary_cross_entropy(logits, targets, class_weights=w)
  check(got, ref_sigmoid_bce(logits, targets, w))


def test_sigmoid_bce_is_sum_of_sklearn_per_label_log_loss():
  logits, targets = LOGITS["moderate"], multi_hot_targets()
  probs = scipy.special.expit(logits.astype(np.float64))
  # log_loss(column c) is the batch mean of label c's BCE; summing over labels
  # gives the batch mean of our per-example (summed-over-labels) loss.
  per_label_means = [
      sklearn.metrics.log_loss(targets[:, c], probs[:, c], labels=[0, 1])
      for c in range(C)]
  got = losses.sigmoid_binary_cross_entropy(logits, targets)
  np.testing.assert_allclose(np.mean(got), np.sum(per_label_means), rtol=1e-5)


@pytest.mark.parametrize("logits_kind", LOGITS)
@pytest.mark.parametrize("gamma,alpha,weighted", [
    (2.0, 0.25, False), (2.0, None, True), (0.5, 0.5, False),
    (1.5, 0.25, True)])
def test_sigmoid_focal_matches_reference(logits_kind, gamma, alpha, weighted):
  logits, targets = LOGITS[logits_kind], multi_hot_targets()
  w = WEIGHTS if weighted else None
  got = losses.sigmoid_focal_loss(
      logits, targets, gamma=gamma, alpha=alpha, class_weights=w)
  check(got, ref_sigmoid_focal(logits, targets, gamma, alpha, w))


@pytest.mark.parametrize("alpha", [None, 0.25])
def test_sigmoid_focal_soft_targets_match_optax(alpha):
  logits = LOGITS["moderate"]
  targets = RNG.random((B, C)).astype(np.float32)
  want = optax.sigmoid_focal_loss(logits, targets, alpha=alpha,
                                  gamma=2.0).sum(-1)
  np.testing.assert_allclose(
      losses.sigmoid_focal_loss(logits, targets, gamma=2.0, alpha=alpha),
      want, rtol=1e-5, atol=1e-6)


def test_sigmoid_focal_gamma0_no_alpha_is_bce():
  logits, targets = LOGITS["extreme"], multi_hot_targets()
  np.testing.assert_array_equal(
      losses.sigmoid_focal_loss(logits, targets, gamma=0.0, alpha=None),
      losses.sigmoid_binary_cross_entropy(logits, targets))


# ----------------------------------------------------------------------------
# Gradients at extreme logits.
# ----------------------------------------------------------------------------

ALL_LOSSES = {
    "ce": lambda z, t: losses.softmax_cross_entropy(z, t, label_smoothing=0.1),
    "weighted_ce": lambda z, t: losses.softmax_cross_entropy(
        z, t, class_weights=WEIGHTS),
    "focal_g2": lambda z, t: losses.softmax_focal_loss(z, t, gamma=2.0),
    "focal_g0.5": lambda z, t: losses.softmax_focal_loss(z, t, gamma=0.5),
    "focal_g0": lambda z, t: losses.softmax_focal_loss(z, t, gamma=0.0),
    "bce": losses.sigmoid_binary_cross_entropy,
    "sigmoid_focal_g2": lambda z, t: losses.sigmoid_focal_loss(z, t),
    "sigmoid_focal_g0.5": lambda z, t: losses.sigmoid_focal_loss(
        z, t, gamma=0.5),
}


@pytest.mark.parametrize("name", ALL_LOSSES)
@pytest.mark.parametrize("magnitude", [50.0, 1e4])
def test_values_and_gradients_finite_at_extreme_logits(name, magnitude):
  fn = ALL_LOSSES[name]
  z = np.array([[1, -1, -1, -1, -1],    # confident and right
                [-1, 1, -1, -1, -1],    # confident and wrong
                [1, 1, -1, -1, -1],
                [-1, -1, -1, -1, -1],
                [1, 1, 1, 1, 1],
                [0, 0, 0, 0, 1]], np.float32) * magnitude
  t = one_hot_targets()
  t[0] = [1, 0, 0, 0, 0]
  t[1] = [1, 0, 0, 0, 0]
  value, grad = jax.value_and_grad(lambda z: fn(z, t).sum())(z)
  assert np.isfinite(value)
  assert np.all(np.isfinite(grad)), grad
  # Gradient of the per-example loss w.r.t. bf16 logits too.
  g16 = jax.grad(lambda z: fn(z, t).sum())(jnp.asarray(z, jnp.bfloat16))
  assert np.all(np.isfinite(np.asarray(g16, np.float32)))


# ----------------------------------------------------------------------------
# get_loss_fn / is_multilabel_loss
# ----------------------------------------------------------------------------


def make_config(name, label_smoothing=0.1, focal_gamma=2.0, focal_alpha=0.25):
  return ml_collections.ConfigDict(dict(
      name=name, label_smoothing=label_smoothing, focal_gamma=focal_gamma,
      focal_alpha=focal_alpha))


def test_get_loss_fn_dispatch():
  z, t = LOGITS["moderate"], soft_targets()
  expected = {
      "ce": losses.softmax_cross_entropy(z, t, label_smoothing=0.1),
      "weighted_ce": losses.softmax_cross_entropy(
          z, t, label_smoothing=0.1, class_weights=WEIGHTS),
      "focal": losses.softmax_focal_loss(z, t, gamma=2.0, alpha=0.25),
      "weighted_focal": losses.softmax_focal_loss(
          z, t, gamma=2.0, alpha=0.25, class_weights=WEIGHTS),
      "sigmoid_bce": losses.sigmoid_binary_cross_entropy(
          z, t, class_weights=WEIGHTS),
      "sigmoid_focal": losses.sigmoid_focal_loss(
          z, t, gamma=2.0, alpha=0.25, class_weights=WEIGHTS),
  }
  assert set(expected) == set(losses.LOSS_NAMES)
  for name, want in expected.items():
    fn = losses.get_loss_fn(make_config(name), class_weights=WEIGHTS)
    np.testing.assert_allclose(jax.jit(fn)(z, t), want, rtol=1e-6,
                               err_msg=name)


def test_get_loss_fn_focal_alpha_none_and_sigmoid_without_weights():
  z, t = LOGITS["moderate"], multi_hot_targets()
  fn = losses.get_loss_fn(make_config("focal", focal_alpha=None,
                                      focal_gamma=1.0))
  np.testing.assert_allclose(fn(z, t), losses.softmax_focal_loss(
      z, t, gamma=1.0, alpha=None), rtol=1e-6)
  fn = losses.get_loss_fn(make_config("sigmoid_focal", focal_alpha=None))
  np.testing.assert_allclose(fn(z, t), losses.sigmoid_focal_loss(
      z, t, gamma=2.0, alpha=None), rtol=1e-6)
  fn = losses.get_loss_fn(make_config("sigmoid_bce"))
  np.testing.assert_allclose(
      fn(z, t), losses.sigmoid_binary_cross_entropy(z, t), rtol=1e-6)


def test_get_loss_fn_unweighted_ignores_class_weights(caplog):
  z, t = LOGITS["moderate"], one_hot_targets()
  with caplog.at_level("WARNING"):
    fn = losses.get_loss_fn(make_config("ce"), class_weights=WEIGHTS)
  assert "weighted_ce" in caplog.text
  np.testing.assert_allclose(
      fn(z, t), losses.softmax_cross_entropy(z, t, label_smoothing=0.1),
      rtol=1e-6)


@pytest.mark.parametrize("name", ["weighted_ce", "weighted_focal"])
def test_get_loss_fn_weighted_requires_class_weights(name):
  with pytest.raises(ValueError, match=name):
    losses.get_loss_fn(make_config(name))


def test_get_loss_fn_unknown_name():
  with pytest.raises(ValueError) as e:
    losses.get_loss_fn(make_config("hinge"))
  msg = str(e.value)
  assert "'hinge'" in msg
  for name in losses.LOSS_NAMES:
    assert name in msg
  with pytest.raises(ValueError, match="hinge"):
    losses.is_multilabel_loss("hinge")


def test_get_loss_fn_bad_class_weights():
  with pytest.raises(ValueError, match="class_weights"):
    losses.get_loss_fn(make_config("weighted_ce"),
                       class_weights=np.ones((2, C)))
  with pytest.raises(ValueError, match="non-negative"):
    losses.get_loss_fn(make_config("weighted_ce"),
                       class_weights=[1.0, -1.0, 1.0, 1.0, 1.0])
  fn = losses.get_loss_fn(make_config("weighted_ce"),
                          class_weights=np.ones(C - 1))
  with pytest.raises(ValueError, match=r"\(5,\)"):
    fn(LOGITS["moderate"], one_hot_targets())


def test_is_multilabel_loss():
  assert {n for n in losses.LOSS_NAMES if losses.is_multilabel_loss(n)} == {
      "sigmoid_bce", "sigmoid_focal"}


# ----------------------------------------------------------------------------
# compute_class_weights
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_compute_class_weights_matches_sklearn_balanced(seed):
  rng = np.random.default_rng(seed)
  counts = rng.integers(1, 500, size=7)
  y = np.repeat(np.arange(7), counts)
  want = sklearn.utils.class_weight.compute_class_weight(
      "balanced", classes=np.arange(7), y=y)
  got = class_weights_lib.compute_class_weights(counts)
  np.testing.assert_array_equal(got, want)
  # sklearn's 'balanced' already has count-weighted mean 1.
  np.testing.assert_allclose(np.sum(counts * got) / np.sum(counts), 1.0,
                             rtol=1e-12)


def test_compute_class_weights_sqrt_mode():
  counts = np.array([1000, 100, 10, 1])
  w = class_weights_lib.compute_class_weights(counts, mode="inverse_sqrt_frequency")
  np.testing.assert_allclose(np.sum(counts * w) / np.sum(counts), 1.0,
                             rtol=1e-12)
  np.testing.assert_allclose(w[1:] / w[:-1], np.sqrt(10.0), rtol=1e-12)


def test_compute_class_weights_errors():
  with pytest.raises(ValueError, match=r"\[2, 4\]"):
    class_weights_lib.compute_class_weights([5, 3, 0, 1, 0])
  with pytest.raises(ValueError, match="balanced_sqrt"):
    class_weights_lib.compute_class_weights([1, 2], mode="balanced_sqrt")
