"""Readers that turn the shapes user data arrives in into a list of `Record`s.

* `read_folder`: class-per-folder trees (`<class>/*.jpg`), optionally under
  split folders (`Train/<class>/...`, `test/<class>/...`).
* `read_table`: a CSV or JSON table with either a path column (relative to an
  image folder) or an id column matched to file names anywhere under an image
  folder (HAM10000's `image_id`), a label column (multi-label:
  separator-separated), and optional split and group columns.

Readers only list files and labels; they never open images. Files a table
lists that do not exist, and non-image files in class folders, are returned
in `Source.skipped` with the reason, never dropped silently.
"""

import collections
import csv
import dataclasses
import json
import os
from typing import Optional, Sequence

from vit_jax_ft.data import images

# Folder names and split-column values accepted for each split (lower case).
SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val", "dev": "val",
    "test": "test", "testing": "test",
}
# Column names tried, in order, when a column is not named by a flag.
PATH_COLUMNS = ("path", "file", "filename", "file_name", "filepath", "image", "image_path")
ID_COLUMNS = ("image_id", "id", "image_name")
LABEL_COLUMNS = ("label", "labels", "class", "class_name", "category", "dx", "iconclass", "tags")
SPLIT_COLUMNS = ("split", "subset")
GROUP_COLUMNS = ("group", "lesion_id", "patient_id", "subject_id")


@dataclasses.dataclass(frozen=True)
class Record:
  """One example as the source describes it (before its image is opened)."""
  path: str                   # Path of the image file.
  labels: tuple[str, ...]     # Class names; one unless multi-label.
  example_id: str             # Stored as the record's `id`.
  origin: str                 # For messages: 'Train/nevus/x.jpg' or 'labels.csv line 7 (x.jpg)'.
  split: Optional[str] = None  # Split given by the source: 'train', 'val' or 'test'.
  group: Optional[str] = None  # Examples of one group never go to different splits.


@dataclasses.dataclass
class Source:
  """Everything a reader found."""
  records: list[Record]
  class_names: list[str]      # Classes seen (folder names or labels), sorted.
  skipped: list[dict]         # {'file', 'reason', 'kind'}: 'missing' or 'ignored' (not images).
  info: dict                  # Describes the source, for dataset_info.json.
  multilabel: bool = False


def readable_name(name: str) -> str:
  """`name` as valid text: bytes of a file name that are not UTF-8 become '\\xff' escapes.

  Python hands such names over as str with lone surrogates ('\\udcff'), which
  cannot be written as UTF-8 (JSON, messages). `os.fsencode` gets the original
  bytes back; this is only for showing them.
  """
  return os.fsencode(name).decode("utf-8", "backslashreplace")


def normalize_split(name: str, where: str) -> str:
  """Maps 'Train', 'validation', 'TEST', ... to 'train', 'val', 'test'."""
  split = SPLIT_ALIASES.get(name.strip().lower())
  if split is None:
    raise ValueError(f"{where}: unknown split {name!r}; expected one of "
                     f"{sorted(SPLIT_ALIASES)} (any case).")
  return split


def _is_system_dir(name: str) -> bool:
  # '.ipynb_checkpoints', '.git', and the '__MACOSX' folder of zips made on a Mac
  # (full of '._x.jpg' resource files that are not images).
  return name.startswith(".") or name == "__MACOSX"


def _walk_files(folder: str, pruned: Optional[list[str]] = None) -> list[str]:
  """All files under `folder`, sorted, relative to it; system folders go to `pruned`."""
  found = []
  for dirpath, dirnames, filenames in os.walk(folder):
    system = sorted(d for d in dirnames if _is_system_dir(d))
    if pruned is not None:
      pruned.extend(os.path.relpath(os.path.join(dirpath, d), folder) for d in system)
    dirnames[:] = sorted(d for d in dirnames if not _is_system_dir(d))
    found.extend(os.path.relpath(os.path.join(dirpath, f), folder) for f in sorted(filenames))
  return found


def _subdirs(folder: str) -> list[str]:
  return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not _is_system_dir(e.name))


