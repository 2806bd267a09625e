"""Reading Hugging Face datasets into `sources.Record`s, for `prepare`.

--source is a Hugging Face dataset when it is
  * `hf:OWNER/NAME`: downloaded with the `datasets` library (--hf_config,
    --hf_split, --hf_revision); offline this fails within seconds, naming the
    command that fetches a copy on a connected machine;
  * a `save_to_disk` folder: `dataset_dict.json` (a DatasetDict) or
    `state.json` + `dataset_info.json` (one Dataset);
  * a folder holding .parquet files and no image files (the Hub's layout,
    `data/train-00000-of-00001.parquet`: the split is the file name's first
    word, or the parent folder's name, `train/0000.parquet`);
  * a single .parquet or .arrow file.
Any other folder is an image folder, read as before.

The image column is a `datasets.Image` feature (bytes, or a path) or raw
bytes; the label column a `ClassLabel` (its names are the class list, in
order), strings, ints, or lists of these (multi-label). The dataset's splits
are kept (train/validation/test, named as `sources.SPLIT_ALIASES` maps them).
Every image cell is written to a file in a scratch folder, so the checks,
the bad-file policy, duplicates, splits and shards treat it exactly like an
image file; an example's id is `<split>/<row>` (e.g. `train/17`, the row of
`dataset['train']`), or the value of --id_column.
"""

import dataclasses
import os
import re
import socket
from typing import Any, Callable, Iterator, Optional, Sequence
import urllib.parse

from absl import logging

from vit_jax_ft.data import images
from vit_jax_ft.data import sources

HUB_PREFIX = "hf:"
_BATCH_ROWS = 256  # Rows read at a time: bounds the image bytes held in memory.
_PROBE_SECONDS = 3.0


@dataclasses.dataclass(frozen=True)
class HfOptions:
  """What to read from a Hugging Face dataset; field names are the flag names."""
  hf_config: Optional[str] = None    # The dataset's configuration (subset) name.
  hf_split: Optional[str] = None     # 'train,test': the dataset's splits to read (None: all).
  hf_revision: Optional[str] = None  # Branch, tag or commit (hf: sources only).
  image_column: Optional[str] = None  # None: auto-detected.


@dataclasses.dataclass(frozen=True)
class _Part:
  """One split of the dataset, readable in batches."""
  name: str                  # The dataset's split name ('validation') or the file's name.
  given: Optional[str]       # The dataset's split name; None: prepare carves the splits.
  features: Any              # datasets.Features of its columns.
  read: Callable[[list[str]], Iterator[Any]]  # Columns -> pyarrow batches, in row order.
  split: Optional[str] = None  # `given` as 'train', 'val' or 'test' (set by `_select`).


@dataclasses.dataclass(frozen=True)
class _LabelColumn:
  name: str
  class_names: Optional[tuple[str, ...]]  # A ClassLabel's names, in order.
  is_list: bool                           # List cells: multi-label.
  is_int: bool                            # Plain integers: classes sorted as numbers.


def import_datasets():
  """The `datasets` module, or a one-line error saying how to install it."""
  try:
    import datasets  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ValueError("reading Hugging Face datasets needs the `datasets` package: "
                     "pip install datasets") from e
  return datasets


def is_hub_id(source: str) -> bool:
  return source.startswith(HUB_PREFIX)


def _is_system_dir(name: str) -> bool:
  return name.startswith(".") or name == "__MACOSX"


def parquet_files(folder: str) -> list[str]:
  """The .parquet files under `folder`, sorted; none if it holds any image file."""
  found = []
  for dirpath, dirnames, filenames in os.walk(folder):
    dirnames[:] = sorted(d for d in dirnames if not _is_system_dir(d))
    for name in sorted(filenames):
      if images.is_image_name(name):
        return []  # An image folder (checked as it is walked: it stops at the first image).
      if name.lower().endswith(".parquet"):
        found.append(os.path.join(dirpath, name))
  return found


