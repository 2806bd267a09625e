r"""k-fold cross-validation: `python -m vit_jax_ft.cv --config=C --workdir=D [--folds=K]`.

  python -m vit_jax_ft.data.prepare --source=data/HAM10000/HAM10000_metadata.csv \
      --id_column=image_id --label_column=dx --group_column=lesion_id \
      --folds=5 --out=data/ham_5fold --max_side=512
  python -m vit_jax_ft.cv --config=configs/resnet_skin_cancer.py --workdir=workdirs/ham_cv \
      --config.data.dir=data/ham_5fold

Same flags and config overrides as `vit_jax_ft.main`. Trains fold k of a
dataset prepared with --folds in WORKDIR/fold_k (its val split is fold k,
its train split the other folds), one after another; rerunning reuses the
finished folds and resumes an interrupted one. Then writes WORKDIR/cv_report.md
and cv_report.json (per-class and macro metrics, mean +- std over the folds),
oof_predictions.csv (the out-of-fold probabilities of every train+val
example) and oof_report/ (training/cv.py says more). --folds checks the
dataset's K; for the digits demo (configs/demo.py) it sets K (default 5).
"""

import functools
import os

# Set before TensorFlow is first imported (as in vit_jax_ft.main).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from absl import app  # pylint: disable=g-import-not-at-top,g-bad-import-order
from absl import flags  # pylint: disable=g-import-not-at-top,g-bad-import-order

from vit_jax_ft import main as main_lib  # pylint: disable=g-import-not-at-top
from vit_jax_ft.training import cv  # pylint: disable=g-import-not-at-top

_FOLDS = flags.DEFINE_integer(
    "folds", None, "Number of folds K: must match the dataset's --folds (default: the "
    "dataset's); the digits demo is prepared with it (default 5).")


def run(config, workdir):
  cv.run_cv(config, workdir, num_folds=_FOLDS.value)


if __name__ == "__main__":
  app.run(functools.partial(main_lib.main, entry=run), flags_parser=main_lib.parse_flags)
