"""Starting a run from pretrained weights (config.init_from): model options, weights, normalisation."""

import json
import os

from absl import logging
import jax
import ml_collections
import numpy as np


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


def load_head(config: ml_collections.ConfigDict, state, info: dict, workdir: str):
  """LP-FT: replaces the fresh head of `state` with config.init_head_from's best head.

  config.init_head_from is a workdir (of vit_jax_ft.probe or a training run);
  its dataset must have this run's class names in the same order (and be
  multi-label alike), and its head the shape of this model's. A backbone
  fingerprint that differs from this run's (pretrained.json) is logged as a
  warning: the head was fitted to other features.
  """
  # Imported here: restore and train import this module.
  from vit_jax_ft import train  # pylint: disable=g-import-not-at-top
  from vit_jax_ft.evaluators import restore  # pylint: disable=g-import-not-at-top
  source = config.init_head_from
  source_config = restore.load_config(source)
  _, source_info = train.load_data_info(source_config, source)
  names, source_names = list(info["class_names"]), list(source_info["class_names"])
  if names != source_names or bool(info["multilabel"]) != bool(source_info["multilabel"]):
    def describe(n, multilabel):
      kind = "multi-label" if multilabel else "single-label"
      return f"{len(n)} {kind} classes {n[:5]}{'...' if len(n) > 5 else ''}"
    raise ValueError(
        f"config.init_head_from={source!r} has {describe(source_names, source_info['multilabel'])}"
        f" but this run's dataset has {describe(names, info['multilabel'])}; a head fits only the "
        "same classes in the same order.")
  checkpoint = restore.restore(source, "best")
  head = checkpoint.variables["params"].get("head")
  fresh = state.params["head"]
  shapes = jax.tree.map(np.shape, fresh)
  if head is None or jax.tree.map(np.shape, head) != shapes:
    raise ValueError(
        f"config.init_head_from={source!r}: its head "
        f"{None if head is None else jax.tree.map(np.shape, head)} does not fit this model's "
        f"{shapes} (another model or representation size?).")
  _warn_other_backbone(source, workdir)
  logging.info("Head initialised from %s (best checkpoint, step %d): %s.", source,
               checkpoint.step, ", ".join(f"{k} {v}" for k, v in shapes.items()))
  head = jax.tree.map(lambda x, f: np.asarray(x, np.asarray(f).dtype), head, fresh)
  return state.replace(params={**state.params, "head": head})


def _warn_other_backbone(source: str, workdir: str) -> None:
  """Warns when init_head_from's run and this one did not start from the same weights."""
  def recorded(directory):
    path = os.path.join(directory, "pretrained.json")
    if not os.path.exists(path):
      return None, None  # Started from random initialisation.
    with open(path) as f:
      record = json.load(f)
    return record["init_from"], record["fingerprint"]

  (source_from, source_print), (own_from, own_print) = recorded(source), recorded(workdir)
  if source_print != own_print:
    logging.warning("config.init_head_from=%r was fitted on another backbone (init_from=%r, "
                    "fingerprint %s) than this run's (init_from=%r, fingerprint %s): the head "
                    "may not suit these features.", source, source_from, source_print, own_from,
                    own_print)
