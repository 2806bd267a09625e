"""The train-step benchmark runs end to end on a tiny model and prints every figure it promises."""

import os
import re
import subprocess
import sys

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
