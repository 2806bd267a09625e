r"""Train input throughput: the tf.data pipeline vs a PIL + numpy process pool.

  python benchmarks/input_pipeline.py --source=../shared/data/artdl_sample/labels.csv
  python benchmarks/input_pipeline.py --source=../shared/data/isic_skin_9cls

Prepares `--source` with `python -m vit_jax_ft.data.prepare` into a temporary
folder (or uses `--prepared`, a folder that has a dataset_info.json), then
times, in this one process and on the same cores, images/s of

* tf.data: `inputs.pipeline.train_iterator` (decode, random-resized crop,
  224 px, flip, RandAugment, ImageNet normalisation, Mixup/CutMix per batch)
  over every record of every split, and
* PIL: the same operations with PIL and numpy, per image in a
  `multiprocessing.Pool` of `--workers` processes (decode with
  `Image.open().convert('RGB')`, crop, BILINEAR resize, flip, RandAugment with
  ImageOps / ImageEnhance / affine transforms), batched, normalised and
  mixed in numpy in the main process,

and prints both and their ratio. The goal is tf.data >= 1.5x PIL, and far
above what a ViT-B/16 train step consumes (~3 images/s on a 2-core CPU).
Figures on shared machines are noisy; the two pipelines alternate
`--rounds` times and the median round of each is reported. It also prints the
CPU time per image of each (this process's threads; for PIL also the pool's
processes, from /proc), which other load on the machine barely changes.
"""

import io
import math
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app  # pylint: disable=g-import-not-at-top,g-bad-import-order
from absl import flags
import numpy as np
from PIL import Image
from PIL import ImageEnhance
from PIL import ImageOps
import tensorflow as tf

from vit_jax_ft import base_config
from vit_jax_ft.data import tfrecords
from vit_jax_ft.inputs import pipeline

_SOURCE = flags.DEFINE_string("source", "../shared/data/artdl_sample/labels.csv",
                              "Raw data for vit_jax_ft.data.prepare (folder or CSV).")
_PREPARED = flags.DEFINE_string("prepared", None, "An already prepared dataset folder.")
_SIZE = flags.DEFINE_integer("image_size", 224, "Output side.")
_BATCH = flags.DEFINE_integer("batch", 32, "Batch size.")
_IMAGES = flags.DEFINE_integer("images", 512, "Images timed per round and pipeline.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Alternating timing rounds; the median is reported.")
_WORKERS = flags.DEFINE_integer("workers", 0, "PIL pool processes (0: the cores this process may use).")
_LAYERS = flags.DEFINE_integer("randaugment_layers", 2, "RandAugment N (0: off).")
_MAGNITUDE = flags.DEFINE_float("randaugment_magnitude", 10.0, "RandAugment M.")
_MIXUP = flags.DEFINE_float("mixup_alpha", 0.8, "Mixup alpha (0: off).")
_CUTMIX = flags.DEFINE_float("cutmix_alpha", 1.0, "CutMix alpha (0: off).")
_DRAFT = flags.DEFINE_bool("pil_draft", False,
                           "Let PIL decode JPEGs scaled down (Image.draft) under the same rule as "
                           "tf.data (crop >= 2x the output side after scaling).")

_MEAN = np.array([0.485, 0.456, 0.406], np.float32) * 255.0
_STD = np.array([0.229, 0.224, 0.225], np.float32) * 255.0


# ----------------------------------------------------------------------------
# The PIL + numpy baseline (what a torchvision/timm-style loader does).
# ----------------------------------------------------------------------------


def _random_resized_box(rng, width, height, min_scale=0.08):
  """torchvision RandomResizedCrop.get_params: 10 tries, then the whole image."""
  area = width * height
  for _ in range(10):
    target = area * rng.uniform(min_scale, 1.0)
    ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    w = int(round(math.sqrt(target * ratio)))
    h = int(round(math.sqrt(target / ratio)))
    if 0 < w <= width and 0 < h <= height:
      x = int(rng.integers(0, width - w + 1))
      y = int(rng.integers(0, height - h + 1))
      return x, y, x + w, y + h
  return 0, 0, width, height


