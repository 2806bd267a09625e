"""Assigning examples to train/val/test: stratified, seeded and group-aware.

The unit of splitting is a group: examples that share a group key (e.g. the
same `lesion_id`, or byte-identical content) always land in the same split,
so a patient or a duplicated photo never sits on both sides of an
evaluation. Groups are stratified by label so every split keeps the class
proportions as far as whole groups allow. The result depends only on the
items and the seed, not on the order the items come in.
"""

from typing import Hashable, Optional, Sequence

import numpy as np

SPLITS = ("train", "val", "test")


def connected_groups(keys: Sequence[Sequence[Hashable]]) -> list[str]:
  """Group name per item, where items sharing any key are in one group.

  E.g. keys [['lesion:A', 'sha:1'], ['lesion:B', 'sha:1'], ['lesion:C']] puts
  the first two items in one group (same content) and the third alone. A
  group is named by its smallest key (as repr), so the names, and the split
  that depends on them, do not depend on the order of the items. An item
  without keys is a group of its own.
  """
  parent = list(range(len(keys)))

  def root(i: int) -> int:
    while parent[i] != i:
      parent[i] = parent[parent[i]]
      i = parent[i]
    return i

  owner = {}
  for i, item_keys in enumerate(keys):
    for key in item_keys:
      j = owner.setdefault(key, i)
      parent[root(i)] = root(j)
  names = {}
  for i, item_keys in enumerate(keys):
    for key in item_keys:
      r = root(i)
      names[r] = min(names.get(r, repr(key)), repr(key))
  return [names.get(root(i), f"item {i}") for i in range(len(keys))]


def _allocate(sizes: Sequence[int], target: int, rng: np.random.Generator) -> list[int]:
  """Splits `target` units over strata of `sizes` in proportion (largest remainder).

  Strata keep at least one unit back (for train) while that is possible, so a
  class with few examples is not moved out of train entirely. Ties between
  equal remainders are broken in a seeded random order.
  """
  sizes = np.asarray(sizes, dtype=np.int64)
  total = int(sizes.sum())
  quota = sizes * target / max(total, 1)
  caps = np.maximum(sizes - 1, 0) if target <= int(np.maximum(sizes - 1, 0).sum()) else sizes
  alloc = np.minimum(np.floor(quota).astype(np.int64), caps)
  tiebreak = rng.permutation(len(sizes))
  order = sorted(range(len(sizes)), key=lambda k: (-(quota[k] - alloc[k]), tiebreak[k]))
  while alloc.sum() < target:
    progressed = False
    for k in order:
      if alloc.sum() < target and alloc[k] < caps[k]:
        alloc[k] += 1
        progressed = True
    if not progressed:
      break
  return alloc.tolist()


def unit_strata(strata: Sequence[str], groups: Sequence[Hashable]) -> dict:
  """Group -> its stratum (the most common among its items, ties: smallest)."""
  votes = {}
  for stratum, group in zip(strata, groups):
    votes.setdefault(group, {}).setdefault(stratum, 0)
    votes[group][stratum] += 1
  return {g: min(v, key=lambda s: (-v[s], s)) for g, v in votes.items()}


def stratified_group_split(strata: Sequence[str], groups: Sequence[Hashable],
                           fractions: dict[str, float], seed: int) -> list[str]:
  """Split name per item: `fractions` of the groups per split, the rest 'train'.

  Args:
    strata: per item, the key to stratify by (e.g. its label).
    groups: per item, its group; all items of a group get the same split.
    fractions: e.g. {'val': 0.1, 'test': 0.1}. Each split with a fraction > 0
      gets at least one group (when train keeps at least one).
    seed: the same seed and items give the same split.
  """
  unit_stratum = unit_strata(strata, groups)
  by_stratum = {}
  for unit in sorted(unit_stratum, key=repr):
    by_stratum.setdefault(unit_stratum[unit], []).append(unit)
  keys = sorted(by_stratum)
  rng = np.random.default_rng(seed)
  members = {k: [by_stratum[k][i] for i in rng.permutation(len(by_stratum[k]))] for k in keys}
  remaining = [len(members[k]) for k in keys]
  num_units = sum(remaining)
  assigned = {}
  for split, fraction in sorted(fractions.items(), key=lambda kv: SPLITS.index(kv[0])):
    if fraction <= 0:
      continue
    target = min(max(1, round(fraction * num_units)), sum(remaining) - 1)
    if target < 1:
      raise ValueError(f"{num_units} example group(s) are too few to split off a {split!r} "
                       f"split and keep one for train (--{split}_fraction).")
    for k, n in zip(keys, _allocate(remaining, target, rng)):
      taken = len(members[k]) - remaining[keys.index(k)]
      for unit in members[k][taken:taken + n]:
        assigned[unit] = split
      remaining[keys.index(k)] -= n
  return [assigned.get(g, "train") for g in groups]


def plan_splits(labels: Sequence[Sequence[int]], given: Sequence[Optional[str]],
                group_keys: Sequence[Sequence[Hashable]], *, val_fraction: float,
                test_fraction: float, seed: int) -> list[str]:
  """The final split of every item.

  Splits the source gives are kept. Without any, items are split
  train/val/test by the fractions. With given splits, a missing 'val' (and a
  missing 'test' if `test_fraction` > 0) is carved out of the given train
  items, `val_fraction` of them. Items sharing a group key stay together.
  """
  if any(s is None for s in given) and any(s is not None for s in given):
    raise ValueError("Some examples have a split and others do not.")
  strata = ["+".join(map(str, sorted(ls))) for ls in labels]
  groups = connected_groups(group_keys)
  if all(s is None for s in given):
    return stratified_group_split(strata, groups, {"val": val_fraction, "test": test_fraction},
                                  seed)
  present = set(given)
  if "train" not in present:
    raise ValueError(f"The source gives splits {sorted(present)} but no 'train' split.")
  carve = {}
  if "val" not in present:
    carve["val"] = val_fraction
  if "test" not in present and test_fraction > 0:
    carve["test"] = test_fraction
  result = list(given)
  train = [i for i, s in enumerate(given) if s == "train"]
  if carve:
    carved = stratified_group_split([strata[i] for i in train], [groups[i] for i in train],
                                    carve, seed)
    for i, split in zip(train, carved):
      result[i] = split
  return result


def groups_across_splits(groups: Sequence[Optional[str]], splits: Sequence[str]) -> dict:
  """{group: sorted splits} for every group whose items are in more than one split."""
  seen = {}
  for group, split in zip(groups, splits):
    if group is not None:
      seen.setdefault(group, set()).add(split)
  return {g: sorted(s) for g, s in sorted(seen.items()) if len(s) > 1}
