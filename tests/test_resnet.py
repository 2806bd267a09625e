"""Tests for vit_jax_ft.models.resnet."""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax_ft.models import resnet
from vit_jax_ft.models.resnet import ResNet, resnet_preset


def _num_params(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _abstract_init(model, size=32):
  """Shapes/dtypes of the variables, without allocating or computing them."""
  return jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)),
                         train=False))


def _tiny(**kw):
  """A 2-stage bottleneck ResNet that compiles in a second or two."""
  kw = {'num_classes': 5, 'stage_sizes': (1, 1), 'block': 'bottleneck',
        'width': 8, **kw}
  return ResNet(**kw)


def _conv_modules(params):
  """All sub-dicts of `params` that belong to a conv (4-D kernel)."""
  flat = flax.traverse_util.flatten_dict(params)
  return {k[:-1] for k, v in flat.items() if k[-1] == 'kernel' and v.ndim == 4}


# Published torchvision parameter counts (1000-class head).
@pytest.mark.parametrize('name,expected', [
    ('resnet18', 11_689_512),
    ('resnet34', 21_797_672),
    ('resnet50', 25_557_032),
    ('resnet101', 44_549_160),
    ('resnet152', 60_192_808),
])
def test_param_count_matches_torchvision(name, expected):
  variables = _abstract_init(ResNet(num_classes=1000, **resnet_preset(name)))
  assert _num_params(variables['params']) == expected


def test_keras_resnet50_count():
  # keras.applications.ResNet50: 25,636,712 "total params", of which
  # 25,583,592 trainable and 53,120 non-trainable (BN moving mean/variance).
  # Trainable = torchvision's 25,557,032 + one bias per conv output channel
  # (26,560); non-trainable = 2 x 26,560 BN channels. So the 25,636,712
  # figure corresponds to params + batch_stats, not params alone.
  model = ResNet(num_classes=1000, conv_bias=True, variant='v1',
                 **resnet_preset('resnet50'))
  variables = _abstract_init(model)
  n_params = _num_params(variables['params'])
  n_stats = _num_params(variables['batch_stats'])
  assert n_params == 25_583_592
  assert n_stats == 53_120
  assert n_params + n_stats == 25_636_712


@pytest.mark.parametrize('conv_bias', [False, True])
def test_conv_bias_on_every_conv(conv_bias):
  params = _abstract_init(
      ResNet(num_classes=10, **resnet_preset('resnet50'),
             conv_bias=conv_bias))['params']
  convs = _conv_modules(params)
  assert len(convs) == 53  # 1 stem + 16 blocks x 3 + 4 projections.
  flat = flax.traverse_util.flatten_dict(params)
  for conv in convs:
    assert ((*conv, 'bias') in flat) == conv_bias, conv
  # The head always has a bias.
  assert ('head', 'bias') in flat


def test_parameter_names():
  params = _abstract_init(
      ResNet(num_classes=10, **resnet_preset('resnet50')))['params']
  expected_top = {'conv_init', 'bn_init', 'head'} | {
      f'stage{i}_block{j}'
      for i, n in enumerate((3, 4, 6, 3), start=1) for j in range(1, n + 1)}
  assert set(params) == expected_top
  assert set(params['stage1_block1']) == {
      'conv1', 'bn1', 'conv2', 'bn2', 'conv3', 'bn3', 'proj_conv', 'proj_bn'}
  # Only the first block of each stage has a projection.
  assert 'proj_conv' not in params['stage1_block2']
  # ResNet-18's first stage keeps 64 channels at stride 1: no projection.
  p18 = _abstract_init(ResNet(num_classes=10, **resnet_preset('resnet18')))
  assert set(p18['params']['stage1_block1']) == {'conv1', 'bn1', 'conv2',
                                                 'bn2'}
  assert 'proj_conv' in p18['params']['stage2_block1']


