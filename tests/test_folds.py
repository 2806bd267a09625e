"""k-fold assignment (data/folds.py), `prepare --folds` and selecting a fold at train time."""

import collections
import csv
import os

import numpy as np
import pytest
import tensorflow as tf

from vit_jax_ft import base_config
from vit_jax_ft import config_ranges
from vit_jax_ft.data import builder
from vit_jax_ft.data import digits
from vit_jax_ft.data import folds
from vit_jax_ft.data import images
from vit_jax_ft.data import sources
from vit_jax_ft.data import tfrecords
from vit_jax_ft.inputs import dataset
from vit_jax_ft.inputs import pipeline


def _counts(assigned, labels, k):
  table = np.zeros((k, max(labels) + 1), int)
  for f, label in zip(assigned, labels):
    table[f, label] += 1
  return table


def test_single_examples_balance_every_class_and_the_totals():
  rng = np.random.default_rng(0)
  labels = rng.choice(4, size=203, p=[0.6, 0.25, 0.1, 0.05]).tolist()
  assigned = folds.assign_folds([[l] for l in labels], [[] for _ in labels], 5, seed=3)
  table = _counts(assigned, labels, 5)
  assert (table.max(axis=0) - table.min(axis=0) <= 1).all()  # Each class spread evenly.
  totals = table.sum(axis=1)
  assert totals.max() - totals.min() <= 1 and totals.sum() == 203


def test_groups_never_split_and_sizes_stay_close():
  rng = np.random.default_rng(1)
  labels, keys = [], []
  for g in range(60):  # 60 lesions of 1-4 images each, one class per lesion.
    label = int(rng.integers(3))
    for _ in range(int(rng.integers(1, 5))):
      labels.append([label])
      keys.append([("lesion", f"L{g}")])
  assigned = folds.assign_folds(labels, keys, 4, seed=0)
  fold_of_group = collections.defaultdict(set)
  for key, f in zip(keys, assigned):
    fold_of_group[key[0]].add(f)
  assert all(len(s) == 1 for s in fold_of_group.values())
  totals = np.bincount(assigned, minlength=4)
  assert totals.max() - totals.min() <= 4  # At most about one group apart.
  table = _counts(assigned, [l[0] for l in labels], 4)
  assert (table > 0).all()


def test_deterministic_order_independent_and_seeded():
  labels = [[i % 3] for i in range(40)]
  keys = [[("g", f"g{i // 2}")] for i in range(40)]
  a = folds.assign_folds(labels, keys, 3, seed=7)
  assert folds.assign_folds(labels, keys, 3, seed=7) == a
  perm = np.random.default_rng(0).permutation(40)
  b = folds.assign_folds([labels[i] for i in perm], [keys[i] for i in perm], 3, seed=7)
  assert [b[list(perm).index(i)] for i in range(40)] == a
  assert any(folds.assign_folds(labels, keys, 3, seed=s) != a for s in (8, 9, 10))


def test_multilabel_stratifies_by_the_rarest_label():
  # Label 0 is on every example; label 2 is rare: its 6 examples go 2 per fold.
  labels = [[0, 2] if i < 6 else [0, 1] if i < 30 else [0] for i in range(60)]
  assert folds.strata(labels)[:6] == [2] * 6 and folds.strata(labels)[10] == 1
  assert folds.strata([[], [1]])[0] == folds.NO_LABEL
  assigned = folds.assign_folds(labels, [[] for _ in labels], 3, seed=0)
  assert np.bincount(assigned[:6], minlength=3).tolist() == [2, 2, 2]
  assert np.bincount(assigned[6:30], minlength=3).tolist() == [8, 8, 8]


def test_too_many_folds_or_too_few_are_errors():
  labels = [[0], [1], [0], [1]]
  keys = [[("g", "a")], [("g", "a")], [("g", "b")], [("g", "c")]]
  with pytest.raises(ValueError, match=r"--folds=4 is more than the 3 group\(s\)"):
    folds.assign_folds(labels, keys, 4, seed=0)
  for k in (1, 0, -2):
    with pytest.raises(ValueError, match="at least 2 folds"):
      folds.assign_folds(labels, keys, k, seed=0)
  with pytest.raises(ValueError, match="--folds must be 0 .* or at least 2, got 1"):
    builder.build(builder.Options(source="x", out_dir="y", folds=1))


def _config(data_dir, fold):
  config = base_config.get_base_config()
  config.data.dir = str(data_dir)
  config.data.fold = fold
  return config


def test_select_fold_reads_fold_k_as_val_and_the_rest_as_train(tmp_path):
  info = digits.prepare_digits(str(tmp_path / "d"), num_folds=3)
  assert folds.num_folds(info) == 3
  entries = info["folds"]["folds"]
  assert sum(e["num_examples"] for e in entries) == info["splits"]["train"]["num_examples"] + \
      info["splits"]["val"]["num_examples"] == 1797 - info["splits"]["test"]["num_examples"]
  seen = {}
  for k in range(3):
    data_dir, fold_info = dataset.load_data_info(_config(tmp_path / "d", k), "unused")
    train_ids = pipeline.split_ids(data_dir, fold_info, "train")
    val_ids = pipeline.split_ids(data_dir, fold_info, "val")
    assert len(val_ids) == entries[k]["num_examples"]
    assert len(train_ids) == fold_info["splits"]["train"]["num_examples"]
    assert not set(train_ids) & set(val_ids)
    assert fold_info["splits"]["train"]["class_counts"] == np.sum(
        [e["class_counts"] for i, e in enumerate(entries) if i != k], axis=0).tolist()
    for i in val_ids:
      seen[i] = seen.get(i, 0) + 1
  assert len(seen) == 1797 - info["splits"]["test"]["num_examples"]
  assert set(seen.values()) == {1}  # Every train+val example is val in exactly one fold.
  # -1 keeps the dataset as written: val is fold 0.
  _, plain = dataset.load_data_info(_config(tmp_path / "d", -1), "unused")
  assert plain["splits"]["val"]["files"] == entries[0]["files"]


