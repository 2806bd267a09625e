"""Tests for vit_jax_ft.inputs.augment (RandAugment, colour jitter), mixing and sampling.

The RandAugment ops are checked against PIL's ImageOps / ImageEnhance, which
define them; mixing against hand-computed boxes and the pixels themselves.
"""

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from PIL import ImageEnhance
from PIL import ImageOps

from vit_jax_ft.inputs import augment
from vit_jax_ft.inputs import mixing
from vit_jax_ft.inputs import sampling


def _image(seed=0, h=24, w=20):
  rng = np.random.default_rng(seed)
  a = rng.integers(30, 200, (h, w, 3)).astype(np.uint8)
  a[..., 1] = (a[..., 1] // 2 + 60).astype(np.uint8)  # channels with different ranges
  return a


def _key(i, j=0):
  return tf.constant([i, j], tf.int64)


def _run(op, image):
  return op(tf.constant(image, tf.float32)).numpy()


# ----------------------------------------------------------------------------
# RandAugment ops against PIL.
# ----------------------------------------------------------------------------

_FILL = (128, 128, 128)


@pytest.mark.parametrize('name, ours, pil, atol', [
    ('equalize', augment.equalize, ImageOps.equalize, 0),
    ('invert', augment.invert, ImageOps.invert, 0),
    ('posterize3', lambda x: augment.posterize(x, 3), lambda im: ImageOps.posterize(im, 3), 0),
    ('solarize100', lambda x: augment.solarize(x, 100), lambda im: ImageOps.solarize(im, 100), 0),
    ('rotate20', lambda x: augment.rotate(x, 20.0), lambda im: im.rotate(20, fillcolor=_FILL), 0),
    ('translate5', lambda x: augment.translate_x(x, 5.0),
     lambda im: im.transform(im.size, Image.AFFINE, (1, 0, -5, 0, 1, 0), fillcolor=_FILL), 0),
    # PIL truncates x * scale + offset through a lookup table; we compute
    # per pixel, which can land one level apart.
    ('autocontrast', augment.auto_contrast, ImageOps.autocontrast, 1),
])
def test_ops_match_pil(name, ours, pil, atol):
  del name
  a = _image()
  got = _run(ours, a)
  want = np.asarray(pil(Image.fromarray(a))).astype(float)
  np.testing.assert_allclose(got, want, atol=atol)
  assert np.all(got == np.round(got))  # still an 8-bit image


@pytest.mark.parametrize('ours, pil', [
    (augment.color, ImageEnhance.Color), (augment.contrast, ImageEnhance.Contrast),
    (augment.brightness, ImageEnhance.Brightness), (augment.sharpness, ImageEnhance.Sharpness)])
@pytest.mark.parametrize('factor', [0.1, 0.5, 1.0, 1.9])
def test_enhance_ops_match_pil(ours, pil, factor):
  a = _image(1)
  got = _run(lambda x: ours(x, factor), a)
  want = np.asarray(pil(Image.fromarray(a)).enhance(factor)).astype(float)
  # PIL's grey conversion uses integer weights; a pixel may round the other way.
  np.testing.assert_allclose(got, want, atol=1)
  assert np.mean(got != want) < 0.02
  if factor == 1.0:
    np.testing.assert_array_equal(got, a)


@pytest.mark.parametrize('op, arg', [(augment.rotate, 17.0), (augment.rotate, -29.0),
                                     (augment.shear_x, 0.27), (augment.shear_y, -0.3)])
def test_affine_ops_pick_the_pixels_of_the_projective_transform(op, arg):
  # augment._affine replaces ImageProjectiveTransformV3 (NEAREST, grey fill),
  # the Model Garden's op, with a faster gather; the result must not change.
  a = tf.constant(_image(7, 33, 41), tf.float32)
  if op is augment.rotate:
    theta = arg * np.pi / 180
    cx, cy = 20.0, 16.0
    matrix = [np.cos(theta), -np.sin(theta), cx - (np.cos(theta) * cx - np.sin(theta) * cy),
              np.sin(theta), np.cos(theta), cy - (np.sin(theta) * cx + np.cos(theta) * cy), 0, 0]
  elif op is augment.shear_x:
    matrix = [1, arg, 0, 0, 1, 0, 0, 0]
  else:
    matrix = [1, 0, 0, arg, 1, 0, 0, 0]
  want = tf.raw_ops.ImageProjectiveTransformV3(
      images=a[None], transforms=tf.constant([matrix], tf.float32), output_shape=[33, 41],
      fill_value=128.0, interpolation='NEAREST', fill_mode='CONSTANT')[0]
  np.testing.assert_array_equal(op(a, arg).numpy(), want.numpy())


@pytest.mark.parametrize('op, pixels', [(augment.translate_x, -7.0), (augment.translate_y, 4.0),
                                        (augment.translate_y, -30.0)])
def test_translate_matches_pil(op, pixels):
  a = _image(8)
  dx, dy = (pixels, 0) if op is augment.translate_x else (0, pixels)
  want = Image.fromarray(a).transform((20, 24), Image.AFFINE, (1, 0, -dx, 0, 1, -dy),
                                      fillcolor=_FILL)
  np.testing.assert_array_equal(_run(lambda x: op(x, pixels), a), np.asarray(want))


def test_equalize_constant_channel_is_unchanged():
  a = np.full((6, 6, 3), 77, np.uint8)
  a[..., 2] = np.arange(36).reshape(6, 6) * 7
  got = _run(augment.equalize, a)
  np.testing.assert_array_equal(got[..., :2], 77)  # PIL: step 0 -> identity
  np.testing.assert_array_equal(got, np.asarray(ImageOps.equalize(Image.fromarray(a))))


def test_cutout_fills_a_clipped_grey_square():
  a = _image(2, 10, 12)
  got = _run(lambda x: augment.cutout(x, 2, tf.constant([1, 5])), a)
  inside = np.zeros((10, 12), bool)
  inside[0:3, 3:7] = True  # rows [1-2, 1+2) clipped at 0, cols [3, 7)
  np.testing.assert_array_equal(got[inside], 128)
  np.testing.assert_array_equal(got[~inside], a[~inside])


# ----------------------------------------------------------------------------
# RandAugment policy.
# ----------------------------------------------------------------------------


def _randaugment(a, key, **kw):
  return augment.randaugment(tf.constant(a, tf.float32), key, **kw).numpy()


def test_randaugment_is_a_function_of_the_key():
  a = _image(3)
  outs = [_randaugment(a, _key(i), num_layers=2, magnitude=9) for i in range(12)]
  again = [_randaugment(a, _key(i), num_layers=2, magnitude=9) for i in range(12)]
  for x, y in zip(outs, again):
    np.testing.assert_array_equal(x, y)
  distinct = {x.tobytes() for x in outs}
  assert len(distinct) >= 8  # different keys pick different ops and arguments


# Ops whose argument scales from nothing at magnitude 0 (augment.py's table).
_ZERO_AT_MAGNITUDE_0 = ['Rotate', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'Cutout',
                        'SolarizeAdd']


def _only(*ops):
  return ','.join(op for op in augment.RANDAUGMENT_OPS if op not in ops)


def test_magnitude_zero_geometric_ops_are_identity():
  a = _image(4)
  for i in range(16):
    got = _randaugment(a, _key(i), num_layers=3, magnitude=0,
                       exclude_ops=_only(*_ZERO_AT_MAGNITUDE_0))
    np.testing.assert_array_equal(got, a)
  # ... and are not at magnitude 10.
  changed = [not np.array_equal(_randaugment(a, _key(i), num_layers=3, magnitude=10,
                                             exclude_ops=_only(*_ZERO_AT_MAGNITUDE_0)), a)
             for i in range(16)]
  assert sum(changed) >= 10


def test_solarize_quirk_is_documented_behaviour():
  # Model Garden recipe: threshold 256 * m / 10, so m=10 never solarizes and
  # m=0 inverts every pixel.
  a = _image(5)
  results = {'same': 0, 'inverted': 0}
  for i in range(24):
    np.testing.assert_array_equal(
        _randaugment(a, _key(i), num_layers=1, magnitude=10, exclude_ops=_only('Solarize')), a)
    got = _randaugment(a, _key(i), num_layers=1, magnitude=0, exclude_ops=_only('Solarize'))
    if np.array_equal(got, a):
      results['same'] += 1
    else:
      np.testing.assert_array_equal(got, 255 - a.astype(float))
      results['inverted'] += 1
  # One op plus the identity: each layer is the identity half the time.
  assert results['same'] >= 5 and results['inverted'] >= 5


def test_excluded_ops_are_never_applied():
  a = _image(6)
  seen = set()
  for i in range(32):
    got = _randaugment(a, _key(i), num_layers=1, magnitude=10,
                       exclude_ops=_only('Invert', 'Posterize'))
    if np.array_equal(got, a):
      seen.add('identity')
    elif np.array_equal(got, 255 - a.astype(float)):
      seen.add('Invert')
    else:
      np.testing.assert_array_equal(got, a // 16 * 16)  # Posterize to 4 bits at m=10
      seen.add('Posterize')
  assert seen == {'identity', 'Invert', 'Posterize'}


def test_exclude_ops_validation():
  with pytest.raises(ValueError, match="'Rotat'"):
    augment.parse_ops('Rotat,Invert')
  with pytest.raises(ValueError, match='randaugment_layers=0'):
    augment.parse_ops(','.join(augment.RANDAUGMENT_OPS))
  assert augment.parse_ops(' Invert , Cutout ') == tuple(
      op for op in augment.RANDAUGMENT_OPS if op not in ('Invert', 'Cutout'))
  with pytest.raises(ValueError, match='magnitude'):
    augment.randaugment(tf.zeros([4, 4, 3]), _key(0), num_layers=1, magnitude=11)


# ----------------------------------------------------------------------------
# Colour jitter.
# ----------------------------------------------------------------------------


def test_color_jitter_ranges_and_determinism():
  a = np.full((4, 4, 3), 100.0, np.float32)
  a[..., 1] = 60.0
  factors = []
  for i in range(40):
    got = augment.color_jitter(tf.constant(a), _key(i), brightness=0.4).numpy()
    factors.append(got[0, 0, 0] / 100.0)
    np.testing.assert_allclose(got, a * factors[-1], rtol=1e-5)  # one factor per image
  assert 0.6 <= min(factors) < 0.75 and 1.25 < max(factors) <= 1.4
  x = augment.color_jitter(tf.constant(a), _key(3), brightness=0.3, contrast=0.3,
                           saturation=0.3, hue=0.1).numpy()
  y = augment.color_jitter(tf.constant(a), _key(3), brightness=0.3, contrast=0.3,
                           saturation=0.3, hue=0.1).numpy()
  np.testing.assert_array_equal(x, y)
  np.testing.assert_array_equal(augment.color_jitter(tf.constant(a), _key(3)).numpy(), a)


def test_saturation_and_hue_leave_grey_grey():
  grey = np.full((3, 3, 3), 90.0, np.float32)
  for i in range(5):
    got = augment.color_jitter(tf.constant(grey), _key(i), saturation=0.8, hue=0.5).numpy()
    np.testing.assert_allclose(got, grey, atol=1e-3)


def test_color_jitter_validation():
  with pytest.raises(ValueError, match='jitter_hue'):
    augment.color_jitter(tf.zeros([2, 2, 3]), _key(0), hue=0.6)


# ----------------------------------------------------------------------------
# Mixup and CutMix.
# ----------------------------------------------------------------------------


def _coded_batch(n=6, h=8, w=10, num_classes=6):
  """Example i is the constant image 10 * (i + 1) with one-hot class i."""
  images = np.stack([np.full((h, w, 3), 10.0 * (i + 1), np.float32) for i in range(n)])
  return {'image': tf.constant(images), 'targets': tf.eye(n, num_classes)}


def test_cutmix_boxes_hand_values():
  boxes = mixing.cutmix_boxes(tf.constant([0.75, 0.75, 0.0]), tf.constant([[4, 4], [0, 0], [4, 4]]),
                              8, 8).numpy()
  # sqrt(1 - 0.75) = 0.5 -> a 4x4 box centred at (4, 4): rows and cols [2, 6).
  np.testing.assert_array_equal(boxes[0], [2, 6, 2, 6])
  # Centred at the corner: clipped to [0, 2) x [0, 2).
  np.testing.assert_array_equal(boxes[1], [0, 2, 0, 2])
  np.testing.assert_array_equal(boxes[2], [0, 8, 0, 8])  # lam 0: the whole image


def test_cutmix_label_mass_is_the_pasted_area():
  batch = _coded_batch()
  boxes = tf.constant([[2, 6, 2, 6], [0, 2, 0, 2], [0, 8, 0, 10], [0, 0, 0, 0], [1, 3, 0, 10],
                       [7, 8, 9, 10]])
  images, targets = mixing.cutmix(batch['image'], batch['targets'], boxes)
  images, targets = images.numpy(), targets.numpy()
  for i in range(6):
    partner = 5 - i
    from_partner = np.mean(images[i, ..., 0] == 10.0 * (partner + 1))
    assert np.all((images[i] == 10.0 * (i + 1)) | (images[i] == 10.0 * (partner + 1)))
    np.testing.assert_allclose(targets[i, partner], from_partner, atol=1e-6)
    np.testing.assert_allclose(targets[i].sum(), 1.0, atol=1e-6)
  np.testing.assert_allclose(targets[0, [0, 5]], [0.8, 0.2])  # 16 of 80 pixels pasted


@pytest.mark.parametrize('mixup_alpha, cutmix_alpha', [(0.8, 0.0), (0.0, 1.0), (0.4, 0.4)])
def test_mix_batch_label_mass_equals_pixel_mass(mixup_alpha, cutmix_alpha):
  batch = _coded_batch()
  kinds = set()
  for k in range(12):
    out = mixing.mix_batch(batch, _key(k, 7), mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha)
    images, targets = out['image'].numpy(), out['targets'].numpy()
    np.testing.assert_allclose(targets.sum(1), 1.0, atol=1e-6)
    for i in range(6):
      a, b = 10.0 * (i + 1), 10.0 * (6 - i)
      if i == 5 - i or a == b:
        continue
      pixels = images[i, ..., 0]
      if np.all((pixels == a) | (pixels == b)) and not np.allclose(pixels, pixels.flat[0]):
        kinds.add('cutmix')
        own = np.mean(pixels == a)
      else:  # mixup: every pixel lam * a + (1 - lam) * b
        np.testing.assert_allclose(pixels, pixels.flat[0], atol=1e-4)
        own = (pixels.flat[0] - b) / (a - b)
        if 0.01 < own < 0.99:
          kinds.add('mixup')
      np.testing.assert_allclose(targets[i, i], own, atol=1e-4)
      np.testing.assert_allclose(targets[i, 5 - i], 1.0 - own, atol=1e-4)
  expected = {'mixup'} if not cutmix_alpha else {'cutmix'} if not mixup_alpha else {
      'mixup', 'cutmix'}
  assert kinds == expected


def test_mix_batch_is_deterministic_and_prob_zero_is_identity():
  batch = _coded_batch()
  x = mixing.mix_batch(batch, _key(1), mixup_alpha=1.0, cutmix_alpha=1.0)
  y = mixing.mix_batch(batch, _key(1), mixup_alpha=1.0, cutmix_alpha=1.0)
  z = mixing.mix_batch(batch, _key(2), mixup_alpha=1.0, cutmix_alpha=1.0)
  np.testing.assert_array_equal(x['image'], y['image'])
  np.testing.assert_array_equal(x['targets'], y['targets'])
  assert not np.array_equal(x['targets'], z['targets'])
  same = mixing.mix_batch(batch, _key(1), mixup_alpha=1.0, cutmix_alpha=1.0, prob=0.0)
  np.testing.assert_array_equal(same['image'], batch['image'])
  np.testing.assert_array_equal(same['targets'], batch['targets'])


def test_multilabel_mixup_mixes_multi_hot_vectors():
  images = tf.constant(np.stack([np.zeros((2, 2, 3)), np.ones((2, 2, 3))]), tf.float32)
  targets = tf.constant([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
  _, mixed = mixing.mixup(images, targets, tf.constant([0.7, 0.25]))
  # A label both carry stays 1; the others get their image's share.
  np.testing.assert_allclose(mixed.numpy(), [[0.7, 1.0, 0.3], [0.75, 1.0, 0.25]], atol=1e-6)


def test_mixing_validation():
  with pytest.raises(ValueError, match='mix_switch_prob'):
    mixing.check_config(0.8, 1.0, 1.0, 1.5)
  with pytest.raises(ValueError, match='mixup_alpha'):
    mixing.check_config(-1.0, 1.0, 1.0, 0.5)


# ----------------------------------------------------------------------------
# Sampler rates.
# ----------------------------------------------------------------------------


def test_example_rates_hand_values():
  labels = np.eye(3, dtype=bool)[[0] * 6 + [1] * 3 + [2]]
  # balanced: class share 1/3 each over data shares 6/10, 3/10, 1/10.
  np.testing.assert_allclose(sampling.example_rates(labels, 0.0)[[0, 6, 9]],
                             [10 / 18, 10 / 9, 10 / 3])
  # sqrt: shares proportional to sqrt(6), sqrt(3), 1.
  shares = np.sqrt([6, 3, 1]) / np.sqrt([6, 3, 1]).sum()
  np.testing.assert_allclose(sampling.example_rates(labels, 0.5)[[0, 6, 9]],
                             shares / np.array([0.6, 0.3, 0.1]))
  np.testing.assert_allclose(sampling.example_rates(labels, 1.0), 1.0)
  for power in (0.0, 0.5):
    assert sampling.example_rates(labels, power).mean() == pytest.approx(1.0)


def test_multilabel_rates_follow_the_rarest_label():
  labels = np.array([[1, 0, 0], [1, 0, 0], [1, 0, 0], [1, 1, 0], [1, 0, 1], [0, 0, 0]], bool)
  rates = sampling.example_rates(labels, 0.0)
  # class rates ~ 1 / count: 1/5, 1/1, 1/1; the unlabelled example gets the smallest.
  np.testing.assert_allclose(rates / rates[0], [1, 1, 1, 5, 5, 1])
  assert rates.mean() == pytest.approx(1.0)


def test_epoch_copies_are_deterministic_with_the_right_mean():
  rates = np.array([0.25, 1.0, 2.5, 0.0])
  key = sampling.epoch_key(3, 4)
  a = sampling.epoch_copies(rates, key).numpy()
  np.testing.assert_array_equal(a, sampling.epoch_copies(rates, key).numpy())
  draws = np.stack([sampling.epoch_copies(rates, sampling.epoch_key(0, e)).numpy()
                    for e in range(400)])
  assert set(np.unique(draws[:, 2])) == {2, 3} and np.all(draws[:, 1] == 1)
  assert np.all(draws[:, 3] == 0)
  np.testing.assert_allclose(draws.mean(0), rates, atol=0.08)


def test_locate_walks_epoch_lengths():
  rates = np.array([0.5, 1.5, 1.0])
  lengths = [int(sampling.epoch_copies(rates, sampling.epoch_key(5, e)).numpy().sum())
             for e in range(4)]
  position = lengths[0] + lengths[1] + 1
  assert sampling.locate(position, rates, 5) == (2, 1)
  assert sampling.locate(0, rates, 5) == (0, 0)
  with pytest.raises(ValueError, match='data.sampler'):
    sampling.power_of('uniform')
