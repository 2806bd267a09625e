"""Tests for vit_jax_ft.inputs.pipeline and the dataset writers in vit_jax_ft.data.

The synthetic images carry their identity in their pixels: the red channel is a
constant that encodes the example's index, the green channel a constant that
encodes its class, and the blue channel a horizontal ramp (so crops and flips
change it). Constant channels stay constant under any crop, flip or bilinear
resize, so every decoded, augmented image can be traced back to its record.
"""

import io
import itertools
import time
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from sklearn import datasets as sk_datasets

from vit_jax_ft import base_config
from vit_jax_ft.data import digits
from vit_jax_ft.data import tfrecords
from vit_jax_ft.inputs import pipeline

NUM_CLASSES = 3
NUM_TRAIN = 10
NUM_VAL = 7
H, W = 12, 16  # non-square sources
SIZE = 8       # model input side


def _red(index):
  return 8 + 10 * index  # up to index 24


def _green(label):
  return 30 + 80 * label


def _label_of(index):
  return (2 * index + 1) % NUM_CLASSES


def _png(array, mode=None):
  buf = io.BytesIO()
  Image.fromarray(array, mode=mode).save(buf, format='PNG')
  return buf.getvalue()


def _jpeg(array):
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format='JPEG', quality=95)
  return buf.getvalue()


def _coded_image(index, label):
  img = np.zeros((H, W, 3), np.uint8)
  img[..., 0] = _red(index)
  img[..., 1] = _green(label)
  img[..., 2] = np.linspace(0, 255, W).round().astype(np.uint8)[None, :]
  return img


def _write_dataset(out_dir, splits, multilabel=False, class_names=None):
  """splits: {name: [(image_bytes, labels, id), ...]} -> info dict (also on disk)."""
  info = dict(name='synthetic', class_names=class_names or ['a', 'b', 'c'],
              multilabel=multilabel, splits={})
  for split, examples in splits.items():
    files = tfrecords.write_split(str(out_dir), split, examples, num_shards=2)
    info['splits'][split] = dict(
        num_examples=len(examples), files=files,
        class_counts=tfrecords.class_counts([e[1] for e in examples],
                                            len(info['class_names'])))
  tfrecords.write_info(str(out_dir), info)
  return tfrecords.read_info(str(out_dir))


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
  out = tmp_path_factory.mktemp('synthetic')

  def examples(split, n, offset):
    return [(_png(_coded_image(offset + i, _label_of(offset + i))), [_label_of(offset + i)],
             f'{split}_{offset + i}') for i in range(n)]

  info = _write_dataset(out, {'train': examples('train', NUM_TRAIN, 0),
                              'val': examples('val', NUM_VAL, NUM_TRAIN)})
  return str(out), info


def _cfg(**overrides):
  cfg = base_config.get_base_config().data
  cfg.image_size = SIZE
  cfg.shuffle_buffer = 64
  cfg.normalization = 'zero_one'
  for k, v in overrides.items():
    cfg[k] = v
  return cfg


def _decode_ids(images):
  """Recovers (index, label) from each zero_one-normalised coded image."""
  red = images[..., 0] * 255.0
  green = images[..., 1] * 255.0
  # Constant channels must have stayed constant through crop/flip/resize.
  assert np.abs(red - red[:, :1, :1]).max() < 1e-2
  assert np.abs(green - green[:, :1, :1]).max() < 1e-2
  index = (red[:, 0, 0] - 8) / 10
  label = (green[:, 0, 0] - 30) / 80
  np.testing.assert_allclose(index, np.round(index), atol=1e-3)
  np.testing.assert_allclose(label, np.round(label), atol=1e-3)
  return np.round(index).astype(int), np.round(label).astype(int)


def _take(it, n):
  return list(itertools.islice(it, n))


def _train(dataset, batch_size=4, seed=0, start_step=0, **cfg_overrides):
  data_dir, info = dataset
  return pipeline.train_iterator(_cfg(**cfg_overrides), data_dir, info,
                                       batch_size=batch_size, seed=seed,
                                       start_step=start_step)


# ----------------------------------------------------------------------------
# Training stream.
# ----------------------------------------------------------------------------


def test_train_labels_match_images_and_epochs_are_permutations(dataset):
  batches = _take(_train(dataset, batch_size=4), 5)  # 20 records = 2 epochs
  images = np.concatenate([b['image'] for b in batches])
  targets = np.concatenate([b['targets'] for b in batches])
  assert images.shape == (20, SIZE, SIZE, 3) and images.dtype == np.float32
  assert targets.shape == (20, NUM_CLASSES) and targets.dtype == np.float32
  index, label = _decode_ids(images)
  np.testing.assert_array_equal(label, [_label_of(i) for i in index])
  np.testing.assert_array_equal(targets, np.eye(NUM_CLASSES)[label])
  # Each epoch visits every training example exactly once, in a new order.
  assert sorted(index[:10]) == list(range(NUM_TRAIN))
  assert sorted(index[10:]) == list(range(NUM_TRAIN))
  assert list(index[:10]) != list(index[10:])
  assert list(index[:10]) != list(range(NUM_TRAIN))  # shuffled at all


