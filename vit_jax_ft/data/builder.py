"""Building a prepared dataset from a source: the steps behind `prepare`.

1. Read the source (folder tree, label table or Hugging Face dataset, whose
   image cells are written as files into a scratch folder) into records;
   check labels.
2. Check every file on all cores: sha256, full decode, what conversion it needs.
3. Apply --bad_files to unreadable and missing files.
4. Assign splits (given ones kept, val/test carved stratified by label, groups
   and identical contents kept together).
5. Report byte-identical files and apply --duplicates. With --folds=K, pool
   train and val and assign each example to one of K folds (data/folds.py).
6. Write shards per split (fine JPEGs byte-for-byte, the rest converted), the
   class histograms, and `dataset_info.json` last, into a hidden staging
   folder inside --out; on success replace the previous dataset (--overwrite)
   and move the files into --out, the info file last.
Nothing is written to --out itself before the end of step 6, and the staging
folder is removed on every error (Ctrl-C and SIGTERM included), so a run that
fails leaves --out as it was.
"""

import collections
import contextlib
import dataclasses
import functools
import math
import os
import re
import shlex
import shutil
import tempfile
from typing import Iterator, Optional

from absl import logging
import numpy as np

from vit_jax_ft.data import duplicates
from vit_jax_ft.data import folds as folds_lib
from vit_jax_ft.data import hf_source
from vit_jax_ft.data import images
from vit_jax_ft.data import parallel
from vit_jax_ft.data import report
from vit_jax_ft.data import sources
from vit_jax_ft.data import splits as splits_lib
from vit_jax_ft.data import tfrecords

BAD_FILE_POLICIES = ("skip", "fail")
_SHARD_BYTES = 128 * 2**20  # Aim for shards of about this size.


@dataclasses.dataclass(frozen=True)
class Options:
  """Everything `build` needs; the CLI flags map one to one onto these."""
  source: str
  out_dir: str
  table: sources.TableOptions = sources.TableOptions()
  hf: hf_source.HfOptions = hf_source.HfOptions()
  class_names: Optional[str] = None     # 'a,b,c' or a file with one name per line.
  val_fraction: float = 0.1
  test_fraction: Optional[float] = None  # None: 0.1 if the source has no splits, else 0.
  seed: int = 0
  image: images.ImageOptions = images.ImageOptions()
  bad_files: str = "skip"
  duplicates: str = "report"
  num_shards: int = 0                   # 0: about 128 MiB per shard.
  num_workers: int = dataclasses.field(default_factory=parallel.default_workers)
  overwrite: bool = False
  log_every: int = 1000
  folds: int = 0                        # K >= 2: train+val pooled into K cross-validation folds.


@dataclasses.dataclass
class _Item:
  """A record whose file passed the checks."""
  record: sources.Record
  check: images.ImageResult
  labels: list[int]
  split: str = ""
  fold: int = -1  # With --folds: the train/val example's fold.


def _validate(opts: Options) -> None:
  if not 0 < opts.val_fraction < 1:
    raise ValueError(f"--val_fraction must be in (0, 1) (the train loop needs a val split), "
                     f"got {opts.val_fraction}.")
  if opts.test_fraction is not None and not 0 <= opts.test_fraction < 1:
    raise ValueError(f"--test_fraction must be in [0, 1), got {opts.test_fraction}.")
  if opts.bad_files not in BAD_FILE_POLICIES:
    raise ValueError(f"--bad_files must be one of {BAD_FILE_POLICIES}, got {opts.bad_files!r}.")
  if opts.duplicates not in duplicates.POLICIES:
    raise ValueError(f"--duplicates must be one of {duplicates.POLICIES}, got {opts.duplicates!r}.")
  if opts.image.image_format not in ("auto", "jpeg", "png"):
    raise ValueError(f"--image_format must be auto, jpeg or png, got {opts.image.image_format!r}.")
  if opts.image.max_side is not None and opts.image.max_side < 1:
    raise ValueError(f"--max_side must be positive, got {opts.image.max_side}.")
  if opts.image.max_pixels < 1:
    raise ValueError(f"--max_pixels must be positive, got {opts.image.max_pixels}.")
  if opts.folds < 0 or opts.folds == 1:
    raise ValueError(f"--folds must be 0 (no cross-validation) or at least 2, got {opts.folds}.")
  if hf_source.is_hub_id(opts.source):
    return
  if not os.path.exists(opts.source):
    raise FileNotFoundError(f"--source {opts.source!r} does not exist.")
  source, out = os.path.realpath(opts.source), os.path.realpath(opts.out_dir)
  if os.path.isdir(source) and os.path.commonpath([source, out]) == source:
    # The next run would read the output folder as a class of images.
    raise ValueError(f"--out {opts.out_dir!r} is inside the --source folder {opts.source!r}; "
                     "choose a folder outside it.")


