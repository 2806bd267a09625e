"""k-fold cross-validation: which fold each example is in, and fold k's train/val splits.

`prepare --folds=K` pools the train and val examples (the test split stays
held out) and assigns each to one of K folds:
  * stratified: by its label, for multi-label data by its rarest label (the
    label with the fewest examples in the pool), so every fold keeps the class
    proportions as far as whole groups allow;
  * group-aware: examples sharing a group key (--group_column, e.g. HAM10000's
    lesion_id, or byte-identical content) are one unit and share a fold
    (`splits.connected_groups`);
  * seeded and order-independent: the result depends on the items and the
    seed, not on the order they come in.

Each fold is written once, as its own shards (`fold{k}-*.tfrecord`), and
dataset_info.json records them under `folds`. Fold k's run reads fold k as
its val split and the other folds as train (`select_fold`): no image is
copied per fold and no record needs filtering. The info's plain `train` and
`val` entries are fold 0's, so tools that know nothing of folds still read
the dataset.
"""

import collections
from typing import Hashable, Optional, Sequence

from absl import logging
import numpy as np

from vit_jax_ft.data import report
from vit_jax_ft.data import splits as splits_lib

FOLDS_KEY = "folds"  # dataset_info.json entry: {'num_folds', 'seed', 'folds': [split entries]}.
NO_LABEL = -1  # Stratum of a (multi-label) example without labels.


def fold_split_name(k: int) -> str:
  """The shard prefix of fold k: fold0-00000-of-00002.tfrecord."""
  return f"fold{k}"


def strata(labels: Sequence[Sequence[int]]) -> list[int]:
  """The class each example is stratified by: its label, or its rarest label.

  The rarest label is the one with the fewest examples among `labels` (ties:
  the smaller index); an example without labels gets NO_LABEL.
  """
  counts = collections.Counter(c for ls in labels for c in set(ls))
  return [min(set(ls), key=lambda c: (counts[c], c)) if ls else NO_LABEL for ls in labels]


def assign_folds(labels: Sequence[Sequence[int]], group_keys: Sequence[Sequence[Hashable]],
                 num_folds: int, seed: int) -> list[int]:
  """The fold (0..num_folds-1) of every example.

  Args:
    labels: per example, its class indices (one for single-label data).
    group_keys: per example, keys whose sharers must share a fold (see
      `splits.connected_groups`); [] for none.
    num_folds: K >= 2, at most the number of groups.
    seed: the same seed and examples give the same folds.

  Groups are placed stratum by stratum (the rarest stratum first), largest
  group first, each into the fold with the fewest examples of that stratum so
  far, ties going to the fold with the fewest examples overall, then to a
  seeded random order. With one example per group, every fold's count of each
  class and its total differ from the others' by at most one.
  """
  if isinstance(num_folds, bool) or not isinstance(num_folds, (int, np.integer)) or num_folds < 2:
    raise ValueError(f"--folds={num_folds!r}: cross-validation needs at least 2 folds.")
  if len(labels) != len(group_keys):
    raise ValueError(f"{len(labels)} labels but {len(group_keys)} group keys.")
  groups = splits_lib.connected_groups(group_keys)
  num_groups = len(set(groups))
  if num_folds > num_groups:
    raise ValueError(
        f"--folds={num_folds} is more than the {num_groups} group(s) of examples in the train "
        f"and val splits ({len(labels)} examples; examples sharing a --group_column value or "
        "identical content form one group): every fold needs at least one group. Use fewer "
        "folds.")
  unit_stratum = splits_lib.unit_strata([str(s) for s in strata(labels)], groups)
  size = collections.Counter(groups)
  by_stratum = collections.defaultdict(list)
  for unit in sorted(unit_stratum, key=repr):
    by_stratum[unit_stratum[unit]].append(unit)
  rng = np.random.default_rng(seed)
  fold_total = np.zeros(num_folds, np.int64)
  fold_of = {}
  # Rarest stratum first (its few groups are spread before the totals fill up).
  for stratum in sorted(by_stratum, key=lambda s: (sum(size[u] for u in by_stratum[s]), s)):
    units = by_stratum[stratum]
    units = [units[i] for i in rng.permutation(len(units))]
    units.sort(key=lambda u: -size[u])  # Stable: equal sizes keep the seeded order.
    tiebreak = rng.permutation(num_folds)
    in_stratum = np.zeros(num_folds, np.int64)
    for unit in units:
      k = min(range(num_folds), key=lambda f: (in_stratum[f], fold_total[f], tiebreak[f]))
      fold_of[unit] = k
      in_stratum[k] += size[unit]
      fold_total[k] += size[unit]
  return [fold_of[g] for g in groups]