def test_train_augmentation_crops_and_flips(dataset):
  batches = _take(_train(dataset, batch_size=5), 4)
  ramps = np.concatenate([b['image'][..., 2] for b in batches])  # [n, SIZE, SIZE]
  rows = ramps.mean(axis=1)  # blue ramp along the width
  increasing = np.all(np.diff(rows, axis=-1) > 0, axis=-1)
  decreasing = np.all(np.diff(rows, axis=-1) < 0, axis=-1)
  assert np.all(increasing | decreasing)
  assert increasing.any() and decreasing.any()  # flips happen, and not always
  # Random crops: the visible part of the ramp varies between examples.
  assert np.ptp(rows.max(-1) - rows.min(-1)) > 0.05


def _orientations(image):
  """The 8 dihedral transforms of a square array (NumPy, the reference)."""
  return [np.rot90(f, k) for f in (image, image[:, ::-1]) for k in range(4)]


@pytest.mark.parametrize('dihedral', [False, True])
def test_dihedral_augmentation_reaches_all_8_orientations(dihedral):
  # A square source at the model size with crop='none': no resampling, so each
  # output must equal one orientation of the source exactly.
  rng = np.random.default_rng(0)
  source = rng.integers(0, 256, (SIZE, SIZE, 3), np.uint8)
  cfg = _cfg(crop='none', dihedral=dihedral)
  want = _orientations(source.astype(np.float32))
  seen = set()
  for k in range(64):
    seed = tf.constant([k, 3], tf.int64)
    got = pipeline._train_preprocess(tf.constant(_png(source)), seed, cfg).numpy()
    match = [i for i, w in enumerate(want) if np.array_equal(got, w)]
    assert len(match) == 1, f'seed {k}: not an orientation of the source'
    seen.add(match[0])
  # Off: only the identity and the horizontal flip.
  if dihedral:
    assert seen == set(range(8))
  else:
    assert {o.tobytes() for o in (want[i] for i in seen)} == {
        want[0].tobytes(), source[:, ::-1].astype(np.float32).tobytes()}


@pytest.mark.parametrize('start_step', [1, 2, 3, 5, 7])
def test_resume_yields_the_same_batches(dataset, start_step):
  # batch 4, 10 examples per epoch: steps 2 and 7 straddle an epoch boundary,
  # steps 5 and 7 start in later epochs.
  fresh = _take(_train(dataset, batch_size=4), start_step + 2)
  resumed = _take(_train(dataset, batch_size=4, start_step=start_step), 2)
  # Batches differ from step to step, so matching the right one is informative.
  assert not np.array_equal(fresh[start_step]['image'], fresh[start_step - 1]['image'])
  assert not np.array_equal(fresh[start_step]['image'], fresh[start_step + 1]['image'])
  for want, got in zip(fresh[start_step:], resumed):
    np.testing.assert_array_equal(got['image'], want['image'])
    np.testing.assert_array_equal(got['targets'], want['targets'])


def test_same_seed_same_stream_different_seed_different_order(dataset):
  a = _take(_train(dataset, seed=7), 3)
  b = _take(_train(dataset, seed=7), 3)
  c = _take(_train(dataset, seed=8), 3)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['image'], y['image'])
    np.testing.assert_array_equal(x['targets'], y['targets'])
  ids_a = _decode_ids(np.concatenate([x['image'] for x in a]))[0]
  ids_c = _decode_ids(np.concatenate([x['image'] for x in c]))[0]
  assert list(ids_a) != list(ids_c)


@pytest.mark.parametrize('crop', ['random_resized', 'none'])
def test_train_output_has_image_size(dataset, crop):
  (batch,) = _take(_train(dataset, batch_size=3, crop=crop, image_size=6), 1)
  assert batch['image'].shape == (3, 6, 6, 3)


def test_unknown_crop_raises(dataset):
  with pytest.raises(ValueError, match='centre'):
    _take(_train(dataset, crop='centre'), 1)


