"""The workdir's owner: one run at a time (lock), and no silent resume under another recipe."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from test_train import tiny_demo_config  # pylint: disable=g-bad-import-order
from vit_jax_ft import workdir as workdir_lib
from vit_jax_ft.training import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _listing(path, skip=()):
  return sorted(p for p in (os.path.relpath(os.path.join(root, f), path)
                            for root, _, files in os.walk(path) for f in files) if p not in skip)


def test_a_second_lock_on_a_workdir_is_refused_with_the_holder(tmp_path):
  with workdir_lib.lock(str(tmp_path)):
    with pytest.raises(workdir_lib.WorkdirBusyError, match=rf"in use by pid {os.getpid()} on"):
      with workdir_lib.lock(str(tmp_path)):
        pass
  with workdir_lib.lock(str(tmp_path)):  # Released: taken again.
    pass


def _hold_lock(workdir):
  code = ("import sys, time\nfrom vit_jax_ft import workdir\n"
          f"with workdir.lock({workdir!r}):\n  print('locked', flush=True)\n  time.sleep(120)\n")
  proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                          cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO))
  assert proc.stdout.readline().strip() == "locked"
  return proc


def test_a_second_training_run_stops_in_one_line_and_a_killed_holder_frees_the_workdir(tmp_path):
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  holder = _hold_lock(workdir)
  try:
    out = subprocess.run(
        [sys.executable, "-m", "vit_jax_ft.main", "--config=configs/demo.py",
         f"--workdir={workdir}", "--config.total_steps=2", "--config.num_epochs=None"],
        capture_output=True, text=True, timeout=300, cwd=REPO,
        env=dict(os.environ, PYTHONPATH=REPO))
    assert out.returncode != 0
    assert f"is in use by pid {holder.pid}" in out.stderr.strip().splitlines()[-1]
    assert "Traceback" not in out.stderr
    assert _listing(workdir) == [workdir_lib.LOCK_FILE]  # The second run wrote nothing.
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
  # The kill released the lock: a stale lock file is taken over.
  with workdir_lib.lock(workdir):
    pass


def test_resume_under_another_recipe_is_refused_and_changes_nothing(tmp_path):
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(tiny_demo_config(total_steps=4), workdir)
  with open(os.path.join(workdir, "config.json")) as f:
    recorded = f.read()
  before = {p: os.path.getmtime(os.path.join(workdir, p))
            for p in _listing(workdir, skip=[workdir_lib.LOCK_FILE])}

  changed = tiny_demo_config(total_steps=4, **{"optimizer.lr": 5e-3, "seed": 3})
  with pytest.raises(ValueError, match=r"step 4 .*optimizer\.lr, seed differ.*"
                                       r"optimizer\.lr: 0\.001 -> 0\.005.*resume_with_changes"):
    train.train_and_evaluate(changed, workdir)
  with open(os.path.join(workdir, "config.json")) as f:
    assert f.read() == recorded
  assert {p: os.path.getmtime(os.path.join(workdir, p))
          for p in _listing(workdir, skip=[workdir_lib.LOCK_FILE])} == before


def test_extending_a_run_is_allowed_and_recorded_changes_need_the_flag(tmp_path):
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(tiny_demo_config(total_steps=4), workdir)
  results = train.train_and_evaluate(tiny_demo_config(total_steps=6), workdir)
  assert results["step"] == 6
  # Extending is logged in the history too, and needs no flag.

  changed = tiny_demo_config(total_steps=8, resume_with_changes=True,
                             **{"optimizer.weight_decay": 0.0})
  assert train.train_and_evaluate(changed, workdir)["step"] == 8
  with open(os.path.join(workdir, workdir_lib.CONFIG_HISTORY_FILE)) as f:
    history = [json.loads(line) for line in f]
  assert [h["step"] for h in history] == [4, 6]
  assert history[0]["changes"] == {"total_steps": [4, 6]}
  assert history[-1]["changes"]["optimizer.weight_decay"] == [0.05, 0.0]
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["optimizer"]["weight_decay"] == 0.0


def test_config_changes_ignores_fields_an_older_config_lacks(tmp_path):
  config = tiny_demo_config()
  with open(tmp_path / "config.json", "w") as f:
    recorded = json.loads(config.to_json_best_effort())
    del recorded["optimizer"]["lr"]  # As if written before the field existed.
    recorded["seed"] = 7
    json.dump(recorded, f)
  assert workdir_lib.config_changes(config, str(tmp_path)) == {"seed": (7, config.seed)}


def test_a_run_recorded_before_newer_fields_still_evaluates(tmp_path):
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(tiny_demo_config(total_steps=4), workdir)
  path = os.path.join(workdir, "config.json")
  with open(path) as f:
    recorded = json.load(f)
  want = workdir_lib.predict_split(workdir_lib.load_run(workdir),
                                   workdir_lib.restore(workdir, "last"), "test").probs
  # As written by a version without stochastic depth, EMA or probe settings.
  del recorded["model"]["drop_path_rate"], recorded["ema_decay"], recorded["probe"]
  with open(path, "w") as f:
    json.dump(recorded, f)
  config = workdir_lib.load_config(workdir)
  assert config.model.drop_path_rate == 0.0 and config.ema_decay == 0.0
  assert config.probe.flip is False
  assert config.optimizer.lr == recorded["optimizer"]["lr"]  # Recorded values kept.
  got = workdir_lib.predict_split(workdir_lib.load_run(workdir),
                                  workdir_lib.restore(workdir, "last"), "test").probs
  np.testing.assert_array_equal(got, want)