def check_out_dir(out_dir: str, overwrite: bool) -> None:
  """Refuses to touch an existing prepared dataset (or an interrupted one) unless `overwrite`."""
  found = tfrecords.dataset_files(out_dir)
  if found and not overwrite:
    what = ("a prepared dataset" if tfrecords.INFO_FILE in found
            else f"the leftovers of an interrupted run ({len(found)} shard files)")
    raise FileExistsError(f"--out {out_dir!r} already holds {what}; pass --overwrite to "
                          "replace it or choose another --out.")


def read_source(opts: Options, scratch: Optional[str] = None) -> sources.Source:
  """Reads --source: a Hugging Face dataset, a folder tree, or a .csv/.json label table.

  A Hugging Face dataset's image cells are written as files into `scratch`.
  """
  if hf_source.is_hf_source(opts.source):
    if scratch is None:
      raise ValueError(f"--source {opts.source!r} is a Hugging Face dataset: it needs a scratch "
                       "folder for its images.")
    return hf_source.read(opts.source, opts.hf, opts.table, scratch)
  if opts.hf != hf_source.HfOptions():
    raise ValueError(f"--hf_config, --hf_split, --hf_revision and --image_column apply to "
                     f"Hugging Face datasets, not to --source {opts.source!r}.")
  if os.path.isdir(opts.source):
    return sources.read_folder(opts.source)
  if opts.source.lower().endswith((".csv", ".json")):
    return sources.read_table(opts.source, opts.table)
  raise ValueError(f"--source {opts.source!r} must be a folder of class folders, a "
                   ".csv/.json label table, a Hugging Face dataset (hf:OWNER/NAME, a "
                   "save_to_disk or parquet folder) or a .parquet/.arrow file.")


def dataset_name(source: str) -> str:
  """The folder's name, or for a label table the name of the folder it is in."""
  if hf_source.is_hub_id(source):
    return hf_source.dataset_name(source)
  path = os.path.abspath(source)
  return os.path.basename(path if os.path.isdir(path) else os.path.dirname(path))


def _class_names(source: sources.Source, spec: Optional[str]) -> list[str]:
  explicit = sources.read_class_names(spec)
  if explicit is None:
    return source.class_names
  sources.check_labels(source.records, explicit)
  return explicit


def _enforce_bad_files(skipped: list[dict], policy: str) -> None:
  """Raises for --bad_files=fail if `skipped` holds missing or unreadable files."""
  bad = [s for s in skipped if s["kind"] in ("missing", "unreadable")]
  if bad and policy == "fail":
    listing = "; ".join(f"{s['file']}: {s['reason']}" for s in bad[:10])
    raise ValueError(f"{len(bad)} files cannot be used (--bad_files=fail): {listing}"
                     f"{' ...' if len(bad) > 10 else ''}")


def check_files(source: sources.Source, class_names: list[str], opts: Options,
                pool) -> tuple[list[_Item], list[dict]]:
  """Checks every file (in parallel); returns the usable items and the skipped files.

  Missing files (listed by a table) and unreadable ones are skipped, or with
  --bad_files=fail raise an error naming them (missing ones before any image
  is opened). Non-image files in class folders are always just listed.
  """
  skipped = list(source.skipped)
  _enforce_bad_files(skipped, opts.bad_files)
  check = functools.partial(images.process_image, options=opts.image, encode=False)
  results = parallel.ordered_map(check, [r.path for r in source.records], pool=pool,
                                 num_workers=opts.num_workers, what="Checking",
                                 log_every=opts.log_every)
  index = {name: i for i, name in enumerate(class_names)}
  items = []
  for record, result in zip(source.records, results):
    if result.error:
      skipped.append(dict(file=record.example_id, reason=result.error, kind="unreadable"))
    else:
      items.append(_Item(record, result, [index[l] for l in record.labels]))
  _enforce_bad_files(skipped, opts.bad_files)
  if not items:
    raise ValueError(f"None of the {len(source.records)} files of {opts.source} is usable, "
                     f"e.g. {skipped[0]['file']}: {skipped[0]['reason']}")
  return items, skipped