def _class_folder_records(root: str, prefix: str, split: Optional[str],
                          skipped: list[dict]) -> tuple[list[Record], list[str]]:
  """Records of `root/prefix/<class>/**`; files outside class folders go to `skipped`."""
  base = os.path.join(root, prefix)
  classes = _subdirs(base)
  for entry in sorted(os.scandir(base), key=lambda e: e.name):
    if entry.is_file():
      skipped.append(dict(file=os.path.join(prefix, entry.name),
                          reason="not inside a class folder", kind="ignored"))
  records = []
  for name in classes:
    # Class names are labels (text, shown in plots and reports): a folder name
    # that is not UTF-8 becomes its readable form; file paths keep their bytes.
    label = readable_name(name)
    pruned = []
    for rel in _walk_files(os.path.join(base, name), pruned):
      rel_id = os.path.join(prefix, name, rel).replace(os.sep, "/")
      if not images.is_image_name(rel):
        ext = os.path.splitext(rel)[1] or "none"
        skipped.append(dict(file=rel_id, reason=f"not an image file name (extension {ext!r})",
                            kind="ignored"))
        continue
      records.append(Record(path=os.path.join(base, name, rel), labels=(label,),
                            example_id=rel_id, origin=rel_id, split=split))
    skipped.extend(dict(file=os.path.join(prefix, name, d).replace(os.sep, "/") + "/",
                        reason="hidden or system folder, not read", kind="ignored")
                   for d in pruned)
  return records, [readable_name(name) for name in classes]


def read_folder(root: str) -> Source:
  """Reads `root/<class>/*` or `root/<split>/<class>/*` (split folders: Train, test, ...).

  The layout is split folders when every top-level folder is a split name.
  Class names are the folder names as they are (spaces included).
  """
  top = _subdirs(root)
  if not top:
    raise ValueError(f"{root}: no sub-folders; expected <class>/ or <split>/<class>/ folders.")
  skipped, records, classes = [], [], set()
  if all(t.lower() in SPLIT_ALIASES for t in top):
    seen = {}
    for folder in top:
      split = normalize_split(folder, os.path.join(root, folder))
      if split in seen:
        raise ValueError(f"{root}: folders {seen[split]!r} and {folder!r} are both split {split!r}.")
      seen[split] = folder
      found, names = _class_folder_records(root, folder, split, skipped)
      records += found
      classes.update(names)
    layout = "split/class folders"
  else:
    records, names = _class_folder_records(root, "", None, skipped)
    classes.update(names)
    layout = "class folders"
  if not records:
    raise ValueError(f"{root}: no image files found in its class folders ({layout}).")
  return Source(records=records, class_names=sorted(classes), skipped=skipped,
                info=dict(kind="folder", path=os.path.abspath(root), layout=layout))


def load_table(path: str) -> list[tuple[str, dict]]:
  """Rows of a CSV or JSON file as (origin, {column: value}) with stripped strings.

  JSON may be a list of objects, or one object mapping a file name (or id) to
  its label(s), read as columns 'file' and 'label'.
  """
  name = os.path.basename(path)
  if path.lower().endswith(".json"):
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
    if isinstance(data, dict):
      data = [{"file": k, "label": v} for k, v in data.items()]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
      raise ValueError(f"{path}: expected a list of objects or an object {{file: label}}.")
    return [(f"{name} item {i}", {str(k).strip(): _clean(v) for k, v in r.items()})
            for i, r in enumerate(data)]
  with open(path, newline="", encoding="utf-8-sig") as f:
    reader = csv.DictReader(f)
    # Line numbers as a spreadsheet shows them: the header is line 1.
    return [(f"{name} line {i + 2}", {(k or "").strip(): _clean(v) for k, v in row.items()})
            for i, row in enumerate(reader)]


def _clean(value):
  if isinstance(value, list):
    return [str(v).strip() for v in value]
  return "" if value is None else str(value).strip()


def pick_column(columns: Sequence[str], flag_value: Optional[str], candidates: Sequence[str],
                what: str, table: str, required: bool) -> Optional[str]:
  """The column named by a flag, else the first known name present ('' = none)."""
  if flag_value == "":
    return None
  if flag_value is not None:
    if flag_value not in columns:
      raise ValueError(f"{table}: no column {flag_value!r} ({what}); it has {list(columns)}.")
    return flag_value
  lower = {c.lower(): c for c in columns}
  found = next((lower[c] for c in candidates if c in lower), None)
  if found is None and required:
    raise ValueError(f"{table}: cannot tell which column holds the {what} (columns "
                     f"{list(columns)}); name it with --{what.replace(' ', '_')}_column.")
  return found


