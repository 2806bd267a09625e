"""Which implementation of the basic layers a model runs on: `model.layer_impl`.

The project's layers were tuned on XLA:CPU: 1x1 and patchify convolutions as
float32-accumulating matmuls and Dense layers on the same einsum
(models/precision.py), BatchNorm with a hand-written gradient fused with the
ReLU and the residual add (models/batch_norm.py), a separable max-pool
(resnet.max_pool_3x3_s2) and attention on those matmuls. On a GPU or TPU,
XLA's own lowering of the plain Flax layers (cuDNN convolutions, cuBLAS
matmuls, its fusions) is as fast or faster (measured on an H200: README, 'GPU
benchmark').

* 'project': the project's layers everywhere.
* 'flax': plain Flax: `nn.Conv`, `nn.Dense` / `nn.DenseGeneral`, `nn.BatchNorm`
  (the ReLU, drop-path scale and residual add as plain jnp after it),
  `nn.max_pool` and `nn.dot_product_attention` (softmax in float32).
* 'auto': per layer and backend from `AUTO`, resolved when the model is built
  (`models.create_model`) from `jax.default_backend()`. On GPUs that is plain
  Flax, except attention: cuDNN's fused (flash) attention
  (`jax.nn.dot_product_attention(implementation='cudnn')`), which never
  materialises the [tokens x tokens] scores. It runs where cuDNN can (a CUDA
  device, bfloat16/float16, head size a multiple of 8 up to 128, no attention
  dropout, no attention maps requested); elsewhere `cudnn_attention` falls
  back to Flax's.

With the project's convs on a CPU the compiled train and eval steps also take
`CPU_COMPILER_OPTIONS` (`compiler_options`): XLA:CPU's own convolution kernels
instead of YNNPACK's, measured faster for ResNet's 3x3 convs.

Both give the same parameters (names, shapes and initial values), so
checkpoints and converters are shared, and the same outputs and gradients up to
float rounding (tests/test_layer_impl.py). `python benchmarks/gpu_step.py`
times both on an accelerator; `AUTO` is the place to record what it finds.
"""

import collections
import dataclasses
import re
from typing import Any, Callable, Optional, Sequence

from absl import logging
import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp

from vit_jax_ft.models import batch_norm
from vit_jax_ft.models import precision

LAYER_IMPLS = ("auto", "project", "flax")
LAYER_KINDS = ("conv", "dense", "batch_norm", "max_pool", "attention")
# What each kind of layer can be; attention has a third, GPU-only form.
KIND_CHOICES = {**{kind: ("project", "flax") for kind in LAYER_KINDS},
                "attention": ("project", "flax", "cudnn")}

# What 'auto' picks, per backend and kind of layer; backends not listed take
# AUTO_DEFAULT. CPU: the project's layers, each measured faster on XLA:CPU
# (benchmarks/layers.py and benchmarks/train_step.py, on AMX and non-AMX CPUs).
# GPU: plain Flax, measured on an H200 (benchmarks/gpu_step.py, README 'GPU
# benchmark'): 1.07-1.11x faster for ViT-B/16 bf16, a tie for ResNet-50; and
# cuDNN's fused attention, another 1.45x for the ViT-B/16 bf16 train step
# (attention alone 3.05x). TPU takes plain Flax, unmeasured.
AUTO: dict[str, dict[str, str]] = {
    "cpu": {kind: "project" for kind in LAYER_KINDS},
    "gpu": {**{kind: "flax" for kind in LAYER_KINDS}, "attention": "cudnn"},
}
AUTO_DEFAULT = "flax"

# XLA options for the compiled train and eval steps when the project's convs run
# on a CPU. jax 0.10's XLA:CPU hands dots, reductions and convolutions to
# YNNPACK (its default `xla_cpu_experimental_ynn_fusion_type`); for
# convolutions its own kernels are faster: ResNet-50's 3x3 convs fwd+bwd
# 1.1-1.65x, the ResNet-50 train step 1.05x (bfloat16) and 1.08x (float32) in
# an interleaved A/B on an AMD EPYC (`python benchmarks/ab_step.py
# --change=ynn_conv`); EfficientNet and ConvNeXt unchanged (their convs are
# depthwise or matmuls). The list is the default less convolutions
# (tests/test_layer_impl.py checks that on the pinned jaxlib).
CPU_COMPILER_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type":
        "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE",
}


