"""Low-precision matmuls that accumulate in float32, forward and backward.

On CPUs with AMX (and on GPUs) a bfloat16 x bfloat16 matmul is fast when it
accumulates into float32 (`preferred_element_type=float32`); with a bfloat16
result XLA:CPU falls back to a path slower than plain float32. Setting
preferred_element_type on the forward op is not enough: JAX's transpose rule
then multiplies a float32 cotangent by a bfloat16 operand, which also runs
as a slow float32 matmul. `einsum` below pins both directions to
"low-precision inputs, float32 accumulation, low-precision result".
"""

import functools
import string

import jax
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
