"""tf.data input pipelines over prepared TFRecord (or TFDS) datasets.

Training data is one endless stream: epoch e is the train split with its shard
order and records shuffled by seeds derived from (seed, e), and every random
augmentation is a stateless op keyed by (seed, e, position in the epoch). So
the stream is a pure function of the seed, and resuming at step s just skips
the first s * batch_size records (cheaply: before decoding).

Per example (train): decode (JPEGs: only the crop window), random-resized
crop, resize, flip, optional colour jitter and RandAugment
(`vit_jax_ft.inputs.augment`), normalisation. Per batch: optional Mixup / CutMix
(`vit_jax_ft.inputs.mixing`) keyed by (seed, step). With `data.sampler` set, each
epoch repeats rare classes and thins frequent ones (`vit_jax_ft.inputs.sampling`).

Evaluation visits every example of a split exactly once; the last partial
batch is padded and carries `mask` = 0 on the padding.

A split's records come from `info['splits'][split]`: either `files` (names
relative to the dataset folder, every record) or `shards`, a list of
[path, skip, take] (take -1: to the end), which TFDS sub-splits such as
'train[:90%]' use. `info['features']` may rename the image and label
features (TFDS datasets); the default is {'image': 'image', 'label': 'label'}.
"""

import contextlib
import os
import re
import time
from typing import Iterator, NamedTuple

from absl import logging
import ml_collections
import numpy as np
import tensorflow as tf

from vit_jax_ft.data import tfrecords
from vit_jax_ft.inputs import augment
from vit_jax_ft.inputs import mixing
from vit_jax_ft.inputs import normalization
from vit_jax_ft.inputs import sampling

NORMALIZATIONS = normalization.MODES
_DEFAULT_FEATURES = {"image": "image", "label": "label"}
# Fold-in constants that separate the random streams derived from one
# example key (crop and flip use stateless_split of the key itself).
_JITTER_STREAM = 101
_RANDAUGMENT_STREAM = 102
_DIHEDRAL_STREAM = 103
_MIX_STREAM = 1  # Per-batch keys fold the step into [seed, _MIX_STREAM].
_JPEG_RATIOS = (1, 2, 4, 8)  # The scalings libjpeg can decode to.
# Scale JPEG decoding down only while the crop stays >= this x image_size:
# DCT-domain scaling blurs and aliases more than the antialiased resize (on
# ArtDL paintings, decoding 4x smaller changes the 224 px result by 1-4 grey
# levels on average), so the resize keeps doing the last >= 2x of shrinking.
# Then only large photos are scaled at all, where decoding dominates.
_JPEG_SCALE_HEADROOM = 2


class Shard(NamedTuple):
  """Records [skip, skip + take) of one TFRecord file (take -1: to the end)."""

  path: str
  skip: int = 0
  take: int = -1


def split_shards(data_dir: str, info: dict, split: str) -> list[Shard]:
  """The record files of `split`, checked to exist."""
  if split not in info["splits"]:
    raise ValueError(f"Split {split!r} is not in {data_dir}/{tfrecords.INFO_FILE} "
                     f"(it has {sorted(info['splits'])}).")
  entry = info["splits"][split]
  if "shards" in entry:
    shards = [Shard(os.path.join(data_dir, p), int(s), int(t)) for p, s, t in entry["shards"]]
  else:
    shards = [Shard(os.path.join(data_dir, f)) for f in entry["files"]]
  missing = [s.path for s in shards if not os.path.exists(s.path)]
  if missing:
    raise FileNotFoundError(f"Dataset {data_dir} lists shards that do not exist: {missing[:3]}")
  # Cheap (one stat per shard); also catches a shard changed since the run started.
  tfrecords.check_shards(data_dir, info, [split], quiet=True)
  return shards


@contextlib.contextmanager
def naming_damaged_shards(data_dir: str, info: dict, split: str, shards: list[Shard]):
  """Re-raises a DataLossError inside (a corrupt record) as a DamagedShardError naming the shard.

  TensorFlow's message gives the record's offset but not its file.
  """
  try:
    yield
  except tf.errors.DataLossError as e:
    raise _damaged_shard_error(data_dir, info, split, shards, e) from e


