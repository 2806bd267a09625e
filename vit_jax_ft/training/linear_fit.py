"""Fitting a linear head on fixed features: softmax or per-label sigmoid, L2, full-batch L-BFGS.

The objective is the mean (sample-weighted) cross-entropy plus l2 / 2 * |W|^2,
scikit-learn's LogisticRegression with C = 1 / (N * l2). The linear probe
(training/probe.py) fits one head per L2 value on standardised features and
folds the standardisation into the saved head.
"""

import dataclasses
import functools
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vit_jax_ft.training import metrics as metrics_lib

# A class without training examples is never predicted: kernel 0 and a bias
# this far below the smallest fitted one (sklearn leaves such classes out).
_ABSENT_CLASS_GAP = 10.0


@dataclasses.dataclass(frozen=True)
class LinearFit:
  """A fitted head (logits = x @ kernel + bias) and how the solver ended."""

  kernel: np.ndarray  # [D, C]
  bias: np.ndarray  # [C]
  iterations: int
  grad_max: float  # Largest absolute gradient entry of the objective at the end.
  converged: bool
  seconds: float = 0.0


def parse_l2_grid(text: str) -> list[float]:
  """config.probe.l2_grid ('1e-4,1e-3,...') as floats; ValueError naming the field otherwise."""
  try:
    values = [float(v) for v in text.split(",") if v.strip()]
  except ValueError:
    values = []
  if not values or not all(np.isfinite(v) and v > 0 for v in values):
    raise ValueError(f"config.probe.l2_grid={text!r} must be comma-separated numbers > 0, "
                     "e.g. '1e-5,1e-4,1e-3,1e-2,1e-1'.")
  return values


def sample_weights(targets: np.ndarray, multilabel: bool, balanced: bool) -> np.ndarray:
  """Per-example loss weights: [N] (single-label) or [N, C] (per label and example).

  'balanced' is scikit-learn's class_weight='balanced': n / (classes * count)
  over the classes present in single-label data; for each label of multi-label
  data, the binary version n / (2 * positives) and n / (2 * negatives), as a
  per-label sklearn fit would weight it.
  """
  n = len(targets)
  if multilabel:
    if not balanced:
      return np.ones(targets.shape, np.float64)
    pos = targets.sum(0)
    neg = n - pos
    w_pos = np.where(pos > 0, n / (2.0 * np.maximum(pos, 1)), 1.0)
    w_neg = np.where(neg > 0, n / (2.0 * np.maximum(neg, 1)), 1.0)
    return np.where(targets > 0.5, w_pos, w_neg)
  if not balanced:
    return np.ones(n, np.float64)
  labels = targets.argmax(1)
  counts = np.bincount(labels, minlength=targets.shape[1])
  present = int((counts > 0).sum())
  return n / (present * counts[labels].astype(np.float64))


# Largest curvature of the softmax / sigmoid cross-entropy per unit of logit
# (p(1-p) <= 1/4): sets the preconditioner below.
_LOSS_CURVATURE = 0.25


@functools.partial(jax.jit, static_argnames=("multilabel",))
def _lbfgs(z, y, sw, l2, precond, rotation, u0, b0, max_iter, tol, *, multilabel: bool):
  """L-BFGS on the fit's objective in the preconditioned principal basis.

  The kernel is rotation @ (precond[:, None] * u): `rotation` [D, r] spans the
  centred features' principal directions (a kernel part outside them changes
  no logit, so the penalty alone sets it to zero), `z` [N, r] are the features
  in that basis, and `precond` = 1 / sqrt(curvature * variance + l2) scales
  each direction so that the objective's Hessian in `u` is roughly the
  identity: correlated features (ResNet's 2048) take tens of iterations
  instead of thousands. Stops when every entry of the objective's gradient
  with respect to the kernel and bias is at most `tol`.
  """
  n = z.shape[0]

  def objective(params):
    kernel = precond * params["u"]
    logits = z @ kernel + params["b"]
    if multilabel:
      per = jnp.sum(sw * optax.sigmoid_binary_cross_entropy(logits, y), axis=-1)
    else:
      per = sw * optax.softmax_cross_entropy(logits, y)
    return jnp.sum(per) / n + 0.5 * l2 * jnp.sum(kernel ** 2)

  def grad_max(grad):
    # d/du = precond * d/d(basis kernel); the full kernel's gradient is rotation @ that.
    kernel_grad = rotation @ (grad["u"] / precond)
    return jnp.maximum(jnp.max(jnp.abs(kernel_grad)), jnp.max(jnp.abs(grad["b"])))

  solver = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(objective)

  def cond(carry):
    _, state = carry
    count = optax.tree.get(state, "count")
    return (count == 0) | ((count < max_iter) & (grad_max(optax.tree.get(state, "grad")) > tol))

  def body(carry):
    params, state = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = solver.update(grad, state, params, value=value, grad=grad,
                                   value_fn=objective)
    return optax.apply_updates(params, updates), state

  params = {"u": u0, "b": b0}
  params, state = jax.lax.while_loop(cond, body, (params, solver.init(params)))
  grad = jax.grad(objective)(params)
  return params, optax.tree.get(state, "count"), grad_max(grad)


