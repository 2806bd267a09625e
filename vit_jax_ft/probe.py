r"""Linear probe: `python -m vit_jax_ft.probe --config=C --workdir=D`.

Same flags and config overrides as `vit_jax_ft.main`. Extracts the
backbone's pooled features once per split (cached in WORKDIR/probe/), fits a
linear head with the L2 strength chosen on val, and leaves a workdir that
`evaluate`, `predict` and `config.init_head_from` (LP-FT) read like a
training run's (training/probe.py says more).
"""

import functools
import os

# Set before TensorFlow is first imported (as in vit_jax_ft.main).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from absl import app  # pylint: disable=g-import-not-at-top,g-bad-import-order

from vit_jax_ft import main as main_lib  # pylint: disable=g-import-not-at-top
from vit_jax_ft.training import probe  # pylint: disable=g-import-not-at-top

if __name__ == "__main__":
  app.run(functools.partial(main_lib.main, entry=probe.run_probe),
          flags_parser=main_lib.parse_flags)
