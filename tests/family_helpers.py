"""What the model-family tests (BiT, ConvNeXt, EfficientNet, RegNet, ResNeXt) share.

Plain functions, imported by those test files: test images, our logits and the
reference library's on them, state dicts written to disk, parameter counts, and
the checks every family repeats (strict pretrained load, bfloat16 against
float32). Family-specific model builders and perturbations stay in each file.
"""

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax_ft import pretrained
from vit_jax_ft.inputs import normalization as normalization_lib
from vit_jax_ft.pretrained import tensor_files
from vit_jax_ft.pretrained import testing


def images(size: int = 64, normalization: str = "imagenet") -> np.ndarray:
  """The two test photos at `size` px, normalised as the family's weights expect."""
  return normalization_lib.normalize(testing.photos(size), normalization)


def jax_logits(model, variables, x) -> np.ndarray:
  """Our model's eval-mode logits (jitted) for NHWC images `x`."""
  return np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(
      variables, jnp.asarray(x)))


def torch_logits(model, x) -> np.ndarray:
  """A torch model's logits for NHWC images `x` (a transformers output's `.logits`)."""
  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    out = model(testing.torch_nchw(x))
  return (out.logits if hasattr(out, "logits") else out).numpy()


def assert_parity(label: str, model, variables, torch_model, x, atol: float) -> None:
  """Our logits match the reference torch model's on `x` within `atol` (absolute)."""
  testing.assert_logits_match(label, jax_logits(model, variables, x),
                              torch_logits(torch_model, x), atol)


def save_state_dict(model, path) -> str:
  """Writes a torch model's state dict: .safetensors with the project's writer, else torch.save."""
  import torch  # pylint: disable=g-import-not-at-top
  if str(path).endswith(".safetensors"):
    tensor_files.write_safetensors(str(path), {k: v.detach().numpy()
                                               for k, v in model.state_dict().items()})
  else:
    torch.save(model.state_dict(), str(path))
  return str(path)


def torch_save(state_dict, path) -> None:
  """Writes a state dict as torch does: torch.save for .pth, else the safetensors library."""
  import torch  # pylint: disable=g-import-not-at-top
  if str(path).endswith(".pth"):
    torch.save(state_dict, str(path))
  else:
    import safetensors.torch  # pylint: disable=g-import-not-at-top
    safetensors.torch.save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))


def num_params(tree) -> int:
  """Total number of values in a tree of arrays (or of shapes from jax.eval_shape)."""
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def abstract_params(model, size: int = 64):
  """The model's parameter shapes at `size` px, without computing them."""
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)),
                                           train=False))["params"]


def assert_strict_load_loads_the_backbone(path: str, model, params, batch_stats,
                                          cache_dir: str):
  """Loads `path` into `model` for fine-tuning: no problems, a new head, every backbone value.

  Returns the load result (its report, params and batch_stats) for further checks.
  """
  result = pretrained.load_for_finetuning(path, model, params, batch_stats, image_size=32,
                                          cache_dir=cache_dir)
  report = result.report
  assert not report.problems()
  assert sorted(p for p, _ in report.new) == ["params/head/bias", "params/head/kernel"]
  backbone = [p for p in pretrained.conversion.flatten(params, "params/")
              if not p.startswith("params/head/")]
  backbone += list(pretrained.conversion.flatten(batch_stats, "batch_stats/"))
  assert sorted(p for p, _ in report.loaded) == sorted(backbone)
  return result


def assert_bfloat16_close_to_float32(model, variables, x) -> None:
  """bfloat16 compute gives float32 logits within 5% of the largest float32 logit."""
  f32 = model.apply(variables, x, train=False)
  bf16 = model.clone(dtype=jnp.bfloat16).apply(variables, x, train=False)
  assert bf16.dtype == jnp.float32
  assert np.abs(np.asarray(bf16) - np.asarray(f32)).max() < 0.05 * np.abs(np.asarray(f32)).max()
