r"""Heat maps of where a run's model looks: `python -m vit_jax_ft.explain --workdir=DIR --out=DIR`.

  python -m vit_jax_ft.explain --workdir=workdirs/isic --images='photos/*.jpg' --out=explain/
  python -m vit_jax_ft.explain --workdir=workdirs/demo --split=test --num_images=8 --out=explain/

ViT: attention rollout (Abnar & Zuidema 2020: heads averaged, the residual
as 0.5 identity, layers multiplied) and the last layer's class-token
attention. ResNet: Grad-CAM on the last stage for the predicted class
(`vit_jax_ft.reports.saliency`). One PNG per image: the model's input
crop, then each map laid over it, titled with the prediction (and the true
label when known). Without --images, the first --num_images examples of
--split are explained.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import re  # pylint: disable=g-import-not-at-top,g-bad-import-order
from typing import Iterator, Optional, Sequence

from absl import app
from absl import flags
from absl import logging
import numpy as np

from vit_jax_ft import cli
from vit_jax_ft import workdir as workdir_lib
from vit_jax_ft.data import images as images_lib
from vit_jax_ft.inputs import image_files
from vit_jax_ft.inputs import normalization
from vit_jax_ft.inputs import pipeline
from vit_jax_ft.reports import plots
from vit_jax_ft.reports import saliency

_BATCH_SIZE = 16
# One item to explain: (name, model input, display image uint8, true label or '').
Item = tuple[str, np.ndarray, np.ndarray, str]


def denormalize(image: np.ndarray, mode: str) -> np.ndarray:
  """Inverse of pipeline.normalize: back to uint8 RGB for display."""
  return normalization.denormalize(image, mode)


def items_from_files(run: workdir_lib.Run, spec: str) -> Iterator[Item]:
  """Files (as predict reads them); unreadable ones are skipped with a warning."""
  preprocess = image_files.make_preprocess(run.config.data)
  options = images_lib.ImageOptions(max_side=image_files.max_side(run.info))
  for path in image_files.list_images(spec):
    image, display, error = image_files.load_image(path, options, preprocess)
    if error:
      logging.warning("Skipping %s: %s", path, error)
      continue
    yield (os.path.splitext(os.path.basename(path))[0], image, display,
           image_files.true_label(path, run.class_names))


def items_from_split(run: workdir_lib.Run, split: str, limit: int) -> Iterator[Item]:
  """The first `limit` examples of `split`, named by their ids."""
  ids = pipeline.split_ids(run.data_dir, run.info, split)
  batches = pipeline.eval_iterator(run.config.data, run.data_dir, run.info, split,
                                         batch_size=min(limit, 64))
  n = 0
  for batch in batches:
    for image, targets, mask in zip(batch["image"], batch["targets"], batch["mask"]):
      if not mask or n >= limit:
        return
      true = ", ".join(run.class_names[c] for c in np.flatnonzero(targets > 0.5))
      yield ids[n], image, denormalize(image, run.config.data.normalization), true
      n += 1


def _caption(probs: np.ndarray, class_names: Sequence[str], true: str, multilabel: bool) -> str:
  top = int(np.argmax(probs))
  caption = f"predicted {class_names[top]} ({probs[top]:.2f})"
  if multilabel:
    caption += " [map for the top label]"
  return caption + (f", true {true}" if true else "")


def _safe(name: str) -> str:
  return re.sub(r"[^\w.-]+", "_", name)[:100] or "image"


def _explain_chunk(run: workdir_lib.Run, checkpoint: workdir_lib.Checkpoint, explainer,
                   chunk: list[Item], out_dir: str, first: int) -> list[str]:
  """Overlays for `chunk`, numbered from `first` (two files may share a name)."""
  images = pipeline.pad_batch({"image": np.stack([item[1] for item in chunk])},
                                    _BATCH_SIZE)["image"]  # One shape: one compilation.
  logits, maps = explainer(checkpoint.variables, images)
  logits = np.asarray(logits)[:len(chunk)]
  maps = {k: np.asarray(v)[:len(chunk)] for k, v in maps.items()}
  probs = 1 / (1 + np.exp(-logits)) if run.multilabel else _softmax(logits)
  size = chunk[0][1].shape[:2]
  heat = {name: saliency.to_image(m, size) for name, m in maps.items()}
  written = []
  for i, (name, _, display, true) in enumerate(chunk):
    path = os.path.join(out_dir, f"{first + i:03d}_{_safe(name)}.png")
    plots.overlays(path, display, {k: v[i] for k, v in heat.items()},
                   f"{name}: {_caption(probs[i], run.class_names, true, run.multilabel)}")
    written.append(path)
  return written


def _softmax(logits: np.ndarray) -> np.ndarray:
  e = np.exp(logits - logits.max(axis=1, keepdims=True))
  return e / e.sum(axis=1, keepdims=True)


def explain(workdir: str, out_dir: str, images: Optional[str] = None,
            checkpoint: str = "best", split: Optional[str] = None,
            num_images: int = 8) -> list[str]:
  """Writes one overlay PNG per image into `out_dir`; returns their paths."""
  run = workdir_lib.load_run(workdir)
  ck = workdir_lib.restore(workdir, checkpoint)
  split = split or run.config.data.test_split or run.config.data.val_split
  items = (items_from_files(run, images) if images
           else items_from_split(run, split, num_images))
  os.makedirs(out_dir, exist_ok=True)
  explainer = saliency.make_explainer(run.model, run.multilabel)
  written, chunk = [], []
  for item in items:
    chunk.append(item)
    if len(chunk) == _BATCH_SIZE:
      written += _explain_chunk(run, ck, explainer, chunk, out_dir, len(written))
      chunk = []
  if chunk:
    written += _explain_chunk(run, ck, explainer, chunk, out_dir, len(written))
  logging.info("Wrote %d explanation images to %s.", len(written), out_dir)
  return written


def define_flags() -> None:
  """Command-line flags (only when run as a program)."""
  flags.DEFINE_string("workdir", None, "Workdir of a training run.", required=True)
  flags.DEFINE_string("out", None, "Folder for the overlay PNGs.", required=True)
  flags.DEFINE_string("images", None, "Image file, folder or glob (comma-separated list); "
                      "default: examples of --split.")
  flags.DEFINE_string("split", None, "Split to take examples from (default: the test split).")
  flags.DEFINE_integer("num_images", 8, "How many examples of --split to explain.")
  flags.DEFINE_string("checkpoint", "best", "'best', 'last' or a step number.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  cli.run_main(lambda: print("\n".join(explain(f.workdir, f.out, f.images, f.checkpoint,
                                               f.split, f.num_images))))


if __name__ == "__main__":
  define_flags()
  app.run(main)
