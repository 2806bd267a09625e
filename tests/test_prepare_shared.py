"""The preparation tool on the real data sets in ../shared/data, and a short run on each result."""

import collections
import csv
import os
import runpy
import subprocess
import sys

import pytest
import tensorflow as tf

from vit_jax_ft.data import builder
from vit_jax_ft.data import images
from vit_jax_ft.data import sources
from vit_jax_ft.data import tfrecords
from vit_jax_ft.training import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARTDL_CLASSES = ("11F(MARY),11H(ANTONY OF PADUA),11H(DOMINIC),11H(FRANCIS),11H(JEROME),"
                 "11H(JOHN THE BAPTIST),11H(PAUL),11H(PETER),11H(SEBASTIAN),11HH(MARY MAGDALENE)")


def short_run(data_dir, workdir, multilabel=False):
  """Three train steps of a tiny ViT on a prepared dataset, then val and test."""
  config = runpy.run_path(os.path.join(REPO, "configs", "demo.py"))["get_config"]()
  config.data.source = "tfrecord"
  config.data.dir = str(data_dir)
  config.data.image_size = 32
  config.total_steps = 3
  config.num_epochs = None
  config.optimizer.warmup_steps = 1
  config.batch_size = 4
  config.eval_batch_size = 32
  config.model.hidden_size = 32
  config.model.mlp_dim = 64
  config.model.num_layers = 1
  config.model.num_heads = 2
  if multilabel:
    config.loss.name = "sigmoid_bce"
    config.best_metric = "macro_f1"
  return train.train_and_evaluate(config, str(workdir))


def ids_per_split(out, info):
  found = {}
  for split, entry in info["splits"].items():
    records = tf.data.TFRecordDataset([os.path.join(out, f) for f in entry["files"]])
    found[split] = [tf.io.parse_single_example(
        r, {"id": tf.io.FixedLenFeature([], tf.string)})["id"].numpy().decode() for r in records]
  return found


