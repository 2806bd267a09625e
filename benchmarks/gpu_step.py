r"""Train-step speed on an accelerator, in one process: JAX (the project's layers and plain Flax
layers, bfloat16 and float32) against PyTorch (eager and torch.compile), with MFU.

  python benchmarks/gpu_step.py --out=DIR          # a GPU: ViT-B/16 and ResNet-50, 224 px
  python benchmarks/gpu_step.py --tiny --out=DIR   # the CPU smoke test: tiny models, seconds
  bash benchmarks/gpu_run.sh                       # the device machine's one call (README)

Needs JAX, Flax, optax, ml_collections and this package; no TensorFlow (the
batches are synthetic). PyTorch (timm's models if timm is installed, else
transformers') is optional: cells that cannot run are listed as skipped with
the reason, and so is every cell left when --budget_s has passed (the cells run
in priority order: batch 128 in bfloat16 first). Results are written to
--out after every cell (gpu_step.json, gpu_step.md), so a run stopped by a time
limit still leaves what it measured.

For each (model, batch, dtype) it times the project's full train step
(steps.train_step with the base config's AdamW, softmax cross-entropy,
1000 classes, donated state) with each `model.layer_impl` in --impls ('auto':
on a GPU plain Flax with cuDNN's fused attention; 'flax'; 'project'), and the
same architecture in PyTorch: AdamW (fused on CUDA), torch.autocast bfloat16
for bfloat16, channels_last for ResNet, with and without
torch.compile. The step time is the median over --repeats runs of --steps
back-to-back steps (asynchronous dispatch included, as in training), after
warm-up steps; compile time is reported apart. float32 means TF32 matmuls and
convolutions on both sides (JAX's DEFAULT precision on GPU, torch allow_tf32),
unless --f32_precision=highest.

FLOPs: the model FLOPs are 3x the forward pass's (XLA's cost analysis of the
lowered forward), the same for JAX and PyTorch cells; XLA's own count of the
compiled train step is listed beside. MFU is model FLOP/s over the bfloat16
matmul peak measured here (a large random matmul, float32 accumulation). A
per-layer section (--layers) times forward+backward of each CPU-motivated layer
against its plain Flax form at ResNet-50's and ViT-B/16's shapes (attention
also in cuDNN's form). Before the cells, a ViT's 'auto' layers are checked
against Flax's attention on the same weights (`attention_check`): is cuDNN's
fused kernel in the compiled program, and how far apart are logits and grads.
"""

import functools
import gc
import json
import os
import statistics
import sys
import time
import traceback

# Share the card with PyTorch: JAX grows its pool as needed instead of taking 75% at start.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app  # pylint: disable=g-import-not-at-top,g-bad-import-order
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # runpy does not
import machine  # benchmarks/machine.py, beside this script  # pylint: disable=g-bad-import-order

from vit_jax_ft import base_config
from vit_jax_ft import models
from vit_jax_ft.models import layer_impl
from vit_jax_ft.models import resnet
from vit_jax_ft.training import losses
from vit_jax_ft.training import optim
from vit_jax_ft.training import steps

try:
  import torch  # pylint: disable=g-import-not-at-top
  TORCH_MISSING = None
except ImportError as e:  # The JAX cells still run.
  torch, TORCH_MISSING = None, f"torch not importable ({e})"

_OUT = flags.DEFINE_string("out", None, "Folder for gpu_step.json and gpu_step.md.")
_TINY = flags.DEFINE_bool("tiny", False, "Tiny models, 32 px, batch 2, 2 steps: the CPU test.")
_MODELS = flags.DEFINE_list("models", ["vit_b16", "resnet50"], "Models (vit_b16, resnet50, ...).")
_BATCHES = flags.DEFINE_list("batches", ["128", "256"], "Batch sizes, in priority order.")
_DTYPES = flags.DEFINE_list("dtypes", ["bfloat16", "float32"], "Compute dtypes, in priority order.")
_IMPLS = flags.DEFINE_list("impls", ["auto", "flax", "project"],
                           "model.layer_impl values to time ('auto' on a GPU: plain Flax with "
                           "cuDNN's fused attention).")
