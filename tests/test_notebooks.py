"""The notebooks in colabs/ run top to bottom (smoke settings) and are stored without outputs.

Each notebook is executed with nbclient in a kernel of *this* interpreter: a
`python3` kernelspec pointing at sys.executable is written to a temp folder
that JUPYTER_PATH puts first, so a user- or system-wide `python3` kernel from
another Python can never be picked up. The working directory is the repo root
(the notebooks load configs/ from there, as they do on Colab after the clone).
Each notebook's output folder is injected by appending one assignment to its
parameter cell (the second cell).
"""

import glob
import json
import os
import socket
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLABS = os.path.join(REPO, "colabs")
NOTEBOOKS = sorted(glob.glob(os.path.join(COLABS, "*.ipynb")))
CELL_TIMEOUT_S = 300
# Not a Hub repo: nothing can be downloaded for it even where CI has network.
MISSING_HUB_ID = "vit-jax-ft-tests/no-such-model"


def test_all_three_notebooks_exist():
  names = {os.path.basename(p) for p in NOTEBOOKS}
  assert {"finetune_your_data.ipynb", "pretrained_and_attention.ipynb",
          "compare_runs.ipynb"} <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_is_stored_without_outputs(path):
  with open(path, encoding="utf-8") as f:
    nb = json.load(f)
  for i, cell in enumerate(nb["cells"]):
    if cell["cell_type"] == "code":
      assert cell.get("outputs") == [], f"{path}: cell {i} has stored outputs"
      assert cell.get("execution_count") is None, f"{path}: cell {i} has an execution_count"
  assert nb["metadata"]["kernelspec"]["name"] == "python3"


@pytest.fixture
def kernel_env(tmp_path, monkeypatch):
  """A `python3` kernelspec for sys.executable, first on JUPYTER_PATH."""
  spec_dir = tmp_path / "jupyter" / "kernels" / "python3"
  spec_dir.mkdir(parents=True)
  (spec_dir / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "Python 3 (tests)", "language": "python"}))
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
  monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")


def _execute(nb):
  nbclient = pytest.importorskip("nbclient")
  client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                   resources={"metadata": {"path": REPO}})
  client.execute()  # Raises CellExecutionError (with the cell and traceback) on any error.
  return nb


def _read(name, **params):
  nbformat = pytest.importorskip("nbformat")
  nb = nbformat.read(os.path.join(COLABS, name), as_version=4)
  param_cell = nb.cells[1]
  assert param_cell.cell_type == "code" and "SMOKE = True" in param_cell.source
  param_cell.source += "".join(f"\n{k} = {v!r}" for k, v in params.items())
  return nb


def _stdout(nb):
  return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                 for o in c.get("outputs", []) if o.get("name") == "stdout")


def _num_images(nb):
  return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
             for o in c.get("outputs", []))


def test_kernel_is_this_interpreter(kernel_env):
  nbformat = pytest.importorskip("nbformat")
  nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import sys; print(sys.executable)")])
  assert _stdout(_execute(nb)).strip() == sys.executable


def test_finetune_your_data(kernel_env, tmp_path):
  work = str(tmp_path / "work")
  nb = _execute(_read("finetune_your_data.ipynb", WORK_DIR=work))
  prepared, run = os.path.join(work, "prepared"), os.path.join(work, "run")
  assert len(glob.glob(os.path.join(work, "images", "*", "*.png"))) == 60
  assert os.path.exists(os.path.join(prepared, "class_histogram_train.png"))
  assert json.load(open(os.path.join(prepared, "dataset_info.json")))["class_names"] == [
      "blue_disc", "green_checks", "red_stripes"]
  assert json.load(open(os.path.join(run, "eval_results.json")))["step"] == 30
  for f in ("report.md", "confusion_matrix.png", "pr_curves.png"):
    assert os.path.exists(os.path.join(run, "reports", "test_best", f)), f
  assert len(glob.glob(os.path.join(work, "explain", "*.png"))) == 2
  assert _num_images(nb) >= 6  # histogram, samples, confusion matrix, PR curves, 2 overlays


def test_pretrained_and_attention(kernel_env, tmp_path):
  work = str(tmp_path / "work")
  nb = _execute(_read("pretrained_and_attention.ipynb", WORK_DIR=work))
  out = _stdout(nb)
  assert "newly initialised" in out  # The load report.
  run = os.path.join(work, "run")
  assert json.load(open(os.path.join(run, "eval_results.json")))["step"] == 12
  assert os.path.exists(os.path.join(run, "pretrained.json"))
  assert len(glob.glob(os.path.join(work, "explain", "*.png"))) == 2
  assert len(glob.glob(os.path.join(work, "gradcam_*.png"))) == 2  # ResNet Grad-CAM
  try:
    import transformers  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    assert "parity check skipped" in out
  else:
    assert "max |logits ours - transformers|" in out


