"""Tests for vit_jax_ft.optim: the LR schedule, its validation and AdamW."""

import functools
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vit_jax_ft import base_config
from vit_jax_ft import optim
from vit_jax_ft.models import vit


def _opt(**overrides):
  cfg = base_config.get_base_config().optimizer
  for k, v in overrides.items():
    cfg[k] = v  # existing fields only: the base config is locked
  return cfg


def _ref_lr(step, *, lr, warmup, total, min_lr_ratio):
  """Hand-written reference: linear warmup (step + 1) / warmup, then cosine."""
  floor = lr * min_lr_ratio
  if step < warmup:
    return lr * (step + 1) / warmup
  progress = min(max((step - warmup) / (total - warmup), 0.0), 1.0)
  return floor + (lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _lrs(schedule, steps):
  return np.array([float(schedule(s)) for s in steps])


# ----------------------------------------------------------------------------
# Schedule.
# ----------------------------------------------------------------------------


def test_warmup_hand_values():
  sched = optim.learning_rate_schedule(_opt(lr=1e-3, warmup_steps=10), total_steps=110)
  assert float(sched(0)) == pytest.approx(1e-4, rel=1e-6)   # lr / warmup: step 0 trains
  assert float(sched(4)) == pytest.approx(5e-4, rel=1e-6)
  assert float(sched(9)) == pytest.approx(1e-3, rel=1e-6)   # peak at warmup - 1
  assert float(sched(10)) == pytest.approx(1e-3, rel=1e-6)  # cosine starts at the peak
  # Mid-decay: progress 1/2 -> half the peak (floor 0).
  assert float(sched(60)) == pytest.approx(5e-4, rel=1e-5)
  # Progress 1/4: peak * (1 + cos(pi/4)) / 2.
  assert float(sched(35)) == pytest.approx(1e-3 * (1 + math.sqrt(0.5)) / 2, rel=1e-5)


def test_last_step_is_small_but_not_zero():
  sched = optim.learning_rate_schedule(_opt(lr=1e-3, warmup_steps=10), total_steps=110)
  last = float(sched(109))
  expected = 1e-3 * 0.5 * (1 + math.cos(math.pi * 99 / 100))  # ~2.47e-7
  assert last == pytest.approx(expected, rel=1e-3)
  assert 0.0 < last < 1e-3 * 1e-3
  # One past the last step the cosine reaches the floor, and stays there.
  assert float(sched(110)) == pytest.approx(0.0, abs=1e-12)
  assert float(sched(500)) == pytest.approx(0.0, abs=1e-12)


def test_floor_with_min_lr_ratio():
  sched = optim.learning_rate_schedule(
      _opt(lr=2e-3, warmup_steps=5, min_lr_ratio=0.1), total_steps=50)
  floor = 2e-4
  lrs = _lrs(sched, range(50))
  assert lrs.min() >= floor * (1 - 1e-6)
  last = floor + (2e-3 - floor) * 0.5 * (1 + math.cos(math.pi * 44 / 45))  # ~floor + 2.2e-6
  assert lrs[-1] == pytest.approx(last, rel=1e-4) and lrs[-1] > floor
  assert float(sched(50)) == pytest.approx(floor, rel=1e-6)
  assert float(sched(1000)) == pytest.approx(floor, rel=1e-6)
  # Mid-decay is half-way between the peak and the floor.
  assert float(sched(5 + 45 / 2)) == pytest.approx((2e-3 + floor) / 2, rel=1e-5)


@pytest.mark.parametrize('lr,warmup,total,ratio', [
    (1e-3, 10, 110, 0.0),
    (3e-4, 7, 40, 0.25),
    (1.0, 0, 20, 0.0),
    (5e-2, 1, 2, 0.5),
    (1e-4, 99, 100, 0.0),
])
def test_schedule_matches_reference(lr, warmup, total, ratio):
  sched = optim.learning_rate_schedule(
      _opt(lr=lr, warmup_steps=warmup, min_lr_ratio=ratio), total_steps=total)
  steps = range(total + 3)
  ref = np.array([_ref_lr(s, lr=lr, warmup=warmup, total=total, min_lr_ratio=ratio)
                  for s in steps])
  np.testing.assert_allclose(_lrs(sched, steps), ref, rtol=1e-5, atol=1e-7 * lr)
  # Also as a jitted, vectorised function of an int32 step array.
  got = jax.jit(sched)(jnp.arange(total + 3, dtype=jnp.int32))
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-7 * lr)
  # Every training step trains.
  assert np.all(ref[:total] > 0)


