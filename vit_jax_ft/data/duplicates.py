"""Byte-identical files (same sha256): finding them and applying a policy.

Each pair of identical files falls in one of two categories, and may also
cross splits:
  within_class:   same labels, e.g. `x.jpg` and `x(1).jpg` in one class folder;
                  harmless for the labels but over-weights the image.
  label_conflict: different labels for the same pixels; at least one is wrong.
  cross_split:    the copies are in different splits: a leak that inflates
                  test scores (the model has seen the test image).
Counts are in pairs, so a file present three times counts as three pairs.
"""

import collections
import itertools
from typing import Optional, Sequence

POLICIES = ("report", "drop", "fail")
# Which copy survives `drop`: prefer keeping the evaluation splits intact.
_KEEP_ORDER = {"test": 0, "val": 1, "train": 2, None: 3}


def find_duplicates(ids: Sequence[str], hashes: Sequence[str],
                    labels: Sequence[Sequence[str]], splits: Sequence[Optional[str]]) -> dict:
  """Report of identical contents among the files (see the module docstring).

  Returns {num_files, num_distinct, num_groups, pairs: {total, within_class,
  label_conflict, cross_split}, conflicts_by_labels: {'a | b': pairs},
  groups: [{sha256, files, labels, splits, kinds}]}.
  """
  by_hash = {}
  conflicts = collections.Counter()
  for i, digest in enumerate(hashes):
    by_hash.setdefault(digest, []).append(i)
  pairs = dict(total=0, within_class=0, label_conflict=0, cross_split=0)
  groups = []
  for digest, members in by_hash.items():
    if len(members) < 2:
      continue
    members = sorted(members, key=lambda i: ids[i])
    kinds = set()
    for i, j in itertools.combinations(members, 2):
      kind = "within_class" if sorted(labels[i]) == sorted(labels[j]) else "label_conflict"
      if kind == "label_conflict":
        conflicts[" | ".join(sorted("+".join(sorted(labels[k])) for k in (i, j)))] += 1
      pairs["total"] += 1
      pairs[kind] += 1
      kinds.add(kind)
      if splits[i] != splits[j]:
        pairs["cross_split"] += 1
        kinds.add("cross_split")
    groups.append(dict(sha256=digest, files=[ids[i] for i in members],
                       labels=[list(labels[i]) for i in members],
                       splits=[splits[i] for i in members], kinds=sorted(kinds)))
  groups.sort(key=lambda g: g["files"][0])
  return dict(num_files=len(ids), num_distinct=len(by_hash), num_groups=len(groups),
              pairs=pairs, conflicts_by_labels=dict(conflicts.most_common()), groups=groups)


def files_to_drop(report: dict) -> dict[str, str]:
  """{file id: reason} for policy 'drop'.

  Copies with conflicting labels are all dropped (which label is right is
  unknown); of copies that agree, one is kept: the one in test, else val,
  else train, so evaluation splits stay as the source defined them.
  """
  drops = {}
  for group in report["groups"]:
    files, labels, splits = group["files"], group["labels"], group["splits"]
    if "label_conflict" in group["kinds"]:
      for f, ls in zip(files, labels):
        others = ", ".join(f"{g} {m}" for g, m in zip(files, labels) if g != f)
        drops[f] = f"label conflict: labelled {ls}, identical to {others}"
      continue
    # Shortest name next: copies tend to carry suffixes, like 'x(1).jpg'.
    keep = min(range(len(files)),
               key=lambda i: (_KEEP_ORDER.get(splits[i], 3), len(files[i]), files[i]))
    for i, f in enumerate(files):
      if i != keep:
        drops[f] = f"duplicate of {files[keep]}"
  return drops


def check_policy(report: dict, policy: str) -> dict[str, str]:
  """Applies `policy` ('report', 'drop' or 'fail'); returns the files to drop."""
  if policy not in POLICIES:
    raise ValueError(f"--duplicates must be one of {POLICIES}, got {policy!r}.")
  if policy == "report" or not report["groups"]:
    return {}
  if policy == "fail":
    examples = "; ".join(" = ".join(g["files"]) for g in report["groups"][:3])
    raise ValueError(
        f"{report['pairs']['total']} pairs of byte-identical files ({_describe(report)}), "
        f"e.g. {examples}. Rerun with --duplicates=drop to remove them or "
        "--duplicates=report to keep them.")
  return files_to_drop(report)


def _describe(report: dict) -> str:
  p = report["pairs"]
  return (f"{p['within_class']} within a class, {p['label_conflict']} label conflicts, "
          f"{p['cross_split']} across splits")


def summary(report: dict) -> str:
  """One line for the log."""
  line = (f"{report['num_files']} files, {report['num_distinct']} distinct contents, "
          f"{report['pairs']['total']} duplicate pairs: {_describe(report)}")
  if report["conflicts_by_labels"]:
    line += "; label conflicts between " + ", ".join(
        f"{k}: {n}" for k, n in report["conflicts_by_labels"].items())
  return line
