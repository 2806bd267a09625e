"""vit_jax and big_vision `.npz` checkpoints.

The ViT-B/16 file is written with the key names and shapes of the original
google-research/vision_transformer `ViT-B_16.npz` (ImageNet-21k: a
768-wide `pre_logits` layer and a 21843-class head), spelled out here rather
than derived from our model, with random values. big_vision files are derived
from a small vit_jax one the way big_vision itself lays them out.
"""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage

from vit_jax_ft import pretrained
from vit_jax_ft.inputs import normalization as normalization_lib
from vit_jax_ft.models import vit
from vit_jax_ft.pretrained import completeness
from vit_jax_ft.pretrained import loading
from vit_jax_ft.pretrained import testing


def vit_jax_b16_names():
  """(name, shape) of every array in vit_jax's ViT-B_16.npz (i21k)."""
  d, mlp, heads = 768, 3072, 12
  names = [("cls", (1, 1, d)), ("embedding/kernel", (16, 16, 3, d)), ("embedding/bias", (d,)),
           ("Transformer/posembed_input/pos_embedding", (1, 197, d)),
           ("Transformer/encoder_norm/scale", (d,)), ("Transformer/encoder_norm/bias", (d,)),
           ("pre_logits/kernel", (d, d)), ("pre_logits/bias", (d,)),
           ("head/kernel", (d, 21843)), ("head/bias", (21843,))]
  for i in range(12):
    b = f"Transformer/encoderblock_{i}/"
    names += [(b + "LayerNorm_0/scale", (d,)), (b + "LayerNorm_0/bias", (d,)),
              (b + "LayerNorm_2/scale", (d,)), (b + "LayerNorm_2/bias", (d,)),
              (b + "MlpBlock_3/Dense_0/kernel", (d, mlp)), (b + "MlpBlock_3/Dense_0/bias", (mlp,)),
              (b + "MlpBlock_3/Dense_1/kernel", (mlp, d)), (b + "MlpBlock_3/Dense_1/bias", (d,))]
    for p in ("query", "key", "value"):
      names += [(b + f"MultiHeadDotProductAttention_1/{p}/kernel", (d, heads, d // heads)),
                (b + f"MultiHeadDotProductAttention_1/{p}/bias", (heads, d // heads))]
    names += [(b + "MultiHeadDotProductAttention_1/out/kernel", (heads, d // heads, d)),
              (b + "MultiHeadDotProductAttention_1/out/bias", (d,))]
  return names


def _random_arrays(names, seed=0, scale=0.02):
  rng = np.random.default_rng(seed)
  return {k: (rng.standard_normal(shape, dtype=np.float32) * scale) for k, shape in names}


@pytest.fixture(scope="module")
def b16_npz(tmp_path_factory):
  arrays = _random_arrays(vit_jax_b16_names())
  path = tmp_path_factory.mktemp("npz") / "ViT-B_16.npz"
  np.savez(path, **arrays)
  return str(path), arrays


def test_vit_jax_b16_tree_matches_original_names(b16_npz):
  path, arrays = b16_npz
  converted = pretrained.convert(path, model_name="vit_b16")
  meta = converted.metadata
  assert meta["format"] == "vit_jax_npz" and meta["num_classes_original"] == 21843
  assert meta["architecture"]["representation_size"] == 768 and meta["image_size"] == 224
  assert meta["model_options"] == {"gelu_approximate": True, "layer_norm_eps": 1e-6}
  assert meta["normalization"] == "minus_one_to_one"
  flat = {k: v for k, v in pretrained.conversion.flatten(converted.params).items()}
  assert set(flat) == set(arrays)
  for k, v in arrays.items():
    np.testing.assert_array_equal(flat[k], v)
  # The tree is exactly what our i21k-shaped ViT-B/16 expects.
  model = vit.VisionTransformer(num_classes=21843, representation_size=768,
                                **vit.VIT_PRESETS["vit_b16"])
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)),
                                             train=False))["params"]
  assert jax.tree.map(lambda s: s.shape, shapes) == jax.tree.map(np.shape, converted.params)


def test_vit_jax_b16_finetunes_at_384(b16_npz, tmp_path):
  path, arrays = b16_npz
  model = vit.VisionTransformer(num_classes=0, **vit.VIT_PRESETS["vit_b16"])
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 384, 384, 3)),
                                             train=False))["params"]
  params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  result = pretrained.load_for_finetuning(path, model, params, {}, image_size=384,
                                          cache_dir=str(tmp_path))
  assert {p for p, _ in result.report.skipped_head} == {
      "params/head/kernel", "params/head/bias", "params/pre_logits/kernel",
      "params/pre_logits/bias"}
  # The grid is zoomed 14x14 -> 24x24 bilinearly, class token kept (vit_jax's recipe).
  old = arrays["Transformer/posembed_input/pos_embedding"]
  new = result.params["Transformer"]["posembed_input"]["pos_embedding"]
  np.testing.assert_array_equal(new[:, :1], old[:, :1])
  expected = scipy.ndimage.zoom(old[0, 1:].reshape(14, 14, -1), (24 / 14, 24 / 14, 1), order=1)
  np.testing.assert_allclose(new[0, 1:], expected.reshape(576, -1), atol=1e-7)
  features = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False))(
      result.params, normalization_lib.normalize(testing.photos(384), "minus_one_to_one"))
  assert features.shape == (2, 768) and np.all(np.isfinite(features))


