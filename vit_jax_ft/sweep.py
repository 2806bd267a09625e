r"""Grid sweeps: `python -m vit_jax_ft.sweep --config=C --grid=G --workdir=DIR`.

  python -m vit_jax_ft.sweep --config=configs/vit_artdl.py --workdir=workdirs/artdl_sweep \
      --grid='optimizer.lr=1e-4,5e-5;loss.name=ce,focal' \
      --set='config.data.dir=data/artdl_prepared'

Every combination of the grid (';' between fields, ',' between values) is
trained by `vit_jax_ft.main` in its own subfolder, one after another, with
its log in that folder's train.log. A run whose eval_results.json exists is
finished and not run again; an interrupted one resumes from its last
checkpoint (main does that). `--dry_run` prints the commands instead, e.g.
for a cluster scheduler. Finally WORKDIR/sweep.md and WORKDIR/sweep.csv
compare the chosen metrics of every configuration (the best value of each
metric in bold in the markdown) and, when the runs' reports saved their
predictions, each run's paired bootstrap difference from the first run (the
baseline) on the test split's macro-F1 (`--compare_metric`, `--compare_split`):
'+0.0123 [-0.0201, +0.0412] ~', the difference run - baseline, its 95%
interval, and '>' (better beyond the noise), '<' (worse) or '~' (no
significant difference), as `python -m vit_jax_ft.compare` computes it.
"""

import csv
import dataclasses
import itertools
import json
import math
import os
import re
import runpy
import shlex
import subprocess
import sys
import time
from typing import Optional, Sequence

from absl import app
from absl import flags
from absl import logging

RESULTS_FILE = "eval_results.json"
DEFAULT_METRICS = ("val_accuracy", "val_macro_f1", "test_accuracy", "test_macro_f1",
                   "val_micro_f1", "test_micro_f1")
_SAFE = re.compile(r"[^\w.=+-]+")  # Characters kept in run folder names.
# Metrics where smaller is better (bold marks the minimum).
_LOWER_IS_BETTER = re.compile(r"(loss|error|ece)$")


@dataclasses.dataclass(frozen=True)
class Run:
  """One configuration of the grid."""

  name: str
  overrides: tuple[tuple[str, str], ...]  # (config key, value as typed on the command line)
  workdir: str

  def command(self, config: str, fixed: Sequence[tuple[str, str]] = (),
              python: str = sys.executable) -> list[str]:
    args = [python, "-m", "vit_jax_ft.main", f"--config={config}", f"--workdir={self.workdir}"]
    return args + [f"--config.{k}={v}" for k, v in list(fixed) + list(self.overrides)]

  @property
  def finished(self) -> bool:
    return os.path.exists(os.path.join(self.workdir, RESULTS_FILE))


def parse_assignments(text: str, flag: str) -> list[tuple[str, list[str]]]:
  """'a.b=1,2;c=x' -> [('a.b', ['1', '2']), ('c', ['x'])]; a 'config.' prefix is optional."""
  fields = []
  for part in (p.strip() for p in text.split(";") if p.strip()):
    key, sep, values = part.partition("=")
    key = key.strip().removeprefix("--").removeprefix("config.")
    options = [v.strip() for v in values.split(",")]
    if not sep or not key or not all(options):
      raise ValueError(f"--{flag}: expected KEY=VALUE[,VALUE...], got {part!r}.")
    fields.append((key, options))
  keys = [k for k, _ in fields]
  if len(set(keys)) != len(keys):
    raise ValueError(f"--{flag} names a field twice: {keys}.")
  return fields


def check_keys(config_path: str, keys: Sequence[str]) -> None:
  """Fails before any run if a key is not a field of the config."""
  from vit_jax_ft import base_config  # pylint: disable=g-import-not-at-top
  valid = set(base_config.flatten_keys(runpy.run_path(config_path)["get_config"]()))
  unknown = [k for k in keys if k not in valid]
  if unknown:
    raise ValueError(f"Unknown config keys {unknown} (in {config_path}).")


def _dir_name(overrides: Sequence[tuple[str, str]], full_keys: bool) -> str:
  # The last component of each key keeps names short: 'lr=1e-4_name=focal'. No commas:
  # folder lists are comma-separated elsewhere (predict --images).
  name = "_".join(f"{k if full_keys else k.rsplit('.', 1)[-1]}={v}" for k, v in overrides)
  return _SAFE.sub("-", name)


