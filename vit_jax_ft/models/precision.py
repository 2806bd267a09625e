"""Low-precision matmuls that accumulate in float32, forward and backward.

On CPUs with AMX (and on GPUs) a bfloat16 x bfloat16 matmul is fast when it
accumulates into float32 (`preferred_element_type=float32`); with a bfloat16
result XLA:CPU falls back to a path slower than plain float32. Setting
preferred_element_type on the forward op is not enough: JAX's transpose rule
then multiplies a float32 cotangent by a bfloat16 operand, which also runs
as a slow float32 matmul. `einsum` below pins both directions to
"low-precision inputs, float32 accumulation, low-precision result".
"""

from collections.abc import Callable, Sequence
import functools
import string
from typing import Any

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def einsum(subscripts: str, a: jax.Array, b: jax.Array) -> jax.Array:
  """Two-operand einsum in a's dtype with float32 accumulation.

  Every index of an operand must appear in the other operand or the output
  (true for matmuls and attention), so both gradients are einsums too.
  """
  inputs, out = subscripts.split("->")
  sa, sb = inputs.split(",")
  return _f32_einsum(a, sa, b, sb, out).astype(a.dtype)


def _einsum_fwd(subscripts, a, b):
  return einsum(subscripts, a, b), (a, b)


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


def _einsum_bwd(subscripts, residuals, g):
  a, b = residuals
  inputs, out = subscripts.split("->")
  sa, sb = inputs.split(",")
  g = g.astype(a.dtype)
  ga = _f32_einsum(g, out, b, sb, sa)
  gb = _f32_einsum(g, out, a, sa, sb)
  return ga.astype(a.dtype), gb.astype(b.dtype)


einsum.defvjp(_einsum_fwd, _einsum_bwd)


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                **unused):
  """Drop-in for `lax.dot_general` (as Flax's Dense/DenseGeneral call it) via `einsum`."""
  del precision, preferred_element_type, unused
  rhs = rhs.astype(lhs.dtype)
  (lc, rc), (lb, rb) = dimension_numbers
  letters = iter(string.ascii_letters)
  sa = [next(letters) for _ in range(lhs.ndim)]
  sb = [next(letters) for _ in range(rhs.ndim)]
  for i, j in zip(list(lc) + list(lb), list(rc) + list(rb)):
    sb[j] = sa[i]
  batch = [sa[i] for i in lb]
  free_a = [s for i, s in enumerate(sa) if i not in lc and i not in lb]
  free_b = [s for j, s in enumerate(sb) if j not in rc and j not in rb]
  spec = f"{''.join(sa)},{''.join(sb)}->{''.join(batch + free_a + free_b)}"
  return einsum(spec, lhs, rhs)


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
  logits = einsum("...qhd,...khd->...hqk", query, key.astype(query.dtype))
  logits = logits.astype(jnp.float32)
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
  (`python benchmarks/conv.py`). A 1x1 conv is a matmul over channels (after
  taking every stride-th pixel); a conv whose stride equals its window (ViT's
  patch embedding) is a matmul over patches. Those go through `einsum` above
  (float32 accumulation in every dtype); other windows use `lax` as nn.Conv does.
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

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kh, kw = self.kernel_size
    kernel = self.param("kernel", self.kernel_init, (kh, kw, x.shape[-1], self.features),
                        self.param_dtype)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    y = _conv_as_matmul(x, kernel, tuple(self.strides), self.padding)
    if y is None:
      y = lax.conv_general_dilated(x, kernel, tuple(self.strides), self.padding,
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if self.use_bias:
      bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
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