# ----------------------------------------------------------------------------
# Evaluation.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize('batch_size', [3, 4, 7, 10])
def test_eval_visits_every_example_once_and_pads_the_last_batch(dataset, batch_size):
  data_dir, info = dataset
  batches = list(pipeline.eval_iterator(_cfg(), data_dir, info, 'val',
                                              batch_size=batch_size))
  assert len(batches) == -(-NUM_VAL // batch_size)
  for b in batches:
    assert b['image'].shape == (batch_size, SIZE, SIZE, 3)
    assert b['targets'].shape == (batch_size, NUM_CLASSES)
    assert b['mask'].shape == (batch_size,) and b['mask'].dtype == np.float32
  masks = np.concatenate([b['mask'] for b in batches])
  assert masks.sum() == NUM_VAL
  # Only the tail of the last batch is padding; it is all zeros.
  np.testing.assert_array_equal(masks, np.arange(len(masks)) < NUM_VAL)
  images = np.concatenate([b['image'] for b in batches])
  targets = np.concatenate([b['targets'] for b in batches])
  assert np.all(images[NUM_VAL:] == 0) and np.all(targets[NUM_VAL:] == 0)
  index, label = _decode_ids(images[:NUM_VAL])
  assert sorted(index) == list(range(NUM_TRAIN, NUM_TRAIN + NUM_VAL))
  np.testing.assert_array_equal(label, [_label_of(i) for i in index])
  np.testing.assert_array_equal(targets[:NUM_VAL], np.eye(NUM_CLASSES)[label])


def test_eval_is_a_centre_crop_and_deterministic(dataset):
  data_dir, info = dataset
  first = list(pipeline.eval_iterator(_cfg(), data_dir, info, 'val', batch_size=4))
  second = list(pipeline.eval_iterator(_cfg(), data_dir, info, 'val', batch_size=4))
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a['image'], b['image'])
  ramp = first[0]['image'][0, ..., 2].mean(0) * 255.0
  # 12x16 -> shorter side to 8/0.875 = 9.14 -> 10x13 (ceil), then 8 central columns
  # of 13 (offset 2): the crop sits within half a source column of the middle.
  assert np.all(np.diff(ramp) > 0)
  assert abs((ramp[0] + ramp[-1]) / 2 - 127.5) < 12  # centred on the ramp's middle
  assert ramp[0] > 20 and ramp[-1] < 235             # cropped: not the full ramp


def test_pad_batch():
  batch = {'image': np.ones((2, 3, 3, 3), np.float32), 'targets': np.eye(3)[:2]}
  out = pipeline.pad_batch(batch, 5)
  assert out['image'].shape == (5, 3, 3, 3) and out['targets'].shape == (5, 3)
  np.testing.assert_array_equal(out['mask'], [1, 1, 0, 0, 0])
  assert out['image'][2:].sum() == 0 and out['targets'][2:].sum() == 0
  assert out['image'].dtype == np.float32
  full = pipeline.pad_batch(batch, 2)
  np.testing.assert_array_equal(full['mask'], [1, 1])


# ----------------------------------------------------------------------------
# Multi-label, decoding and normalisation.
# ----------------------------------------------------------------------------


def test_multi_label_records_give_multi_hot_targets(tmp_path):
  labels = [[0, 2], [1], [0, 1, 2], [2, 2]]
  examples = [(_png(_coded_image(i, 0)), ls, f'm{i}') for i, ls in enumerate(labels)]
  info = _write_dataset(tmp_path, {'train': examples, 'val': examples}, multilabel=True)
  assert info['splits']['val']['class_counts'] == [2, 2, 4]
  (batch,) = list(pipeline.eval_iterator(_cfg(), str(tmp_path), info, 'val',
                                               batch_size=4))
  index, _ = _decode_ids(batch['image'])
  expected = np.zeros((4, 3), np.float32)
  for row, i in enumerate(index):
    expected[row, labels[i]] = 1.0
  np.testing.assert_array_equal(batch['targets'], expected)
  (train_batch,) = _take(pipeline.train_iterator(
      _cfg(), str(tmp_path), info, batch_size=4, seed=0), 1)
  index, _ = _decode_ids(train_batch['image'])
  for row, i in enumerate(index):
    np.testing.assert_array_equal(train_batch['targets'][row], np.isin(range(3), labels[i]))


def test_multi_label_record_without_labels_gives_zero_targets(tmp_path):
  examples = [(_png(_coded_image(0, 0)), [], 'none'), (_png(_coded_image(1, 0)), [1], 'one')]
  info = _write_dataset(tmp_path, {'val': examples}, multilabel=True)
  (batch,) = list(pipeline.eval_iterator(_cfg(), str(tmp_path), info, 'val',
                                               batch_size=2))
  index, _ = _decode_ids(batch['image'])
  expected = {0: [0, 0, 0], 1: [0, 1, 0]}
  for row, i in enumerate(index):
    np.testing.assert_array_equal(batch['targets'][row], expected[i])