def plan(grid: Sequence[tuple[str, list[str]]], workdir: str) -> list[Run]:
  """Every combination of the grid, in order (the first field varies slowest)."""
  keys = [k for k, _ in grid]
  short = [k.rsplit(".", 1)[-1] for k in keys]
  full_keys = len(set(short)) != len(short)  # e.g. optimizer.b1 and other.b1
  runs, seen = [], set()
  for values in itertools.product(*(options for _, options in grid)):
    overrides = tuple(zip(keys, values))
    name = base = _dir_name(overrides, full_keys)
    n = 1
    while name in seen:  # Values that differ only in replaced characters ('a/b', 'a:b').
      n += 1
      name = f"{base}_{n}"
    seen.add(name)
    runs.append(Run(name=name, overrides=overrides, workdir=os.path.join(workdir, name)))
  return runs


def execute(run: Run, command: list[str]) -> str:
  """Trains one configuration; returns its status ('done', 'failed (exit N)')."""
  os.makedirs(run.workdir, exist_ok=True)
  log_path = os.path.join(run.workdir, "train.log")
  logging.info("Running %s: %s (log: %s)", run.name, shlex.join(command), log_path)
  start = time.time()
  with open(log_path, "a") as log:
    proc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False)
  if proc.returncode:
    logging.error("%s failed with exit code %d; see %s.", run.name, proc.returncode, log_path)
    return f"failed (exit {proc.returncode})"
  logging.info("%s finished in %.0f s.", run.name, time.time() - start)
  return "done"


def _results(run: Run) -> dict:
  if not run.finished:
    return {}
  with open(os.path.join(run.workdir, RESULTS_FILE)) as f:
    return json.load(f)


def paired_column(runs: Sequence[Run], metric: str = "macro_f1", split: str = "test",
                  checkpoint: str = "best") -> Optional[tuple[str, list]]:
  """(header, cells): each run's paired bootstrap difference from runs[0] in `metric`.

  None when the baseline has no saved predictions for the split (nothing to pair).
  """
  from vit_jax_ft.reports import compare  # pylint: disable=g-import-not-at-top
  if len(runs) < 2 or not split:
    return None
  try:
    base = compare.find_predictions(runs[0].workdir, split, checkpoint)
  except FileNotFoundError:
    return None
  cells = []
  for r in runs:
    if r is runs[0]:
      cells.append("baseline")
      continue
    try:
      result = compare.compare_files(base, compare.find_predictions(r.workdir, split, checkpoint),
                                     name_a=runs[0].name, name_b=r.name)
      cells.append(compare.cell(result, metric) if metric in result["metrics"] else None)
    except (FileNotFoundError, ValueError) as e:
      logging.warning("No paired comparison of %s with %s: %s", r.name, runs[0].name, e)
      cells.append(None)
  return f"{split}_{metric} - {runs[0].name} (95% CI)", cells


def table_rows(runs: Sequence[Run], statuses: dict, metrics: Optional[Sequence[str]],
               compare_metric: str = "macro_f1", compare_split: str = "test"
               ) -> tuple[list[str], list[list]]:
  """(header, rows): grid values, the metrics, the paired difference from the first run
  (when its predictions were saved), step and status of each run."""
  results = {r.name: _results(r) for r in runs}
  if metrics is None:  # The defaults that any run reported.
    metrics = [m for m in DEFAULT_METRICS if any(m in res for res in results.values())]
  keys = [k for k, _ in runs[0].overrides] if runs else []
  paired = paired_column(runs, compare_metric, compare_split)
  header = keys + list(metrics) + ([paired[0]] if paired else []) + ["step", "status", "workdir"]
  rows = []
  for i, r in enumerate(runs):
    res = results[r.name]
    status = statuses.get(r.name, "done" if res else "not run")
    rows.append([v for _, v in r.overrides] + [res.get(m) for m in metrics]
                + ([paired[1][i]] if paired else [])
                + [res.get("step"), status, os.path.basename(r.workdir)])
  return header, rows