@dataclasses.dataclass(frozen=True)
class Layers:
  """The implementation, 'project' or 'flax', of each kind of layer (hashable: a module field)."""

  conv: str = "project"
  dense: str = "project"
  batch_norm: str = "project"
  max_pool: str = "project"
  attention: str = "project"

  def __post_init__(self):
    for kind in LAYER_KINDS:
      choices = KIND_CHOICES[kind]
      if getattr(self, kind) not in choices:
        raise ValueError(f"Layers.{kind} must be one of {', '.join(map(repr, choices))}, "
                         f"got {getattr(self, kind)!r}.")

  @property
  def name(self) -> str:
    """'project' or 'flax' when every kind agrees, else 'kind=impl,...'."""
    impls = {getattr(self, k) for k in LAYER_KINDS}
    if len(impls) == 1:
      return impls.pop()
    return ",".join(f"{k}={getattr(self, k)}" for k in LAYER_KINDS)

  def conv_module(self) -> Callable[..., nn.Module]:
    """precision.Conv or nn.Conv (the same fields and parameters)."""
    return precision.Conv if self.conv == "project" else nn.Conv

  def dense_module(self) -> Callable[..., nn.Module]:
    """precision.DenseGeneral, or nn.Dense / nn.DenseGeneral (the same fields and parameters)."""
    return precision.DenseGeneral if self.dense == "project" else flax_dense

  def norm_module(self) -> Callable[..., nn.Module]:
    """batch_norm.BatchNorm or FlaxBatchNorm (the same fields, call and parameters)."""
    return batch_norm.BatchNorm if self.batch_norm == "project" else FlaxBatchNorm

  def attention_fn(self, dtype: Any) -> Callable:
    """The project's attention in low precision (float32: Flax's), Flax's or cuDNN's."""
    if self.attention == "project" and jnp.dtype(dtype) != jnp.float32:
      return precision.attention
    if self.attention == "cudnn":
      return cudnn_attention
    return _flax_attention


def resolve(layer_impl: "str | Layers", backend: Optional[str] = None) -> Layers:
  """`Layers` for a config value ('auto', 'project', 'flax') on `backend` (default: JAX's)."""
  if isinstance(layer_impl, Layers):
    return layer_impl
  if layer_impl not in LAYER_IMPLS:
    raise ValueError(f"model.layer_impl must be one of {', '.join(map(repr, LAYER_IMPLS))}, "
                     f"got {layer_impl!r}.")
  if layer_impl == "auto":
    backend = backend or jax.default_backend()
    return Layers(**AUTO.get(backend, {k: AUTO_DEFAULT for k in LAYER_KINDS}))
  return Layers(**{k: layer_impl for k in LAYER_KINDS})


def compiler_options(layer_impl: "str | Layers",
                     backend: Optional[str] = None) -> Optional[dict[str, str]]:
  """`jax.jit(compiler_options=...)` for a model's steps: CPU_COMPILER_OPTIONS or None.

  Only for the project's convs on a CPU; 'flax' layers keep XLA's defaults,
  so they stay the plain baseline they are compared against.
  """
  backend = backend or jax.default_backend()
  if backend == "cpu" and resolve(layer_impl, backend).conv == "project":
    return dict(CPU_COMPILER_OPTIONS)
  return None


def ynn_fusion_kinds(hlo_text: str) -> collections.Counter:
  """What the YNNPACK fusions of a compiled program (`compiled.as_text()`) compute.

  Counts 'convolution', 'dot', 'reduce' or 'other' per fusion: how
  CPU_COMPILER_OPTIONS shows in a program (benchmarks/ab_step.py, tests).
  """
  # Computations start at column 0; a fusion's body is the one its `calls=` names.
  bodies = {b.split(" ", 1)[0].lstrip("%"): b
            for b in re.split(r"^(?=\S)", hlo_text, flags=re.M)}
  kinds = collections.Counter()
  for callee in re.findall(r"kind=kCustom, calls=%([\w.\-]+).*__ynn_fusion", hlo_text):
    body = bodies[callee]
    kinds[next((k for k in ("convolution", "dot", "reduce") if f" {k}(" in body), "other")] += 1
  return kinds


def flax_dense(features: "int | Sequence[int]", axis: "int | Sequence[int]" = -1,
               **kwargs) -> nn.Module:
  """nn.Dense for one output axis over the last input axis, else nn.DenseGeneral."""
  if isinstance(features, int) and axis == -1:
    return nn.Dense(features, **kwargs)
  return nn.DenseGeneral(features, axis=axis, **kwargs)


