"""Tests for vit_jax_ft.models.vit, model creation and the model configs."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from vit_jax_ft import base_config
from vit_jax_ft import models
from vit_jax_ft.models import resnet
from vit_jax_ft.models import vit
from vit_jax_ft.models.vit import VisionTransformer

# A ViT that runs in milliseconds: 8x8 images, 4x4 patches -> 4 patches + cls.
_TINY = dict(patch_size=4, hidden_size=16, num_layers=2, num_heads=4, mlp_dim=32)


def _num_params(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _flat(tree) -> dict:
  return flax.traverse_util.flatten_dict(tree, sep='/')


def _abstract_params(model, size=224):
  return jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)),
                         train=False))['params']


def _tiny(**kw):
  return VisionTransformer(**{'num_classes': 5, **_TINY, **kw})


def _random_params(model, seed=0, size=8, scale=0.3):
  """Random N(0, scale^2) values for every parameter of `model` (numpy, float32).

  The default init has zero biases/head and unit LayerNorm scales, which would
  hide wiring mistakes; random values for every leaf make every path count.
  """
  shapes = _abstract_params(model, size=size)
  rng = np.random.RandomState(seed)
  return jax.tree.map(lambda s: jnp.asarray(scale * rng.normal(size=s.shape), s.dtype),
                      shapes)


def _images(n=2, size=8, seed=0):
  return np.random.RandomState(seed).normal(size=(n, size, size, 3)).astype(np.float32)


# ----------------------------------------------------------------------------
# Independent numpy reference (float64).
# ----------------------------------------------------------------------------


def np_gelu(x, approximate):
  if approximate:
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))
  return 0.5 * x * (1.0 + special.erf(x / np.sqrt(2.0)))


def np_layer_norm(x, p, eps):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean)**2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p['scale'] + p['bias']


def np_dense(x, p):
  return x @ p['kernel'] + p['bias']


def np_softmax(x, axis):
  x = x - x.max(axis, keepdims=True)
  e = np.exp(x)
  return e / e.sum(axis, keepdims=True)


def np_mha(x, p):
  """Self-attention: per-head softmax(Q K^T / sqrt(d_head)) V, then output proj."""
  q = np.einsum('btd,dhk->bthk', x, p['query']['kernel']) + p['query']['bias']
  k = np.einsum('btd,dhk->bthk', x, p['key']['kernel']) + p['key']['bias']
  v = np.einsum('btd,dhk->bthk', x, p['value']['kernel']) + p['value']['bias']
  d_head = q.shape[-1]
  scores = np.einsum('bqhk,bthk->bhqt', q, k) / np.sqrt(d_head)
  weights = np_softmax(scores, axis=-1)
  out = np.einsum('bhqt,bthk->bqhk', weights, v)
  return np.einsum('bqhk,hkd->bqd', out, p['out']['kernel']) + p['out']['bias']


def np_mlp(x, p, approximate):
  return np_dense(np_gelu(np_dense(x, p['Dense_0']), approximate), p['Dense_1'])


def np_block(x, p, eps, approximate):
  x = x + np_mha(np_layer_norm(x, p['LayerNorm_0'], eps), p['MultiHeadDotProductAttention_1'])
  return x + np_mlp(np_layer_norm(x, p['LayerNorm_2'], eps), p['MlpBlock_3'], approximate)


def np_vit(images, p, *, patch, num_layers, eps, approximate, classifier,
           representation_size, num_classes):
  b, h, w, c = images.shape
  x = images.reshape(b, h // patch, patch, w // patch, patch, c)
  x = x.transpose(0, 1, 3, 2, 4, 5).reshape(b, (h // patch) * (w // patch), patch * patch * c)
  kernel = p['embedding']['kernel']
  x = x @ kernel.reshape(-1, kernel.shape[-1]) + p['embedding']['bias']
  if classifier == 'token':
    cls = np.broadcast_to(p['cls'], (b, 1, x.shape[-1]))
    x = np.concatenate([cls, x], axis=1)
  t = p['Transformer']
  x = x + t['posembed_input']['pos_embedding']
  for i in range(num_layers):
    x = np_block(x, t[f'encoderblock_{i}'], eps, approximate)
  x = np_layer_norm(x, t['encoder_norm'], eps)
  x = x[:, 0] if classifier == 'token' else x.mean(1)
  if representation_size is not None:
    x = np.tanh(np_dense(x, p['pre_logits']))
  if num_classes == 0:
    return x
  return np_dense(x, p['head'])


def _to_np64(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


# ----------------------------------------------------------------------------
# Parameter counts and names.
# ----------------------------------------------------------------------------


def _closed_form_count(patch, hidden, layers, mlp, tokens, classes=1000):
  d = hidden
  per_block = (
      2 * d                # LayerNorm_0
      + 3 * (d * d + d)    # query, key, value (heads x head_dim = d)
      + (d * d + d)        # out projection
      + 2 * d              # LayerNorm_2
      + (d * mlp + mlp)    # MlpBlock Dense_0
      + (mlp * d + d))     # MlpBlock Dense_1
  return (patch * patch * 3 * d + d  # patch embedding conv
          + d                        # cls token
          + tokens * d               # position embeddings
          + layers * per_block
          + 2 * d                    # encoder_norm
          + d * classes + classes)   # head


@pytest.mark.parametrize('name,published', [
    ('vit_ti16', 5_717_416),
    ('vit_s16', 22_050_664),
    ('vit_b16', 86_567_656),
    ('vit_b32', 88_224_232),
    ('vit_l16', 304_326_632),
])
def test_param_count_matches_published_and_closed_form(name, published):
  preset = vit.VIT_PRESETS[name]
  tokens = (224 // preset['patch_size'])**2 + 1
  closed = _closed_form_count(preset['patch_size'], preset['hidden_size'],
                              preset['num_layers'], preset['mlp_dim'], tokens)
  assert closed == published
  params = _abstract_params(VisionTransformer(num_classes=1000, **preset))
  assert _num_params(params) == published


def _expected_b16_shapes():
  d, heads, mlp = 768, 12, 3072
  shapes = {
      'embedding/kernel': (16, 16, 3, d),
      'embedding/bias': (d,),
      'cls': (1, 1, d),
      'Transformer/posembed_input/pos_embedding': (1, 197, d),
      'Transformer/encoder_norm/scale': (d,),
      'Transformer/encoder_norm/bias': (d,),
      'head/kernel': (d, 1000),
      'head/bias': (1000,),
  }
  for i in range(12):
    blk = f'Transformer/encoderblock_{i}'
    for ln in ('LayerNorm_0', 'LayerNorm_2'):
      shapes[f'{blk}/{ln}/scale'] = (d,)
      shapes[f'{blk}/{ln}/bias'] = (d,)
    for proj in ('query', 'key', 'value'):
      shapes[f'{blk}/MultiHeadDotProductAttention_1/{proj}/kernel'] = (d, heads, d // heads)
      shapes[f'{blk}/MultiHeadDotProductAttention_1/{proj}/bias'] = (heads, d // heads)
    shapes[f'{blk}/MultiHeadDotProductAttention_1/out/kernel'] = (heads, d // heads, d)
    shapes[f'{blk}/MultiHeadDotProductAttention_1/out/bias'] = (d,)
    shapes[f'{blk}/MlpBlock_3/Dense_0/kernel'] = (d, mlp)
    shapes[f'{blk}/MlpBlock_3/Dense_0/bias'] = (mlp,)
    shapes[f'{blk}/MlpBlock_3/Dense_1/kernel'] = (mlp, d)
    shapes[f'{blk}/MlpBlock_3/Dense_1/bias'] = (d,)
  return shapes


@pytest.mark.parametrize('remat', [False, True])
def test_param_paths_match_vit_jax_checkpoint_names(remat):
  model = VisionTransformer(num_classes=1000, remat=remat, **vit.VIT_PRESETS['vit_b16'])
  params = _flat(_abstract_params(model))
  actual = {k: tuple(v.shape) for k, v in params.items()}
  assert actual == _expected_b16_shapes()
  assert all(v.dtype == jnp.float32 for v in params.values())


# ----------------------------------------------------------------------------
# Outputs, dtypes and head variants.
# ----------------------------------------------------------------------------


def test_bfloat16_compute_gives_float32_logits_and_float32_params():
  x = _images()
  model16 = _tiny(dtype=jnp.bfloat16, head_init='lecun_normal')
  variables = jax.eval_shape(lambda: model16.init(jax.random.key(0), x, train=False))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
  params = _random_params(model16)
  out16 = model16.apply({'params': params}, x, train=False)
  out32 = _tiny(head_init='lecun_normal').apply({'params': params}, x, train=False)
  assert out16.shape == (2, 5) and out16.dtype == jnp.float32
  # bfloat16 really is the compute dtype: close to float32, but not equal.
  np.testing.assert_allclose(out16, out32, atol=0.15 * np.abs(out32).max())
  assert not np.allclose(out16, out32, atol=1e-5, rtol=0)


def test_bfloat16_blocks_compute_in_bfloat16_on_a_float32_residual_stream():
  x = _images()
  model = _tiny(dtype=jnp.bfloat16)
  _, state = model.apply({'params': _random_params(model)}, x, train=False,
                         capture_intermediates=True, mutable=['intermediates'])
  block = state['intermediates']['Transformer']['encoderblock_0']
  assert block['MlpBlock_3']['Dense_0']['__call__'][0].dtype == jnp.bfloat16
  assert block['MlpBlock_3']['__call__'][0].dtype == jnp.bfloat16
  assert block['__call__'][0].dtype == jnp.float32  # x + MLP(LN(x)), added in float32


def test_zero_head_init_outputs_the_head_bias():
  x = _images()
  model = _tiny(head_bias_init=-6.9, num_layers=1)
  variables = jax.jit(model.init, static_argnames='train')(jax.random.key(0), x, train=False)
  out = model.apply(variables, x, train=False)
  np.testing.assert_allclose(out, np.full((2, 5), -6.9), rtol=1e-6)


def test_gap_classifier_has_no_cls_token():
  params = _flat(_abstract_params(_tiny(classifier='gap'), size=8))
  assert 'cls' not in params
  assert params['Transformer/posembed_input/pos_embedding'].shape == (1, 4, 16)
  params_token = _flat(_abstract_params(_tiny(), size=8))
  assert params_token['cls'].shape == (1, 1, 16)
  assert params_token['Transformer/posembed_input/pos_embedding'].shape == (1, 5, 16)


def test_num_classes_zero_returns_features():
  model = _tiny(num_classes=0)
  params = _random_params(model)
  assert 'head' not in params
  x = _images(3)
  out = model.apply({'params': params}, x, train=False)
  assert out.shape == (3, 16) and out.dtype == jnp.float32
  # The features are the encoder-normed class token.
  ref = np_vit(x.astype(np.float64), _to_np64(params), patch=4, num_layers=2, eps=1e-6,
               approximate=True, classifier='token', representation_size=None,
               num_classes=0)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_representation_size_adds_pre_logits():
  model = _tiny(representation_size=7)
  params = _random_params(model)
  assert params['pre_logits']['kernel'].shape == (16, 7)
  assert params['head']['kernel'].shape == (7, 5)
  features = _tiny(num_classes=0, representation_size=7)
  out = features.apply({'params': {k: v for k, v in params.items() if k != 'head'}},
                       _images(), train=False)
  assert out.shape == (2, 7)
  # tanh pre-logits: features lie strictly inside (-1, 1).
  assert np.all(np.abs(out) < 1.0)


def test_invalid_classifier_and_head_init_raise():
  with pytest.raises(ValueError, match='classifier'):
    _abstract_params(_tiny(classifier='mean'), size=8)
  with pytest.raises(ValueError, match='head_init'):
    _abstract_params(_tiny(head_init='ones'), size=8)


# ----------------------------------------------------------------------------
# Numerics against the numpy reference.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize('approximate', [True, False])
@pytest.mark.parametrize('eps', [1e-6, 0.5])
def test_encoder_block_matches_numpy(approximate, eps):
  block = vit.Encoder1DBlock(num_heads=4, mlp_dim=32, gelu_approximate=approximate,
                             layer_norm_eps=eps, dropout_rate=0.0,
                             attention_dropout_rate=0.0, dtype=jnp.float32)
  x = np.random.RandomState(1).normal(size=(2, 5, 16)).astype(np.float32)
  shapes = jax.eval_shape(lambda: block.init(jax.random.key(0), x, False))['params']
  rng = np.random.RandomState(3)
  params = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.normal(size=s.shape), s.dtype), shapes)
  out = block.apply({'params': params}, x, False)
  ref = np_block(x.astype(np.float64), _to_np64(params), eps, approximate)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  # The attention must actually mix tokens: changing one token moves the others.
  x2 = x.copy()
  x2[:, 0] += np.linspace(-1.0, 1.0, 16, dtype=np.float32)
  out2 = block.apply({'params': params}, x2, False)
  assert not np.allclose(out2[:, 1:], out[:, 1:], atol=1e-4)


@pytest.mark.parametrize('classifier', ['token', 'gap'])
@pytest.mark.parametrize('approximate,eps,representation_size', [
    (True, 1e-6, None),
    (False, 1e-12, None),
    (False, 0.5, 6),
])
def test_full_vit_matches_numpy(classifier, approximate, eps, representation_size):
  model = _tiny(classifier=classifier, gelu_approximate=approximate, layer_norm_eps=eps,
                representation_size=representation_size)
  params = _random_params(model)
  x = _images(3)
  out = model.apply({'params': params}, x, train=False)
  ref = np_vit(x.astype(np.float64), _to_np64(params), patch=4, num_layers=2, eps=eps,
               approximate=approximate, classifier=classifier,
               representation_size=representation_size, num_classes=5)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_gelu_approximate_switches_the_model_gelu():
  x = _images()
  params = _random_params(_tiny(), scale=0.5)
  out_tanh = _tiny(gelu_approximate=True).apply({'params': params}, x, train=False)
  out_erf = _tiny(gelu_approximate=False).apply({'params': params}, x, train=False)
  assert not np.allclose(out_tanh, out_erf, atol=1e-6, rtol=0)


@pytest.mark.parametrize('approximate', [True, False])
def test_mlp_block_gelu_matches_numpy(approximate):
  block = vit.MlpBlock(mlp_dim=64, gelu_approximate=approximate, dropout_rate=0.0,
                       dtype=jnp.float32)
  # Wide inputs so the erf and tanh forms differ by far more than the tolerance.
  x = 3.0 * np.random.RandomState(0).normal(size=(4, 8)).astype(np.float32)
  shapes = jax.eval_shape(lambda: block.init(jax.random.key(0), x, train=False))['params']
  rng = np.random.RandomState(1)
  params = jax.tree.map(lambda s: jnp.asarray(0.5 * rng.normal(size=s.shape), s.dtype), shapes)
  out = np.asarray(block.apply({'params': params}, x, train=False), np.float64)
  p64 = _to_np64(params)
  ref = np_mlp(x.astype(np.float64), p64, approximate)
  other = np_mlp(x.astype(np.float64), p64, not approximate)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
  # ...and not the other GELU form (the inputs are wide enough to tell them apart).
  assert not np.allclose(out, other, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('eps', [1e-6, 1e-12])
def test_layer_norm_eps_on_tiny_variance_input(eps):
  # Tokens with variance ~1e-8: eps=1e-6 dominates the variance, eps=1e-12 does
  # not, so the two settings give very different LayerNorm outputs.
  model = _tiny(layer_norm_eps=eps, classifier='gap', num_classes=0, num_layers=0)
  params = _random_params(model)
  params['embedding'] = {'kernel': 1e-4 * params['embedding']['kernel'],
                         'bias': jnp.zeros_like(params['embedding']['bias'])}
  params['Transformer']['posembed_input']['pos_embedding'] = jnp.zeros((1, 4, 16))
  params['Transformer']['encoder_norm'] = {'scale': jnp.ones(16), 'bias': jnp.zeros(16)}
  x = _images()
  out = model.apply({'params': params}, x, train=False)
  ref = np_vit(x.astype(np.float64), _to_np64(params), patch=4, num_layers=0, eps=eps,
               approximate=True, classifier='gap', representation_size=None,
               num_classes=0)
  np.testing.assert_allclose(out, ref, rtol=1e-3, atol=1e-4)
  if eps == 1e-12:
    assert np.abs(ref).max() > 0.3  # normalised to unit scale
  else:
    assert np.abs(ref).max() < 0.3  # attenuated by eps >> variance


# ----------------------------------------------------------------------------
# Dropout and remat.
# ----------------------------------------------------------------------------


def test_dropout_needs_rng_and_changes_training_outputs():
  model = _tiny(dropout_rate=0.3, attention_dropout_rate=0.3)
  params = _random_params(model)
  x = _images()
  with pytest.raises(Exception, match='dropout'):
    model.apply({'params': params}, x, train=True)
  eval_out = model.apply({'params': params}, x, train=False)
  # train=False is deterministic and needs no rng: it equals the no-dropout model.
  np.testing.assert_allclose(eval_out, _tiny().apply({'params': params}, x, train=False),
                             rtol=1e-6, atol=1e-6)
  a = model.apply({'params': params}, x, train=True, rngs={'dropout': jax.random.key(0)})
  a2 = model.apply({'params': params}, x, train=True, rngs={'dropout': jax.random.key(0)})
  b = model.apply({'params': params}, x, train=True, rngs={'dropout': jax.random.key(1)})
  assert not np.allclose(a, eval_out, atol=1e-4)
  assert not np.allclose(a, b, atol=1e-4)
  np.testing.assert_array_equal(a, a2)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_self_attention_matches_flax_multi_head_attention(dtype):
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 8)), jnp.float32)
  ours = vit.SelfAttention(num_heads=2, dropout_rate=0.0, dtype=dtype)
  ref = nn.MultiHeadDotProductAttention(num_heads=2, dtype=jnp.float32,
                                        kernel_init=nn.initializers.xavier_uniform())
  params = ours.init(jax.random.key(0), x, deterministic=True)
  ref_params = ref.init(jax.random.key(0), x, x)
  # Same tree and initial values: vit_jax checkpoints and older runs load unchanged.
  jax.tree.map(np.testing.assert_array_equal, params, ref_params)
  params = jax.tree.map(lambda p: p + 0.05, params)  # Non-zero biases.
  y, state = ours.apply(params, x, deterministic=True, sow_weights=True, mutable=['intermediates'])
  tol = 1e-5 if dtype == jnp.float32 else 3e-2
  np.testing.assert_allclose(np.asarray(y, np.float32), ref.apply(params, x, x), rtol=tol, atol=tol)
  weights = state['intermediates']['attention_weights'][0]
  assert weights.shape == (2, 2, 5, 5)
  np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5)


def test_remat_gives_identical_outputs_and_grads():
  # Training mode with dropout: the remat'd blocks must also draw the same masks.
  train = True
  # One block keeps the two compilations cheap; the 12-block tree is checked above.
  plain = _tiny(dropout_rate=0.2, attention_dropout_rate=0.2, num_layers=1)
  remat = _tiny(dropout_rate=0.2, attention_dropout_rate=0.2, num_layers=1, remat=True)
  params = _random_params(plain)
  x = _images()
  rngs = {'dropout': jax.random.key(5)}

  def loss(model, p):
    out = model.apply({'params': p}, x, train=train, rngs=rngs)
    return jnp.sum(out * jnp.arange(1.0, 6.0)), out

  (_, o1), g1 = jax.jit(jax.value_and_grad(lambda p: loss(plain, p), has_aux=True))(params)
  (_, o2), g2 = jax.jit(jax.value_and_grad(lambda p: loss(remat, p), has_aux=True))(params)
  np.testing.assert_allclose(o1, o2, rtol=1e-6, atol=1e-6)
  assert jax.tree.structure(g1) == jax.tree.structure(g2)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # Gradients reach the first block (the remat'd blocks are differentiated).
  first = g2['Transformer']['encoderblock_0']['MlpBlock_3']['Dense_0']['kernel']
  assert np.abs(first).max() > 0


# ----------------------------------------------------------------------------
# create_model, vit_architecture and the model configs.
# ----------------------------------------------------------------------------


def test_create_model_preset_with_override():
  cfg = base_config.vit_model_config('vit_s16')
  cfg.hidden_size = 192
  arch = models.vit_architecture(cfg)
  assert arch == dict(vit.VIT_PRESETS['vit_s16'], hidden_size=192)
  model = models.create_model(cfg, num_classes=7, dtype=jnp.bfloat16)
  assert isinstance(model, VisionTransformer)
  assert (model.patch_size, model.hidden_size, model.num_layers, model.num_heads,
          model.mlp_dim) == (16, 192, 12, 6, 1536)
  assert model.num_classes == 7 and model.dtype == jnp.bfloat16
  params = _flat(_abstract_params(model, size=32))
  assert params['head/kernel'].shape == (192, 7)


def test_create_model_passes_config_fields():
  cfg = base_config.vit_model_config('vit_ti16')
  cfg.gelu_approximate = False
  cfg.layer_norm_eps = 1e-12
  cfg.classifier = 'gap'
  cfg.representation_size = 32
  cfg.dropout_rate = 0.1
  cfg.attention_dropout_rate = 0.2
  cfg.head_init = 'lecun_normal'
  cfg.head_bias_init = -2.0
  cfg.remat = True
  model = models.create_model(cfg, num_classes=3, dtype=jnp.float32)
  assert (model.gelu_approximate, model.layer_norm_eps, model.classifier,
          model.representation_size, model.dropout_rate, model.attention_dropout_rate,
          model.head_init, model.head_bias_init, model.remat) == (
              False, 1e-12, 'gap', 32, 0.1, 0.2, 'lecun_normal', -2.0, True)


def test_create_model_explicit_vit_sizes():
  cfg = base_config.vit_model_config('vit')
  for k, v in _TINY.items():
    cfg[k] = v
  model = models.create_model(cfg, num_classes=5, dtype=jnp.float32)
  assert models.vit_architecture(cfg) == _TINY
  out = model.apply({'params': _random_params(model)}, _images(), train=False)
  assert out.shape == (2, 5)


def test_create_model_vit_missing_size_names_the_field():
  cfg = base_config.vit_model_config('vit')
  cfg.patch_size = 16
  cfg.hidden_size = 64
  cfg.num_heads = 4
  cfg.mlp_dim = 128
  with pytest.raises(ValueError, match='num_layers'):
    models.create_model(cfg, num_classes=5, dtype=jnp.float32)
  cfg.num_layers = 2
  cfg.mlp_dim = None
  with pytest.raises(ValueError, match='mlp_dim') as e:
    models.create_model(cfg, num_classes=5, dtype=jnp.float32)
  assert 'num_layers' not in str(e.value)


def test_create_model_unknown_name_lists_valid_names():
  cfg = base_config.vit_model_config('vit_b16')
  cfg.name = 'vit_h14'
  with pytest.raises(ValueError, match='vit_h14') as e:
    models.create_model(cfg, num_classes=5, dtype=jnp.float32)
  for name in list(vit.VIT_PRESETS) + ['vit'] + list(resnet.RESNET_PRESETS):
    assert name in str(e.value)


def test_create_model_family_mismatch():
  cfg = base_config.vit_model_config('vit_b16')
  cfg.name = 'resnet50'
  with pytest.raises(ValueError, match='ResNet.*other family'):
    models.create_model(cfg, num_classes=5, dtype=jnp.float32)
  cfg = base_config.resnet_model_config('resnet18')
  cfg.name = 'vit_b16'
  with pytest.raises(ValueError, match='ViT.*other family'):
    models.create_model(cfg, num_classes=5, dtype=jnp.float32)
  # The matching family builds.
  model = models.create_model(base_config.resnet_model_config('resnet18'), num_classes=5,
                              dtype=jnp.float32)
  assert isinstance(model, resnet.ResNet)


def test_model_config_constructors_reject_unknown_names():
  with pytest.raises(ValueError, match='vit_x'):
    base_config.vit_model_config('vit_x')
  with pytest.raises(ValueError, match='resnet7'):
    base_config.resnet_model_config('resnet7')
  assert base_config.vit_model_config('vit_l16').name == 'vit_l16'
  assert base_config.resnet_model_config('resnet101').variant == 'v1.5'
