r"""Train-step (and inference) throughput of a full-size model, with MFU and a PyTorch baseline.

  python benchmarks/train_step.py --model=vit_b16 --batch=8 --dtype=bfloat16
  python benchmarks/train_step.py --table   # the README's four cells in one run
  python benchmarks/train_step.py --zoo=resnet50,convnext_tiny,efficientnet_b0 --batch=16

Prints images/s, ms/step, achieved TFLOP/s from the compiled step's own cost
analysis, and that as a fraction of the peak matmul rate measured in the same
run (MFU). When torch and transformers are installed it also times the same
model from Hugging Face (AdamW, same batch, torch.autocast for bfloat16) in
the same process and prints the ratio. Figures on shared machines are noisy:
compare the ratios, which come from one run.
"""

import functools
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app  # pylint: disable=g-import-not-at-top,g-bad-import-order
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # runpy does not
import machine  # benchmarks/machine.py, beside this script  # pylint: disable=g-bad-import-order
from vit_jax_ft import base_config
from vit_jax_ft import models
from vit_jax_ft.models import convnext as convnext_lib
from vit_jax_ft.models import layer_impl
from vit_jax_ft.training import losses
from vit_jax_ft.training import optim
from vit_jax_ft.training import steps

_MODEL = flags.DEFINE_string("model", "vit_b16", "vit_b16 | resnet50 | resnext50_32x4d | "
                             "regnety_400mf | any model.name")
_BATCH = flags.DEFINE_integer("batch", 8, "Batch size.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16", "float16"],
                           "Compute dtype.")
_STEPS = flags.DEFINE_integer("steps", 7, "Timed steps after one warm-up step; the median is reported.")
_IMAGE = flags.DEFINE_integer("image_size", 224, "Input resolution.")
_TORCH = flags.DEFINE_bool("torch", True, "Also time the Hugging Face PyTorch model if installed.")
_EVAL = flags.DEFINE_bool("eval", True, "Also time inference (eval forward pass).")
_TABLE = flags.DEFINE_bool(
    "table", False, "Run ViT-B/16 batch 8 and ResNet-50 batch 16, each in float32 and bfloat16, "
    "and print a markdown table (ignores --model/--batch/--dtype).")
_ZOO = flags.DEFINE_list(
    "zoo", [], "Model names for the README's model zoo table: parameters, forward GMACs at "
    "--image_size, --dtype train img/s at --batch and its ratio to the first name's (same "
    "process), and PyTorch where it has the model (ignores --model and --table).")
_REMAT = flags.DEFINE_bool("remat", True, "Also compile with model.remat=True and compare memory.")

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _time(fn, n):
  """Median seconds per call over n calls after one warm-up call; fn must block.

  The median, for JAX and PyTorch alike: on shared machines a few calls are
  slowed by other work, and a mean would charge that to whichever ran then.
  """
  fn()
  seconds = []
  for _ in range(n):
    start = time.perf_counter()
    fn()
    seconds.append(time.perf_counter() - start)
  return float(np.median(seconds))


def peak_matmul_tflops(dtype) -> float:
  """Best measured TFLOP/s of a large matmul in `dtype` (float32 accumulation)."""
  n = 2048
  a = jnp.ones((n, n), dtype)
  b = jnp.ones((n, n), dtype)
  mm = jax.jit(lambda x, y: jax.lax.dot(x, y, preferred_element_type=jnp.float32))
  best = min(_time(lambda: mm(a, b).block_until_ready(), 5) for _ in range(3))
  return 2 * n**3 / best / 1e12


def _setup(model_name, batch, dtype, image_size, remat=False):
  """(jitted step, state, batch, model) for a 1000-class model."""
  cfg = base_config.model_config(model_name)
  cfg.remat = remat
  model = models.create_model(cfg, 1000, _DTYPES[dtype])
  opt = base_config.get_base_config().optimizer
  tx = optim.make_optimizer(opt, optim.learning_rate_schedule(opt, 1000))
  loss_fn = losses.get_loss_fn(base_config.get_base_config().loss)
  scaling = steps.LossScaling(enabled=dtype == "float16")
  step = jax.jit(functools.partial(steps.train_step, model=model, tx=tx, loss_fn=loss_fn,
                                   scaling=scaling), donate_argnums=0,
                 compiler_options=layer_impl.compiler_options(model.layer_impl))
  state = steps.create_train_state(model, tx, image_size, seed=0)
  rng = np.random.default_rng(0)
  data = {"image": jnp.asarray(rng.normal(size=(batch, image_size, image_size, 3)), jnp.float32),
          "targets": jax.nn.one_hot(rng.integers(0, 1000, batch), 1000)}
  return step, state, data, model


