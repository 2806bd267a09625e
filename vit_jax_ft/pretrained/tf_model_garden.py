"""TF Model Garden (`official.vision`) classification checkpoints: ResNet and ViT.

The Model Garden trainer saves object-based TensorFlow checkpoints
(`ckpt-N.index` + `ckpt-N.data-00000-of-00001`, usually shipped as a
`.tar.gz`) of an `official.vision.modeling.classification_model.
ClassificationModel`: a backbone (`backbones.resnet.ResNet` or
`backbones.vit.VisionTransformer`), global average pooling and a Dense head,
often next to the optimizer's slots, `global_step` and, in a trainer
checkpoint, the backbone again under a top-level `backbone/`. They are read
with `tf.train.load_checkpoint` (TensorFlow is a dependency anyway); the Model
Garden package is never imported.

Variable names are Keras object paths (`layer_with_weights-2/_conv1/kernel`),
and the same variable can be reached by several paths; the checkpoint stores
it under one. So the names are not matched as strings: the checkpoint's object
graph is walked from the classification model, its `_backbone` and its last
Dense layer, and each variable is named by its path inside those. Everything
the walk does not reach is training state (optimizer slots and iterations,
`global_step`, `save_counter`): ignored and counted in the metadata
(`ignored_training_state`).

* ResNet (model_id 18/34/50/101/152, stem 'v0', no SE, no ResNet-D): its
  layers in order are the stem conv and BatchNorm, then the blocks; a block
  with a projection shortcut (`_shortcut`, `_norm0`) starts a new stage, the
  first one always does. Model Garden strides the bottleneck's 3x3 conv
  (v1.5), has no conv biases, pads every conv and the max-pool with TF 'SAME'
  (our `padding='tf_same'`) and gives ResNet-18/34 a projection on the very
  first block (`first_block_projection`). BatchNorm epsilon and momentum are
  not in the checkpoint: they are read from a `params.yaml` beside it when
  there is one, else the `resnet_imagenet` experiment's 1e-5 and 0.9 are
  assumed (the layer defaults, 1e-3 and 0.99, are overridden by every
  ImageNet config).
* ViT (vit-ti16 ... vit-l16, the DeiT-recipe B/16): patch-embedding conv,
  class token (`cls`), position embeddings over class token and patches,
  pre-LN encoder blocks whose Keras `MultiHeadAttention` kernels already have
  Flax's [D, heads, head_dim] / [heads, head_dim, D] shapes, final LayerNorm,
  an optional tanh `pre_logits` (the DeiT config's representation_size=768).
  Model Garden's ViT uses the tanh GELU and LayerNorm epsilon 1e-6, our
  defaults.

Both read images normalised with the ImageNet mean and standard deviation
(`classification_input.py`). ImageNet heads have 1001 outputs: output 0 is a
background class and ImageNet class i is output i + 1 (`head` in the
metadata); fine-tuning replaces the head anyway.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import shutil
import tarfile
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

from absl import logging
import numpy as np

from vit_jax_ft.pretrained import conversion
from vit_jax_ft.pretrained import tensor_files

FORMAT = "tf_model_garden"
ORIGIN = "TF Model Garden (official.vision ClassificationModel)"
NORMALIZATION = "imagenet"
VIT_OPTIONS = {"gelu_approximate": True, "layer_norm_eps": 1e-6}
# The resnet_imagenet experiment's norm_activation (official/vision/configs/image_classification.py).
_RESNET_BN = {"bn_epsilon": 1e-5, "bn_momentum": 0.9}

_TAR_EXTS = (".tar.gz", ".tgz", ".tar")
_DATA_FILE = re.compile(r"(.*)\.data-\d{5}-of-\d{5}")
_VALUE = "/.ATTRIBUTES/VARIABLE_VALUE"
_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
_BN_VARS = {"gamma": "params/{}/scale", "beta": "params/{}/bias",
            "moving_mean": "batch_stats/{}/mean", "moving_variance": "batch_stats/{}/var"}


# --- Finding the checkpoint -------------------------------------------------


def is_tar(source: str) -> bool:
  return source.lower().endswith(_TAR_EXTS)


def is_prefix_file(path: str) -> bool:
  """`ckpt-N.index` or one of its `.data-?????-of-?????` shards."""
  return path.endswith(".index") or bool(_DATA_FILE.fullmatch(path))


def is_prefix(source: str) -> bool:
  """`.../ckpt-N`, a prefix whose `.index` file exists."""
  return not os.path.exists(source) and os.path.isfile(source + ".index")


def is_checkpoint_folder(folder: str) -> bool:
  """A folder holding a TF checkpoint (`checkpoint` file or `*.index`), at any depth."""
  return bool(_index_files(folder, limit=1)) or os.path.isfile(os.path.join(folder, "checkpoint"))


def _index_files(folder: str, limit: int | None = None) -> list[str]:
  found = []
  for root, dirs, files in os.walk(folder):
    dirs.sort()
    for f in sorted(files):
      if f.endswith(".index"):
        found.append(os.path.join(root, f))
        if limit and len(found) >= limit:
          return found
  return found


def _step(prefix: str) -> int:
  m = re.search(r"-(\d+)$", prefix)
  return int(m[1]) if m else -1


def find_prefix(folder: str, shown: str) -> str:
  """The checkpoint prefix in a folder: the `checkpoint` file's, else the newest ckpt-N."""
  state = os.path.join(folder, "checkpoint")
  if os.path.isfile(state):
    with open(state, encoding="utf-8", errors="replace") as f:
      m = re.search(r'^model_checkpoint_path:\s*"([^"]+)"', f.read(), re.M)
    if m:
      prefix = m[1] if os.path.isabs(m[1]) else os.path.join(folder, m[1])
      if os.path.isfile(prefix + ".index"):
        return prefix
  prefixes = [p[:-len(".index")] for p in _index_files(folder)]
  if not prefixes:
    raise tensor_files.CheckpointFileError(
        f"{shown} holds no TensorFlow checkpoint (no ckpt-N.index file); found "
        f"{sorted(os.listdir(folder))[:12]}")
  if len({os.path.dirname(p) for p in prefixes}) > 1:
    raise conversion.ConversionError(
        f"{shown} holds checkpoints in several folders ({', '.join(sorted(prefixes)[:4])}); "
        "pass the one you mean as --source=FOLDER/ckpt-N.")
  prefix = max(prefixes, key=_step)
  if len(prefixes) > 1:
    logging.info("%s holds %d checkpoints; using the newest, %s", shown, len(prefixes), prefix)
  return prefix