def test_isic_duplicates_leaks_and_training(shared_data, tmp_path):
  source = os.path.join(shared_data, "isic_skin_9cls")
  out = tmp_path / "isic"
  # Through the command line, as a user runs it (and with the process pool).
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  proc = subprocess.run([sys.executable, "-m", "vit_jax_ft.data.prepare", f"--source={source}",
                         f"--out={out}", "--val_fraction=0.05", "--num_workers=2"],
                        capture_output=True, text=True, env=env, cwd=REPO, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert ("2359 files, 2200 distinct contents, 159 duplicate pairs: 4 within a class, 155 label "
          "conflicts, 18 across splits") in proc.stderr
  info = tfrecords.read_info(str(out))
  dup = info["duplicates"]
  assert (dup["num_files"], dup["num_distinct"], dup["num_groups"]) == (2359, 2200, 159)
  assert dup["pairs"] == dict(total=159, within_class=4, label_conflict=155, cross_split=18)
  conflicts = collections.Counter(frozenset(l[0] for l in g["labels"])
                                  for g in dup["groups"] if "label_conflict" in g["kinds"])
  assert conflicts == {frozenset({"melanoma", "seborrheic keratosis"}): 78,
                       frozenset({"actinic keratosis", "nevus"}): 77}
  assert dup["conflicts_by_labels"] == {"melanoma | seborrheic keratosis": 78,
                                        "actinic keratosis | nevus": 77}
  within = [g["files"] for g in dup["groups"] if g["kinds"] == ["within_class"]]
  assert sum(any(f.endswith("(1).jpg") for f in files) for files in within) == 2
  assert len(info["class_names"]) == 9 and "basal cell carcinoma" in info["class_names"]
  num = {s: v["num_examples"] for s, v in info["splits"].items()}
  assert num["test"] == info["source"]["given_splits"]["test"]
  assert num["train"] + num["val"] == info["source"]["given_splits"]["train"]
  assert sum(num.values()) == 2359 and 0.04 < num["val"] / (num["train"] + num["val"]) < 0.06
  assert info["conversions"] == {"stored as is": 2359}  # Fine JPEGs, byte-for-byte.
  assert info["skipped"] == []
  ids = ids_per_split(str(out), info)
  assert all(i.startswith("Test/") for i in ids["test"])
  results = short_run(out, tmp_path / "work")
  assert results["test_num_examples"] == num["test"] and results["val_num_examples"] == num["val"]


def test_isic_drop_policy(shared_data, tmp_path):
  info = builder.build(builder.Options(
      source=os.path.join(shared_data, "isic_skin_9cls"), out_dir=str(tmp_path / "o"),
      val_fraction=0.05, duplicates="drop", image=images.ImageOptions(max_side=64)))
  # All 2 x 155 conflicting copies and one of each of the 4 agreeing pairs go.
  assert len(info["duplicates"]["dropped"]) == 314
  assert sum(s["num_examples"] for s in info["splits"].values()) == 2359 - 314
  assert info["conversions"]["resized"] == 2045
  # 78 of the 80 seborrheic keratosis images are also labelled melanoma: 2 remain.
  sk = info["class_names"].index("seborrheic keratosis")
  assert sum(v["class_counts"][sk] for v in info["splits"].values()) == 2


def test_ham10000_metadata_lesion_groups(shared_data, tmp_path):
  folder = os.path.join(shared_data, "ham10000_sample")
  table = os.path.join(folder, "HAM10000_metadata_sample.csv")
  out = tmp_path / "ham"
  info = builder.build(builder.Options(
      source=table, out_dir=str(out), seed=1, image=images.ImageOptions(max_side=64),
      table=sources.TableOptions(columns=sources.TableColumns(
          id="image_id", label="dx", group="lesion_id"))))
  assert info["class_names"] == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
  assert {s: v["num_examples"] for s, v in info["splits"].items()} == dict(
      train=56, val=7, test=7)
  assert info["splits"]["train"]["class_counts"] == [8] * 7
  assert info["image_sizes"]["original"]["width"]["max"] == 600
  assert info["image_sizes"]["stored"]["width"]["max"] == 64
  with open(table) as f:
    lesion_of = {r["image_id"]: r["lesion_id"] for r in csv.DictReader(f)}
  splits_of = collections.defaultdict(set)
  for split, ids in ids_per_split(str(out), info).items():
    for i in ids:
      splits_of[lesion_of[i]].add(split)
  assert len(splits_of) == len(set(lesion_of.values()))
  assert all(len(s) == 1 for s in splits_of.values())  # No lesion in two splits.
  assert info["group_leaks"] == {}
  short_run(out, tmp_path / "work")


def test_artdl_csv_with_given_splits(shared_data, tmp_path):
  out = tmp_path / "artdl"
  info = builder.build(builder.Options(
      source=os.path.join(shared_data, "artdl_sample", "labels.csv"), out_dir=str(out),
      class_names=ARTDL_CLASSES, image=images.ImageOptions(max_side=64)))
  assert info["source"]["columns"] == {"path": "file", "label": "iconclass", "split": "split"}
  assert len(info["class_names"]) == 10
  total = [sum(c) for c in zip(*(v["class_counts"] for v in info["splits"].values()))]
  empty = [n for n, c in zip(info["class_names"], total) if c == 0]
  assert empty == ["11H(ANTONY OF PADUA)", "11H(SEBASTIAN)"]  # Absent from the sample.
  assert info["source"]["given_splits"] == {"test": 45, "train": 5}
  # The given test split is kept; val (which the train loop needs) comes out of train.
  assert {s: v["num_examples"] for s, v in info["splits"].items()} == dict(train=4, val=1, test=45)
  assert info["image_sizes"]["original"]["height"]["max"] == 3920
  assert info["conversions"]["resized"] == 50
  short_run(out, tmp_path / "work")


def test_fashion_multilabel(shared_data, tmp_path):
  folder = os.path.join(shared_data, "fashion_multilabel")
  out = tmp_path / "fashion"
  opts = builder.Options(
      source=os.path.join(folder, "labels.csv"), out_dir=str(out),
      table=sources.TableOptions(image_dir=os.path.join(folder, "images"), multilabel=True),
      image=images.ImageOptions(max_side=32))
  info = builder.build(opts)
  assert info["multilabel"] is True
  assert info["class_names"] == ["black", "blue", "dress", "jeans", "red", "shirt"]
  assert sum(v["num_examples"] for v in info["splits"].values()) == 2160
  # The table lists only the 2,160 files present (the 7 missing ones of the
  # original set are not in it), so nothing is missing here.
  assert info["skipped"] == []
  totals = [sum(c) for c in zip(*(v["class_counts"] for v in info["splits"].values()))]
  assert totals == [344, 1108, 765, 699, 708, 696]
  assert info["duplicates"]["pairs"] == dict(total=90, within_class=90, label_conflict=0,
                                             cross_split=0)
  results = short_run(out, tmp_path / "work", multilabel=True)
  assert "test_macro_f1" in results
  # Rows naming files that are not there: listed with the row, or an error by policy.
  with open(os.path.join(folder, "labels.csv")) as f:
    rows = f.read() + "".join(f"black_jeans/lost_{i}.jpg,black jeans\n" for i in range(7))
  table = tmp_path / "labels_with_missing.csv"
  table.write_text(rows)
  fail = builder.Options(source=str(table), out_dir=str(tmp_path / "o2"), table=opts.table,
                         bad_files="fail")
  with pytest.raises(ValueError, match=r"7 files cannot be used.*lost_0.jpg: missing: listed "
                                       r"in labels_with_missing.csv line 2162"):
    builder.build(fail)
