r"""Is run B better than run A? `python -m vit_jax_ft.compare RUN_A RUN_B`.

  python -m vit_jax_ft.compare workdirs/lr1e-4 workdirs/lr3e-4 --split=test --metric=macro_f1

Reads each run's reports/<split>_<checkpoint>/predictions.npz (written by
every report: the train loop's final one and `vit_jax_ft.evaluate`), pairs
the examples by id (a run on other examples is refused, naming both), and
gives every headline metric of both runs, the difference B - A and its 95%
paired bootstrap interval: the same resampled examples score both runs
(reports/compare.py). The verdict on `--metric`: "B better than A" or "A
better than B" when the interval excludes 0, else "no significant
difference". RUN may also be a report folder (e.g. reports/test_best_tta-flip)
or a predictions.npz. Writes compare.md and compare.json to --out (default
RUN_B/reports/compare_<split>_<checkpoint>_vs_<RUN_A's folder name>/).
Needs neither JAX nor TensorFlow: it reads the saved predictions only.
"""

import os
import re
import sys

from absl import app
from absl import flags

from vit_jax_ft.reports import bootstrap
from vit_jax_ft.reports import compare


def define_flags() -> None:
  """Command-line flags (only when run as a program)."""
  flags.DEFINE_string("split", "test", "Split both runs were reported on.")
  flags.DEFINE_string("checkpoint", "best", "Report folder suffix: 'best', 'last', a step, "
                      "or e.g. 'best_tta-flip'.")
  flags.DEFINE_string("metric", compare.DEFAULT_METRIC, "Metric of the verdict line: accuracy, "
                      "macro_f1, weighted_f1, macro_roc_auc (multi-label: micro_f1, macro_f1, "
                      "exact_match, macro_roc_auc).")
  flags.DEFINE_integer("resamples", bootstrap.RESAMPLES, "Paired bootstrap resamples.")
  flags.DEFINE_integer("seed", bootstrap.SEED, "Seed of the resamples.")
  flags.DEFINE_string("out", None, "Folder for compare.md and compare.json (default: "
                      "RUN_B/reports/compare_<split>_<checkpoint>_vs_<RUN_A name>).")


def default_out(run_a: str, run_b: str, split: str, checkpoint: str) -> str:
  base = run_b if os.path.isdir(run_b) else os.path.dirname(os.path.abspath(run_b))
  if os.path.isdir(os.path.join(base, "reports")):
    base = os.path.join(base, "reports")
  name = os.path.basename(os.path.normpath(os.path.abspath(run_a))) or "A"
  return os.path.join(base, re.sub(r"[^\w.=+-]+", "-", f"compare_{split}_{checkpoint}_vs_{name}"))


def run(run_a: str, run_b: str, split: str = "test", checkpoint: str = "best",
        metric: str = compare.DEFAULT_METRIC, resamples: int = bootstrap.RESAMPLES,
        seed: int = bootstrap.SEED, out: str | None = None) -> dict:
  """Compares, prints the table and writes compare.md/json; returns the result."""
  if resamples < 1:
    raise ValueError(f"--resamples must be >= 1; got {resamples}.")
  path_a = compare.find_predictions(run_a, split, checkpoint)
  path_b = compare.find_predictions(run_b, split, checkpoint)
  result = compare.compare_files(path_a, path_b, resamples, seed, name_a=f"RUN_A {run_a}",
                                 name_b=f"RUN_B {run_b}")
  if metric not in result["metrics"]:
    raise ValueError(f"--metric={metric!r} is not one of {list(result['metrics'])}.")
  out = out or default_out(run_a, run_b, split, checkpoint)
  json_path, md_path = compare.write(out, result, metric)
  print(compare.render(result, metric))
  print(f"Wrote {md_path} and {json_path}.")
  return result


def main(argv):
  if len(argv) != 3:
    raise app.UsageError("Usage: python -m vit_jax_ft.compare RUN_A RUN_B [--split=test] "
                         "[--metric=macro_f1]")
  f = flags.FLAGS
  try:
    run(argv[1], argv[2], f.split, f.checkpoint, f.metric, f.resamples, f.seed, f.out)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