def local_layout(path: str) -> Optional[str]:
  """How a local Hugging Face copy is laid out, or None if `path` is not one."""
  if os.path.isfile(path):
    return {".parquet": "parquet file", ".arrow": "arrow file"}.get(
        os.path.splitext(path)[1].lower())
  if not os.path.isdir(path):
    return None
  if os.path.isfile(os.path.join(path, "dataset_dict.json")):
    return "save_to_disk DatasetDict"
  if all(os.path.isfile(os.path.join(path, f)) for f in ("state.json", "dataset_info.json")):
    return "save_to_disk Dataset"
  return "parquet folder" if parquet_files(path) else None


def is_hf_source(source: str) -> bool:
  """Whether `read` reads --source (a hub id or a local copy), not the folder/table readers."""
  return is_hub_id(source) or local_layout(source) is not None


def dataset_name(source: str) -> str:
  """'skin_cancer' for hf:marmal88/skin_cancer."""
  return source[len(HUB_PREFIX):].rstrip("/").split("/")[-1]


# --- fetching from the Hub ----------------------------------------------------

def _offline() -> bool:
  if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
    return True
  try:
    from huggingface_hub import constants  # pylint: disable=g-import-not-at-top
    return bool(constants.HF_HUB_OFFLINE)
  except ImportError:
    return False


def download_help(repo: str, opts: HfOptions) -> str:
  """What to run on a connected machine instead, and how to point --source at the copy."""
  args = [repr(repo)] + ([repr(opts.hf_config)] if opts.hf_config else [])
  args += [f"revision={opts.hf_revision!r}"] if opts.hf_revision else []
  local = repo.split("/")[-1]
  return (f"On a machine with internet access run `python -c \"import datasets; "
          f"datasets.load_dataset({', '.join(args)}).save_to_disk('{local}')\"` (or `hf "
          f"download {repo} --repo-type=dataset --local-dir={local}` for its parquet files), "
          f"copy the folder here and pass --source=/path/to/{local}.")


def _probe_hub(source: str, help_text: str) -> None:
  """Fails within seconds when the Hub cannot be reached (the libraries retry for minutes)."""
  if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
    return  # Only the proxy knows; let `datasets` try.
  endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
  parsed = urllib.parse.urlparse(endpoint)
  port = parsed.port or (443 if parsed.scheme == "https" else 80)
  try:
    socket.create_connection((parsed.hostname, port), timeout=_PROBE_SECONDS).close()
  except OSError as e:
    raise ValueError(f"--source={source}: cannot reach the Hugging Face Hub at {endpoint} "
                     f"({type(e).__name__}: {e}). {help_text}") from e


def _one_line(error: Exception) -> str:
  return " ".join(f"{type(error).__name__}: {error}".split())


def load_hub(source: str, opts: HfOptions):
  """Downloads (or takes from the local cache) `hf:OWNER/NAME`; returns {split name: Dataset}."""
  repo = source[len(HUB_PREFIX):].strip("/")
  if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", repo):
    raise ValueError(f"--source={source}: expected hf:OWNER/NAME.")
  datasets = import_datasets()
  help_text = download_help(repo, opts)
  if _offline() and not datasets.config.HF_HUB_OFFLINE:
    # Set after `datasets` was imported: it would not know, and would try the network.
    raise ValueError(f"--source={source}: HF_HUB_OFFLINE is set. {help_text}")
  if not _offline():
    _probe_hub(source, help_text)
  names = _split_names(opts)
  try:
    loaded = datasets.load_dataset(repo, opts.hf_config, split=names, revision=opts.hf_revision)
  except Exception as e:  # pylint: disable=broad-except
    where = "not in the local cache and HF_HUB_OFFLINE is set" if _offline() else (
        "could not download it")
    raise ValueError(f"--source={source}: {where} ({_one_line(e)[:300]}). {help_text}") from e
  return dict(zip(names, loaded)) if names else dict(loaded)


