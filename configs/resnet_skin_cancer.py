"""ResNet-50 on skin lesions: the ViT recipe (configs/vit_skin_cancer.py) with a ResNet-50,
plus the small-data controls that beat a linear probe on ISIC (README: 'Linear probe and LP-FT').

The stem and stages 1-2 frozen, BatchNorm in inference mode (batch 16 is too
small for batch statistics), 150 head-only steps at 10x lr before the body
joins (LP-FT in one run), layer-wise lr decay 0.7, EMA of weights
(base_config.resnet_small_data), and dihedral augmentation (dermoscopy has no
up or down). ISIC's images are 180 px: `--config.data.image_size=176` trains
at their own resolution, 1.6x cheaper than 224 (the README's figures).
"""

import os
import runpy

from vit_jax_ft import base_config


def get_config():
  here = os.path.dirname(os.path.abspath(__file__))
  config = runpy.run_path(os.path.join(here, "vit_skin_cancer.py"))["get_config"]()
  base_config.resnet_small_data(config)
  config.data.dihedral = True
  return config
