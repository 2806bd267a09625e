"""The preparation tool on Hugging Face datasets the tests build with `datasets`."""

import collections
import dataclasses
import io
import os
import subprocess
import sys
import time

import numpy as np
from PIL import Image
import pytest

from vit_jax_ft.data import builder
from vit_jax_ft.data import hf_source
from vit_jax_ft.data import sources
from vit_jax_ft.data import tfrecords
from vit_jax_ft.training import train

from test_prepare import class_tree  # pylint: disable=g-bad-import-order
from test_prepare import options
from test_prepare import read_split
from test_train import tiny_demo_config

datasets = pytest.importorskip("datasets")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOT_AN_IMAGE = b"this is not an image at all\n" * 4


@pytest.fixture(autouse=True)
def _quiet_datasets():
  datasets.disable_progress_bars()


def jpeg(n, size=(24, 16)):
  """Distinct JPEG bytes for each `n` (seeded noise)."""
  pixels = np.random.default_rng(n).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
  return buf.getvalue()


def hf_options(source, out, hf=None, **kwargs):
  return dataclasses.replace(options(source, out, **kwargs), hf=hf or hf_source.HfOptions())


def image_cells(start, n, bad=()):
  return [{"bytes": NOT_AN_IMAGE if i in bad else jpeg(start + i), "path": None}
          for i in range(n)]


# --- save_to_disk, ClassLabel + Image ---------------------------------------

ANIMALS = datasets.ClassLabel(names=["zebra", "ant", "cat"])  # Not sorted: the order is kept.


def animal_split(start, n, bad=(), labels=None):
  features = datasets.Features({"image": datasets.Image(), "label": ANIMALS})
  return datasets.Dataset.from_dict(
      {"image": image_cells(start, n, bad),
       "label": labels if labels is not None else [i % 3 for i in range(n)]}, features=features)


def test_save_to_disk_dataset_dict_keeps_class_order_splits_and_reports_bad_cells(tmp_path):
  src = tmp_path / "animals"
  datasets.DatasetDict(train=animal_split(0, 30, bad={3}), validation=animal_split(100, 9),
                       test=animal_split(200, 6)).save_to_disk(str(src))
  assert hf_source.local_layout(str(src)) == "save_to_disk DatasetDict"
  out = tmp_path / "out"
  info = builder.build(hf_options(src, out))
  assert info["class_names"] == ["zebra", "ant", "cat"]
  assert {s: v["num_examples"] for s, v in info["splits"].items()} == dict(
      train=29, val=9, test=6)
  assert info["splits"]["val"]["class_counts"] == [3, 3, 3]
  assert info["source"]["hf_splits"] == {"train": "train", "validation": "val", "test": "test"}
  assert info["source"]["columns"]["image"] == "image"
  assert [(s["file"], s["kind"]) for s in info["skipped"]] == [("train/3", "unreadable")]
  assert info["skipped"][0]["reason"].startswith("not an image")
  rows = read_split(str(out), info, "train")
  assert sorted(int(i.split("/")[1]) for i, *_ in rows) == [i for i in range(30) if i != 3]
  assert all(labels == [int(i.split("/")[1]) % 3] for i, labels, *_ in rows)
  stored = {i: raw for i, _, _, raw in rows}
  assert stored["train/7"] == jpeg(7)  # Fine JPEG cells are stored byte-for-byte.
  assert info["command"].startswith(f"python -m vit_jax_ft.data.prepare --source={src}")
  # Only the dataset is left in --out: the scratch folder of image cells is gone.
  assert sorted(os.listdir(out)) == sorted(tfrecords.dataset_files(str(out)) + [
      f"class_histogram_{s}.png" for s in ("train", "val", "test")])
  with pytest.raises(ValueError, match=r"1 files cannot be used.*train/3: not an image"):
    builder.build(hf_options(src, tmp_path / "out2", bad_files="fail"))
  assert not os.path.exists(tmp_path / "out2")


