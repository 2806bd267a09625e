"""Command line: convert pretrained weights, inspect them, export a fine-tuned run.

  python -m vit_jax_ft.pretrained convert --source=PATH_OR_ID [--model=vit_b16] --out=DIR
  python -m vit_jax_ft.pretrained inspect --source=PATH_OR_ID_OR_DIR
  python -m vit_jax_ft.pretrained export --workdir=DIR --format=huggingface --out=DIR2

Errors a user can fix (missing file, wrong architecture, offline Hub) print
one line and exit with status 1.
"""

import json
import sys

from absl import app
from absl import flags
from absl import logging

from vit_jax_ft.pretrained import architecture
from vit_jax_ft.pretrained import conversion
from vit_jax_ft.pretrained import hf_export
from vit_jax_ft.pretrained import sources
from vit_jax_ft.pretrained import storage

_COMMANDS = ("convert", "inspect", "export")

_SOURCE = flags.DEFINE_string("source", None, "Checkpoint file, folder or Hugging Face Hub id.")
_MODEL = flags.DEFINE_string("model", None, "Expected architecture, e.g. vit_b16 or resnet50; "
                             "the conversion fails if the checkpoint is another one.")
_OUT = flags.DEFINE_string("out", None, "Output directory (must not exist unless --overwrite).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace --out if it exists.")
_STRICT = flags.DEFINE_bool("strict", True, "Refuse checkpoints with tensors our model cannot use.")
_NORMALIZATION = flags.DEFINE_enum(
    "normalization", None, list(conversion.NORMALIZATIONS),
    "Override the input normalisation recorded in the metadata (for bare state dicts).")
_WORKDIR = flags.DEFINE_string("workdir", None, "export: the training workdir.")
_FORMAT = flags.DEFINE_enum("format", "huggingface", ["huggingface"], "export: output format.")
_STEP = flags.DEFINE_integer("step", None, "export: checkpoint step (default: the latest).")


def _require(flag: flags.FlagHolder, command: str) -> str:
  if not flag.value:
    raise app.UsageError(f"{command} needs --{flag.name}")
  return flag.value


def _convert() -> None:
  source, out = _require(_SOURCE, "convert"), _require(_OUT, "convert")
  converted = sources.convert(source, strict=_STRICT.value, normalization=_NORMALIZATION.value,
                              model_name=_MODEL.value)
  storage.save(converted, out, overwrite=_OVERWRITE.value)
  print(json.dumps(converted.metadata, indent=2))
  print(f"Converted {source} -> {out}")


def _inspect() -> None:
  source = _require(_SOURCE, "inspect")
  if storage.is_converted(source):
    metadata = storage.load_metadata(source)
  else:
    metadata = sources.convert(source, strict=False).metadata
  arch = metadata.get("architecture") or {}
  # One line for people (stderr), the metadata as JSON for programs (stdout).
  print(f"{source}: {sources.origin_of(metadata)}, "
        f"{architecture.describe(arch) if arch else 'unknown architecture'}", file=sys.stderr)
  print(json.dumps(metadata, indent=2))


def _export() -> None:
  workdir, out = _require(_WORKDIR, "export"), _require(_OUT, "export")
  hf_export.export_huggingface(workdir, out, step=_STEP.value)
  print(f"Exported {workdir} -> {out} ({_FORMAT.value})")


def main(argv):
  if len(argv) != 2 or argv[1] not in _COMMANDS:
    raise app.UsageError(f"usage: python -m vit_jax_ft.pretrained {{{'|'.join(_COMMANDS)}}} "
                         "--flags (see --help)")
  logging.set_verbosity(logging.WARNING)
  try:
    {"convert": _convert, "inspect": _inspect, "export": _export}[argv[1]]()
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    # ConversionError, CheckpointFileError, SourceUnavailableError, ExportError
    # are ValueErrors: things the user fixes, so no traceback.
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