# --- local copies --------------------------------------------------------------

def _split_names(opts: HfOptions) -> Optional[list[str]]:
  if not opts.hf_split:
    return None
  return [s.strip() for s in opts.hf_split.split(",") if s.strip()]


def _repo_split(name: Optional[str], where: str, available: Sequence[str]) -> Optional[str]:
  """The repo's split for the dataset's split `name` ('validation' -> 'val')."""
  if name is None:
    return None
  if name.strip().lower() not in sources.SPLIT_ALIASES:
    raise ValueError(f"{where}: split {name!r} is not train, validation or test; choose the "
                     f"splits to read with --hf_split (it has {list(available)}).")
  return sources.normalize_split(name, where)


def _dataset_part(name: str, dataset, given: Optional[str]) -> _Part:
  def read(columns):
    return dataset.select_columns(columns).with_format("arrow").iter(batch_size=_BATCH_ROWS)
  return _Part(name=name, given=given, features=dataset.features, read=read)


def _dataset_parts(found: dict) -> list[_Part]:
  return [_dataset_part(name, ds, name) for name, ds in found.items()]


def _file_split(path: str, folder: bool = True) -> Optional[str]:
  """'train' for 'train-00000-of-00001.parquet', 'train.parquet' or (`folder`) 'train/0.parquet'."""
  first = re.match(r"([A-Za-z]+)(-|\.parquet$)", os.path.basename(path), re.IGNORECASE)
  names = ([first[1]] if first else []) + ([os.path.basename(os.path.dirname(path))]
                                           if folder else [])
  return next((n for n in names if n.lower() in sources.SPLIT_ALIASES), None)


def _parquet_file(path: str):
  """`pyarrow.parquet.ParquetFile(path)`, or a one-line error naming the file."""
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  try:
    return pq.ParquetFile(path)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"{path}: cannot read it as a parquet file ({_one_line(e)[:300]}).") from e


def _parquet_part(name: str, files: list[str], given: Optional[str], where: str) -> _Part:
  datasets = import_datasets()
  features = datasets.Features.from_arrow_schema(_parquet_file(files[0]).schema_arrow)
  for path in files[1:]:
    other = datasets.Features.from_arrow_schema(_parquet_file(path).schema_arrow)
    if other != features:
      raise ValueError(f"{path}: its columns {dict(other)} differ from those of {files[0]} "
                       f"({dict(features)}), in the same split {name!r} of {where}.")

  def read(columns):
    for path in files:
      yield from _parquet_file(path).iter_batches(batch_size=_BATCH_ROWS, columns=columns)
  return _Part(name=name, given=given, features=features, read=read)


def _parquet_parts(root: str, opts: HfOptions) -> list[_Part]:
  """The parquet files under `root` grouped by split (from their names)."""
  files = parquet_files(root)
  if opts.hf_config:
    files = [f for f in files if opts.hf_config in os.path.relpath(f, root).split(os.sep)[:-1]]
    if not files:
      raise ValueError(f"{root}: no .parquet files under a folder named {opts.hf_config!r} "
                       "(--hf_config).")
  by_split = {}
  for path in files:
    by_split.setdefault(_file_split(path), []).append(path)
  if None in by_split and len(by_split) > 1:
    raise ValueError(f"{by_split[None][0]}: no split in its name (train-*, validation-*, "
                     f"test-*), unlike the other .parquet files of {root}.")
  parts = []
  for name, group in by_split.items():
    folders = sorted({os.path.dirname(os.path.relpath(f, root)) for f in group})
    if len(folders) > 1 and not opts.hf_config:
      raise ValueError(f"{root}: the .parquet files of split {name or 'all'!r} are in several "
                       f"folders {folders} (several configurations?); pick one with "
                       "--hf_config.")
    parts.append(_parquet_part(name or os.path.basename(os.path.abspath(root)), group, name,
                               root))
  return parts


