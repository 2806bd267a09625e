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
from vit_jax_ft.models import batch_norm
from vit_jax_ft.models import layer_impl
from vit_jax_ft.models import precision


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
  for backend in ("gpu", "cuda", "rocm", "tpu"):
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
