"""tf.data input pipelines over prepared TFRecord datasets.

Training data is one endless stream: epoch e is the train split with its shard
order and records shuffled by seeds derived from (seed, e), and every random
augmentation is a stateless op keyed by (seed, e, position in the epoch). So
the stream is a pure function of the seed, and resuming at step s just skips
the first s * batch_size records (cheaply: before decoding).

Evaluation visits every example of a split exactly once; the last partial
batch is padded and carries `mask` = 0 on the padding.
"""

import os
from typing import Iterator

import ml_collections
import numpy as np
import tensorflow as tf

from vit_jax_ft.data import tfrecords

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)  # Keras Applications ResNet50.
NORMALIZATIONS = ("imagenet", "minus_one_to_one", "zero_one", "caffe_bgr")
_FEATURES = {
    "image": tf.io.FixedLenFeature([], tf.string),
    "label": tf.io.VarLenFeature(tf.int64),
    "id": tf.io.FixedLenFeature([], tf.string),
}


def _split_files(data_dir: str, info: dict, split: str) -> list[str]:
  if split not in info["splits"]:
    raise ValueError(f"Split {split!r} is not in {data_dir}/{tfrecords.INFO_FILE} "
                     f"(it has {sorted(info['splits'])}).")
  files = [os.path.join(data_dir, f) for f in info["splits"][split]["files"]]
  missing = [f for f in files if not os.path.exists(f)]
  if missing:
    raise FileNotFoundError(f"Dataset {data_dir} lists shards that do not exist: {missing[:3]}")
  return files


def normalize(image: tf.Tensor, mode: str) -> tf.Tensor:
  """Scales a [0, 255] float image the way the (pretrained) model expects."""
  if mode == "imagenet":
    return (image / 255.0 - _IMAGENET_MEAN) / _IMAGENET_STD
  if mode == "minus_one_to_one":
    return image / 127.5 - 1.0
  if mode == "zero_one":
    return image / 255.0
  if mode == "caffe_bgr":
    return image[..., ::-1] - _CAFFE_BGR_MEAN
  raise ValueError(f"data.normalization must be one of {NORMALIZATIONS}, got {mode!r}")


def _parse(record, num_classes: int):
  ex = tf.io.parse_single_example(record, _FEATURES)
  labels = tf.sparse.to_dense(ex["label"])
  # Multi-hot targets (one-hot for single-label data; all zeros for a
  # multi-label example without labels, where reduce_max would give -inf).
  targets = tf.minimum(tf.reduce_sum(tf.one_hot(labels, num_classes, dtype=tf.float32), 0), 1.0)
  return ex["image"], targets


def _decode(image_bytes) -> tf.Tensor:
  image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  return image


def _train_preprocess(image_bytes, seed, cfg: ml_collections.ConfigDict) -> tf.Tensor:
  """Decode, random crop, flip; `seed` is a stateless [2] int seed."""
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  size = cfg.image_size
  image = _decode(image_bytes)
  if cfg.crop == "random_resized":
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image), tf.zeros([0, 0, 4], tf.float32), seed=crop_seed,
        area_range=(cfg.crop_min_scale, 1.0), aspect_ratio_range=(3 / 4, 4 / 3),
        min_object_covered=0.0, use_image_if_no_bounding_boxes=True)
    image = tf.slice(image, begin, crop_size)
  elif cfg.crop != "none":
    raise ValueError(f"data.crop must be 'random_resized' or 'none', got {cfg.crop!r}")
  image = tf.image.resize(image, [size, size], method="bilinear", antialias=True)
  if cfg.flip:
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  return image


def _eval_preprocess(image_bytes, cfg: ml_collections.ConfigDict) -> tf.Tensor:
  """Resize the shorter side to image_size / fraction, then centre-crop."""
  image = tf.cast(_decode(image_bytes), tf.float32)
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  target = cfg.image_size / cfg.eval_crop_fraction
  scale = target / tf.reduce_min(shape)
  new_hw = tf.cast(tf.math.ceil(shape * scale - 1e-6), tf.int32)
  new_hw = tf.maximum(new_hw, cfg.image_size)
  image = tf.image.resize(image, new_hw, method="bilinear", antialias=True)
  return tf.image.resize_with_crop_or_pad(image, cfg.image_size, cfg.image_size)


