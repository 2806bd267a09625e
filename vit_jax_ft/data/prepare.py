r"""Prepare image data for training: `python -m vit_jax_ft.data.prepare --source=S --out=D`.

--source is one of
  * a folder of class folders, `<class>/*.jpg`, or with split folders,
    `Train/<class>/*.jpg`, `Test/<class>/*.jpg` (class names may contain spaces);
  * a CSV or JSON label table with a path column (relative to --image_dir,
    default: the table's folder) or an id column (matched to file names under
    --image_dir), a label column (--multilabel: space-separated labels), and
    optionally split and group columns (e.g. HAM10000's lesion_id). Paths
    outside --image_dir are refused unless --allow_outside_image_dir;
  * a Hugging Face dataset: `hf:OWNER/NAME` (downloaded with `datasets`;
    --hf_config, --hf_split, --hf_revision), or a local copy: a save_to_disk
    folder, a folder of .parquet files (and no images), a .parquet or .arrow
    file. Image column: a datasets.Image feature or bytes (--image_column);
    labels: ClassLabel (its order kept), strings, ints or lists (multi-label).
    Its splits are kept; --group_column as for tables; --id_column: the ids.

--out receives sharded TFRecords per split, class histograms and
dataset_info.json (written last: a folder without it is not a dataset). The
tool always writes train and val splits (val carved out of train when the
source has none) and test when the source has one or --test_fraction asks.
With --folds=K, train and val are pooled and written once as K folds
(`fold{k}-*.tfrecord`) for `python -m vit_jax_ft.cv`.
Example:

  python -m vit_jax_ft.data.prepare --source=data/isic_skin_9cls \
      --out=data/isic_prepared --val_fraction=0.05 --max_side=512
  python -m vit_jax_ft.data.prepare --source=hf:marmal88/skin_cancer \
      --label_column=dx --group_column=lesion_id --out=data/skin_cancer --max_side=512
"""

import os

# TensorFlow is only used to write TFRecords here; keep it quiet. Set before
# anything imports it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import signal  # pylint: disable=g-import-not-at-top,g-bad-import-order
import sys  # pylint: disable=g-import-not-at-top,g-bad-import-order

from absl import app
from absl import flags

_SOURCE = flags.DEFINE_string("source", None,
                              "Folder of class folders, a .csv/.json table, hf:OWNER/NAME, or a "
                              "Hugging Face save_to_disk/parquet folder or .parquet/.arrow file.")
_OUT = flags.DEFINE_string("out", None, "Output folder for the prepared dataset.")
_IMAGE_DIR = flags.DEFINE_string("image_dir", None,
                                 "Folder the table's paths/ids refer to (default: its folder).")
_ALLOW_OUTSIDE = flags.DEFINE_bool(
    "allow_outside_image_dir", False,
    "Let the table's paths/ids name files outside --image_dir ('../x.jpg', absolute paths); "
    "without it such a row is an error, so a label table cannot read arbitrary files into "
    "a dataset.")
_PATH_COLUMN = flags.DEFINE_string("path_column", None,
                                   "Table column with file paths (default: auto, e.g. 'file').")
_ID_COLUMN = flags.DEFINE_string("id_column", None,
                                 "Table column with image ids matched to file names "
                                 "(default: auto, e.g. 'image_id'), used without a path column. "
                                 "Hugging Face data: the column whose values are the examples' "
                                 "ids (default: <split>/<row>).")
_LABEL_COLUMN = flags.DEFINE_string("label_column", None, "Table label column (default: auto).")
_SPLIT_COLUMN = flags.DEFINE_string("split_column", None,
                                    "Table column with train/val/test (default: 'split' if "
                                    "present; '' to ignore it).")
_GROUP_COLUMN = flags.DEFINE_string("group_column", None,
                                    "Table column whose values never span two splits, e.g. "
                                    "lesion_id (default: auto; '' for none).")
_HF_CONFIG = flags.DEFINE_string("hf_config", None,
                                 "Hugging Face dataset: its configuration (subset) name.")
_HF_SPLIT = flags.DEFINE_string("hf_split", None,
                                "Hugging Face dataset: its splits to read, e.g. 'train,test' "
                                "(default: all).")
_HF_REVISION = flags.DEFINE_string("hf_revision", None,
                                   "hf:OWNER/NAME: the branch, tag or commit to download.")
_IMAGE_COLUMN = flags.DEFINE_string("image_column", None,
                                    "Hugging Face dataset: the image column (default: the "
                                    "datasets.Image or bytes column).")
_MULTILABEL = flags.DEFINE_bool("multilabel", False, "Labels are separator-separated lists.")
_LABEL_SEP = flags.DEFINE_string("label_sep", None, "Multi-label separator (default: whitespace).")
_CLASS_NAMES = flags.DEFINE_string("class_names", None,
                                   "Explicit class list and order: 'a,b,c' or a file with one "
                                   "name per line. Other labels are an error.")
_VAL_FRACTION = flags.DEFINE_float("val_fraction", 0.1,
                                   "Val share of all examples, or of train when the source "
                                   "has splits but no val.")
_TEST_FRACTION = flags.DEFINE_float("test_fraction", None,
                                    "Test share (default: 0.1 when the source has no splits, "
                                    "else no test is carved).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the split and of the record order.")