def test_presets():
  assert resnet_preset('resnet50') == {'block': 'bottleneck',
                                       'stage_sizes': (3, 4, 6, 3)}
  assert resnet_preset('resnet18') == {'block': 'basic',
                                       'stage_sizes': (2, 2, 2, 2)}
  # Mutating the returned dict must not leak into the table.
  d = resnet_preset('resnet34')
  d['block'] = 'bottleneck'
  assert resnet_preset('resnet34')['block'] == 'basic'
  with pytest.raises(ValueError, match='resnet152'):  # The error lists the valid names.
    resnet_preset('resnet200')
  assert list(resnet.RESNET_PRESETS) == ['resnet18', 'resnet34', 'resnet50',
                                         'resnet101', 'resnet152', 'resnext50_32x4d',
                                         'resnext101_32x8d', 'resnext101_64x4d']
  with pytest.raises(TypeError):
    resnet.RESNET_PRESETS['resnet18'] = ('basic', (1, 1, 1, 1), 1, 64)


def test_invalid_args_raise():
  x = jnp.zeros((1, 32, 32, 3))
  for kw in ({'block': 'wide'}, {'variant': 'v2'}, {'head_init': 'ones'}):
    with pytest.raises(ValueError):
      jax.eval_shape(lambda m=_tiny(**kw): m.init(jax.random.key(0), x,
                                                  train=False))


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_output_shape_and_dtype(dtype):
  model = ResNet(num_classes=7, dtype=dtype, **resnet_preset('resnet18'))
  x = jnp.zeros((2, 64, 64, 3))
  variables = _abstract_init(model, size=64)
  for leaf in jax.tree.leaves(variables):
    assert leaf.dtype == jnp.float32
  out = jax.eval_shape(lambda v: model.apply(v, x, train=False), variables)
  assert out.shape == (2, 7) and out.dtype == jnp.float32

  # num_classes=0: pooled features, no head.
  feat_model = ResNet(num_classes=0, dtype=dtype, **resnet_preset('resnet50'))
  fv = _abstract_init(feat_model, size=64)
  assert 'head' not in fv['params']
  feats = jax.eval_shape(lambda v: feat_model.apply(v, x, train=False), fv)
  assert feats.shape == (2, 2048) and feats.dtype == jnp.float32


def test_bfloat16_runs_in_bfloat16():
  model = _tiny(dtype=jnp.bfloat16, head_init='lecun_normal')
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  variables = model.init(jax.random.key(0), x, train=False)
  logits, state = model.apply(variables, x, train=False,
                              capture_intermediates=True)
  assert logits.dtype == jnp.float32
  inter = state['intermediates']
  assert inter['conv_init']['__call__'][0].dtype == jnp.bfloat16
  assert inter['stage2_block1']['__call__'][0].dtype == jnp.bfloat16
  # Close to the float32 model with the same weights.
  ref = _tiny(head_init='lecun_normal').apply(variables, x, train=False)
  np.testing.assert_allclose(logits, ref, rtol=0.1, atol=0.05)


def test_head_init():
  x = jnp.ones((1, 32, 32, 3))
  zeros = _tiny().init(jax.random.key(0), x, train=False)['params']['head']
  assert not np.any(zeros['kernel']) and not np.any(zeros['bias'])
  lecun = _tiny(head_init='lecun_normal').init(
      jax.random.key(0), x, train=False)['params']['head']
  assert np.std(lecun['kernel']) > 0 and not np.any(lecun['bias'])
  biased = _tiny(head_bias_init=-6.9).init(
      jax.random.key(0), x, train=False)['params']['head']
  np.testing.assert_allclose(biased['bias'], np.full(5, -6.9, np.float32))


def test_224_input_gives_7x7_feature_map():
  model = ResNet(num_classes=10, **resnet_preset('resnet50'))
  x = jnp.zeros((1, 224, 224, 3))
  variables = _abstract_init(model, size=224)
  _, state = jax.eval_shape(
      lambda v: model.apply(v, x, train=False, capture_intermediates=True,
                            mutable=['intermediates']), variables)
  inter = state['intermediates']
  assert inter['conv_init']['__call__'][0].shape == (1, 112, 112, 64)
  assert inter['stem'][0].shape == (1, 56, 56, 64)
  assert inter['stage1_block3']['__call__'][0].shape == (1, 56, 56, 256)
  assert inter['stage4_block3']['__call__'][0].shape == (1, 7, 7, 2048)