def test_unlabelled_split_is_an_error_naming_it_and_hf_split_leaves_it_out(tmp_path):
  src = tmp_path / "animals"
  datasets.DatasetDict(train=animal_split(0, 12), test=animal_split(50, 4, labels=[-1] * 4),
                       unsupervised=animal_split(80, 4, labels=[-1] * 4)).save_to_disk(str(src))
  with pytest.raises(ValueError, match=r"split 'unsupervised' is not train, validation or test; "
                     r"choose the splits to read with --hf_split \(it has \['train', 'test', "
                     r"'unsupervised'\]\)"):
    builder.build(hf_options(src, tmp_path / "out"))
  with pytest.raises(ValueError, match=r"test row 0: label -1 in column 'label' is outside its "
                     r"ClassLabel's 3 names \['zebra', 'ant', 'cat'\].*--hf_split"):
    builder.build(hf_options(src, tmp_path / "out", hf_source.HfOptions(hf_split="train,test")))
  info = builder.build(hf_options(src, tmp_path / "out", hf_source.HfOptions(hf_split="train")))
  assert set(info["splits"]) == {"train", "val"}  # Val carved out of the given train.
  assert sum(v["num_examples"] for v in info["splits"].values()) == 12


def test_single_saved_dataset_and_arrow_file(tmp_path):
  animal_split(0, 12).save_to_disk(str(tmp_path / "one"))
  assert hf_source.local_layout(str(tmp_path / "one")) == "save_to_disk Dataset"
  info = builder.build(hf_options(tmp_path / "one", tmp_path / "out"))
  assert sum(v["num_examples"] for v in info["splits"].values()) == 12
  arrow = next(p for p in os.listdir(tmp_path / "one") if p.endswith(".arrow"))
  info = builder.build(hf_options(tmp_path / "one" / arrow, tmp_path / "out2"))
  assert info["class_names"] == ["zebra", "ant", "cat"]
  assert info["source"]["layout"] == "arrow file"


# --- a parquet folder with string labels ----------------------------------------

def write_parquet(path, columns):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  pq.write_table(pa.table(columns), path)


def test_parquet_folder_in_hub_layout_with_string_labels(tmp_path):
  src = tmp_path / "pets"
  labels = ["dog", "cat", "dog", "cat", "cat", "dog"] * 2
  for i in range(2):  # Two shards of train: rows numbered across both, in order.
    write_parquet(src / "data" / f"train-0000{i}-of-00002.parquet",
                  {"img": [jpeg(10 * i + k) for k in range(6)], "label": labels[6 * i:6 * i + 6],
                   "note": ["x"] * 6})
  write_parquet(src / "data" / "valid-00000-of-00001.parquet",
                {"img": [jpeg(100 + k) for k in range(4)], "label": ["cat", "dog"] * 2,
                 "note": ["y"] * 4})
  (src / "README.md").write_text("---\nlicense: mit\n---\n")
  assert hf_source.local_layout(str(src)) == "parquet folder"
  out = tmp_path / "out"
  info = builder.build(hf_options(src, out))
  assert info["class_names"] == ["cat", "dog"]
  assert {s: v["num_examples"] for s, v in info["splits"].items()} == dict(train=12, val=4)
  assert info["source"]["hf_splits"] == {"train": "train", "valid": "val"}
  assert info["source"]["columns"]["image"] == "img"  # The one bytes column.
  rows = {i: (labels_, raw) for i, labels_, _, raw in read_split(str(out), info, "train")}
  assert rows["train/7"] == ([["cat", "dog"].index(labels[7])], jpeg(11))
  # A label outside the class list names its row and the label.
  write_parquet(src / "data" / "valid-00000-of-00001.parquet",
                {"img": [jpeg(100), jpeg(101)], "label": ["cat", "bird"], "note": ["y"] * 2})
  with pytest.raises(ValueError, match=r"valid row 1: label 'bird' is not in the class list"):
    builder.build(hf_options(src, tmp_path / "out2", class_names="cat,dog"))
  assert not os.path.exists(tmp_path / "out2")


def test_parquet_folder_with_two_configurations_needs_hf_config(tmp_path):
  src = tmp_path / "multi"
  for n, config in enumerate(("small", "large")):
    for split in ("train", "test"):
      write_parquet(src / config / f"{split}-00000-of-00001.parquet",
                    {"image": [jpeg(100 * n + k + 10 * (split == "test")) for k in range(6)],
                     "label": [f"{config}_{k % 2}" for k in range(6)]})
  with pytest.raises(ValueError, match=r"split '(train|test)' are in several folders \['large', "
                     r"'small'\].*--hf_config"):
    builder.build(hf_options(src, tmp_path / "out"))
  info = builder.build(hf_options(src, tmp_path / "out", hf_source.HfOptions(hf_config="large")))
  assert info["class_names"] == ["large_0", "large_1"]
  assert {s: v["num_examples"] for s, v in info["splits"].items()} == dict(
      train=5, val=1, test=6)