_FOLDS = flags.DEFINE_integer(
    "folds", 0, "K >= 2: pool the train and val examples (test stays held out) into K "
    "cross-validation folds, stratified by label (multi-label: the rarest label) and keeping "
    "--group_column groups together; each example is written once. Train every fold with "
    "python -m vit_jax_ft.cv (README: Cross-validation). 0: no folds.")
_MAX_SIDE = flags.DEFINE_integer("max_side", None, "Shrink larger images to this longest side.")
_MAX_PIXELS = flags.DEFINE_integer(
    "max_pixels", None,
    "Decode no image at more pixels than this (default: PIL's decompression-bomb limit, "
    "~89M). Larger JPEGs are decoded at a reduced scale when --max_side allows; other "
    "larger images are bad files (--bad_files).")
_IMAGE_FORMAT = flags.DEFINE_enum("image_format", "auto", ["auto", "jpeg", "png"],
                                  "Format of re-encoded images; auto: JPEG for JPEG sources, "
                                  "PNG for lossless ones.")
_JPEG_QUALITY = flags.DEFINE_integer("jpeg_quality", 95, "Quality of re-encoded JPEGs.")
_BAD_FILES = flags.DEFINE_enum("bad_files", "skip", ["skip", "fail"],
                               "Unreadable or missing files: skip (listed in the report) or fail.")
_DUPLICATES = flags.DEFINE_enum("duplicates", "report", ["report", "drop", "fail"],
                                "Byte-identical files: report, drop (label conflicts: all "
                                "copies; else all but one), or fail.")
_NUM_SHARDS = flags.DEFINE_integer("num_shards", 0, "Shards per split (0: ~128 MiB each).")
_NUM_WORKERS = flags.DEFINE_integer("num_workers", 0, "Processes (0: all cores).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a prepared dataset in --out.")
_LOG_EVERY = flags.DEFINE_integer("log_every", 1000, "Log progress every N files.")
flags.mark_flags_as_required(["source", "out"])


def options_from_flags():
  """The flags as `builder.Options`."""
  # pylint: disable=g-import-not-at-top
  from vit_jax_ft.data import builder
  from vit_jax_ft.data import hf_source
  from vit_jax_ft.data import images
  from vit_jax_ft.data import parallel
  from vit_jax_ft.data import sources
  columns = sources.TableColumns(path=_PATH_COLUMN.value, id=_ID_COLUMN.value,
                                 label=_LABEL_COLUMN.value, split=_SPLIT_COLUMN.value,
                                 group=_GROUP_COLUMN.value)
  return builder.Options(
      source=_SOURCE.value, out_dir=_OUT.value,
      table=sources.TableOptions(image_dir=_IMAGE_DIR.value, columns=columns,
                                 multilabel=_MULTILABEL.value, label_sep=_LABEL_SEP.value,
                                 allow_outside_image_dir=_ALLOW_OUTSIDE.value),
      hf=hf_source.HfOptions(hf_config=_HF_CONFIG.value, hf_split=_HF_SPLIT.value,
                             hf_revision=_HF_REVISION.value, image_column=_IMAGE_COLUMN.value),
      class_names=_CLASS_NAMES.value, val_fraction=_VAL_FRACTION.value,
      test_fraction=_TEST_FRACTION.value, seed=_SEED.value,
      image=images.ImageOptions(max_side=_MAX_SIDE.value, image_format=_IMAGE_FORMAT.value,
                                jpeg_quality=_JPEG_QUALITY.value,
                                max_pixels=_MAX_PIXELS.value or images.DEFAULT_MAX_PIXELS),
      bad_files=_BAD_FILES.value, duplicates=_DUPLICATES.value, num_shards=_NUM_SHARDS.value,
      num_workers=_NUM_WORKERS.value or parallel.default_workers(),
      overwrite=_OVERWRITE.value, log_every=_LOG_EVERY.value, folds=_FOLDS.value)


class Stopped(KeyboardInterrupt):
  """SIGTERM or SIGINT, raised in the main thread.

  A KeyboardInterrupt (not an Exception): it unwinds through `except
  Exception` handlers and every cleanup, as Ctrl-C does.
  """

  def __init__(self, signum: int):
    super().__init__(signum)
    self.signum = signum


def _stop(signum, unused_frame):
  # Later signals are ignored so that they cannot cut the cleanup short; a
  # SIGKILL still works (and the workers die with us).
  for s in (signal.SIGTERM, signal.SIGINT):
    signal.signal(s, signal.SIG_IGN)
  raise Stopped(signum)


def stop_on_signals() -> None:
  """Makes SIGTERM and SIGINT stop `main` cleanly: workers terminated, --out as it was."""
  for s in (signal.SIGTERM, signal.SIGINT):
    signal.signal(s, _stop)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # Imported here, not at the top: worker processes re-import this module, and
  # they need neither TensorFlow nor JAX.
  # pylint: disable=g-import-not-at-top
  from vit_jax_ft.data import builder
  from vit_jax_ft.data import sources
  stop_on_signals()
  try:
    builder.build(options_from_flags())
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    # Bad data and flags are the usual cause: one line that names the file
    # (readably, even if its name is not UTF-8).
    sys.exit(f"error: {sources.readable_name(str(e))}")
  except Stopped as e:
    print(f"error: stopped by {signal.Signals(e.signum).name}; --out holds no partial "
          "dataset.", file=sys.stderr)
    sys.exit(128 + e.signum)  # The shell's convention for "killed by signal N".


if __name__ == "__main__":
  app.run(main)
