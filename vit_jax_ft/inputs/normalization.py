"""The input normalisations pretrained weights expect, in one place (numpy; no TensorFlow).

The tf.data pipeline (`inputs/pipeline.py`), the explanations (display),
the weight converters (reading a source's mean/std) and the Hugging Face
export (writing one) all take their constants from here.
"""

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)  # Keras Applications ResNet50, on 0..255 BGR.

# Every mode that is (x / 255 - mean) / std on RGB: its (mean, std) on [0, 1] pixels.
MEAN_STD = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "minus_one_to_one": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "zero_one": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}
MODES = tuple(MEAN_STD) + ("caffe_bgr",)


def _check(mode: str) -> None:
  if mode not in MODES:
    raise ValueError(f"data.normalization must be one of {MODES}, got {mode!r}")


def normalize(images: np.ndarray, mode: str) -> np.ndarray:
  """0..255 RGB NHWC (uint8 or float) -> float32 model input."""
  _check(mode)
  x = np.asarray(images, np.float32)
  if mode == "caffe_bgr":
    return x[..., ::-1] - np.asarray(CAFFE_BGR_MEAN, np.float32)
  mean, std = MEAN_STD[mode]
  return (x / 255.0 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def denormalize(images: np.ndarray, mode: str) -> np.ndarray:
  """Inverse of `normalize`: back to uint8 RGB for display."""
  _check(mode)
  x = np.asarray(images, np.float32)
  if mode == "caffe_bgr":
    x = (x + np.asarray(CAFFE_BGR_MEAN, np.float32))[..., ::-1]
  else:
    mean, std = MEAN_STD[mode]
    x = (x * np.asarray(std, np.float32) + np.asarray(mean, np.float32)) * 255.0
  return np.clip(np.round(x), 0, 255).astype(np.uint8)