def _pil_randaugment(img, rng, num_layers, magnitude):
  """The same ops and arguments as vit_jax_ft.inputs.augment.randaugment, in PIL."""
  level = magnitude / 10.0
  fill = (128, 128, 128)
  enhance = 0.1 + 1.8 * level
  w, h = img.size
  for _ in range(num_layers):
    op = int(rng.integers(0, 17))
    sign = -1.0 if rng.random() < 0.5 else 1.0
    if op == 0:
      img = ImageOps.autocontrast(img)
    elif op == 1:
      img = ImageOps.equalize(img)
    elif op == 2:
      img = ImageOps.invert(img)
    elif op == 3:
      img = img.rotate(sign * 30 * level, fillcolor=fill)
    elif op == 4:
      bits = int(4 * level)
      img = ImageOps.posterize(img, bits) if bits else Image.new("RGB", img.size)
    elif op == 5:
      img = ImageOps.solarize(img, int(256 * level))
    elif op in (6, 7, 8, 9):
      enhancer = (ImageEnhance.Color, ImageEnhance.Contrast, ImageEnhance.Brightness,
                  ImageEnhance.Sharpness)[op - 6]
      img = enhancer(img).enhance(enhance)
    elif op in (10, 11, 12, 13):
      s, t = sign * 0.3 * level, sign * 100 * level
      matrix = {10: (1, s, 0, 0, 1, 0), 11: (1, 0, 0, s, 1, 0),
                12: (1, 0, -t, 0, 1, 0), 13: (1, 0, 0, 0, 1, -t)}[op]
      img = img.transform(img.size, Image.AFFINE, matrix, fillcolor=fill)
    elif op == 14:
      pad = int(40 * level)
      cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
      a = np.array(img)
      a[max(cy - pad, 0):cy + pad, max(cx - pad, 0):cx + pad] = 128
      img = Image.fromarray(a)
    elif op == 15:
      a = np.asarray(img).astype(np.int16)
      added = np.clip(a + int(110 * level), 0, 255)
      img = Image.fromarray(np.where(a < 128, added, a).astype(np.uint8))
    # op 16: identity
  return img


