"""ViT-B/16 on ArtDL (Christian iconography in paintings, 10 imbalanced classes).

224 px, batch 16, AdamW lr 1e-4 with cosine decay, as in the experiments this
project grew from. Set --config.data.dir to a prepared ArtDL dataset.
"""

from vit_jax_ft import base_config

ARTDL_HELP = (
    "ArtDL: download the images and labels from https://artdl.org/ (10 Iconclass classes), "
    "then prepare them: python -m vit_jax_ft.data.prepare --source=ARTDL/labels.csv "
    "--path_column=file --label_column=iconclass --split_column=split --max_side=512 "
    "--out=PREPARED_DIR, and pass --config.data.dir=PREPARED_DIR (README: 'Your own data').")


def get_config():
  config = base_config.get_base_config()
  config.data.help = ARTDL_HELP
  config.model = base_config.vit_model_config("vit_b16")
  config.num_epochs = 10.0
  config.optimizer.warmup_steps = 100
  config.best_metric = "macro_f1"
  return config