@contextlib.contextmanager
def checkpoint_prefix(source: str) -> Iterator[tuple[str, str]]:
  """Yields (prefix to read, how to name it in messages) for any accepted form.

  A `.tar.gz` is unpacked into a temporary folder that is removed afterwards.
  """
  if os.path.isfile(source) and is_tar(source):
    tmp = tempfile.mkdtemp(prefix="tfmg-")
    try:
      _extract(source, tmp)
      prefix = find_prefix(tmp, source)
      yield prefix, f"{source}:{os.path.relpath(prefix, tmp)}"
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
  elif os.path.isdir(source):
    prefix = find_prefix(source, source)
    yield prefix, prefix
  elif os.path.isfile(source) and is_prefix_file(source):
    prefix = source[:-len(".index")] if source.endswith(".index") else _DATA_FILE.fullmatch(
        source)[1]
    yield prefix, prefix
  elif is_prefix(source):
    yield source, source
  else:
    raise tensor_files.CheckpointFileError(f"TensorFlow checkpoint not found: {source}")


def _extract(archive: str, out: str) -> None:
  try:
    with tarfile.open(archive) as tar:
      members = [m for m in tar.getmembers() if m.isfile() or m.isdir()]
      if not any(m.name.endswith(".index") for m in members):
        raise tensor_files.CheckpointFileError(
            f"{archive} holds no TensorFlow checkpoint (no ckpt-N.index file); found "
            f"{[m.name for m in members][:8]}")
      try:
        tar.extractall(out, members=members, filter="data")
      except TypeError:  # Python without extraction filters: refuse unsafe names ourselves.
        for m in members:
          if m.name.startswith(("/", "..")) or "/../" in m.name:
            raise tensor_files.CheckpointFileError(f"{archive}: unsafe member name {m.name!r}")
        tar.extractall(out, members=members)
  except (tarfile.TarError, EOFError, OSError, ValueError) as e:
    if isinstance(e, tensor_files.CheckpointFileError):
      raise
    raise tensor_files.CheckpointFileError(
        f"Cannot unpack {archive} (truncated or corrupted download?): {type(e).__name__}: {e}"
    ) from e


def _params_yaml(prefix: str) -> dict[str, Any]:
  """norm_epsilon / norm_momentum / input_size from a params.yaml next to (or above) the ckpt."""
  for folder in (os.path.dirname(prefix), os.path.dirname(os.path.dirname(prefix))):
    path = os.path.join(folder, "params.yaml")
    if os.path.isfile(path):
      with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
      found = {"path": path}
      for key in ("norm_epsilon", "norm_momentum"):
        m = re.search(rf"^\s*{key}:\s*([0-9.eE+-]+)\s*$", text, re.M)
        if m:
          found[key] = float(m[1])
      return found
  return {}