_IMAGE = flags.DEFINE_integer("image_size", 224, "Input side in pixels.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per repeat.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Repeats of --steps steps; the median is kept.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps after compiling.")
_TORCH = flags.DEFINE_bool("torch", True, "Time PyTorch too.")
_COMPILE = flags.DEFINE_bool("torch_compile", True, "Also time torch.compile'd PyTorch.")
_TORCH_MODES = flags.DEFINE_list("torch_modes", ["eager", "compile"],
                                 "PyTorch variants to time (eager, compile).")
_LAYERS = flags.DEFINE_bool("layers", True, "Time each project layer against plain Flax.")
_LAYER_KINDS = flags.DEFINE_list("layer_kinds", list(layer_impl.LAYER_KINDS),
                                 "Kinds of layer the --layers section times.")
_BUDGET = flags.DEFINE_float("budget_s", 420.0, "Start no new cell after this many seconds.")
_F32 = flags.DEFINE_enum("f32_precision", "default", ["default", "highest"],
                         "float32 matmuls: 'default' (TF32 on GPUs, both frameworks) or "
                         "'highest' (true float32).")

_JNP_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
NUM_CLASSES = 1000
TIMM_NAMES = {"vit_b16": "vit_base_patch16_224", "vit_s16": "vit_small_patch16_224",
              "vit_ti16": "vit_tiny_patch16_224", "resnet50": "resnet50",
              "resnet18": "resnet18", "resnet34": "resnet34", "resnet101": "resnet101"}
# --tiny: the model names above map to these sizes (ViT) / presets (ResNet).
TINY_VIT = dict(patch_size=8, hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64)


class Run:
  """Elapsed time, the results so far, and writing them after every cell."""

  def __init__(self, out: str, header: dict):
    self.out, self.start = out, time.perf_counter()
    self.result = {**header, "cells": [], "layers": []}
    os.makedirs(out, exist_ok=True)

  def elapsed(self) -> float:
    return time.perf_counter() - self.start

  def over_budget(self) -> bool:
    return self.elapsed() > _BUDGET.value

  def add(self, key: str, row: dict) -> None:
    self.result[key].append(row)
    self.result["elapsed_s"] = round(self.elapsed(), 1)
    with open(os.path.join(self.out, "gpu_step.json"), "w") as f:
      json.dump(self.result, f, indent=1)
    with open(os.path.join(self.out, "gpu_step.md"), "w") as f:
      f.write(markdown(self.result))


def _median_step_seconds(run_steps, n_steps: int) -> float:
  """Median over --repeats of (time of n_steps back-to-back steps) / n_steps; run_steps blocks."""
  run_steps(_WARMUP.value)
  times = []
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    run_steps(n_steps)
    times.append((time.perf_counter() - start) / n_steps)
  return statistics.median(times)


def _flops(analysis) -> float | None:
  """The 'flops' entry of a (compiled or lowered) cost analysis, in any JAX version's form."""
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  value = (analysis or {}).get("flops")
  return float(value) if value and value > 0 else None


def peak_matmul_tflops(dtype, precision=None) -> float:
  """TFLOP/s of an n x n x n matmul on random data (float32 accumulation), best of 3 runs."""
  n = 512 if _TINY.value else 8192
  ka, kb = jax.random.split(jax.random.PRNGKey(0))
  a = jax.random.normal(ka, (n, n), dtype)
  b = jax.random.normal(kb, (n, n), dtype)
  mm = jax.jit(lambda x, y: jax.lax.dot(x, y, precision=precision,
                                        preferred_element_type=jnp.float32))
  reps = 3 if _TINY.value else 20
  mm(a, b).block_until_ready()
  best = float("inf")
  for _ in range(3):
    start = time.perf_counter()
    for _ in range(reps):
      out = mm(a, b)
    out.block_until_ready()
    best = min(best, (time.perf_counter() - start) / reps)
  return 2 * n**3 / best / 1e12


