"""Shared start-up for the command-line tools (main, evaluate, predict, explain, sweep)."""

import logging as std_logging
import sys
from typing import Callable

from absl import logging


def quiet_library_logs() -> None:
  """Drops Orbax's INFO lines (dozens per restore) and JAX's backend probing."""
  std_logging.getLogger("jax._src.xla_bridge").setLevel(std_logging.WARNING)

  def keep(record) -> bool:
    return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname

  std_logging.getLogger("absl").addFilter(keep)


def hide_gpus_from_tensorflow() -> None:
  """TensorFlow only decodes images: keep it off the accelerator JAX uses."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")


def run_main(body: Callable[[], object]) -> None:
  """Runs `body`; bad inputs end with one line instead of a traceback.

  Bad configs and data are the usual cause of these errors (and a diverged
  run of FloatingPointError); `--verbosity=1` logs the traceback too.
  """
  quiet_library_logs()
  hide_gpus_from_tensorflow()
  try:
    body()
  except (ValueError, FileNotFoundError, FloatingPointError) as e:
    logging.debug("Traceback:", exc_info=True)
    sys.exit(f"error: {e}")