# --- Stem padding vs. an independent numpy reference. ---


def _np_conv_7x7_s2(x, kernel, pad):
  """Cross-correlation, NHWC/HWIO, stride 2, explicit (lo, hi) zero padding."""
  (lo, hi) = pad
  x = np.pad(x, ((0, 0), (lo, hi), (lo, hi), (0, 0)))
  n, h, w, _ = x.shape
  oh, ow = (h - 7) // 2 + 1, (w - 7) // 2 + 1
  out = np.zeros((n, oh, ow, kernel.shape[-1]), np.float64)
  for dy in range(7):
    for dx in range(7):
      patch = x[:, dy:dy + 2 * oh:2, dx:dx + 2 * ow:2, :]
      out += patch @ kernel[dy, dx]
  return out


def _np_max_pool_3x3_s2(x, pad):
  (lo, hi) = pad
  x = np.pad(x, ((0, 0), (lo, hi), (lo, hi), (0, 0)),
             constant_values=-np.inf)
  n, h, w, c = x.shape
  oh, ow = (h - 3) // 2 + 1, (w - 3) // 2 + 1
  out = np.full((n, oh, ow, c), -np.inf)
  for dy in range(3):
    for dx in range(3):
      out = np.maximum(out, x[:, dy:dy + 2 * oh:2, dx:dx + 2 * ow:2, :])
  return out


@pytest.fixture(scope='module')
def stem_run():
  """Runs a narrow ResNet on 224x224 inputs and returns what the tests need."""
  model = ResNet(num_classes=0, stage_sizes=(1,), block='basic', width=4)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 224, 224, 3)).astype(np.float32)
  # Second image is non-zero only in its last row and column: this is
  # exactly where symmetric (3, 3) and Flax-'SAME' (2, 3) padding disagree.
  x[1] = 0.0
  x[1, -1, :, :] = rng.normal(size=(224, 3))
  x[1, :, -1, :] = rng.normal(size=(224, 3))
  variables = model.init(jax.random.key(0), x[:1], train=False)
  _, state = model.apply(variables, x, train=False,
                         capture_intermediates=True, mutable=['intermediates'])
  kernel = np.asarray(variables['params']['conv_init']['kernel'], np.float64)
  inter = state['intermediates']
  return {
      'x': x.astype(np.float64), 'kernel': kernel,
      'conv': np.asarray(inter['conv_init']['__call__'][0]),
      'stem': np.asarray(inter['stem'][0]),
      'eps': model.bn_epsilon,
  }


def test_stem_conv_matches_pytorch_padding(stem_run):
  x, kernel, conv = stem_run['x'], stem_run['kernel'], stem_run['conv']
  ref = _np_conv_7x7_s2(x, kernel, pad=(3, 3))
  assert conv.shape == ref.shape == (2, 112, 112, 4)
  np.testing.assert_allclose(conv, ref, rtol=1e-4, atol=1e-4)
  # Sanity check that the test can fail: TF/Flax 'SAME' padding (2, 3)
  # gives visibly different results, most of all on the edge-only image.
  same = _np_conv_7x7_s2(x, kernel, pad=(2, 3))
  assert same.shape == ref.shape
  assert np.abs(same[1] - conv[1]).max() > 0.1
  assert not np.allclose(same[0], conv[0], atol=1e-2)


def test_stem_max_pool_matches_pytorch_padding(stem_run):
  conv, stem, eps = stem_run['conv'], stem_run['stem'], stem_run['eps']
  # Freshly initialized BN in eval mode: mean 0, var 1, scale 1, bias 0.
  act = np.maximum(conv.astype(np.float64) / np.sqrt(1.0 + eps), 0.0)
  ref = _np_max_pool_3x3_s2(act, pad=(1, 1))
  assert stem.shape == ref.shape == (2, 56, 56, 4)
  np.testing.assert_allclose(stem, ref, rtol=1e-5, atol=1e-5)
  same = _np_max_pool_3x3_s2(act, pad=(0, 1))
  assert not np.allclose(same, stem, atol=1e-3)


