"""The offline demo dataset: scikit-learn's 1,797 handwritten digits.

The 8x8 scans ship inside scikit-learn, so the demo needs no download. They
are upsampled to RGB PNGs and written through the same TFRecord format as
real data, so the demo exercises the real input pipeline end to end.
"""

import io
import os

import numpy as np
from absl import logging
from PIL import Image
from sklearn import datasets as sk_datasets
from sklearn import model_selection

from vit_jax_ft.data import folds as folds_lib
from vit_jax_ft.data import tfrecords


def _png(pixels: np.ndarray, scale: int) -> bytes:
  # Digits are 0..16 grey levels; nearest-neighbour upsampling keeps one
  # source pixel per scale x scale block.
  grey = np.round(pixels.reshape(8, 8) * (255.0 / 16.0)).astype(np.uint8)
  rgb = np.repeat(np.repeat(grey, scale, axis=0), scale, axis=1)[..., None].repeat(3, axis=-1)
  buf = io.BytesIO()
  Image.fromarray(rgb).save(buf, format="PNG")
  return buf.getvalue()


def prepare_digits(out_dir: str, *, scale: int = 4, seed: int = 0,
                   val_fraction: float = 0.1, test_fraction: float = 0.1,
                   num_folds: int = 0) -> dict:
  """Writes the digits as a prepared dataset (stratified train/val/test split).

  With `num_folds` K >= 2, train and val are pooled into K stratified
  cross-validation folds (as `prepare --folds=K` does; data/folds.py).
  Does nothing if `out_dir` already holds a dataset. Returns the dataset info.
  """
  if os.path.exists(os.path.join(out_dir, tfrecords.INFO_FILE)):
    return tfrecords.read_info(out_dir)
  digits = sk_datasets.load_digits()
  index = np.arange(len(digits.target))
  rest, test = model_selection.train_test_split(
      index, test_size=test_fraction, stratify=digits.target, random_state=seed)
  train, val = model_selection.train_test_split(
      rest, test_size=val_fraction / (1.0 - test_fraction),
      stratify=digits.target[rest], random_state=seed)
  class_names = [str(d) for d in range(10)]
  parts = [("train", train), ("val", val), ("test", test)]
  if num_folds:
    pool = np.sort(np.concatenate([train, val]))
    fold_of = np.asarray(folds_lib.assign_folds([[int(digits.target[i])] for i in pool],
                                                [[] for _ in pool], num_folds, seed))
    parts = [("test", test)] + [(folds_lib.fold_split_name(k),
                                 np.random.default_rng([seed, k]).permutation(pool[fold_of == k]))
                                for k in range(num_folds)]
  splits = {}
  for split, idx in parts:
    examples = ((_png(digits.data[i], scale), [int(digits.target[i])], f"digit_{i:04d}")
                for i in idx)
    files = tfrecords.write_split(out_dir, split, examples, num_shards=2)
    splits[split] = dict(
        num_examples=len(idx), files=files,
        class_counts=tfrecords.class_counts([[digits.target[i]] for i in idx], 10),
        **tfrecords.file_checks(out_dir, files))
  extra = {}
  if num_folds:
    entries = [splits.pop(folds_lib.fold_split_name(k)) for k in range(num_folds)]
    splits = folds_lib.fold_splits(entries, 0) | splits
    extra[folds_lib.FOLDS_KEY] = folds_lib.folds_info(entries, seed, None)
  info = dict(
      name="sklearn_digits", class_names=class_names, multilabel=False, splits=splits,
      source="sklearn.datasets.load_digits", **extra,
      options=dict(scale=scale, seed=seed, val_fraction=val_fraction,
                   test_fraction=test_fraction, num_folds=num_folds))
  tfrecords.write_info(out_dir, info)
  logging.info("Wrote the digits demo dataset (%s) to %s.",
               {s: v["num_examples"] for s, v in splits.items()}, out_dir)
  return info
