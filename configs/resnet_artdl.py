"""ResNet-50 on ArtDL: the ViT recipe (configs/vit_artdl.py) with a ResNet-50, plus the
small-data controls of configs/resnet_skin_cancer.py (README: 'Linear probe and LP-FT').

The stem and stages 1-2 frozen, BatchNorm in inference mode, 150 head-only
steps at 10x lr before the body joins, layer-wise lr decay 0.7 and EMA of
weights (base_config.resnet_small_data). No dihedral augmentation: paintings
have an up and a down. The controls were measured on ISIC with the same
backbone and batch; the 50-image ArtDL sample is too small to measure them on.
"""

import os
import runpy

from vit_jax_ft import base_config


def get_config():
  here = os.path.dirname(os.path.abspath(__file__))
  config = runpy.run_path(os.path.join(here, "vit_artdl.py"))["get_config"]()
  return base_config.resnet_small_data(config)
