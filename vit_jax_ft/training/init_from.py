"""Starting a run from pretrained weights (config.init_from): model options and weights.

The normalisation the weights expect is resolved by workdir.resolve_normalization.
"""

from absl import logging
import jax
import ml_collections

from vit_jax_ft import pretrained
from vit_jax_ft import workdir as workdir_lib


def load_weights(config, model, state, workdir: str):
  """Loads config.init_from into a fresh state; writes WORKDIR/pretrained.json.

  Strict by default: fails before the first step if any backbone parameter
  is not in the checkpoint or the checkpoint holds parameters nobody uses.
  """
  result = pretrained.load_for_finetuning(
      config.init_from, model, jax.device_get(state.params), jax.device_get(state.batch_stats),
      image_size=config.data.image_size, strict=config.init_strict,
      cache_dir=config.init_cache_dir)
  # loading.py has logged the parameter report; the fingerprint lets two runs
  # check that they started from the same weights.
  logging.info("Pretrained backbone fingerprint: %s", result.fingerprint)
  workdir_lib.write_pretrained(workdir, {
      "init_from": config.init_from, "fingerprint": result.fingerprint,
      "report": str(result.report), "metadata": result.metadata})
  return state.replace(params=result.params, batch_stats=result.batch_stats), result.metadata


def apply_model_options(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Sets config.model's options to those recorded with config.init_from's weights.

  HF and timm ViTs use the exact GELU (and HF a LayerNorm epsilon of 1e-12),
  Keras ResNets are v1 with conv biases: the weights' metadata says which, so
  users need not. Each change is logged; init_model_options=False keeps the
  config's options (a strict load then fails on a mismatch). A resumed run
  reads the metadata its first run recorded from the same init_from, not the source.
  """
  if not (config.init_from and config.init_model_options):
    return
  recorded = workdir_lib.read_pretrained(workdir)
  if recorded.get("init_from") == config.init_from:  # This run was started from these weights.
    metadata = recorded["metadata"]
  else:
    metadata = pretrained.source_metadata(config.init_from, config.init_cache_dir,
                                          config.init_strict)
  for name, value in sorted(metadata.get("model_options", {}).items()):
    if name in config.model and config.model[name] != value:
      logging.info("config.model.%s: %r -> %r (what %s was trained with).",
                   name, config.model[name], value, config.init_from)
      config.model[name] = value
