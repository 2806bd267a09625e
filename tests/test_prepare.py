"""The dataset preparation tool on small images the tests create."""

import csv
import dataclasses
import io
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from vit_jax_ft.data import builder
from vit_jax_ft.data import duplicates
from vit_jax_ft.data import images
from vit_jax_ft.data import sources
from vit_jax_ft.data import splits
from vit_jax_ft.data import tfrecords


# --- helpers -----------------------------------------------------------------

def save(path, image=None, *, color=(200, 30, 30), size=(24, 16), fmt=None, **kwargs):
  """Writes an image (default: a solid RGB JPEG) and returns its path."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  image = image if image is not None else Image.new("RGB", size, color)
  image.save(path, format=fmt, **kwargs)
  return path


def noise_jpeg(size=(64, 48)):
  """A JPEG whose bytes are mostly scan data (so cutting it truncates the pixels)."""
  pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
  return buf.getvalue()


def options(source, out, **kwargs):
  table = {k: kwargs.pop(k) for k in ("image_dir", "multilabel", "label_sep", "columns",
                                      "allow_outside_image_dir") if k in kwargs}
  image = {k: kwargs.pop(k) for k in ("max_side", "image_format", "max_pixels") if k in kwargs}
  return builder.Options(source=str(source), out_dir=str(out),
                         table=sources.TableOptions(**table), image=images.ImageOptions(**image),
                         num_workers=kwargs.pop("num_workers", 1), **kwargs)


def read_split(out, info, split):
  """[(id, labels, decoded RGB array, raw bytes)] of a written split."""
  features = {"image": tf.io.FixedLenFeature([], tf.string),
              "label": tf.io.VarLenFeature(tf.int64), "id": tf.io.FixedLenFeature([], tf.string)}
  files = [os.path.join(out, f) for f in info["splits"][split]["files"]]
  rows = []
  for record in tf.data.TFRecordDataset(files):
    ex = tf.io.parse_single_example(record, features)
    image = tf.io.decode_image(ex["image"], channels=3, expand_animations=False).numpy()
    rows.append((ex["id"].numpy().decode(), tf.sparse.to_dense(ex["label"]).numpy().tolist(),
                 image, ex["image"].numpy()))
  return rows


def class_tree(root, counts, split_dirs=None):
  """root/[split/]class/NNN.jpg with `counts[class]` distinct images per class."""
  n = 0
  for split in split_dirs or [""]:
    for name, count in counts.items():
      for i in range(count):
        n += 1
        # Noise seeded by n: distinct bytes (nearby solid colours can encode identically).
        pixels = np.random.default_rng(n).integers(0, 256, (16, 24, 3), dtype=np.uint8)
        save(os.path.join(root, split, name, f"{i:03d}.jpg"), Image.fromarray(pixels))
  return root


# --- images ------------------------------------------------------------------

def test_bad_files_are_skipped_with_reasons_or_fail(tmp_path):
  src = class_tree(tmp_path / "src", {"cat": 3, "dog": 3})
  good = noise_jpeg()
  (src / "cat" / "truncated.jpg").write_bytes(good[: len(good) // 2])
  (src / "cat" / "empty.jpg").write_bytes(b"")
  (src / "dog" / "notes.jpg").write_bytes(b"this is not an image at all\n" * 10)
  (src / "dog" / "readme.txt").write_text("hello")
  save(src / "dog" / ".ipynb_checkpoints" / "000-checkpoint.jpg")
  (src / "__MACOSX" / "cat").mkdir(parents=True)  # Not a class.
  (src / "__MACOSX" / "cat" / "._000.jpg").write_bytes(b"\x00\x05\x16\x07")
  png = io.BytesIO()
  Image.open(io.BytesIO(good)).save(png, format="PNG")
  png = bytearray(png.getvalue())
  png[len(png) // 2: len(png) // 2 + 40] = b"\xff" * 40  # Garbage inside the pixel data.
  (src / "dog" / "corrupt.png").write_bytes(bytes(png))
  info = builder.build(options(src, tmp_path / "out"))
  reasons = {s["file"]: s["reason"] for s in info["skipped"]}
  assert reasons.keys() == {"cat/truncated.jpg", "cat/empty.jpg", "dog/notes.jpg",
                            "dog/readme.txt", "dog/corrupt.png", "dog/.ipynb_checkpoints/"}
  assert info["class_names"] == ["cat", "dog"]
  assert reasons["dog/corrupt.png"].startswith("corrupt or unsupported image (OSError")
  assert "truncated" in reasons["cat/truncated.jpg"]
  assert reasons["cat/empty.jpg"] == "empty file (0 bytes)"
  assert reasons["dog/notes.jpg"].startswith("not an image")
  assert "extension '.txt'" in reasons["dog/readme.txt"]
  assert sum(s["num_examples"] for s in info["splits"].values()) == 6
  with pytest.raises(ValueError, match=r"4 files cannot be used.*cat/(empty|truncated)\.jpg"):
    builder.build(options(src, tmp_path / "out2", bad_files="fail"))
  assert not os.path.exists(tmp_path / "out2" / tfrecords.INFO_FILE)


def _stored(path, **kwargs):
  result = images.process_image(str(path), images.ImageOptions(**kwargs), encode=True)
  assert result.error is None, result.error
  image = Image.open(io.BytesIO(result.data))
  assert image.mode == "RGB"
  return result, np.asarray(image).astype(int)


def test_grayscale_palette_cmyk_and_16bit_become_rgb(tmp_path):
  _, gray = _stored(save(tmp_path / "g.png", Image.new("L", (8, 8), 100)))
  assert (gray == 100).all()
  palette = Image.new("P", (8, 8), 1)
  palette.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
  _, green = _stored(save(tmp_path / "p.png", palette))
  assert (green == [0, 200, 0]).all()
  result, cyan = _stored(save(tmp_path / "c.jpg", Image.new("CMYK", (8, 8), (255, 0, 0, 0))))
  assert "mode CMYK" in result.conversions
  assert np.abs(cyan - [0, 255, 255]).max() < 8
  sixteen = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
  result, rgb = _stored(save(tmp_path / "d.png", Image.fromarray(sixteen)))
  assert result.mode.startswith("I;16")
  # Scaled to 8 bits (PIL's own convert would clip everything above 255 to white).
  np.testing.assert_allclose(rgb[..., 0], np.round(sixteen / 257.0), atol=1)


def test_alpha_is_composited_on_white(tmp_path):
  rgba = np.zeros((8, 8, 4), np.uint8)
  rgba[:4] = [255, 0, 0, 255]  # Opaque red top half; transparent black bottom half.
  result, rgb = _stored(save(tmp_path / "a.png", Image.fromarray(rgba, "RGBA")))
  assert "mode RGBA" in result.conversions
  assert (rgb[:4] == [255, 0, 0]).all() and (rgb[4:] == 255).all()
  palette = Image.new("P", (8, 8), 0)
  palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
  palette.paste(1, (0, 0, 8, 4))
  _, rgb = _stored(save(tmp_path / "pt.png", palette, transparency=0))
  assert (rgb[:4] == [0, 0, 255]).all() and (rgb[4:] == 255).all()


def test_exif_rotation_is_applied(tmp_path):
  pixels = np.zeros((20, 40, 3), np.uint8)
  pixels[:, :20] = [255, 0, 0]  # Stored: red left half, blue right half.
  pixels[:, 20:] = [0, 0, 255]
  exif = Image.Exif()
  exif[0x0112] = 6  # Display rotated 90 degrees clockwise.
  result, rgb = _stored(save(tmp_path / "r.jpg", Image.fromarray(pixels), exif=exif.tobytes(),
                             quality=95))
  assert "exif orientation 6" in result.conversions
  assert rgb.shape == (40, 20, 3) and result.size == (20, 40)
  assert np.abs(rgb[2, 10] - [255, 0, 0]).max() < 40     # Left half is now on top.
  assert np.abs(rgb[37, 10] - [0, 0, 255]).max() < 40
  # Rotation and shrinking together (the JPEG is decoded at reduced scale first).
  result, rgb = _stored(tmp_path / "r.jpg", max_side=20)
  assert rgb.shape == (20, 10, 3) and result.stored_size == (10, 20)
  assert rgb[1, 5, 0] > 200 and rgb[18, 5, 2] > 200


def test_large_images_shrink_and_fine_jpegs_are_kept_byte_for_byte(tmp_path):
  big = save(tmp_path / "painting.jpg", size=(4000, 3000))
  result, rgb = _stored(big, max_side=100)
  assert rgb.shape == (75, 100, 3) and result.size == (4000, 3000)
  assert result.stored_size == (100, 75) and "resized" in result.conversions
  assert np.abs(rgb - [200, 30, 30]).max() < 10
  small = save(tmp_path / "small.jpg", size=(80, 60))
  result = images.process_image(str(small), images.ImageOptions(max_side=100), encode=True)
  assert result.conversions == () and result.data == small.read_bytes()
  png = save(tmp_path / "lossless.png", size=(30, 20))
  result = images.process_image(str(png), images.ImageOptions(), encode=True)
  assert Image.open(io.BytesIO(result.data)).format == "PNG"  # 'auto' keeps lossless lossless.


def test_written_records_decode_as_rgb_with_labels(tmp_path):
  src = class_tree(tmp_path / "src", {"a": 12, "b": 8})
  save(src / "a" / "gray.png", Image.new("L", (10, 10), 50))
  info = builder.build(options(src, tmp_path / "out", max_side=16))
  rows = [r for s in info["splits"] for r in read_split(tmp_path / "out", info, s)]
  assert len(rows) == 21 and len({r[0] for r in rows}) == 21
  for example_id, labels, image, _ in rows:
    assert labels == [info["class_names"].index(example_id.split("/")[0])]
    assert image.shape[2] == 3 and max(image.shape[:2]) <= 16
  gray = next(r for r in rows if r[0] == "a/gray.png")[2]
  assert (gray == 50).all()
  assert info["conversions"]["mode L"] == 1 and info["conversions"]["resized"] == 20


# --- sources and class lists -------------------------------------------------

def test_class_names_with_spaces_and_split_folders(tmp_path):
  counts = {"basal cell carcinoma": 10, "nevus": 6, "vascular lesion": 4}
  src = class_tree(tmp_path / "src", counts, split_dirs=["Train", "Test"])
  info = builder.build(options(src, tmp_path / "out", val_fraction=0.2))
  assert info["class_names"] == sorted(counts)
  assert info["source"]["given_splits"] == {"test": 20, "train": 20}
  test_ids = {r[0] for r in read_split(tmp_path / "out", info, "test")}
  assert len(test_ids) == 20 and all(i.startswith("Test/") for i in test_ids)
  assert info["splits"]["val"]["num_examples"] == 4  # 20% of Train, stratified.
  assert info["splits"]["val"]["class_counts"] == [2, 1, 1]
  assert info["splits"]["train"]["class_counts"] == [8, 5, 3]


def test_explicit_class_list_sets_order_and_rejects_other_labels(tmp_path):
  src = class_tree(tmp_path / "src", {"cat": 5, "dog": 5})
  info = builder.build(options(src, tmp_path / "out", class_names="dog,cat,bird"))
  assert info["class_names"] == ["dog", "cat", "bird"]
  assert info["splits"]["train"]["class_counts"][2] == 0
  assert info["class_weights"][2] is None
  with pytest.raises(ValueError, match=r"cat/000\.jpg: label 'cat' is not in the class list"):
    builder.build(options(src, tmp_path / "out2", class_names="dog,bird"))
  names_file = tmp_path / "classes.txt"
  names_file.write_text("# one per line\ncat\nwild dog\n\n")
  assert sources.read_class_names(str(names_file)) == ["cat", "wild dog"]
  with pytest.raises(ValueError, match=r"dog/000\.jpg: label 'dog'"):
    builder.build(options(src, tmp_path / "out2", class_names=str(names_file)))
  table = tmp_path / "labels.csv"
  table.write_text("file,label\ncat/000.jpg,cat\ncat/001.jpg,lion\n")
  with pytest.raises(ValueError, match=r"labels.csv line 3 \(cat/001.jpg\): label 'lion'"):
    builder.build(options(table, tmp_path / "out3", image_dir=str(src), class_names="cat,dog"))


def test_multilabel_csv(tmp_path):
  rows = [("x/0.jpg", "red shirt"), ("x/1.jpg", "blue shirt"), ("x/2.jpg", "red"),
          ("x/3.jpg", ""), ("x/4.jpg", "blue jeans")]
  for i, (path, _) in enumerate(rows):
    save(tmp_path / "img" / path, color=(i * 40, 0, 0))
  table = tmp_path / "labels.csv"
  with open(table, "w", newline="") as f:
    csv.writer(f).writerows([("image", "labels")] + rows + [("x/2.jpg", "dress")])
  source = sources.read_table(str(table), sources.TableOptions(
      image_dir=str(tmp_path / "img"), multilabel=True))
  by_id = {r.example_id: r.labels for r in source.records}
  assert source.class_names == ["blue", "dress", "jeans", "red", "shirt"]
  assert by_id == {"x/0.jpg": ("red", "shirt"), "x/1.jpg": ("blue", "shirt"),
                   "x/2.jpg": ("red", "dress"), "x/3.jpg": (), "x/4.jpg": ("blue", "jeans")}
  info = builder.build(options(table, tmp_path / "out", image_dir=str(tmp_path / "img"),
                               multilabel=True, val_fraction=0.2, test_fraction=0.0))
  assert info["multilabel"] is True
  written = {i: l for s in info["splits"] for i, l, _, _ in read_split(tmp_path / "out", info, s)}
  names = info["class_names"]
  assert {i: tuple(sorted(names[k] for k in l)) for i, l in written.items()} == {
      i: tuple(sorted(l)) for i, l in by_id.items()}


def test_json_tables(tmp_path):
  save(tmp_path / "a.jpg")
  save(tmp_path / "b.png", fmt="PNG")
  (tmp_path / "list.json").write_text(
      '[{"image_id": "a", "dx": "nv", "split": "Train"}, {"image_id": "b", "dx": "mel", '
      '"split": "TEST", "extra": 1}]')
  source = sources.read_table(str(tmp_path / "list.json"))
  assert [(r.example_id, r.labels, r.split) for r in source.records] == [
      ("a", ("nv",), "train"), ("b", ("mel",), "test")]
  (tmp_path / "partial.json").write_text(
      '[{"image_id": "a", "dx": "nv"}, {"image_id": "b", "dx": "mel", "split": "test"}]')
  with pytest.raises(ValueError, match=r"partial.json item 0 \(a\): unknown split ''"):
    sources.read_table(str(tmp_path / "partial.json"))
  (tmp_path / "map.json").write_text('{"a.jpg": ["x", "y"], "b.png": ["y"]}')
  source = sources.read_table(str(tmp_path / "map.json"), sources.TableOptions(multilabel=True))
  assert {r.example_id: r.labels for r in source.records} == {"a.jpg": ("x", "y"),
                                                              "b.png": ("y",)}
  (tmp_path / "bad.json").write_text('[{"file": "a.jpg"}]')
  with pytest.raises(ValueError, match="cannot tell which column holds the label"):
    sources.read_table(str(tmp_path / "bad.json"))


def test_single_label_csv_with_conflicting_rows_fails(tmp_path):
  save(tmp_path / "a.jpg")
  table = tmp_path / "t.csv"
  table.write_text("file,label\na.jpg,cat\na.jpg,dog\n")
  with pytest.raises(ValueError, match=r"t.csv line 3 \(a.jpg\).*listed again"):
    sources.read_table(str(table))


def test_missing_files_are_reported_or_fail(tmp_path):
  src = class_tree(tmp_path / "img", {"a": 6, "b": 6})
  lines = [f"{c}/{i:03d}.jpg,{c}" for c in "ab" for i in range(6)] + ["a/gone.jpg,a"]
  table = tmp_path / "labels.csv"
  table.write_text("path,label\n" + "\n".join(lines) + "\n")
  info = builder.build(options(table, tmp_path / "out", image_dir=str(src)))
  assert [(s["file"], s["kind"]) for s in info["skipped"]] == [("a/gone.jpg", "missing")]
  assert "labels.csv line 14" in info["skipped"][0]["reason"]
  with pytest.raises(ValueError, match=r"1 files cannot be used.*a/gone.jpg: missing"):
    builder.build(options(table, tmp_path / "out2", image_dir=str(src), bad_files="fail"))
  with pytest.raises(ValueError, match="none of its 13 files exist.*--image_dir"):
    builder.build(options(table, tmp_path / "out3", image_dir=str(tmp_path)))


def test_metadata_csv_ids_and_groups(tmp_path):
  """HAM10000-like: image_id -> files in nested folders, lesion_id groups."""
  lines, n = ["lesion_id,image_id,dx"], 0
  for lesion in range(30):
    dx = ["nv", "mel", "bkl"][lesion % 3]
    for _ in range(1 + lesion % 3):
      save(tmp_path / "part_1" / dx / f"ISIC_{n:04d}.jpg", color=(n, lesion, 3))
      lines.append(f"HAM_{lesion:04d},ISIC_{n:04d},{dx}")
      n += 1
  (tmp_path / "meta.csv").write_text("\n".join(lines) + "\n")
  info = builder.build(options(tmp_path / "meta.csv", tmp_path / "out", val_fraction=0.2,
                               test_fraction=0.2))
  assert info["source"]["columns"] == {"id": "image_id", "label": "dx", "group": "lesion_id"}
  assert info["class_names"] == ["bkl", "mel", "nv"]
  lesion_of = {f"ISIC_{i:04d}": l.split(",")[0] for i, l in enumerate(lines[1:])}
  split_of = {}
  for split in info["splits"]:
    for example_id, *_ in read_split(tmp_path / "out", info, split):
      split_of.setdefault(lesion_of[example_id], set()).add(split)
  assert len(split_of) == 30 and all(len(s) == 1 for s in split_of.values())
  assert info["group_leaks"] == {}


# --- splits ------------------------------------------------------------------

def test_stratified_split_proportions_and_determinism():
  strata = ["a"] * 100 + ["b"] * 50 + ["c"] * 20
  groups = list(range(len(strata)))
  fractions = {"val": 0.1, "test": 0.1}
  result = splits.stratified_group_split(strata, groups, fractions, seed=3)
  for label, n in (("a", 100), ("b", 50), ("c", 20)):
    got = [s for s, k in zip(result, strata) if k == label]
    assert got.count("val") == n // 10 and got.count("test") == n // 10
  assert splits.stratified_group_split(strata, groups, fractions, seed=3) == result
  assert splits.stratified_group_split(strata, groups, fractions, seed=4) != result
  # The split of an item does not depend on the order items come in.
  order = np.random.default_rng(0).permutation(len(strata))
  shuffled = splits.stratified_group_split([strata[i] for i in order], [groups[i] for i in order],
                                           fractions, seed=3)
  assert all(shuffled[j] == result[i] for j, i in enumerate(order))


def test_group_split_never_leaks():
  rng = np.random.default_rng(1)
  group_of = rng.integers(0, 60, size=300)
  strata = [str(g % 4) for g in group_of]
  for seed in range(5):
    result = splits.stratified_group_split(strata, group_of.tolist(),
                                           {"val": 0.15, "test": 0.15}, seed)
    seen = {}
    for g, s in zip(group_of, result):
      seen.setdefault(g, set()).add(s)
    assert all(len(v) == 1 for v in seen.values())
    assert {"train", "val", "test"} == set(result)


def test_identical_content_joins_groups_and_val_always_exists():
  # Items 0 and 1 share a lesion, 1 and 2 share content: all three stay together.
  keys = [["L1", "h0"], ["L1", "h1"], ["L2", "h1"], ["L3", "h3"]]
  assert splits.connected_groups(keys) == ["'L1'", "'L1'", "'L1'", "'L3'"]
  assert splits.connected_groups(keys[::-1]) == ["'L3'", "'L1'", "'L1'", "'L1'"]
  # Two train examples of which one must become val: a val split always exists.
  planned = splits.plan_splits([[0], [1], [0]], ["train", "train", "test"], [[1], [2], [3]],
                               val_fraction=0.05, test_fraction=0.0, seed=0)
  assert planned[2] == "test" and sorted(planned[:2]) == ["train", "val"]


# --- duplicates --------------------------------------------------------------

def test_duplicate_categories():
  ids = ["a1", "a1copy", "a2", "b2", "a3", "b3", "a4", "a4b", "a4c"]
  hashes = ["h1", "h1", "h2", "h2", "h3", "h3", "h4", "h4", "h4"]
  labels = [["a"], ["a"], ["a"], ["b"], ["a"], ["b"], ["a"], ["a"], ["a"]]
  split_of = ["train", "train", "train", "train", "test", "train", "val", "val", "train"]
  found = duplicates.find_duplicates(ids, hashes, labels, split_of)
  assert found["num_distinct"] == 4 and found["num_groups"] == 4
  # h1: within class; h2: conflict; h3: conflict across splits; h4: 3 pairs, 2 cross.
  assert found["pairs"] == dict(total=6, within_class=4, label_conflict=2, cross_split=3)
  assert found["conflicts_by_labels"] == {"a | b": 2}
  drops = duplicates.files_to_drop(found)
  assert set(drops) == {"a1copy", "a2", "b2", "a3", "b3", "a4b", "a4c"}
  assert drops["a4c"] == "duplicate of a4"  # The val copy is kept, the train copy goes.
  assert drops["a2"].startswith("label conflict")
  with pytest.raises(ValueError, match="6 pairs of byte-identical files.*a1 = a1copy"):
    duplicates.check_policy(found, "fail")


def test_duplicates_end_to_end_report_and_drop(tmp_path):
  src = class_tree(tmp_path / "src", {"cat": 6, "dog": 6}, split_dirs=["train", "test"])
  (src / "train" / "cat" / "000(1).jpg").write_bytes((src / "train" / "cat" / "000.jpg").read_bytes())
  (src / "train" / "dog" / "dupe.jpg").write_bytes((src / "train" / "cat" / "001.jpg").read_bytes())
  (src / "test" / "dog" / "leak.jpg").write_bytes((src / "train" / "dog" / "002.jpg").read_bytes())
  info = builder.build(options(src, tmp_path / "out"))
  assert info["duplicates"]["pairs"] == dict(total=3, within_class=2, label_conflict=1,
                                             cross_split=1)
  # The copies inside train were kept together when val was carved out.
  for group in info["duplicates"]["groups"]:
    if group["files"][0].startswith("train/cat/000"):
      assert len(set(group["splits"])) == 1
  info = builder.build(options(src, tmp_path / "out", duplicates="drop", overwrite=True))
  dropped = {d["file"] for d in info["duplicates"]["dropped"]}
  assert dropped == {"train/cat/000(1).jpg", "train/cat/001.jpg", "train/dog/dupe.jpg",
                     "train/dog/002.jpg"}
  assert sum(s["num_examples"] for s in info["splits"].values()) == 24 + 3 - 4
  assert {s["file"] for s in info["skipped"] if s["kind"] == "duplicate"} == dropped


# --- writing -----------------------------------------------------------------

def test_refuses_to_overwrite_and_leftovers(tmp_path):
  # A crash while writing leaves --out as it was (test_prepare_robustness.py);
  # only a hard kill can leave temporaries behind, and they are refused too.
  src = class_tree(tmp_path / "src", {"a": 10, "b": 10})
  out = tmp_path / "out"
  builder.build(options(src, out))
  with pytest.raises(FileExistsError, match="already holds a prepared dataset.*--overwrite"):
    builder.build(options(src, out))
  tfrecords.remove_dataset(str(out))
  (out / "train-00000-of-00002.tfrecord.tmp").write_bytes(b"half")
  with pytest.raises(FileExistsError, match="leftovers of an interrupted run"):
    builder.build(options(src, out))
  info = builder.build(options(src, out, overwrite=True))
  assert sorted(os.listdir(out)) == sorted(
      [f for s in info["splits"].values() for f in s["files"]] + [tfrecords.INFO_FILE]
      + [f"class_histogram_{s}.png" for s in info["splits"]])


def test_overwrite_removes_only_the_files_the_dataset_lists(tmp_path):
  src = class_tree(tmp_path / "src", {"a": 10, "b": 10})
  out = tmp_path / "out"
  first = builder.build(options(src, out))
  foreign = ["train-00000-of-00009.tfrecord", "mine.tfrecord", "notes.txt"]
  for name in foreign:
    (out / name).write_bytes(b"someone else's")
  info = builder.build(options(src, out, overwrite=True))
  for name in foreign:
    assert (out / name).read_bytes() == b"someone else's", name
  assert info["splits"]["train"]["files"] == first["splits"]["train"]["files"]
  assert tfrecords.dataset_files(str(out)) == sorted(
      [f for s in info["splits"].values() for f in s["files"]] + [tfrecords.INFO_FILE])


def test_info_keys_and_determinism(tmp_path):
  src = class_tree(tmp_path / "src", {"x": 60, "y": 20})  # Enough files for the process pool.
  first = builder.build(options(src, tmp_path / "o1", seed=5, num_shards=2))
  second = builder.build(options(src, tmp_path / "o2", seed=5, num_shards=2, num_workers=2))
  for key in ("class_names", "multilabel", "splits", "class_weights", "image_sizes", "source",
              "options", "duplicates", "skipped", "imbalance_ratio", "histograms"):
    assert key in first
  assert first["splits"] == second["splits"]
  for f in first["splits"]["train"]["files"]:
    assert (tmp_path / "o1" / f).read_bytes() == (tmp_path / "o2" / f).read_bytes()
  counts = first["splits"]["train"]["class_counts"]
  assert first["class_weights"] == pytest.approx([sum(counts) / (2 * c) for c in counts], rel=1e-5)
  assert first["imbalance_ratio"] == pytest.approx(max(counts) / min(counts), rel=1e-3)
  assert os.path.getsize(tmp_path / "o1" / "class_histogram_train.png") > 1000
  assert json.load(open(tmp_path / "o1" / tfrecords.INFO_FILE))["splits"] == first["splits"]


def test_bad_options_name_the_flag(tmp_path):
  src = class_tree(tmp_path / "src", {"a": 2})
  with pytest.raises(ValueError, match="--val_fraction"):
    builder.build(options(src, tmp_path / "o", val_fraction=0.0))
  with pytest.raises(ValueError, match="--duplicates"):
    builder.build(options(src, tmp_path / "o", duplicates="ignore"))
  with pytest.raises(ValueError, match="--out .* is inside the --source folder"):
    builder.build(options(src, src / "prepared"))
  with pytest.raises(FileNotFoundError, match="--source"):
    builder.build(dataclasses.replace(options(src, tmp_path / "o"), source=str(tmp_path / "no")))


def test_command_line_errors_are_one_line(tmp_path):
  src = class_tree(tmp_path / "src", {"a": 2})
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run(
      [sys.executable, "-m", "vit_jax_ft.data.prepare", f"--source={src}", f"--out={tmp_path}/o",
       "--class_names=b"], capture_output=True, text=True, cwd=repo, check=False,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1] == (
      "error: a/000.jpg: label 'a' is not in the class list (1 classes: ['b']).")


# --- cross-validation folds --------------------------------------------------

def _fold_ids(out, info):
  return [[r[0] for r in read_split(out, {"splits": {"f": entry}}, "f")]
          for entry in info["folds"]["folds"]]


def test_folds_pool_train_and_val_and_write_each_image_once(tmp_path):
  src = class_tree(tmp_path / "src", {"a": 12, "b": 6, "c": 4})
  (src / "b" / "copy.jpg").write_bytes((src / "a" / "000.jpg").read_bytes())  # A label conflict.
  out = tmp_path / "out"
  info = builder.build(options(src, out, folds=3, seed=2))
  test_ids = [r[0] for r in read_split(out, info, "test")]
  ids = _fold_ids(out, info)
  pooled = [i for fold in ids for i in fold]
  assert len(pooled) == len(set(pooled)) and not set(pooled) & set(test_ids)
  assert len(pooled) + len(test_ids) == 23
  fold_of = {i: k for k, fold in enumerate(ids) for i in fold}
  # Identical bytes share a fold (or are both in test: None).
  assert fold_of.get("a/000.jpg") == fold_of.get("b/copy.jpg")
  entries = info["folds"]["folds"]
  assert [e["num_examples"] for e in entries] == [len(f) for f in ids]
  assert info["splits"]["val"]["files"] == entries[0]["files"]
  assert info["splits"]["train"]["files"] == entries[1]["files"] + entries[2]["files"]
  assert info["splits"]["train"]["num_examples"] == entries[1]["num_examples"] + \
      entries[2]["num_examples"]
  assert sorted(info["histograms"]) == ["fold0", "fold1", "fold2", "test"]
  # Prepared again without folds (--overwrite): no fold shard is left behind.
  plain = builder.build(options(src, out, overwrite=True))
  assert "folds" not in plain
  assert not [n for n in os.listdir(out) if n.startswith("fold")]


def test_folds_multilabel_stratify_by_the_rarest_label(tmp_path):
  rows = [(f"x/{i}.jpg", "rare common" if i < 6 else "common other" if i % 2 else "common")
          for i in range(30)]
  for i, (path, _) in enumerate(rows):
    pixels = np.random.default_rng(i).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    save(tmp_path / "img" / path, Image.fromarray(pixels))
  table = tmp_path / "labels.csv"
  with open(table, "w", newline="") as f:
    csv.writer(f).writerows([("image", "labels")] + rows)
  out = tmp_path / "out"
  info = builder.build(options(table, out, image_dir=str(tmp_path / "img"), multilabel=True,
                               folds=3, test_fraction=0.0))
  rare = info["class_names"].index("rare")
  assert [e["class_counts"][rare] for e in info["folds"]["folds"]] == [2, 2, 2]


def test_folds_command_line(tmp_path):
  src = class_tree(tmp_path / "src", {"a": 6, "b": 6})
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  run = lambda *flags: subprocess.run(  # pylint: disable=g-long-lambda
      [sys.executable, "-m", "vit_jax_ft.data.prepare", f"--source={src}", *flags],
      capture_output=True, text=True, cwd=repo, check=False,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
  proc = run(f"--out={tmp_path}/bad", "--folds=1")
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1] == (
      "error: --folds must be 0 (no cross-validation) or at least 2, got 1.")
  proc = run(f"--out={tmp_path}/o", "--folds=2", "--test_fraction=0", "--num_workers=1")
  assert proc.returncode == 0, proc.stderr[-2000:]
  info = json.load(open(tmp_path / "o" / tfrecords.INFO_FILE))
  assert info["folds"]["num_folds"] == 2 and "--folds=2" in info["command"]
  assert sum(e["num_examples"] for e in info["folds"]["folds"]) == 12
