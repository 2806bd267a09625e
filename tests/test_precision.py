"""float32-accumulating low-precision matmuls: values and gradients against float32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax_ft.models import precision

SPECS = [
    ("bld,dk->blk", (2, 5, 16), (16, 8)),
    ("bld,dhk->blhk", (2, 5, 16), (16, 2, 4)),
    ("blhk,hkd->bld", (2, 5, 2, 4), (2, 4, 16)),
    ("bqhd,bkhd->bhqk", (2, 5, 2, 4), (2, 7, 2, 4)),
    ("bhqk,bkhd->bqhd", (2, 2, 5, 7), (2, 7, 2, 4)),
]


@pytest.mark.parametrize("spec,sa,sb", SPECS)
def test_einsum_and_grads_match_float32(spec, sa, sb):
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=sa).astype(np.float32), rng.normal(size=sb).astype(np.float32)
  # Round the inputs to bfloat16 first so only accumulation/output rounding differs.
  a16, b16 = jnp.asarray(a, jnp.bfloat16), jnp.asarray(b, jnp.bfloat16)
  a32, b32 = a16.astype(jnp.float32), b16.astype(jnp.float32)
  w = jnp.asarray(rng.normal(size=jnp.einsum(spec, a32, b32).shape), jnp.float32)

  def loss16(x, y):
    return jnp.sum(precision.einsum(spec, x, y).astype(jnp.float32) * w)

  def loss32(x, y):
    return jnp.sum(jnp.einsum(spec, x, y) * w)

  out = jax.jit(precision.einsum, static_argnums=0)(spec, a16, b16)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.astype(np.float32), jnp.einsum(spec, a32, b32),
                             rtol=2e-2, atol=2e-2)
  g16 = jax.jit(jax.grad(loss16, argnums=(0, 1)))(a16, b16)
  g32 = jax.grad(loss32, argnums=(0, 1))(a32, b32)
  for got, want in zip(g16, g32):
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(got.astype(np.float32), want, rtol=3e-2, atol=5e-2)


def test_einsum_float32_result_is_not_rounded():
  rng = np.random.default_rng(1)
  a = jnp.asarray(rng.normal(size=(3, 64)), jnp.bfloat16)
  b = jnp.asarray(rng.normal(size=(64, 5)), jnp.bfloat16)
  want = np.asarray(a, np.float64) @ np.asarray(b, np.float64)
  out = precision.einsum("ij,jk->ik", a, b, jnp.float32)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  rounded = precision.einsum("ij,jk->ik", a, b).astype(np.float32)
  assert np.max(np.abs(rounded - want)) > 10 * np.max(np.abs(out - want))
  # The gradients are those of the bfloat16-result einsum.
  grad = lambda *dt: jax.grad(lambda x: jnp.sum(precision.einsum(
      "ij,jk->ik", x, b, *dt).astype(jnp.float32) ** 2))(a)
  np.testing.assert_allclose(grad(jnp.float32).astype(np.float32),
                             grad().astype(np.float32), rtol=3e-2, atol=0.5)


@pytest.mark.parametrize("features,axis,x_shape", [
    (5, -1, (2, 3, 6)),                 # Dense
    ((2, 3), -1, (2, 3, 6)),            # attention query/key/value
    (6, (-2, -1), (2, 3, 2, 3)),        # attention output
])
def test_dense_general_matches_flax(features, axis, x_shape):
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  x = jnp.asarray(np.random.default_rng(4).normal(size=x_shape), jnp.float32)
  kw = dict(features=features, axis=axis, bias_init=nn.initializers.normal(0.5))
  ours = precision.DenseGeneral(**kw)
  ref = nn.Dense(features, bias_init=kw["bias_init"]) if isinstance(features, int) and axis == -1 \
      else nn.DenseGeneral(**kw)
  params = ours.init(jax.random.PRNGKey(0), x)
  jax.tree.map(np.testing.assert_array_equal, params, ref.init(jax.random.PRNGKey(0), x))
  np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x), rtol=1e-5, atol=1e-5)
  loss = lambda m, p: jnp.sum(jnp.sin(m.apply(p, x)))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               jax.grad(loss, argnums=1)(ours, params), jax.grad(loss, argnums=1)(ref, params))


def test_bias_gradient_is_summed_in_float32():
  # 4096 bf16 cotangents just above 1: partial sums in bf16 (8 significant
  # bits) lose the small parts; the float32 sum keeps them.
  g = jnp.asarray(1.0 + np.random.default_rng(5).uniform(0, 0.01, (4096, 1)), jnp.bfloat16)
  bias = jnp.zeros((1,), jnp.float32)
  y = jnp.zeros((4096, 1), jnp.bfloat16)
  _, vjp = jax.vjp(precision.add_bias, y, bias)
  gy, gb = vjp(g)
  assert gy.dtype == jnp.bfloat16 and gb.dtype == jnp.float32
  want = np.sum(np.asarray(g, np.float64))
  np.testing.assert_allclose(gb[0], want, rtol=1e-6)
  # What plain broadcasting gives: the gradient summed in bfloat16, far off.
  _, plain_vjp = jax.vjp(lambda y, b: y + b.astype(y.dtype), y, bias)
  assert abs(float(plain_vjp(g)[1][0]) - want) > 1e-3 * want


def test_attention_matches_flax_in_float32():
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(2)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 5, 2, 4)), jnp.float32) for _ in range(3))
  np.testing.assert_allclose(precision.attention(q, k, v, deterministic=True),
                             nn.dot_product_attention(q, k, v), rtol=1e-5, atol=1e-6)


CONV_CASES = [  # (input side, kernel, strides, padding): matmul paths and fallbacks.
    (8, (1, 1), (1, 1), "SAME"),
    (7, (1, 1), (2, 2), "SAME"),                 # ResNet v1.5 projection, odd side
    (8, (1, 1), (2, 2), ((0, 0), (0, 0))),
    (35, (16, 16), (16, 16), "VALID"),           # ViT patch embedding, ragged edge cropped
    (8, (3, 3), (2, 2), ((1, 1), (1, 1))),       # falls back to lax
    (9, (1, 1), (1, 1), ((1, 1), (1, 1))),       # padded 1x1: falls back
]


@pytest.mark.parametrize("side,kernel,strides,padding", CONV_CASES)
def test_conv_matches_flax_conv(side, kernel, strides, padding):
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  x = jnp.asarray(np.random.default_rng(3).normal(size=(2, side, side, 3)), jnp.float32)
  kw = dict(features=4, kernel_size=kernel, strides=strides, padding=padding)
  ours, ref = precision.Conv(**kw), nn.Conv(**kw)
  params = ours.init(jax.random.PRNGKey(0), x)
  # Same names, shapes and initial values: converted checkpoints load into either.
  jax.tree.map(np.testing.assert_array_equal, params, ref.init(jax.random.PRNGKey(0), x))
  params = jax.tree.map(lambda p: p + 0.1, params)  # A non-zero bias.

  def loss(model, p, x):
    return jnp.sum(jnp.sin(model.apply(p, x)))

  np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x), rtol=1e-5, atol=1e-5)
  uses_lax_conv = "conv_general_dilated" in str(jax.make_jaxpr(ours.apply)(params, x))
  assert uses_lax_conv == (kernel == (3, 3) or padding == ((1, 1), (1, 1)))
  got = jax.grad(loss, argnums=(1, 2))(ours, params, x)
  want = jax.grad(loss, argnums=(1, 2))(ref, params, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), got, want)
  # bfloat16 compute: float32 parameters, bf16 output close to the float32 one.
  y16 = precision.Conv(**kw, dtype=jnp.bfloat16).apply(params, x)
  assert y16.dtype == jnp.bfloat16 and params["params"]["kernel"].dtype == jnp.float32
  np.testing.assert_allclose(y16.astype(np.float32), ref.apply(params, x), rtol=3e-2, atol=3e-2)


FLAT_SPECS = [  # (spec, a's shape, b's shape, whether b's gradient takes the 2-D form)
    ("bhwc,cd->bhwd", (2, 5, 5, 7), (7, 3), True),          # 1x1 conv
    ("bhwpqc,pqcd->bhwd", (2, 3, 3, 2, 2, 3), (2, 2, 3, 6), True),  # patchify
    ("btc,chd->bthd", (2, 6, 8), (8, 2, 4), True),          # query/key/value
    ("bthd,hdc->btc", (2, 6, 2, 4), (2, 4, 8), True),       # attention output
    ("bc,cd->bd", (3, 4), (4, 5), True),                    # the head
    ("bqhd,bkhd->bhqk", (2, 5, 2, 4), (2, 7, 2, 4), False),  # attention logits
    ("bhqk,bkhd->bqhd", (2, 2, 5, 7), (2, 7, 2, 4), False),
]


@pytest.mark.parametrize("spec,sa,sb,flat", FLAT_SPECS)
def test_float32_weight_gradients_as_one_flat_matmul(spec, sa, sb, flat):
  """In float32 a kernel's gradient over the positions is one 2-D matmul (no transposing copy
  on XLA:CPU); both gradients still match jnp.einsum's at HIGHEST precision."""
  rng = np.random.default_rng(1)
  a, b = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in (sa, sb))
  inputs, out = spec.split("->")
  s_a, s_b = inputs.split(",")
  w = jnp.asarray(rng.normal(size=jnp.einsum(spec, a, b).shape), jnp.float32)
  direct = precision._flat_weight_grad(w, out, a, s_a, s_b)
  assert (direct is not None) == flat
  reference = jax.grad(lambda x, y: jnp.sum(jnp.einsum(spec, x, y, precision="highest") * w),
                       argnums=(0, 1))(a, b)
  if flat:
    np.testing.assert_allclose(direct, reference[1], rtol=1e-5, atol=1e-5)
  got = jax.jit(jax.grad(lambda x, y: jnp.sum(precision.einsum(spec, x, y) * w),
                         argnums=(0, 1)))(a, b)
  for g, want in zip(got, reference):
    assert g.dtype == jnp.float32 and g.shape == want.shape
    np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-5)