def _merged(entries: Sequence[dict]) -> dict:
  """One split entry (files, counts, shard sizes) made of several folds' entries."""
  merged = dict(files=[f for e in entries for f in e["files"]],
                num_examples=int(sum(e["num_examples"] for e in entries)),
                class_counts=np.sum([e["class_counts"] for e in entries], axis=0).tolist())
  for key in ("num_bytes",):
    if all(key in e for e in entries):
      merged[key] = int(sum(e[key] for e in entries))
  for key in ("file_bytes", "file_sha256"):
    if all(key in e for e in entries):
      merged[key] = {name: v for e in entries for name, v in e[key].items()}
  return merged


def fold_splits(fold_entries: Sequence[dict], k: int) -> dict:
  """{'train': every fold but k, merged; 'val': fold k}, as dataset_info.json split entries."""
  return {"train": _merged([e for i, e in enumerate(fold_entries) if i != k]),
          "val": dict(fold_entries[k])}


def folds_info(fold_entries: Sequence[dict], seed: int, group_column: Optional[str]) -> dict:
  """The dataset_info.json `folds` entry."""
  return dict(num_folds=len(fold_entries), seed=seed, group_column=group_column,
              stratified_by="label (multi-label: the example's rarest label)",
              folds=list(fold_entries))


def num_folds(info: dict) -> int:
  """K of a dataset prepared with --folds=K; 0 without folds."""
  return int((info.get(FOLDS_KEY) or {}).get("num_folds", 0))


def select_fold(info: dict, fold: int, data_dir: str, train_split: str = "train",
                val_split: str = "val") -> dict:
  """The info with fold `fold` as `val_split` and the other folds as `train_split`.

  fold -1 leaves the info as it is (a dataset with folds then trains as fold
  0). A fold out of range, or on a dataset prepared without --folds, is an
  error naming the value and the dataset.
  """
  if fold == -1:
    if num_folds(info):
      logging.info("%s was prepared with --folds=%d; data.fold=-1 trains on fold 0's split "
                   "(val = fold 0). Use vit_jax_ft.cv to train every fold.", data_dir,
                   num_folds(info))
    return info
  k = num_folds(info)
  if not k:
    raise ValueError(f"config.data.fold={fold}, but the dataset {data_dir} was prepared without "
                     "--folds (its dataset_info.json has no folds); prepare it with "
                     "`python -m vit_jax_ft.data.prepare ... --folds=K` or leave data.fold at -1.")
  if not 0 <= fold < k:
    raise ValueError(f"config.data.fold={fold} is out of range: the dataset {data_dir} has {k} "
                     f"folds (0 to {k - 1}; -1: no cross-validation).")
  chosen = fold_splits(info[FOLDS_KEY]["folds"], fold)
  splits = dict(info["splits"])
  splits[train_split], splits[val_split] = chosen["train"], chosen["val"]
  train_counts = chosen["train"]["class_counts"]
  out = dict(info, splits=splits, fold=fold)
  if "class_weights" in info:  # The weighted losses' weights, from this fold's train counts.
    out["class_weights"] = report.class_weights(train_counts)
  if "imbalance_ratio" in info:
    out["imbalance_ratio"] = report.imbalance_ratio(train_counts)
  return out

