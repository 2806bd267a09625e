"""The preparation tool on hostile input: odd file names, escaping paths, huge images, kills.

Every failure case also checks that --out holds nothing new afterwards: no
shard, no temporary file.
"""

import csv
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
from PIL import Image
from PIL import ImageFile
import pytest
import tensorflow as tf

from vit_jax_ft.data import builder
from vit_jax_ft.data import images
from vit_jax_ft.data import tfrecords

from test_prepare import class_tree  # pylint: disable=g-bad-import-order
from test_prepare import options
from test_prepare import save

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def listing(folder):
  """Everything under `folder` (relative paths, hidden files included); None if absent."""
  if not os.path.isdir(folder):
    return None
  return sorted(os.path.relpath(os.path.join(d, n), folder)
                for d, dirs, files in os.walk(folder) for n in dirs + files)


def prepare(*args, timeout=120):
  """Runs the command-line tool; returns the finished process."""
  return subprocess.run([sys.executable, "-m", "vit_jax_ft.data.prepare", *map(str, args)],
                        capture_output=True, text=True, cwd=REPO, check=False, timeout=timeout,
                        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))


def raw_ids(out, info):
  """The `id` feature of every record of every split, as bytes."""
  files = [os.path.join(out, f) for s in info["splits"].values() for f in s["files"]]
  spec = {"id": tf.io.FixedLenFeature([], tf.string)}
  return [tf.io.parse_single_example(r, spec)["id"].numpy()
          for r in tf.data.TFRecordDataset(files)]


# --- 1. file names that are not UTF-8 ------------------------------------------

def non_utf8_tree(root):
  """Class folders holding an image, a non-image and a class folder whose names are not UTF-8."""
  class_tree(root, {"cat": 4, "dog": 4})
  pixels = np.random.default_rng(99).integers(0, 256, (16, 24, 3), dtype=np.uint8)
  Image.fromarray(pixels).save(os.path.join(os.fsencode(root), b"cat", b"bad\xff.png"))
  with open(os.path.join(os.fsencode(root), b"dog", b"notes\xfe.jpg"), "wb") as f:
    f.write(b"not an image\n")
  os.mkdir(os.path.join(os.fsencode(root), b"c\xffow"))
  for i in range(4):
    pixels = np.random.default_rng(200 + i).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(os.path.join(os.fsencode(root), b"c\xffow", b"%d.jpg" % i))
  return root


def test_non_utf8_file_names_are_stored_losslessly(tmp_path):
  src, out = non_utf8_tree(tmp_path / "src"), tmp_path / "out"
  info = builder.build(options(src, out))
  ids = raw_ids(out, info)
  assert b"cat/bad\xff.png" in ids and b"c\xffow/0.jpg" in ids
  # A class folder's name is a label: text, in its readable form.
  assert info["class_names"] == ["c\\xffow", "cat", "dog"]
  # The reports are valid UTF-8 JSON and name the file readably.
  with open(out / tfrecords.INFO_FILE, encoding="utf-8") as f:
    written = json.load(f)
  reasons = {s["file"]: s["reason"] for s in written["skipped"]}
  assert reasons["dog/notes\\xfe.jpg"].startswith("not an image")
  assert sorted(os.listdir(out)) == sorted(
      [f for s in info["splits"].values() for f in s["files"]] + [tfrecords.INFO_FILE]
      + [f"class_histogram_{s}.png" for s in info["splits"]])


def test_non_utf8_bad_file_fails_by_name_and_writes_nothing(tmp_path):
  src, out = non_utf8_tree(tmp_path / "src"), tmp_path / "out"
  out.mkdir()
  before = listing(out)
  proc = prepare(f"--source={src}", f"--out={out}", "--bad_files=fail")
  assert proc.returncode == 1, proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: 1 files cannot be used (--bad_files=fail): dog/notes\\xfe.jpg: "
                         "not an image"), last
  assert listing(out) == before