def _local_parts(path: str, layout: str, opts: HfOptions) -> list[_Part]:
  if layout == "parquet folder":
    return _parquet_parts(path, opts)
  if layout == "parquet file":
    name = _file_split(path, folder=False)
    stem = os.path.splitext(os.path.basename(path))[0]
    return [_parquet_part(name or stem, [path], name, path)]
  datasets = import_datasets()
  try:
    loaded = (datasets.Dataset.from_file(path) if layout == "arrow file"
              else datasets.load_from_disk(path))
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"{path}: cannot read it as a {layout} ({_one_line(e)[:300]}).") from e
  if isinstance(loaded, datasets.DatasetDict):
    return _dataset_parts(dict(loaded))
  name = str(loaded.split) if loaded.split else None
  stem = os.path.splitext(os.path.basename(os.path.abspath(path)))[0]
  return [_dataset_part(name or stem, loaded, name)]


def _select(parts: list[_Part], opts: HfOptions, where: str) -> list[_Part]:
  """The parts --hf_split names (all without it), with their splits; one part per split."""
  names = _split_names(opts)
  available = [p.name for p in parts]
  if names:
    unknown = [n for n in names if n not in available]
    if unknown:
      raise ValueError(f"{where}: no split {unknown[0]!r} (--hf_split); it has {available}.")
    parts = [p for p in parts if p.name in names]
  parts = [dataclasses.replace(p, split=_repo_split(p.given, where, available)) for p in parts]
  seen = {}
  for part in parts:
    if part.split and part.split in seen:
      raise ValueError(f"{where}: splits {seen[part.split]!r} and {part.name!r} are both "
                       f"split {part.split!r}; keep one with --hf_split.")
    seen[part.split] = part.name
  return parts


# --- columns -------------------------------------------------------------------

def _list_inner(feature):
  """The element feature of a list feature, else None."""
  if isinstance(feature, list):
    return feature[0]
  datasets = import_datasets()
  if isinstance(feature, (datasets.List, datasets.LargeList, datasets.Sequence)):
    return feature.feature
  return None


def _is_image(feature, named: bool) -> bool:
  """An Image feature, raw bytes, an {bytes, path} struct; with --image_column also paths."""
  datasets = import_datasets()
  if isinstance(feature, datasets.Image):
    return True
  if isinstance(feature, dict):
    return {"bytes", "path"} <= set(feature)
  dtype = getattr(feature, "dtype", "")
  return dtype in ("binary", "large_binary") or (named and dtype in ("string", "large_string"))


def _image_column(features, given: Optional[str], where: str) -> str:
  columns = list(features)
  if given:
    sources.pick_column(columns, given, (), "image", where, required=True)
    if not _is_image(features[given], named=True):
      raise ValueError(f"{where}: column {given!r} holds {features[given]}, not images "
                       "(expected a datasets.Image feature, bytes or file paths).")
    return given
  datasets = import_datasets()
  found = [c for c, f in features.items() if isinstance(f, datasets.Image)]
  found = found or [c for c, f in features.items() if _is_image(f, named=False)]
  if len(found) != 1:
    what = f"several columns hold images {found}" if found else "no column holds images"
    raise ValueError(f"{where}: {what} (columns {columns}); name one with --image_column.")
  return found[0]


def _label_column(features, given: Optional[str], where: str) -> _LabelColumn:
  datasets = import_datasets()
  columns = list(features)
  name = given
  if not name:
    class_labels = [c for c, f in features.items()
                    if isinstance(_list_inner(f) or f, datasets.ClassLabel)]
    if len(class_labels) > 1:
      raise ValueError(f"{where}: several ClassLabel columns {class_labels} (columns "
                       f"{columns}); name one with --label_column.")
    name = class_labels[0] if class_labels else None
  name = name or sources.pick_column(columns, None, sources.LABEL_COLUMNS, "label", where,
                                     required=True)
  sources.pick_column(columns, name, (), "label", where, required=True)
  inner = _list_inner(features[name])
  feature = features[name] if inner is None else inner
  class_names = (tuple(feature.names) if isinstance(feature, datasets.ClassLabel) else None)
  is_int = class_names is None and str(getattr(feature, "dtype", "")).startswith(("int", "uint"))
  return _LabelColumn(name=name, class_names=class_names, is_list=inner is not None,
                      is_int=is_int)