def test_image_and_label_columns_ambiguous_or_missing_list_the_columns(tmp_path):
  path = tmp_path / "two" / "train-00000-of-00001.parquet"
  write_parquet(path, {"a": [jpeg(k) for k in range(4)], "b": [jpeg(10 + k) for k in range(4)],
                       "kind": ["x", "y"] * 2})
  with pytest.raises(ValueError, match=r"several columns hold images \['a', 'b'\] \(columns "
                     r"\['a', 'b', 'kind'\]\); name one with --image_column"):
    builder.build(hf_options(path.parent, tmp_path / "out"))
  with pytest.raises(ValueError, match=r"cannot tell which column holds the label \(columns "
                     r"\['a', 'b', 'kind'\]\); name it with --label_column"):
    builder.build(hf_options(path.parent, tmp_path / "out", hf_source.HfOptions(image_column="b")))
  info = builder.build(hf_options(path.parent, tmp_path / "out",
                                  hf_source.HfOptions(image_column="b"),
                                  columns=sources.TableColumns(label="kind")))
  assert info["class_names"] == ["x", "y"] and info["source"]["columns"]["image"] == "b"
  with pytest.raises(ValueError, match=r"no column 'c' \(image\); it has \['a', 'b', 'kind'\]"):
    builder.build(hf_options(path.parent, tmp_path / "out3",
                             hf_source.HfOptions(image_column="c")))


def test_image_folders_are_not_hugging_face_sources(tmp_path):
  src = class_tree(tmp_path / "src", {"cat": 2, "dog": 2})
  (src / "cat" / "extra.parquet").write_bytes(b"")  # A stray file does not change the reader.
  assert hf_source.local_layout(str(src)) is None
  (tmp_path / "broken.parquet").write_bytes(b"PAR1 cut short")
  with pytest.raises(ValueError, match=r"broken.parquet: cannot read it as a parquet file"):
    builder.build(options(tmp_path / "broken.parquet", tmp_path / "out"))
  info = builder.build(options(src, tmp_path / "out"))
  assert info["source"]["kind"] == "folder" and info["class_names"] == ["cat", "dog"]
  with pytest.raises(ValueError, match=r"--hf_config.*apply to Hugging Face datasets"):
    builder.build(hf_options(src, tmp_path / "out2", hf_source.HfOptions(hf_split="train")))


def test_without_datasets_installed_only_hugging_face_sources_fail(monkeypatch, tmp_path):
  animal_split(0, 4).save_to_disk(str(tmp_path / "one"))
  monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError.
  src = class_tree(tmp_path / "src", {"cat": 2, "dog": 2})
  assert builder.build(options(src, tmp_path / "out"))["class_names"] == ["cat", "dog"]
  with pytest.raises(ValueError, match=r"needs the `datasets` package: pip install datasets"):
    builder.build(hf_options(tmp_path / "one", tmp_path / "out2"))
  assert not os.path.exists(tmp_path / "out2")


# --- a single parquet with multi-label lists -----------------------------------------