def peak_temp_memory_gib(model_name, batch, dtype, image_size, remat) -> float:
  """XLA's temporary-buffer size for one train step (activations dominate)."""
  step, state, data, _ = _setup(model_name, batch, dtype, image_size, remat)
  return step.lower(state, data).compile().memory_analysis().temp_size_in_bytes / 2**30


def jax_train_step(model_name, batch, dtype, image_size):
  """Returns (seconds per step, flops per step, eval images/s or None)."""
  step, state, data, model = _setup(model_name, batch, dtype, image_size)
  compiled = step.lower(state, data).compile()
  flops = compiled.cost_analysis()["flops"]
  holder = [state]

  def run():
    holder[0], m = step(holder[0], data)
    m["loss"].block_until_ready()

  seconds = _time(run, _STEPS.value)
  eval_rate = None
  if _EVAL.value:
    variables = {"params": holder[0].params}
    if holder[0].batch_stats:
      variables["batch_stats"] = holder[0].batch_stats
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
    eval_rate = batch / _time(lambda: forward(variables, data["image"]).block_until_ready(),
                              _STEPS.value)
  return seconds, flops, eval_rate


def _torchvision_name(model_name: str) -> str | None:
  """torchvision's name for a ResNeXt, RegNet, EfficientNet or ResNet-18/34/152 model.name ('regnety_400mf' -> 'regnet_y_400mf')."""
  if model_name.startswith("resnext"):
    return model_name
  if model_name.startswith(("regnetx_", "regnety_")):
    return f"regnet_{model_name[6]}_{model_name[8:]}"
  if model_name.startswith("efficientnet_b") or model_name in ("resnet18", "resnet34", "resnet152"):
    return model_name
  return None