def _group_keys(items: list[_Item]) -> list[list[tuple[str, str]]]:
  # Identical contents and source groups (e.g. lesion_id) travel together.
  return [[("sha256", it.check.sha256)] + ([("group", it.record.group)] if it.record.group else [])
          for it in items]


def assign_splits(items: list[_Item], opts: Options) -> None:
  """Sets `item.split`: given splits kept, missing val (and test) carved out of train."""
  given = [it.record.split for it in items]
  test_fraction = opts.test_fraction
  if test_fraction is None:
    test_fraction = 0.1 if all(s is None for s in given) else 0.0
  keys = _group_keys(items)
  planned = splits_lib.plan_splits([it.labels for it in items], given, keys,
                                   val_fraction=opts.val_fraction, test_fraction=test_fraction,
                                   seed=opts.seed)
  for it, split in zip(items, planned):
    it.split = split


def assign_folds(items: list[_Item], opts: Options) -> None:
  """With --folds=K: sets `item.fold` of every train and val item (test stays held out)."""
  pool = [it for it in items if it.split in ("train", "val")]
  try:
    folds = folds_lib.assign_folds([it.labels for it in pool], _group_keys(pool), opts.folds,
                                   opts.seed)
  except ValueError as e:
    raise ValueError(f"{opts.source}: {e}") from e
  for it, fold in zip(pool, folds):
    it.fold = fold


def apply_duplicates(items: list[_Item], class_names: list[str],
                     policy: str) -> tuple[list[_Item], dict]:
  """Finds byte-identical files among `items`; returns the items kept and the report."""
  ids = [it.record.example_id for it in items]
  repeated = [i for i, c in collections.Counter(ids).items() if c > 1]
  if repeated:
    raise ValueError(f"Example ids must be unique; {repeated[:3]} appear more than once.")
  found = duplicates.find_duplicates(
      ids, [it.check.sha256 for it in items],
      [[class_names[l] for l in it.labels] for it in items], [it.split for it in items])
  drops = duplicates.check_policy(found, policy)
  found.update(policy=policy, dropped=[dict(file=f, reason=r) for f, r in sorted(drops.items())])
  logging.info("Duplicates: %s.", duplicates.summary(found))
  kept = [it for it in items if it.record.example_id not in drops]
  for split in ("train", "val"):
    # The train loop needs both; dropping can empty a small one.
    if not any(it.split == split for it in kept):
      raise ValueError(f"No {split!r} examples are left after --duplicates={policy} dropped "
                       f"{len(drops)} files; use --duplicates=report or a larger --val_fraction.")
  return kept, found


def _num_shards(items: list[_Item], requested: int) -> int:
  if requested > 0:
    return min(requested, len(items))
  # Estimated stored bytes: resized images shrink with their pixel count.
  estimate = sum(it.check.num_bytes * min(1.0, math.prod(it.check.stored_size) /
                                          max(1, math.prod(it.check.size))) for it in items)
  return max(1, min(len(items), math.ceil(estimate / _SHARD_BYTES)))


def write_split(split: str, items: list[_Item], opts: Options, pool, folder: str,
                stream: Optional[int] = None) -> dict:
  """Writes one split's shards into `folder` (converting images on all cores).

  Returns the split's info entry. `stream` seeds the record order (default:
  the split's index in SPLITS).
  """
  # A fixed, seeded order mixes the classes: records are read in order within a
  # shard, and a shuffle buffer smaller than the split cannot undo class runs.
  stream = splits_lib.SPLITS.index(split) if stream is None else stream
  order = np.random.default_rng([opts.seed, stream]).permutation(len(items))
  items = [items[i] for i in order]
  encode = functools.partial(images.process_image, options=opts.image, encode=True)
  results = parallel.ordered_map(encode, [it.record.path for it in items], pool=pool,
                                 num_workers=opts.num_workers, what=f"Writing {split}",
                                 log_every=opts.log_every)
  stored_bytes = []

  def examples():
    for it, result in zip(items, results):
      if result.error or result.sha256 != it.check.sha256:
        raise RuntimeError(f"{it.record.path} changed while it was being prepared "
                           f"({result.error or 'different content'}); run again.")
      stored_bytes.append(len(result.data))
      yield result.data, it.labels, it.record.example_id

  files = tfrecords.write_split(folder, split, examples(), _num_shards(items, opts.num_shards))
  return dict(num_examples=len(items), files=files, num_bytes=int(sum(stored_bytes)),
              stored_image_size=report.size_stats([it.check.stored_size for it in items]),
              **tfrecords.file_checks(folder, files))


