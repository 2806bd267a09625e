"""Where a run's data lives and what it holds: (data_dir, dataset_info) for each source.

With `data.fold` = k (cross-validation, data/folds.py) the info returned has
fold k as the val split and the other folds as train.
"""

import os

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections

from vit_jax_ft.data import digits
from vit_jax_ft.data import folds
from vit_jax_ft.data import tfrecords
from vit_jax_ft.inputs import tfds_source


def load_data_info(config: ml_collections.ConfigDict, workdir: str) -> tuple[str, dict]:
  """Returns (data_dir, dataset_info), preparing the built-in demo data if needed.

  With config.data.fold >= 0, fold data.fold is the val split and the other
  folds are train.
  """
  data_dir, info = _load(config, workdir)
  fold = config.data.get("fold", -1)  # Configs recorded before data.fold existed: none.
  info = folds.select_fold(info, fold, data_dir, config.data.train_split, config.data.val_split)
  if fold >= 0:
    logging.info("Cross-validation fold %d of %d: %d train and %d val examples.", fold,
                 folds.num_folds(info), info["splits"][config.data.train_split]["num_examples"],
                 info["splits"][config.data.val_split]["num_examples"])
  return data_dir, info


def _load(config: ml_collections.ConfigDict, workdir: str) -> tuple[str, dict]:
  if config.data.source == "digits":
    data_dir = config.data.dir or os.path.join(workdir, "data")
    if jax.process_index() == 0:  # One writer on a shared filesystem.
      digits.prepare_digits(data_dir, seed=config.seed)
    multihost_utils.sync_global_devices("digits prepared")
    return data_dir, _checked(config, data_dir, tfrecords.read_info(data_dir))
  if config.data.source == "tfds":
    return tfds_source.load_data_info(config.data)
  if config.data.source != "tfrecord":
    raise ValueError(f"data.source must be 'tfrecord', 'tfds' or 'digits', got "
                     f"{config.data.source!r}")
  if not config.data.dir:
    raise ValueError(f"config.data.dir is not set. {config.data.help}".strip())
  info = tfrecords.read_info(config.data.dir, config.data.help)
  return config.data.dir, _checked(config, config.data.dir, info)


def _checked(config: ml_collections.ConfigDict, data_dir: str, info: dict) -> dict:
  """`info`, after comparing the sizes of the run's splits' shards with what it records.

  A shard cut short (a copy or download interrupted) fails here, naming the
  file, rather than as a TensorFlow DataLossError at the first batch.
  """
  used = [s for s in (config.data.train_split, config.data.val_split, config.data.test_split)
          if s and s in info["splits"]]
  tfrecords.check_shards(data_dir, info, used)
  return info