class FlaxBatchNorm(nn.BatchNorm):
  """nn.BatchNorm with batch_norm.BatchNorm's call: `relu`, `shortcut`, `branch_scale`.

  relu(bn(x) * branch_scale + shortcut), the extras as plain jnp in the
  compute dtype after Flax's BatchNorm, for XLA to fuse as it sees fit.
  """

  relu: bool = False

  def __call__(self, x: jax.Array, shortcut: Optional[jax.Array] = None,
               branch_scale: Optional[jax.Array] = None) -> jax.Array:
    y = super().__call__(x)
    if branch_scale is not None:
      y = y * branch_scale.astype(y.dtype).reshape((-1,) + (1,) * (y.ndim - 1))
    if shortcut is not None:
      y = y + shortcut.astype(y.dtype)
    return nn.relu(y) if self.relu else y


def flax_max_pool_3x3_s2(x: jax.Array, padding: str = 'torch') -> jax.Array:
  """PyTorch's MaxPool2d(3, stride=2, padding=1) as nn.max_pool (padding never wins: -inf).

  ``padding='tf_same'``: TensorFlow's MaxPool2D(3, 2, 'same'), which is XLA's 'SAME'.
  """
  return nn.max_pool(x, (3, 3), strides=(2, 2),
                     padding='SAME' if padding == 'tf_same' else ((1, 1), (1, 1)))


def _flax_attention(query, key, value, **kwargs):
  """nn.dot_product_attention with the softmax in float32 (as the project's)."""
  return nn.dot_product_attention(query, key, value, force_fp32_for_softmax=True, **kwargs)


def on_cuda() -> bool:
  """Whether JAX's default backend is CUDA (JAX's own test before it calls cuDNN)."""
  return "cuda" in jax.extend.backend.get_backend().platform_version.lower()


def cudnn_unsupported(head_dim: int, dtype: Any, *, dropout: bool,
                      sow: bool) -> Optional[str]:
  """Why cuDNN's fused attention cannot run a call (None when it can)."""
  dtype = jnp.dtype(dtype)
  if sow:
    return "attention maps requested (the fused kernel never forms the weights)"
  if dropout:
    return "attention dropout"
  if dtype not in (jnp.bfloat16, jnp.float16):
    return f"dtype {dtype} (cuDNN's fused attention takes bfloat16/float16)"
  if head_dim % 8 or head_dim > 128:
    return f"head size {head_dim} (cuDNN needs a multiple of 8, at most 128)"
  if not on_cuda():
    return f"backend {jax.default_backend()!r} is not CUDA"
  return None


def fused_attention(query, key, value, implementation: Optional[str] = "cudnn"):
  """jax.nn.dot_product_attention on [batch, tokens, heads, head_dim], scale 1/sqrt(head_dim).

  implementation='cudnn' is the fused kernel (CUDA only); 'xla' the same
  function in plain XLA, which is how tests check the call on a CPU. The
  tokens are padded to a multiple of 8 with the padding masked (cuDNN's
  training kernels refuse odd lengths, e.g. ViT-B/16's 197 on jax 0.11) and
  the padded rows dropped from the result.
  """
  batch, tokens = query.shape[:2]
  padded = -(-tokens // 8) * 8
  if padded == tokens:
    return jax.nn.dot_product_attention(query, key, value, implementation=implementation)
  pad = ((0, 0), (0, padded - tokens), (0, 0), (0, 0))
  lengths = jnp.full((batch,), tokens, jnp.int32)
  out = jax.nn.dot_product_attention(
      jnp.pad(query, pad), jnp.pad(key, pad), jnp.pad(value, pad),
      query_seq_lengths=lengths, key_value_seq_lengths=lengths, implementation=implementation)
  return out[:, :tokens]


def cudnn_attention(query, key, value, dropout_rng=None, dropout_rate=0.0,
                    deterministic=True, dtype=None, module=None, **kwargs):
  """cuDNN's fused attention where it can run (`cudnn_unsupported`), else Flax's.

  Same signature and result as `_flax_attention` (the softmax in float32 in
  both); the fallback is decided while tracing, from static shapes and dtypes,
  and logged.
  """
  dtype = dtype or query.dtype
  reason = cudnn_unsupported(query.shape[-1], dtype,
                             dropout=not deterministic and dropout_rate > 0.0,
                             sow=module is not None)
  if reason:
    logging.log_first_n(logging.INFO, "cuDNN attention falls back to Flax's: %s.", 4, reason)
    return _flax_attention(query, key, value, dropout_rng=dropout_rng,
                           dropout_rate=dropout_rate, deterministic=deterministic,
                           dtype=dtype, module=module, **kwargs)
  return fused_attention(query.astype(dtype), key.astype(dtype), value.astype(dtype))