def _conversions(items: list[_Item]) -> dict:
  counts = collections.Counter(c for it in items for c in it.check.conversions)
  counts["stored as is"] = sum(not it.check.conversions for it in items)
  return dict(sorted(counts.items()))


def _write(items: list[_Item], class_names: list[str], opts: Options, pool,
           folder: str) -> tuple[dict, dict]:
  """Writes all splits and their histograms into `folder`; returns (splits info, histograms)."""
  split_info, histograms = {}, {}
  # With --folds, train and val are written as the folds instead (each example once).
  parts = [(s, [it for it in items if it.split == s], None) for s in splits_lib.SPLITS
           if not (opts.folds and s in ("train", "val"))]
  parts += [(folds_lib.fold_split_name(k), [it for it in items if it.fold == k],
             len(splits_lib.SPLITS) + k) for k in range(opts.folds)]
  for split, members, stream in parts:
    if not members:
      continue
    counts = tfrecords.class_counts([it.labels for it in members], len(class_names))
    split_info[split] = dict(write_split(split, members, opts, pool, folder, stream),
                             class_counts=counts)
    histograms[split] = f"class_histogram_{split}.png"
    report.save_histogram(os.path.join(folder, histograms[split]), class_names, counts,
                          f"{dataset_name(opts.source)}: {split} "
                          f"({len(members)} examples)")
  return split_info, histograms


def _fold_splits(split_info: dict, opts: Options) -> tuple[dict, Optional[dict]]:
  """(the info's splits, its `folds` entry): with --folds, train/val are fold 0's."""
  if not opts.folds:
    return split_info, None
  entries = [split_info.pop(folds_lib.fold_split_name(k)) for k in range(opts.folds)]
  splits = folds_lib.fold_splits(entries, 0) | split_info
  return splits, folds_lib.folds_info(entries, opts.seed, opts.table.columns.group)


def _source_info(source: sources.Source) -> dict:
  given = collections.Counter(r.split for r in source.records if r.split)
  return dict(source.info, num_files=len(source.records), given_splits=dict(sorted(given.items())))


def _options_info(opts: Options) -> dict:
  """The options as JSON, with absolute paths (the run can be repeated from anywhere)."""
  info = dataclasses.asdict(opts)
  info["out_dir"] = os.path.abspath(opts.out_dir)
  if not hf_source.is_hub_id(opts.source):
    info["source"] = os.path.abspath(opts.source)
  if opts.table.image_dir:
    info["table"]["image_dir"] = os.path.abspath(opts.table.image_dir)
  return info


# Options that say nothing about the dataset written, left out of its command line.
_NOT_IN_COMMAND = ("num_workers", "log_every", "overwrite")


def command_line(opts: Options) -> str:
  """The prepare command that rebuilds what `opts` builds (absolute paths, --overwrite).

  Only options that differ from their defaults are spelled out.
  """
  given, defaults = _options_info(opts), dataclasses.asdict(Options(source="", out_dir=""))
  parts = ["python", "-m", "vit_jax_ft.data.prepare"]
  for path, value in _flatten(given):
    if path[-1] in _NOT_IN_COMMAND or value is None or value == _lookup(defaults, path):
      continue
    flag = {"out_dir": "out"}.get(path[-1], path[-1])
    flag = f"{flag}_column" if "columns" in path else flag
    parts.append(f"--{flag}" if value is True else
                 f"--no{flag}" if value is False else f"--{flag}={value}")
  return shlex.join(parts + ["--overwrite"])


def _flatten(tree: dict, prefix: tuple = ()):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _flatten(value, prefix + (key,))
    else:
      yield prefix + (key,), value


def _lookup(tree: dict, path: tuple):
  for key in path:
    tree = tree[key]
  return tree


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Someone else's live process.
    return True
  return True