@dataclasses.dataclass(frozen=True)
class _Columns:
  image: str
  label: _LabelColumn
  group: Optional[str]
  id: Optional[str]

  def names(self) -> list[str]:
    return list(dict.fromkeys(c for c in (self.image, self.label.name, self.group, self.id) if c))


def _columns(features, given: sources.TableColumns, opts: HfOptions, where: str) -> _Columns:
  for flag, value in (("path", given.path), ("split", given.split)):
    if value:
      raise ValueError(f"--{flag}_column does not apply to a Hugging Face dataset ({where}); "
                       "its images are in --image_column and its splits are its own.")
  columns = list(features)
  return _Columns(
      image=_image_column(features, opts.image_column, where),
      label=_label_column(features, given.label, where),
      group=sources.pick_column(columns, given.group, sources.GROUP_COLUMNS, "group", where,
                                required=False),
      id=sources.pick_column(columns, given.id or "", (), "id", where, required=False))


# --- rows ----------------------------------------------------------------------

def _labels(value, column: _LabelColumn, table: sources.TableOptions,
            where: str) -> tuple[str, ...]:
  """Class names of one label cell."""
  if value is None:
    raise ValueError(f"{where}: no label in column {column.name!r}.")
  if isinstance(value, (list, tuple)):
    values = list(value)
  elif table.multilabel and isinstance(value, str):
    values = value.split(table.label_sep)
  else:
    values = [value]
  names = []
  for v in values:
    if column.class_names is None:
      names.append(str(v).strip())
    elif isinstance(v, int) and 0 <= v < len(column.class_names):
      names.append(column.class_names[v])
    else:
      hint = " (-1: unlabelled; leave that split out with --hf_split)" if v == -1 else ""
      raise ValueError(f"{where}: label {v!r} in column {column.name!r} is outside its "
                       f"ClassLabel's {len(column.class_names)} names "
                       f"{list(column.class_names[:12])}{hint}.")
  labels = tuple(dict.fromkeys(n for n in names if n))
  if not (table.multilabel or column.is_list) and len(labels) != 1:
    raise ValueError(f"{where}: expected one label in column {column.name!r}, got {value!r} "
                     "(multi-label data: --multilabel).")
  return labels


@dataclasses.dataclass(frozen=True)
class _Place:
  """Where an image cell's file goes or is found."""
  scratch: str                # Folder for the cell's bytes.
  base_dir: Optional[str]     # Relative paths in cells are under this folder.
  allow_outside: bool         # Let cells name files outside `base_dir`.