def test_single_parquet_with_label_lists_is_multilabel(tmp_path):
  tags = [["red"], ["round", "red"], [], ["small"], ["round"], ["red", "small"]] * 4
  truncated = jpeg(999, size=(64, 48))
  cells = image_cells(0, len(tags))
  cells[5] = {"bytes": truncated[:len(truncated) // 2], "path": None}
  features = datasets.Features({"image": datasets.Image(),
                                "labels": datasets.List(datasets.Value("string"))})
  path = tmp_path / "tags.parquet"
  datasets.Dataset.from_dict({"image": cells, "labels": tags}, features=features).to_parquet(
      str(path))
  assert hf_source.local_layout(str(path)) == "parquet file"
  out = tmp_path / "out"
  info = builder.build(hf_options(path, out))
  assert info["multilabel"] and info["class_names"] == ["red", "round", "small"]
  assert info["source"]["hf_splits"] == {"tags": None}
  assert {s["file"]: s["kind"] for s in info["skipped"]} == {"tags/5": "unreadable"}
  assert "truncated" in info["skipped"][0]["reason"]
  assert sum(v["num_examples"] for v in info["splits"].values()) == len(tags) - 1
  names = info["class_names"]
  for split in info["splits"]:
    for example_id, labels, *_ in read_split(str(out), info, split):
      assert [names[l] for l in labels] == tags[int(example_id.split("/")[1])]


# --- the Hub, offline ------------------------------------------------------------

def test_hub_id_offline_fails_fast_with_the_command_to_fetch_it(monkeypatch, tmp_path):
  monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  start = time.monotonic()
  with pytest.raises(ValueError, match=r"HF_HUB_OFFLINE.*datasets.load_dataset\("
                     r"'marmal88/skin_cancer'\).save_to_disk\('skin_cancer'\).*"
                     r"--source=/path/to/skin_cancer"):
    builder.build(hf_options("hf:marmal88/skin_cancer", tmp_path / "out"))
  assert time.monotonic() - start < 10
  assert not os.path.exists(tmp_path / "out")


def test_hub_id_fails_fast_when_the_hub_is_unreachable(monkeypatch, tmp_path):
  monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
  monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
  monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False, raising=False)
  for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
    monkeypatch.delenv(proxy, raising=False)
  # Nothing listens on port 9 of loopback: the connection is refused at once.
  monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
  start = time.monotonic()
  with pytest.raises(ValueError, match=r"cannot reach the Hugging Face Hub.*'main'\)"
                     r".save_to_disk\('skin_cancer'\)"):
    builder.build(hf_options("hf:marmal88/skin_cancer", tmp_path / "out",
                             hf_source.HfOptions(hf_config="default", hf_revision="main")))
  assert time.monotonic() - start < 10


def test_command_line_offline_error_is_one_line(tmp_path):
  env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"),
             TF_CPP_MIN_LOG_LEVEL="3")
  proc = subprocess.run([sys.executable, "-m", "vit_jax_ft.data.prepare",
                         "--source=hf:marmal88/skin_cancer", f"--out={tmp_path / 'out'}",
                         "--label_column=dx"], capture_output=True, text=True, env=env,
                        cwd=REPO, check=False)
  assert proc.returncode == 1
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: --source=hf:marmal88/skin_cancer: HF_HUB_OFFLINE") or (
      last.startswith("error: --source=hf:marmal88/skin_cancer: not in the local cache")), last
  assert "save_to_disk('skin_cancer')" in last


# --- a skin-lesion-like parquet, prepared and trained on ------------------------------

def test_skin_lesion_parquet_with_lesion_groups_trains(tmp_path):
  dx, lesion, image_id = [], [], []
  for n in range(36):  # 36 lesions of 1-2 photos each, 3 classes.
    for k in range(1 + n % 2):
      dx.append(("nv", "mel", "bkl")[n % 3])
      lesion.append(f"HAM_{n:07d}")
      image_id.append(f"ISIC_{len(image_id):07d}")
  features = datasets.Features({"image": datasets.Image(), "image_id": datasets.Value("string"),
                                "lesion_id": datasets.Value("string"),
                                "dx": datasets.Value("string")})
  path = tmp_path / "skin.parquet"
  datasets.Dataset.from_dict({"image": image_cells(0, len(dx)), "image_id": image_id,
                              "lesion_id": lesion, "dx": dx}, features=features).to_parquet(
                                  str(path))
  out = tmp_path / "skin_prepared"
  info = builder.build(hf_options(path, out, columns=sources.TableColumns(id="image_id")))
  assert info["class_names"] == ["bkl", "mel", "nv"]
  assert info["source"]["columns"] == dict(image="image", label="dx", group="lesion_id",
                                           id="image_id")
  assert info["group_leaks"] == {}
  splits_of = collections.defaultdict(set)
  lesion_of = dict(zip(image_id, lesion))
  for split in info["splits"]:
    for example_id, *_ in read_split(str(out), info, split):
      splits_of[lesion_of[example_id]].add(split)
  assert len(splits_of) == 36 and all(len(s) == 1 for s in splits_of.values())
  assert set(info["splits"]) == {"train", "val", "test"}
  config = tiny_demo_config(**{
      "data.source": "tfrecord", "data.dir": str(out), "total_steps": 2,
      "optimizer.warmup_steps": 1, "eval_every_steps": 2, "checkpoint_every_steps": 2,
      "log_every_steps": 1,
      "batch_size": 8, "eval_batch_size": 16})
  results = train.train_and_evaluate(config, str(tmp_path / "work"))
  assert results["val_num_examples"] == info["splits"]["val"]["num_examples"]
  assert results["test_num_examples"] == info["splits"]["test"]["num_examples"]
