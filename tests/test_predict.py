"""predict: eval-identical preprocessing, unreadable files listed, multi-label thresholds."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from test_evaluate import make_multilabel_workdir  # pylint: disable=g-bad-import-order
from test_evaluate import make_workdir
from test_train import tiny_demo_config
from vit_jax_ft import predict
from vit_jax_ft import workdir as workdir_lib
from vit_jax_ft.inputs import image_files
from vit_jax_ft.inputs import pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _export_split(run, split, out_dir, limit):
  """Writes the split's first `limit` images as files in class folders; returns their ids."""
  spec = {"image": tf.io.FixedLenFeature([], tf.string),
          "label": tf.io.VarLenFeature(tf.int64), "id": tf.io.FixedLenFeature([], tf.string)}
  ids = []
  for shard in pipeline.split_shards(run.data_dir, run.info, split):
    for record in tf.data.TFRecordDataset(shard.path).as_numpy_iterator():
      ex = tf.io.parse_single_example(record, spec)
      name = run.class_names[int(ex["label"].values[0])]
      os.makedirs(os.path.join(out_dir, name), exist_ok=True)
      example_id = ex["id"].numpy().decode()
      with open(os.path.join(out_dir, name, example_id + ".png"), "wb") as f:
        f.write(ex["image"].numpy())
      ids.append(example_id)
      if len(ids) == limit:
        return ids
  return ids


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
  """An untrained tiny ViT (random head: distinct probabilities) on the digits demo data."""
  root = tmp_path_factory.mktemp("predict")
  config = tiny_demo_config(**{"model.head_init": "lecun_normal"})
  workdir = make_workdir(str(root / "run"), config, 10)
  run = workdir_lib.load_run(workdir)  # Prepares WORKDIR/data.
  images = str(root / "images")
  ids = _export_split(run, "test", images, limit=24)
  with open(os.path.join(images, "3", "broken.png"), "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n" + os.urandom(200))  # A PNG signature, then garbage.
  open(os.path.join(images, "empty.jpg"), "wb").close()
  return workdir, images, ids


def test_predict_cli_matches_eval_and_lists_unreadable_files(digits_run, tmp_path):
  workdir, images, ids = digits_run
  out = str(tmp_path / "preds.csv")
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "vit_jax_ft.predict", f"--workdir={workdir}",
         f"--images={images}", f"--out={out}", "--top_k=3"]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  with open(out) as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == len(ids) + 2
  assert list(rows[0]) == ["file", "predicted", "true", "label_1", "prob_1", "label_2",
                           "prob_2", "label_3", "prob_3", "error"]
  bad = {os.path.basename(r["file"]): r for r in rows if r["error"]}
  assert set(bad) == {"broken.png", "empty.jpg"}
  assert "empty file" in bad["empty.jpg"]["error"] and bad["broken.png"]["predicted"] == ""
  assert "unreadable:" in proc.stdout and "broken.png" in proc.stdout
  # The same probabilities as evaluation's pipeline on the same records.
  run = workdir_lib.load_run(workdir)
  preds = workdir_lib.predict_split(run, workdir_lib.restore(workdir, "best"), "test")
  by_id = dict(zip(preds.ids, preds.probs))
  good = [r for r in rows if not r["error"]]
  assert len(good) == len(ids)
  for r in good:
    probs = by_id[os.path.splitext(os.path.basename(r["file"]))[0]]
    order = np.argsort(-probs, kind="stable")
    assert r["predicted"] == r["label_1"] == run.class_names[order[0]]
    assert [r["label_1"], r["label_2"], r["label_3"]] == [run.class_names[c] for c in order[:3]]
    np.testing.assert_allclose([float(r[f"prob_{i}"]) for i in (1, 2, 3)], probs[order[:3]],
                               atol=2e-6)
    assert r["true"] == os.path.basename(os.path.dirname(r["file"]))
  assert os.path.getsize(str(tmp_path / "preds_grid.png")) > 5000


def test_list_images_folders_globs_and_missing_files(tmp_path):
  (tmp_path / "a").mkdir()
  (tmp_path / ".hidden").mkdir()
  for name in ("a/x.jpg", "a/y.PNG", "a/notes.txt", ".hidden/z.jpg", "b.png"):
    (tmp_path / name).write_bytes(b"")
  got = image_files.list_images(f"{tmp_path / 'a'},{tmp_path}/*.png,{tmp_path}/missing.jpg")
  assert [os.path.relpath(p, tmp_path) for p in got] == ["a/x.jpg", "a/y.PNG", "b.png",
                                                         "missing.jpg"]
  with pytest.raises(FileNotFoundError, match="No image files"):
    image_files.list_images(f"{tmp_path}/*.gif")


def test_multilabel_predictions_use_the_tuned_thresholds(tmp_path):
  workdir = make_multilabel_workdir(str(tmp_path))
  run = workdir_lib.load_run(workdir)
  images = tmp_path / "images"
  images.mkdir()
  from PIL import Image  # pylint: disable=g-import-not-at-top
  for i in range(5):
    Image.fromarray(np.full((20, 24, 3), 40 * i, np.uint8)).save(images / f"{i}.png")
  out = str(tmp_path / "ml.csv")
  # Without a report: 0.5 everywhere.
  rows = predict.predict(workdir, str(images), out, top_k=3)
  for row in rows:
    expected = [n for n, p in zip(run.class_names, row.probs) if p >= 0.5]
    assert predict.predicted_labels(row.probs, run.class_names, np.full(3, 0.5)) == expected
  # Thresholds as evaluate saves them: red always, green never, blue at 0.5.
  path = workdir_lib.thresholds_path(workdir, "best")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump({"thresholds": {"red": 0.0, "green": 1.01, "blue": 0.5}}, f)
  predict.predict(workdir, str(images), out, top_k=3)
  with open(out) as f:
    got = list(csv.DictReader(f))
  for row, r in zip(rows, got):
    expected = ["red"] + (["blue"] if row.probs[2] >= 0.5 else [])
    assert r["predicted"].split(";") == expected
