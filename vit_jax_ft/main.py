r"""Fine-tune an image classifier: `python -m vit_jax_ft.main --config=C --workdir=D`.

Any config field can be overridden, e.g. `--config.optimizer.lr=1e-4`.
Rerunning the same command on the same workdir resumes from the last
checkpoint. Results: WORKDIR/eval_results.json, TensorBoard event files,
checkpoints/ and config.json.
"""

import os

# TensorFlow only feeds data: keep it quiet and off the GPU. Set before any
# import of TensorFlow (this is the program's entry point).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import difflib  # pylint: disable=g-import-not-at-top,g-bad-import-order
import runpy
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_dict
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
flags.mark_flags_as_required(["config", "workdir"])


def unknown_override_keys(argv: list[str], config) -> list[tuple[str, list[str]]]:
  """(key, closest valid keys) for every --config.KEY override not in `config`."""
  from vit_jax_ft import base_config  # pylint: disable=g-import-not-at-top
  valid = base_config.flatten_keys(config)
  unknown = []
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    key = arg[len("--config."):].split("=", 1)[0]
    if key not in valid:
      unknown.append((key, difflib.get_close_matches(key, valid, n=3, cutoff=0.5)))
  return unknown


def _config_path(argv: list[str]) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def parse_flags(argv: list[str]) -> list[str]:
  """Checks --config.KEY overrides against the config before absl parses them.

  ml_collections would raise a traceback deep inside flag parsing; a user who
  mistyped a key gets one line naming it and the closest valid keys instead.
  """
  path = _config_path(argv)
  # 'FILE:ARG' calls FILE's get_config(ARG), as ml_collections' config flags do
  # (configs/convnext_skin_cancer.py:convnext_small).
  arg = None
  if path and not os.path.exists(path) and ":" in path:
    path, arg = path.split(":", 1)
  if path and os.path.exists(path):
    get_config = runpy.run_path(path)["get_config"]
    config = get_config() if arg is None else get_config(arg)
    for key, close in unknown_override_keys(argv, config):
      hint = f"; did you mean {', '.join(close)}?" if close else ""
      sys.exit(f"error: unknown config key '{key}' (in {path}){hint}")
  elif path:
    sys.exit(f"error: config file {path!r} does not exist")
  # absl cannot parse None for a typed field; such overrides are applied after
  # parsing (e.g. --config.num_epochs=None --config.total_steps=500).
  nones = [a for a in argv if a.startswith("--config.") and a.split("=", 1)[-1] in ("None", "none")]
  try:
    rest = flags.FLAGS([a for a in argv if a not in nones])
  except flags.Error as e:
    sys.exit(f"error: {e}")
  for arg in nones:
    key = arg[len("--config."):].split("=", 1)[0]
    *parents, leaf = key.split(".")
    node = _CONFIG.value
    for parent in parents:
      node = node[parent]
    # Only optional fields (placeholders, or None already) may be None; a
    # locked ConfigDict would otherwise accept None for any int field.
    field = node._fields.get(leaf)  # pylint: disable=protected-access
    if not (node[leaf] is None or isinstance(field, config_dict.FieldReference)):
      sys.exit(f"error: config.{key} cannot be None (it is {node[leaf]!r}; not an optional field)")
    node[leaf] = None
  return rest


def _maybe_initialize_distributed() -> None:
  """Joins a multi-host job when the environment describes one.

  Either set JAX_COORDINATOR_ADDRESS (host:port of process 0),
  JAX_NUM_PROCESSES and JAX_PROCESS_ID on every host, or run under SLURM
  with several tasks (JAX reads the SLURM variables itself).
  """
  import jax  # pylint: disable=g-import-not-at-top
  # CPU processes (tests, CPU clusters) need a collectives backend; GPUs use NCCL regardless.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    jax.distributed.initialize(
        coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
        num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
        process_id=int(os.environ["JAX_PROCESS_ID"]))
  elif int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    jax.distributed.initialize()
  if jax.process_count() > 1:
    logging.info("Process %d of %d; %d local / %d global devices.", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())


def main(argv, entry=None):
  """Starts up and runs entry(config, workdir): train.train_and_evaluate by default.

  Other programs taking --config and --workdir (vit_jax_ft.probe) pass their own entry.
  """
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # Imported here so that --help and flag errors come back fast.
  from vit_jax_ft import cli  # pylint: disable=g-import-not-at-top
  if entry is None:
    from vit_jax_ft.training import train  # pylint: disable=g-import-not-at-top
    entry = train.train_and_evaluate

  def body():
    _maybe_initialize_distributed()
    entry(_CONFIG.value, _WORKDIR.value)

  cli.run_main(body)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