def torch_train_step(model_name, batch, dtype, image_size):
  """Seconds per AdamW step of the Hugging Face (ResNeXt, RegNet, EfficientNet: torchvision)
  model, or None."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  torch.manual_seed(0)
  logits = lambda model, x: model(pixel_values=x).logits
  if _torchvision_name(model_name):
    try:
      import torchvision  # pylint: disable=g-import-not-at-top
    except ImportError:
      return None
    model = getattr(torchvision.models, _torchvision_name(model_name))(num_classes=1000)
    logits = lambda model, x: model(x)
  elif model_name.startswith("vit"):
    sizes = {"vit_b16": (768, 12, 12, 3072, 16), "vit_s16": (384, 12, 6, 1536, 16),
             "vit_ti16": (192, 12, 3, 768, 16), "vit_b32": (768, 12, 12, 3072, 32),
             "vit_l16": (1024, 24, 16, 4096, 16)}[model_name]
    config = transformers.ViTConfig(hidden_size=sizes[0], num_hidden_layers=sizes[1],
                                    num_attention_heads=sizes[2], intermediate_size=sizes[3],
                                    patch_size=sizes[4], image_size=image_size, num_labels=1000)
    model = transformers.ViTForImageClassification(config)
  elif model_name in ("resnet50", "resnet101"):
    depths = {"resnet50": [3, 4, 6, 3], "resnet101": [3, 4, 23, 3]}[model_name]
    model = transformers.ResNetForImageClassification(transformers.ResNetConfig(
        depths=depths, layer_type="bottleneck", num_labels=1000))
  elif model_name in convnext_lib.CONVNEXT_PRESETS:
    depths, dims = convnext_lib.CONVNEXT_PRESETS[model_name]
    model = transformers.ConvNextForImageClassification(transformers.ConvNextConfig(
        depths=list(depths), hidden_sizes=list(dims), num_labels=1000))
  else:
    return None  # No Hugging Face counterpart wired up here.
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
  x = torch.randn(batch, 3, image_size, image_size)
  y = torch.randint(0, 1000, (batch,))

  def run():
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
      loss = torch.nn.functional.cross_entropy(logits(model, x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()

  return _time(run, _STEPS.value)


def run_cell(name: str, batch: int, dtype: str) -> dict:
  """Measures one (model, batch, dtype) cell and prints its details."""
  peak = peak_matmul_tflops(jnp.float32 if dtype == "float32" else _DTYPES[dtype])
  seconds, flops, eval_rate = jax_train_step(name, batch, dtype, _IMAGE.value)
  achieved = flops / seconds / 1e12
  print(f"model={name} batch={batch} dtype={dtype} image={_IMAGE.value}")
  print(f"peak matmul ({'float32' if dtype == 'float32' else dtype} in, float32 accumulate): "
        f"{peak:.3f} TFLOP/s")
  print(f"jax train step: {seconds * 1e3:.1f} ms/step, {batch / seconds:.2f} img/s, "
        f"{flops / 1e9:.1f} GFLOP/step, {achieved:.3f} TFLOP/s, MFU {achieved / peak:.1%}")
  cell = {"name": name, "batch": batch, "dtype": dtype, "img_s": batch / seconds,
          "mfu": achieved / peak, "eval_img_s": eval_rate, "torch_img_s": None}
  if eval_rate is not None:
    print(f"jax inference: {eval_rate:.2f} img/s")
  if _REMAT.value:
    plain, remat = (peak_temp_memory_gib(name, batch, dtype, _IMAGE.value, r) for r in (False, True))
    print(f"train-step temporary memory (XLA): {plain:.2f} GiB, with model.remat {remat:.2f} GiB")
  if _TORCH.value:
    torch_seconds = torch_train_step(name, batch, dtype, _IMAGE.value)
    if torch_seconds is None:
      print("pytorch: not installed (pip install torch==2.13.0 transformers) or no Hugging Face "
            f"baseline for {name}")
    else:
      cell["torch_img_s"] = batch / torch_seconds
      print(f"pytorch ({'torchvision' if _torchvision_name(name) else 'HF'}, AdamW{', autocast bf16' if dtype == 'bfloat16' else ''}): "
            f"{torch_seconds * 1e3:.1f} ms/step, {batch / torch_seconds:.2f} img/s; "
            f"jax/pytorch speed ratio {torch_seconds / seconds:.2f}x")
  return cell


def forward_gmacs(model_name: str, image_size: int) -> tuple[int, float]:
  """(parameters, multiply-adds of one image's eval forward pass / 1e9) of a 1000-class model.

  The multiply-adds are XLA's flop count of the compiled float32 forward pass over
  two, the convention of the published "GFLOPs" figures (4.1 for ResNet-50).
  """
  model = models.create_model(base_config.model_config(model_name), 1000, jnp.float32)
  image = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), image, train=False))
  params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(variables["params"]))
  forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
  flops = forward.lower(variables, image).compile().cost_analysis()["flops"]
  return params, flops / 2 / 1e9


def zoo_table(names: list[str], batch: int, dtype: str) -> None:
  """Prints one markdown row per model; ratios are against names[0], timed in this process."""
  rows = []
  for name in names:
    params, gmacs = forward_gmacs(name, _IMAGE.value)
    seconds, _, _ = jax_train_step(name, batch, dtype, _IMAGE.value)
    torch_seconds = torch_train_step(name, batch, dtype, _IMAGE.value) if _TORCH.value else None
    rows.append((name, params, gmacs, batch / seconds,
                 batch / torch_seconds if torch_seconds else None))
    print(f"{name}: {params:,} parameters, {gmacs:.2f} GMACs, {batch / seconds:.2f} img/s"
          + (f", pytorch {batch / torch_seconds:.2f} img/s" if torch_seconds else ""), flush=True)
  print(f"\n{_IMAGE.value} px, batch {batch}, {dtype}, train step with AdamW; "
        f"{machine.cpu_description()}")
  print(f"| name | parameters | GMACs | JAX train img/s | vs {names[0]} | PyTorch img/s | "
        "JAX / PyTorch |")
  print("| --- | --- | --- | --- | --- | --- | --- |")
  base = rows[0][3]
  for name, params, gmacs, rate, torch_rate in rows:
    torch_cells = (f"{torch_rate:.2f} | {rate / torch_rate:.2f}x" if torch_rate else "- | -")
    print(f"| `{name}` | {params / 1e6:.1f}M | {gmacs:.2f} | {rate:.2f} | {rate / base:.2f}x | "
          f"{torch_cells} |")


def main(argv):
  del argv
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}; "
        f"{machine.cpu_description()}")
  if _ZOO.value:
    zoo_table(_ZOO.value, _BATCH.value, _DTYPE.value)
    return
  if not _TABLE.value:
    run_cell(_MODEL.value, _BATCH.value, _DTYPE.value)
    return
  cells = [run_cell(name, batch, dtype) for name, batch in (("vit_b16", 8), ("resnet50", 16))
           for dtype in ("float32", "bfloat16")]
  print("\n| model, batch, dtype | JAX img/s | MFU | PyTorch img/s | JAX / PyTorch | "
        "JAX inference img/s |")
  print("| --- | --- | --- | --- | --- | --- |")
  for c in cells:
    torch_rate = c["torch_img_s"]
    ratio = f"{c['img_s'] / torch_rate:.2f}x" if torch_rate else "-"
    print(f"| {c['name']}, {c['batch']}, {c['dtype']} | {c['img_s']:.2f} | {c['mfu']:.1%} | "
          f"{f'{torch_rate:.2f}' if torch_rate else '-'} | {ratio} | "
          f"{c['eval_img_s'] or 0:.1f} |")


if __name__ == "__main__":
  app.run(main)