# --- Reading ----------------------------------------------------------------


class _Checkpoint:
  """A TF checkpoint's variables, named by their path inside the model's objects."""

  def __init__(self, prefix: str, shown: str):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    self._tf = tf
    self.shown = shown
    try:
      self.reader = tf.train.load_checkpoint(prefix)
      self.shapes = {k: tuple(v) for k, v in self.reader.get_variable_to_shape_map().items()}
    except (tf.errors.OpError, IndexError, ValueError) as e:
      raise tensor_files.CheckpointFileError(
          f"Cannot read the TensorFlow checkpoint {shown} (missing, truncated or corrupted "
          f".index/.data file?): {_first_line(e)}") from e
    if _GRAPH_KEY not in self.shapes:
      raise conversion.ConversionError(
          f"{shown} is a name-based (TF1) checkpoint without an object graph; only the "
          "object-based checkpoints of TF2 Model Garden trainers are read.")

  def read(self, key: str) -> np.ndarray:
    try:
      return np.asarray(self.reader.get_tensor(key))
    except (self._tf.errors.OpError, IndexError, ValueError) as e:  # IndexError: short read.
      raise tensor_files.CheckpointFileError(
          f"{self.shown}: cannot read {key} (truncated or corrupted .data file?): "
          f"{_first_line(e)}") from e

  def graph(self):
    from tensorflow.core.protobuf import trackable_object_graph_pb2  # pylint: disable=g-import-not-at-top
    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(self.read(_GRAPH_KEY).item())
    return graph


def _first_line(e: Exception) -> str:
  return (str(getattr(e, "message", "") or e).strip().splitlines() or [type(e).__name__])[0]


def _child(node, name: str) -> int | None:
  return next((c.node_id for c in node.children if c.local_name == name), None)


def _variables_under(graph, start: int) -> dict[str, str]:
  """{path inside the object `start`: checkpoint key} for every variable reachable from it.

  Breadth first, Keras' `layer_with_weights-N` names before other attributes
  and `layer-N` aliases last, so each variable gets its shortest, stable name.
  """
  def rank(local_name: str) -> int:
    if local_name.startswith("layer_with_weights-"):
      return 0
    return 2 if re.fullmatch(r"layer-\d+", local_name) else 1

  seen, out = {start}, {}
  queue = collections.deque([(start, "")])
  while queue:
    node_id, path = queue.popleft()
    node = graph.nodes[node_id]
    for attr in node.attributes:
      if attr.name == "VARIABLE_VALUE" and path:
        out.setdefault(path.rstrip("/"), attr.checkpoint_key)
    for c in sorted(node.children, key=lambda c: rank(c.local_name)):
      if c.node_id not in seen:
        seen.add(c.node_id)
        queue.append((c.node_id, f"{path}{c.local_name}/"))
  return out


def _model_parts(ckpt: _Checkpoint) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
  """(backbone variables, head variables, other model variables), each {path: key}."""
  graph = ckpt.graph()
  root = graph.nodes[0]
  model_id = _child(root, "model")
  backbone_id = None
  if model_id is not None:
    backbone_id = _child(graph.nodes[model_id], "_backbone")
  if backbone_id is None:
    backbone_id = _child(root, "backbone")
  backbone = _variables_under(graph, backbone_id) if backbone_id is not None else {}
  head, other = {}, {}
  if model_id is not None:
    model = graph.nodes[model_id]
    layers = sorted(((int(c.local_name.rsplit("-", 1)[1]), c.node_id) for c in model.children
                     if c.local_name.startswith("layer_with_weights-")
                     and c.node_id != backbone_id), reverse=True)
    claimed = set(backbone.values())
    for i, (_, node_id) in enumerate(layers):
      found = _variables_under(graph, node_id)
      kernel = found.get("kernel")
      if i == 0 and kernel is not None and len(ckpt.shapes.get(kernel, ())) == 2:
        head = found
      else:
        other.update({f"model/layer_{node_id}/{p}": k for p, k in found.items()})
    claimed |= set(head.values()) | set(other.values())
    for path, key in _variables_under(graph, model_id).items():
      if key not in claimed:
        other[f"model/{path}"] = key
  return backbone, head, other


def _is_training_state(key: str) -> bool:
  return (key.startswith(("optimizer/", "global_step/", "save_counter/"))
          or ".OPTIMIZER_SLOT" in key or key == _GRAPH_KEY)