def test_monotone_after_warmup_and_increasing_during_warmup():
  sched = optim.learning_rate_schedule(
      _opt(lr=1e-3, warmup_steps=20, min_lr_ratio=0.05), total_steps=300)
  lrs = _lrs(sched, range(300))
  assert np.all(np.diff(lrs[:20]) > 0)
  assert np.all(np.diff(lrs[19:]) <= 1e-12)
  assert lrs.max() == pytest.approx(1e-3, rel=1e-6)


def test_no_warmup_starts_at_peak():
  sched = optim.learning_rate_schedule(_opt(lr=0.1, warmup_steps=0), total_steps=10)
  assert float(sched(0)) == pytest.approx(0.1, rel=1e-6)
  assert float(sched(5)) == pytest.approx(0.05, rel=1e-5)
  assert 0 < float(sched(9)) < 0.1 * 0.03


# ----------------------------------------------------------------------------
# Validation.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize('overrides,total,pattern', [
    (dict(warmup_steps=100), 100, r'optimizer\.warmup_steps=100'),
    (dict(warmup_steps=150), 100, r'optimizer\.warmup_steps=150'),
    (dict(warmup_steps=-1), 100, r'optimizer\.warmup_steps=-1'),
    (dict(lr=0.0), 100, r'optimizer\.lr=0'),
    (dict(lr=-1e-3), 100, r'optimizer\.lr=-0\.001'),
    (dict(lr=float('nan')), 100, r'optimizer\.lr=nan'),
    (dict(), 0, r'total_steps'),
    (dict(), -5, r'total_steps'),
    (dict(min_lr_ratio=-0.1), 100, r'optimizer\.min_lr_ratio=-0\.1'),
    (dict(min_lr_ratio=1.5), 100, r'optimizer\.min_lr_ratio=1\.5'),
])
def test_validation_names_the_offending_field(overrides, total, pattern):
  cfg = _opt(**overrides)
  with pytest.raises(ValueError, match=pattern):
    optim.validate_schedule(cfg, total)
  with pytest.raises(ValueError, match=pattern):
    optim.learning_rate_schedule(cfg, total)


@pytest.mark.parametrize('overrides,total', [
    (dict(warmup_steps=99), 100),
    (dict(warmup_steps=0), 1),
    (dict(min_lr_ratio=0.0), 10),
    (dict(min_lr_ratio=1.0), 10),
])
def test_validation_accepts_edge_cases(overrides, total):
  optim.validate_schedule(_opt(**overrides), total)


def test_constant_schedule_with_min_lr_ratio_one():
  sched = optim.learning_rate_schedule(_opt(lr=1e-3, min_lr_ratio=1.0), total_steps=10)
  np.testing.assert_allclose(_lrs(sched, range(12)), 1e-3, rtol=1e-6)


# ----------------------------------------------------------------------------
# AdamW: weight-decay mask and gradient clipping.
# ----------------------------------------------------------------------------


def _vit_params(seed=0):
  """Random values in the parameter tree of a tiny (real) ViT."""
  model = vit.VisionTransformer(num_classes=3, patch_size=4, hidden_size=8, num_layers=1,
                                num_heads=2, mlp_dim=16)
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False))['params']
  rng = np.random.RandomState(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), jnp.float32), shapes)


def _one_update(tx, params, grads):
  state = tx.init(params)
  updates, _ = tx.update(grads, state, params)
  return flax.traverse_util.flatten_dict(updates, sep='/')


def _decay_check(path):
  """Which leaves should be decayed: weight matrices and conv kernels only."""
  return path.endswith('/kernel')


@functools.lru_cache(maxsize=None)
def _weight_decay_deltas():
  """Per leaf: the AdamW update minus plain Adam's, in units of -lr * wd * param."""
  lr, wd = 1e-2, 0.1
  cfg = _opt(lr=lr, weight_decay=wd, grad_clip_norm=0.0, warmup_steps=0)
  sched = optim.learning_rate_schedule(cfg, total_steps=10)
  params = _vit_params(0)
  grads = _vit_params(1)
  got = _one_update(optim.make_optimizer(cfg, sched), params, grads)
  ref = _one_update(optax.adam(sched, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps), params, grads)
  flat_params = flax.traverse_util.flatten_dict(params, sep='/')
  out = {}
  for path, p in flat_params.items():
    delta = np.asarray(got[path], np.float64) - np.asarray(ref[path], np.float64)
    out[path] = delta / (-lr * wd * np.asarray(p, np.float64))
  return out


