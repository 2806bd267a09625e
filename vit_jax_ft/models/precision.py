"""Low-precision matmuls that accumulate in float32, forward and backward.

On CPUs with AMX (and on GPUs) a bfloat16 x bfloat16 matmul is fast when it
accumulates into float32 (`preferred_element_type=float32`); with a bfloat16
result XLA:CPU falls back to a path slower than plain float32. Setting
preferred_element_type on the forward op is not enough: JAX's transpose rule
then multiplies a float32 cotangent by a bfloat16 operand, which also runs
as a slow float32 matmul. `einsum` below pins both directions to
"low-precision inputs, float32 accumulation, low-precision result".

The layers the models use are built on it: `DenseGeneral` (Flax's Dense /
DenseGeneral parameters), `Conv` (nn.Conv's parameters; 1x1 and patchify
windows as matmuls), `attention` (Flax's attention_fn signature), and
`add_bias`, whose bias gradient is summed in float32.
"""

from collections.abc import Callable, Sequence
import functools
import string
from typing import Any

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np


def einsum(subscripts: str, a: jax.Array, b: jax.Array, out_dtype: Any = None) -> jax.Array:
  """Two-operand einsum with float32 accumulation; the result in `out_dtype` (default a's).

  Every index of an operand must appear in the other operand or the output
  (true for matmuls and attention), so both gradients are einsums too.
  """
  return _einsum(subscripts, a, b, jnp.dtype(out_dtype or a.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def _einsum(subscripts, a, b, out_dtype):
  inputs, out = subscripts.split("->")
  sa, sb = inputs.split(",")
  return _f32_einsum(a, sa, b, sb, out).astype(out_dtype)


def _einsum_fwd(subscripts, a, b, out_dtype):
  return _einsum(subscripts, a, b, out_dtype), (a, b)


def _f32_einsum(x, sx: str, y, sy: str, out: str):
  """einsum(sx,sy->out) accumulating in float32, operands in the order XLA:CPU supports.

  XLA:CPU has no bf16 x bf16 -> f32 kernel for batched dots whose result
  would need the operands swapped (e.g. 'bqhd,bhqk->bkhd'), so the operand
  whose free indices come first in the output goes first.
  """
  def first_free(s, other):
    return min((out.index(c) for c in s if c in out and c not in other), default=len(out))

  if first_free(sy, sx) < first_free(sx, sy):
    x, sx, y, sy = y, sy, x, sx
  return jnp.einsum(f"{sx},{sy}->{out}", x, y, preferred_element_type=jnp.float32)


def _flat_weight_grad(g, out: str, x, sx: str, target: str):
  """A kernel's gradient, summed over the positions, as one 2-D matmul (None if not that form).

  For y = x . kernel with x's and y's leading axes the same positions
  (`sx`='bhwc', `out`='bhwd', `target`='cd'), the gradient is
  x[N, C]^T g[N, D] with N the flattened positions. Written on 4-D operands,
  XLA:CPU transposes x into a [C, N] copy before the dot and fuses the whole
  elementwise chain that produced x (a ResNet stage's residual stream) into
  that copy: in float32 those copies were 25% of a ResNet-50 step. On the
  2-D operands it runs the dot without them (float32 ResNet-50 step 1.34-1.39x
  faster on an AMD EPYC; in bfloat16 the 2-D form was 0.83-0.89x, so
  `_einsum_bwd` keeps it to float32).
  """
  k = 0
  while k < min(len(out), len(sx)) and out[k] == sx[k] and out[k] not in target:
    k += 1
  x_rest, g_rest = sx[k:], out[k:]
  if k == 0 or target != x_rest + g_rest:
    return None
  n = int(np.prod(x.shape[:k]))
  flat = jnp.einsum("na,nb->ab", x.reshape(n, -1), g.reshape(n, -1),
                    preferred_element_type=jnp.float32)
  return flat.reshape(x.shape[k:] + g.shape[k:])


def _einsum_bwd(subscripts, out_dtype, residuals, g):
  del out_dtype
  a, b = residuals
  inputs, out = subscripts.split("->")
  sa, sb = inputs.split(",")
  g = g.astype(a.dtype)
  ga = _f32_einsum(g, out, b, sb, sa)
  gb = None
  if a.dtype == jnp.float32 and b.dtype == jnp.float32:
    gb = _flat_weight_grad(g, out, a, sa, sb)
  if gb is None:
    gb = _f32_einsum(g, out, a, sa, sb)
  return ga.astype(a.dtype), gb.astype(b.dtype)


_einsum.defvjp(_einsum_fwd, _einsum_bwd)


@jax.custom_vjp
def add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
  """y + bias over y's trailing axes, in y's dtype, with the bias gradient summed in float32.

  JAX's own gradient of the broadcast sums the cotangent in its dtype: in
  bfloat16 it rounds after every add (the bias gradient of a ViT-B/16 batch
  sums ~1600 tokens) and XLA:CPU runs that reduction ~50x slower than a
  float32 sum (15% of a ViT-B/16 bf16 train step).
  """
  return y + bias.astype(y.dtype)


def _add_bias_fwd(y, bias):
  return add_bias(y, bias), bias


def _add_bias_bwd(bias, g):
  leading = tuple(range(g.ndim - bias.ndim))
  return g, jnp.sum(g, axis=leading, dtype=jnp.float32).astype(bias.dtype)


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


class DenseGeneral(nn.Module):
  """`nn.DenseGeneral` over trailing axes via `einsum` and `add_bias`.

  Same parameter names, shapes and initial values as Flax's `Dense`
  (int `features`, `axis=-1`) and `DenseGeneral`, so checkpoints and
  converters are shared; the matmul accumulates in float32 in every dtype.
  """

  features: int | Sequence[int]
  axis: int | Sequence[int] = -1
  use_bias: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Callable = nn.linear.default_kernel_init
  bias_init: Callable = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    axes = (self.axis,) if isinstance(self.axis, int) else tuple(self.axis)
    n_in = len(axes)
    if sorted(a % x.ndim for a in axes) != list(range(x.ndim - n_in, x.ndim)):
      raise ValueError(f"DenseGeneral contracts trailing axes only, got axis={self.axis} "
                       f"for an input of rank {x.ndim}.")
    in_shape = x.shape[x.ndim - n_in:]

    def kernel_init(rng, shape, dtype):  # Flax initialises the 2-D [in, out] matrix.
      flat = (int(np.prod(in_shape)), int(np.prod(features)))
      return self.kernel_init(rng, flat, dtype).reshape(shape)

    kernel = self.param("kernel", kernel_init, in_shape + features, self.param_dtype)
    letters = string.ascii_letters
    batch, contract, out = (letters[:x.ndim - n_in], letters[x.ndim - n_in:x.ndim],
                            letters[x.ndim:x.ndim + len(features)])
    y = einsum(f"{batch}{contract},{contract}{out}->{batch}{out}",
               x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      bias = self.param("bias", lambda rng, shape, dtype: self.bias_init(
          rng, (int(np.prod(shape)),), dtype).reshape(shape), features, self.param_dtype)
      y = add_bias(y, bias)
    return y


def attention(query, key, value, bias=None, mask=None, broadcast_dropout=True,
              dropout_rng=None, dropout_rate=0.0, deterministic=False, dtype=None,
              precision=None, module=None, **unused):
  """`flax.linen.dot_product_attention` with float32-accumulating matmuls.

  Softmax runs in float32. Signature follows what MultiHeadDotProductAttention
  passes to its `attention_fn`.
  """
  del precision, unused
  dtype = dtype or query.dtype
  query = query / jnp.sqrt(query.shape[-1]).astype(query.dtype)
  # float32 logits straight from the accumulator: no bfloat16 rounding, one pass fewer.
  logits = einsum("...qhd,...khd->...hqk", query, key.astype(query.dtype), jnp.float32)
  if bias is not None:
    logits = logits + bias
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1)
  if module is not None:  # Lets explanation code capture the attention maps.
    module.sow("intermediates", "attention_weights", weights)
  if not deterministic and dropout_rate > 0.0:
    keep = 1.0 - dropout_rate
    shape = weights.shape
    if broadcast_dropout:  # One mask for all examples and heads, as Flax does.
      shape = (1,) * (key.ndim - 2) + weights.shape[-2:]
    keep_mask = jax.random.bernoulli(dropout_rng, keep, shape)
    weights = jnp.where(keep_mask, weights / keep, 0.0)
  return einsum("...hqk,...khd->...qhd", weights.astype(dtype), value.astype(dtype))


class Conv(nn.Module):
  """`nn.Conv` (same parameters, names and init) that runs 1x1 and patchify convs as matmuls.

  XLA:CPU's convolution kernels are slow for windows that do not overlap,
  above all for the weight gradient: a 1x1 conv of ResNet-50's first stage
  measured 4-5x slower than the same contraction as a matmul
  (`python benchmarks/layers.py`). A 1x1 conv is a matmul over channels (after
  taking every stride-th pixel); a conv whose stride equals its window (ViT's
  patch embedding) is a matmul over patches. Those go through `einsum` above
  (float32 accumulation in every dtype); other windows use `lax` as nn.Conv does.

  `feature_group_count` > 1 is a grouped convolution (ResNeXt, RegNet) with
  nn.Conv's kernel shape [kh, kw, in / groups, out]. Between 1 and depthwise it
  runs as the kh*kw shifted windows against a per-group matmul (`_grouped_conv`):
  XLA:CPU's grouped-conv gradient is ~30x slower than that (groups=16 on
  [32, 24, 24, 128]: 6.8 s against 0.22 s), and a RegNetY-400MF train step
  18x slower (`python benchmarks/train_step.py --model=regnety_400mf --batch=32
  --image_size=96 --dtype=float32`: 18 s against 1.0 s). Depthwise convs (one
  channel per group) stay on `lax`, which is fast for them.
  """

  features: int
  kernel_size: Sequence[int]
  strides: Sequence[int] = (1, 1)
  padding: str | Sequence[tuple[int, int]] = "SAME"
  use_bias: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Callable = nn.linear.default_kernel_init
  bias_init: Callable = nn.initializers.zeros
  feature_group_count: int = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kh, kw = self.kernel_size
    groups = self.feature_group_count
    if x.shape[-1] % groups or self.features % groups:
      raise ValueError(f"Conv {self.name}: {x.shape[-1]} input and {self.features} output "
                       f"channels do not split into feature_group_count={groups} groups.")
    kernel = self.param("kernel", self.kernel_init,
                        (kh, kw, x.shape[-1] // groups, self.features), self.param_dtype)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    if groups == 1:
      y = _conv_as_matmul(x, kernel, tuple(self.strides), self.padding)
    elif groups < x.shape[-1]:
      y = _grouped_conv(x, kernel, tuple(self.strides), self.padding, groups)
    else:
      y = None
    if y is None:
      y = lax.conv_general_dilated(x, kernel, tuple(self.strides), self.padding,
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                   feature_group_count=groups)
    if self.use_bias:
      y = add_bias(y, self.param("bias", self.bias_init, (self.features,), self.param_dtype))
    return y


def _conv_as_matmul(x, kernel, strides, padding) -> jax.Array | None:
  """The conv as one einsum when its windows do not overlap and nothing is padded, else None."""
  kh, kw = kernel.shape[:2]
  sh, sw = strides
  unpadded = padding == "VALID" or (padding == "SAME" and (kh, kw) == (1, 1)) or (
      not isinstance(padding, str) and all(p == (0, 0) for p in map(tuple, padding)))
  if not unpadded:
    return None
  if (kh, kw) == (1, 1):
    return einsum("bhwc,cd->bhwd", x[:, ::sh, ::sw], kernel[0, 0])
  if (kh, kw) != (sh, sw):
    return None
  b, h, w, c = x.shape
  h, w = h // kh, w // kw  # VALID drops the rows and columns no full window covers.
  patches = x[:, :h * kh, :w * kw].reshape(b, h, kh, w, kw, c)
  return einsum("bhiwjc,ijcd->bhwd", patches, kernel)


def shifted_windows(x: jax.Array, window: Sequence[int], strides: Sequence[int],
                    padding: Any) -> list[jax.Array]:
  """The kh*kw strided views of padded NHWC `x` that a conv's taps see, row-major.

  Window (i, j) is what tap (i, j) of every output position multiplies; `padding`
  is 'SAME', 'VALID' or explicit ((top, bottom), (left, right)).
  """
  kh, kw = window
  sh, sw = strides
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(x.shape[1:3], (kh, kw), strides, padding)
  (pt, pb), (pl, pr) = map(tuple, padding)
  x = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  _, h, w, _ = x.shape
  ho, wo = (h - kh) // sh + 1, (w - kw) // sw + 1
  return [x[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw]
          for i in range(kh) for j in range(kw)]


def _grouped_conv(x, kernel, strides, padding, groups: int) -> jax.Array:
  """A grouped conv as its kh*kw shifted windows times a per-group kernel (one einsum).

  Costs kh*kw copies of the input, which the train step keeps for the
  gradient; in exchange both gradients are batched matmuls.
  """
  kh, kw, cg, out = kernel.shape
  windows = jnp.stack(shifted_windows(x, (kh, kw), strides, padding), axis=3)
  n, ho, wo = windows.shape[:3]
  windows = windows.reshape(n, ho, wo, kh * kw, groups, cg)
  kernel = kernel.reshape(kh * kw, cg, groups, out // groups)
  return einsum("nhwkgc,kcgo->nhwgo", windows, kernel).reshape(n, ho, wo, out)
