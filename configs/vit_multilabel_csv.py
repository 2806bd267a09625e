"""ViT-B/16 on a multi-label CSV (image,labels with space-separated labels).

Sigmoid binary cross-entropy; macro-F1 at threshold 0.5 picks the best
checkpoint. Prepare the CSV first (README: 'Your own data'), e.g.
  python -m vit_jax_ft.data.prepare --source=fashion_multilabel/labels.csv \
      --image_dir=fashion_multilabel/images --multilabel --out=PREPARED_DIR
and pass --config.data.dir=PREPARED_DIR.
"""

from vit_jax_ft import base_config


def get_config():
  config = base_config.get_base_config()
  config.data.help = ("Multi-label CSV: prepare it with python -m vit_jax_ft.data.prepare "
                      "--source=LABELS.csv --image_dir=IMAGES --multilabel --out=PREPARED_DIR "
                      "and pass --config.data.dir=PREPARED_DIR.")
  config.model = base_config.vit_model_config("vit_b16")
  config.model.head_bias_init = -6.9  # Start every label at p ~ 0.001, as big_vision does.
  config.loss.name = "sigmoid_bce"
  config.best_metric = "macro_f1"
  config.num_epochs = 10.0
  config.optimizer.warmup_steps = 100
  return config