def test_posemb_resize_of_a_linear_ramp_stays_linear():
  ramp = np.arange(4, dtype=np.float32)
  grid = (ramp[:, None, None] + 10 * ramp[None, :, None]) * np.ones((1, 1, 2), np.float32)
  posemb = np.concatenate([np.full((1, 1, 2), 7.0, np.float32), grid.reshape(1, 16, 2)], axis=1)
  out = loading.resize_posemb(posemb, (1, 1 + 7 * 7, 2), has_class_token=True)
  assert out[0, 0, 0] == 7.0
  out_grid = out[0, 1:, 0].reshape(7, 7)
  # Rows go 0..3 and columns 0..30 before and after (bilinear, corners aligned).
  np.testing.assert_allclose(np.diff(out_grid, axis=0), 0.5, atol=1e-5)
  np.testing.assert_allclose(np.diff(out_grid, axis=1), 5.0, atol=1e-5)
  np.testing.assert_allclose(out_grid[0, 0], 0.0, atol=1e-5)


# --- Small models: opt/target prefix and big_vision layouts ------------------

_SMALL = dict(patch_size=8, hidden_size=64, num_layers=3, num_heads=4, mlp_dim=128)


@pytest.fixture(scope="module")
def small_vit_jax():
  model = vit.VisionTransformer(num_classes=5, **_SMALL)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)["params"]
  rng = np.random.default_rng(1)
  flat = {k: np.asarray(v) + rng.standard_normal(np.shape(v), dtype=np.float32) * 0.05
          for k, v in pretrained.conversion.flatten(params).items()}
  return model, flat


def _logits(model, params):
  x = normalization_lib.normalize(testing.photos(32), "minus_one_to_one")
  return np.asarray(model.apply({"params": params}, x, train=False))


def _big_vision_layout(flat, scan):
  """The same weights as big_vision's ViT stores them."""
  rename = {"LayerNorm_0": "LayerNorm_0", "MultiHeadDotProductAttention_1":
            "MultiHeadDotProductAttention_0", "LayerNorm_2": "LayerNorm_1",
            "MlpBlock_3": "MlpBlock_0"}
  out = {}
  posemb = flat["Transformer/posembed_input/pos_embedding"]
  # big_vision adds position embeddings to the patches only; the class token's
  # share folds into `cls` (what its fix_old_checkpoints does).
  out["params/pos_embedding"] = posemb[:, 1:]
  out["params/cls"] = flat["cls"] + posemb[:, :1]
  per_layer = {}
  for k, v in flat.items():
    if k.startswith("Transformer/encoderblock_"):
      _, block, module, rest = k.split("/", 3)
      i = int(block.split("_")[1])
      per_layer.setdefault(f"{rename[module]}/{rest}", {})[i] = v
    elif k not in ("cls", "Transformer/posembed_input/pos_embedding"):
      out["params/" + k] = v
  for name, layers in per_layer.items():
    if scan:
      out[f"params/Transformer/encoderblock/{name}"] = np.stack([layers[i] for i in sorted(layers)])
    else:
      for i, v in layers.items():
        out[f"params/Transformer/encoderblock_{i}/{name}"] = v
  return out


