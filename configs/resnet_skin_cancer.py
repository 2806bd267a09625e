"""ResNet-50 on skin lesions: the ViT recipe (configs/vit_skin_cancer.py) with a ResNet-50,
plus the small-data controls that beat a linear probe on ISIC (README: 'Linear probe and LP-FT').

BatchNorm frozen in inference mode (batch 16 is too small for batch statistics),
150 head-only steps at 10x lr before the body joins (LP-FT in one run),
layer-wise lr decay 0.7, EMA of weights, and dihedral augmentation (dermoscopy
has no up or down).
"""

import os
import runpy

from vit_jax_ft import base_config


def get_config():
  here = os.path.dirname(os.path.abspath(__file__))
  config = runpy.run_path(os.path.join(here, "vit_skin_cancer.py"))["get_config"]()
  config.model = base_config.resnet_model_config("resnet50")
  config.optimizer.freeze = "bn"
  config.optimizer.head_only_steps = 150
  config.optimizer.lr_mults = "head/=10"
  config.optimizer.layer_decay = 0.7
  config.ema_decay = 0.998
  config.data.dihedral = True
  return config
