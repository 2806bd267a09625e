"""sweep: grid parsing, commands, resuming (finished runs are skipped), comparison tables."""

import csv
import json
import os

import pytest

from vit_jax_ft import sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "configs", "demo.py")


def test_grid_parsing_and_plan(tmp_path):
  grid = sweep.parse_assignments("optimizer.lr=1e-3, 3e-3 ; config.loss.name=ce,focal", "grid")
  assert grid == [("optimizer.lr", ["1e-3", "3e-3"]), ("loss.name", ["ce", "focal"])]
  runs = sweep.plan(grid, str(tmp_path))
  assert [r.name for r in runs] == ["lr=1e-3_name=ce", "lr=1e-3_name=focal",
                                    "lr=3e-3_name=ce", "lr=3e-3_name=focal"]
  assert runs[1].command(DEMO, [("num_epochs", "2")], python="py") == [
      "py", "-m", "vit_jax_ft.main", f"--config={DEMO}",
      f"--workdir={tmp_path}/lr=1e-3_name=focal", "--config.num_epochs=2",
      "--config.optimizer.lr=1e-3", "--config.loss.name=focal"]
  # Keys whose last components collide get full names; so do values that differ only in
  # characters a folder name cannot hold.
  clash = sweep.plan([("optimizer.b1", ["0.9"]), ("b1", ["x/y", "x:y"])], str(tmp_path))
  assert [r.name for r in clash] == ["optimizer.b1=0.9_b1=x-y", "optimizer.b1=0.9_b1=x-y_2"]
  for bad in ("optimizer.lr", "=1", "lr=1,,2", "a=1;a=2"):
    with pytest.raises(ValueError, match="--grid"):
      sweep.parse_assignments(bad, "grid")
  with pytest.raises(ValueError, match="Unknown config keys \\['optimizer.lrr'\\]"):
    sweep.check_keys(DEMO, ["optimizer.lrr", "loss.name"])


def _finished(run, **results):
  os.makedirs(run.workdir, exist_ok=True)
  with open(os.path.join(run.workdir, sweep.RESULTS_FILE), "w") as f:
    json.dump(results, f)


def test_tables_mark_the_best_and_list_missing_runs(tmp_path):
  runs = sweep.plan(sweep.parse_assignments("optimizer.lr=1,2,3", "grid"), str(tmp_path))
  _finished(runs[0], step=10, val_accuracy=0.5, val_loss=0.9)
  _finished(runs[1], step=10, val_accuracy=0.75, val_loss=1.2)
  header, rows = sweep.table_rows(runs, {runs[2].name: "failed (exit 1)"},
                                  ["val_accuracy", "val_loss"])
  assert header == ["optimizer.lr", "val_accuracy", "val_loss", "step", "status", "workdir"]
  assert rows[2][:5] == ["3", None, None, None, "failed (exit 1)"]
  csv_path, md_path = sweep.write_tables(str(tmp_path), header, rows, ["val_accuracy",
                                                                      "val_loss"])
  md = open(md_path).read().splitlines()
  assert md[2] == "| 1 | 0.5000 | **0.9000** | 10 | done | lr=1 |"  # Lowest loss.
  assert md[3] == "| 2 | **0.7500** | 1.2000 | 10 | done | lr=2 |"  # Highest accuracy.
  assert md[4] == "| 3 | - | - | - | failed (exit 1) | lr=3 |"
  with open(csv_path) as f:
    assert list(csv.reader(f))[2] == ["2", "0.75", "1.2", "10", "done", "lr=2"]


def test_sweep_runs_only_unfinished_configurations(tmp_path, capsys, monkeypatch):
  """A 2x2 grid where three runs are finished: one real (shortened) demo run."""
  config = tmp_path / "tiny.py"
  config.write_text(
      "import sys\n"
      f"sys.path.insert(0, {os.path.join(REPO, 'tests')!r})\n"
      "from test_train import tiny_demo_config\n"
      "def get_config():\n"
      "  return tiny_demo_config(total_steps=4, eval_every_steps=4, checkpoint_every_steps=4)\n")
  workdir = str(tmp_path / "sweep")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  grid = "optimizer.lr=1e-3,3e-3;loss.name=ce,focal"
  runs = sweep.plan(sweep.parse_assignments(grid, "grid"), workdir)
  for run, acc in zip(runs[:3], (0.2, 0.4, 0.3)):
    _finished(run, step=4, val_accuracy=acc, test_accuracy=acc)
  sweep.sweep(str(config), grid, workdir, "seed=1", dry_run=True)
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 4 and sum(line.startswith("# finished: ") for line in lines) == 3
  assert lines[3].endswith("--config.seed=1 --config.optimizer.lr=3e-3 --config.loss.name=focal")
  assert not os.path.exists(runs[3].workdir)  # A dry run runs nothing.

  sweep.sweep(str(config), grid, workdir, "seed=1")  # Trains through `python -m vit_jax_ft.main`.
  with open(os.path.join(runs[3].workdir, "config.json")) as f:
    ran = json.load(f)
  assert (ran["seed"], ran["optimizer"]["lr"], ran["loss"]["name"]) == (1, 3e-3, "focal")
  assert not os.path.exists(os.path.join(runs[0].workdir, "config.json"))  # Not re-run.
  with open(os.path.join(workdir, "sweep.csv")) as f:
    rows = list(csv.DictReader(f))
  assert [r["status"] for r in rows] == ["done"] * 4
  assert rows[3]["step"] == "4" and 0.0 <= float(rows[3]["test_accuracy"]) <= 1.0
  assert "| **0.4000** |" in open(os.path.join(workdir, "sweep.md")).read()
