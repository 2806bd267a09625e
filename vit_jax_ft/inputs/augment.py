"""Per-image train augmentations for tf.data: RandAugment and colour jitter.

Everything here is stateless: each function takes a `key` (a [2] int64
stateless seed, as `tf.random.experimental.stateless_split` makes) and is a
pure function of (image, key). The input pipeline derives the key from
(seed, epoch, position), so augmented streams can be resumed exactly.

RandAugment (Cubuk et al. 2019) follows the TF Model Garden recipe
(`official/vision/ops/augment.py`, `RandAugment`), which the original
experiments used: `num_layers` times, pick one of the available ops or the
identity uniformly at random (so with n ops each layer is the identity with
probability 1 / (n + 1)) and apply it with the shared `magnitude` m in
[0, 10]. Images are processed as 8-bit (whole numbers in [0, 255]) and
geometric ops fill with grey 128. The op arguments at magnitude m are the
Model Garden's (the pixel ops match PIL's ImageOps / ImageEnhance, see
tests/test_augment.py):

  op                 argument at magnitude m                 identity when
  AutoContrast       -                                       never
  Equalize           -                                       never
  Invert             -                                       never
  Rotate             +-30 * m / 10 degrees                   m = 0
  ShearX, ShearY     +-0.3 * m / 10                          m = 0
  TranslateX, -Y     +-translate * m / 10 pixels             m = 0
  Cutout             grey square, side 2 * int(cutout * m / 10)  m < 10 / cutout
  SolarizeAdd        +int(110 * m / 10) on pixels < 128      m < 1 / 11
  Posterize          keep int(4 * m / 10) high bits          never (m < 2.5: black)
  Solarize           invert pixels >= int(256 * m / 10)      m = 10
  Color, Contrast,   blend factor 0.1 + 1.8 * m / 10         m = 5
  Brightness, Sharpness

Signs (+-) are random per application. Note the recipe's quirks, kept on
purpose so that results reproduce: Posterize and Solarize get *weaker* as
m grows (at m = 0 Posterize makes the image black and Solarize inverts it),
and the enhance ops are strongest at m = 0 and m = 10. Exclude ops you do
not want (e.g. 'Invert,Posterize,Solarize' for medical images) with
`exclude_ops`.

Colour jitter follows torchvision's `ColorJitter` semantics (brightness,
contrast and saturation factors uniform in [max(0, 1 - x), 1 + x], hue shift
uniform in [-h, h] of a full turn), applied in that fixed order.
"""

import math
from typing import Callable, Sequence

import numpy as np
import tensorflow as tf

# The Model Garden's default op list, in its order.
RANDAUGMENT_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize",
                   "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY",
                   "TranslateX", "TranslateY", "Cutout", "SolarizeAdd")
_MAX_LEVEL = 10.0
_FILL = 128  # grey fill of the geometric ops and Cutout, as in the recipe

_GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as PIL and torchvision (sums to 1)


def parse_ops(exclude_ops: str | Sequence[str]) -> tuple[str, ...]:
  """The RandAugment ops left after excluding a comma-separated list (or sequence).

  Raises:
    ValueError: for an unknown op name (names are case-sensitive), or if
      nothing is left.
  """
  if isinstance(exclude_ops, str):
    exclude_ops = [s.strip() for s in exclude_ops.split(",") if s.strip()]
  unknown = sorted(set(exclude_ops) - set(RANDAUGMENT_OPS))
  if unknown:
    raise ValueError(f"Unknown RandAugment op(s) {unknown} in data.randaugment_exclude_ops; "
                     f"valid names: {', '.join(RANDAUGMENT_OPS)}.")
  ops = tuple(op for op in RANDAUGMENT_OPS if op not in exclude_ops)
  if not ops:
    raise ValueError("data.randaugment_exclude_ops excludes every RandAugment op; set "
                     "data.randaugment_layers=0 to turn RandAugment off instead.")
  return ops


