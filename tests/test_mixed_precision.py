"""float16 dynamic loss scaling and bfloat16 compute."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vit_jax_ft import base_config
from vit_jax_ft import models
from vit_jax_ft.training import losses
from vit_jax_ft.training import steps


def tiny_vit(dtype):
  cfg = base_config.vit_model_config("vit")
  cfg.patch_size, cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.mlp_dim = 8, 32, 2, 2, 64
  cfg.head_init = "lecun_normal"  # Non-zero head so every layer gets gradient at step 0.
  return models.create_model(cfg, 4, dtype)


def batch(n=8, seed=0):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 4, n)
  images = rng.normal(size=(n, 32, 32, 3)).astype(np.float32) + labels[:, None, None, None]
  return {"image": jnp.asarray(images), "targets": jax.nn.one_hot(labels, 4)}


def run(dtype, *, scaling, init_scale, loss_multiplier=1.0, num_steps=12, lr=1e-3):
  model = tiny_vit(dtype)
  ce = losses.get_loss_fn(base_config.get_base_config().loss)
  loss_fn = lambda logits, targets: loss_multiplier * ce(logits, targets)
  tx = optax.adam(lr)
  step = jax.jit(functools.partial(steps.train_step, model=model, tx=tx, loss_fn=loss_fn,
                                   scaling=scaling))
  state = steps.create_train_state(model, tx, 32, seed=0, init_loss_scale=init_scale)
  history = []
  for _ in range(num_steps):
    state, m = step(state, batch())
    history.append(jax.device_get(m))
  return state, history


def test_loss_scale_update_rule_by_hand():
  scaling = steps.LossScaling(enabled=True, period=2)
  state = steps.TrainState(step=0, params={}, batch_stats={}, opt_state=(), rng=None,
                           loss_scale=jnp.float32(8.0), good_steps=jnp.int32(0),
                           lr_scale=jnp.float32(1.0), lr_scale_step=jnp.int32(0))
  expected = [(True, 8.0, 1), (True, 16.0, 0), (False, 8.0, 0), (True, 8.0, 1),
              (False, 4.0, 0), (False, 2.0, 0), (False, 1.0, 0), (False, 1.0, 0)]
  for finite, want_scale, want_good in expected:
    scale, good = scaling.update(state, jnp.asarray(finite))
    assert (float(scale), int(good)) == (want_scale, want_good)
    state = state.replace(loss_scale=scale, good_steps=good)


def test_fixed_huge_scale_overflows_but_dynamic_scaling_trains_finitely():
  # A fixed scale of 2**40 overflows float16 activations' gradients: the
  # update becomes NaN and poisons the parameters for good.
  fixed, _ = run(jnp.float16, scaling=steps.LossScaling(enabled=False), init_scale=2.0**40)
  assert not all(np.isfinite(p).all() for p in jax.tree.leaves(fixed.params))

  scaling = steps.LossScaling(enabled=True, period=1000)
  dynamic, history = run(jnp.float16, scaling=scaling, init_scale=2.0**40, num_steps=40)
  assert all(np.isfinite(p).all() for p in jax.tree.leaves(dynamic.params))
  skipped = [m["skipped"] for m in history]
  assert skipped[0] == 1.0 and sum(skipped) >= 10  # Halved its way down from 2**40 ...
  assert skipped[-5:] == [0.0] * 5  # ... then trains.
  assert float(dynamic.loss_scale) < 2.0**40
  losses_after = [m["loss"] for m in history if not m["skipped"]]
  assert losses_after[-1] < losses_after[0]


def test_loss_scaling_rescues_gradients_that_underflow_in_plain_float16():
  # A tiny loss makes float16 backprop flush most gradients to zero; scaling
  # it by 2**15 in the backward pass (and unscaling in float32) keeps them.
  def nonzero_fraction(scale, enabled):
    state, history = run(jnp.float16, scaling=steps.LossScaling(enabled=enabled),
                         init_scale=scale, loss_multiplier=1e-6, num_steps=1, lr=1.0)
    start = steps.create_train_state(tiny_vit(jnp.float16), optax.adam(1.0), 32, seed=0)
    moved = [np.asarray(a) != np.asarray(b)
             for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(start.params))]
    return np.mean(np.concatenate([m.ravel() for m in moved]))

  plain = nonzero_fraction(1.0, enabled=False)
  scaled = nonzero_fraction(2.0**15, enabled=True)
  assert scaled > 0.9
  assert plain < 0.5 * scaled


def test_bfloat16_loss_tracks_float32():
  _, h32 = run(jnp.float32, scaling=steps.LossScaling(), init_scale=1.0, num_steps=8)
  _, h16 = run(jnp.bfloat16, scaling=steps.LossScaling(), init_scale=1.0, num_steps=8)
  np.testing.assert_allclose([m["loss"] for m in h16], [m["loss"] for m in h32], rtol=0.05)
