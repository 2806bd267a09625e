"""Starting a run from pretrained weights (config.init_from): model options and weights.

The normalisation the weights expect is resolved by workdir.resolve_normalization.
"""

from absl import logging
import jax
import ml_collections
import numpy as np

from vit_jax_ft import pretrained
from vit_jax_ft import workdir as workdir_lib
from vit_jax_ft.inputs import dataset


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


def load_head(config: ml_collections.ConfigDict, state, info: dict, workdir: str):
  """LP-FT: replaces the fresh head of `state` with config.init_head_from's best head.

  config.init_head_from is a workdir (of vit_jax_ft.probe or a training run);
  its dataset must have this run's class names in the same order (and be
  multi-label alike), and its head the shape of this model's. A backbone
  fingerprint that differs from this run's (pretrained.json) is logged as a
  warning: the head was fitted to other features.
  """
  source = config.init_head_from
  source_config = workdir_lib.load_config(source)
  _, source_info = dataset.load_data_info(source_config, source)
  names, source_names = list(info["class_names"]), list(source_info["class_names"])
  if names != source_names or bool(info["multilabel"]) != bool(source_info["multilabel"]):
    def describe(n, multilabel):
      kind = "multi-label" if multilabel else "single-label"
      return f"{len(n)} {kind} classes {n[:5]}{'...' if len(n) > 5 else ''}"
    raise ValueError(
        f"config.init_head_from={source!r} has {describe(source_names, source_info['multilabel'])}"
        f" but this run's dataset has {describe(names, info['multilabel'])}; a head fits only the "
        "same classes in the same order.")
  checkpoint = workdir_lib.restore(source, "best")
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
  cast = lambda tree: jax.tree.map(lambda x, f: np.asarray(x, np.asarray(f).dtype), tree, fresh)
  heads = {"head": cast(head)}
  if "head_dist" in state.params:  # DeiT distilled: both heads (see models/vit.py).
    heads["head_dist"] = cast(checkpoint.variables["params"].get("head_dist", head))
  return state.replace(params={**state.params, **heads})


def _warn_other_backbone(source: str, workdir: str) -> None:
  """Warns when init_head_from's run and this one did not start from the same weights."""
  def recorded(directory):
    record = workdir_lib.read_pretrained(directory)  # {}: from random initialisation.
    return record.get("init_from"), record.get("fingerprint")

  (source_from, source_print), (own_from, own_print) = recorded(source), recorded(workdir)
  if source_print != own_print:
    logging.warning("config.init_head_from=%r was fitted on another backbone (init_from=%r, "
                    "fingerprint %s) than this run's (init_from=%r, fingerprint %s): the head "
                    "may not suit these features.", source, source_from, source_print, own_from,
                    own_print)