@dataclasses.dataclass(frozen=True)
class TableColumns:
  """Columns of a label table; None: not named (auto-detected), '': not used."""
  path: Optional[str] = None
  id: Optional[str] = None
  label: Optional[str] = None
  split: Optional[str] = None
  group: Optional[str] = None


def _resolve_columns(columns: Sequence[str], given: TableColumns, table: str) -> TableColumns:
  path = pick_column(columns, given.path, PATH_COLUMNS, "path", table, required=False)
  file_id = None
  if path is None:
    file_id = pick_column(columns, given.id, ID_COLUMNS, "id", table, required=False)
  if path is None and file_id is None:
    raise ValueError(f"{table}: no file path or image id column among {list(columns)}; "
                     "name one with --path_column or --id_column.")
  return TableColumns(
      path=path, id=file_id,
      label=pick_column(columns, given.label, LABEL_COLUMNS, "label", table, required=True),
      split=pick_column(columns, given.split, SPLIT_COLUMNS, "split", table, required=False),
      group=pick_column(columns, given.group, GROUP_COLUMNS, "group", table, required=False))


class _FileIndex:
  """Finds image files under a folder by id: the file name with or without extension."""

  def __init__(self, folder: str):
    self._by_key = collections.defaultdict(list)
    for rel in _walk_files(folder):
      if images.is_image_name(rel):
        name = os.path.basename(rel)
        path = os.path.join(folder, rel)
        self._by_key[name].append(path)
        self._by_key[os.path.splitext(name)[0]].append(path)

  def find(self, file_id: str, where: str) -> Optional[str]:
    paths = sorted(set(self._by_key.get(file_id, ())))
    if len(paths) > 1:
      raise ValueError(f"{where}: id {file_id!r} matches several files: {paths[:4]}; point "
                       "--image_dir at a folder that holds one copy of each image.")
    return paths[0] if paths else None


def _parse_labels(value, multilabel: bool, sep: Optional[str], where: str) -> tuple[str, ...]:
  labels = value if isinstance(value, list) else (
      value.split(sep) if multilabel else [value])
  labels = tuple(dict.fromkeys(l.strip() for l in labels if l.strip()))  # Ordered, unique.
  if not multilabel and len(labels) != 1:
    raise ValueError(f"{where}: expected one label, got {value!r} (multi-label data: --multilabel).")
  return labels


def _merge(records: list[Record], multilabel: bool) -> list[Record]:
  """One record per file: multi-label rows are united, single-label repeats must agree."""
  by_path = {}
  for r in records:
    first = by_path.get(r.path)
    if first is None:
      by_path[r.path] = r
    elif multilabel and first.split == r.split:
      by_path[r.path] = dataclasses.replace(
          first, labels=tuple(dict.fromkeys(first.labels + r.labels)))
    elif first.labels != r.labels or first.split != r.split:
      raise ValueError(f"{r.origin}: file {r.example_id!r} is listed again with label "
                       f"{list(r.labels)} / split {r.split} (first at {first.origin}: "
                       f"{list(first.labels)} / split {first.split}).")
  return list(by_path.values())


@dataclasses.dataclass(frozen=True)
class TableOptions:
  """How to read a label table (see `read_table`)."""
  image_dir: Optional[str] = None  # Default: the table's folder.
  columns: TableColumns = TableColumns()
  multilabel: bool = False
  label_sep: Optional[str] = None  # Multi-label separator; None: any whitespace.
  allow_outside_image_dir: bool = False  # Let rows name files outside image_dir.


def check_inside(path: str, image_dir: str, where: str) -> None:
  """Raises, naming the row, if `path` is not under `image_dir`.

  The check is on the path as the table spells it ('..', absolute paths), not
  on where symlinks inside the folder point: the table must not pull
  arbitrary files into a dataset, but whoever set up the folder may link to
  images stored elsewhere.
  """
  root = os.path.abspath(image_dir)
  if os.path.commonpath([root, os.path.abspath(path)]) != root:
    raise ValueError(f"{where}: {path!r} is outside --image_dir {image_dir!r}; a label table "
                     "may only name files inside it (pass --allow_outside_image_dir if these "
                     "files are meant to be read).")