def _damaged_shard_error(data_dir: str, info: dict, split: str, shards: list[Shard],
                        error: Exception) -> tfrecords.DamagedShardError:
  """The error naming which of `shards` is damaged, after `error` while reading them.

  Tries the recorded sizes and checksums first, then reads each shard in turn:
  slow, but only on this failure path.
  """
  reason = re.search(r"(corrupted|truncated) record at \d+", str(error))
  reason = reason.group(0) if reason else (str(error).splitlines() or [type(error).__name__])[0]
  try:
    tfrecords.verify_shards(data_dir, info, [split])
  except tfrecords.DamagedShardError as found:
    return found
  hint = tfrecords.rebuild_hint(data_dir, info)
  for path in dict.fromkeys(s.path for s in shards):
    try:
      tf.data.TFRecordDataset(path).reduce(0, lambda n, _: n + 1).numpy()
    except tf.errors.DataLossError:
      return tfrecords.DamagedShardError(
          f"Shard {path} of split {split!r} is damaged ({reason}); {hint}")
  return tfrecords.DamagedShardError(
      f"A shard of split {split!r} in {data_dir} could not be read ({reason}), though each "
      f"reads back alone now; if it happens again, {hint}")


def _guarded(batches: Iterator[dict], data_dir: str, info: dict, split: str,
             shards: list[Shard]) -> Iterator[dict]:
  with naming_damaged_shards(data_dir, info, split, shards):
    yield from batches


def _shard_records(path, skip, take) -> tf.data.Dataset:
  """The records of one shard: the one place a TFRecord file is opened."""
  return tf.data.TFRecordDataset(path).skip(skip).take(take)


def _records(shards: list[Shard]) -> tf.data.Dataset:
  """All records of `shards`, in order."""
  paths, skips, takes = (tf.constant(list(x)) for x in zip(*shards))
  return tf.data.Dataset.from_tensor_slices((paths, tf.cast(skips, tf.int64),
                                             tf.cast(takes, tf.int64))).flat_map(_shard_records)


def split_ids(data_dir: str, info: dict, split: str) -> list[str]:
  """Example ids of `split` in eval order (its records' 'id'; the index if absent)."""
  spec = {"id": tf.io.FixedLenFeature([], tf.string, default_value="")}
  shards = split_shards(data_dir, info, split)
  ds = _records(shards).map(lambda r: tf.io.parse_single_example(r, spec)["id"]).batch(1024)
  with naming_damaged_shards(data_dir, info, split, shards):
    ids = [b.decode("utf-8", "replace") for batch in ds.as_numpy_iterator() for b in batch]
  return [i or f"#{n}" for n, i in enumerate(ids)]


def _feature_names(info: dict) -> dict:
  return _DEFAULT_FEATURES | info.get("features", {})


def _parse(record, num_classes: int, names: dict = _DEFAULT_FEATURES):
  ex = tf.io.parse_single_example(record, {
      names["image"]: tf.io.FixedLenFeature([], tf.string),
      names["label"]: tf.io.VarLenFeature(tf.int64)})
  # Multi-hot targets (one-hot for single-label data; all zeros for a
  # multi-label example without labels, where reduce_max would give -inf).
  return ex[names["image"]], _multi_hot(ex[names["label"]].values, num_classes)


def _multi_hot(labels, num_classes: int) -> tf.Tensor:
  return tf.minimum(tf.reduce_sum(tf.one_hot(labels, num_classes, dtype=tf.float32), 0), 1.0)


