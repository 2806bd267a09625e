"""vit_jax_ft: fine-tune pretrained ViT and ResNet image classifiers with JAX/Flax."""

import importlib.util as _importlib_util

__version__ = "0.1.0"

# PyTorch's CUDA wheels bring triton, which transformers, torchvision and timm
# load through torch._dynamo; its LLVM crashes the process (segfault) when it
# loads after TensorFlow's, which this package imports for its input pipeline.
# Loaded first, both work. Only where triton is installed; ~0.1 s.
if _importlib_util.find_spec("triton") is not None:
  import triton  # pylint: disable=g-import-not-at-top,unused-import
