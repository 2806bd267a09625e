"""The GPU path without TensorFlow, and benchmarks/gpu_step.py's --tiny mode on CPU.

The GPU machine has JAX, Flax, optax and PyTorch but no TensorFlow: the models,
the train step, the optimizer, the losses and the config must import and run
with tensorflow and tensorflow_datasets unimportable, and so must the benchmark.
"""

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks", "gpu_step.py")


def _blocker(*names: str) -> str:
  """Python source that hides the named top-level packages as if they were not installed.

  Their modules are not found (import raises ModuleNotFoundError, importlib.util.find_spec
  returns None) and neither is their package metadata, which is how libraries such as
  transformers probe for TensorFlow.
  """
  return f"""
import importlib.metadata, sys
_HIDDEN = {set(names)!r}
_HIDDEN_DISTS = _HIDDEN | {{n + "_cpu" for n in _HIDDEN}}
class _Hide:
  def __init__(self, finders):
    self.finders = finders
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in _HIDDEN:
      return None
    for finder in self.finders:
      spec = finder.find_spec(name, path, target) if hasattr(finder, "find_spec") else None
      if spec is not None:
        return spec
    return None
  def find_distributions(self, context=importlib.metadata.DistributionFinder.Context()):
    for finder in self.finders:
      for dist in getattr(finder, "find_distributions", lambda c: ())(context):
        if (dist.metadata["Name"] or "").lower().replace("-", "_") not in _HIDDEN_DISTS:
          yield dist
  def invalidate_caches(self):
    for finder in self.finders:
      getattr(finder, "invalidate_caches", lambda: None)()
sys.meta_path[:] = [_Hide(list(sys.meta_path))]
"""


def _python(code: str, timeout: int) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        timeout=timeout, cwd=ROOT, env=env)


NO_TF = ("tensorflow", "tensorflow_datasets")