# --- Mapping ----------------------------------------------------------------


def _layers(backbone: Mapping[str, str]) -> dict[int, dict[str, str]]:
  """Backbone variables grouped by Keras layer: {N: {path in layer: key}}."""
  layers: dict[int, dict[str, str]] = collections.defaultdict(dict)
  for path, key in backbone.items():
    m = re.fullmatch(r"layer_with_weights-(\d+)/(.+)", path)
    layers[int(m[1]) if m else -1][m[2] if m else path] = key
  return dict(sorted(layers.items()))


def _resnet_targets(layers: dict[int, dict[str, str]], shapes) -> tuple[dict[str, str], dict]:
  """{checkpoint key: our 'params/...' path} for a Model Garden ResNet, and its facts."""
  targets, facts = {}, {"first_block_projection": False, "block": None}
  stage, block = 0, 0
  for index, layer in layers.items():
    if index == 0 and "kernel" in layer:
      targets[layer["kernel"]] = "params/conv_init/kernel"
    elif index == 1 and "gamma" in layer:
      for var, key in layer.items():
        if var in _BN_VARS:
          targets[key] = _BN_VARS[var].format("bn_init")
    elif "_conv1/kernel" in layer:
      projected = "_shortcut/kernel" in layer
      if stage == 0 or projected:
        stage, block = stage + 1, 0
      block += 1
      name = f"stage{stage}_block{block}"
      kind = "bottleneck" if "_conv3/kernel" in layer else "basic"
      facts["block"] = facts["block"] or kind
      if stage == 1 and block == 1 and projected and kind == "basic":
        facts["first_block_projection"] = True
      for var, key in layer.items():
        m = re.fullmatch(r"_conv([123])/kernel", var)
        if m:
          targets[key] = f"params/{name}/conv{m[1]}/kernel"
        elif var == "_shortcut/kernel":
          targets[key] = f"params/{name}/proj_conv/kernel"
        else:
          m = re.fullmatch(r"_norm([0123])/(\w+)", var)
          if m and m[2] in _BN_VARS:
            module = "proj_bn" if m[1] == "0" else f"bn{m[1]}"
            targets[key] = _BN_VARS[m[2]].format(f"{name}/{module}")
  return targets, facts


_VIT_BLOCK = {
    "_attention_layer_norm/gamma": "LayerNorm_0/scale",
    "_attention_layer_norm/beta": "LayerNorm_0/bias",
    "_output_layer_norm/gamma": "LayerNorm_2/scale",
    "_output_layer_norm/beta": "LayerNorm_2/bias",
    "_intermediate_dense/kernel": "MlpBlock_3/Dense_0/kernel",
    "_intermediate_dense/bias": "MlpBlock_3/Dense_0/bias",
    "_output_dense/kernel": "MlpBlock_3/Dense_1/kernel",
    "_output_dense/bias": "MlpBlock_3/Dense_1/bias",
    **{f"_attention_layer/_{tf_name}_dense/{var}":
       f"MultiHeadDotProductAttention_1/{ours}/{var}"
       for tf_name, ours in (("query", "query"), ("key", "key"), ("value", "value"),
                             ("output", "out"))
       for var in ("kernel", "bias")},
}


def _vit_targets(layers: dict[int, dict[str, str]], shapes) -> dict[str, str]:
  """{checkpoint key: our 'params/...' path} for a Model Garden ViT."""
  targets = {}
  for layer in layers.values():
    if any(v.startswith("_encoder_layers/") for v in layer):
      for var, key in layer.items():
        m = re.fullmatch(r"_encoder_layers/(\d+)/(.+)", var)
        if m and m[2] in _VIT_BLOCK:
          targets[key] = f"params/Transformer/encoderblock_{m[1]}/{_VIT_BLOCK[m[2]]}"
        elif var == "_pos_embed/pos_embedding":
          targets[key] = "params/Transformer/posembed_input/pos_embedding"
        elif var in ("_norm/gamma", "_norm/beta"):
          targets[key] = "params/Transformer/encoder_norm/" + (
              "scale" if var.endswith("gamma") else "bias")
    elif set(layer) == {"cls"}:
      targets[layer["cls"]] = "params/cls"
    elif "kernel" in layer and len(shapes[layer["kernel"]]) == 4:
      for var in ("kernel", "bias"):
        if var in layer:
          targets[layer[var]] = f"params/embedding/{var}"
    elif "kernel" in layer and len(shapes[layer["kernel"]]) == 2:
      for var in ("kernel", "bias"):
        if var in layer:
          targets[layer[var]] = f"params/pre_logits/{var}"
  return targets


