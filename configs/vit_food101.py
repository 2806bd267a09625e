"""ViT-B/16 on Food-101 from tensorflow-datasets (101 classes, 75,750 train images).

Needs the TFDS-prepared dataset on disk (this config never downloads):
  tfds build food101 --data_dir=~/tensorflow_datasets
then
  python -m vit_jax_ft.main --config=configs/vit_food101.py --workdir=workdirs/food101 \
      --config.init_from=weights/vit_b16
Validation is the last 5% of TFDS's train split; TFDS's validation split is the test.
"""

import os

from vit_jax_ft import base_config


def get_config():
  config = base_config.get_base_config()
  config.data.source = "tfds"
  config.data.tfds_name = "food101"
  config.data.tfds_dir = os.path.expanduser("~/tensorflow_datasets")
  config.data.train_split = "train[:95%]"
  config.data.val_split = "train[95%:]"
  config.data.test_split = "validation"
  config.data.randaugment_layers = 2
  config.model = base_config.vit_model_config("vit_b16")
  config.num_epochs = 3.0
  config.optimizer.warmup_steps = 500
  return config