def test_models_steps_and_optim_import_and_train_without_tensorflow():
  code = _blocker(*NO_TF) + """
import importlib.util
assert importlib.util.find_spec("tensorflow") is None  # The blocker works.
import functools
import jax, jax.numpy as jnp
from vit_jax_ft import base_config, config_ranges, models
from vit_jax_ft.training import losses, optim, steps
config = base_config.get_base_config()
config_ranges.check_ranges(config)
tx = optim.make_optimizer(config.optimizer, optim.learning_rate_schedule(config.optimizer, 10))
for cfg in (base_config.vit_model_config("vit"), base_config.resnet_model_config("resnet18")):
  if cfg.name == "vit":
    cfg.update(dict(patch_size=8, hidden_size=16, num_layers=1, num_heads=2, mlp_dim=32))
  model = models.create_model(cfg, 3, jnp.float32)
  state = steps.create_train_state(model, tx, 16, seed=0)
  step = jax.jit(functools.partial(steps.train_step, model=model, tx=tx,
                                   loss_fn=losses.get_loss_fn(config.loss)))
  batch = {"image": jnp.ones((2, 16, 16, 3)), "targets": jax.nn.one_hot(jnp.array([0, 2]), 3)}
  state, metrics = step(state, batch)
  assert int(state.step) == 1 and bool(jnp.isfinite(metrics["loss"])), metrics
bad = sorted(m for m in sys.modules if m.split(".")[0] in {"tensorflow", "tensorflow_datasets"})
assert not bad, bad
print("TRAINED WITHOUT TF")
"""
  out = _python(code, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "TRAINED WITHOUT TF" in out.stdout


def _bench(tmp_path, blocked, *args, timeout=600):
  code = _blocker(*blocked) + f"""
import runpy
sys.argv = [{BENCH!r}, "--tiny", "--out={tmp_path}"] + {list(args)!r}
runpy.run_path({BENCH!r}, run_name="__main__")
"""
  out = _python(code, timeout)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  with open(tmp_path / "gpu_step.json") as f:
    result = json.load(f)
  with open(tmp_path / "gpu_step.md") as f:
    table = f.read()
  return out.stdout, result, table


def test_gpu_benchmark_tiny_runs_jax_torch_and_layers_without_tensorflow(tmp_path):
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  stdout, result, table = _bench(tmp_path, NO_TF, "--models=vit", "--dtypes=bfloat16")
  assert re.search(r"^device: CPU: .+x\d+ \(", stdout, re.M), stdout
  assert result["peaks"]["bfloat16"] > 0 and result["auto_layers"] == "project"
  cells = {(c["framework"], c["variant"]): c for c in result["cells"]}
  assert sorted(cells) == [("jax", "auto"), ("jax", "flax"), ("jax", "project"),
                           ("torch", "compile"), ("torch", "eager")]
  assert cells[("jax", "auto")]["layers"] == "project"  # 'auto' on a CPU
  for key in (("jax", "auto"), ("jax", "flax"), ("jax", "project"), ("torch", "eager")):
    c = cells[key]
    assert "skipped" not in c, c
    assert c["img_s"] > 0 and abs(c["img_s"] - 2 / (c["ms_step"] / 1e3)) < 1e-6 * c["img_s"]
    assert c["tflops"] > 0 and 0 < c["mfu"] < 1 and c["compile_s"] > 0
  assert cells[("jax", "flax")]["xla_gflop"] > 0
  assert "--tiny: torch.compile not timed" in cells[("torch", "compile")]["skipped"]
  assert [r["layer"] for r in result["layers"]][:2] == ["conv 1x1 56px 64->256",
                                                       "conv 1x1/2 56px 256->512"]
  attention = [r for r in result["layers"] if r["layer"].startswith("attention")]
  assert all((r.get("flax_over_project") or 0) > 0 for r in result["layers"]
             if r not in attention), result["layers"]
  # Attention: Flax's and cuDNN's (its fallback to Flax's on a CPU) timed; the project's
  # timed too or its error recorded (XLA:CPU, bf16 dot layouts).
  assert len(attention) == 1 and attention[0]["cudnn_ms"] > 0 and attention[0]["flax_ms"] > 0
  assert attention[0]["cudnn_over_flax"] > 0
  assert (attention[0].get("project_ms") or 0) > 0 or "project_error" in attention[0]
  summary = result["summary"][0]
  assert summary["flax_over_project"] > 0 and summary["jax_over_torch_eager"] > 0
  assert summary["auto_over_flax"] > 0
  assert "| jax | vit | 2 | bfloat16 | project |" in table
  assert "| layer (forward + backward) |" in table and "flax / project" in table


def test_gpu_benchmark_skips_with_reasons_without_torch_and_past_its_budget(tmp_path):
  blocked = NO_TF + ("torch", "timm", "transformers")
  _, result, table = _bench(tmp_path / "a", blocked, "--models=resnet18", "--dtypes=float32",
                            "--impls=flax", "--nolayers")
  (jax_cell, eager, compiled) = result["cells"]
  assert jax_cell["framework"] == "jax" and jax_cell["img_s"] > 0
  assert result["torch"] is None
  for c in (eager, compiled):
    assert c["skipped"].startswith("torch not importable"), c
  assert "torch not importable" in table
  _, result, _ = _bench(tmp_path / "b", NO_TF, "--models=vit", "--budget_s=0")
  assert result["cells"] and all("time budget" in c["skipped"] for c in result["cells"]
                                 if c["framework"] == "jax")
  assert all(r["skipped"].startswith("time budget") for r in result["layers"])


def test_model_flops_match_a_hand_count_of_vit_b16():
  """The MFU's FLOPs: ViT-B/16's forward at 224 px counted by hand (2 FLOPs per multiply-add).

  Tokens T=197, width D=768, MLP 3072, 12 blocks: per block q, k, v and the output
  projection 4*T*D^2, the scores and their weighted sum 2*T^2*D, the MLP 2*T*D*3072
  multiply-adds; plus the patch embedding 196*768*768 and the 1000-class head. XLA also
  counts the elementwise work (LayerNorm, softmax, GELU, biases), well under 1%.
  """
  code = f"""
import sys
sys.path.insert(0, {os.path.join(ROOT, 'benchmarks')!r})
from absl import flags
import gpu_step
flags.FLAGS(["gpu_step", "--out=unused"])
print("FLOPS", gpu_step.model_flops("vit_b16", 2))
"""
  out = _python(code, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  measured = float(out.stdout.split("FLOPS")[-1])
  t, d, mlp = 197, 768, 3072
  forward = 12 * (4 * t * d * d + 2 * t * t * d + 2 * t * d * mlp) + 196 * 768 * d + d * 1000
  expected = 3 * 2 * 2 * forward  # 3x forward for the train step, batch 2, 2 FLOPs per MAC
  assert expected <= measured < 1.01 * expected, (measured, expected)