def _pil_example(args):
  """One train example: bytes -> augmented uint8 [S, S, 3]."""
  image_bytes, seed, size, num_layers, magnitude, draft = args
  rng = np.random.default_rng(seed)
  img = Image.open(io.BytesIO(image_bytes))
  box = _random_resized_box(rng, *img.size)
  if draft and img.format == "JPEG":
    side = min(box[2] - box[0], box[3] - box[1])
    ratio = max([r for r in (1, 2, 4, 8) if r == 1 or side >= 2 * size * r])
    if ratio > 1:
      width = img.size[0]
      img.draft("RGB", (-(-img.size[0] // ratio), -(-img.size[1] // ratio)))
      scale = img.size[0] / width
      box = tuple(int(round(c * scale)) for c in box)
  img = img.convert("RGB").crop(box)
  img = img.resize((size, size), Image.BILINEAR)
  if rng.random() < 0.5:
    img = img.transpose(Image.FLIP_LEFT_RIGHT)
  if num_layers:
    img = _pil_randaugment(img, rng, num_layers, magnitude)
  return np.asarray(img)


def _numpy_mix(images, targets, rng, mixup_alpha, cutmix_alpha):
  """Per-batch Mixup or CutMix with the reversed batch, as vit_jax_ft.inputs.mixing."""
  if not (mixup_alpha or cutmix_alpha):
    return images, targets
  n, h, w, _ = images.shape
  use_cutmix = cutmix_alpha and (not mixup_alpha or rng.random() < 0.5)
  lam = rng.beta(cutmix_alpha or 1.0, cutmix_alpha or 1.0, n) if use_cutmix else rng.beta(
      mixup_alpha, mixup_alpha, n)
  partner = images[::-1]
  if use_cutmix:
    out = images.copy()
    for i in range(n):
      r = math.sqrt(1 - lam[i])
      ch, cw = round(r * h), round(r * w)
      y0, x0 = int(rng.integers(0, h)) - ch // 2, int(rng.integers(0, w)) - cw // 2
      y0, y1, x0, x1 = max(y0, 0), min(max(y0 + ch, 0), h), max(x0, 0), min(max(x0 + cw, 0), w)
      out[i, y0:y1, x0:x1] = partner[i, y0:y1, x0:x1]
      lam[i] = 1 - (y1 - y0) * (x1 - x0) / (h * w)
  else:
    out = lam[:, None, None, None] * images + (1 - lam[:, None, None, None]) * partner
  lam = lam[:, None].astype(np.float32)
  return out.astype(np.float32), lam * targets + (1 - lam) * targets[::-1]


def _cpu_seconds(pids=()) -> float:
  """User + system CPU seconds of this process (all threads) and of `pids`."""
  total = time.process_time()
  tick = os.sysconf("SC_CLK_TCK")
  for pid in pids:
    with open(f"/proc/{pid}/stat") as f:
      fields = f.read().rsplit(")", 1)[1].split()
    total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
  return total


def time_pil(records, pool, num_images, batch, size, num_layers, magnitude, mixup, cutmix,
             draft):
  """(images/s, CPU-ms per image) of the PIL pool pipeline over `num_images` images."""
  pids = [p.pid for p in pool._pool]  # pylint: disable=protected-access
  num_classes = max(max(l) for _, l in records) + 1 if records else 1
  rng = np.random.default_rng(0)
  jobs = ((records[i % len(records)][0], i, size, num_layers, magnitude, draft)
          for i in range(num_images))
  start, cpu = time.perf_counter(), _cpu_seconds(pids)
  pending_images, pending_labels = [], []
  for i, image in enumerate(pool.imap(_pil_example, jobs, chunksize=4)):
    pending_images.append(image)
    pending_labels.append(records[i % len(records)][1])
    if len(pending_images) == batch:
      images = (np.stack(pending_images).astype(np.float32) - _MEAN) / _STD
      targets = np.zeros((batch, num_classes), np.float32)
      for row, labels in enumerate(pending_labels):
        targets[row, labels] = 1.0
      _numpy_mix(images, targets, rng, mixup, cutmix)
      pending_images, pending_labels = [], []
  wall = time.perf_counter() - start
  return num_images / wall, (_cpu_seconds(pids) - cpu) / num_images * 1e3


# ----------------------------------------------------------------------------
# tf.data.
# ----------------------------------------------------------------------------


def time_tf(cfg, data_dir, info, num_images, batch, seed):
  """(images/s, CPU-ms per image) of train_iterator (after one warm-up batch)."""
  it = pipeline.train_iterator(cfg, data_dir, info, batch_size=batch, seed=seed)
  next(it)  # Builds the pipeline and fills the prefetch buffers' first batch.
  steps = max(1, num_images // batch)
  start, cpu = time.perf_counter(), _cpu_seconds()
  for _ in range(steps):
    next(it)
  wall, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
  del it  # Stop its background threads before the next timing.
  return steps * batch / wall, cpu / (steps * batch) * 1e3


def _all_splits(data_dir, info):
  """An info whose 'train' split holds every record of every split."""
  files = [f for s in info["splits"].values() for f in s["files"]]
  n = sum(s["num_examples"] for s in info["splits"].values())
  return dict(info, splits={"train": dict(files=files, num_examples=n)})


def _read_records(data_dir, info):
  out = []
  for f in info["splits"]["train"]["files"]:
    for rec in tf.data.TFRecordDataset(os.path.join(data_dir, f)):
      ex = tf.train.Example.FromString(rec.numpy()).features.feature
      out.append((ex["image"].bytes_list.value[0], list(ex["label"].int64_list.value)))
  return out


def main(_):
  workers = _WORKERS.value or len(os.sched_getaffinity(0))
  with tempfile.TemporaryDirectory() as tmp:
    data_dir = _PREPARED.value
    if not data_dir:
      data_dir = os.path.join(tmp, "prepared")
      cmd = [sys.executable, "-m", "vit_jax_ft.data.prepare", f"--source={_SOURCE.value}",
             f"--out={data_dir}", f"--num_workers={workers}"]
      print("Preparing:", " ".join(cmd), flush=True)
      subprocess.run(cmd, check=True, capture_output=True)
    info = _all_splits(data_dir, tfrecords.read_info(data_dir))
    records = _read_records(data_dir, info)
    sizes = [Image.open(io.BytesIO(b)).size for b, _ in records]
    kinds = {Image.open(io.BytesIO(b)).format for b, _ in records}
    print(f"{len(records)} images ({'/'.join(sorted(kinds))}), median "
          f"{int(np.median([w for w, _ in sizes]))}x{int(np.median([h for _, h in sizes]))} px, "
          f"{sum(len(b) for b, _ in records) / len(records) / 1024:.0f} KiB; {workers} cores; "
          f"output {_SIZE.value} px, batch {_BATCH.value}, RandAugment "
          f"{_LAYERS.value}x{_MAGNITUDE.value:g}, mixup {_MIXUP.value:g}, cutmix {_CUTMIX.value:g}")

    cfg = base_config.get_base_config().data
    cfg.image_size = _SIZE.value
    cfg.normalization = "imagenet"
    cfg.shuffle_buffer = min(1024, len(records))
    cfg.randaugment_layers = _LAYERS.value
    cfg.randaugment_magnitude = _MAGNITUDE.value
    cfg.mixup_alpha = _MIXUP.value
    cfg.cutmix_alpha = _CUTMIX.value

    tf_rates, pil_rates, tf_cpu, pil_cpu = [], [], [], []
    ctx = multiprocessing.get_context("spawn")  # no forked TF state in the workers
    with ctx.Pool(workers) as pool:
      pool.map(_pil_example, [(records[0][0], 0, 8, 0, 0.0, False)] * workers)  # start workers
      for r in range(_ROUNDS.value):
        rate, cpu = time_tf(cfg, data_dir, info, _IMAGES.value, _BATCH.value, seed=r)
        tf_rates.append(rate)
        tf_cpu.append(cpu)
        rate, cpu = time_pil(records, pool, _IMAGES.value, _BATCH.value, _SIZE.value,
                             _LAYERS.value, _MAGNITUDE.value, _MIXUP.value, _CUTMIX.value,
                             _DRAFT.value)
        pil_rates.append(rate)
        pil_cpu.append(cpu)
        print(f"round {r}: tf.data {tf_rates[-1]:.1f} img/s ({tf_cpu[-1]:.2f} CPU-ms/img), "
              f"PIL pool {pil_rates[-1]:.1f} img/s ({pil_cpu[-1]:.2f} CPU-ms/img)", flush=True)
    tf_rate, pil_rate = np.median(tf_rates), np.median(pil_rates)
    tf_ms, pil_ms = np.median(tf_cpu), np.median(pil_cpu)
    print(f"tf.data: {tf_rate:.1f} images/s, {tf_ms:.2f} CPU-ms per image (medians)")
    draft = " (JPEG draft decoding)" if _DRAFT.value else ""
    print(f"PIL + numpy{draft}, {workers} processes: {pil_rate:.1f} images/s, "
          f"{pil_ms:.2f} CPU-ms per image (medians)")
    print(f"ratio tf.data / PIL: {tf_rate / pil_rate:.2f}x in images/s, "
          f"{pil_ms / tf_ms:.2f}x in CPU time per image (goal >= 1.5x); "
          f"a ViT-B/16 train step on a 2-core CPU takes ~3 images/s")


if __name__ == "__main__":
  app.run(main)
