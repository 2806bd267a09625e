"""Starting a run from pretrained weights (config.init_from): model options, weights, normalisation."""

import json
import os

from absl import logging
import jax
import ml_collections


def load_weights(config, model, state, workdir: str):
  """Loads config.init_from into a fresh state; writes WORKDIR/pretrained.json.

  Strict by default: fails before the first step if any backbone parameter
  is not in the checkpoint or the checkpoint holds parameters nobody uses.
  """
  from vit_jax_ft import pretrained  # pylint: disable=g-import-not-at-top
  result = pretrained.load_for_finetuning(
      config.init_from, model, jax.device_get(state.params), jax.device_get(state.batch_stats),
      image_size=config.data.image_size, strict=config.init_strict,
      cache_dir=config.init_cache_dir)
  # loading.py has logged the parameter report; the fingerprint lets two runs
  # check that they started from the same weights.
  logging.info("Pretrained backbone fingerprint: %s", result.fingerprint)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "pretrained.json"), "w") as f:
      json.dump({"init_from": config.init_from, "fingerprint": result.fingerprint,
                 "report": str(result.report), "metadata": result.metadata},
                f, indent=2, default=str)
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
  path, recorded = os.path.join(workdir, "pretrained.json"), {}
  if os.path.exists(path):
    with open(path) as f:
      recorded = json.load(f)
  if recorded.get("init_from") == config.init_from:  # This run was started from these weights.
    metadata = recorded["metadata"]
  else:
    from vit_jax_ft import pretrained  # pylint: disable=g-import-not-at-top
    metadata = pretrained.source_metadata(config.init_from, config.init_cache_dir,
                                          config.init_strict)
  for name, value in sorted(metadata.get("model_options", {}).items()):
    if name in config.model and config.model[name] != value:
      logging.info("config.model.%s: %r -> %r (what %s was trained with).",
                   name, config.model[name], value, config.init_from)
      config.model[name] = value


def resolve_normalization(config: ml_collections.ConfigDict, workdir: str,
                          metadata: dict | None) -> str:
  """data.normalization, with 'auto' taken from the pretrained weights' metadata."""
  mode = config.data.normalization
  if mode != "auto":
    return mode
  if not config.init_from:
    return "imagenet"
  if metadata is None:  # Resuming: the weights were loaded by the first run.
    with open(os.path.join(workdir, "pretrained.json")) as f:
      metadata = json.load(f)["metadata"]
  return metadata["normalization"]