def test_grayscale_rgba_and_jpeg_decode_to_rgb(tmp_path):
  grey = np.full((H, W), 100, np.uint8)
  rgba = np.zeros((H, W, 4), np.uint8)
  rgba[...] = (10, 20, 30, 128)
  rgb = np.zeros((H, W, 3), np.uint8)
  rgb[...] = (200, 40, 90)
  examples = [(_png(grey), [0], 'grey'), (_png(rgba), [1], 'rgba'), (_jpeg(rgb), [2], 'jpeg')]
  info = _write_dataset(tmp_path, {'train': examples, 'val': examples})
  batches = list(pipeline.eval_iterator(_cfg(), str(tmp_path), info, 'val',
                                              batch_size=3))
  images = np.concatenate([b['image'] for b in batches]) * 255.0
  targets = np.concatenate([b['targets'] for b in batches])
  assert images.shape == (3, SIZE, SIZE, 3)
  by_class = {int(np.argmax(t)): img for t, img in zip(targets, images)}
  np.testing.assert_allclose(by_class[0], np.full((SIZE, SIZE, 3), 100.0), atol=0.01)
  np.testing.assert_allclose(by_class[1], np.broadcast_to([10.0, 20.0, 30.0], (SIZE, SIZE, 3)),
                             atol=0.01)
  np.testing.assert_allclose(by_class[2], np.broadcast_to([200.0, 40.0, 90.0], (SIZE, SIZE, 3)),
                             atol=4.0)  # JPEG is lossy
  (train_batch,) = _take(pipeline.train_iterator(
      _cfg(), str(tmp_path), info, batch_size=3, seed=0), 1)
  assert train_batch['image'].shape == (3, SIZE, SIZE, 3)


def test_normalize_hand_values():
  pixels = tf.constant([[[0.0, 127.5, 255.0]]])
  np.testing.assert_allclose(pipeline.normalize(pixels, 'zero_one'),
                             [[[0.0, 0.5, 1.0]]], atol=1e-6)
  np.testing.assert_allclose(pipeline.normalize(pixels, 'minus_one_to_one'),
                             [[[-1.0, 0.0, 1.0]]], atol=1e-6)
  # imagenet: (x / 255 - mean) / std per channel, mean (0.485, 0.456, 0.406),
  # std (0.229, 0.224, 0.225).
  expected = [(0.0 - 0.485) / 0.229, (0.5 - 0.456) / 0.224, (1.0 - 0.406) / 0.225]
  np.testing.assert_allclose(pipeline.normalize(pixels, 'imagenet'), [[expected]],
                             rtol=1e-5)
  white = tf.fill([2, 2, 3], 255.0)
  np.testing.assert_allclose(
      pipeline.normalize(white, 'imagenet')[0, 0],
      [(1 - 0.485) / 0.229, (1 - 0.456) / 0.224, (1 - 0.406) / 0.225], rtol=1e-5)


def test_normalize_caffe_bgr_hand_values():
  pixels = tf.constant([[[10.0, 20.0, 30.0]]])
  # Channels reversed to BGR, then the Keras ResNet50 means subtracted.
  np.testing.assert_allclose(pipeline.normalize(pixels, 'caffe_bgr'),
                             [[[30 - 103.939, 20 - 116.779, 10 - 123.68]]], rtol=1e-6)


