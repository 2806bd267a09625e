"""The train-step benchmark runs end to end on a tiny model and prints every figure it promises."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_train_step_benchmark_prints_rates_mfu_memory_and_torch_ratio():
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "train_step.py"), "--model=vit_ti16",
         "--image_size=32", "--batch=2", "--steps=2", "--dtype=bfloat16"]
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-3000:]
  text = out.stdout
  train = re.search(r"jax train step: ([\d.]+) ms/step, ([\d.]+) img/s, ([\d.]+) GFLOP/step, "
                    r"([\d.]+) TFLOP/s, MFU ([\d.]+)%", text)
  assert train, text
  ms, img_s = float(train[1]), float(train[2])
  assert ms > 0 and abs(img_s - 2 / (ms / 1e3)) < 0.02 * img_s  # batch / seconds per step
  assert float(train[3]) > 0 and 0 < float(train[5]) < 100
  assert re.search(r"jax inference: [\d.]+ img/s", text), text
  assert re.search(r"temporary memory \(XLA\): [\d.]+ GiB, with model.remat [\d.]+ GiB", text), text
  torch = re.search(r"pytorch \(HF, AdamW, autocast bf16\): ([\d.]+) ms/step, [\d.]+ img/s; "
                    r"jax/pytorch speed ratio ([\d.]+)x", text)
  assert torch, text
  assert abs(float(torch[2]) - float(torch[1]) / ms) < 0.01 + 0.02 * float(torch[2])


def test_finetune_quality_benchmark_runs_every_recipe_and_prints_the_table(tmp_path):
  """The plumbing only (digits, a tiny ViT, 2 steps): every recipe runs, the table has its rows."""
  cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "finetune_quality.py"), "--smoke",
         "--steps=2", f"--out={tmp_path}", "--seeds=0"]
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=ROOT))
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  # recipe | test macro-F1 | worst seed | test accuracy | ...
  rows = {m[1]: (float(m[2]), float(m[4])) for m in re.finditer(
      r"^\| ((?:sklearn|probe|ft_plain|ft|lpft)(?: \(\+tta dihedral\))?) \| ([\d.]+) \| "
      r"([\d.]+) \| ([\d.]+) \|", out.stdout, re.M)}
  assert sorted(rows) == sorted(["sklearn", "probe", "ft_plain", "ft", "ft (+tta dihedral)",
                                 "lpft", "lpft (+tta dihedral)"])
  assert all(0 <= f1 <= 1 and 0 <= acc <= 1 for f1, acc in rows.values())
  # Says which CPU it ran on, and whether it has hardware bfloat16 (benchmarks/machine.py).
  assert re.search(r"x\d+ \((amx_bf16|avx512_bf16|no AMX/AVX512-BF16)", out.stdout), out.stdout
  # LP-FT really started from the probe's head.
  with open(os.path.join(tmp_path, "seed0", "lpft.log")) as f:
    assert "Head initialised from" in f.read()


def test_finetune_quality_sklearn_probe_fits_one_sigmoid_per_label_on_multilabel_data(tmp_path):
  """Multi-label probe caches get one-vs-rest logistic regressions, scored per label at p=0.5."""
  rng = np.random.default_rng(0)
  # Label j is on when feature j is positive: separable per label, and about 1 in 3
  # examples carries two or more labels (an argmax over labels could not fit it).
  records = {}
  for split, n in (("train", 300), ("val", 100), ("test", 100)):
    x = rng.normal(size=(n, 6)).astype(np.float32)
    y = (x[:, :3] > 0).astype(np.float32)
    np.savez(tmp_path / f"{split}.npz", features=x, targets=y)
    records[split] = {"path": str(tmp_path / f"{split}.npz")}
  probe = tmp_path / "probe.json"
  probe.write_text(json.dumps({"features": records, "multilabel": True}))
  (tmp_path / "config.json").write_text(json.dumps({"data": {
      "train_split": "train", "val_split": "val", "test_split": "test"}}))
  # In a subprocess: the benchmark's absl flags (--config, ...) would clash with those of
  # vit_jax_ft.main that other tests import into the same interpreter.
  code = f"""
import json, sys
sys.path.insert(0, {os.path.join(ROOT, "benchmarks")!r})
import finetune_quality
results, _ = finetune_quality._sklearn_probe({str(tmp_path)!r})
open({str(probe)!r}, "w").write(json.dumps({{"features": {records!r}, "multilabel": False}}))
features, multilabel = finetune_quality._probe_features({str(tmp_path)!r})
print("RESULT", json.dumps({{"results": results, "multilabel": multilabel,
                             "ndim": features["test"][1].ndim}}))
"""
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=300, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
  assert out.returncode == 0, out.stderr[-3000:]
  found = json.loads(out.stdout.split("RESULT", 1)[1])
  results = found["results"]
  assert results["test_macro_f1"] > 0.95 and results["test_accuracy"] > 0.85, results
  # Single-label data keeps the softmax regression over class indices.
  assert not found["multilabel"] and found["ndim"] == 1


def test_ab_step_benchmark_times_both_steps_alternately_and_prints_the_ratio():
  cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "ab_step.py"), "--model=resnet18",
         "--image_size=32", "--batch=2", "--rounds=2", "--dtype=float32"]
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-3000:]
  text = out.stdout
  assert re.search(r"^CPU: .+; resnet18 batch 2 float32 32 px; B = without flat_weight_grad$",
                   text, re.M), text
  medians = {}
  for label in ("A (as shipped)", "B (without)"):
    assert re.search(rf"^{re.escape(label)}: \d+ copy ops, \d+ YNNPACK convolutions in the "
                     "compiled step$", text, re.M), text
    m = re.search(rf"^{re.escape(label)}: median ([\d.]+) ms/step \(([\d., ]+)\)$", text, re.M)
    assert m and len(m[2].split(", ")) == 2, text  # --rounds timed steps each
    medians[label] = float(m[1])
  ratio = float(re.search(r"^A / B speed: ([\d.]+)x$", text, re.M)[1])
  assert abs(ratio - medians["B (without)"] / medians["A (as shipped)"]) < 0.01 + 0.05 * ratio


def test_ab_step_without_the_cpu_compiler_options_hands_convolutions_back_to_ynnpack():
  cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "ab_step.py"), "--model=resnet18",
         "--image_size=32", "--batch=2", "--rounds=1", "--dtype=float32", "--change=ynn_conv"]
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-3000:]
  counts = dict(re.findall(r"^(A|B) \(.*?\): \d+ copy ops, (\d+) YNNPACK convolutions",
                           out.stdout, re.M))
  # As shipped (layer_impl.CPU_COMPILER_OPTIONS) no convolution runs on YNNPACK; with
  # XLA's defaults ResNet-18's 3x3 convs (forward, input and kernel gradients) do.
  assert counts["A"] == "0" and int(counts["B"]) >= 3 * 8, out.stdout
