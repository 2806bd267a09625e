"""Mixup and CutMix of whole train batches, in tf.data, stateless.

As in the TF Model Garden's `MixupAndCutmix` (and timm's `Mixup`): per batch,
with probability `prob` the batch is mixed, by CutMix with probability
`switch_prob` and by Mixup otherwise (only the enabled one when one alpha is
0). Each example i is mixed with its partner B - 1 - i (the batch reversed),
with its own lambda ~ Beta(alpha, alpha):

* Mixup: image = lam * image_i + (1 - lam) * image_partner.
* CutMix: a box of area (1 - lam) * H * W centred uniformly at random is
  pasted from the partner; where the box is clipped at the image border, the
  label weight follows the pixels actually pasted:
  lam = 1 - pasted area / (H * W).

Targets are mixed with the same weight as the pixels:
targets = lam * targets_i + (1 - lam) * targets_partner. For softmax losses
(one-hot rows) the mixed rows still sum to 1. For multi-label data the same
convex combination of the multi-hot vectors gives soft per-label targets in
[0, 1] (a label both examples carry stays 1; one only the partner carries
becomes 1 - lam), which the sigmoid losses accept as they are. Label
smoothing is left to the loss (it commutes with mixing).

Everything is a pure function of (batch, key), so the mixed stream stays a
pure function of (seed, step).
"""

import tensorflow as tf


def _beta(key, alpha: float, shape) -> tf.Tensor:
  """Beta(alpha, alpha) samples as G1 / (G1 + G2) of stateless gammas."""
  k1, k2 = tf.unstack(tf.random.experimental.stateless_split(key, 2))
  g1 = tf.random.stateless_gamma(shape, seed=k1, alpha=alpha)
  g2 = tf.random.stateless_gamma(shape, seed=k2, alpha=alpha)
  total = g1 + g2
  # For tiny alphas both gammas can underflow to 0; call it an even mix.
  return tf.where(total > 0, g1 / tf.where(total > 0, total, 1.0), 0.5)


def mixup(images: tf.Tensor, targets: tf.Tensor, lam: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """Mixes example i with example B - 1 - i by per-example weights `lam` [B]."""
  w = tf.reshape(lam, [-1, 1, 1, 1])
  images = w * images + (1.0 - w) * tf.reverse(images, [0])
  return images, _mix_targets(targets, lam)


def cutmix_boxes(lam: tf.Tensor, center: tf.Tensor, height: int, width: int) -> tf.Tensor:
  """[B, 4] boxes (y0, y1, x0, x1), clipped, of area ~ (1 - lam) * H * W at `center` [B, 2]."""
  ratio = tf.sqrt(1.0 - lam)
  cut_h = tf.cast(tf.round(ratio * height), tf.int32)
  cut_w = tf.cast(tf.round(ratio * width), tf.int32)
  y0 = center[:, 0] - cut_h // 2
  x0 = center[:, 1] - cut_w // 2
  return tf.stack([tf.clip_by_value(y0, 0, height), tf.clip_by_value(y0 + cut_h, 0, height),
                   tf.clip_by_value(x0, 0, width), tf.clip_by_value(x0 + cut_w, 0, width)], -1)


def cutmix(images: tf.Tensor, targets: tf.Tensor, boxes: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """Pastes box [y0, y1) x [x0, x1) of example B - 1 - i into example i.

  Returns the images and targets mixed by the pasted area.
  """
  height, width, channels = images.shape[1], images.shape[2], images.shape[3]
  rows = tf.range(height)[None, :, None]
  cols = tf.range(width * channels)[None, None, :] // channels  # pixel column of each value
  b = boxes[:, :, None, None]
  in_rows = tf.cast((rows >= b[:, 0]) & (rows < b[:, 1]), images.dtype)  # [B, H, 1]
  in_cols = tf.cast((cols >= b[:, 2]) & (cols < b[:, 3]), images.dtype)  # [B, 1, W * C]
  # The box mask at the images' full shape, as a batched outer product: on
  # CPU this and same-shape products beat broadcasting a [B, H, W, 1] mask.
  inside = tf.reshape(tf.matmul(in_rows, in_cols), tf.shape(images))
  images = images * (1.0 - inside) + tf.reverse(images, [0]) * inside  # exact for a 0/1 mask
  area = tf.cast((boxes[:, 1] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 2]), tf.float32)
  lam = 1.0 - area / float(height * width)
  return images, _mix_targets(targets, lam)


def _mix_targets(targets, lam):
  w = tf.reshape(tf.cast(lam, targets.dtype), [-1, 1])
  return w * targets + (1.0 - w) * tf.reverse(targets, [0])


def check_config(mixup_alpha: float, cutmix_alpha: float, prob: float, switch_prob: float) -> None:
  """Raises ValueError for out-of-range mixing settings."""
  if mixup_alpha < 0 or cutmix_alpha < 0:
    raise ValueError(f"data.mixup_alpha and data.cutmix_alpha must be >= 0 (0 disables), got "
                     f"{mixup_alpha} and {cutmix_alpha}.")
  for name, value in (("mix_prob", prob), ("mix_switch_prob", switch_prob)):
    if not 0.0 <= value <= 1.0:
      raise ValueError(f"data.{name} must be in [0, 1], got {value}.")


def mix_batch(batch: dict, key: tf.Tensor, *, mixup_alpha: float, cutmix_alpha: float,
              prob: float = 1.0, switch_prob: float = 0.5) -> dict:
  """Mixup or CutMix of a batch {'image': [B, H, W, C], 'targets': [B, K]}.

  Args:
    batch: the batch; the image height and width must be static.
    key: [2] int stateless seed, e.g. derived from (seed, step).
    mixup_alpha: Beta parameter of Mixup's lambda; 0 disables Mixup.
    cutmix_alpha: Beta parameter of CutMix's lambda; 0 disables CutMix.
    prob: probability that a batch is mixed at all.
    switch_prob: probability of CutMix rather than Mixup when both are enabled.

  Returns:
    The batch with 'image' and 'targets' replaced (other entries untouched).
  """
  check_config(mixup_alpha, cutmix_alpha, prob, switch_prob)
  if not (mixup_alpha or cutmix_alpha):
    return batch
  if not mixup_alpha:
    switch_prob = 1.0
  elif not cutmix_alpha:
    switch_prob = 0.0
  images, targets = batch["image"], batch["targets"]
  apply_key, switch_key, lam_key, center_key = tf.unstack(
      tf.random.experimental.stateless_split(key, 4))
  size = tf.shape(targets)[:1]
  height, width = images.shape[1], images.shape[2]

  def do_mixup():
    return mixup(images, targets, _beta(lam_key, mixup_alpha, size))

  def do_cutmix():
    lam = _beta(lam_key, cutmix_alpha, size)
    center = tf.cast(tf.floor(tf.random.stateless_uniform(tf.concat([size, [2]], 0), center_key)
                              * tf.constant([height, width], tf.float32)), tf.int32)
    return cutmix(images, targets, cutmix_boxes(lam, center, height, width))

  def do_mix():
    if switch_prob in (0.0, 1.0):
      return do_cutmix() if switch_prob else do_mixup()
    use_cutmix = tf.random.stateless_uniform([], switch_key) < switch_prob
    return tf.cond(use_cutmix, do_cutmix, do_mixup)

  if prob >= 1.0:
    images, targets = do_mix()
  else:
    apply = tf.random.stateless_uniform([], apply_key) < prob
    images, targets = tf.cond(apply, do_mix, lambda: (images, targets))
  return batch | {"image": images, "targets": targets}