def test_max_pool_pads_with_minus_inf():
  # All-negative input: zero padding would make border outputs 0.
  x = -jnp.ones((1, 4, 4, 1)) - jnp.arange(16.).reshape(1, 4, 4, 1)
  y = resnet.max_pool_3x3_s2(x)
  assert y.shape == (1, 2, 2, 1)
  np.testing.assert_array_equal(
      np.asarray(y)[0, :, :, 0],
      _np_max_pool_3x3_s2(np.asarray(x), (1, 1))[0, :, :, 0])
  assert np.all(np.asarray(y) < 0)


@pytest.mark.parametrize('side', [8, 7])
def test_max_pool_value_and_gradient_match_reduce_window(side):
  # Distinct values (no ties): the gradient goes to the one argmax, as in nn.max_pool.
  x = jnp.asarray(np.random.default_rng(0).permutation(2 * side * side * 3)
                  .reshape(2, side, side, 3), jnp.float32)
  ref = lambda x: nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
  np.testing.assert_array_equal(resnet.max_pool_3x3_s2(x), ref(x))
  w = jnp.asarray(np.random.default_rng(1).normal(size=ref(x).shape), jnp.float32)
  grad = lambda f: jax.grad(lambda x: jnp.sum(f(x) * w))(x)
  np.testing.assert_allclose(grad(resnet.max_pool_3x3_s2), grad(ref), rtol=1e-6)


# --- BatchNorm statistics. ---


def test_batch_stats_momentum_and_eval():
  momentum = 0.8  # Not the default, so the test pins the convention.
  model = _tiny(bn_momentum=momentum)
  rng = np.random.default_rng(0)
  x1 = jnp.asarray(rng.normal(1.0, 2.0, size=(4, 32, 32, 3)), jnp.float32)
  x2 = jnp.asarray(rng.normal(-0.5, 1.0, size=(4, 32, 32, 3)), jnp.float32)
  variables = model.init(jax.random.key(0), x1, train=False)
  params = variables['params']

  def train_step(stats, x):
    _, state = model.apply(
        {'params': params, 'batch_stats': stats}, x, train=True,
        capture_intermediates=True, mutable=['batch_stats', 'intermediates'])
    conv = np.asarray(state['intermediates']['conv_init']['__call__'][0],
                      np.float64)
    return state['batch_stats'], conv

  # Two steps, so that the "old" running stats are not the (0, 1) init.
  stats0 = variables['batch_stats']
  stats1, conv1 = train_step(stats0, x1)
  stats2, conv2 = train_step(stats1, x2)
  for old, new, conv in ((stats0, stats1, conv1), (stats1, stats2, conv2)):
    old_bn = jax.tree.map(np.asarray, old['bn_init'])
    new_bn = new['bn_init']
    batch_mean = conv.mean(axis=(0, 1, 2))
    batch_var = conv.var(axis=(0, 1, 2))  # Flax tracks the biased variance.
    np.testing.assert_allclose(
        new_bn['mean'], momentum * old_bn['mean'] + (1 - momentum) * batch_mean,
        rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        new_bn['var'], momentum * old_bn['var'] + (1 - momentum) * batch_var,
        rtol=1e-4, atol=1e-5)
  assert not np.allclose(stats2['bn_init']['mean'], stats1['bn_init']['mean'])

  # Eval mode leaves the stats alone...
  eval_vars = {'params': params, 'batch_stats': stats2}
  _, state = model.apply(eval_vars, x2, train=False,
                         capture_intermediates=True,
                         mutable=['batch_stats', 'intermediates'])
  jax.tree.map(np.testing.assert_array_equal, state['batch_stats'], stats2)
  # ...and normalizes with the running averages, not the batch statistics.
  conv = np.asarray(state['intermediates']['conv_init']['__call__'][0])
  bn_out = np.asarray(state['intermediates']['bn_init']['__call__'][0])
  bn = stats2['bn_init']
  scale, bias = params['bn_init']['scale'], params['bn_init']['bias']
  expected = (conv - bn['mean']) / np.sqrt(bn['var'] + model.bn_epsilon)
  np.testing.assert_allclose(bn_out, np.maximum(expected * scale + bias, 0),  # ReLU fused.
                             rtol=1e-4, atol=1e-4)
  # Hence an example's eval output does not depend on the rest of the batch.
  full = model.apply(eval_vars, x2, train=False)
  single = model.apply(eval_vars, x2[:1], train=False)
  np.testing.assert_allclose(full[:1], single, rtol=1e-5, atol=1e-6)