def _image_file(cell, where: str, name: str, place: _Place) -> tuple[Optional[str], str]:
  """(path of the cell's image file, or None, and why not)."""
  data, ref = (cell.get("bytes"), cell.get("path")) if isinstance(cell, dict) else (
      (None, cell) if isinstance(cell, str) else (cell, None))
  if data is not None:
    path = os.path.join(place.scratch, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
      f.write(data)
    return path, ""
  if not ref:
    return None, f"no image in this cell ({where})"
  path = ref if place.base_dir is None else os.path.normpath(os.path.join(place.base_dir, ref))
  if place.base_dir is not None and not place.allow_outside:
    sources.check_inside(path, place.base_dir, where)
  if not os.path.isfile(path):
    return None, f"missing: {where} names {ref!r}, which is not found"
  return path, ""


def _part_records(index: int, part: _Part, cols: _Columns, table: sources.TableOptions,
                  place: _Place) -> tuple[list[sources.Record], list[dict]]:
  records, skipped, row = [], [], 0
  for batch in part.read(cols.names()):
    cells = {c: batch.column(c).to_pylist() for c in cols.names()}
    for k in range(batch.num_rows):
      where = f"{part.name} row {row}"
      key = str(cells[cols.id][k]) if cols.id else f"{part.name}/{row}"
      path, reason = _image_file(cells[cols.image][k], where,
                                 os.path.join(str(index), f"{row // 1000:05d}", str(row)), place)
      group = cells[cols.group][k] if cols.group else None
      record = sources.Record(
          path=path or "", labels=_labels(cells[cols.label.name][k], cols.label, table, where),
          example_id=key, origin=where, split=part.split,
          group=str(group) if group not in (None, "") else None)
      if path:
        records.append(record)
      else:
        skipped.append(dict(file=key, reason=reason, kind="missing"))
      row += 1
  return records, skipped


def _class_names(records: list[sources.Record], label: _LabelColumn) -> list[str]:
  if label.class_names is not None:
    return list(label.class_names)
  seen = {l for r in records for l in r.labels}
  return sorted(seen, key=int) if label.is_int else sorted(seen)


def _check_ids(records: list[sources.Record], column: str) -> None:
  first = {}
  for r in records:
    if r.example_id in first:
      raise ValueError(f"{r.origin}: id {r.example_id!r} (--id_column={column}) is also at "
                       f"{first[r.example_id]}; ids must be unique.")
    first[r.example_id] = r.origin


def read(source: str, opts: HfOptions, table: sources.TableOptions,
         scratch: str) -> sources.Source:
  """Reads a Hugging Face dataset (hub id or local copy), its image cells as files in `scratch`."""
  hub = is_hub_id(source)
  layout = "hub" if hub else local_layout(source)
  if opts.hf_revision and not hub:
    raise ValueError(f"--hf_revision applies to hf: sources only, not to {source!r}.")
  parts = _dataset_parts(load_hub(source, opts)) if hub else _local_parts(source, layout, opts)
  parts = _select(parts, opts, source)
  if not parts:
    raise ValueError(f"{source}: the dataset has no splits.")
  cols = _columns(parts[0].features, table.columns, opts, f"{source} split {parts[0].name!r}")
  records, skipped = [], []
  base = None if hub else table.image_dir or (
      source if os.path.isdir(source) else os.path.dirname(os.path.abspath(source)))
  place = _Place(scratch=scratch, base_dir=base, allow_outside=table.allow_outside_image_dir)
  for index, part in enumerate(parts):
    part_cols = _columns(part.features, table.columns, opts, f"{source} split {part.name!r}")
    if part_cols != cols:
      raise ValueError(f"{source}: split {part.name!r} has columns {part_cols} unlike split "
                       f"{parts[0].name!r} ({cols}).")
    found, missing = _part_records(index, part, cols, table, place)
    logging.info("Read split %r of %s: %d rows.", part.name, source, len(found) + len(missing))
    records += found
    skipped += missing
  if not records:
    raise ValueError(f"{source}: no usable image cells in column {cols.image!r}, e.g. "
                     f"{skipped[0]['file']}: {skipped[0]['reason']}" if skipped else
                     f"{source}: the dataset has no rows.")
  if cols.id:
    _check_ids(records, cols.id)
  info = dict(kind="huggingface", layout=layout,
              path=source if hub else os.path.abspath(source),
              columns=dict(image=cols.image, label=cols.label.name, group=cols.group, id=cols.id),
              hf_splits={p.name: p.split for p in parts})
  if hub:
    info.update(config=opts.hf_config, revision=opts.hf_revision)
  multilabel = table.multilabel or cols.label.is_list
  return sources.Source(records=records, class_names=_class_names(records, cols.label),
                        skipped=skipped, info=info, multilabel=multilabel)