def test_fold_errors_name_the_value_and_the_dataset(tmp_path):
  digits.prepare_digits(str(tmp_path / "d"), num_folds=3)
  with pytest.raises(ValueError, match=r"data.fold=3 is out of range: the dataset .*d has 3 "):
    dataset.load_data_info(_config(tmp_path / "d", 3), "unused")
  digits.prepare_digits(str(tmp_path / "plain"))
  with pytest.raises(ValueError, match=r"data.fold=0, but the dataset .*plain was prepared "
                     "without --folds"):
    dataset.load_data_info(_config(tmp_path / "plain", 0), "unused")
  with pytest.raises(ValueError, match=r"config.data.fold=-2 must be an integer >= -1"):
    config_ranges.check_ranges(_config(tmp_path / "d", -2))


def _ids_per_fold(out, info):
  found = {}
  for k, entry in enumerate(info["folds"]["folds"]):
    records = tf.data.TFRecordDataset([os.path.join(out, f) for f in entry["files"]])
    found[k] = [tf.io.parse_single_example(
        r, {"id": tf.io.FixedLenFeature([], tf.string)})["id"].numpy().decode() for r in records]
  return found


def _prepare_ham(table, out, folds_k, image_dir=None):
  return builder.build(builder.Options(
      source=str(table), out_dir=str(out), seed=0, folds=folds_k, num_workers=1,
      image=images.ImageOptions(max_side=32),
      table=sources.TableOptions(image_dir=image_dir, columns=sources.TableColumns(
          id="image_id", label="dx", group="lesion_id"))))


def _check_lesions(table, out, info, k):
  with open(table) as f:
    lesion_of = {r["image_id"]: r["lesion_id"] for r in csv.DictReader(f)}
  folds_of = collections.defaultdict(set)
  ids = _ids_per_fold(str(out), info)
  assert len(ids) == k and all(ids.values())
  for fold, members in ids.items():
    for i in members:
      folds_of[lesion_of[i]].add(fold)
  test_lesions = {lesion_of[i] for i in pipeline.split_ids(str(out), info, "test")}
  assert all(len(s) == 1 for s in folds_of.values())  # Each lesion in exactly one fold...
  assert not test_lesions & set(folds_of)  # ...and none in both a fold and the test split.
  pooled = sum(len(v) for v in ids.values())
  assert pooled + info["splits"]["test"]["num_examples"] == len(lesion_of)
  assert len({i for v in ids.values() for i in v}) == pooled  # Each image written once.
  return ids, lesion_of


def test_ham10000_sample_five_folds_keep_each_lesion_in_one_fold(shared_data, tmp_path):
  folder = os.path.join(shared_data, "ham10000_sample")
  table = os.path.join(folder, "HAM10000_metadata_sample.csv")
  out = tmp_path / "ham"
  info = _prepare_ham(table, out, 5)
  assert info["folds"]["num_folds"] == 5 and info["folds"]["group_column"] == "lesion_id"
  assert "--folds=5" in info["command"]  # The recorded rebuild command keeps the folds.
  _check_lesions(table, out, info, 5)
  # 63 train+val images of 7 classes (9 each): every fold has 1-2 of each class.
  for entry in info["folds"]["folds"]:
    assert min(entry["class_counts"]) >= 1 and max(entry["class_counts"]) <= 2
  assert info["group_leaks"] == {}
  names = tfrecords.dataset_files(str(out))
  assert sum(n.startswith("fold") for n in names) == sum(
      len(e["files"]) for e in info["folds"]["folds"])


def test_ham10000_lesions_of_several_images_stay_in_one_fold(shared_data, tmp_path):
  """The sample has one image per lesion; this copy of its table gives lesions 1-3 images."""
  folder = os.path.join(shared_data, "ham10000_sample")
  with open(os.path.join(folder, "HAM10000_metadata_sample.csv")) as f:
    rows = list(csv.DictReader(f))
  by_class = collections.defaultdict(list)
  for row in rows:
    by_class[row["dx"]].append(row)
  lesion_at = [0, 0, 0, 1, 1, 2]  # Within a class: lesions of 3, 2, 1, 3, 2, 1... images.
  for dx, members in by_class.items():
    for i, row in enumerate(members):
      row["lesion_id"] = f"{dx}_{lesion_at[i % 6] + 3 * (i // 6)}"
  table = tmp_path / "meta.csv"
  with open(table, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  out = tmp_path / "ham"
  info = _prepare_ham(table, out, 5, image_dir=folder)
  ids, lesion_of = _check_lesions(table, out, info, 5)
  assert max(collections.Counter(lesion_of.values()).values()) == 3
  with pytest.raises(ValueError, match=r"--folds=40 is more than the \d+ group"):
    _prepare_ham(table, tmp_path / "too_many", 40, image_dir=folder)
