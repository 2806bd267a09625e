"""Shared test setup: quiet TensorFlow, CPU only, the shared data folder."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # pylint: disable=g-import-not-at-top

# torch's CUDA wheels bring triton, which torchvision and timm load (through
# torch._dynamo); its LLVM segfaults the process when it loads after
# TensorFlow's, as it would in a full run (the input pipeline imports
# TensorFlow first). Loaded first, both work; 0.1 s.
try:
  import triton  # pylint: disable=g-import-not-at-top,unused-import
except ImportError:
  pass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")


@pytest.fixture
def shared_data():
  """Path of ../shared/data (real image sets); skips when a fresh clone lacks it."""
  if not os.path.isdir(SHARED_DATA):
    pytest.skip(f"real data sets not found at {SHARED_DATA} (only present beside the dev checkout)")
  return SHARED_DATA