class _Problem:
  """One set of features and targets, prepared once for fits at several L2 strengths."""

  def __init__(self, features: np.ndarray, targets: np.ndarray, multilabel: bool,
               weights: Optional[np.ndarray]):
    self.targets = np.asarray(targets, np.float64)
    self.multilabel = multilabel
    n = len(self.targets)
    self.counts = self.targets.sum(0)
    # Labels without a finite optimum are left out (see fit_linear).
    self.fit = (self.counts > 0) & (self.counts < n) if multilabel else self.counts > 0
    if weights is None:
      weights = np.ones(self.targets.shape if multilabel else n)
    self.weights = weights[:, self.fit] if multilabel else weights
    x = np.asarray(features, np.float64)
    self.mean = x.mean(0)
    centred = x - self.mean  # Its offset goes to the (unpenalised) bias.
    variance, rotation = np.linalg.eigh(centred.T @ centred / n)
    keep = variance > 1e-12 * max(float(variance.max(initial=0.0)), 1e-300)
    self.variance, self.rotation = variance[keep], rotation[:, keep]
    self.z = centred @ self.rotation

  def solve(self, l2: float, init: Optional["LinearFit"], max_iter: int,
            tol: float) -> "LinearFit":
    t0 = time.time()
    fit, c = self.fit, len(self.fit)
    if init is not None:  # In this basis: the kernel's rotated coordinates, the centred bias.
      k0 = self.rotation.T @ init.kernel[:, fit]
      b0 = init.bias[fit] + self.mean @ init.kernel[:, fit]
    else:
      k0, b0 = np.zeros((len(self.variance), int(fit.sum()))), np.zeros(int(fit.sum()))
    precond = 1.0 / np.sqrt(_LOSS_CURVATURE * self.variance[:, None] + l2)
    u0 = k0 / precond
    with jax.enable_x64(True):
      args = [jnp.asarray(a, jnp.float64) for a in (
          self.z, self.targets[:, fit], self.weights, l2, precond, self.rotation, u0, b0)]
      params, count, gmax = _lbfgs(*args, jnp.int64(max_iter), jnp.float64(tol),
                                   multilabel=self.multilabel)
      kernel_fit = self.rotation @ (precond * np.asarray(params["u"]))
      bias_fit = np.asarray(params["b"]) - self.mean @ kernel_fit
      count, gmax = int(count), float(gmax)
    kernel = np.zeros((len(self.mean), c))
    kernel[:, fit] = kernel_fit
    if self.multilabel:
      n = len(self.targets)
      bias = np.log((self.counts + 0.5) / (n - self.counts + 0.5))
    else:
      bias = np.full(c, bias_fit.min() - _ABSENT_CLASS_GAP if fit.any() else 0.0)
    bias[fit] = bias_fit
    return LinearFit(kernel=kernel, bias=bias, iterations=count, grad_max=gmax,
                     converged=gmax <= tol, seconds=time.time() - t0)


def fit_linear(features: np.ndarray, targets: np.ndarray, *, l2: float, multilabel: bool,
               weights: Optional[np.ndarray] = None, init: Optional[LinearFit] = None,
               max_iter: int = 1000, tol: float = 1e-5) -> LinearFit:
  """Fits logits = features @ kernel + bias with an L2 penalty on the kernel, in float64.

  Minimises (1/N) sum_i w_i loss_i + l2 / 2 * |kernel|^2, loss the softmax
  cross-entropy (single-label) or the sum of per-label sigmoid cross-entropies
  (multi-label); the same minimiser as scikit-learn's LogisticRegression with
  C = 1 / (N * l2) (lbfgs, multinomial; per label for multi-label data).
  Classes (single-label) without a training example, and labels (multi-label)
  that are all positive or all negative, have no finite optimum: they get a
  zero kernel column and a fixed bias (see _ABSENT_CLASS_GAP; the smoothed
  log-odds for such labels) and are left out of the fit.

  Args:
    features: [N, D].
    targets: [N, C] one-hot (single-label) or multi-hot.
    l2: penalty strength (> 0).
    multilabel: sigmoid per label instead of softmax.
    weights: per-example (or, multi-label, per example and label) loss weights.
    init: a previous fit to start from (warm start along a grid).
    max_iter: L-BFGS iteration limit.
    tol: stop when every gradient entry (kernel and bias) is at most this.
  """
  return _Problem(features, targets, multilabel, weights).solve(l2, init, max_iter, tol)


def fit_grid(features: np.ndarray, targets: np.ndarray, l2s: list[float], *, multilabel: bool,
             weights: Optional[np.ndarray] = None, max_iter: int = 1000,
             tol: float = 1e-5) -> list[LinearFit]:
  """fit_linear at each of `l2s` in turn, each fit starting from the previous one."""
  problem = _Problem(features, targets, multilabel, weights)
  fits, previous = [], None
  for l2 in l2s:
    previous = problem.solve(l2, previous, max_iter, tol)
    fits.append(previous)
  return fits


def standardize(train_features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(mean, scale) of the train features; constant features get scale 1.

  Fitting on standardised features makes one l2 grid fit every backbone (and
  L-BFGS converge faster); `fold_head` moves the scaling into the head.
  """
  x = np.asarray(train_features, np.float64)
  mean, scale = x.mean(0), x.std(0)
  scale[scale < 1e-6 * max(float(scale.max(initial=0.0)), 1e-12)] = 1.0
  return mean, scale


def fold_head(fit: LinearFit, mean: np.ndarray, scale: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray]:
  """(kernel, bias) on raw features of a fit on (features - mean) / scale."""
  kernel = fit.kernel / scale[:, None]
  return kernel, fit.bias - mean @ kernel


def split_metrics(logits: np.ndarray, targets: np.ndarray, loss_fn, multilabel: bool) -> dict:
  """The train loop's eval metrics (metrics.summarize) of one whole split's logits."""
  logits, targets = jnp.asarray(logits, jnp.float32), jnp.asarray(targets, jnp.float32)
  stats = metrics_lib.batch_stats(logits, targets, jnp.ones(len(logits)),
                                  loss_fn(logits, targets), multilabel=multilabel)
  return metrics_lib.summarize(metrics_lib.accumulate(None, stats))
