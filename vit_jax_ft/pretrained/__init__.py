"""Pretrained ViT and ResNet weights: convert, store and load for fine-tuning.

Sources: vit_jax / big_vision `.npz`, Hugging Face transformers folders or Hub
ids, timm and torchvision state dicts, Keras ResNet50 (`.h5`, TF.js), TF Model
Garden checkpoints (`.tar.gz`, folder, `ckpt-N`). See
`sources.py` for how a source's format is recognised.

Typical use from a train loop::

  result = pretrained.load_for_finetuning(config.init_from, model, params, batch_stats,
                                          image_size=config.data.image_size)
  params, batch_stats = result.params, result.batch_stats
  print(result.report); logging.info("weights %s", result.fingerprint)

and from the command line::

  python -m vit_jax_ft.pretrained convert --source=PATH_OR_ID --model=vit_b16 --out=DIR
  python -m vit_jax_ft.pretrained export --workdir=DIR --format=huggingface --out=DIR2
"""

from vit_jax_ft.pretrained.conversion import ConversionError
from vit_jax_ft.pretrained.conversion import Converted
from vit_jax_ft.pretrained.conversion import NORMALIZATIONS
from vit_jax_ft.pretrained.hub import SourceUnavailableError
from vit_jax_ft.pretrained.loading import load_for_finetuning
from vit_jax_ft.pretrained.loading import LoadReport
from vit_jax_ft.pretrained.loading import LoadResult
from vit_jax_ft.pretrained.loading import PretrainedMismatchError
from vit_jax_ft.pretrained.loading import source_metadata
from vit_jax_ft.pretrained.sources import convert
from vit_jax_ft.pretrained.sources import detect_format
from vit_jax_ft.pretrained.storage import load as load_converted
from vit_jax_ft.pretrained.storage import save as save_converted
from vit_jax_ft.pretrained.tensor_files import CheckpointFileError

__all__ = [
    "CheckpointFileError", "ConversionError", "Converted", "LoadReport", "LoadResult",
    "NORMALIZATIONS", "PretrainedMismatchError", "SourceUnavailableError", "convert",
    "detect_format", "load_converted", "load_for_finetuning", "save_converted", "source_metadata",
]
