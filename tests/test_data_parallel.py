"""Data parallelism: 4 (fake CPU) devices give the same run as 1; per-process input shards."""

import json
import os
import subprocess
import sys

import numpy as np

from vit_jax_ft.data import digits
from vit_jax_ft.inputs import pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_RUN = """
import json, os, runpy, sys
sys.path.insert(0, {tests!r})
import jax, numpy as np, orbax.checkpoint as ocp
from test_train import tiny_demo_config
from vit_jax_ft.training import train
assert jax.device_count() == {devices}, jax.devices()
results = train.train_and_evaluate(tiny_demo_config(total_steps=6), {workdir!r})
mgr = ocp.CheckpointManager(os.path.join({workdir!r}, "checkpoints"))
state = mgr.restore(mgr.latest_step(), args=ocp.args.StandardRestore())
flat = {{jax.tree_util.keystr(k): np.asarray(v) for k, v in
        jax.tree_util.tree_leaves_with_path(state["params"])}}
np.savez({workdir!r} + "/params.npz", **flat)
print(json.dumps(results))
"""


def _run(devices, workdir):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  code = _RUN.format(tests=os.path.join(REPO, "tests"), devices=devices, workdir=str(workdir))
  out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1]), np.load(f"{workdir}/params.npz")


def test_four_devices_match_one_device(tmp_path):
  one, params_one = _run(1, tmp_path / "one")
  four, params_four = _run(4, tmp_path / "four")
  assert one["step"] == four["step"] == 6
  np.testing.assert_allclose(four["val_loss"], one["val_loss"], rtol=1e-4)
  assert four["val_num_examples"] == one["val_num_examples"] == 180
  for key in params_one.files:
    np.testing.assert_allclose(params_four[key], params_one[key], atol=2e-5, err_msg=key)


def test_process_shards_partition_the_global_batches(tmp_path):
  info = digits.prepare_digits(str(tmp_path))
  import runpy  # pylint: disable=g-import-not-at-top
  cfg = runpy.run_path(os.path.join(REPO, "configs", "demo.py"))["get_config"]().data
  kw = dict(batch_size=8, seed=3, start_step=178)  # Crosses the epoch boundary (1437 / 8).
  whole = pipeline.train_iterator(cfg, str(tmp_path), info, **kw)
  parts = [pipeline.train_iterator(cfg, str(tmp_path), info, process_index=p,
                                         process_count=2, **kw) for p in range(2)]
  for _ in range(3):
    batch = next(whole)
    local = [next(it) for it in parts]
    assert all(b["image"].shape[0] == 4 for b in local)
    # Process p holds global rows p, p+2, p+4, ...
    merged = np.empty_like(batch["targets"])
    merged[0::2], merged[1::2] = local[0]["targets"], local[1]["targets"]
    np.testing.assert_array_equal(merged, batch["targets"])

  counts = []
  for p in range(3):
    batches = list(pipeline.eval_iterator(cfg, str(tmp_path), info, "val", batch_size=48,
                                                process_index=p, process_count=3))
    counts.append((len(batches), sum(b["mask"].sum() for b in batches)))
  assert len({n for n, _ in counts}) == 1  # Same number of batches in every process.
  assert sum(c for _, c in counts) == 180


def test_two_processes_match_one_process(tmp_path):
  # A real multi-process job on one machine: jax.distributed through the
  # environment variables main.py reads (CPU collectives over gloo), one device
  # per process, both writing to one workdir as hosts sharing a filesystem would.
  import socket  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  one, params_one = _run(1, tmp_path / "one")
  workdir = tmp_path / "two"
  code = _RUN.format(tests=os.path.join(REPO, "tests"), devices=2, workdir=str(workdir))
  code = ("import jax\nfrom vit_jax_ft import main\nmain._maybe_initialize_distributed()\n"
          "assert jax.process_count() == 2\n" + code)
  procs = []
  for pid in range(2):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=1",
               JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(pid))
    procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, cwd=REPO,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  try:  # Without working collectives the processes hang: fail instead.
    outs = [p.communicate(timeout=300) for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  two = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
  assert two[0] == two[1]  # Every process gets the global results.
  assert two[0]["step"] == 6 and two[0]["val_num_examples"] == one["val_num_examples"] == 180
  np.testing.assert_allclose(two[0]["val_loss"], one["val_loss"], rtol=1e-4)
  params_two = np.load(f"{workdir}/params.npz")
  for key in params_one.files:
    np.testing.assert_allclose(params_two[key], params_one[key], atol=2e-5, err_msg=key)