def _best(values: list) -> dict:
  return {i: v for i, v in enumerate(values) if isinstance(v, (int, float)) and math.isfinite(v)}


def write_tables(workdir: str, header: list[str], rows: list[list], metrics: Sequence[str]
                 ) -> tuple[str, str]:
  """WORKDIR/sweep.csv and WORKDIR/sweep.md (best value of each metric in bold)."""
  os.makedirs(workdir, exist_ok=True)
  csv_path, md_path = os.path.join(workdir, "sweep.csv"), os.path.join(workdir, "sweep.md")
  with open(csv_path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows([["" if v is None else v for v in row] for row in rows])
  cells = [[("-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)) for v in row]
           for row in rows]
  for m in metrics:
    col = header.index(m)
    found = _best([row[col] for row in rows])
    if found:
      pick = min if _LOWER_IS_BETTER.search(m) else max
      best = pick(found.values())
      for i, v in found.items():
        if v == best:
          cells[i][col] = f"**{cells[i][col]}**"
  lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
  lines += ["| " + " | ".join(row) + " |" for row in cells]
  if any(h.endswith("(95% CI)") for h in header):
    lines += ["", "Paired bootstrap difference from the first run on the same examples and its "
              "95% interval: '>' better beyond the noise, '<' worse, '~' no significant "
              "difference (`python -m vit_jax_ft.compare FIRST_RUN RUN` gives every metric)."]
  with open(md_path, "w") as f:
    f.write("\n".join(lines) + "\n")
  return csv_path, md_path


def sweep(config: str, grid_text: str, workdir: str, fixed_text: str = "",
          metrics: Optional[Sequence[str]] = None, dry_run: bool = False,
          compare_metric: str = "macro_f1", compare_split: str = "test") -> list[Run]:
  """Plans, runs what is not finished (unless dry_run) and writes the tables."""
  grid = parse_assignments(grid_text, "grid")
  fixed = parse_assignments(fixed_text, "set")
  if any(len(v) != 1 for _, v in fixed):
    raise ValueError("--set takes one value per field (use --grid for several).")
  fixed = [(k, v[0]) for k, v in fixed]
  check_keys(config, [k for k, _ in grid] + [k for k, _ in fixed])
  runs = plan(grid, workdir)
  statuses = {}
  for run in runs:
    command = run.command(config, fixed)
    if dry_run:
      print(("# finished: " if run.finished else "") + shlex.join(command))
    elif run.finished:
      logging.info("%s is finished (%s exists): not run again.", run.name, RESULTS_FILE)
    else:
      statuses[run.name] = execute(run, command)
  if not dry_run:
    header, rows = table_rows(runs, statuses, metrics, compare_metric, compare_split)
    shown = [h for h in header if h in (metrics or DEFAULT_METRICS)]
    paths = write_tables(workdir, header, rows, shown)
    print(open(paths[1]).read())
    logging.info("Wrote %s and %s.", *paths)
  return runs


def define_flags() -> None:
  """Command-line flags (only when run as a program)."""
  flags.DEFINE_string("config", None, "Config file every run starts from.", required=True)
  flags.DEFINE_string("grid", None, "Fields and values: 'optimizer.lr=1e-4,5e-5;loss.name=ce,"
                      "focal' (';' between fields, ',' between values).", required=True)
  flags.DEFINE_string("workdir", None, "Folder of the sweep; one subfolder per run.",
                      required=True)
  flags.DEFINE_string("set", "", "Overrides shared by every run: 'data.dir=/data/x;seed=1'.")
  flags.DEFINE_list("metrics", None, "eval_results.json keys to compare (default: "
                    "val/test accuracy and F1 that the runs report).")
  flags.DEFINE_bool("dry_run", False, "Print the commands instead of running them.")
  flags.DEFINE_string("compare_metric", "macro_f1", "Metric of the paired bootstrap difference "
                      "from the first run (accuracy, macro_f1, weighted_f1, macro_roc_auc; "
                      "multi-label: micro_f1, macro_f1, exact_match, macro_roc_auc).")
  flags.DEFINE_string("compare_split", "test", "Split of that comparison ('' for none).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  try:
    sweep(f.config, f.grid, f.workdir, f.set, f.metrics, f.dry_run, f.compare_metric,
          f.compare_split)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
