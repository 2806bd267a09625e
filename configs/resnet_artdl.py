"""ResNet-50 on ArtDL: the ViT recipe (configs/vit_artdl.py) with a ResNet-50, plus the
small-data controls of configs/resnet_skin_cancer.py (README: 'Linear probe and LP-FT').

BatchNorm frozen in inference mode (batch 16 is too small for batch statistics),
150 head-only steps at 10x lr before the body joins, layer-wise lr decay 0.7 and
EMA of weights. No dihedral augmentation: paintings have an up and a down. The
controls were measured on ISIC with the same backbone and batch; the 50-image
ArtDL sample is too small to measure them on.
"""

import os
import runpy

from vit_jax_ft import base_config


def get_config():
  here = os.path.dirname(os.path.abspath(__file__))
  config = runpy.run_path(os.path.join(here, "vit_artdl.py"))["get_config"]()
  config.model = base_config.resnet_model_config("resnet50")
  config.optimizer.freeze = "bn"
  config.optimizer.head_only_steps = 150
  config.optimizer.lr_mults = "head/=10"
  config.optimizer.layer_decay = 0.7
  config.ema_decay = 0.998
  return config