def remove_stale_staging(out_dir: str) -> list[str]:
  """Removes staging folders of prepare runs that were killed (SIGKILL) mid-write.

  A clean stop removes its own; only a process that is gone leaves one, and
  its pid (in the name) is how a live run on the same --out is told apart.
  """
  removed = []
  for name in sorted(os.listdir(out_dir)):
    match = re.fullmatch(r"\.prepare-(\d+)-.*\.tmp", name)
    if match and not _pid_alive(int(match[1])):
      shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)
      removed.append(name)
  if removed:
    logging.info("Removed %d staging folder(s) of killed prepare runs in %s: %s", len(removed),
                 out_dir, ", ".join(removed))
  return removed


@contextlib.contextmanager
def _staging(out_dir: str) -> Iterator[str]:
  """A hidden temporary folder inside `out_dir` (same file system: moving out is a rename).

  Removed when the block ends, with `out_dir` if this created it and it is
  still empty: whatever goes wrong, --out keeps only what was published.
  """
  created = not os.path.isdir(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  remove_stale_staging(out_dir)
  # The pid in the name tells a later run whether its owner is still alive.
  staging = tempfile.mkdtemp(prefix=f".prepare-{os.getpid()}-", suffix=".tmp", dir=out_dir)
  try:
    yield staging
  finally:
    shutil.rmtree(staging, ignore_errors=True)
    if created and not os.listdir(out_dir):
      os.rmdir(out_dir)


def _publish(staging: str, opts: Options) -> None:
  """Replaces the previous dataset (with --overwrite) by the files in `staging`."""
  if opts.overwrite and tfrecords.remove_dataset(opts.out_dir):
    logging.info("Removed the previous dataset in %s (--overwrite).", opts.out_dir)
  tfrecords.publish(staging, opts.out_dir)


def _info(opts: Options, source: sources.Source, class_names: list[str], items: list[_Item],
          split_info: dict, histograms: dict, found: dict, skipped: list[dict]) -> dict:
  """The contents of dataset_info.json."""
  split_info, folds = _fold_splits(dict(split_info), opts)
  train_counts = split_info["train"]["class_counts"]
  extra = {folds_lib.FOLDS_KEY: folds} if folds else {}
  return dict(
      name=dataset_name(opts.source), class_names=class_names,
      multilabel=source.multilabel, splits=split_info, **extra,
      class_weights=report.class_weights(train_counts),
      imbalance_ratio=report.imbalance_ratio(train_counts),
      image_sizes=dict(original=report.size_stats([it.check.size for it in items]),
                       stored=report.size_stats([it.check.stored_size for it in items])),
      conversions=_conversions(items), source=_source_info(source), options=_options_info(opts),
      duplicates=found, skipped=skipped,
      group_leaks=splits_lib.groups_across_splits(
          [it.record.group for it in items],
          [folds_lib.fold_split_name(it.fold) if it.fold >= 0 else it.split for it in items]),
      histograms=histograms, tool="vit_jax_ft.data.prepare", command=command_line(opts))


def _build(opts: Options, source: sources.Source) -> dict:
  """Steps 2-6 of `build` for the records read from the source."""
  class_names = _class_names(source, opts.class_names)
  logging.info("Source %s: %d files, %d classes%s.", opts.source, len(source.records),
               len(class_names), " (multi-label)" if source.multilabel else "")
  with parallel.worker_pool(min(opts.num_workers, max(1, len(source.records) // 16))) as pool:
    items, skipped = check_files(source, class_names, opts, pool)
    assign_splits(items, opts)
    items, found = apply_duplicates(items, class_names, opts.duplicates)
    skipped += [dict(d, kind="duplicate") for d in found["dropped"]]
    if opts.folds:
      assign_folds(items, opts)
    with _staging(opts.out_dir) as staging:
      split_info, histograms = _write(items, class_names, opts, pool, staging)
      info = tfrecords.write_info(staging, _info(opts, source, class_names, items, split_info,
                                                 histograms, found, skipped))
      _publish(staging, opts)
  return info


def build(opts: Options) -> dict:
  """Prepares `opts.source` into `opts.out_dir`; returns the dataset info written.

  On any error (or KeyboardInterrupt) --out is left as it was: the new files
  go to a staging folder that is only moved into place once complete. The
  image files of a Hugging Face dataset go to another such folder, removed
  at the end.
  """
  _validate(opts)
  check_out_dir(opts.out_dir, opts.overwrite)
  with contextlib.ExitStack() as stack:
    scratch = (stack.enter_context(_staging(opts.out_dir))
               if hf_source.is_hf_source(opts.source) else None)
    info = _build(opts, read_source(opts, scratch))
  report.log_summary(info, opts.out_dir)
  return info
