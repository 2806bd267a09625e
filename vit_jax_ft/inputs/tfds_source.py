"""Datasets prepared with tensorflow-datasets (TFDS), read offline.

`data.source='tfds'` reads a dataset that `tfds build NAME --data_dir=DIR`
(or `tfds.builder(NAME, data_dir=DIR).download_and_prepare()`) has prepared,
for example Food-101. This module never downloads: it looks for the prepared
`DIR/NAME[/CONFIG]/VERSION/dataset_info.json` and fails at once, with the
command to run where there is network, when it is not there. (tfds.load
would instead start a download, which offline means minutes of retries.)

`load_data_info` returns (data_dir, info) with `info` in the shape of a
prepared dataset's `dataset_info.json`, so `pipeline.train_iterator` /
`eval_iterator` read TFDS records as they read our own TFRecords:

  class_names, multilabel: from the label feature (ClassLabel, or a
    Sequence of ClassLabel for multi-label data),
  splits[split]: num_examples, class_counts (counted by reading the labels
    once, images not decoded), shards ([file, skip, take]; sub-splits such as
    'train[:90%]' are supported),
  features: {'image': ..., 'label': ...}, the feature names, from the
    builder's supervised_keys (else 'image' and 'label').
"""

import os
import re
import time

from absl import logging
import ml_collections

from vit_jax_ft.inputs import pipeline

_VERSION = re.compile(r"^\d+\.\d+\.\d+$")
_INFO_FILE = "dataset_info.json"


def default_data_dir() -> str:
  """TFDS's default data_dir: $TFDS_DATA_DIR or ~/tensorflow_datasets."""
  return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def _version_key(version: str) -> tuple[int, ...]:
  return tuple(int(p) for p in version.split("."))


def _how_to_prepare(name: str, data_dir: str) -> str:
  base = name.split("/")[0]
  return (f"Prepare it where there is network access with `tfds build {base} "
          f"--data_dir={data_dir}` (some datasets, e.g. ImageNet, need manual downloads first; "
          f"see the TFDS catalog), then copy that folder here, or point data.tfds_dir at it.")


def builder_dir(name: str, data_dir: str | None = None) -> str:
  """The folder of a prepared TFDS dataset: data_dir/name[/config]/version.

  `name` is 'dataset', 'dataset/config', 'dataset/1.2.0' or
  'dataset/config/1.2.0'; without a version the newest prepared one is used.
  Only the local filesystem is consulted (no TFDS import, no network).

  Raises:
    FileNotFoundError: naming the folder searched, when there is no prepared
      dataset (no dataset_info.json).
  """
  if not name:
    raise ValueError("data.source='tfds' needs data.tfds_name, e.g. 'food101'.")
  data_dir = os.path.expanduser(data_dir or default_data_dir())
  parts = [p for p in name.strip("/").split("/") if p]
  version = parts.pop() if _VERSION.match(parts[-1]) else None
  base = os.path.join(data_dir, *parts)
  if version is None:
    versions = []
    if os.path.isdir(base):
      versions = [v for v in os.listdir(base)
                  if _VERSION.match(v) and os.path.exists(os.path.join(base, v, _INFO_FILE))]
    if not versions:
      found = ""
      if os.path.isdir(data_dir):
        found = f" ({data_dir} has: {', '.join(sorted(os.listdir(data_dir))[:10]) or 'nothing'})"
      raise FileNotFoundError(
          f"TFDS dataset {name!r} is not prepared in {data_dir}: no "
          f"{os.path.join(base, '<version>', _INFO_FILE)}{found}. This code never downloads. "
          + _how_to_prepare(name, data_dir))
    version = max(versions, key=_version_key)
  path = os.path.join(base, version)
  if not os.path.exists(os.path.join(path, _INFO_FILE)):
    raise FileNotFoundError(
        f"TFDS dataset {name!r} is not prepared in {data_dir}: no {path}/{_INFO_FILE}. "
        "This code never downloads. " + _how_to_prepare(name, data_dir))
  return path