# --- v1 vs v1.5. ---


def test_v1_vs_v15_stride_placement():
  x = jnp.zeros((1, 64, 64, 3))
  shapes = {}
  for variant in ('v1', 'v1.5'):
    model = _tiny(variant=variant)
    variables = _abstract_init(model, size=64)
    _, state = jax.eval_shape(
        lambda v, m=model: m.apply(v, x, train=False,
                                   capture_intermediates=True,
                                   mutable=['intermediates']), variables)
    shapes[variant] = (variables, state['intermediates']['stage2_block1'])

  (v1_vars, v1), (v15_vars, v15) = shapes['v1'], shapes['v1.5']
  # Same parameters (a checkpoint loads into either)...
  assert (jax.tree.map(lambda a: a.shape, v1_vars) ==
          jax.tree.map(lambda a: a.shape, v15_vars))
  # ...and the same block output: 16x16 (stem) -> 8x8 in stage 2.
  assert v1['__call__'][0].shape == v15['__call__'][0].shape == (1, 8, 8, 64)
  # But v1 downsamples in the first 1x1 conv, v1.5 in the 3x3 conv.
  assert v1['conv1']['__call__'][0].shape == (1, 8, 8, 16)
  assert v15['conv1']['__call__'][0].shape == (1, 16, 16, 16)
  assert v1['conv2']['__call__'][0].shape == (1, 8, 8, 16)
  assert v15['conv2']['__call__'][0].shape == (1, 8, 8, 16)
  assert v1['proj_conv']['__call__'][0].shape == (1, 8, 8, 64)


# --- Rematerialization. ---


def test_remat_matches_no_remat():
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  labels = jnp.array([1, 3])
  # Basic blocks compile faster; remat wraps both block types the same way.
  plain = _tiny(head_init='lecun_normal', block='basic')
  remat = _tiny(head_init='lecun_normal', block='basic', remat=True)
  variables = plain.init(jax.random.key(0), x, train=False)
  # Same parameter tree (names unchanged by nn.remat).
  remat_vars = remat.init(jax.random.key(0), x, train=False)
  jax.tree.map(np.testing.assert_array_equal, variables, remat_vars)

  def loss_and_grads(model):
    def loss_fn(params):
      logits, state = model.apply(
          {'params': params, 'batch_stats': variables['batch_stats']}, x,
          train=True, mutable=['batch_stats'])
      one_hot = jax.nn.one_hot(labels, logits.shape[-1])
      loss = -jnp.mean(jnp.sum(one_hot * jax.nn.log_softmax(logits), -1))
      return loss, state['batch_stats']
    return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
        variables['params'])

  (loss_p, stats_p), grads_p = loss_and_grads(plain)
  (loss_r, stats_r), grads_r = loss_and_grads(remat)
  np.testing.assert_allclose(loss_p, loss_r, rtol=1e-6)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  jax.tree.map(close, stats_p, stats_r)
  jax.tree.map(close, grads_p, grads_r)
  # The gradients reach the stem (not trivially zero).
  assert np.abs(grads_p['conv_init']['kernel']).max() > 0

  eval_p = plain.apply(variables, x, train=False)
  eval_r = remat.apply(variables, x, train=False)
  close(eval_p, eval_r)


def test_remat_keeps_parameter_tree():
  # Covers the bottleneck path (with `variant`) under nn.remat, cheaply.
  kw = dict(num_classes=10, variant='v1', **resnet_preset('resnet50'))
  plain = _abstract_init(ResNet(**kw))
  remat = _abstract_init(ResNet(remat=True, **kw))
  assert (jax.tree.map(lambda a: (a.shape, a.dtype), plain) ==
          jax.tree.map(lambda a: (a.shape, a.dtype), remat))