@pytest.mark.parametrize('height, width', [(1200, 900), (301, 1003)])
def test_jpeg_crop_window_decoding_matches_a_full_decode(height, width):
  # JPEGs decode only the crop window, scaled down 2, 4 or 8x by libjpeg
  # while the crop stays >= 2x image_size (its corner then snaps to that
  # grid). The pixels must be those of the same window of a full decode, up
  # to DCT-scaling versus antialiased-resize differences.
  # Smooth waves (~1 grey level per pixel) along x in red and y in green: a
  # misplaced window shows.
  y, x = np.mgrid[0:height, 0:width]
  img = np.stack([128 + 120 * np.sin(x / 100.0), 128 + 120 * np.cos(y / 100.0), 0 * x + 90], -1)
  data = tf.constant(_jpeg(img.round().astype(np.uint8)))
  cfg = _cfg(image_size=64, crop_min_scale=0.3)
  full = tf.io.decode_jpeg(data, channels=3)
  ratios = []
  for k in range(6):
    crop_key = tf.random.experimental.stateless_split(tf.constant([k, 5], tf.int64), 2)[0]
    got = pipeline._decode_and_crop(data, crop_key, cfg).numpy().astype(np.float32)
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(full), tf.zeros([0, 0, 4]), seed=crop_key, area_range=(0.3, 1.0),
        aspect_ratio_range=(3 / 4, 4 / 3), min_object_covered=0.0,
        use_image_if_no_bounding_boxes=True)
    (top, left), (h, w) = begin.numpy()[:2], size.numpy()[:2]
    ratio = h // got.shape[0]
    assert ratio in (1, 2, 4, 8) and got.shape[:2] == (h // ratio, w // ratio)
    assert ratio == 1 or min(h, w) >= 2 * 64 * ratio
    ratios.append(ratio)
    top, left = top // ratio * ratio, left // ratio * ratio
    window = full[top:top + got.shape[0] * ratio, left:left + got.shape[1] * ratio]
    want = tf.image.resize(window, got.shape[:2], antialias=True).numpy()
    diff = np.abs(got - want)
    assert diff.mean() < 1.0 and diff.max() < 8, (k, ratio, diff.mean(), diff.max())
  if height * width > 10**6:
    assert max(ratios) > 1  # the scaled path ran


def test_normalize_unknown_mode_names_it():
  with pytest.raises(ValueError, match='imagenet_mean'):
    pipeline.normalize(tf.zeros([1, 1, 3]), 'imagenet_mean')


def test_pipeline_applies_the_configured_normalization(dataset):
  data_dir, info = dataset
  (batch,) = _take(pipeline.eval_iterator(_cfg(normalization='minus_one_to_one'),
                                                data_dir, info, 'val', batch_size=2), 1)
  (ref,) = _take(pipeline.eval_iterator(_cfg(), data_dir, info, 'val',
                                              batch_size=2), 1)
  np.testing.assert_allclose(batch['image'], ref['image'] * 2.0 - 1.0, atol=1e-5)


# ----------------------------------------------------------------------------
# Errors.
# ----------------------------------------------------------------------------


def test_read_info_missing_dir_names_the_path(tmp_path):
  missing = str(tmp_path / 'no_such_dataset')
  with pytest.raises(FileNotFoundError, match='no_such_dataset') as e:
    tfrecords.read_info(missing, help_text='Run prepare_foo first.')
  assert missing in str(e.value) and 'Run prepare_foo first.' in str(e.value)


def test_read_info_incomplete_file(tmp_path):
  tfrecords.write_info(str(tmp_path), {'class_names': ['a'], 'splits': {}})
  with pytest.raises(ValueError, match='multilabel'):
    tfrecords.read_info(str(tmp_path))


def test_missing_split_names_it(dataset):
  data_dir, info = dataset
  with pytest.raises(ValueError, match='tset'):
    next(pipeline.eval_iterator(_cfg(), data_dir, info, 'tset', batch_size=2))
  with pytest.raises(ValueError, match='trian'):
    _train(dataset, train_split='trian')


def test_missing_shard_raises(tmp_path, dataset):
  _, info = dataset
  with pytest.raises(FileNotFoundError, match='val-00000-of-00002'):
    next(pipeline.eval_iterator(_cfg(), str(tmp_path), info, 'val', batch_size=2))


def test_write_split_round_robin_and_class_counts(tmp_path):
  examples = [(b'img%d' % i, [i % 2], f'id{i}') for i in range(5)]
  files = tfrecords.write_split(str(tmp_path), 'x', examples, num_shards=2)
  assert files == ['x-00000-of-00002.tfrecord', 'x-00001-of-00002.tfrecord']
  assert not [f for f in os.listdir(tmp_path) if f.endswith('.tmp')]
  ids = [[tf.train.Example.FromString(r.numpy()).features.feature['id'].bytes_list.value[0]
          for r in tf.data.TFRecordDataset(str(tmp_path / f))] for f in files]
  assert ids == [[b'id0', b'id2', b'id4'], [b'id1', b'id3']]
  assert tfrecords.class_counts([[0], [1, 2], [2], []], 4) == [1, 1, 2, 0]


# ----------------------------------------------------------------------------
# The digits demo dataset.
# ----------------------------------------------------------------------------


def _read_records(data_dir, info, split):
  out = []
  for f in info['splits'][split]['files']:
    for rec in tf.data.TFRecordDataset(os.path.join(data_dir, f)):
      feat = tf.train.Example.FromString(rec.numpy()).features.feature
      out.append((feat['id'].bytes_list.value[0].decode(), list(feat['label'].int64_list.value),
                  feat['image'].bytes_list.value[0]))
  return out


@pytest.fixture(scope='module')
def digits_dataset(tmp_path_factory):
  out = str(tmp_path_factory.mktemp('digits'))
  return out, digits.prepare_digits(out)


def test_prepare_digits_splits(digits_dataset):
  out, info = digits_dataset
  sk = sk_datasets.load_digits()
  assert info['class_names'] == [str(d) for d in range(10)] and not info['multilabel']
  records = {s: _read_records(out, info, s) for s in ('train', 'val', 'test')}
  sizes = {s: len(r) for s, r in records.items()}
  assert sum(sizes.values()) == 1797
  assert sizes == {s: info['splits'][s]['num_examples'] for s in sizes}
  assert sizes['test'] == 180 and sizes['val'] == 180 and sizes['train'] == 1437
  ids = {s: [r[0] for r in recs] for s, recs in records.items()}
  all_ids = sum(ids.values(), [])
  assert len(set(all_ids)) == 1797  # no id twice, within or across splits
  for s, recs in records.items():
    idx = np.array([int(r[0].split('_')[1]) for r in recs])
    labels = np.array([r[1][0] for r in recs])
    np.testing.assert_array_equal(labels, sk.target[idx])  # labels follow the ids
    counts = np.bincount(labels, minlength=10)
    assert counts.tolist() == info['splits'][s]['class_counts']
    # Stratified: each class's share of the split is its share of the whole.
    expected = np.bincount(sk.target, minlength=10) * len(recs) / 1797
    assert np.abs(counts - expected).max() <= 1.0
  # Pixels follow the ids too: the PNG is the 8x8 scan upsampled 4x.
  name, _, png = records['val'][0]
  i = int(name.split('_')[1])
  image = np.asarray(Image.open(io.BytesIO(png)))
  assert image.shape == (32, 32, 3)
  grey = np.round(sk.images[i] * 255.0 / 16.0)
  np.testing.assert_array_equal(image[::4, ::4, 0], grey)
  np.testing.assert_array_equal(image[..., 0], image[..., 2])
  # A second call reuses the prepared folder.
  assert digits.prepare_digits(out) == info


def test_digits_through_the_eval_pipeline(digits_dataset):
  out, info = digits_dataset
  cfg = _cfg(image_size=16)
  batches = list(pipeline.eval_iterator(cfg, out, info, 'val', batch_size=64))
  assert len(batches) == 3
  assert sum(b['mask'].sum() for b in batches) == 180
  assert batches[-1]['mask'].sum() == 180 - 128
  targets = np.concatenate([b['targets'][b['mask'] > 0] for b in batches])
  np.testing.assert_array_equal(targets.sum(0), info['splits']['val']['class_counts'])


# ----------------------------------------------------------------------------
# Train augmentations and Mixup/CutMix in the stream.
# ----------------------------------------------------------------------------

_AUGMENTED = dict(randaugment_layers=2, randaugment_magnitude=9.0, jitter_brightness=0.3,
                  jitter_saturation=0.3, jitter_hue=0.05, mixup_alpha=0.8, cutmix_alpha=1.0)


@pytest.mark.parametrize('start_step', [2, 7])
def test_resume_with_augmentations_and_mixing(dataset, start_step):
  fresh = _take(_train(dataset, batch_size=4, **_AUGMENTED), start_step + 2)
  resumed = _take(_train(dataset, batch_size=4, start_step=start_step, **_AUGMENTED), 2)
  for want, got in zip(fresh[start_step:], resumed):
    np.testing.assert_array_equal(got['image'], want['image'])
    np.testing.assert_array_equal(got['targets'], want['targets'])
  # The augmentations are really on: pixels differ from the plain stream's,
  # and targets are mixed (soft) yet still sum to 1.
  plain = _take(_train(dataset, batch_size=4), start_step + 2)
  for a, b in zip(plain, fresh):
    assert not np.allclose(a['image'], b['image'], atol=1e-3)
  targets = np.concatenate([b['targets'] for b in fresh])
  np.testing.assert_allclose(targets.sum(1), 1.0, atol=1e-6)
  assert (targets.max(1) < 0.99).mean() > 0.5


def test_augmented_stream_depends_on_the_seed_only(dataset):
  a = _take(_train(dataset, seed=3, **_AUGMENTED), 3)
  b = _take(_train(dataset, seed=3, **_AUGMENTED), 3)
  c = _take(_train(dataset, seed=4, **_AUGMENTED), 3)
  for x, y, z in zip(a, b, c):
    np.testing.assert_array_equal(x['image'], y['image'])
    np.testing.assert_array_equal(x['targets'], y['targets'])
    assert not np.array_equal(x['image'], z['image'])


def test_randaugment_keeps_crops_flips_and_labels(dataset):
  # At magnitude 0 the geometric ops are the identity (augment.py), so the
  # stream is the plain one rounded to 8 bits: RandAugment draws from its
  # own random stream and leaves the crop/flip keys alone.
  plain = _take(_train(dataset, batch_size=5), 2)
  geometric = 'AutoContrast,Equalize,Invert,Posterize,Solarize,Color,Contrast,Brightness,Sharpness'
  ra = _take(_train(dataset, batch_size=5, randaugment_layers=2, randaugment_magnitude=0.0,
                    randaugment_exclude_ops=geometric), 2)
  for p, r in zip(plain, ra):
    np.testing.assert_allclose(r['image'] * 255.0, np.round(p['image'] * 255.0), atol=1e-3)
    np.testing.assert_array_equal(r['targets'], p['targets'])
  strong = _take(_train(dataset, batch_size=5, randaugment_layers=2), 2)
  changed = [not np.allclose(s, p, atol=2 / 255) for b, c in zip(strong, plain)
             for s, p in zip(b['image'], c['image'])]
  assert np.mean(changed) > 0.5
  for s, p in zip(strong, plain):
    np.testing.assert_array_equal(s['targets'], p['targets'])  # no mixing: labels untouched


def test_mixup_alone_mixes_every_batch_pairwise(dataset):
  (batch,) = _take(_train(dataset, batch_size=4, mixup_alpha=1.0), 1)
  (plain,) = _take(_train(dataset, batch_size=4), 1)
  lam = batch['targets'][np.arange(4), plain['targets'].argmax(1)]
  for i in range(4):
    if plain['targets'][i].argmax() == plain['targets'][3 - i].argmax():
      continue  # same class: the weight is not visible in the targets
    want = lam[i] * plain['image'][i] + (1 - lam[i]) * plain['image'][3 - i]
    np.testing.assert_allclose(batch['image'][i], want, atol=1e-5)


@pytest.mark.parametrize('overrides, match', [
    (dict(sampler='uniform'), 'data.sampler'),
    (dict(randaugment_layers=2, randaugment_exclude_ops='Shear'), "'Shear'"),
    (dict(randaugment_layers=1, randaugment_magnitude=12.0), 'randaugment_magnitude'),
    (dict(mixup_alpha=0.8, mix_prob=2.0), 'mix_prob'),
    (dict(jitter_hue=0.7), 'jitter_hue'),
])
def test_invalid_train_settings_fail_before_reading(dataset, overrides, match):
  with pytest.raises(ValueError, match=match):
    _train(dataset, **overrides)


# ----------------------------------------------------------------------------
# Class-balanced sampler.
# ----------------------------------------------------------------------------

_IMBALANCED = [16, 6, 2]  # train examples per class


@pytest.fixture(scope='module')
def imbalanced(tmp_path_factory):
  out = tmp_path_factory.mktemp('imbalanced')
  labels = [c for c, n in enumerate(_IMBALANCED) for _ in range(n)]
  examples = [(_png(_coded_image(i, c)), [c], f'x{i}') for i, c in enumerate(labels)]
  return str(out), _write_dataset(out, {'train': examples})


def _class_counts(dataset, sampler, steps, seed=0):
  batches = _take(_train(dataset, batch_size=8, seed=seed, sampler=sampler), steps)
  index, label = _decode_ids(np.concatenate([b['image'] for b in batches]))
  targets = np.concatenate([b['targets'] for b in batches])
  np.testing.assert_array_equal(targets.argmax(1), label)
  return np.bincount(label, minlength=3), index


def _chi_square(counts, shares):
  expected = np.asarray(shares) / np.sum(shares) * np.sum(counts)
  return float(np.sum((counts - expected) ** 2 / expected))


def test_plain_stream_follows_the_data(imbalanced):
  counts, _ = _class_counts(imbalanced, 'none', 60)  # 480 examples = 20 epochs of 24
  np.testing.assert_array_equal(counts, np.array(_IMBALANCED) * 20)


def test_balanced_sampler_is_near_uniform(imbalanced):
  counts, index = _class_counts(imbalanced, 'balanced', 60)
  # Chi-square with 2 degrees of freedom: 13.8 is the 0.1% tail.
  assert _chi_square(counts, [1, 1, 1]) < 13.8, counts
  assert _chi_square(counts, _IMBALANCED) > 200  # and far from the data's shares
  # Every example is used, the two of the rarest class about 80 times each.
  assert set(index) == set(range(sum(_IMBALANCED)))
  rare = np.bincount(index, minlength=24)[22:]
  assert np.all((rare > 50) & (rare < 110)), rare


def test_sqrt_sampler_shares(imbalanced):
  counts, _ = _class_counts(imbalanced, 'sqrt', 60)
  assert _chi_square(counts, np.sqrt(_IMBALANCED)) < 13.8, counts


@pytest.mark.parametrize('start_step', [3, 11])
def test_balanced_sampler_resumes_exactly(imbalanced, start_step):
  fresh = _take(_train(imbalanced, batch_size=8, sampler='balanced', randaugment_layers=1),
                start_step + 2)
  resumed = _take(_train(imbalanced, batch_size=8, sampler='balanced', randaugment_layers=1,
                         start_step=start_step), 2)
  for want, got in zip(fresh[start_step:], resumed):
    np.testing.assert_array_equal(got['image'], want['image'])
    np.testing.assert_array_equal(got['targets'], want['targets'])


def test_balanced_sampler_multilabel_favours_the_rare_label(tmp_path):
  # Label 2 is on 2 of 20 examples, always together with label 0.
  labels = [[0]] * 12 + [[1]] * 6 + [[0, 2]] * 2
  examples = [(_png(_coded_image(i, 0)), ls, f'm{i}') for i, ls in enumerate(labels)]
  info = _write_dataset(tmp_path, {'train': examples}, multilabel=True)
  data = (str(tmp_path), info)

  def label_shares(sampler):
    batches = _take(_train(data, batch_size=10, sampler=sampler), 40)
    targets = np.concatenate([b['targets'] for b in batches])
    return targets.mean(0)

  plain, balanced = label_shares('none'), label_shares('balanced')
  np.testing.assert_allclose(plain, [14 / 20, 6 / 20, 2 / 20])
  assert balanced[2] > 2.5 * plain[2] and balanced[1] > plain[1]


# ----------------------------------------------------------------------------
# TFDS source.
# ----------------------------------------------------------------------------

import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top,wrong-import-position

from vit_jax_ft.inputs import tfds_source  # pylint: disable=g-import-not-at-top,wrong-import-position

with tfds.core.registered.skip_registration():

  class CodedImages(tfds.core.GeneratorBasedBuilder):
    """A tiny TFDS dataset of the coded images, built offline in the tests."""

    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self, supervised_keys=('picture', 'kind'),
          features=tfds.features.FeaturesDict({
              'picture': tfds.features.Image(shape=(H, W, 3)),
              'kind': tfds.features.ClassLabel(names=['a', 'b', 'c'])}))

    def _split_generators(self, dl_manager):
      del dl_manager  # nothing to download
      return {'train': self._generate_examples(0, NUM_TRAIN),
              'test': self._generate_examples(NUM_TRAIN, NUM_VAL)}

    def _generate_examples(self, offset, n):
      for i in range(offset, offset + n):
        yield i, {'picture': _coded_image(i, _label_of(i)), 'kind': _label_of(i)}


