"""ResNet-50 on a multi-label CSV: configs/vit_multilabel_csv.py (sigmoid
cross-entropy, macro-F1 at threshold 0.5 picks the best checkpoint) with a
ResNet-50 and the small-data controls of configs/resnet_skin_cancer.py
(base_config.resnet_small_data; README: 'Linear probe and LP-FT').

  python -m vit_jax_ft.data.prepare --source=fashion_multilabel/labels.csv \
      --image_dir=fashion_multilabel/images --multilabel --out=PREPARED_DIR
  python -m vit_jax_ft.main --config=configs/resnet_multilabel_csv.py \
      --workdir=WORKDIR --config.data.dir=PREPARED_DIR --config.init_from=WEIGHTS
"""

import os
import runpy

from vit_jax_ft import base_config


def get_config():
  here = os.path.dirname(os.path.abspath(__file__))
  config = runpy.run_path(os.path.join(here, "vit_multilabel_csv.py"))["get_config"]()
  head_bias_init = config.model.head_bias_init  # Every label starts at p ~ 0.001.
  base_config.resnet_small_data(config)
  config.model.head_bias_init = head_bias_init
  return config
