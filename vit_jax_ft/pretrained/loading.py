"""Merging converted weights into a freshly initialised fine-tuning model.

Every parameter of the model is either loaded from the checkpoint (resized,
for ViT position embeddings on another grid), or left as initialised because
it is the new head; anything else is a mismatch. Strict loading (the default)
raises when a backbone parameter was not loaded, when the checkpoint holds
weights the model does not use (the original head and pre-logits excepted) or
when the model's options differ from those the weights were trained with.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import math
import os
import re
from collections.abc import Mapping
from typing import Any

from absl import logging
import numpy as np
import scipy.ndimage

from vit_jax_ft.models import vit as vit_lib
from vit_jax_ft.pretrained import architecture
from vit_jax_ft.pretrained import conversion
from vit_jax_ft.pretrained import sources
from vit_jax_ft.pretrained import storage
from vit_jax_ft.pretrained import tf_model_garden

_POSEMB = "Transformer/posembed_input/pos_embedding"
# Top-level modules that belong to the classifier, not the backbone: a new
# head is always kept as initialised, an original one is reported, not loaded.
_HEAD_MODULES = ("head", "head_dist")  # head_dist: DeiT's distillation head.
_OPTIONAL_MODULES = ("pre_logits",)


class PretrainedMismatchError(ValueError):
  """The checkpoint does not fit the model (names, shapes or options)."""


@dataclasses.dataclass
class LoadReport:
  """What happened to each parameter; `str()` gives a printable table.

  Each list holds (path, shape) pairs; paths are 'params/...' or
  'batch_stats/...'.
  """

  loaded: list = dataclasses.field(default_factory=list)
  resized: list = dataclasses.field(default_factory=list)   # (path, old, new)
  new: list = dataclasses.field(default_factory=list)       # kept as initialised (head)
  skipped_head: list = dataclasses.field(default_factory=list)  # original head / pre_logits
  missing: list = dataclasses.field(default_factory=list)   # backbone not in checkpoint
  unexpected: list = dataclasses.field(default_factory=list)  # checkpoint, not in model
  shape_mismatch: list = dataclasses.field(default_factory=list)  # (path, ckpt, model)
  option_mismatch: list = dataclasses.field(default_factory=list)  # messages

  def problems(self) -> list[str]:
    out = []
    if self.missing:
      out.append(f"{len(self.missing)} model parameters are not in the checkpoint: "
                 + _names(self.missing))
    if self.unexpected:
      out.append(f"{len(self.unexpected)} checkpoint tensors are not used by the model: "
                 + _names(self.unexpected))
    if self.shape_mismatch:
      out.append(f"{len(self.shape_mismatch)} parameters differ in shape: " + ", ".join(
          f"{p} (checkpoint {list(c)}, model {list(m)})" for p, c, m in self.shape_mismatch[:8]))
    out.extend(self.option_mismatch)
    return out

  def __str__(self) -> str:
    rows = [("loaded", self.loaded, lambda e: e[1]),
            ("resized (pos. embedding)", self.resized, lambda e: e[2]),
            ("newly initialised", self.new, lambda e: e[1]),
            ("original head (not loaded)", self.skipped_head, lambda e: e[1]),
            ("missing from checkpoint", self.missing, lambda e: e[1]),
            ("unexpected in checkpoint", self.unexpected, lambda e: e[1]),
            ("shape mismatch", self.shape_mismatch, lambda e: e[2])]
    lines = [f"{'parameters':<28} {'tensors':>8} {'values':>13}  names", "-" * 78]
    for label, entries, shape_of in rows:
      count = sum(int(np.prod(shape_of(e), dtype=np.int64)) for e in entries)
      lines.append(f"{label:<28} {len(entries):>8} {count:>13,}  "
                   + (_names(entries, 4) if label != "loaded" else ""))
    lines.extend(f"option mismatch: {m}" for m in self.option_mismatch)
    return "\n".join(lines)


def _names(entries, limit: int = 10) -> str:
  names = [e if isinstance(e, str) else e[0] for e in entries]
  return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


@dataclasses.dataclass
class LoadResult:
  """Output of `load_for_finetuning`."""

  params: Any
  batch_stats: Any
  metadata: dict
  report: LoadReport
  fingerprint: str


def option_mismatches(model: Any, model_options: Mapping[str, Any]) -> list[str]:
  """Model fields that differ from what the weights need, as config advice."""
  out = []
  for name, needed in model_options.items():
    if not hasattr(model, name):
      continue
    have = getattr(model, name)
    same = (math.isclose(float(have), float(needed), rel_tol=1e-9)
            if isinstance(needed, float) else have == needed)
    if not same:
      out.append(f"weights need model.{name}={needed!r} but the model has {have!r} "
                 f"(set config.model.{name}={needed!r})")
  return out


def resize_posemb(posemb: np.ndarray, new_shape: tuple[int, ...], has_class_token: bool | int
                  ) -> np.ndarray:
  """Interpolates a [1, (P+)N, D] position embedding to another square grid.

  `has_class_token`: the number P of token slots before the grid (a bool
  for 0 or 1; 2 for DeiT's class and distillation tokens). They are kept; the
  grid is zoomed bilinearly with `scipy.ndimage.zoom(order=1)`, as vit_jax's
  checkpoint loader does.
  """
  num_prefix = int(has_class_token)
  tok, grid = posemb[:, :num_prefix], posemb[0, num_prefix:]
  old, new = math.isqrt(grid.shape[0]), math.isqrt(new_shape[1] - num_prefix)
  if old * old != grid.shape[0] or new * new != new_shape[1] - num_prefix:
    raise PretrainedMismatchError(f"Position embeddings {posemb.shape} -> {new_shape} are not "
                                  "square grids; cannot resize.")
  logging.info("Resizing position embedding grid %dx%d -> %dx%d", old, old, new, new)
  grid = grid.reshape(old, old, -1)
  grid = scipy.ndimage.zoom(grid, (new / old, new / old, 1), order=1)
  return np.concatenate([tok, grid.reshape(1, new * new, -1)], axis=1).astype(posemb.dtype)


def merge(model_tree: Mapping, ckpt_tree: Mapping, collection: str, report: LoadReport,
          has_class_token: bool | int) -> dict:
  """Fills `model_tree` (a collection's nested dict) from `ckpt_tree`."""
  model_flat = conversion.flatten(model_tree)
  ckpt_flat = conversion.flatten(ckpt_tree)
  out = {}
  for path, init in model_flat.items():
    full = f"{collection}/{path}"
    top = path.split("/")[0]
    shape = tuple(np.shape(init))
    value = ckpt_flat.get(path)
    if top in _HEAD_MODULES or (top in _OPTIONAL_MODULES and
                                (value is None or value.shape != shape)):
      out[path] = init
      report.new.append((full, shape))
    elif value is None:
      out[path] = init
      report.missing.append((full, shape))
    elif value.shape == shape:
      out[path] = value.astype(np.asarray(init).dtype)
      report.loaded.append((full, shape))
    elif path == _POSEMB and value.shape[-1] == shape[-1]:
      out[path] = resize_posemb(value, shape, has_class_token).astype(np.asarray(init).dtype)
      report.resized.append((full, value.shape, shape))
    else:
      out[path] = init
      report.shape_mismatch.append((full, value.shape, shape))
  for path, value in ckpt_flat.items():
    top = path.split("/")[0]
    used = (path in model_flat and top not in _HEAD_MODULES
            and (top not in _OPTIONAL_MODULES or value.shape == np.shape(model_flat[path])))
    if not used:
      entry = (f"{collection}/{path}", value.shape)
      if top in _HEAD_MODULES + _OPTIONAL_MODULES:
        report.skipped_head.append(entry)
      else:
        report.unexpected.append(entry)
  return conversion.unflatten(out)


def fingerprint(report: LoadReport, params: Mapping, batch_stats: Mapping) -> str:
  """sha256 (16 hex digits) over the loaded backbone arrays, in path order."""
  flat = {f"params/{k}": v for k, v in conversion.flatten(params).items()}
  flat.update({f"batch_stats/{k}": v for k, v in conversion.flatten(batch_stats).items()})
  digest = hashlib.sha256()
  for path in sorted([p for p, _ in report.loaded] + [p for p, _, _ in report.resized]):
    value = np.ascontiguousarray(np.asarray(flat[path]))
    digest.update(f"{path}:{value.dtype}:{value.shape};".encode())
    digest.update(value.tobytes())
  return digest.hexdigest()[:16]


def _default_cache_dir() -> str:
  return os.environ.get("VIT_JAX_FT_CACHE",
                        os.path.join(os.path.expanduser("~"), ".cache", "vit_jax_ft", "pretrained"))


def _cache_key(source: str) -> str:
  """Changes when the source's files or the converters change."""
  parts = [source, str(conversion.CONVERTER_VERSION)]
  path = os.path.realpath(source)
  if os.path.exists(source):
    files = ([os.path.join(root, f) for root, _, fs in os.walk(path) for f in fs]
             if os.path.isdir(path) else [path])
  else:  # A TF checkpoint prefix (ckpt-N): its .index and .data-* files.
    files = glob.glob(glob.escape(path) + ".*")
  if tf_model_garden.is_prefix_file(path):  # ckpt-N.index: the .data-* files too.
    files += glob.glob(glob.escape(re.sub(r"\.(index|data-\d+-of-\d+)$", "", path)) + ".data-*")
  for f in sorted(set(files)):
    stat = os.stat(f)
    parts.append(f"{f}:{stat.st_size}:{stat.st_mtime_ns}")
  return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def converted_from_source(source: str, cache_dir: str | None = None, strict: bool = True
                          ) -> conversion.Converted:
  """A converted dir is read as is; anything else is converted once and cached."""
  if os.path.isdir(source) and storage.is_converted(source):
    return storage.load(source)
  cache_dir = cache_dir or _default_cache_dir()
  name = os.path.basename(os.path.normpath(source)).replace("@", "_") or "source"
  cached = os.path.join(cache_dir, f"{name}-{_cache_key(source)}")
  if storage.is_converted(cached):
    logging.info("Using cached conversion of %s: %s", source, cached)
    return storage.load(cached)
  converted = sources.convert(source, strict=strict)
  try:
    storage.save(converted, cached, overwrite=True)
  except OSError as e:  # A read-only cache must not stop training.
    logging.warning("Could not cache the conversion of %s in %s: %s", source, cached, e)
  return converted


def source_metadata(source: str, cache_dir: str | None = None, strict: bool = True) -> dict:
  """The metadata of `source` (format, normalisation, model options, ...), converting it if needed.

  A raw source is converted and cached as `load_for_finetuning` would, so a
  later load reads the cache.
  """
  if os.path.isdir(source) and storage.is_converted(source):
    return storage.load_metadata(source)
  return dict(converted_from_source(source, cache_dir, strict).metadata)


def load_for_finetuning(source: str, model: Any, params: Any, batch_stats: Any, *,
                        image_size: int, strict: bool = True,
                        cache_dir: str | None = None) -> LoadResult:
  """Loads pretrained weights into a fine-tuning model's freshly initialised trees.

  Args:
    source: a directory written by `convert`, or any raw source (npz, HF
      folder or Hub id, timm / torchvision / Keras file), converted on the fly
      and cached in `cache_dir`.
    model: our Flax module built for the fine-tuning task (its head size is
      the new number of classes).
    params: the model's initialised params (the new head stays as is).
    batch_stats: the model's initialised batch_stats ({} for ViTs).
    image_size: the fine-tuning resolution; ViT position embeddings are
      resized to its patch grid.
    strict: raise `PretrainedMismatchError` on missing, unexpected or
      mis-shaped backbone parameters and on option mismatches; otherwise log
      them and keep the initial values.
    cache_dir: where raw sources are converted to (default
      $VIT_JAX_FT_CACHE or ~/.cache/vit_jax_ft/pretrained).

  Returns:
    A `LoadResult` with numpy trees shaped like the inputs.
  """
  converted = converted_from_source(source, cache_dir, strict)
  metadata = dict(converted.metadata)
  report = LoadReport()
  model_arch = architecture.from_model(model)
  arch_problems = architecture.mismatches(metadata["architecture"], model_arch)
  if arch_problems:
    message = (f"{source} holds {architecture.describe(metadata['architecture'])}, which does "
               f"not fit the model: " + "; ".join(arch_problems))
    # Another family cannot be partly loaded; another depth or width can (strict=False).
    if strict or metadata["architecture"]["family"] != model_arch["family"]:
      raise PretrainedMismatchError(message)
    logging.warning(message)
  report.option_mismatch = option_mismatches(model, metadata["model_options"])
  report.unexpected.extend((f"source/{k}", ()) for k in metadata.get("unused_source_keys", []))
  _check_image_size(model, params, image_size)
  prefix = (vit_lib.num_prefix_tokens(model.classifier)
            if isinstance(model, vit_lib.VisionTransformer) else 0)
  new_params = merge(_to_plain(params), converted.params, "params", report, prefix)
  new_stats = merge(_to_plain(batch_stats or {}), converted.batch_stats, "batch_stats", report,
                    prefix)
  logging.info("Loaded pretrained weights from %s:\n%s", source, report)
  problems = report.problems()
  if problems:
    message = (f"Pretrained weights {source} do not fit the model:\n  - " + "\n  - ".join(problems)
               + f"\n{report}")
    if strict:
      raise PretrainedMismatchError(message + "\n(set --config.init_strict=False to load what fits)")
    logging.warning(message)
  return LoadResult(params=new_params, batch_stats=new_stats, metadata=metadata, report=report,
                    fingerprint=fingerprint(report, new_params, new_stats))


def _check_image_size(model: Any, params: Mapping, image_size: int) -> None:
  """The initialised ViT params must be for `image_size` (its patch grid)."""
  if not isinstance(model, vit_lib.VisionTransformer):
    return  # ResNets take any resolution.
  if image_size % model.patch_size:
    raise PretrainedMismatchError(f"image_size={image_size} is not a multiple of the patch size "
                                  f"{model.patch_size}.")
  tokens = (image_size // model.patch_size) ** 2 + vit_lib.num_prefix_tokens(model.classifier)
  have = np.shape(params["Transformer"]["posembed_input"]["pos_embedding"])[1]
  if have != tokens:
    raise PretrainedMismatchError(
        f"The model's params were initialised for {have} tokens, not for image_size={image_size} "
        f"({tokens} tokens): initialise them with {image_size}x{image_size} inputs.")


def _to_plain(tree: Any) -> dict:
  """flax FrozenDict / dict of jax arrays -> dict of numpy arrays."""
  if isinstance(tree, Mapping):
    return {k: _to_plain(v) for k, v in tree.items()}
  return np.asarray(tree)