@pytest.fixture(scope='module')
def tfds_dir(tmp_path_factory):
  out = str(tmp_path_factory.mktemp('tfds'))
  CodedImages(data_dir=out).download_and_prepare()
  return out


def _tfds_cfg(data_dir, **overrides):
  return _cfg(source='tfds', tfds_name='coded_images', tfds_dir=data_dir, **overrides)


def test_tfds_source_reads_a_prepared_dataset(tfds_dir):
  cfg = _tfds_cfg(tfds_dir, train_split='train[:60%]', val_split='train[60%:]',
                  test_split='test')
  data_dir, info = tfds_source.load_data_info(cfg)
  assert data_dir.endswith(os.path.join('coded_images', '1.0.0'))
  assert info['class_names'] == ['a', 'b', 'c'] and not info['multilabel']
  assert {s: v['num_examples'] for s, v in info['splits'].items()} == {
      'train[:60%]': 6, 'train[60%:]': 4, 'test': NUM_VAL}
  # The eval stream visits the test split once, labels following the images.
  batches = list(pipeline.eval_iterator(cfg, data_dir, info, 'test', batch_size=4))
  mask = np.concatenate([b['mask'] for b in batches]) > 0
  index, label = _decode_ids(np.concatenate([b['image'] for b in batches])[mask])
  assert sorted(index) == list(range(NUM_TRAIN, NUM_TRAIN + NUM_VAL))
  targets = np.concatenate([b['targets'] for b in batches])[mask]
  np.testing.assert_array_equal(targets, np.eye(3)[[_label_of(i) for i in index]])
  np.testing.assert_array_equal(label, [_label_of(i) for i in index])
  assert info['splits']['test']['class_counts'] == np.bincount(label, minlength=3).tolist()
  # Train epochs over a sub-split are permutations of exactly its examples.
  train = _take(pipeline.train_iterator(cfg, data_dir, info, batch_size=3, seed=0), 4)
  index, label = _decode_ids(np.concatenate([b['image'] for b in train]))
  val_index, _ = _decode_ids(np.concatenate(
      [b['image'] for b in pipeline.eval_iterator(cfg, data_dir, info, 'train[60%:]',
                                                        batch_size=4)]))
  assert sorted(index[:6]) == sorted(index[6:]) and len(set(index[:6])) == 6
  assert not set(index) & set(val_index) and len(set(index) | set(val_index)) == NUM_TRAIN
  np.testing.assert_array_equal(label, [_label_of(i) for i in index])


def test_tfds_missing_dataset_fails_at_once(tmp_path, tfds_dir):
  start = time.monotonic()
  with pytest.raises(FileNotFoundError) as e:
    tfds_source.load_data_info(_cfg(source='tfds', tfds_name='food101', tfds_dir=str(tmp_path)))
  assert time.monotonic() - start < 2.0
  message = str(e.value)
  assert str(tmp_path) in message and 'tfds build food101' in message
  assert 'never downloads' in message
  # A version that is not there names the folder it looked for.
  with pytest.raises(FileNotFoundError, match='coded_images/9.9.9'):
    tfds_source.load_data_info(_cfg(source='tfds', tfds_name='coded_images/9.9.9',
                                    tfds_dir=tfds_dir))
  assert time.monotonic() - start < 4.0


def test_tfds_unknown_split_names_the_splits(tfds_dir):
  with pytest.raises(ValueError, match='validation.*test.*train|test.*train'):
    tfds_source.load_data_info(_tfds_cfg(tfds_dir, val_split='validation'))