# --- no partial output on any error -----------------------------------------

def crash_on_write(monkeypatch, n, exception):
  """Makes the `n`th image conversion of the write pass raise `exception`."""
  real = images.process_image
  calls = []

  def crashing(path, options, encode=False):  # pylint: disable=redefined-outer-name
    calls.append(encode)
    if calls.count(True) == n:
      raise exception
    return real(path, options, encode)

  monkeypatch.setattr(images, "process_image", crashing)


@pytest.mark.parametrize("exception", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_errors_while_writing_leave_out_as_it_was(tmp_path, monkeypatch, exception):
  src = class_tree(tmp_path / "src", {"a": 10, "b": 10})
  fresh, existing = tmp_path / "fresh", tmp_path / "existing"
  first = builder.build(options(src, existing))
  before = {p: (existing / p).read_bytes() for p in listing(existing)}
  # 16 train examples: the train split is complete, val has begun.
  crash_on_write(monkeypatch, 17, exception)
  with pytest.raises(type(exception)):
    builder.build(options(src, fresh))
  assert listing(fresh) is None  # The folder it created is gone again.
  crash_on_write(monkeypatch, 17, exception)
  with pytest.raises(type(exception)):
    builder.build(options(src, existing, overwrite=True))
  # A failed --overwrite keeps the previous dataset whole.
  assert {p: (existing / p).read_bytes() for p in listing(existing)} == before
  assert tfrecords.read_info(str(existing))["splits"] == first["splits"]


# --- 2. table paths outside --image_dir -------------------------------------

def table_with(tmp_path, path, name="labels.csv"):
  """tmp/data/{images, labels.csv} with four good rows and `path` as the last row."""
  data = tmp_path / "data"
  rows = []
  for i in range(4):
    label = "ab"[i % 2]
    pixels = np.random.default_rng(i).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    save(data / "images" / f"{i}.jpg", Image.fromarray(pixels))
    rows.append({"file": f"images/{i}.jpg", "label": label})
  rows.append({"file": path, "label": "a"})
  table = data / name
  if name.endswith(".json"):
    table.write_text(json.dumps(rows))
  else:
    with open(table, "w", newline="") as f:
      writer = csv.DictWriter(f, ["file", "label"])
      writer.writeheader()
      writer.writerows(rows)
  return table


@pytest.mark.parametrize("name,where", [("labels.csv", "labels.csv line 6"),
                                        ("labels.json", "labels.json item 4")])
def test_table_paths_outside_image_dir_are_refused(tmp_path, name, where):
  secret = save(tmp_path / "secret.png", fmt="PNG")
  for path in ("../secret.png", str(secret), "images/../../secret.png"):
    table = table_with(tmp_path, path, name)
    with pytest.raises(ValueError) as e:
      builder.build(options(table, tmp_path / "out", val_fraction=0.3, test_fraction=0))
    message = str(e.value)
    assert message.startswith(f"{where} ({path}): "), message
    assert "outside --image_dir" in message and "--allow_outside_image_dir" in message
    assert "\n" not in message
    assert listing(tmp_path / "out") is None
  info = builder.build(options(table, tmp_path / "out", val_fraction=0.3, test_fraction=0,
                               allow_outside_image_dir=True))
  assert sum(s["num_examples"] for s in info["splits"].values()) == 5


def test_table_ids_outside_image_dir_are_refused(tmp_path):
  save(tmp_path / "secret.png", fmt="PNG")
  images_dir = tmp_path / "data"
  for i in range(4):
    pixels = np.random.default_rng(i).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    save(images_dir / f"img{i}.jpg", Image.fromarray(pixels))
  table = images_dir / "meta.csv"
  table.write_text("image_id,dx\n" + "".join(f"img{i},{'ab'[i % 2]}\n" for i in range(4))
                   + "../secret.png,a\n")
  with pytest.raises(ValueError, match=r"^meta.csv line 6 \(\.\./secret.png\): .*outside "
                                       r"--image_dir"):
    builder.build(options(table, tmp_path / "out", val_fraction=0.3, test_fraction=0))


def test_command_line_outside_image_dir(tmp_path):
  table = table_with(tmp_path, "../secret.png")
  save(tmp_path / "secret.png", fmt="PNG")
  out = tmp_path / "out"
  proc = prepare(f"--source={table}", f"--out={out}", "--val_fraction=0.3", "--test_fraction=0")
  assert proc.returncode == 1
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: labels.csv line 6 (../secret.png): ") and (
      "--allow_outside_image_dir" in last), last
  assert listing(out) is None
  proc = prepare(f"--source={table}", f"--out={out}", "--val_fraction=0.3", "--test_fraction=0",
                 "--allow_outside_image_dir")
  assert proc.returncode == 0, proc.stderr
  assert tfrecords.read_info(str(out))["source"]["num_files"] == 5