def _model_config(name: str, impl: str):
  if _TINY.value and name.startswith("vit"):
    cfg = base_config.vit_model_config("vit")
    cfg.update(TINY_VIT)
  elif _TINY.value:
    cfg = base_config.resnet_model_config("resnet18")
  elif name.startswith("vit"):
    cfg = base_config.vit_model_config(name)
  else:
    cfg = base_config.resnet_model_config(name)
  cfg.layer_impl = impl
  return cfg


@functools.cache
def model_flops(name: str, batch: int) -> float | None:
  """3x the forward pass's FLOPs (XLA:CPU's cost analysis before optimisation), or None.

  Counted on the CPU backend whatever the accelerator: on the H200 (jax 0.11.2) the GPU
  backend's analysis of the same lowered forward missed most of the matmuls and
  convolutions (0.8 of ViT-B/16's 35.3 GFLOP per image), which made every MFU ~40x too low.
  """
  model = models.create_model(_model_config(name, "flax"), NUM_CLASSES, jnp.float32)
  cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
  x = jax.ShapeDtypeStruct((batch, _IMAGE.value, _IMAGE.value, 3), jnp.float32, sharding=cpu)
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(x.shape),
                                                train=False))
  variables = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=cpu),
                           variables)
  lowered = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x)
  try:
    forward = _flops(lowered.cost_analysis())
  except Exception:  # pylint: disable=broad-except
    forward = None
  if forward is None:  # Older JAX: only the compiled executable has a cost analysis.
    forward = _flops(lowered.compile().cost_analysis())
  return None if forward is None else 3 * forward


def attention_check(name: str, batch: int = 8) -> dict:
  """ViT `name` in bfloat16 with Flax's attention and with 'auto''s layers, same weights.

  Says whether cuDNN's fused attention is in the compiled 'auto' program, and how far
  its logits and parameter gradients are from Flax's (relative to their largest value).
  """
  cfg = _model_config(name, "flax")
  cfg.head_init = "lecun_normal"  # Zero-initialised logits would compare nothing.
  flax_model = models.create_model(cfg, NUM_CLASSES, jnp.bfloat16)
  auto_model = flax_model.clone(layer_impl=layer_impl.resolve("auto"))
  x = jax.random.normal(jax.random.PRNGKey(5), (batch, _IMAGE.value, _IMAGE.value, 3))
  variables = jax.jit(lambda x: flax_model.init(jax.random.PRNGKey(0), x, train=False))(x)
  results = {}
  for label, model in (("flax", flax_model), ("auto", auto_model)):
    def loss(params, model=model):
      logits = model.apply({**variables, "params": params}, x, train=False)
      return jnp.mean(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)), logits
    compiled = jax.jit(jax.value_and_grad(loss, has_aux=True)).lower(
        variables["params"]).compile()
    (_, logits), grads = compiled(variables["params"])
    results[label] = (np.asarray(logits, np.float32),
                      np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads)]),
                      "cudnn$fmha" in compiled.as_text())
  rel = lambda a, b: float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))
  return {"model": name, "batch": batch, "auto_layers": auto_model.layer_impl.name,
          "fused_kernel_in_auto": results["auto"][2], "fused_kernel_in_flax": results["flax"][2],
          "logits_rel_diff": rel(results["auto"][0], results["flax"][0]),
          "grads_rel_diff": rel(results["auto"][1], results["flax"][1])}


