"""Writing and describing prepared datasets: sharded TFRecords + dataset_info.json.

A prepared dataset folder holds, per split, shards named
`{split}-{i:05d}-of-{n:05d}.tfrecord` and one `dataset_info.json`. Every
record has three features:
  image: the encoded image bytes (PNG or JPEG),
  label: int64 list of class indices (one for single-label data),
  id:    the example's name (file name or id), for reports and leak checks:
         the file name's bytes as they are (`os.fsencode`), UTF-8 unless the
         file system holds names in another encoding.
Shards and the info file are written under a temporary name and renamed when
complete, so an interrupted run never leaves a dataset that looks whole.

Each split's info entry also records its shards' byte sizes (`file_bytes`)
and sha256 (`file_sha256`), so a shard cut short or changed after preparation
is named before training reads it (`check_shards`, `verify_shards`). Infos
written before these fields existed still load; their shards go unchecked.
"""

import hashlib
import json
import os
import re
from typing import Iterable, Optional, Sequence

from absl import logging

import numpy as np
import tensorflow as tf

from vit_jax_ft.data import sources

INFO_FILE = "dataset_info.json"
_GENERIC_REBUILD = "python -m vit_jax_ft.data.prepare ... --overwrite"


class DamagedShardError(ValueError):
  """A TFRecord shard is not what `dataset_info.json` records, or cannot be read."""


def _example(image: bytes, labels: Sequence[int], example_id: str) -> bytes:
  feature = {
      "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image])),
      "label": tf.train.Feature(int64_list=tf.train.Int64List(value=list(labels))),
      # fsencode: a file name that is not UTF-8 keeps its bytes (str.encode would fail).
      "id": tf.train.Feature(bytes_list=tf.train.BytesList(value=[os.fsencode(example_id)])),
  }
  return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def write_split(out_dir: str, split: str, examples: Iterable[tuple[bytes, Sequence[int], str]],
                num_shards: int) -> list[str]:
  """Writes `(image_bytes, labels, id)` examples round-robin into shards.

  Returns the shard file names (relative to `out_dir`).
  """
  os.makedirs(out_dir, exist_ok=True)
  names = [f"{split}-{i:05d}-of-{num_shards:05d}.tfrecord" for i in range(num_shards)]
  tmp_paths = [os.path.join(out_dir, name + ".tmp") for name in names]
  writers = [tf.io.TFRecordWriter(p) for p in tmp_paths]
  try:
    for i, (image, labels, example_id) in enumerate(examples):
      writers[i % num_shards].write(_example(image, labels, example_id))
  except BaseException:
    _close_and_remove(writers, tmp_paths)
    raise
  for w in writers:
    w.close()
  for tmp, name in zip(tmp_paths, names):
    os.replace(tmp, os.path.join(out_dir, name))
  return names


def file_checks(out_dir: str, names: Sequence[str]) -> dict:
  """{'file_bytes': {name: size}, 'file_sha256': {name: hex}} of the files `names` in `out_dir`."""
  sizes, hashes = {}, {}
  for name in names:
    path = os.path.join(out_dir, name)
    sizes[name] = os.path.getsize(path)
    hashes[name] = _sha256(path)
  return dict(file_bytes=sizes, file_sha256=hashes)


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def rebuild_hint(data_dir: str, info: dict) -> str:
  """How to rebuild the dataset in `data_dir`: the prepare command it records, if any."""
  if info.get("command"):
    return f"rebuild it with: {info['command']}"
  if info.get("source") == "sklearn.datasets.load_digits":  # The demo data (data/digits.py).
    return f"delete {data_dir} and run again: the demo data is rebuilt"
  return f"rebuild it with: {_GENERIC_REBUILD}"


def check_shards(data_dir: str, info: dict, splits: Iterable[str], checksums: bool = False,
                 quiet: bool = False) -> None:
  """Raises DamagedShardError for a shard of `splits` that differs from what the info records.

  Sizes are always compared (one os.stat per shard); `checksums` also reads
  every shard and compares its sha256 (for an explicit verification). Splits
  with no recorded sizes (older infos, TFDS shards) are skipped, with a note
  unless `quiet`.
  """
  for split in dict.fromkeys(splits):
    entry = info["splits"].get(split) or {}
    recorded = entry.get("file_bytes")
    if not recorded:
      if entry.get("files") and not quiet:
        logging.info("%s/%s records no shard sizes for split %r (prepared by an older version); "
                     "its shards are not checked before reading.", data_dir, INFO_FILE, split)
      continue
    for name in entry["files"]:
      _check_shard(data_dir, info, name, recorded.get(name),
                   entry.get("file_sha256", {}).get(name) if checksums else None)


def _check_shard(data_dir: str, info: dict, name: str, size: Optional[int],
                 sha256: Optional[str]) -> None:
  path = os.path.join(data_dir, name)
  if not os.path.exists(path):  # Named where the split is read (inputs/pipeline.py).
    return
  found = os.path.getsize(path)
  if size is not None and found != size:
    raise DamagedShardError(
        f"Shard {path} is damaged: {INFO_FILE} records {size} bytes, the file has {found} "
        f"(cut short or changed since it was prepared); {rebuild_hint(data_dir, info)}")
  if sha256 is not None and _sha256(path) != sha256:
    raise DamagedShardError(
        f"Shard {path} is damaged: its sha256 differs from the {sha256} {INFO_FILE} records "
        f"(changed since it was prepared); {rebuild_hint(data_dir, info)}")