# --- 3. decompression bombs -------------------------------------------------

def png_header_only(width, height):
  """A PNG that declares `width` x `height` pixels but holds (almost) none: cheap to make."""
  def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(
        ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
  header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
          + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


@pytest.fixture
def decoded_sizes(monkeypatch):
  """The (width, height) of every image PIL decodes in this process."""
  sizes = []
  real = ImageFile.ImageFile.load

  def load(self):
    sizes.append(self.size)
    return real(self)

  monkeypatch.setattr(ImageFile.ImageFile, "load", load)
  return sizes


def test_images_over_the_pixel_limit_are_skipped_not_decoded(tmp_path, decoded_sizes):
  noise = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
  jpeg = save(tmp_path / "big.jpg", Image.fromarray(noise))
  png = save(tmp_path / "big.png", Image.fromarray(noise))
  limit = images.ImageOptions(max_pixels=10_000)
  for path, hint in ((jpeg, "pass --max_side"), (png, "raise --max_pixels")):
    for encode in (False, True):
      result = images.process_image(str(path), limit, encode=encode)
      assert result.error.startswith("too many pixels: 400x300 = 120000 > --max_pixels=10000"), (
          result.error)
      assert hint in result.error
      assert result.data is None
  assert not decoded_sizes
  # Over PIL's own hard limit (2 * Image.MAX_IMAGE_PIXELS): refused when opened.
  (tmp_path / "bomb.png").write_bytes(png_header_only(20_000, 20_000))
  result = images.process_image(str(tmp_path / "bomb.png"), images.ImageOptions())
  assert result.error.startswith("too many pixels"), result.error
  assert not decoded_sizes


def test_large_jpegs_over_the_limit_are_decoded_at_reduced_scale(tmp_path, decoded_sizes):
  noise = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
  jpeg = save(tmp_path / "big.jpg", Image.fromarray(noise))
  result = images.process_image(str(jpeg), images.ImageOptions(max_pixels=10_000, max_side=80),
                                encode=True)
  assert result.error is None, result.error
  assert Image.open(io.BytesIO(result.data)).size == (80, 60)
  assert decoded_sizes and all(w * h <= 10_000 for w, h in decoded_sizes), decoded_sizes
  # Even 1/8 scale (libjpeg's smallest) is over a tiny limit: skipped.
  result = images.process_image(str(jpeg), images.ImageOptions(max_pixels=1000, max_side=10))
  assert result.error.startswith("too many pixels"), result.error


def test_bad_files_skip_lists_images_over_the_limit(tmp_path):
  src = class_tree(tmp_path / "src", {"a": 5, "b": 5})
  noise = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
  save(src / "a" / "big.png", Image.fromarray(noise))
  info = builder.build(options(src, tmp_path / "out", max_pixels=10_000))
  reasons = {s["file"]: s["reason"] for s in info["skipped"]}
  assert reasons["a/big.png"].startswith("too many pixels: 400x300"), reasons
  with pytest.raises(ValueError, match="a/big.png: too many pixels"):
    builder.build(options(src, tmp_path / "out2", max_pixels=10_000, bad_files="fail"))
  assert listing(tmp_path / "out2") is None


# --- 4. killing prepare -----------------------------------------------------

def children(pid):
  """PIDs of the live child processes of `pid` (Linux /proc)."""
  found = set()
  for task in os.listdir(f"/proc/{pid}/task"):
    try:
      with open(f"/proc/{pid}/task/{task}/children") as f:
        found.update(int(c) for c in f.read().split())
    except OSError:
      pass  # The thread ended meanwhile.
  return found


def alive(pid):
  """Whether `pid` exists and is not a zombie."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rpartition(")")[2].split()[0] != "Z"
  except OSError:
    return False


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="needs Linux /proc")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_killing_prepare_leaves_no_workers_and_no_output(tmp_path, signum):
  # Large, highly compressible PNGs: tiny files that take a while to decode.
  buf = io.BytesIO()
  Image.new("RGB", (3000, 3000), (10, 20, 30)).save(buf, format="PNG")
  (tmp_path / "src" / "a").mkdir(parents=True)
  (tmp_path / "src" / "b").mkdir()
  for i in range(200):
    (tmp_path / "src" / "ab"[i % 2] / f"{i:03d}.png").write_bytes(buf.getvalue())
  out = tmp_path / "out"
  out.mkdir()
  log = open(tmp_path / "log.txt", "w+")  # pylint: disable=consider-using-with
  proc = subprocess.Popen(  # pylint: disable=consider-using-with
      [sys.executable, "-m", "vit_jax_ft.data.prepare", f"--source={tmp_path / 'src'}",
       f"--out={out}", "--num_workers=2", "--log_every=1", "--max_side=64"],
      cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
  try:
    deadline = time.monotonic() + 60
    # Busy: both workers started and results coming back.
    while "Checking: 2/200" not in open(tmp_path / "log.txt").read():
      assert proc.poll() is None and time.monotonic() < deadline, open(tmp_path / "log.txt").read()
      time.sleep(0.05)
    kids = children(proc.pid)
    assert len(kids) >= 2, kids
    proc.send_signal(signum)
    proc.wait(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  deadline = time.monotonic() + 60
  while any(alive(k) for k in kids) and time.monotonic() < deadline:
    time.sleep(0.1)
  survivors = [k for k in kids if alive(k)]
  for k in survivors:
    os.kill(k, signal.SIGKILL)
  assert not survivors, open(tmp_path / "log.txt").read()
  assert proc.returncode != 0
  if signum != signal.SIGKILL:
    # A clean shutdown: its staging folder is gone too, and it says what happened.
    assert listing(out) == [], listing(out)
    assert "stopped by" in open(tmp_path / "log.txt").read().strip().splitlines()[-1]
  else:
    assert not tfrecords.dataset_files(str(out))
    # At most its staging folder is left, and the next run on --out removes it.
    assert all(p.startswith(f".prepare-{proc.pid}-") for p in os.listdir(out)), listing(out)
    builder.remove_stale_staging(str(out))
    assert listing(out) == []
  shutil.rmtree(tmp_path / "src")


def test_stale_staging_folders_of_dead_runs_are_removed(tmp_path):
  gone = subprocess.Popen(["true"])  # pylint: disable=consider-using-with
  gone.wait()
  names = [f".prepare-{gone.pid}-a.tmp", f".prepare-{os.getpid()}-b.tmp", ".prepare-notes.tmp",
           "keep.txt"]
  for name in names[:3]:
    (tmp_path / name).mkdir()
    (tmp_path / name / "x-00000-of-00001.tfrecord").write_bytes(b"partial")
  (tmp_path / "keep.txt").write_text("mine")
  assert builder.remove_stale_staging(str(tmp_path)) == [names[0]]
  # A live run's folder, and anything not named like a staging folder, stay.
  assert sorted(os.listdir(tmp_path)) == sorted(names[1:])
