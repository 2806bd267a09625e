"""ConvNeXt on skin lesions: the ViT recipe (configs/vit_skin_cancer.py) with a ConvNeXt.

  python -m vit_jax_ft.main --config=configs/convnext_skin_cancer.py:convnext_tiny \
      --workdir=workdirs/isic_convnext --config.init_from=weights/convnext_tiny

The part after ':' is the preset (convnext_tiny by default; convnext_small,
convnext_base, convnext_large). As the ResNet recipe, 150 head-only steps at
10x lr before the body joins, layer-wise lr decay 0.7 (stem 0, stage s is s),
EMA of weights and dihedral augmentation. No BatchNorm to freeze: ConvNeXt's
LayerNorms keep no batch statistics.
"""

import os
import runpy

from vit_jax_ft import base_config


def get_config(name=None):
  here = os.path.dirname(os.path.abspath(__file__))
  config = runpy.run_path(os.path.join(here, "vit_skin_cancer.py"))["get_config"]()
  config.model = base_config.convnext_model_config(name or "convnext_tiny")
  config.optimizer.head_only_steps = 150
  config.optimizer.lr_mults = "head/=10"
  config.optimizer.layer_decay = 0.7
  config.ema_decay = 0.998
  config.data.dihedral = True
  return config
