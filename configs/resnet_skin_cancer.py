"""ResNet-50 on skin lesions: the ViT recipe (configs/vit_skin_cancer.py) with a ResNet-50."""

import os
import runpy

from vit_jax_ft import base_config


def get_config():
  here = os.path.dirname(os.path.abspath(__file__))
  config = runpy.run_path(os.path.join(here, "vit_skin_cancer.py"))["get_config"]()
  config.model = base_config.resnet_model_config("resnet50")
  return config