def verify_shards(data_dir: str, info: dict, splits: Optional[Iterable[str]] = None) -> None:
  """Checks sizes and sha256 of every shard of `splits` (default: all); reads every byte."""
  check_shards(data_dir, info, info["splits"] if splits is None else splits, checksums=True)


def _close_and_remove(writers, paths: Sequence[str]) -> None:
  """Closes the writers and deletes their files (a failed split leaves nothing)."""
  for w, path in zip(writers, paths):
    w.close()
    if os.path.exists(path):
      os.remove(path)


def readable(value):
  """`value` (nested dicts, lists, strings) with every string made valid text.

  See `sources.readable_name`: file names that are not UTF-8 would make the
  JSON invalid UTF-8 (or, escaped as surrogates, unreadable).
  """
  if isinstance(value, str):
    return sources.readable_name(value)
  if isinstance(value, dict):
    return {readable(k): readable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [readable(v) for v in value]
  return value


def write_info(out_dir: str, info: dict) -> dict:
  """Atomically writes `dataset_info.json`; returns what it wrote (`readable(info)`).

  Written last, the file marks completion.
  """
  info = readable(info)
  path = os.path.join(out_dir, INFO_FILE)
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(info, f, indent=2)
  os.replace(path + ".tmp", path)
  return info


def publish(staging_dir: str, out_dir: str) -> list[str]:
  """Moves every file of `staging_dir` into `out_dir`, `dataset_info.json` last.

  Returns the names moved. Renames within one file system: each file appears
  whole, and until the info file arrives the folder does not pass for a
  dataset.
  """
  names = sorted(os.listdir(staging_dir), key=lambda n: n == INFO_FILE)
  for name in names:
    os.replace(os.path.join(staging_dir, name), os.path.join(out_dir, name))
  return names


def class_counts(labels: Iterable[Sequence[int]], num_classes: int) -> list[int]:
  """Number of examples carrying each class."""
  counts = np.zeros(num_classes, dtype=np.int64)
  for ls in labels:
    for label in ls:
      counts[label] += 1
  return counts.tolist()


def read_info(data_dir: str, help_text: str = "") -> dict:
  """Reads `dataset_info.json`, failing with a message that says what is missing."""
  path = os.path.join(data_dir, INFO_FILE)
  if not os.path.exists(path):
    hint = f" {help_text}" if help_text else ""
    raise FileNotFoundError(
        f"No prepared dataset at {data_dir!r} ({INFO_FILE} not found). Point "
        f"--config.data.dir at a prepared dataset folder (README: 'Your own data').{hint}")
  try:
    with open(path, encoding="utf-8") as f:
      info = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path} is not valid JSON ({e}); it was damaged or edited by hand: "
                     "re-run vit_jax_ft.data.prepare with --overwrite.") from e
  if not isinstance(info, dict):
    raise ValueError(f"{path} holds a {type(info).__name__}, not the dataset's description; "
                     "re-run vit_jax_ft.data.prepare with --overwrite.")
  for key in ("class_names", "multilabel", "splits"):
    if key not in info:
      raise ValueError(f"{path} has no {key!r} entry; re-run the preparation tool.")
  return info


_DATASET_FILE = re.compile(r"^(dataset_info\.json|[\w.]+-\d{5}-of-\d{5}\.tfrecord)(\.tmp)?$")


def dataset_files(out_dir: str) -> list[str]:
  """Names of the files in `out_dir` that belong to a prepared dataset.

  That is `dataset_info.json`, shards and their temporaries (left by an
  interrupted run); other files are not ours and are never listed.
  """
  if not os.path.isdir(out_dir):
    return []
  names = [n for n in os.listdir(out_dir) if _DATASET_FILE.match(n)]
  listed = _listed_files(out_dir)
  if listed is not None:
    # A complete dataset owns the shards its info lists (and temporaries);
    # another shard-like file in the folder is someone else's.
    names = [n for n in names if n == INFO_FILE or n.endswith(".tmp") or n in listed]
  return sorted(names)


def _listed_files(out_dir: str) -> set[str] | None:
  """Shard names `dataset_info.json` lists, or None without a readable one."""
  try:
    with open(os.path.join(out_dir, INFO_FILE)) as f:
      splits = json.load(f)["splits"]
    return {name for entry in splits.values() for name in entry.get("files", [])}
  except (OSError, ValueError, KeyError, TypeError, AttributeError):
    return None


def remove_dataset(out_dir: str) -> list[str]:
  """Deletes the files `dataset_files` lists; returns their names.

  `dataset_info.json` goes first: if this is interrupted, what is left can
  no longer pass for a complete dataset.
  """
  names = dataset_files(out_dir)
  for name in sorted(names, key=lambda n: not n.startswith(INFO_FILE)):
    os.remove(os.path.join(out_dir, name))
  return names