def jax_cell(name: str, batch: int, dtype: str, impl: str) -> dict:
  """Times the project's train step; returns the cell's figures."""
  cfg = _model_config(name, impl)
  model = models.create_model(cfg, NUM_CLASSES, _JNP_DTYPES[dtype])
  config = base_config.get_base_config()
  tx = optim.make_optimizer(config.optimizer, optim.learning_rate_schedule(config.optimizer,
                                                                           1000))
  step = jax.jit(functools.partial(steps.train_step, model=model, tx=tx,
                                   loss_fn=losses.get_loss_fn(config.loss)), donate_argnums=0)
  state = steps.create_train_state(model, tx, _IMAGE.value, seed=0)
  k1, k2 = jax.random.split(jax.random.PRNGKey(1))
  data = {"image": jax.random.normal(k1, (batch, _IMAGE.value, _IMAGE.value, 3)),
          "targets": jax.nn.one_hot(jax.random.randint(k2, (batch,), 0, NUM_CLASSES),
                                    NUM_CLASSES)}
  start = time.perf_counter()
  compiled = step.lower(state, data).compile()
  compile_s = time.perf_counter() - start
  holder = [state]

  def run_steps(n):
    for _ in range(n):
      holder[0], metrics = compiled(holder[0], data)
    jax.block_until_ready(metrics["loss"])
    if not np.isfinite(float(metrics["loss"])):
      raise FloatingPointError(f"loss is {float(metrics['loss'])}")

  seconds = _median_step_seconds(run_steps, _STEPS.value)
  memory = compiled.memory_analysis()
  return {"seconds": seconds, "compile_s": compile_s,
          "xla_flops": _flops(compiled.cost_analysis()),
          "temp_gib": (memory.temp_size_in_bytes / 2**30
                       if getattr(memory, "temp_size_in_bytes", None) else None),
          "layers": layer_impl.resolve(impl).name}


def _torch_device() -> str:
  return "cuda" if torch.cuda.is_available() else "cpu"


def _torch_model(name: str):
  """(module taking NCHW images and returning logits, source) for `name`."""
  try:
    import timm  # pylint: disable=g-import-not-at-top
  except ImportError:
    timm = None
  is_vit = name.startswith("vit")
  if timm is not None:
    if _TINY.value and is_vit:
      from timm.models import vision_transformer  # pylint: disable=g-import-not-at-top
      return vision_transformer.VisionTransformer(
          img_size=_IMAGE.value, patch_size=TINY_VIT["patch_size"],
          embed_dim=TINY_VIT["hidden_size"], depth=TINY_VIT["num_layers"],
          num_heads=TINY_VIT["num_heads"], mlp_ratio=2, num_classes=NUM_CLASSES), "timm"
    name = "resnet18" if _TINY.value else name
    return timm.create_model(TIMM_NAMES[name], pretrained=False,
                             num_classes=NUM_CLASSES), "timm"
  import transformers  # pylint: disable=g-import-not-at-top
  if is_vit:
    arch = TINY_VIT if _TINY.value else {**models.vit.VIT_PRESETS[name]}
    hf = transformers.ViTForImageClassification(transformers.ViTConfig(
        hidden_size=arch["hidden_size"], num_hidden_layers=arch["num_layers"],
        num_attention_heads=arch["num_heads"], intermediate_size=arch["mlp_dim"],
        patch_size=arch["patch_size"], image_size=_IMAGE.value, num_labels=NUM_CLASSES))
  else:
    preset = "resnet18" if _TINY.value else name
    block, depths = resnet.RESNET_PRESETS[preset][:2]
    hf = transformers.ResNetForImageClassification(transformers.ResNetConfig(
        depths=list(depths), layer_type="basic" if block == "basic" else "bottleneck",
        hidden_sizes=[64, 128, 256, 512] if block == "basic" else [256, 512, 1024, 2048],
        num_labels=NUM_CLASSES))

  class Logits(torch.nn.Module):
    def __init__(self, inner):
      super().__init__()
      self.inner = inner

    def forward(self, x):
      return self.inner(pixel_values=x).logits

  return Logits(hf), "transformers"