def test_compare_runs(kernel_env, tmp_path):
  sweep_dir = str(tmp_path / "sweep")
  nb = _execute(_read("compare_runs.ipynb", SWEEP_DIR=sweep_dir))
  runs = sorted(os.path.basename(os.path.dirname(p))
                for p in glob.glob(os.path.join(sweep_dir, "*", "eval_results.json")))
  assert runs == ["lr=1e-3_name=ce", "lr=1e-3_name=focal", "lr=3e-3_name=ce", "lr=3e-3_name=focal"]
  table = open(os.path.join(sweep_dir, "sweep.md")).read()
  assert table.count("| done |") == 4
  assert _num_images(nb) >= 1  # The learning curves.


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_colab_setup_stops_on_placeholder_repo_url(kernel_env, tmp_path, monkeypatch, path):
  """On Colab, an unedited REPO_URL fails at once with what to set, before any git call."""
  if os.path.isdir("/content/vit_jax_ft"):
    pytest.skip("/content/vit_jax_ft exists: the setup cell would install it")
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  fake_bin, git_called = tmp_path / "bin", tmp_path / "git_called"
  fake_bin.mkdir()
  (fake_bin / "git").write_text(f"#!/bin/sh\ntouch {git_called}\nexit 1\n")
  (fake_bin / "git").chmod(0o755)
  monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
  nb = nbformat.read(path, as_version=4)
  params, setup = nb.cells[1], nb.cells[2]
  assert "REPO_URL" in params.source and "IN_COLAB" in setup.source
  fake_colab = nbformat.v4.new_code_cell(
      "import sys, types; sys.modules['google.colab'] = types.ModuleType('google.colab')")
  nb.cells = [fake_colab, params, setup]
  with pytest.raises(nbclient.exceptions.CellExecutionError) as info:
    _execute(nb)
  message = str(info.value)
  assert "ValueError" in message and "Set REPO_URL in the parameter cell" in message, message
  assert "YOUR_ORG" in message  # The value it still holds.
  assert not git_called.exists(), "git ran with the placeholder URL"


def _toy_image_folder(root, per_class=5):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  for i, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
    os.makedirs(os.path.join(root, f"class_{i}"))
    for j in range(per_class):
      Image.new("RGB", (16, 16), tuple(c + 5 * j for c in colour)).save(
          os.path.join(root, f"class_{i}", f"{j}.png"))
  return root


def _closed_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.parametrize("name,offline", [("pretrained_and_attention.ipynb", "HF_HUB_OFFLINE"),
                                          ("finetune_your_data.ipynb", "unreachable")])
def test_real_settings_fail_fast_without_the_hub(kernel_env, tmp_path, monkeypatch, name, offline):
  """SMOKE = False with weights that cannot be fetched: a clear error naming the id, in seconds.

  Offline either by HF_HUB_OFFLINE or by a Hub endpoint nobody listens on (what
  a machine without network sees); never a download, never minutes of retries.
  """
  nbclient = pytest.importorskip("nbclient")
  monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # An empty Hub cache.
  for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_HUB_OFFLINE"):
    monkeypatch.delenv(var, raising=False)
  if offline == "HF_HUB_OFFLINE":
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    expected = "HF_HUB_OFFLINE is set"
  else:
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    expected = "Cannot reach the Hugging Face Hub"
  work = str(tmp_path / "work")
  if name == "pretrained_and_attention.ipynb":
    nb = _read(name, SMOKE=False, HF_MODEL=MISSING_HUB_ID, WORK_DIR=work)
  else:
    images = _toy_image_folder(str(tmp_path / "images"))
    nb = _read(name, SMOKE=False, IMAGE_DIR=images, INIT_FROM=MISSING_HUB_ID, WORK_DIR=work)
  start = time.monotonic()
  with pytest.raises(nbclient.exceptions.CellExecutionError) as info:
    _execute(nb)
  elapsed = time.monotonic() - start
  message = str(info.value)
  assert "SourceUnavailableError" in message and expected in message, message
  assert f"hf download {MISSING_HUB_ID}" in message  # How to get it by hand.
  assert elapsed < 60, f"took {elapsed:.0f} s to give up"
  if name == "finetune_your_data.ipynb":  # It failed before training, after preparing the data.
    assert os.path.exists(os.path.join(work, "prepared", "dataset_info.json"))
    assert not os.path.exists(os.path.join(work, "run"))
