"""Helpers shared by the pretrained-weights tests (torch is imported lazily).

Reference models get random weights that are pushed away from their
initialisation (LayerNorm/BatchNorm scales and shifts, BatchNorm running
statistics), so that a converter that drops or swaps them fails parity.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from vit_jax_ft.inputs import normalization as normalization_lib

# ImageNet classes used by the real-photo checks (index -> label).
IMAGENET_CATS = (281, 282, 283, 284, 285)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
IMAGENET_COFFEE = (504, 967, 968)          # coffee mug, espresso, cup


def photos(size: int) -> np.ndarray:
  """scikit-image's `chelsea` (a cat) and `coffee` (an espresso), [2, size, size, 3] uint8."""
  import skimage.data  # pylint: disable=g-import-not-at-top
  return np.stack([np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR))
                   for img in (skimage.data.chelsea(), skimage.data.coffee())])


def perturb_torch_model(model, seed: int = 0, scale: float = 0.02) -> None:
  """Adds noise to every weight and moves norm parameters and BN statistics off init.

  BatchNorm running statistics are first measured on random images (so that
  activations keep a sane scale through 16+ blocks, as in a trained network)
  and then jittered, so they are neither the init values nor batch statistics.
  """
  import torch  # pylint: disable=g-import-not-at-top
  gen = torch.Generator().manual_seed(seed)
  noise = lambda t, s: torch.randn(t.shape, generator=gen, dtype=t.dtype) * s
  norms = [m for m in model.modules() if isinstance(m, (torch.nn.LayerNorm, torch.nn.BatchNorm2d))]
  batchnorms = [m for m in norms if isinstance(m, torch.nn.BatchNorm2d)]
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.add_(noise(p, scale))
    for module in norms:
      module.weight.copy_(1.0 + noise(module.weight, 0.1))
      module.bias.copy_(noise(module.bias, 0.1))
    if batchnorms:
      for module in batchnorms:
        module.reset_running_stats()
        module.momentum = None  # Cumulative average over the calibration batches.
      model.train()
      # Real photos, as a trained network's statistics come from real images.
      model(torch_nchw(normalization_lib.normalize(photos(160), "imagenet")))
      for module in batchnorms:
        module.momentum = 0.1
        module.running_mean.add_(noise(module.running_mean, 0.05))
        module.running_var.mul_(0.8 + 0.4 * torch.rand(module.running_var.shape, generator=gen))
  model.eval()


def torch_nchw(x: np.ndarray):
  import torch  # pylint: disable=g-import-not-at-top
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def assert_logits_match(label: str, ours: np.ndarray, reference: np.ndarray,
                        atol: float) -> None:
  """Prints the largest logit difference (the figure the parity notes quote) and asserts it."""
  print(f"{label} max |logits diff| {np.abs(ours - reference).max():.3g}, "
        f"max |logit| {np.abs(reference).max():.3g}")
  np.testing.assert_allclose(ours, reference, atol=atol, rtol=0)