def _uniform(key, minval=0.0, maxval=1.0, shape=()):
  return tf.random.stateless_uniform(shape, seed=key, minval=minval, maxval=maxval)


def _keys(key, n: int) -> list[tf.Tensor]:
  return tf.unstack(tf.random.experimental.stateless_split(key, n))


# Performance note: on CPU, TF's elementwise ops are fast on same-shape
# float32 tensors but several times slower when they broadcast a [3]
# (per-channel) or [H, W, 1] operand, and tf.where / tf.gather / uint8
# kernels are slower still. So per-channel maps here are [N, 3] x [3, 3]
# matmuls, masks are built at full shape, and selections are mask arithmetic.


def per_channel(values, like: tf.Tensor) -> tf.Tensor:
  """`values` [3] as a float32 tensor of `like`'s shape [..., 3] (a constant if static)."""
  if like.shape.is_fully_defined():
    return tf.constant(np.broadcast_to(np.asarray(values, np.float32), like.shape))
  return tf.broadcast_to(tf.constant(values, tf.float32), tf.shape(like))


def _channel_matmul(image: tf.Tensor, matrix) -> tf.Tensor:
  """out[..., j] = sum_i image[..., i] * matrix[i, j]."""
  flat = tf.reshape(image, [-1, 3])
  return tf.reshape(tf.matmul(flat, tf.cast(matrix, image.dtype)), tf.shape(image))


def _grayscale(image: tf.Tensor) -> tf.Tensor:
  """[H, W, 3] float -> [H, W, 3] float, every channel the luma."""
  return _channel_matmul(image, np.repeat(np.array(_GRAY_WEIGHTS, np.float32)[:, None], 3, 1))


# ----------------------------------------------------------------------------
# RandAugment ops. Each takes and returns a float32 [H, W, 3] image holding
# whole numbers in [0, 255], i.e. an 8-bit image: the ops round like PIL and
# the Model Garden do on uint8. Float arithmetic with masks instead of
# tf.where / uint8 kernels, which are several times slower on CPU.
# ----------------------------------------------------------------------------


def _to_8bit(x):
  """Rounds towards zero and clips, like a cast of a float image to uint8."""
  return tf.clip_by_value(tf.floor(x), 0.0, 255.0)


def _blend(degenerate, image, factor):
  """degenerate + factor * (image - degenerate), clipped: PIL ImageEnhance semantics."""
  return _to_8bit(degenerate + factor * (image - degenerate))


def invert(image):
  return 255.0 - image


def auto_contrast(image):
  """Stretches each channel to the full [0, 255] range (constant channels unchanged)."""
  flat = tf.reshape(image, [-1, 3])
  channels = tf.transpose(flat)  # reductions along the last axis are the fast ones
  lo = tf.reduce_min(channels, axis=1)
  hi = tf.reduce_max(channels, axis=1)
  stretch = hi > lo
  scale = tf.where(stretch, 255.0 / tf.where(stretch, hi - lo, 1.0), 1.0)
  offset = tf.where(stretch, -lo * scale, 0.0)
  # x * scale + offset per channel, as matmuls (see the performance note).
  offsets = tf.matmul(tf.ones_like(flat[:, :1]), offset[None, :])
  return _to_8bit(_channel_matmul(image, tf.linalg.diag(scale))
                  + tf.reshape(offsets, tf.shape(image)))


