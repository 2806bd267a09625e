"""Stochastic depth (model.drop_path_rate) for ViT and ResNet."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vit_jax_ft import base_config
from vit_jax_ft import config_ranges
from vit_jax_ft import models
from vit_jax_ft.models import batch_norm
from vit_jax_ft.models import drop_path
from vit_jax_ft.models import resnet
from vit_jax_ft.models import vit
from vit_jax_ft.training import losses
from vit_jax_ft.training import steps


def _tiny_vit(**kw):
  kw = {"num_classes": 3, "patch_size": 8, "hidden_size": 16, "num_layers": 3, "num_heads": 2,
        "mlp_dim": 32, "head_init": "lecun_normal", **kw}
  return vit.VisionTransformer(**kw)


def _tiny_resnet(**kw):
  kw = {"num_classes": 3, "stage_sizes": (2, 1), "block": "basic", "width": 8,
        "head_init": "lecun_normal", **kw}
  return resnet.ResNet(**kw)


def _images(n=4, size=16, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(n, size, size, 3)), jnp.float32)


def _init(model, size=16):
  return model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False)


def _apply_train(model, variables, x, rng):
  """Training-mode logits (BatchNorm statistics updated and dropped)."""
  rngs = {"dropout": rng} if rng is not None else {}
  if "batch_stats" in variables:
    return model.apply(variables, x, train=True, rngs=rngs, mutable=["batch_stats"])[0]
  return model.apply(variables, x, train=True, rngs=rngs)


# ----------------------------------------------------------------------------
# The op.
# ----------------------------------------------------------------------------


def test_block_rates_are_timm_linspace():
  np.testing.assert_allclose(drop_path.block_rates(0.3, 4), [0.0, 0.1, 0.2, 0.3], atol=1e-12)
  assert drop_path.block_rates(0.2, 1) == [0.0]
  assert drop_path.block_rates(0.0, 3) == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_drop_path_mask_fraction_scale_and_expectation(p):
  n = 20000
  x = jnp.asarray(np.random.default_rng(1).normal(size=(n, 3, 2)), jnp.float32)
  y = np.asarray(drop_path.drop_path(x, p, jax.random.key(2)))
  dropped = np.all(y == 0, axis=(1, 2))
  # Binomial(n, p): 5 standard deviations.
  assert abs(dropped.mean() - p) < 5 * np.sqrt(p * (1 - p) / n)
  # Whole samples: each is either all zero or all scaled.
  kept = ~dropped
  np.testing.assert_array_equal(y[kept], np.asarray(x)[kept] * np.float32(1.0 / (1.0 - p)))

  # The mean over many draws is the input.
  small = jnp.asarray(np.random.default_rng(3).uniform(1, 2, size=(5, 4)), jnp.float32)
  draws = 8000
  keys = jax.random.split(jax.random.key(4), draws)
  mean = np.asarray(jax.vmap(lambda k: drop_path.drop_path(small, p, k))(keys)).mean(0)
  # Each entry's mean has standard deviation |x| sqrt(p / (1 - p) / draws).
  tol = 5 * 2.0 * np.sqrt(p / (1 - p) / draws)
  np.testing.assert_allclose(mean, small, atol=tol)


def test_drop_path_bfloat16_scales_in_float32():
  x = jnp.asarray(np.random.default_rng(5).normal(size=(512, 8)), jnp.bfloat16)
  p = 0.1
  y = drop_path.drop_path(x, p, jax.random.key(6))
  assert y.dtype == jnp.bfloat16
  kept = np.asarray(jnp.any(y != 0, axis=1))
  ref = (np.asarray(x, np.float32) * np.float32(1 / (1 - p))).astype(jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(y)[kept], ref[kept])


# ----------------------------------------------------------------------------
# The fused BatchNorm with a per-sample branch scale against the plain composition.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_fused_branch_scale_matches_scale_then_add_then_relu(dtype, tol):
  rng = np.random.default_rng(7)
  shape = (4, 5, 5, 6)
  x = jnp.asarray(rng.normal(0.5, 2.0, size=shape), dtype)
  shortcut = jnp.asarray(rng.normal(size=shape), dtype)
  weights = jnp.asarray(rng.normal(size=shape), jnp.float32)
  branch = jnp.asarray([0.0, 1.25, 0.0, 1.25], jnp.float32)
  kw = dict(use_running_average=False, momentum=0.8, epsilon=1e-3, dtype=dtype)
  plain, fused = nn.BatchNorm(**kw), batch_norm.BatchNorm(relu=True, **kw)
  variables = plain.init(jax.random.key(0), x)
  variables["params"] = {"scale": jnp.asarray(rng.normal(size=6), jnp.float32),
                         "bias": jnp.asarray(rng.normal(size=6), jnp.float32)}

  def run(f):
    def loss(params, x, shortcut):
      y, stats = f({"params": params, "batch_stats": variables["batch_stats"]}, x, shortcut)
      return jnp.sum(y.astype(jnp.float32) * weights), (y, stats)
    return jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(variables["params"], x, shortcut)

  def reference(v, x, s):
    y, stats = plain.apply(v, x, mutable=["batch_stats"])
    y = y.astype(jnp.float32) * branch[:, None, None, None] + s.astype(jnp.float32)
    return jax.nn.relu(y).astype(dtype), stats

  g_ref, (y_ref, st_ref) = run(reference)
  g, (y, st) = run(lambda v, x, s: fused.apply(v, x, s, branch, mutable=["batch_stats"]))
  assert y.dtype == dtype
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y_ref, np.float32),
                             rtol=tol, atol=tol)
  # Dropped samples are relu(shortcut) exactly; the statistics are those of x alone.
  np.testing.assert_array_equal(y[0], jax.nn.relu(shortcut[0]))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), st, st_ref)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    assert a.dtype == b.dtype
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               rtol=tol, atol=tol * 10)


# ----------------------------------------------------------------------------
# The models.
# ----------------------------------------------------------------------------


def _block_rates_built(model, block_types):
  """drop_path_rate of every block the model builds, in call order (traced, not run)."""
  rates = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, block_types) and context.method_name == "__call__":
      rates.append(context.module.drop_path_rate)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(lambda: _init(model))
  return rates


def test_built_blocks_ramp_linearly():
  rate = 0.3
  m = _tiny_vit(num_layers=4, drop_path_rate=rate)
  got = _block_rates_built(m, (vit.Encoder1DBlock,))
  np.testing.assert_allclose(got, [0.0, 0.1, 0.2, 0.3], atol=1e-12)
  # ResNet: one ramp over all blocks of all stages (2 + 1 + 2 blocks).
  m = _tiny_resnet(stage_sizes=(2, 1, 2), drop_path_rate=rate)
  got = _block_rates_built(m, (resnet.BasicBlock, resnet.BottleneckBlock))
  np.testing.assert_allclose(got, [0.0, 0.075, 0.15, 0.225, 0.3], atol=1e-12)


@pytest.mark.parametrize("make", [_tiny_vit, _tiny_resnet])
def test_no_new_parameters_and_eval_ignores_rate(make):
  base, dropping = make(), make(drop_path_rate=0.5)
  variables = _init(base)
  other = _init(dropping)
  assert jax.tree.structure(other) == jax.tree.structure(variables)
  jax.tree.map(np.testing.assert_array_equal, other, variables)
  x = _images()
  np.testing.assert_array_equal(dropping.apply(variables, x, train=False),
                                base.apply(variables, x, train=False))


@pytest.mark.parametrize("make", [_tiny_vit, _tiny_resnet])
def test_train_rngs_change_outputs_only_with_a_rate(make):
  variables, x = _init(make()), _images()
  # Rate 0 draws nothing: no 'dropout' stream is needed (the ViT's dropout is 0 too).
  zero = _apply_train(make(), variables, x, None)
  dropping = make(drop_path_rate=0.6)
  a = _apply_train(dropping, variables, x, jax.random.key(1))
  b = _apply_train(dropping, variables, x, jax.random.key(2))
  assert not np.allclose(a, b, atol=1e-4)
  np.testing.assert_array_equal(a, _apply_train(dropping, variables, x, jax.random.key(1)))
  assert not np.allclose(a, zero, atol=1e-4)


def test_vit_block_drops_and_scales_each_branch(monkeypatch):
  """Fixed masks [0, 2]: sample 0 passes the block unchanged; sample 1 sees both branches doubled.

  Doubling a branch equals doubling the kernel and bias of its last (linear) layer.
  """
  monkeypatch.setattr(drop_path, "sample_scale",
                      lambda rng, n, rate: jnp.asarray([0.0, 2.0], jnp.float32))
  kw = dict(num_heads=2, mlp_dim=32, gelu_approximate=True, layer_norm_eps=1e-6,
            dropout_rate=0.0, attention_dropout_rate=0.0, dtype=jnp.float32)
  x = jnp.asarray(np.random.default_rng(8).normal(size=(2, 5, 16)), jnp.float32)
  block = vit.Encoder1DBlock(drop_path_rate=0.3, **kw)
  params = vit.Encoder1DBlock(**kw).init(jax.random.key(0), x, False)["params"]
  params = jax.tree.map(lambda p: p + 0.1, params)  # Non-zero biases.
  out = block.apply({"params": params}, x, True, rngs={"dropout": jax.random.key(1)})
  np.testing.assert_array_equal(out[0], x[0])

  doubled = jax.tree.map(lambda p: p, params)
  for path in (("MultiHeadDotProductAttention_1", "out"), ("MlpBlock_3", "Dense_1")):
    layer = doubled[path[0]][path[1]]
    doubled[path[0]][path[1]] = {k: 2.0 * v for k, v in layer.items()}
  ref = vit.Encoder1DBlock(**kw).apply({"params": doubled}, x, False)
  np.testing.assert_allclose(out[1], ref[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block", ["basic", "bottleneck"])
def test_resnet_block_drops_and_scales_the_branch(monkeypatch, block):
  """Fixed masks [0, 2]: sample 0 is relu(x); sample 1 is the block with its last BN doubled."""
  monkeypatch.setattr(drop_path, "sample_scale",
                      lambda rng, n, rate: jnp.asarray([0.0, 2.0], jnp.float32))
  cls = resnet.BasicBlock if block == "basic" else resnet.BottleneckBlock
  features = 8 if block == "basic" else 2  # Input channels = output channels: no projection.
  norm = functools.partial(batch_norm.BatchNorm, use_running_average=False)
  x = jnp.asarray(np.random.default_rng(9).normal(size=(2, 6, 6, 8)), jnp.float32)
  plain = cls(features=features, norm=norm)
  variables = plain.init(jax.random.key(0), x, True)
  params = jax.tree.map(lambda p: p + 0.1, variables["params"])
  state = {"batch_stats": variables["batch_stats"]}
  out, _ = cls(features=features, norm=norm, drop_path_rate=0.3).apply(
      {"params": params, **state}, x, True, rngs={"dropout": jax.random.key(1)},
      mutable=["batch_stats"])
  np.testing.assert_array_equal(out[0], jax.nn.relu(x[0]))
  last = "bn2" if block == "basic" else "bn3"
  doubled = dict(params, **{last: {k: 2.0 * v for k, v in params[last].items()}})
  ref, _ = plain.apply({"params": doubled, **state}, x, True, mutable=["batch_stats"])
  np.testing.assert_allclose(out[1], ref[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [_tiny_vit, _tiny_resnet])
def test_remat_draws_the_same_masks(make):
  rate, x, rng = 0.5, _images(), jax.random.key(3)
  variables = _init(make())

  def loss_and_grads(model):
    def f(params):
      out = _apply_train(model, dict(variables, params=params), x, rng)
      return jnp.sum(out * jnp.arange(1.0, 4.0)), out
    return jax.jit(jax.value_and_grad(f, has_aux=True))(variables["params"])

  (_, o1), g1 = loss_and_grads(make(drop_path_rate=rate))
  (_, o2), g2 = loss_and_grads(make(drop_path_rate=rate, remat=True))
  np.testing.assert_allclose(o1, o2, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------
# Config and training.
# ----------------------------------------------------------------------------


def test_config_field_range_and_create_model():
  for cfg in (base_config.vit_model_config("vit_ti16"),
              base_config.resnet_model_config("resnet18")):
    assert cfg.drop_path_rate == 0.0
    cfg.drop_path_rate = 0.2
    assert models.create_model(cfg, 3, jnp.float32).drop_path_rate == 0.2
  config = base_config.get_base_config()
  config.total_steps = 10
  config_ranges.check_ranges(config)
  for bad in (1.0, -0.1):
    config.model.drop_path_rate = bad
    with pytest.raises(ValueError, match="model.drop_path_rate"):
      config_ranges.check_ranges(config)


@pytest.mark.parametrize("make", [_tiny_vit, _tiny_resnet])
def test_short_bfloat16_remat_training_is_finite(make):
  model = make(drop_path_rate=0.5, remat=True, dtype=jnp.bfloat16)
  tx = optax.adam(1e-3)
  loss_fn = losses.get_loss_fn(base_config.get_base_config().loss)
  step = jax.jit(functools.partial(steps.train_step, model=model, tx=tx, loss_fn=loss_fn))
  state = steps.create_train_state(model, tx, 16, seed=0)
  labels = np.arange(4) % 3
  batch = {"image": _images(), "targets": jax.nn.one_hot(labels, 3)}
  losses_seen = []
  for _ in range(3):
    state, m = step(state, batch)
    losses_seen.append(float(m["loss"]))
  assert np.all(np.isfinite(losses_seen)), losses_seen
  assert all(np.all(np.isfinite(p)) for p in jax.tree.leaves(state.params))
