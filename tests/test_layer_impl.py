"""model.layer_impl: the project's layers and plain Flax layers are the same model.

Same parameter trees and initial values, the same outputs, BatchNorm statistics
and gradients (float32 tolerance) for ResNet and ViT, and 'auto' resolves per
backend as models/layer_impl.py documents.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax_ft import base_config
from vit_jax_ft import config_ranges
from vit_jax_ft import models
from vit_jax_ft import workdir
from vit_jax_ft.models import batch_norm
from vit_jax_ft.models import layer_impl
from vit_jax_ft.models import precision
from vit_jax_ft.reports import saliency
from vit_jax_ft.training import probe


def _tiny_vit():
  cfg = base_config.vit_model_config("vit")
  cfg.update(dict(patch_size=4, hidden_size=16, num_layers=2, num_heads=2, mlp_dim=32,
                  representation_size=8, head_init="lecun_normal"))
  return cfg


def _tiny_resnet(name="resnet18"):
  cfg = base_config.resnet_model_config(name)
  cfg.head_init = "lecun_normal"
  return cfg


def _models(cfg, dtype=jnp.float32, **overrides):
  cfg.update(overrides)
  built = {}
  for impl in ("project", "flax"):
    cfg.layer_impl = impl
    built[impl] = models.create_model(cfg, 5, dtype)
  return built["project"], built["flax"]


def _loss_and_grads(model, variables, images, labels, rngs=None, train=True):
  def loss(params):
    out, mutated = model.apply({**variables, "params": params}, images, train=train,
                               mutable=["batch_stats"], rngs=rngs)
    logp = jax.nn.log_softmax(out)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], 1)), (out, mutated)

  (value, (out, mutated)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
      variables["params"])
  return value, out, mutated, grads


def _assert_close(a, b, rtol, atol, what):
  """allclose leaf by leaf; atol is a fraction of the largest magnitude in the whole tree."""
  flat_a, tree_a = jax.tree.flatten_with_path(a)
  flat_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b, what
  atol = atol * max((float(jnp.max(jnp.abs(y))) for y in flat_b), default=0.0)
  for (path, x), y in zip(flat_a, flat_b):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol,
                               err_msg=f"{what} {jax.tree_util.keystr(path)}")


@pytest.mark.parametrize("family", ["vit", "resnet18", "resnet50"])
def test_project_and_flax_layers_give_the_same_model(family):
  if family == "vit":
    cfg, size = _tiny_vit(), 16
  else:  # 64 px: the last stage's BatchNorms still see 2x2 pixels per image (at 1x1 the
    # batch statistics of 3 values amplify rounding differences ~30x).
    cfg, size = _tiny_resnet(family), 64
  project, flax_model = _models(cfg)
  images = jax.random.normal(jax.random.PRNGKey(1), (3, size, size, 3))
  labels = jnp.array([0, 3, 4])
  init = lambda m: m.init(jax.random.PRNGKey(0), images[:1], train=False)
  variables = init(project)
  # Same names, shapes and initial values: checkpoints are shared.
  _assert_close(variables, init(flax_model), 0, 0, "init")

  for train in (False, True):
    outs = [m.apply(variables, images, train=train, mutable=["batch_stats"])[0]
            for m in (project, flax_model)]
    # Train mode: ResNet-50's last BatchNorms normalise over 12 values (2x2 pixels, 3
    # images), which amplifies the float32 rounding of the two summation orders.
    _assert_close(outs[0], outs[1], 1e-3, 1e-4 if train else 1e-5, f"logits (train={train})")
  # Inference-mode BatchNorm is affine: the gradients of every conv, pool and dense agree
  # to float32 rounding.
  grads = [_loss_and_grads(m, variables, images, labels, train=False)[3]
           for m in (project, flax_model)]
  _assert_close(grads[0], grads[1], 1e-3, 1e-5, "grads (train=False)")
  results = [_loss_and_grads(m, variables, images, labels) for m in (project, flax_model)]
  (loss_p, _, stats_p, grads_p), (loss_f, _, stats_f, grads_f) = results
  # Train-mode BatchNorm over 12 values, as for the logits above (1.9e-5 apart on an AMD
  # EPYC).
  np.testing.assert_allclose(loss_p, loss_f, rtol=1e-4)
  _assert_close(stats_p, stats_f, 1e-3, 1e-4, "batch_stats")
  # Training mode: ResNet-50's backward pass through 16 blocks of batch statistics over few
  # values amplifies float32 rounding towards the stem: at 64 px both paths' stem gradients
  # lie 1-2.6% (of the largest entry) from a float64 run, so they can differ by that much.
  atol = 5e-2 if family == "resnet50" else 1e-5
  _assert_close(grads_p, grads_f, 1e-3, atol, "grads (train=True)")


def test_drop_path_and_frozen_batch_norm_agree_across_layer_impls():
  """The flax path applies drop path's per-sample scale and frozen BatchNorms as the project's."""
  cfg = _tiny_resnet("resnet18")
  cfg.drop_path_rate = 0.5
  project, flax_model = _models(cfg)
  project, flax_model = (m.clone(frozen_bn=("bn_init", "stage1_block1/bn1"))
                         for m in (project, flax_model))
  images = jax.random.normal(jax.random.PRNGKey(1), (4, 64, 64, 3))
  variables = project.init(jax.random.PRNGKey(0), images[:1], train=False)
  rngs = {"dropout": jax.random.PRNGKey(7)}
  labels = jnp.array([0, 1, 2, 3])
  (_, out_p, stats_p, grads_p), (_, out_f, stats_f, grads_f) = (
      _loss_and_grads(m, variables, images, labels, rngs) for m in (project, flax_model))
  _assert_close(out_p, out_f, 1e-4, 1e-5, "logits")
  _assert_close(stats_p, stats_f, 1e-3, 1e-4, "batch_stats")
  np.testing.assert_array_equal(stats_p["batch_stats"]["bn_init"]["mean"],
                                variables["batch_stats"]["bn_init"]["mean"])  # frozen
  _assert_close(grads_p, grads_f, 1e-3, 1e-5, "grads")


def test_bfloat16_paths_stay_close():
  """In bfloat16 the two paths round differently, but compute the same function."""
  project, flax_model = _models(_tiny_vit(), jnp.bfloat16)
  images = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3))
  variables = project.init(jax.random.PRNGKey(0), images[:1], train=False)
  a, b = (np.asarray(m.apply(variables, images, train=False)) for m in (project, flax_model))
  assert np.abs(a - b).max() <= 0.05 * np.abs(a).max() + 1e-3


def test_auto_resolves_per_backend_as_documented():
  project = layer_impl.Layers()
  flax_layers = layer_impl.Layers(**{k: "flax" for k in layer_impl.LAYER_KINDS})
  assert layer_impl.resolve("auto", "cpu") == project
  # GPUs: plain Flax with cuDNN's fused attention (which falls back off CUDA).
  assert layer_impl.resolve("auto", "gpu") == layer_impl.Layers(
      **{**{k: "flax" for k in layer_impl.LAYER_KINDS}, "attention": "cudnn"})
  for backend in ("tpu", "metal"):
    assert layer_impl.resolve("auto", backend) == flax_layers
  assert layer_impl.resolve("auto") == layer_impl.resolve("auto", jax.default_backend())
  assert layer_impl.resolve("flax", "cpu") == flax_layers
  assert layer_impl.resolve("project", "gpu") == project
  assert project.name == "project" and flax_layers.name == "flax"
  assert layer_impl.resolve(flax_layers) is flax_layers
  # create_model resolves at construction, for the backend it runs on (CPU here).
  for cfg in (_tiny_vit(), _tiny_resnet()):
    assert cfg.layer_impl == "auto"
    assert models.create_model(cfg, 5, jnp.float32).layer_impl == layer_impl.resolve(
        "auto", jax.default_backend())
  # The classes each path builds.
  assert project.conv_module() is precision.Conv and flax_layers.conv_module() is nn.Conv
  assert project.norm_module() is batch_norm.BatchNorm
  assert flax_layers.norm_module() is layer_impl.FlaxBatchNorm
  assert project.dense_module() is precision.DenseGeneral


def test_unknown_layer_impl_is_refused_with_the_choices():
  cfg = _tiny_resnet()
  cfg.layer_impl = "gpu"
  with pytest.raises(ValueError, match=r"model.layer_impl must be one of 'auto', 'project', "
                                       r"'flax', got 'gpu'"):
    models.create_model(cfg, 5, jnp.float32)
  config = base_config.get_base_config()
  config.model.layer_impl = "cudnn"
  with pytest.raises(ValueError, match=r"config.model.layer_impl='cudnn' must be one of"):
    config_ranges.check_ranges(config)
  config.model.layer_impl = "flax"
  config_ranges.check_ranges(config)


@pytest.mark.parametrize("size", [37, 38])
def test_tf_same_padding_agrees_across_layer_impls(size):
  """TF Model Garden ResNets (padding='tf_same'): both paths pad the convs and pool alike,
  on odd and even sides (TF 'SAME' pads asymmetrically at stride 2)."""
  project, flax_model = _models(_tiny_resnet("resnet18"), padding="tf_same",
                                first_block_projection=True)
  images = jax.random.normal(jax.random.PRNGKey(1), (2, size, size, 3))
  variables = project.init(jax.random.PRNGKey(0), images[:1], train=False)
  outs = [m.apply(variables, images, train=False) for m in (project, flax_model)]
  _assert_close(outs[0], outs[1], 1e-4, 1e-5, "logits")
  torch_style = _models(_tiny_resnet("resnet18"), first_block_projection=True)[1]
  # The padding really is different (else this test could not fail).
  assert not np.allclose(torch_style.apply(variables, images, train=False), outs[1], atol=1e-3)


def _qkv(dtype, shape=(2, 197, 3, 64)):
  keys = jax.random.split(jax.random.PRNGKey(3), 3)
  return [jax.random.normal(k, shape, jnp.float32).astype(dtype) for k in keys]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("tokens", [197, 64])
def test_fused_attention_computes_flax_attention(dtype, tokens):
  """jax.nn.dot_product_attention as called for cuDNN (here its XLA form, same arguments):
  [batch, tokens, heads, head_dim] in, 1/sqrt(head_dim) scale, the same result as Flax's
  and the project's attention at ViT-B/16's 197 tokens (padded to 200, masked) and head
  size 64, and at 64 tokens (no padding)."""
  q, k, v = _qkv(dtype, (2, tokens, 3, 64))
  fused = layer_impl.fused_attention(q, k, v, implementation="xla")
  flax_out = layer_impl._flax_attention(q, k, v, dtype=dtype)
  project = precision.attention(q, k, v, dtype=dtype)
  assert fused.shape == flax_out.shape == q.shape and fused.dtype == dtype
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(np.asarray(fused, np.float32), np.asarray(flax_out, np.float32),
                             rtol=tol, atol=tol)
  np.testing.assert_allclose(np.asarray(project, np.float32), np.asarray(flax_out, np.float32),
                             rtol=tol, atol=tol)


def test_cudnn_attention_says_when_it_cannot_run():
  ok = dict(dropout=False, sow=False)
  assert "attention maps" in layer_impl.cudnn_unsupported(64, jnp.bfloat16, dropout=False,
                                                          sow=True)
  assert "dropout" in layer_impl.cudnn_unsupported(64, jnp.bfloat16, dropout=True, sow=False)
  assert "float32" in layer_impl.cudnn_unsupported(64, jnp.float32, **ok)
  assert "head size 12" in layer_impl.cudnn_unsupported(12, jnp.bfloat16, **ok)
  assert "head size 256" in layer_impl.cudnn_unsupported(256, jnp.float16, **ok)
  if not layer_impl.on_cuda():
    assert "not CUDA" in layer_impl.cudnn_unsupported(64, jnp.bfloat16, **ok)
  with pytest.raises(ValueError, match=r"Layers.conv must be one of 'project', 'flax', got "
                                       r"'cudnn'"):
    layer_impl.Layers(conv="cudnn")


def _vit_pair(attention_layers, dtype=jnp.bfloat16):
  cfg = _tiny_vit()
  cfg.update(dict(hidden_size=32, num_heads=2))  # head size 16: one cuDNN takes
  cfg.layer_impl = "flax"
  flax_model = models.create_model(cfg, 5, dtype)
  return flax_model, flax_model.clone(layer_impl=attention_layers)


def test_cudnn_attention_in_a_vit_is_flax_attention(monkeypatch):
  """The ViT wired to cuDNN attention: off CUDA it is Flax's attention, bit for bit; with
  the CUDA check passed (and the fused call in its XLA form) the same model to bf16
  rounding, so the q/k/v layout handed to the fused kernel is the right one."""
  cudnn_layers = layer_impl.Layers(**{**{k: "flax" for k in layer_impl.LAYER_KINDS},
                                      "attention": "cudnn"})
  flax_model, cudnn_model = _vit_pair(cudnn_layers)
  images = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3))
  variables = flax_model.init(jax.random.PRNGKey(0), images[:1], train=False)
  reference = np.asarray(flax_model.apply(variables, images, train=False), np.float32)
  if not layer_impl.on_cuda():
    np.testing.assert_array_equal(
        np.asarray(cudnn_model.apply(variables, images, train=False), np.float32), reference)
  calls, real_fused = [], layer_impl.fused_attention

  def fused_in_xla(q, k, v, implementation="cudnn"):
    calls.append((q.shape, implementation))
    return real_fused(q, k, v, implementation="xla")

  monkeypatch.setattr(layer_impl, "on_cuda", lambda: True)
  monkeypatch.setattr(layer_impl, "fused_attention", fused_in_xla)
  fused = np.asarray(cudnn_model.apply(variables, images, train=False), np.float32)
  assert calls == [((2, 17, 2, 16), "cudnn")] * 2  # two blocks, 16 patches + the class token
  np.testing.assert_allclose(fused, reference, atol=0.03 * np.abs(reference).max())
  # Attention maps (sow) and float32 keep Flax's path even on CUDA.
  calls.clear()
  _, maps = saliency.vit_attentions(cudnn_model, variables, images)
  assert calls == [] and len(maps) == 2 and maps[0].shape == (2, 2, 17, 17)
  _, cudnn_f32 = _vit_pair(cudnn_layers, jnp.float32)
  cudnn_f32.apply(variables, images, train=False)
  assert calls == []


def test_cpu_compiler_options_are_xla_defaults_less_ynnpack_convolutions():
  assert layer_impl.compiler_options("project", "cpu") == layer_impl.CPU_COMPILER_OPTIONS
  assert layer_impl.compiler_options("auto", "cpu") == layer_impl.CPU_COMPILER_OPTIONS
  for impl, backend in (("flax", "cpu"), ("auto", "gpu"), ("project", "gpu"), ("auto", "tpu")):
    assert layer_impl.compiler_options(impl, backend) is None, (impl, backend)
  assert layer_impl.compiler_options(layer_impl.Layers(conv="flax"), "cpu") is None

  def fn(x, w, m):  # A 3x3 conv, a matmul and a sum: one of each YNNPACK fusion kind.
    y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y, y.reshape(-1, 32) @ m, jnp.sum(y, axis=(0, 1, 2))

  rng = np.random.default_rng(0)
  args = [jnp.asarray(rng.normal(size=s), jnp.float32)
          for s in ((2, 12, 12, 32), (3, 3, 32, 32), (32, 64))]
  lowered = jax.jit(fn).lower(*args)
  default = lowered.compile()
  tuned = lowered.compile(compiler_options=layer_impl.CPU_COMPILER_OPTIONS)
  # If a jaxlib changes XLA:CPU's defaults this fails: re-measure and update the list.
  assert layer_impl.ynn_fusion_kinds(default.as_text()) == {"convolution": 1, "dot": 1, "reduce": 1}
  assert layer_impl.ynn_fusion_kinds(tuned.as_text()) == {"dot": 1, "reduce": 1}
  # The same numbers, and the right ones: float64 taps over the zero-padded input.
  x, w, m = (np.asarray(a, np.float64) for a in args)
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  conv = sum(np.einsum("nhwc,cd->nhwd", xp[:, i:i + 12, j:j + 12], w[i, j])
             for i in range(3) for j in range(3))
  for got_default, got_tuned, want in zip(default(*args), tuned(*args),
                                          (conv, conv.reshape(-1, 32) @ m, conv.sum((0, 1, 2)))):
    scale = np.abs(want).max()
    np.testing.assert_allclose(np.asarray(got_tuned), want, atol=1e-5 * scale)
    np.testing.assert_allclose(np.asarray(got_tuned), np.asarray(got_default), atol=1e-5 * scale)


def test_the_compiled_model_functions_take_the_cpu_compiler_options():
  cfg = _tiny_resnet()
  project, flax_model = _models(cfg)
  images = jnp.zeros((2, 32, 32, 3))
  for model, ynn_convs in ((project, 0), (flax_model, None)):
    variables = model.init(jax.random.PRNGKey(0), images, train=False)
    for compiled in (
        workdir.make_apply(model, multilabel=False).lower(variables, images).compile(),
        probe.features_fn(model).lower(model, variables, images, flip=True).compile()):
      counts = layer_impl.ynn_fusion_kinds(compiled.as_text())
      if ynn_convs is None:  # 'flax' keeps XLA's defaults: its 3x3 convs on YNNPACK.
        assert counts["convolution"] > 0, counts
      else:
        assert counts["convolution"] == ynn_convs and counts["dot"] > 0, counts