def torch_cell(name: str, batch: int, dtype: str, mode: str) -> dict:
  """Times an AdamW step of the same architecture in PyTorch ('eager' or 'compile')."""
  device = _torch_device()
  torch.manual_seed(0)
  model, source = _torch_model(name)
  model = model.to(device).train()
  channels_last = not name.startswith("vit")
  if channels_last:
    model = model.to(memory_format=torch.channels_last)
  try:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
  except (TypeError, RuntimeError):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
  forward = torch.compile(model) if mode == "compile" else model
  x = torch.randn(batch, 3, _IMAGE.value, _IMAGE.value, device=device)
  if channels_last:
    x = x.contiguous(memory_format=torch.channels_last)
  y = torch.randint(0, NUM_CLASSES, (batch,), device=device)
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

  def one_step():
    with torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
      loss = torch.nn.functional.cross_entropy(forward(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss

  start = time.perf_counter()
  one_step()
  sync()
  compile_s = time.perf_counter() - start  # First step: compilation (and cuDNN set-up).

  def run_steps(n):
    for _ in range(n):
      loss = one_step()
    sync()
    if not torch.isfinite(loss).item():
      raise FloatingPointError(f"loss is {loss.item()}")

  seconds = _median_step_seconds(run_steps, _STEPS.value)
  return {"seconds": seconds, "compile_s": compile_s,
          "layers": f"{source}{', channels_last' if channels_last else ''}"}


def _torch_skip_reason(mode: str) -> str | None:
  if not _TORCH.value:
    return "--notorch"
  if torch is None:
    return TORCH_MISSING
  if mode == "compile":
    if not _COMPILE.value:
      return "--notorch_compile"
    if _TINY.value:
      return "--tiny: torch.compile not timed (minutes of CPU compilation)"
    if not hasattr(torch, "compile"):
      return f"torch {torch.__version__} has no torch.compile"
  return None


def plan():
  """(framework, model, batch, dtype, variant) in priority order."""
  for batch in map(int, _BATCHES.value):
    for dtype in _DTYPES.value:
      for name in _MODELS.value:
        for impl in _IMPLS.value:
          yield ("jax", name, batch, dtype, impl)
        for mode in _TORCH_MODES.value:
          yield ("torch", name, batch, dtype, mode)


# Layer microbenchmarks: (label, kind, input shape at batch 1, module kwargs).
LAYER_SHAPES = [
    ("conv 1x1 56px 64->256", "conv", (56, 56, 64), dict(features=256, kernel_size=(1, 1))),
    ("conv 1x1/2 56px 256->512", "conv", (56, 56, 256),
     dict(features=512, kernel_size=(1, 1), strides=(2, 2))),
    ("conv 1x1 14px 1024->256", "conv", (14, 14, 1024), dict(features=256, kernel_size=(1, 1))),
    ("patchify 16x16/16 224px 3->768", "conv", (224, 224, 3),
     dict(features=768, kernel_size=(16, 16), strides=(16, 16), padding="VALID")),
    ("batch norm + relu 112px 64", "batch_norm", (112, 112, 64), {}),
    ("batch norm + relu 14px 1024", "batch_norm", (14, 14, 1024), {}),
    ("max-pool 3x3/2 112px 64", "max_pool", (112, 112, 64), {}),
    ("dense 197x768->3072", "dense", (197, 768), dict(features=3072)),
    ("attention 197 tokens 12x64", "attention", (197, 12, 64), {}),
]


def _layer_fn(kind: str, impl: str, kwargs: dict, dtype, x):
  """(jitted grad of sum(f(x)^2) w.r.t. params and x, params)."""
  if kind == "max_pool":
    pool = (resnet.max_pool_3x3_s2 if impl == "project" else layer_impl.flax_max_pool_3x3_s2)
    apply, params = (lambda p, x: pool(x)), {}
  elif kind == "attention":  # x is the query; key and value are "params" (their grads too).
    attend = layer_impl.Layers(attention=impl).attention_fn(dtype)
    kk, kv = jax.random.split(jax.random.PRNGKey(4))
    params = {"key": jax.random.normal(kk, x.shape, x.dtype),
              "value": jax.random.normal(kv, x.shape, x.dtype)}
    apply = lambda p, x: attend(x, p["key"], p["value"], dtype=dtype)
  else:
    layers = layer_impl.resolve(impl)
    if kind == "conv":
      module = layers.conv_module()(use_bias=False, dtype=dtype, **kwargs)
    elif kind == "dense":
      module = layers.dense_module()(dtype=dtype, **kwargs)
    else:
      module = layers.norm_module()(use_running_average=False, relu=True, dtype=dtype)
    variables = module.init(jax.random.PRNGKey(0), x)
    params = variables["params"]
    rest = {k: v for k, v in variables.items() if k != "params"}
    mutable = list(rest)
    apply = lambda p, x: module.apply({**rest, "params": p}, x, mutable=mutable)[0]
  grad = jax.jit(jax.grad(lambda p, x: jnp.sum(apply(p, x).astype(jnp.float32) ** 2),
                          argnums=(0, 1)))
  return grad, params


def layer_row(batch: int, dtype: str, kind: str, shape: tuple, kwargs: dict) -> dict:
  """Forward+backward time of one layer, project vs flax (--tiny: shapes / 8)."""
  if _TINY.value:
    shape = shape[:-1] + (max(1, shape[-1] // 8),) if kind == "dense" else tuple(
        max(2, s // 8) for s in shape[:-1]) + shape[-1:]
    kwargs = dict(kwargs)
    if "features" in kwargs:
      kwargs["features"] = max(1, kwargs["features"] // 8)
    if kwargs.get("kernel_size") == (16, 16):
      kwargs.update(kernel_size=(2, 2), strides=(2, 2))
  x = jax.random.normal(jax.random.PRNGKey(2), (batch,) + shape, _JNP_DTYPES[dtype])
  times, row = {}, {}
  for impl in layer_impl.KIND_CHOICES[kind]:  # Attention also has cuDNN's.
    grad, params = _layer_fn(kind, impl, kwargs, _JNP_DTYPES[dtype], x)

    def run_steps(n, grad=grad, params=params):
      for _ in range(n):
        out = grad(params, x)
      jax.block_until_ready(out)

    try:
      times[impl] = _median_step_seconds(run_steps, _STEPS.value)
      row[f"{impl}_ms"] = times[impl] * 1e3
    except Exception as e:  # pylint: disable=broad-except
      # E.g. XLA:CPU has no bf16 x bf16 -> f32 kernel for the dot layouts it picks for the
      # project's attention gradient taken alone (inside a ViT it picks others).
      row[f"{impl}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
  if not times:
    raise RuntimeError("; ".join(row.values()))
  ratio = lambda a, b: times[a] / times[b] if a in times and b in times else None
  row["flax_over_project"] = ratio("project", "flax")
  if "cudnn" in layer_impl.KIND_CHOICES[kind]:
    row["cudnn_over_flax"] = ratio("flax", "cudnn")
  return row


def _fmt(value, spec, suffix=""):
  return "-" if value is None else format(value, spec) + suffix


def markdown(result: dict) -> str:
  """The cells as a markdown table, with ratios per (model, batch, dtype) and the layers."""
  lines = [f"# Train-step benchmark: {result['device']}", "",
           f"jax {result['jax']}, flax {result['flax']}, torch {result['torch']}, "
           f"{result['date']}; image {result['image_size']} px, {result['steps']} steps x "
           f"{result['repeats']} (median); float32 = {result['f32_note']}.",
           f"Measured matmul peaks (TFLOP/s): {result['peaks']}.", "",
           *([f"Attention check ('auto' against Flax's attention, bf16): "
              f"{result['attention_check']}.", ""] if "attention_check" in result else []),
           "| framework | model | batch | dtype | variant | img/s | ms/step | model TFLOP/s | "
           "MFU (bf16 peak) | XLA GFLOP/step | compile s | note |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for c in result["cells"]:
    lines.append(
        f"| {c['framework']} | {c['model']} | {c['batch']} | {c['dtype']} | {c['variant']} | "
        f"{_fmt(c.get('img_s'), '.1f')} | {_fmt(c.get('ms_step'), '.1f')} | "
        f"{_fmt(c.get('tflops'), '.3g')} | {_fmt(c.get('mfu'), '.1%')} | "
        f"{_fmt(c.get('xla_gflop'), '.4g')} | {_fmt(c.get('compile_s'), '.1f')} | "
        f"{c.get('skipped') or c.get('layers', '')} |")
  summary = summarize(result["cells"])
  if summary:
    lines += ["", "| model | batch | dtype | flax / project | auto / flax | "
              "best JAX / torch eager | best JAX / torch.compile |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for s in summary:
      lines.append(f"| {s['model']} | {s['batch']} | {s['dtype']} | "
                   f"{_fmt(s['flax_over_project'], '.2f', 'x')} | "
                   f"{_fmt(s['auto_over_flax'], '.2f', 'x')} | "
                   f"{_fmt(s['jax_over_torch_eager'], '.2f', 'x')} | "
                   f"{_fmt(s['jax_over_torch_compile'], '.2f', 'x')} |")
  if result["layers"]:
    lines += ["", "| layer (forward + backward) | batch | dtype | project ms | flax ms | "
              "flax speed-up | cudnn ms | cudnn / flax |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["layers"]:
      lines.append(f"| {r['layer']} | {r['batch']} | {r['dtype']} | "
                   f"{_fmt(r.get('project_ms'), '.2f')} | {_fmt(r.get('flax_ms'), '.2f')} | "
                   f"{_fmt(r.get('flax_over_project'), '.2f', 'x')} {r.get('skipped', '')}"
                   f"{' project: ' + r['project_error'] if 'project_error' in r else ''} | "
                   f"{_fmt(r.get('cudnn_ms'), '.2f')} | "
                   f"{_fmt(r.get('cudnn_over_flax'), '.2f', 'x')} |")
  return "\n".join(lines) + "\n"


def summarize(cells: list) -> list:
  """Speed ratios (img/s over img/s) per (model, batch, dtype) among the cells that ran."""
  groups = {}
  for c in cells:
    if c.get("img_s"):
      groups.setdefault((c["model"], c["batch"], c["dtype"]), {})[
          (c["framework"], c["variant"])] = c["img_s"]
  ratio = lambda a, b: a / b if a and b else None
  out = []
  for (name, batch, dtype), rates in groups.items():
    best_jax = max((v for (f, _), v in rates.items() if f == "jax"), default=None)
    out.append({"model": name, "batch": batch, "dtype": dtype,
                "flax_over_project": ratio(rates.get(("jax", "flax")),
                                           rates.get(("jax", "project"))),
                "auto_over_flax": ratio(rates.get(("jax", "auto")), rates.get(("jax", "flax"))),
                "jax_over_torch_eager": ratio(best_jax, rates.get(("torch", "eager"))),
                "jax_over_torch_compile": ratio(best_jax, rates.get(("torch", "compile")))})
  return out


def _device_name() -> str:
  dev = jax.devices()[0]
  if dev.platform == "cpu":
    return f"CPU: {machine.cpu_description()}"
  return f"{dev.device_kind} x{jax.device_count()} ({dev.platform})"


def _record(run: Run, key: str, row: dict, fn) -> None:
  """Runs fn() -> dict into row; an exception or the budget skips it with the reason."""
  if run.over_budget():
    row["skipped"] = f"time budget ({_BUDGET.value:.0f} s) spent"
  else:
    try:
      row.update(fn())
    except Exception as e:  # pylint: disable=broad-except
      traceback.print_exc()
      row["skipped"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    gc.collect()
    if torch is not None and torch.cuda.is_available():
      torch.cuda.empty_cache()
  print(json.dumps(row), f"[{run.elapsed():.0f} s]", flush=True)
  run.add(key, row)


def main(argv):
  del argv
  if _TINY.value:
    for flag, value in (("models", ["vit", "resnet18"]), ("batches", ["2"]),
                        ("dtypes", ["bfloat16", "float32"]), ("image_size", 32),
                        ("steps", 2), ("repeats", 1), ("warmup", 1)):
      if not flags.FLAGS[flag].present:
        flags.FLAGS[flag].value = value
  if _OUT.value is None:
    raise app.UsageError("--out is required.")
  if _F32.value == "highest":
    jax.config.update("jax_default_matmul_precision", "highest")
  if torch is not None:
    tf32 = _F32.value == "default"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = True
  on_cpu = jax.default_backend() == "cpu"
  f32_note = ("float32 (CPU)" if on_cpu else
              "TF32 matmuls/convs (JAX DEFAULT precision, torch allow_tf32)"
              if _F32.value == "default" else "true float32 (precision HIGHEST, no TF32)")
  import flax  # pylint: disable=g-import-not-at-top
  device = _device_name()
  if torch is not None and torch.cuda.is_available():
    device += f"; torch sees {torch.cuda.get_device_name()}"
  print(f"device: {device}\njax {jax.__version__}, backend {jax.default_backend()}, "
        f"'auto' layers here: {layer_impl.resolve('auto').name}", flush=True)
  peaks = {"bfloat16": peak_matmul_tflops(jnp.bfloat16),
           "float32": peak_matmul_tflops(jnp.float32),
           "float32_highest": peak_matmul_tflops(jnp.float32, jax.lax.Precision.HIGHEST)}
  print(f"matmul peaks (TFLOP/s): {peaks}", flush=True)
  run = Run(_OUT.value, {
      "device": device, "python": sys.version.split()[0], "jax": jax.__version__,
      "flax": flax.__version__, "torch": torch.__version__ if torch is not None else None,
      "date": time.strftime("%Y-%m-%d"), "image_size": _IMAGE.value, "steps": _STEPS.value,
      "repeats": _REPEATS.value, "f32_note": f32_note, "auto_layers": layer_impl.resolve(
          "auto").name, "peaks": {k: round(v, 2) for k, v in peaks.items()},
      "argv": sys.argv[1:]})
  vits = [name for name in _MODELS.value if name.startswith("vit")]
  if vits:
    try:
      run.result["attention_check"] = attention_check(vits[0])
    except Exception as e:  # pylint: disable=broad-except
      traceback.print_exc()
      run.result["attention_check"] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    print("attention check:", json.dumps(run.result["attention_check"]), flush=True)
  layers_done = not _LAYERS.value
  first_group = (int(_BATCHES.value[0]), _DTYPES.value[0])
  for framework, name, batch, dtype, variant in plan():
    if not layers_done and (batch, dtype) != first_group:
      _time_layers(run, first_group)
      layers_done = True
    row = {"framework": framework, "model": name, "batch": batch, "dtype": dtype,
           "variant": variant}
    if framework == "torch" and (reason := _torch_skip_reason(variant)):
      row["skipped"] = reason
      print(json.dumps(row), flush=True)
      run.add("cells", row)
      continue

    def measure(framework=framework, name=name, batch=batch, dtype=dtype, variant=variant):
      cell = (jax_cell if framework == "jax" else torch_cell)(name, batch, dtype, variant)
      flops = model_flops(name, batch)
      out = {"img_s": batch / cell["seconds"], "ms_step": cell["seconds"] * 1e3,
             "compile_s": cell["compile_s"], "layers": cell["layers"],
             "temp_gib": cell.get("temp_gib")}
      if cell.get("xla_flops"):
        out["xla_gflop"] = cell["xla_flops"] / 1e9
      if flops:
        out["tflops"] = flops / cell["seconds"] / 1e12
        out["mfu"] = out["tflops"] / peaks["bfloat16"]
      return out

    _record(run, "cells", row, measure)
  if not layers_done:
    _time_layers(run, first_group)
  run.result["summary"] = summarize(run.result["cells"])
  with open(os.path.join(run.out, "gpu_step.json"), "w") as f:
    json.dump(run.result, f, indent=1)
  text = markdown(run.result)
  with open(os.path.join(run.out, "gpu_step.md"), "w") as f:
    f.write(text)
  print("\n" + text, flush=True)
  print(f"total {run.elapsed():.0f} s; wrote {run.out}/gpu_step.json and gpu_step.md")


def _time_layers(run: Run, group) -> None:
  """A row per LAYER_SHAPES entry at (batch, dtype) = group; errors and the budget skip."""
  batch, dtype = group
  for label, kind, shape, kwargs in LAYER_SHAPES:
    if kind not in _LAYER_KINDS.value:
      continue
    _record(run, "layers", {"layer": label, "batch": batch, "dtype": dtype},
            functools.partial(layer_row, batch, dtype, kind, shape, kwargs))


if __name__ == "__main__":
  app.run(main)