def _class_names(feature) -> tuple[list[str], bool]:
  """(class names, multilabel) of a ClassLabel or Sequence(ClassLabel) feature."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  if isinstance(feature, tfds.features.ClassLabel):
    return list(feature.names), False
  inner = getattr(feature, "feature", None)
  if isinstance(feature, tfds.features.Sequence) and isinstance(inner, tfds.features.ClassLabel):
    return list(inner.names), True
  raise ValueError(f"The label feature must be a ClassLabel or a Sequence of ClassLabel, "
                   f"got {type(feature).__name__}.")


def info_from_builder(builder, splits: list[str]) -> dict:
  """The dataset_info-style dict of a (read-only) TFDS builder, for `splits`.

  Args:
    builder: a tfds builder whose data is prepared (e.g. from
      `tfds.builder_from_directory`).
    splits: split names as TFDS takes them ('train', 'validation',
      'train[:90%]', ...). Empty names are skipped.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  tinfo = builder.info
  name = f"{tinfo.full_name}"
  file_format = getattr(tinfo, "file_format", None)
  if file_format is not None and str(getattr(file_format, "value", file_format)) != "tfrecord":
    raise ValueError(f"TFDS dataset {name} is stored as {file_format}; only tfrecord is "
                     "supported (the default of `tfds build`).")
  features = tinfo.features
  image_key, label_key = tinfo.supervised_keys or ("image", "label")
  if not isinstance(image_key, str) or not isinstance(label_key, str):
    raise ValueError(f"TFDS dataset {name} has supervised_keys {tinfo.supervised_keys}; "
                     "expected an (image, label) pair of feature names.")
  for key in (image_key, label_key):
    if key not in features:
      raise ValueError(f"TFDS dataset {name} has no feature {key!r} "
                       f"(it has {sorted(features.keys())}).")
  if not isinstance(features[image_key], tfds.features.Image):
    raise ValueError(f"TFDS dataset {name}: feature {image_key!r} is "
                     f"{type(features[image_key]).__name__}, not an encoded Image.")
  class_names, multilabel = _class_names(features[label_key])

  out_splits = {}
  for split in dict.fromkeys(s for s in splits if s):
    try:
      split_info = tinfo.splits[split]
    except (KeyError, ValueError) as e:
      raise ValueError(f"Split {split!r} is not in TFDS dataset {name} (it has "
                       f"{sorted(tinfo.splits.keys())}; sub-splits like 'train[:90%]' work "
                       f"too): {e}") from None
    shards = [[str(fi.filename), int(fi.skip), int(fi.take)]
              for fi in split_info.file_instructions]
    missing = [p for p, _, _ in shards if not os.path.exists(p)]
    if missing:
      raise FileNotFoundError(f"TFDS dataset {name} is incomplete: {missing[:3]} do not exist "
                              f"in {builder.data_dir}. Prepare it again.")
    t0 = time.time()
    labels, _ = pipeline.scan_labels(
        [pipeline.Shard(*s) for s in shards], len(class_names), label_key)
    logging.info("TFDS %s[%s]: %d examples, labels read in %.1fs.", name, split,
                 len(labels), time.time() - t0)
    out_splits[split] = dict(num_examples=int(len(labels)), shards=shards,
                             class_counts=labels.sum(0).astype(int).tolist())
  return dict(name=name, source=f"tfds:{name}", class_names=class_names,
              multilabel=multilabel, features={"image": image_key, "label": label_key},
              splits=out_splits)


def load_data_info(data_cfg: ml_collections.ConfigDict) -> tuple[str, dict]:
  """(data_dir, info) for `data.source='tfds'`: checks, then reads the prepared builder.

  Reads data_cfg.tfds_name, tfds_dir, train_split, val_split and test_split.
  Fails within milliseconds (before importing TFDS) if the dataset is not
  prepared.
  """
  path = builder_dir(data_cfg.tfds_name, data_cfg.tfds_dir)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  builder = tfds.builder_from_directory(path)
  info = info_from_builder(builder, [data_cfg.train_split, data_cfg.val_split,
                                     data_cfg.test_split])
  return path, info
