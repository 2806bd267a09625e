"""ViT-B/16 on skin-lesion photos (ISIC 9 classes or HAM10000's 7), imbalanced.

224 px, batch 16, AdamW lr 1e-4 with cosine decay, class-weighted
cross-entropy. Set --config.data.dir to a prepared skin-lesion dataset.

`--config=configs/vit_skin_cancer.py:NAME` runs the same recipe with any
`model.name` (its family's model config, base_config.model_config), e.g.
`:efficientnet_b0` or `:regnety_400mf`; the README's from-scratch runs of each
family use it.
"""

from vit_jax_ft import base_config

SKIN_HELP = (
    "Skin lesions: download HAM10000 (https://doi.org/10.7910/DVN/DBW86T) or an ISIC class-folder "
    "set, then prepare it with a lesion-aware split: python -m vit_jax_ft.data.prepare "
    "--source=HAM10000/HAM10000_metadata.csv --id_column=image_id --label_column=dx "
    "--group_column=lesion_id --max_side=512 --out=PREPARED_DIR, and pass "
    "--config.data.dir=PREPARED_DIR (README: 'Your own data').")


def get_config(model_name=None):
  config = base_config.get_base_config()
  config.data.help = SKIN_HELP
  config.model = base_config.model_config(model_name or "vit_b16")
  config.loss.name = "weighted_ce"
  config.num_epochs = 10.0
  config.optimizer.warmup_steps = 200
  config.best_metric = "macro_f1"
  return config
