"""The depthwise conv's two paths (shifted windows on CPU, lax's grouped conv) against numpy."""

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax_ft.models import depthwise


def _numpy_depthwise(x, kernel, strides, pads):
  """Direct loops: out[n, i, j, c] = sum_ab xpad[n, i*s+a, j*s+b, c] * k[a, b, 0, c]."""
  (pt, pb), (pl, pr) = pads
  xp = np.pad(x.astype(np.float64), ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  kh, kw = kernel.shape[:2]
  ho = (xp.shape[1] - kh) // strides[0] + 1
  wo = (xp.shape[2] - kw) // strides[1] + 1
  out = np.zeros((x.shape[0], ho, wo, x.shape[3]))
  for i in range(ho):
    for j in range(wo):
      win = xp[:, i * strides[0]:i * strides[0] + kh, j * strides[1]:j * strides[1] + kw]
      out[:, i, j] = np.einsum("nabc,abc->nc", win, kernel[:, :, 0].astype(np.float64))
  return out


CASES = [((3, 3), (1, 1), ((1, 1), (1, 1)), 8),   # EfficientNet 3x3
         ((3, 3), (2, 2), "SAME", 8),              # TF-style, asymmetric at stride 2 on even sizes
         ((5, 5), (2, 2), ((2, 2), (2, 2)), 9),    # torch-style 5x5 stride 2 on an odd size
         ((7, 7), (1, 1), ((3, 3), (3, 3)), 8),    # ConvNeXt
         ((3, 3), (1, 1), "VALID", 7)]


@pytest.mark.parametrize("kernel_size,strides,padding,size", CASES)
def test_shifted_depthwise_matches_numpy_and_lax(kernel_size, strides, padding, size):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, size, size, 5)).astype(np.float32)
  k = rng.normal(size=kernel_size + (1, 5)).astype(np.float32)
  pads = (lax.padtype_to_pads(x.shape[1:3], kernel_size, strides, padding)
          if isinstance(padding, str) else padding)
  want = _numpy_depthwise(x, k, strides, pads)
  got = depthwise.shifted_depthwise(jnp.asarray(x), jnp.asarray(k), strides, padding)
  assert got.shape == want.shape and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)

  # Gradients of both inputs equal lax's (an independent implementation).
  def loss(fn, x, k):
    return jnp.sum(jnp.sin(fn(x, k)))
  shifted = lambda x, k: depthwise.shifted_depthwise(x, k, strides, padding)
  plain = lambda x, k: lax.conv_general_dilated(
      x, k, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=5, precision=lax.Precision.HIGHEST)
  g_shift = jax.grad(lambda x, k: loss(shifted, x, k), argnums=(0, 1))(x, k)
  g_lax = jax.grad(lambda x, k: loss(plain, x, k), argnums=(0, 1))(x, k)
  for a, b in zip(g_shift, g_lax):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_module_paths_share_parameters_and_agree(dtype):
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 10, 10, 6)).astype(dtype)
  make = lambda impl: depthwise.DepthwiseConv((3, 3), (2, 2), ((1, 1), (1, 1)), dtype=dtype,
                                              impl=impl)
  params = make("project").init(jax.random.PRNGKey(0), x)
  # A nonzero bias, so that both paths must add it.
  params = jax.tree_util.tree_map(lambda p: p + 0.1, params)
  flax_params = make("flax").init(jax.random.PRNGKey(0), x)
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(flax_params)
  a = make("project").apply(params, x)
  b = make("flax").apply(params, x)
  assert a.dtype == b.dtype == dtype
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol,
                             atol=tol)
  # Both equal numpy on the operands as rounded to `dtype`.
  xr = np.asarray(x.astype(jnp.float32))
  kr = np.asarray(params["params"]["kernel"].astype(dtype).astype(jnp.float32))
  want = _numpy_depthwise(xr, kr, (2, 2), ((1, 1), (1, 1))) + np.asarray(params["params"]["bias"])
  np.testing.assert_allclose(np.asarray(a, np.float32), want, rtol=tol, atol=tol)


def test_unknown_impl_is_an_error_naming_it():
  x = jnp.zeros((1, 4, 4, 2))
  with pytest.raises(ValueError, match="impl must be 'project' or 'flax', got 'cudnn'"):
    depthwise.DepthwiseConv((3, 3), impl="cudnn").init(jax.random.PRNGKey(0), x)
