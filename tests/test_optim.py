"""Tests for vit_jax_ft.training.optim: the LR schedules, their validation and the optimizers."""

import functools
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vit_jax_ft import base_config
from vit_jax_ft.models import vit
from vit_jax_ft.training import optim


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


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant", "step"])
def test_host_schedule_matches_the_schedule(schedule):
  opt = _opt(lr=3e-4, warmup_steps=5, schedule=schedule, min_lr_ratio=0.1)
  fn = optim.learning_rate_schedule(opt, 40)
  host = optim.on_host(fn)
  got = [host(step) for step in range(41)]
  assert all(isinstance(v, float) for v in got)
  assert got == [float(fn(step)) for step in range(41)]
  np.testing.assert_allclose(got, np.asarray(fn(jnp.arange(41))), rtol=1e-6)


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


# ----------------------------------------------------------------------------
# Optimizer choice: each name against a direct optax call.
# ----------------------------------------------------------------------------


def _small_params(seed):
  rng = np.random.RandomState(seed)
  return {"dense": {"kernel": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
                    "bias": jnp.asarray(rng.normal(size=(4,)), jnp.float32)}}


def _small_mask(params):
  return {"dense": {"kernel": True, "bias": False}}


def _reference_tx(name, cfg, sched):
  """What each optimizer name should be, written straight from optax."""
  wd = cfg.weight_decay
  l2 = [optax.add_decayed_weights(wd, _small_mask)] if wd > 0 else []
  return {
      "adamw": lambda: optax.adamw(sched, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                                   weight_decay=wd, mask=_small_mask),
      "lamb": lambda: optax.lamb(sched, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                                 weight_decay=wd, mask=_small_mask),
      "lion": lambda: optax.lion(sched, b1=cfg.b1, b2=cfg.b2, weight_decay=wd,
                                 mask=_small_mask),
      "adam": lambda: optax.chain(*l2, optax.adam(sched, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)),
      "sgd": lambda: optax.chain(*l2, optax.sgd(sched, momentum=cfg.momentum,
                                                nesterov=cfg.nesterov)),
      "adadelta": lambda: optax.chain(*l2, optax.adadelta(sched, rho=cfg.rms_decay, eps=cfg.eps)),
      "rmsprop": lambda: optax.chain(*l2, optax.rmsprop(sched, decay=cfg.rms_decay, eps=cfg.eps)),
  }[name]()


def _run_steps(tx, params, steps=4):
  """Applies `steps` updates with fresh gradients; returns every update."""
  state = tx.init(params)
  out = []
  for i in range(steps):
    grads = _small_params(100 + i)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    out.append(updates)
  return out


def _assert_same_updates(got, ref, rtol=1e-6):
  for g, r in zip(got, ref):
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(r)):
      np.testing.assert_allclose(a, b, rtol=rtol, atol=1e-9)


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_optimizer_matches_direct_optax(name, wd):
  cfg = _opt(name=name, lr=1e-2, weight_decay=wd, grad_clip_norm=0.0, warmup_steps=2,
             b1=0.8, b2=0.95, eps=1e-3, momentum=0.7, nesterov=(name == "sgd"), rms_decay=0.85)
  sched = optim.learning_rate_schedule(cfg, total_steps=10)
  params = _small_params(0)
  got = _run_steps(optim.make_optimizer(cfg, sched), params)
  ref = _run_steps(_reference_tx(name, cfg, sched), params)
  _assert_same_updates(got, ref)


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_weight_decay_reaches_kernel_not_bias(name):
  # Same gradients with and without weight decay: only the kernel's updates change.
  base = dict(name=name, lr=1e-2, grad_clip_norm=0.0, warmup_steps=0)
  params = _small_params(0)
  updates = {}
  for wd in (0.0, 0.5):
    cfg = _opt(weight_decay=wd, **base)
    sched = optim.learning_rate_schedule(cfg, total_steps=10)
    updates[wd] = _run_steps(optim.make_optimizer(cfg, sched), params, steps=2)
  for plain, decayed in zip(updates[0.0], updates[0.5]):
    np.testing.assert_allclose(decayed["dense"]["bias"], plain["dense"]["bias"], rtol=1e-6)
    assert np.abs(np.asarray(decayed["dense"]["kernel"] - plain["dense"]["kernel"])).max() > 1e-6