def train_iterator(cfg: ml_collections.ConfigDict, data_dir: str, info: dict, *,
                   batch_size: int, seed: int, start_step: int = 0, process_index: int = 0,
                   process_count: int = 1) -> Iterator[dict]:
  """Endless iterator of numpy train batches {'image', 'targets'} from `start_step`.

  `batch_size` is global. With several processes, each builds the same global
  stream and keeps every process_count-th example, so process p's batches
  are its slice of the global batches (every process reads all records; fine
  for datasets of this size, and it keeps resuming exact).
  """
  if batch_size % process_count:
    raise ValueError(f"batch_size={batch_size} must divide over {process_count} processes.")
  files = _split_files(data_dir, info, cfg.train_split)
  num_examples = info["splits"][cfg.train_split]["num_examples"]
  num_classes = len(info["class_names"])
  start = start_step * batch_size
  start_epoch, skip = divmod(start, num_examples)

  def epoch(e):
    epoch_seed = tf.stack([tf.constant(seed, tf.int64), e])
    shards = tf.random.experimental.stateless_shuffle(tf.constant(files), seed=epoch_seed)
    ds = tf.data.Dataset.from_tensor_slices(shards).interleave(
        tf.data.TFRecordDataset, cycle_length=min(len(files), 8))
    ds = ds.shuffle(cfg.shuffle_buffer, seed=seed * 1_000_003 + e)
    return ds.enumerate().map(lambda i, rec: (tf.stack([e, i]), rec))

  ds = tf.data.Dataset.range(start_epoch, 2**62).flat_map(epoch).skip(skip)
  ds = ds.shard(process_count, process_index)

  def preprocess(epoch_and_index, record):
    image_bytes, targets = _parse(record, num_classes)
    key = tf.random.experimental.stateless_fold_in(
        tf.cast(tf.stack([seed, 0]), tf.int64), epoch_and_index[0])
    key = tf.random.experimental.stateless_fold_in(key, epoch_and_index[1])
    image = normalize(_train_preprocess(image_bytes, key, cfg), cfg.normalization)
    return {"image": tf.cast(image, tf.float32), "targets": targets}

  ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(batch_size // process_count, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  return ds.as_numpy_iterator()


def eval_iterator(cfg: ml_collections.ConfigDict, data_dir: str, info: dict, split: str, *,
                  batch_size: int, process_index: int = 0,
                  process_count: int = 1) -> Iterator[dict]:
  """One pass over `split` in order: {'image', 'targets', 'mask'}, padded to batch_size.

  `batch_size` is global; each process yields the same number of batches of
  batch_size / process_count (all-padding batches where its share runs out),
  so that collective eval steps stay in lockstep.
  """
  files = _split_files(data_dir, info, split)
  num_classes = len(info["class_names"])
  local_batch = batch_size // process_count
  per_process = -(-info["splits"][split]["num_examples"] // process_count)
  num_batches = -(-per_process // local_batch)

  def preprocess(record):
    image_bytes, targets = _parse(record, num_classes)
    image = normalize(_eval_preprocess(image_bytes, cfg), cfg.normalization)
    return {"image": tf.cast(image, tf.float32), "targets": targets}

  ds = tf.data.TFRecordDataset(files).shard(process_count, process_index).map(
      preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(local_batch).prefetch(tf.data.AUTOTUNE)
  yielded = 0
  for batch in ds.as_numpy_iterator():
    yield pad_batch(batch, local_batch)
    yielded += 1
  size = cfg.image_size
  empty = {"image": np.zeros((0, size, size, 3), np.float32),
           "targets": np.zeros((0, num_classes), np.float32)}
  for _ in range(num_batches - yielded):
    yield pad_batch(empty, local_batch)


def pad_batch(batch: dict, batch_size: int) -> dict:
  """Pads a partial batch with zeros and adds `mask` (1 = real example)."""
  n = len(next(iter(batch.values())))
  padded = {k: np.concatenate([v, np.zeros((batch_size - n,) + v.shape[1:], v.dtype)])
            for k, v in batch.items()}
  padded["mask"] = (np.arange(batch_size) < n).astype(np.float32)
  return padded
