"""Image files given to the tools (predict, explain): listing, reading and eval preprocessing.

Each file goes through what training data went through: the dataset
preparation's conversion (EXIF rotation, RGB, the prepared dataset's
max_side; `vit_jax_ft.data.images`), then the eval preprocessing and the
run's normalisation.
"""

import glob
import os
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf

from vit_jax_ft.data import images as images_lib
from vit_jax_ft.inputs import pipeline


def list_images(spec: str) -> list[str]:
  """Files named by a comma-separated list of files, folders and globs, in order."""
  paths = []
  for item in (s.strip() for s in spec.split(",") if s.strip()):
    if os.path.isdir(item):
      for root, dirs, files in os.walk(item):
        # Hidden and macOS resource folders hold no real images.
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__MACOSX")
        paths += [os.path.join(root, f) for f in sorted(files)
                  if images_lib.is_image_name(f) and not f.startswith(".")]
    elif glob.has_magic(item):
      paths += sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
    else:
      paths.append(item)  # A missing file is reported as unreadable, with the rest predicted.
  if not paths:
    raise FileNotFoundError(f"No image files found for --images={spec!r}.")
  return list(dict.fromkeys(paths))


def max_side(info: dict) -> Optional[int]:
  """The longest side the prepared dataset stored its images at (None: unchanged)."""
  return ((info.get("options") or {}).get("image") or {}).get("max_side")


def make_preprocess(data_cfg):
  """Encoded bytes -> (model input, the [0, 255] crop for display), as in eval."""

  @tf.function(input_signature=[tf.TensorSpec([], tf.string)])
  def preprocess(image_bytes):
    # The very function eval_iterator maps over records.
    image = pipeline.eval_preprocess(image_bytes, data_cfg)
    return pipeline.normalize(image, data_cfg.normalization), image

  return preprocess


def load_image(path: str, options: images_lib.ImageOptions, preprocess):
  """(model input, display image, error): errors never raise."""
  result = images_lib.process_image(path, options, encode=True)
  if result.error:
    return None, None, result.error
  try:
    image, display = preprocess(tf.constant(result.data))
  except tf.errors.OpError as e:  # Decodable by PIL but not by TensorFlow.
    return None, None, f"cannot decode ({e.message.splitlines()[0]})"
  return image.numpy(), np.clip(display.numpy(), 0, 255).astype(np.uint8), None


def true_label(path: str, class_names: Sequence[str]) -> str:
  """The class a file is labelled with by its folder name ('' when the folder is no class)."""
  parent = os.path.basename(os.path.dirname(os.path.abspath(path)))
  return parent if parent in class_names else ""