def test_default_is_adamw_unchanged():
  cfg = _opt(lr=1e-2, grad_clip_norm=0.0, warmup_steps=2)
  assert cfg.name == "adamw" and cfg.schedule == "cosine"
  sched = optim.learning_rate_schedule(cfg, total_steps=10)
  params = _small_params(0)
  got = _run_steps(optim.make_optimizer(cfg, sched), params)
  ref = _run_steps(optax.adamw(sched, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                               weight_decay=cfg.weight_decay, mask=_small_mask), params)
  _assert_same_updates(got, ref, rtol=0)


def test_sgd_update_by_hand():
  # Momentum 0.5, no Nesterov, lr 0.1 constant, L2 0.2 on the kernel only:
  # trace_t = g_t + 0.5 * trace_{t-1}; update = -lr * trace.
  cfg = _opt(name="sgd", schedule="constant", lr=0.1, momentum=0.5, weight_decay=0.2,
             grad_clip_norm=0.0, warmup_steps=0)
  sched = optim.learning_rate_schedule(cfg, total_steps=10)
  params = {"dense": {"kernel": jnp.array([2.0]), "bias": jnp.array([2.0])}}
  tx = optim.make_optimizer(cfg, sched)
  state = tx.init(params)
  grads = {"dense": {"kernel": jnp.array([1.0]), "bias": jnp.array([1.0])}}
  u1, state = tx.update(grads, state, params)
  u2, _ = tx.update(grads, state, params)
  np.testing.assert_allclose(u1["dense"]["kernel"], [-0.1 * 1.4], rtol=1e-6)  # g + 0.2 * 2
  np.testing.assert_allclose(u1["dense"]["bias"], [-0.1], rtol=1e-6)
  np.testing.assert_allclose(u2["dense"]["kernel"], [-0.1 * (1.4 + 0.7)], rtol=1e-6)
  np.testing.assert_allclose(u2["dense"]["bias"], [-0.1 * 1.5], rtol=1e-6)


def test_unknown_optimizer_is_one_line_error():
  cfg = _opt(name="adagrad")
  sched = optim.learning_rate_schedule(cfg, total_steps=10)
  with pytest.raises(ValueError, match=r"optimizer\.name='adagrad'.*adamw, adam, sgd") as err:
    optim.make_optimizer(cfg, sched)
  assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------
# Schedules: linear, constant, step.
# ----------------------------------------------------------------------------


def test_linear_hand_values():
  sched = optim.learning_rate_schedule(
      _opt(schedule="linear", lr=1e-3, warmup_steps=10, min_lr_ratio=0.1), total_steps=110)
  assert float(sched(0)) == pytest.approx(1e-4, rel=1e-6)
  assert float(sched(9)) == pytest.approx(1e-3, rel=1e-6)
  assert float(sched(10)) == pytest.approx(1e-3, rel=1e-6)
  assert float(sched(60)) == pytest.approx(1e-4 + 9e-4 * 0.5, rel=1e-5)   # half-way
  assert float(sched(35)) == pytest.approx(1e-4 + 9e-4 * 0.75, rel=1e-5)
  assert float(sched(109)) == pytest.approx(1e-4 + 9e-4 * 0.01, rel=1e-4)  # last step > floor
  assert float(sched(110)) == pytest.approx(1e-4, rel=1e-6)
  assert float(sched(500)) == pytest.approx(1e-4, rel=1e-6)


def test_linear_to_zero_floor_last_step_trains():
  sched = optim.learning_rate_schedule(
      _opt(schedule="linear", lr=1.0, warmup_steps=0), total_steps=4)
  np.testing.assert_allclose(_lrs(sched, range(5)), [1.0, 0.75, 0.5, 0.25, 0.0], atol=1e-7)


def test_constant_hand_values():
  sched = optim.learning_rate_schedule(
      _opt(schedule="constant", lr=2e-3, warmup_steps=4, min_lr_ratio=0.5), total_steps=20)
  np.testing.assert_allclose(_lrs(sched, range(4)), [5e-4, 1e-3, 1.5e-3, 2e-3], rtol=1e-6)
  np.testing.assert_allclose(_lrs(sched, range(4, 25)), 2e-3, rtol=1e-6)  # no floor


