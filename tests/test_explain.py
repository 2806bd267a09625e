"""Explanations: rollout and Grad-CAM by hand; heat maps on the region that decides the class."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from test_evaluate import make_workdir  # pylint: disable=g-bad-import-order
from test_predict import _export_split
from test_train import make_step
from test_train import tiny_demo_config
from test_train import tiny_vit
from vit_jax_ft import base_config
from vit_jax_ft import explain
from vit_jax_ft import models
from vit_jax_ft import workdir as workdir_lib
from vit_jax_ft.inputs import pipeline
from vit_jax_ft.models import resnet
from vit_jax_ft.reports import saliency
from vit_jax_ft.training import steps

IMAGE = 32
QUADRANT = IMAGE // 2
BAR_LONG, BAR_SHORT = 10, 3


def test_rollout_matches_a_hand_computation():
  a1 = np.array([[0.5, 0.5, 0.0], [0.2, 0.2, 0.6], [0.0, 1.0, 0.0]])
  a2 = np.array([[0.1, 0.0, 0.9], [1.0, 0.0, 0.0], [0.3, 0.3, 0.4]])
  # Two heads per layer that average to a1 / a2.
  heads = lambda a: jnp.asarray(np.stack([a + 0.05 * np.eye(3) - 0.05 / 3, a - 0.05 * np.eye(3)
                                          + 0.05 / 3])[None], jnp.float32)
  got = saliency.attention_rollout([heads(a1), heads(a2)])[0]
  mix = lambda a: 0.5 * a + 0.5 * np.eye(3)
  np.testing.assert_allclose(got, mix(a2) @ mix(a1), atol=1e-6)
  np.testing.assert_allclose(np.asarray(got).sum(axis=1), 1.0, atol=1e-6)


def test_attention_capture_in_low_precision_leaves_the_output_alone():
  # bfloat16 attention runs models/precision.py's attention function, which sows its
  # weights itself; float32 (Flax's own) is exercised by the heat-map test below.
  dtype = jnp.bfloat16
  cfg = base_config.vit_model_config("vit")
  cfg.patch_size, cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.mlp_dim = 8, 32, 3, 2, 64
  cfg.head_init = "lecun_normal"
  model = models.create_model(cfg, 5, dtype)
  images = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
  variables = jax.jit(functools.partial(model.init, train=False))(jax.random.PRNGKey(1), images)
  logits, maps = saliency.explain_batch(model, variables, images)
  np.testing.assert_array_equal(logits, _apply(model)(variables, images))
  assert [m.shape for m in maps.values()] == [(2, 4, 4), (2, 4, 4)]
  # Softmax rows over 17 tokens: the 16 patches get all but the class token's share.
  for m in maps.values():
    total = m.sum(axis=(1, 2))
    assert np.all(total > 0.5) and np.all(total < 1.0 + 1e-2), total


def test_gradcam_of_a_logit_is_the_class_activation_map():
  # The head is Dense(mean over positions of A): d logit_c / dA_k = W[k, c] / (h * w), so
  # Grad-CAM of the raw logit is ReLU(sum_k W[k, c] A_k) / (h * w) (Zhou et al.'s CAM).
  model = resnet.ResNet(num_classes=3, stage_sizes=(1,), block="basic", width=4,
                        head_init="lecun_normal")
  images = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
  variables = jax.jit(functools.partial(model.init, train=False))(jax.random.PRNGKey(1), images)
  targets = jnp.array([2, 0])
  logits, cam = jax.jit(functools.partial(saliency.gradcam, model, multilabel=True))(
      variables, images, targets)
  _, state = jax.jit(functools.partial(model.apply, train=False, capture_intermediates=True,
                                       mutable=["intermediates"]))(variables, images)
  act = state["intermediates"][saliency.last_block_name(model)]["__call__"][0]
  kernel = variables["params"]["head"]["kernel"]
  hw = act.shape[1] * act.shape[2]
  expected = jax.nn.relu(jnp.einsum("bhwk,kb->bhw", act, kernel[:, targets])) / hw
  np.testing.assert_allclose(cam, expected, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(logits, _apply(model)(variables, images), rtol=1e-6)


def _apply(model):
  return jax.jit(functools.partial(model.apply, train=False))


def _bars(rng, n):
  """Noise with at most one bar: class 0 horizontal, 1 vertical, 2 none.

  The bar sits anywhere inside a random quadrant; `region` is that quadrant.
  The bar-less class matters: with only two classes a model may learn one
  detector ("vertical, else horizontal"), and then the evidence for the
  default class is an absence, which has no location.
  """
  labels = rng.integers(0, 3, n)
  images = rng.normal(0.0, 0.3, (n, IMAGE, IMAGE, 3)).astype(np.float32)
  region = np.zeros((n, IMAGE, IMAGE), bool)
  for i, (label, quadrant) in enumerate(zip(labels, rng.integers(0, 4, n))):
    if label == 2:
      continue
    top, left = (quadrant // 2) * QUADRANT, (quadrant % 2) * QUADRANT
    h, w = (BAR_SHORT, BAR_LONG) if label == 0 else (BAR_LONG, BAR_SHORT)
    dy, dx = rng.integers(0, QUADRANT - h + 1), rng.integers(0, QUADRANT - w + 1)
    images[i, top + dy:top + dy + h, left + dx:left + dx + w] += 2.0
    region[i, top:top + QUADRANT, left:left + QUADRANT] = True
  return jnp.asarray(images), labels, region


@pytest.mark.parametrize("family", ["vit", "resnet"])
def test_heat_maps_fall_on_the_region_that_decides_the_class(family):
  # ViT: 4x4 patches of 8 px; ResNet: one stage, an 8x8 map (a deeper one on 32 px
  # images sees the whole image from every cell). A quadrant is a quarter of the image,
  # so a map that ignored the bar would put 25% of its mass there; we ask for twice that,
  # on average over held-out images (seen: 0.70-0.80).
  model = (tiny_vit(num_classes=3) if family == "vit" else
           resnet.ResNet(num_classes=3, stage_sizes=(1,), block="basic", width=8))
  step_fn, tx = make_step(model, lr=3e-3)
  state = steps.create_train_state(model, tx, IMAGE, seed=0)
  rng = np.random.default_rng(0)
  for _ in range(200):
    images, labels, _ = _bars(rng, 32)
    state, _ = step_fn(state, {"image": images, "targets": jax.nn.one_hot(labels, 3)})
  images, labels, region = _bars(np.random.default_rng(1), 64)
  variables = {"params": state.params}
  if state.batch_stats:
    variables["batch_stats"] = state.batch_stats
  logits, maps = saliency.explain_batch(model, variables, images)
  assert np.mean(logits.argmax(1) == labels) >= 0.7  # Learnt (chance: 1/3; seen: 0.73-1).
  with_bar = labels < 2
  main_map = "attention rollout" if family == "vit" else "Grad-CAM (stage1)"
  heat = saliency.to_image(maps[main_map], (IMAGE, IMAGE), method="nearest")
  mass = saliency.mass_inside(heat[with_bar], region[with_bar])
  assert mass.mean() > 0.5, mass
  # The same maps with the region moved to the diagonally opposite quadrant: near nothing.
  opposite = np.roll(region[with_bar], (QUADRANT, QUADRANT), axis=(1, 2))
  assert saliency.mass_inside(heat[with_bar], opposite).mean() < 0.15


def test_explain_writes_overlays_for_files_and_split_examples(tmp_path):
  config = tiny_demo_config(**{"model.head_init": "lecun_normal"})
  workdir = make_workdir(str(tmp_path / "run"), config, 10)
  run = workdir_lib.load_run(workdir)
  _export_split(run, "val", str(tmp_path / "images"), limit=2)
  (tmp_path / "images" / "bad.png").write_bytes(b"not an image")
  written = explain.explain(workdir, str(tmp_path / "files"), images=str(tmp_path / "images"))
  assert len(written) == 2 and all(os.path.getsize(p) > 5000 for p in written)
  written = explain.explain(workdir, str(tmp_path / "split"), split="test", num_images=1)
  assert [os.path.basename(p) for p in written] == [
      f"000_{pipeline.split_ids(run.data_dir, run.info, 'test')[0]}.png"]
  norm = run.config.data.normalization
  image = np.linspace(0, 255, 12, dtype=np.float32).reshape(2, 2, 3)
  for mode in ("imagenet", "minus_one_to_one", "zero_one", "caffe_bgr", norm):
    normalized = pipeline.normalize(tf.constant(image), mode).numpy()
    np.testing.assert_array_equal(explain.denormalize(normalized, mode), np.round(image))