def _family(layers: dict[int, dict[str, str]], shapes) -> str | None:
  if any(any(v.startswith("_encoder_layers/") for v in layer) for layer in layers.values()):
    return "vit"
  stem = layers.get(0, {}).get("kernel")
  if stem is not None and shapes[stem][:2] == (7, 7) and any(
      "_conv1/kernel" in layer for layer in layers.values()):
    return "resnet"
  return None


def convert(source: str, *, strict: bool = True) -> conversion.Converted:
  """Converts a Model Garden checkpoint (.tar.gz, folder, ckpt-N prefix or its files)."""
  with checkpoint_prefix(source) as (prefix, shown):
    ckpt = _Checkpoint(prefix, shown)
    backbone, head, other = _model_parts(ckpt)
    model_keys = set(backbone.values()) | set(head.values()) | set(other.values())
    rest = [k for k in ckpt.shapes if k not in model_keys]
    training_state = sorted(k for k in rest if _is_training_state(k) and k != _GRAPH_KEY)
    unreached = sorted(k for k in rest if not _is_training_state(k))
    if not backbone:
      what = (f"only training state ({len(training_state)} tensors, e.g. "
              f"{', '.join(training_state[:3])})" if training_state else
              f"no model weights (found {sorted(ckpt.shapes)[:6]})")
      raise conversion.ConversionError(
          f"{shown} holds {what}: no model/_backbone or backbone/ weights of a Model Garden "
          "ClassificationModel. Is this the checkpoint you meant?")
    layers = _layers(backbone)
    family = _family(layers, ckpt.shapes)
    if family is None:
      raise conversion.ConversionError(
          f"{shown}: its backbone is neither a Model Garden ResNet (7x7 'v0' stem and residual "
          f"blocks) nor a ViT (_encoder_layers); it holds e.g. "
          f"{', '.join(sorted(backbone)[:6])}. Only ResNet and ViT backbones are converted.")
    options: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    if family == "resnet":
      targets, facts = _resnet_targets(layers, ckpt.shapes)
      yaml = _params_yaml(prefix)
      options = {"variant": "v1.5", "conv_bias": False,
                 "bn_epsilon": yaml.get("norm_epsilon", _RESNET_BN["bn_epsilon"]),
                 "bn_momentum": yaml.get("norm_momentum", _RESNET_BN["bn_momentum"]),
                 "padding": "tf_same",
                 "first_block_projection": facts["first_block_projection"]}
      extra["batch_norm_options_from"] = (
          os.path.basename(yaml["path"]) if "norm_epsilon" in yaml else
          "assumed: Model Garden's resnet_imagenet experiment (norm_epsilon 1e-5, "
          "norm_momentum 0.9); not stored in the checkpoint")
    else:
      targets = _vit_targets(layers, ckpt.shapes)
      options = dict(VIT_OPTIONS)
    for var in ("kernel", "bias"):
      if var in head:
        targets[head[var]] = f"params/head/{var}"
    key_path = {k: f"backbone/{p}" for p, k in backbone.items()}
    key_path.update({k: p for p, k in other.items()})
    key_path.update({k: f"head/{p}" for p, k in head.items()})
    unused = sorted(key_path[k] for k in model_keys if k not in targets) + unreached
    conversion.check_unused(unused, shown, strict)
    trees: dict[str, dict] = {"params": {}, "batch_stats": {}}
    for key, target in sorted(targets.items(), key=lambda kv: kv[1]):
      collection, path = target.split("/", 1)
      conversion.set_path(trees[collection], path, np.asarray(ckpt.read(key), np.float32))
  if training_state:
    logging.info("%s: ignored %d tensors of training state (optimizer slots, step counters), "
                 "e.g. %s", shown, len(training_state), ", ".join(training_state[:3]))
  converted = conversion.make_converted(
      trees["params"], trees["batch_stats"], source=source, fmt=FORMAT,
      normalization=NORMALIZATION, model_options=options, unused=unused)
  meta = converted.metadata
  meta["origin"] = ORIGIN
  meta["tf_checkpoint"] = shown
  meta["ignored_training_state"] = {"count": len(training_state),
                                    "examples": training_state[:5]}
  meta.update(extra)
  if meta["num_classes_original"] == 1001:
    meta["head"] = ("1001 outputs: output 0 is the background class, ImageNet class i is "
                    "output i + 1 (a fine-tuning run replaces the head)")
  return converted