def test_step_hand_values():
  # Warmup 10, decay phase 100 steps: boundaries at steps 10 + 50 and 10 + 75.
  sched = optim.learning_rate_schedule(
      _opt(schedule="step", lr=1.0, warmup_steps=10, step_decay_factor=0.1,
           step_decay_boundaries="0.5,0.75", min_lr_ratio=0.5), total_steps=110)
  assert float(sched(0)) == pytest.approx(0.1, rel=1e-6)
  assert float(sched(9)) == pytest.approx(1.0, rel=1e-6)
  assert float(sched(10)) == pytest.approx(1.0, rel=1e-6)
  assert float(sched(59)) == pytest.approx(1.0, rel=1e-6)
  assert float(sched(60)) == pytest.approx(0.1, rel=1e-6)
  assert float(sched(84)) == pytest.approx(0.1, rel=1e-6)
  assert float(sched(85)) == pytest.approx(0.01, rel=1e-5)
  assert float(sched(109)) == pytest.approx(0.01, rel=1e-5)   # min_lr_ratio does not apply
  got = jax.jit(sched)(jnp.array([10, 60, 85], jnp.int32))
  np.testing.assert_allclose(got, [1.0, 0.1, 0.01], rtol=1e-5)


def test_step_default_boundaries_and_factor():
  sched = optim.learning_rate_schedule(_opt(schedule="step", lr=1.0), total_steps=8)
  np.testing.assert_allclose(_lrs(sched, range(8)),
                             [1, 1, 1, 1, 0.1, 0.1, 0.01, 0.01], rtol=1e-5)


@pytest.mark.parametrize("schedule", optim.SCHEDULES)
def test_every_schedule_trains_every_step(schedule):
  sched = optim.learning_rate_schedule(
      _opt(schedule=schedule, lr=1e-3, warmup_steps=3), total_steps=20)
  lrs = _lrs(sched, range(20))
  assert np.all(lrs > 0) and lrs.max() == pytest.approx(1e-3, rel=1e-6)


@pytest.mark.parametrize("schedule", optim.SCHEDULES)
@pytest.mark.parametrize("overrides,total,pattern", [
    (dict(warmup_steps=10), 10, r"optimizer\.warmup_steps=10"),
    (dict(lr=0.0), 10, r"optimizer\.lr=0"),
    (dict(min_lr_ratio=1.5), 10, r"optimizer\.min_lr_ratio=1\.5"),
    (dict(), 0, r"total_steps"),
])
def test_guard_holds_for_every_schedule(schedule, overrides, total, pattern):
  with pytest.raises(ValueError, match=pattern):
    optim.learning_rate_schedule(_opt(schedule=schedule, **overrides), total)


@pytest.mark.parametrize("overrides,pattern", [
    (dict(step_decay_factor=0.0), r"optimizer\.step_decay_factor=0\.0"),
    (dict(step_decay_factor=-0.5), r"optimizer\.step_decay_factor=-0\.5"),
    (dict(step_decay_factor=2.0), r"optimizer\.step_decay_factor=2\.0"),
    (dict(step_decay_factor=1e-30, step_decay_boundaries="0.2,0.4,0.6"),
     r"zero in float32"),
    (dict(step_decay_boundaries="0.75,0.5"), r"step_decay_boundaries='0\.75,0\.5'"),
    (dict(step_decay_boundaries="0.5,0.5"), r"step_decay_boundaries='0\.5,0\.5'"),
    (dict(step_decay_boundaries="0,0.5"), r"step_decay_boundaries='0,0\.5'"),
    (dict(step_decay_boundaries="0.5,1"), r"step_decay_boundaries='0\.5,1'"),
    (dict(step_decay_boundaries=""), r"step_decay_boundaries=''"),
    (dict(step_decay_boundaries="half"), r"step_decay_boundaries='half'"),
])
def test_step_guard_rejects_bad_values(overrides, pattern):
  cfg = _opt(schedule="step", **overrides)
  with pytest.raises(ValueError, match=pattern):
    optim.validate_schedule(cfg, 100)
  # The step fields only matter for schedule='step'.
  optim.validate_schedule(_opt(schedule="cosine", **overrides), 100)


def test_unknown_schedule_is_one_line_error():
  with pytest.raises(ValueError, match=r"optimizer\.schedule='exp'.*cosine, linear, constant, step") as err:
    optim.learning_rate_schedule(_opt(schedule="exp"), 10)
  assert "\n" not in str(err.value)