def _row_record(origin: str, row: dict, cols: TableColumns, opts: TableOptions, image_dir: str,
                index: Optional[_FileIndex]) -> tuple[Record, bool]:
  """(record, whether its file exists) for one table row."""
  key = row.get(cols.path or cols.id) or ""
  if not key:
    raise ValueError(f"{origin}: empty {cols.path or cols.id!r} column.")
  where = f"{origin} ({key})"
  if cols.path:
    path = os.path.normpath(os.path.join(image_dir, key.replace("\\", "/")))
  else:
    path = index.find(key, where) or os.path.normpath(os.path.join(image_dir, key))
  if not opts.allow_outside_image_dir:
    check_inside(path, image_dir, where)
  exists = os.path.isfile(path)
  # .get: JSON objects need not all have every key; a missing value is an error below.
  split = normalize_split(row.get(cols.split) or "", where) if cols.split else None
  labels = _parse_labels(row.get(cols.label) or "", opts.multilabel, opts.label_sep, where)
  group = (row.get(cols.group) or None) if cols.group else None
  return Record(path=path, example_id=key, origin=where, split=split, labels=labels,
                group=group), exists


def read_table(table: str, opts: TableOptions = TableOptions()) -> Source:
  """Reads a CSV/JSON label table whose rows name image files by path or by id.

  Files the table lists but that do not exist are returned in `skipped`
  (reason 'missing'); if none of them exists, the image folder is probably
  wrong and this raises instead. A row naming a file outside the image folder
  ('../x.jpg', an absolute path) is an error unless
  `opts.allow_outside_image_dir`.
  """
  rows = load_table(table)
  if not rows:
    raise ValueError(f"{table}: the table has no rows.")
  name = os.path.basename(table)
  # All keys of all rows: JSON objects need not share the same keys.
  cols = _resolve_columns(list(dict.fromkeys(k for _, r in rows for k in r)), opts.columns, name)
  image_dir = opts.image_dir or os.path.dirname(os.path.abspath(table))
  if not os.path.isdir(image_dir):
    raise ValueError(f"image folder {image_dir!r} (for {name}) does not exist.")
  index = None if cols.path else _FileIndex(image_dir)
  records, skipped = [], []
  for origin, row in rows:
    record, exists = _row_record(origin, row, cols, opts, image_dir, index)
    if exists:
      records.append(record)
    else:
      skipped.append(dict(file=record.example_id, kind="missing",
                          reason=f"missing: listed in {record.origin} but not found in {image_dir}"))
  if not records:
    raise ValueError(f"{name}: none of its {len(rows)} files exist under {image_dir!r} (e.g. "
                     f"{skipped[0]['file']!r}); set --image_dir to the folder they are in.")
  records = _merge(records, opts.multilabel)
  classes = sorted({l for r in records for l in r.labels})
  info = dict(kind="table", path=os.path.abspath(table), image_dir=os.path.abspath(image_dir),
              columns={k: v for k, v in dataclasses.asdict(cols).items() if v})
  return Source(records=records, class_names=classes, skipped=skipped, info=info,
                multilabel=opts.multilabel)


def read_class_names(spec: Optional[str]) -> Optional[list[str]]:
  """An explicit class list: 'a,b,c' or the path of a file with one name per line.

  Returns None for no list. Names keep inner spaces; order is kept (it sets
  the label indices).
  """
  if not spec:
    return None
  if os.path.isfile(spec):
    with open(spec, encoding="utf-8") as f:
      names = [l.strip() for l in f if l.strip() and not l.startswith("#")]
  else:
    names = [n.strip() for n in spec.split(",") if n.strip()]
  repeated = [n for n, c in collections.Counter(names).items() if c > 1]
  if repeated:
    raise ValueError(f"class list {spec!r} names {repeated} more than once.")
  return names


def check_labels(records: Sequence[Record], class_names: Sequence[str]) -> None:
  """Raises, naming the file and the label, for a label outside `class_names`."""
  known = set(class_names)
  for r in records:
    for label in r.labels:
      if label not in known:
        raise ValueError(f"{r.origin}: label {label!r} is not in the class list "
                         f"({len(known)} classes: {list(class_names)[:12]}).")