def equalize(image):
  """PIL's ImageOps.equalize, per channel."""
  values = tf.cast(image, tf.int32)
  hist = tf.stack([tf.histogram_fixed_width(image[..., c], [0.0, 256.0], nbins=256)
                   for c in range(3)])  # [3, 256]
  # PIL leaves the last occupied bin out of the step, so that the brightest
  # value maps to 255 - step / 2 rather than past it.
  occupied = tf.cast(hist > 0, tf.int32)
  last_bin = 255 - tf.argmax(tf.reverse(occupied, [1]), axis=1, output_type=tf.int32)
  last = tf.gather(hist, last_bin, batch_dims=1)
  step = (tf.reduce_sum(hist, 1) - last) // 255  # [3]
  safe = tf.maximum(step, 1)[:, None]
  lut = (tf.cumsum(hist, axis=1, exclusive=True) + safe // 2) // safe
  lut = tf.where(step[:, None] > 0, tf.minimum(lut, 255), tf.range(256)[None, :])
  flat = tf.reshape(tf.cast(lut, tf.float32), [-1])
  offsets = tf.cast(per_channel([0, 256, 512], image), tf.int32)
  return tf.gather(flat, values + offsets)


def posterize(image, bits: int):
  """Keeps the top `bits` bits (0 bits: black)."""
  unit = float(2 ** (8 - bits))
  return tf.floor(image / unit) * unit


def solarize(image, threshold: int):
  """Inverts the pixels >= threshold."""
  above = tf.cast(image >= threshold, tf.float32)
  return image + above * (255.0 - 2.0 * image)


def solarize_add(image, addition: int, threshold: int = 128):
  """Adds `addition` (saturating) to the pixels < threshold."""
  below = tf.cast(image < threshold, tf.float32)
  return image + below * (tf.minimum(image + addition, 255.0) - image)


def _gray(image):
  return tf.round(_grayscale(image))  # [H, W, 3]


def color(image, factor):
  return _blend(_gray(image), image, factor)


def contrast(image, factor):
  # Blend towards the mean grey level, rounded (as PIL's mean of the L histogram).
  return _blend(tf.round(tf.reduce_mean(_gray(image))), image, factor)


def brightness(image, factor):
  return _to_8bit(factor * image)


def sharpness(image, factor):
  """Blends with PIL's SMOOTH-filtered image; the 1-pixel border stays as is."""
  # 3x3 kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 as a box sum from slices.
  rows = image[:-2] + image[1:-1] + image[2:]
  box = rows[:, :-2] + rows[:, 1:-1] + rows[:, 2:]
  center = image[1:-1, 1:-1]
  smooth = tf.round((box + 4.0 * center) / 13.0)
  degenerate = image + tf.pad(smooth - center, [[1, 1], [1, 1], [0, 0]])
  return _blend(degenerate, image, factor)


def _round_half_away(v):
  """std::round (half away from zero), as ImageProjectiveTransformV3's NEAREST."""
  return tf.cast(tf.sign(v) * tf.floor(tf.abs(v) + 0.5), tf.int32)


def _affine(image, matrix):
  """Nearest-neighbour affine warp, grey outside: output (y, x) <- input (y', x').

  `matrix` is [a0, a1, a2, b0, b1, b2] with x' = a0 x + a1 y + a2 and
  y' = b0 x + b1 y + b2, rounded half away from zero: the pixels that
  ImageProjectiveTransformV3 (NEAREST, CONSTANT fill) picks, by one
  row gather over the pixels instead of its per-value loop (~3x faster).
  """
  shape = tf.shape(image)
  h, w = shape[0], shape[1]
  a0, a1, a2, b0, b1, b2 = tf.unstack(tf.cast(matrix, tf.float32))
  ys = tf.cast(tf.range(h), tf.float32)[:, None]
  xs = tf.cast(tf.range(w), tf.float32)[None, :]
  src_x = _round_half_away(a0 * xs + a1 * ys + a2)  # [H, W]
  src_y = _round_half_away(b0 * xs + b1 * ys + b2)
  valid = tf.cast((src_x >= 0) & (src_x < w) & (src_y >= 0) & (src_y < h), tf.int32)
  # Invalid pixels read an extra grey row appended after the image's pixels.
  index = valid * (src_y * w + src_x) + (1 - valid) * (h * w)
  table = tf.concat([tf.reshape(image, [-1, 3]), tf.fill([1, 3], float(_FILL))], 0)
  return tf.reshape(tf.gather(table, tf.reshape(index, [-1])), shape)


def rotate(image, degrees):
  """Rotates about the image centre."""
  theta = tf.cast(degrees, tf.float32) * (math.pi / 180.0)
  h = tf.cast(tf.shape(image)[0], tf.float32)
  w = tf.cast(tf.shape(image)[1], tf.float32)
  cx, cy = (w - 1.0) / 2.0, (h - 1.0) / 2.0
  cos, sin = tf.cos(theta), tf.sin(theta)
  # input = R (output - c) + c
  return _affine(image, tf.stack([cos, -sin, cx - (cos * cx - sin * cy),
                                  sin, cos, cy - (sin * cx + cos * cy)]))


def shear_x(image, level):
  return _affine(image, tf.stack([1.0, level, 0.0, 0.0, 1.0, 0.0]))


def shear_y(image, level):
  return _affine(image, tf.stack([1.0, 0.0, 0.0, level, 1.0, 0.0]))


def _shift(image, pixels, axis: int):
  """Moves the image by `pixels` (rounded) along `axis`, filling with grey.

  What the nearest-neighbour projective transform does for a translation,
  by slicing and padding (a fraction of the transform's cost).
  """
  size = tf.shape(image)[axis]
  # Input column x - pixels rounded half away from zero, for x - pixels >= 0.
  shift = tf.clip_by_value(tf.cast(tf.math.ceil(pixels - 0.5), tf.int32), -size, size)
  before, after = tf.maximum(shift, 0), tf.maximum(-shift, 0)
  begin = tf.one_hot(axis, 3, on_value=after, off_value=0)
  extent = tf.tensor_scatter_nd_update(tf.shape(image), [[axis]], [size - before - after])
  kept = tf.slice(image, begin, extent)
  paddings = tf.one_hot(axis, 3, on_value=1, off_value=0)[:, None] * tf.stack([before, after])
  return tf.pad(kept, paddings, constant_values=float(_FILL))


def translate_x(image, pixels):
  return _shift(image, pixels, 1)


def translate_y(image, pixels):
  return _shift(image, pixels, 0)


def cutout(image, pad_size: int, center):
  """Fills the square [cy - pad, cy + pad) x [cx - pad, cx + pad) (clipped) with grey."""
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  rows = tf.range(h)[:, None]
  cols = tf.range(3 * w)[None, :] // 3  # pixel column of each value
  in_rows = tf.cast((rows >= center[0] - pad_size) & (rows < center[0] + pad_size), tf.float32)
  in_cols = tf.cast((cols >= center[1] - pad_size) & (cols < center[1] + pad_size), tf.float32)
  inside = tf.reshape(tf.matmul(in_rows, in_cols), tf.shape(image))  # full-shape 0/1 mask
  return image + inside * (float(_FILL) - image)


def _op_branches(image, ops, magnitude: float, cutout_const: float, translate_const: float,
                 sign, center) -> list[Callable[[], tf.Tensor]]:
  """One zero-argument branch per op, with the recipe's argument at `magnitude`."""
  level = magnitude / _MAX_LEVEL
  enhance = 0.1 + 1.8 * level
  table = {
      "AutoContrast": lambda: auto_contrast(image),
      "Equalize": lambda: equalize(image),
      "Invert": lambda: invert(image),
      "Rotate": lambda: rotate(image, sign * 30.0 * level),
      "Posterize": lambda: posterize(image, int(4 * level)),
      "Solarize": lambda: solarize(image, int(256 * level)),
      "Color": lambda: color(image, enhance),
      "Contrast": lambda: contrast(image, enhance),
      "Brightness": lambda: brightness(image, enhance),
      "Sharpness": lambda: sharpness(image, enhance),
      "ShearX": lambda: shear_x(image, sign * 0.3 * level),
      "ShearY": lambda: shear_y(image, sign * 0.3 * level),
      "TranslateX": lambda: translate_x(image, sign * translate_const * level),
      "TranslateY": lambda: translate_y(image, sign * translate_const * level),
      "Cutout": lambda: cutout(image, int(cutout_const * level), center),
      "SolarizeAdd": lambda: solarize_add(image, int(110 * level)),
  }
  return [table[op] for op in ops]


def randaugment(image: tf.Tensor, key: tf.Tensor, *, num_layers: int, magnitude: float,
                exclude_ops: str | Sequence[str] = (), cutout_const: float = 40.0,
                translate_const: float = 100.0) -> tf.Tensor:
  """RandAugment of one float [H, W, 3] image in [0, 255]; returns float32 in [0, 255].

  The image is rounded to whole numbers first (the ops are defined on 8-bit
  images) and stays so.

  Args:
    image: [H, W, 3] float (or uint8) image with values in [0, 255].
    key: [2] int stateless seed.
    num_layers: ops applied in sequence (N in the paper).
    magnitude: shared magnitude in [0, 10] (M in the paper).
    exclude_ops: ops never chosen (comma-separated string or sequence).
    cutout_const: Cutout's half side in pixels at magnitude 10.
    translate_const: TranslateX/Y's shift in pixels at magnitude 10.
  """
  if not 0.0 <= magnitude <= _MAX_LEVEL:
    raise ValueError(f"data.randaugment_magnitude must be in [0, 10], got {magnitude}.")
  ops = parse_ops(exclude_ops)
  image = tf.clip_by_value(tf.round(tf.cast(image, tf.float32)), 0.0, 255.0)
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  for layer_key in _keys(key, num_layers) if num_layers else []:
    op_key, sign_key, center_key = _keys(layer_key, 3)
    # Index len(ops) is the identity, as in the recipe.
    index = tf.random.stateless_uniform([], seed=op_key, maxval=len(ops) + 1, dtype=tf.int32)
    sign = tf.where(_uniform(sign_key) < 0.5, -1.0, 1.0)
    center = tf.cast(tf.floor(_uniform(center_key, shape=[2])
                              * tf.cast(tf.stack([h, w]), tf.float32)), tf.int32)
    branches = _op_branches(image, ops, magnitude, cutout_const, translate_const, sign, center)
    shape = image.shape
    image = tf.switch_case(index, branches, default=lambda img=image: tf.identity(img))
    image.set_shape(shape)
  return image


# ----------------------------------------------------------------------------
# Colour jitter (float [0, 255] images).
# ----------------------------------------------------------------------------


def color_jitter(image: tf.Tensor, key: tf.Tensor, *, brightness: float = 0.0,
                 contrast: float = 0.0, saturation: float = 0.0,
                 hue: float = 0.0) -> tf.Tensor:
  """torchvision-style colour jitter of a float [H, W, 3] image in [0, 255].

  Brightness scales the image, contrast blends with its mean grey level,
  saturation with its grey image, each by a factor uniform in
  [max(0, 1 - x), 1 + x]; hue rotates by a shift uniform in [-hue, hue]
  (hue <= 0.5; a full turn is 1). Applied in that order; a 0 skips the step.
  The result is clipped to [0, 255] after each step.
  """
  for name, value, limit in (("brightness", brightness, math.inf), ("contrast", contrast, math.inf),
                             ("saturation", saturation, math.inf), ("hue", hue, 0.5)):
    if not 0.0 <= value <= limit:
      raise ValueError(f"data.jitter_{name} must be in [0, {limit}], got {value}.")
  kb, kc, ks, kh = _keys(key, 4)
  image = tf.cast(image, tf.float32)

  def factor(k, x):
    return _uniform(k, max(0.0, 1.0 - x), 1.0 + x)

  if brightness:
    image = tf.clip_by_value(image * factor(kb, brightness), 0.0, 255.0)
  if contrast:
    mean = tf.reduce_mean(_grayscale(image))  # the mean luma
    image = tf.clip_by_value(mean + factor(kc, contrast) * (image - mean), 0.0, 255.0)
  if saturation:
    gray = _grayscale(image)
    image = tf.clip_by_value(gray + factor(ks, saturation) * (image - gray), 0.0, 255.0)
  if hue:
    shifted = tf.image.adjust_hue(image / 255.0, _uniform(kh, -hue, hue)) * 255.0
    image = tf.clip_by_value(shifted, 0.0, 255.0)
  return image
