"""Conversion time and peak memory for a ViT-B/16 checkpoint, per source format.

  python benchmarks/convert.py [--formats=huggingface,vit_jax_npz] [--workdir=/tmp/x]

Writes a random ViT-B/16 checkpoint (ImageNet-1k head, 86.6M parameters,
~346 MB in float32) in each format, then converts it in a fresh Python
process per format (so that its peak RSS is the conversion's alone) and
prints: checkpoint size, seconds to convert, seconds to save the Orbax
checkpoint, RSS after imports, peak RSS, and peak / checkpoint size both
absolute and above the import baseline. Goal: seconds, peak < 3x checkpoint.
"""

import json
import os
import subprocess
import sys
import tempfile
import textwrap

from absl import app
from absl import flags
import numpy as np

_FORMATS = flags.DEFINE_list("formats", ["huggingface", "vit_jax_npz"], "Formats to measure.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Scratch folder (default: a temp dir).")

# Runs in a fresh interpreter: imports, then convert and save, reporting /proc numbers.
_CHILD = textwrap.dedent("""
    import json, sys, time
    def rss_mb(field):
      with open("/proc/self/status") as f:
        for line in f:
          if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    from vit_jax_ft import pretrained
    baseline = rss_mb("VmRSS")
    start = time.perf_counter()
    converted = pretrained.convert(sys.argv[1], model_name="vit_b16")
    convert_s = time.perf_counter() - start
    start = time.perf_counter()
    pretrained.save_converted(converted, sys.argv[2])
    save_s = time.perf_counter() - start
    print(json.dumps({"convert_s": convert_s, "save_s": save_s, "baseline_mb": baseline,
                      "peak_mb": rss_mb("VmHWM")}))
""")


def _vit_b16_params() -> dict:
  """Random ViT-B/16 params in our (vit_jax) layout, without running the model."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from vit_jax_ft.models import vit  # pylint: disable=g-import-not-at-top
  model = vit.VisionTransformer(num_classes=1000, **vit.VIT_PRESETS["vit_b16"])
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)),
                                             train=False))["params"]
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: rng.standard_normal(s.shape, dtype=np.float32) * 0.02, shapes)


def write_checkpoint(fmt: str, params: dict, folder: str) -> str:
  """Writes `params` as a `fmt` checkpoint under `folder`; returns the source path."""
  from vit_jax_ft.pretrained import conversion  # pylint: disable=g-import-not-at-top
  from vit_jax_ft.pretrained import hf_export  # pylint: disable=g-import-not-at-top
  from vit_jax_ft.pretrained import tensor_files  # pylint: disable=g-import-not-at-top
  if fmt == "vit_jax_npz":
    path = os.path.join(folder, "ViT-B_16.npz")
    np.savez(path, **conversion.flatten(params))
    return path
  if fmt == "huggingface":
    path = os.path.join(folder, "vit-base-patch16-224")
    os.makedirs(path, exist_ok=True)
    tensor_files.write_safetensors(os.path.join(path, "model.safetensors"),
                                   hf_export.vit_state_dict(params))
    with open(os.path.join(path, "config.json"), "w") as f:
      json.dump({"model_type": "vit", "hidden_size": 768, "num_attention_heads": 12,
                 "num_hidden_layers": 12, "intermediate_size": 3072, "hidden_act": "gelu",
                 "layer_norm_eps": 1e-12, "image_size": 224, "patch_size": 16}, f)
    return path
  raise ValueError(f"unknown format {fmt!r}")


def _size_mb(path: str) -> float:
  if os.path.isfile(path):
    return os.path.getsize(path) / 2**20
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path)
             for f in fs if f.endswith((".safetensors", ".bin"))) / 2**20


def main(argv):
  del argv
  workdir = _WORKDIR.value or tempfile.mkdtemp(prefix="convert_bench_")
  params = _vit_b16_params()
  rows = []
  for fmt in _FORMATS.value:
    source = write_checkpoint(fmt, params, workdir)
    out = os.path.join(workdir, f"converted_{fmt}")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", _CHILD, source, out], env=env, check=True,
                            capture_output=True, text=True)
    stats = json.loads(result.stdout.strip().splitlines()[-1])
    size = _size_mb(source)
    rows.append((fmt, size, stats))
    subprocess.run(["rm", "-rf", out], check=True)
  print(f"{'format':<14} {'ckpt MB':>8} {'convert s':>10} {'save s':>7} {'base MB':>8} "
        f"{'peak MB':>8} {'peak/ckpt':>10} {'(peak-base)/ckpt':>17}")
  for fmt, size, s in rows:
    print(f"{fmt:<14} {size:>8.0f} {s['convert_s']:>10.2f} {s['save_s']:>7.2f} "
          f"{s['baseline_mb']:>8.0f} {s['peak_mb']:>8.0f} {s['peak_mb'] / size:>10.2f} "
          f"{(s['peak_mb'] - s['baseline_mb']) / size:>17.2f}")


if __name__ == "__main__":
  app.run(main)