def scan_labels(shards: list[Shard], num_classes: int,
                label_key: str = "label") -> tuple[np.ndarray, list[int]]:
  """Labels of every record, without decoding images.

  Returns:
    bool [N, C] multi-hot labels in shard order, and the number of records
    each shard contributed.
  """
  paths, skips, takes = (tf.constant(list(x)) for x in zip(*shards))

  def shard(i, path, skip, take):
    return _shard_records(path, skip, take).map(lambda r: (i, r))

  def labels(i, record):
    ex = tf.io.parse_single_example(record, {label_key: tf.io.VarLenFeature(tf.int64)})
    return i, _multi_hot(ex[label_key].values, num_classes) > 0

  ds = tf.data.Dataset.from_tensor_slices(
      (tf.range(len(shards)), paths, tf.cast(skips, tf.int64), tf.cast(takes, tf.int64)))
  ds = ds.flat_map(shard).map(labels, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  index, multi_hot = [], []
  for i, m in ds.batch(8192).as_numpy_iterator():
    index.append(i)
    multi_hot.append(m)
  if not index:
    return np.zeros((0, num_classes), bool), [0] * len(shards)
  sizes = np.bincount(np.concatenate(index), minlength=len(shards))
  return np.concatenate(multi_hot), sizes.tolist()


def normalize(image: tf.Tensor, mode: str) -> tf.Tensor:
  """Scales a [0, 255] float image the way the (pretrained) model expects."""
  if mode == "imagenet":
    # (x / 255 - mean) / std as one multiply-add with full-shape constants
    # (broadcasting a [3] vector is several times slower on CPU).
    mean, std = np.asarray(normalization.IMAGENET_MEAN), np.asarray(normalization.IMAGENET_STD)
    scale = 1.0 / (255.0 * std)
    offset = -mean / std
    return image * augment.per_channel(scale, image) + augment.per_channel(offset, image)
  if mode == "minus_one_to_one":
    return image / 127.5 - 1.0
  if mode == "zero_one":
    return image / 255.0
  if mode == "caffe_bgr":
    return image[..., ::-1] - augment.per_channel(normalization.CAFFE_BGR_MEAN, image)
  raise ValueError(f"data.normalization must be one of {NORMALIZATIONS}, got {mode!r}")


def _decode(image_bytes) -> tf.Tensor:
  image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  return image


def _decode_and_crop(image_bytes, crop_seed, cfg: ml_collections.ConfigDict) -> tf.Tensor:
  """Decodes the random-resized crop window (for JPEGs, only that window)."""
  def window(shape):
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, tf.zeros([0, 0, 4], tf.float32), seed=crop_seed,
        area_range=(cfg.crop_min_scale, 1.0), aspect_ratio_range=(3 / 4, 4 / 3),
        min_object_covered=0.0, use_image_if_no_bounding_boxes=True)
    return begin, size

  def jpeg():
    # The box depends on the height and width only, so it is the box a full
    # decode would get; decoding just the window saves most of the work.
    shape = tf.image.extract_jpeg_shape(image_bytes)
    begin, size = window(tf.concat([shape[:2], [3]], 0))
    # libjpeg can also scale by 1/2, 1/4 or 1/8 while decoding (in the DCT
    # domain, much cheaper than decoding every pixel of a large photo): use
    # the largest factor that keeps the crop's shorter side at least
    # _JPEG_SCALE_HEADROOM x image_size, so the antialiased resize below
    # still does the real shrinking.
    min_side = _JPEG_SCALE_HEADROOM * cfg.image_size * tf.constant(_JPEG_RATIOS[1:])
    ratio_index = tf.reduce_sum(tf.cast(tf.reduce_min(size[:2]) >= min_side, tf.int32))

    def decode(ratio):
      scaled = -(-shape[:2] // ratio)  # libjpeg rounds the scaled size up
      top_left = tf.minimum(begin[:2] // ratio, scaled - 1)
      extent = tf.maximum(tf.minimum(size[:2] // ratio, scaled - top_left), 1)
      crop = tf.concat([top_left, extent], 0)
      return lambda: tf.image.decode_and_crop_jpeg(image_bytes, crop, channels=3, ratio=ratio)

    return tf.switch_case(ratio_index, [decode(r) for r in _JPEG_RATIOS])

  def other():
    image = _decode(image_bytes)
    begin, size = window(tf.shape(image))
    return tf.slice(image, begin, size)

  image = tf.cond(tf.io.is_jpeg(image_bytes), jpeg, other)
  image.set_shape([None, None, 3])
  return image


def _resize(image: tf.Tensor, size: int) -> tf.Tensor:
  """Bilinear resize to [size, size]; antialiased where it shrinks."""
  def resize(antialias):
    return lambda: tf.image.resize(image, [size, size], method="bilinear", antialias=antialias)

  # Antialiasing only matters when shrinking, and costs ~5x when enlarging.
  shrinks = tf.reduce_any(tf.shape(image)[:2] > size)
  return tf.cond(shrinks, resize(True), resize(False))


def _jitter(cfg: ml_collections.ConfigDict) -> dict:
  return dict(brightness=cfg.jitter_brightness, contrast=cfg.jitter_contrast,
              saturation=cfg.jitter_saturation, hue=cfg.jitter_hue)


def _train_preprocess(image_bytes, seed, cfg: ml_collections.ConfigDict) -> tf.Tensor:
  """Decode, random crop, flip, colour jitter, RandAugment; `seed` is a stateless [2] int seed."""
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  size = cfg.image_size
  if cfg.crop == "random_resized":
    image = _decode_and_crop(image_bytes, crop_seed, cfg)
  elif cfg.crop == "none":
    image = _decode(image_bytes)
  else:
    raise ValueError(f"data.crop must be 'random_resized' or 'none', got {cfg.crop!r}")
  image = _resize(image, size)
  if cfg.flip:
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  if cfg.dihedral:
    image = _random_dihedral(image, tf.random.experimental.stateless_fold_in(seed, _DIHEDRAL_STREAM))
  if any(_jitter(cfg).values()):
    image = augment.color_jitter(
        image, tf.random.experimental.stateless_fold_in(seed, _JITTER_STREAM), **_jitter(cfg))
  if cfg.randaugment_layers:
    image = augment.randaugment(
        image, tf.random.experimental.stateless_fold_in(seed, _RANDAUGMENT_STREAM),
        num_layers=cfg.randaugment_layers, magnitude=cfg.randaugment_magnitude,
        exclude_ops=cfg.randaugment_exclude_ops, cutout_const=cfg.randaugment_cutout,
        translate_const=cfg.randaugment_translate)
  return image


def _random_dihedral(image: tf.Tensor, seed) -> tf.Tensor:
  """A vertical flip and a 90-degree rotation, each random: with the horizontal
  flip, all 8 orientations of the square crop (what `--tta=dihedral` averages)."""
  flip_seed, rot_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  image = tf.image.stateless_random_flip_up_down(image, flip_seed)
  k = tf.random.stateless_uniform([], rot_seed, 0, 4, dtype=tf.int32)
  return tf.image.rot90(image, k)


def eval_preprocess(image_bytes, cfg: ml_collections.ConfigDict) -> tf.Tensor:
  """Resize the shorter side to image_size / fraction, then centre-crop."""
  image = tf.cast(_decode(image_bytes), tf.float32)
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  target = cfg.image_size / cfg.eval_crop_fraction
  scale = target / tf.reduce_min(shape)
  new_hw = tf.cast(tf.math.ceil(shape * scale - 1e-6), tf.int32)
  new_hw = tf.maximum(new_hw, cfg.image_size)
  image = tf.image.resize(image, new_hw, method="bilinear", antialias=True)
  return tf.image.resize_with_crop_or_pad(image, cfg.image_size, cfg.image_size)


def check_train_config(cfg: ml_collections.ConfigDict) -> None:
  """Raises ValueError for invalid augmentation / sampler settings, before any data is read."""
  if cfg.crop not in ("random_resized", "none"):
    raise ValueError(f"data.crop must be 'random_resized' or 'none', got {cfg.crop!r}")
  sampling.power_of(cfg.sampler)
  if cfg.randaugment_layers < 0:
    raise ValueError(f"data.randaugment_layers must be >= 0, got {cfg.randaugment_layers}.")
  if cfg.randaugment_layers:
    augment.parse_ops(cfg.randaugment_exclude_ops)
    if not 0.0 <= cfg.randaugment_magnitude <= 10.0:
      raise ValueError(
          f"data.randaugment_magnitude must be in [0, 10], got {cfg.randaugment_magnitude}.")
  for name, value in _jitter(cfg).items():
    limit = 0.5 if name == "hue" else float("inf")
    if not 0.0 <= value <= limit:
      raise ValueError(f"data.jitter_{name} must be in [0, {limit}], got {value}.")
  mixing.check_config(cfg.mixup_alpha, cfg.cutmix_alpha, cfg.mix_prob, cfg.mix_switch_prob)


def train_iterator(cfg: ml_collections.ConfigDict, data_dir: str, info: dict, *,
                   batch_size: int, seed: int, start_step: int = 0, process_index: int = 0,
                   process_count: int = 1) -> Iterator[dict]:
  """Endless iterator of numpy train batches {'image', 'targets'} from `start_step`.

  `batch_size` is global. With several processes, each builds the same global
  stream and keeps every process_count-th example, so process p's batches
  are its slice of the global batches (every process reads all records; fine
  for datasets of this size, and it keeps resuming exact). Mixup/CutMix
  partners are taken within a process's slice.
  """
  if batch_size % process_count:
    raise ValueError(f"batch_size={batch_size} must divide over {process_count} processes.")
  check_train_config(cfg)
  shards = split_shards(data_dir, info, cfg.train_split)
  num_examples = info["splits"][cfg.train_split]["num_examples"]
  num_classes = len(info["class_names"])
  names = _feature_names(info)
  start = start_step * batch_size
  paths = tf.constant([s.path for s in shards])
  skips = tf.constant([s.skip for s in shards], tf.int64)
  takes = tf.constant([s.take for s in shards], tf.int64)
  num_shards = len(shards)

  if cfg.sampler == "none":
    start_epoch, skip = divmod(start, num_examples)
    copies_of_epoch = None
  else:
    t0 = time.time()
    with naming_damaged_shards(data_dir, info, cfg.train_split, shards):
      labels, sizes = scan_labels(shards, num_classes, names["label"])
    if len(labels) != num_examples:
      raise ValueError(f"Split {cfg.train_split!r} has {len(labels)} records but the dataset "
                       f"info says num_examples={num_examples}; re-prepare the dataset.")
    rates = sampling.example_rates(labels, sampling.power_of(cfg.sampler))
    start_epoch, skip = sampling.locate(start, rates, seed)
    logging.info("data.sampler=%r: read %d labels in %.1fs; example rates %.3g to %.3g.",
                 cfg.sampler, len(labels), time.time() - t0, rates.min(), rates.max())
    rates = tf.constant(rates, tf.float64)
    # Global record number of each shard's first record: records are
    # identified by it plus their index within the shard.
    offsets = tf.constant(np.concatenate([[0], np.cumsum(sizes)[:-1]]), tf.int64)

    def copies_of_epoch(e):
      return sampling.epoch_copies(rates, sampling.epoch_key(seed, e))

  def shard_records(i):
    ds = _shard_records(paths[i], skips[i], takes[i])
    if copies_of_epoch is None:
      return ds
    return ds.enumerate(offsets[i])

  def epoch(e):
    epoch_seed = tf.stack([tf.constant(seed, tf.int64), e])
    order = tf.random.experimental.stateless_shuffle(tf.range(num_shards), seed=epoch_seed)
    ds = tf.data.Dataset.from_tensor_slices(order).interleave(
        shard_records, cycle_length=min(num_shards, 8))
    if copies_of_epoch is not None:
      copies = copies_of_epoch(e)
      ds = ds.flat_map(lambda uid, rec: tf.data.Dataset.from_tensors(rec).repeat(copies[uid]))
    ds = ds.shuffle(cfg.shuffle_buffer, seed=seed * 1_000_003 + e)
    return ds.enumerate().map(lambda i, rec: (tf.stack([e, i]), rec))

  ds = tf.data.Dataset.range(start_epoch, 2**62).flat_map(epoch).skip(skip)
  ds = ds.shard(process_count, process_index)

  def preprocess(epoch_and_index, record):
    image_bytes, targets = _parse(record, num_classes, names)
    key = tf.random.experimental.stateless_fold_in(
        tf.cast(tf.stack([seed, 0]), tf.int64), epoch_and_index[0])
    key = tf.random.experimental.stateless_fold_in(key, epoch_and_index[1])
    image = normalize(_train_preprocess(image_bytes, key, cfg), cfg.normalization)
    return {"image": tf.cast(image, tf.float32), "targets": targets}

  ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(batch_size // process_count, drop_remainder=True)
  if cfg.mixup_alpha or cfg.cutmix_alpha:
    mix_base = tf.random.experimental.stateless_fold_in(
        tf.constant([seed, _MIX_STREAM], tf.int64), process_index)

    def mix(step, batch):
      key = tf.random.experimental.stateless_fold_in(mix_base, step)
      return mixing.mix_batch(batch, key, mixup_alpha=cfg.mixup_alpha,
                              cutmix_alpha=cfg.cutmix_alpha, prob=cfg.mix_prob,
                              switch_prob=cfg.mix_switch_prob)

    ds = ds.enumerate(start_step).map(mix, num_parallel_calls=tf.data.AUTOTUNE,
                                      deterministic=True)
  return _guarded(ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator(), data_dir, info,
                  cfg.train_split, shards)


def eval_iterator(cfg: ml_collections.ConfigDict, data_dir: str, info: dict, split: str, *,
                  batch_size: int, process_index: int = 0,
                  process_count: int = 1) -> Iterator[dict]:
  """One pass over `split` in order: {'image', 'targets', 'mask'}, padded to batch_size.

  `batch_size` is global; each process yields the same number of batches of
  batch_size / process_count (all-padding batches where its share runs out),
  so that collective eval steps stay in lockstep.
  """
  shards = split_shards(data_dir, info, split)
  num_classes = len(info["class_names"])
  names = _feature_names(info)
  local_batch = batch_size // process_count
  per_process = -(-info["splits"][split]["num_examples"] // process_count)
  num_batches = -(-per_process // local_batch)

  def preprocess(record):
    image_bytes, targets = _parse(record, num_classes, names)
    image = normalize(eval_preprocess(image_bytes, cfg), cfg.normalization)
    return {"image": tf.cast(image, tf.float32), "targets": targets}

  ds = _records(shards).shard(process_count, process_index).map(
      preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(local_batch).prefetch(tf.data.AUTOTUNE)
  yielded = 0
  with naming_damaged_shards(data_dir, info, split, shards):
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
