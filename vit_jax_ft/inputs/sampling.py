"""Class-balanced resampling of the train stream, deterministic and resumable.

`data.sampler` picks target class shares p_c proportional to n_c ** power
(n_c: train examples of class c): 'none' (power 1, the data as it is, no
resampling), 'sqrt' (power 1/2) or 'balanced' (power 0, uniform over the
classes that have examples).

Each epoch every record is emitted a whole number of times: example i has a
rate w_i (mean 1 over the split) and appears floor(w_i) times plus once more
with probability frac(w_i), decided by a stateless uniform keyed by
(seed, epoch, record). Copies are spread by the shuffle buffer, get their own
positions in the epoch and so their own augmentations. Rare classes are
repeated and frequent ones thinned, while every record is read once per
epoch: there is no per-class stream that would re-read the whole split for
each rare example. Epochs have about as many examples as the split (their
exact lengths are a function of the seed, so a resumed run finds its place
without reading earlier epochs).

Single-label: w_i = r_{y_i} with r_c = p_c / (n_c / N), so classes appear
with shares p_c in expectation.

Multi-label: an example's rate is that of its rarest label,
w_i = max_{c in y_i} r_c (the repeat-factor idea of LVIS, Gupta et al. 2019),
examples without labels get the smallest class rate, and the rates are
rescaled to mean 1. Label frequencies move towards p_c but, since labels
co-occur, do not reach it exactly.
"""

import numpy as np
import tensorflow as tf

SAMPLERS = {"none": 1.0, "sqrt": 0.5, "balanced": 0.0}


def power_of(sampler: str) -> float:
  """The frequency exponent of a sampler name."""
  if sampler not in SAMPLERS:
    raise ValueError(f"data.sampler must be one of {sorted(SAMPLERS)}, got {sampler!r}.")
  return SAMPLERS[sampler]


def example_rates(multi_hot: np.ndarray, power: float) -> np.ndarray:
  """Per-example rates w [N] (mean 1) from [N, C] multi-hot labels.

  Raises:
    ValueError: if no example has a label.
  """
  multi_hot = np.asarray(multi_hot, bool)
  counts = multi_hot.sum(0).astype(np.float64)
  present = counts > 0
  if not present.any():
    raise ValueError("The train split has no labels to balance.")
  shares = np.where(present, np.power(np.maximum(counts, 1.0), power), 0.0)
  shares /= shares.sum()
  freq = counts / len(multi_hot)
  class_rate = np.where(present, shares / np.where(present, freq, 1.0), 0.0)
  rates = np.where(multi_hot, class_rate[None, :], 0.0).max(1)
  rates[~multi_hot.any(1)] = class_rate[present].min()
  return rates / rates.mean()


def epoch_copies(rates: tf.Tensor, key: tf.Tensor) -> tf.Tensor:
  """int64 [N] copies of each record in one epoch: floor(w) + Bernoulli(frac(w)).

  `rates` is float64 [N]; `key` a [2] int64 stateless seed for the epoch. The
  same ops run eagerly (to find epoch lengths) and inside tf.data.
  """
  rates = tf.convert_to_tensor(rates, tf.float64)
  whole = tf.floor(rates)
  u = tf.random.stateless_uniform(tf.shape(rates), seed=key, dtype=tf.float64)
  return tf.cast(whole, tf.int64) + tf.cast(u < rates - whole, tf.int64)


def epoch_key(seed: int, epoch) -> tf.Tensor:
  """The stateless key of epoch `epoch`'s copy counts (a stream apart from the others)."""
  base = tf.constant([seed, 2], tf.int64)
  return tf.random.experimental.stateless_fold_in(base, tf.cast(epoch, tf.int64))


def locate(position: int, rates: np.ndarray, seed: int) -> tuple[int, int]:
  """(epoch, offset in that epoch) of stream position `position` (0-based)."""
  rates = tf.constant(rates, tf.float64)
  epoch = 0
  while True:
    length = int(tf.reduce_sum(epoch_copies(rates, epoch_key(seed, epoch))))
    if position < length:
      return epoch, position
    position -= length
    epoch += 1
