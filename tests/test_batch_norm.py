"""models.batch_norm.BatchNorm against Flax's nn.BatchNorm differentiated by JAX."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax_ft.models import batch_norm


def _apply(module, variables, x, train):
  return module.apply(variables, x, mutable=["batch_stats"] if train else False)


def _setup(dtype, shape=(4, 6, 5, 8), momentum=0.8, epsilon=1e-3):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(1.5, 2.0, size=shape), dtype)
  kw = dict(momentum=momentum, epsilon=epsilon, dtype=dtype, param_dtype=jnp.float32)
  ref = nn.BatchNorm(use_running_average=False, **kw)
  ours = batch_norm.BatchNorm(use_running_average=False, **kw)
  variables = ref.init(jax.random.key(0), x)
  assert jax.tree.map(np.shape, variables) == jax.tree.map(
      np.shape, ours.init(jax.random.key(0), x))
  # Non-trivial parameters and running statistics, so every term is exercised.
  c = shape[-1]
  variables = {"params": {"scale": jnp.asarray(rng.normal(size=c), jnp.float32),
                          "bias": jnp.asarray(rng.normal(size=c), jnp.float32)},
               "batch_stats": {"mean": jnp.asarray(rng.normal(size=c), jnp.float32),
                               "var": jnp.asarray(rng.uniform(0.5, 2, size=c), jnp.float32)}}
  return x, ref, ours, variables, kw


def test_init_matches_flax():
  x, ref, ours, _, _ = _setup(jnp.float32)
  jax.tree.map(np.testing.assert_array_equal, ref.init(jax.random.key(1), x),
               ours.init(jax.random.key(1), x))


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 2e-2)])
def test_training_output_stats_and_gradients_match_flax(dtype, tol):
  x, ref, ours, variables, _ = _setup(dtype)
  (y_ref, st_ref), (y, st) = _apply(ref, variables, x, True), _apply(ours, variables, x, True)
  assert y.dtype == y_ref.dtype == dtype
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y_ref, np.float32),
                             rtol=tol, atol=tol)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), st, st_ref)
  # The running mean moved by (1 - momentum) towards the batch mean (float32 stats).
  batch_mean = np.asarray(x, np.float64).mean(axis=(0, 1, 2))
  np.testing.assert_allclose(
      st["batch_stats"]["mean"],
      0.8 * variables["batch_stats"]["mean"] + 0.2 * batch_mean, rtol=1e-5, atol=1e-5)

  weights = jnp.asarray(np.random.default_rng(1).normal(size=x.shape), jnp.float32)

  def loss(module):
    def f(params, x):
      y, _ = _apply(module, {"params": params, "batch_stats": variables["batch_stats"]}, x, True)
      return jnp.sum(jax.nn.relu(y.astype(jnp.float32)) * weights)
    return jax.grad(f, argnums=(0, 1))(variables["params"], x)

  (gp_ref, gx_ref), (gp, gx) = loss(ref), loss(ours)
  for k in ("scale", "bias"):
    np.testing.assert_allclose(gp[k], gp_ref[k], rtol=tol, atol=tol * 10)
  assert gx.dtype == dtype
  np.testing.assert_allclose(np.asarray(gx, np.float32), np.asarray(gx_ref, np.float32),
                             rtol=tol, atol=tol)


def test_input_gradient_against_finite_differences():
  """An independent check of the hand-written backward pass, in float64 terms."""
  x, _, ours, variables, _ = _setup(jnp.float32, shape=(3, 2, 2, 3))
  weights = jnp.asarray(np.random.default_rng(2).normal(size=x.shape), jnp.float32)
  f = lambda x: jnp.sum(_apply(ours, variables, x, True)[0] * weights)
  gx = np.asarray(jax.grad(f)(x))
  eps = 1e-2
  for index in [(0, 0, 0, 0), (1, 1, 0, 2), (2, 0, 1, 1)]:
    delta = jnp.zeros_like(x).at[index].set(eps)
    numeric = (float(f(x + delta)) - float(f(x - delta))) / (2 * eps)
    np.testing.assert_allclose(gx[index], numeric, rtol=2e-2, atol=2e-3)


def test_eval_uses_running_statistics_and_leaves_them():
  x, _, _, variables, kw = _setup(jnp.float32)
  ref = nn.BatchNorm(use_running_average=True, **kw)
  ours = batch_norm.BatchNorm(use_running_average=True, **kw)
  np.testing.assert_allclose(_apply(ours, variables, x, False), _apply(ref, variables, x, False),
                             rtol=1e-5, atol=1e-5)
  y, state = ours.apply(variables, x, mutable=["batch_stats"])
  jax.tree.map(np.testing.assert_array_equal, state["batch_stats"], variables["batch_stats"])
  del y


def test_fused_relu_matches_relu_after_batch_norm():
  x, _, _, variables, kw = _setup(jnp.float32)
  for train in (True, False):
    plain = batch_norm.BatchNorm(use_running_average=not train, **kw)
    fused = batch_norm.BatchNorm(use_running_average=not train, relu=True, **kw)
    weights = jnp.asarray(np.random.default_rng(3).normal(size=x.shape), jnp.float32)

    def loss(module, act):
      def f(params, x):
        out = _apply(module, {"params": params, "batch_stats": variables["batch_stats"]}, x, train)
        y = out[0] if train else out
        return jnp.sum(act(y) * weights), y
      return jax.grad(f, argnums=(0, 1), has_aux=True)(variables["params"], x)

    (g_ref, y_ref), (g, y) = loss(plain, jax.nn.relu), loss(fused, lambda y: y)
    np.testing.assert_allclose(y, jax.nn.relu(y_ref), rtol=1e-6, atol=1e-6)
    assert float(jnp.mean(y == 0)) > 0.2  # The ReLU did clip.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), g, g_ref)


def test_fused_shortcut_matches_add_then_relu():
  x, _, _, variables, kw = _setup(jnp.float32)
  shortcut = jnp.asarray(np.random.default_rng(4).normal(size=x.shape), jnp.float32)
  weights = jnp.asarray(np.random.default_rng(5).normal(size=x.shape), jnp.float32)
  plain = batch_norm.BatchNorm(use_running_average=False, **kw)
  fused = batch_norm.BatchNorm(use_running_average=False, relu=True, **kw)

  def grads(f):
    def loss(params, x, shortcut):
      y = f({"params": params, "batch_stats": variables["batch_stats"]}, x, shortcut)
      return jnp.sum(y * weights), y
    return jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(variables["params"], x, shortcut)

  g_ref, y_ref = grads(lambda v, x, s: jax.nn.relu(_apply(plain, v, x, True)[0] + s))
  g, y = grads(lambda v, x, s: fused.apply(v, x, s, mutable=["batch_stats"])[0])
  np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
  assert 0.2 < float(jnp.mean(y == 0)) < 0.8
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), g, g_ref)


def test_gradients_keep_each_input_dtype():
  x = jnp.asarray(np.random.default_rng(6).normal(size=(2, 3, 3, 4)), jnp.bfloat16)
  shortcut = jnp.ones(x.shape, jnp.float32)
  f = lambda x, s: jnp.sum(batch_norm.batch_norm_train(
      x, jnp.ones(4), jnp.zeros(4), s, 1e-5, True)[0].astype(jnp.float32))
  gx, gs = jax.jit(jax.grad(f, argnums=(0, 1)))(x, shortcut)
  assert (gx.dtype, gs.dtype) == (jnp.bfloat16, jnp.float32)
