"""Shared pieces of every converter: the result type, name rules and layout transforms.

A converter is a table of rules `(regex over source names, target)`; the
target says where a tensor goes in our trees ("params/..." or
"batch_stats/...", slash-separated) and how its layout changes. `apply_rules`
runs a table over a `TensorFile` and keeps track of every source tensor that
no rule claimed, so that nothing in a checkpoint is silently dropped.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from absl import logging
import numpy as np

from vit_jax_ft.inputs import normalization as normalization_lib
from vit_jax_ft.pretrained import architecture
from vit_jax_ft.pretrained import tensor_files
from vit_jax_ft.pretrained.architecture import ConversionError  # Raised by every converter.

# Input scalings understood by our input pipeline (`config.data.normalization`).
NORMALIZATIONS = normalization_lib.MODES

# Bumped whenever a converter's output changes, so cached conversions are redone.
CONVERTER_VERSION = 1


@dataclasses.dataclass
class Converted:
  """Weights in our Flax layout plus what is known about them.

  Attributes:
    params: nested dict of float32 numpy arrays, original head included.
    batch_stats: nested dict (BatchNorm running statistics), {} for ViTs.
    metadata: JSON-serialisable dict with at least `source`, `format`,
      `architecture`, `image_size`, `num_classes_original`, `normalization`,
      `model_options` and `unused_source_keys`.
  """

  params: dict
  batch_stats: dict
  metadata: dict


# A transform gets the source array and returns it in our layout.
Transform = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Target:
  """Where one source tensor goes: `path` in our trees and the layout change."""

  path: str
  transform: Transform | None = None


Rule = tuple[str, Callable[[re.Match], Target]]


def identity(x: np.ndarray) -> np.ndarray:
  return x


def torch_conv(x: np.ndarray) -> np.ndarray:
  """PyTorch conv weight OIHW -> Flax kernel HWIO."""
  return np.transpose(x, (2, 3, 1, 0))


def torch_dense(x: np.ndarray) -> np.ndarray:
  """PyTorch Linear weight [out, in] -> Flax Dense kernel [in, out]."""
  return np.transpose(x)


def attention_in(num_heads: int) -> Transform:
  """Linear [D_out, D_in] or bias [D_out] -> Flax q/k/v kernel [D_in, heads, hd] / bias."""

  def transform(x: np.ndarray) -> np.ndarray:
    if x.ndim == 1:
      return x.reshape(num_heads, -1)
    return x.T.reshape(x.shape[1], num_heads, -1)

  return transform


def attention_out(num_heads: int) -> Transform:
  """Linear [D, heads*hd] -> Flax out kernel [heads, hd, D] (biases pass through)."""

  def transform(x: np.ndarray) -> np.ndarray:
    if x.ndim == 1:
      return x
    return x.T.reshape(num_heads, -1, x.shape[0])

  return transform


def torch_batchnorm(prefix: str, kind: str) -> Target:
  """A PyTorch BatchNorm2d tensor (weight/bias/running_mean/running_var)."""
  return {
      "weight": Target(f"params/{prefix}/scale"),
      "bias": Target(f"params/{prefix}/bias"),
      "running_mean": Target(f"batch_stats/{prefix}/mean"),
      "running_var": Target(f"batch_stats/{prefix}/var"),
  }[kind]


def set_path(tree: dict, path: str, value: Any) -> None:
  *parents, leaf = path.split("/")
  for p in parents:
    tree = tree.setdefault(p, {})
  if leaf in tree:
    raise ConversionError(f"Two source tensors map to {path}.")
  tree[leaf] = value


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
  """{'a': {'b': x}} -> {'a/b': x}."""
  out = {}
  for k, v in tree.items():
    path = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(flatten(v, path + "/"))
    else:
      out[path] = v
  return out


def unflatten(flat: Mapping[str, Any]) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    set_path(tree, path, value)
  return tree


def apply_rules(tensors: tensor_files.TensorFile, rules: Sequence[Rule],
                ignore: Iterable[str] = ()) -> tuple[dict, dict, list[str]]:
  """Maps every tensor of `tensors` through the first matching rule.

  Arrays are converted to contiguous float32 one at a time, so only the
  converted copy of the checkpoint stays in memory.

  Args:
    tensors: the source checkpoint.
    rules: (regex, target function) pairs; the regex must match the whole name.
    ignore: regexes of names that carry no weights (e.g. `num_batches_tracked`).

  Returns:
    (params, batch_stats, unused): our two trees and the source names that no
    rule claimed, sorted.
  """
  compiled = [(re.compile(pattern), target) for pattern, target in rules]
  ignored = [re.compile(p) for p in ignore]
  trees: dict[str, dict] = {"params": {}, "batch_stats": {}}
  unused = []
  for name in tensors:
    target = None
    for pattern, make_target in compiled:
      match = pattern.fullmatch(name)
      if match:
        target = make_target(match)
        break
    if target is None:
      if not any(p.fullmatch(name) for p in ignored):
        unused.append(name)
      continue
    value = tensors[name]
    if target.transform is not None:
      value = target.transform(value)
    collection, path = target.path.split("/", 1)
    set_path(trees[collection], path, np.asarray(value, dtype=np.float32, order="C"))
  if unused:
    logging.info("%d tensors of %s were not mapped: %s", len(unused), tensors.path,
                 ", ".join(sorted(unused)[:10]))
  return trees["params"], trees["batch_stats"], sorted(unused)


def strip_prefix(tensors: tensor_files.TensorFile,
                 prefixes: Sequence[str]) -> tensor_files.TensorFile:
  """Removes the first of `prefixes` that some names start with, from those names.

  E.g. 'vit.' in a ViTForImageClassification file, whose head `classifier.*`
  has no prefix.
  """
  for prefix in prefixes:
    if any(k.startswith(prefix) for k in tensors):
      names = {(k[len(prefix):] if k.startswith(prefix) else k): k for k in tensors}
      if len(names) != len(tensors):
        raise ConversionError(f"{tensors.path}: names clash once {prefix!r} is removed.")
      return tensor_files.TensorFile(
          tensors.path, {k: tensors.shape(v) for k, v in names.items()},
          lambda k, names=names: tensors[names[k]], tensors.metadata)
  return tensors


def check_unused(unused: Sequence[str], path: str, strict: bool) -> None:
  """Raises (strict) or warns about source tensors that no rule mapped."""
  if not unused:
    return
  shown = ", ".join(unused[:12]) + (f", ... ({len(unused)} in all)" if len(unused) > 12 else "")
  message = (f"{len(unused)} tensors in {path} have no place in our model: {shown}. "
             "Is this the architecture you meant? (`pretrained convert --strict=False` or --config.init_strict=False drops them)")
  if strict:
    raise ConversionError(message)
  logging.warning(message)


def make_converted(params: dict, batch_stats: dict, *, source: str, fmt: str,
                   normalization: str, model_options: Mapping[str, Any],
                   unused: Sequence[str], image_size: int | None = None,
                   class_names: Sequence[str] | None = None) -> Converted:
  """Assembles a `Converted` with the metadata every format reports."""
  if normalization not in NORMALIZATIONS:
    raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
  arch = architecture.from_params(params)
  metadata = {
      "source": source,
      "format": fmt,
      "architecture": arch,
      # A ViT's position-embedding grid says its resolution better than any config.
      "image_size": arch.pop("image_size", None) or image_size or 224,
      "num_classes_original": architecture.num_classes_of(params),
      "normalization": normalization,
      "model_options": dict(model_options),
      "unused_source_keys": list(unused),
      "converter_version": CONVERTER_VERSION,
  }
  if class_names is not None:
    metadata["class_names"] = list(class_names)
  return Converted(params=params, batch_stats=batch_stats, metadata=metadata)