def test_weight_decay_on_kernels_not_on_biases_norms_or_pos_embedding():
  ratios = _weight_decay_deltas()
  checked = 0
  for path, ratio in ratios.items():
    if _decay_check(path):
      np.testing.assert_allclose(ratio, 1.0, rtol=1e-3, err_msg=path)
    else:
      np.testing.assert_allclose(ratio, 0.0, atol=1e-3, err_msg=path)
    checked += 1
  names = set(ratios)
  for expected in ('embedding/kernel', 'head/kernel', 'head/bias',
                   'Transformer/posembed_input/pos_embedding',
                   'Transformer/encoder_norm/scale',
                   'Transformer/encoderblock_0/LayerNorm_0/scale',
                   'Transformer/encoderblock_0/MlpBlock_3/Dense_0/bias',
                   'Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel',
                   'Transformer/encoderblock_0/MultiHeadDotProductAttention_1/out/kernel'):
    assert expected in names
  assert checked >= 20


def test_no_weight_decay_on_attention_biases():
  ratios = _weight_decay_deltas()
  for proj in ('query', 'key', 'value'):
    path = f'Transformer/encoderblock_0/MultiHeadDotProductAttention_1/{proj}/bias'
    assert ratios[path].ndim == 2
    np.testing.assert_allclose(ratios[path], 0.0, atol=1e-3, err_msg=path)


def test_no_weight_decay_on_cls_token():
  ratios = _weight_decay_deltas()
  np.testing.assert_allclose(ratios['cls'], 0.0, atol=1e-3)


def _adam_two_steps(tx, params, grads_seq):
  state = tx.init(params)
  updates = []
  for g in grads_seq:
    u, state = tx.update(g, state, params)
    updates.append(u)
  return updates


def _global_norm(tree):
  return math.sqrt(sum(float(np.sum(np.asarray(x, np.float64)**2))
                       for x in jax.tree.leaves(tree)))


def test_gradient_clipping_to_global_norm():
  cfg = _opt(lr=1e-2, weight_decay=0.0, grad_clip_norm=1.0, warmup_steps=0)
  sched = optim.learning_rate_schedule(cfg, total_steps=10)
  params = _vit_params(0)
  g1 = jax.tree.map(lambda x: 30.0 * x, _vit_params(1))      # far above the clip norm
  g2 = jax.tree.map(lambda x: 0.01 * x, _vit_params(2))      # below it: untouched
  n1, n2 = _global_norm(g1), _global_norm(g2)
  assert n1 > 10 and n2 < 1
  # Reference: clip by hand in numpy, then plain Adam.
  clipped = [jax.tree.map(lambda x: np.asarray(x) * (1.0 / n1), g1), g2]
  adam = optax.adam(sched, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
  ref = _adam_two_steps(adam, params, clipped)
  got = _adam_two_steps(optim.make_optimizer(cfg, sched), params, [g1, g2])
  for r, g in zip(ref, got):
    for a, b in zip(jax.tree.leaves(r), jax.tree.leaves(g)):
      np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-9)
  # Without clipping the second update would differ (Adam's moments remember g1).
  unclipped = _adam_two_steps(adam, params, [g1, g2])
  diff = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
             for a, b in zip(jax.tree.leaves(unclipped[1]), jax.tree.leaves(got[1])))
  assert diff > 1e-4


def test_grad_clip_norm_zero_disables_clipping():
  cfg = _opt(lr=1e-2, weight_decay=0.0, grad_clip_norm=0.0, warmup_steps=0)
  sched = optim.learning_rate_schedule(cfg, total_steps=10)
  params = _vit_params(0)
  grads = [jax.tree.map(lambda x: 30.0 * x, _vit_params(1)), _vit_params(2)]
  ref = _adam_two_steps(optax.adam(sched, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps), params, grads)
  got = _adam_two_steps(optim.make_optimizer(cfg, sched), params, grads)
  for r, g in zip(ref, got):
    for a, b in zip(jax.tree.leaves(r), jax.tree.leaves(g)):
      np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-10)


def test_optimizer_follows_the_schedule():
  # With Adam's normalisation, the first update of a large gradient is ~ -lr(0) * sign(g).
  cfg = _opt(lr=1e-2, weight_decay=0.0, grad_clip_norm=0.0, warmup_steps=4)
  sched = optim.learning_rate_schedule(cfg, total_steps=10)
  params = {'w': jnp.ones((3, 3))}
  grads = {'w': jnp.full((3, 3), -5.0)}
  (u,) = _adam_two_steps(optim.make_optimizer(cfg, sched), params, [grads])
  np.testing.assert_allclose(u['w'], 1e-2 / 4, rtol=1e-5)