def test_opt_target_prefix(small_vit_jax, tmp_path):
  model, flat = small_vit_jax
  path = tmp_path / "old.npz"
  np.savez(path, **{"opt/target/" + k: v for k, v in flat.items()}, **{"opt/state/step": 3})
  with pytest.raises(pretrained.ConversionError, match="opt/state/step"):
    pretrained.convert(str(path))  # Optimizer state has no place in the model...
  converted = pretrained.convert(str(path), strict=False)  # ...unless asked to drop it.
  np.testing.assert_allclose(_logits(model, converted.params),
                             _logits(model, pretrained.conversion.unflatten(flat)), atol=1e-6)


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
def test_big_vision_layout_gives_the_same_model(small_vit_jax, tmp_path, scan):
  model, flat = small_vit_jax
  path = tmp_path / "bv.npz"
  np.savez(path, **_big_vision_layout(flat, scan))
  converted = pretrained.convert(str(path))
  assert converted.metadata["format"] == "big_vision_npz"
  posemb = converted.params["Transformer"]["posembed_input"]["pos_embedding"]
  np.testing.assert_array_equal(posemb[0, 0], 0)
  np.testing.assert_allclose(_logits(model, converted.params),
                             _logits(model, pretrained.conversion.unflatten(flat)), atol=1e-5)


def test_bfloat16_npz(small_vit_jax, tmp_path):
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  _, flat = small_vit_jax
  path = tmp_path / "bf16.npz"
  np.savez(path, **{k: v.astype(ml_dtypes.bfloat16) for k, v in flat.items()})
  converted = pretrained.convert(str(path))
  kernel = converted.params["embedding"]["kernel"]
  assert kernel.dtype == np.float32
  np.testing.assert_allclose(kernel, flat["embedding/kernel"], rtol=1e-2, atol=1e-3)


def test_incomplete_npz_does_not_convert_and_names_the_missing_tensors(small_vit_jax, tmp_path):
  _, flat = small_vit_jax
  dropped = sorted(k for k in flat if k.startswith("Transformer/encoderblock_1/LayerNorm_2/"))
  dropped += ["Transformer/encoder_norm/scale"]
  path = tmp_path / "partial.npz"
  np.savez(path, **{k: v for k, v in flat.items() if k not in dropped})
  with pytest.raises(pretrained.ConversionError, match="lacks 3 tensors") as e:
    pretrained.convert(str(path))
  for name in dropped:
    assert "params/" + name in str(e.value)
  assert "--config.init_strict=False" in str(e.value)
  converted = pretrained.convert(str(path), strict=False)  # Asked for: converts what is there.
  assert "Transformer/encoder_norm/scale" not in pretrained.conversion.flatten(converted.params)
  # The command line exits non-zero and writes nothing.
  out = tmp_path / "out"
  proc = subprocess.run([sys.executable, "-m", "vit_jax_ft.pretrained", "convert",
                         f"--source={path}", f"--out={out}"], capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode != 0 and "lacks 3 tensors" in proc.stderr
  assert not out.exists()


def test_complete_npz_without_head_converts(small_vit_jax, tmp_path):
  model, flat = small_vit_jax
  path = tmp_path / "backbone.npz"
  np.savez(path, **{k: v for k, v in flat.items() if not k.startswith("head/")})
  assert completeness.missing_tensors(pretrained.convert(str(path))) == []


def test_overwrite_never_deletes_a_folder_it_did_not_write(small_vit_jax, tmp_path):
  _, flat = small_vit_jax
  folder = tmp_path / "downloads"
  folder.mkdir()
  np.savez(folder / "ViT.npz", **flat)
  (folder / "notes.txt").write_text("mine")
  converted = pretrained.convert(str(folder / "ViT.npz"))
  with pytest.raises(FileExistsError, match=r"not a converted checkpoint.*ViT.npz, notes.txt"):
    pretrained.save_converted(converted, str(folder), overwrite=True)
  assert sorted(p.name for p in folder.iterdir()) == ["ViT.npz", "notes.txt"]
  # A converted folder is replaced, and only once the new copy is whole.
  out = tmp_path / "weights"
  pretrained.save_converted(converted, str(out))
  pretrained.save_converted(converted, str(out), overwrite=True)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["downloads", "weights"]
  (out / "extra.bin").write_bytes(b"x")
  with pytest.raises(FileExistsError, match="extra.bin"):
    pretrained.save_converted(converted, str(out), overwrite=True)
