"""Model folders: reading (sharded) weights, and fetching Hugging Face Hub repos.

A Hub id (`google/vit-base-patch16-224`, `timm/resnet50.a1_in1k`) is
downloaded with `huggingface_hub` into its usual cache. Without network this
fails within seconds (a short TCP probe before any request, and the
`HF_HUB_OFFLINE` setting is honoured) with a message that says what to
download on a connected machine and where to put it.
"""

from __future__ import annotations

import json
import os
import re
import socket
import urllib.parse


from absl import logging

from vit_jax_ft.pretrained import tensor_files

_HUB_ID = re.compile(r"(hf://|hf-hub:)?[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?")

# Files worth fetching from a repo, by preference: safetensors, then pickles.
_CONFIG_FILES = ("config.json", "preprocessor_config.json")
_WEIGHT_FILES = (
    ("model.safetensors", "model.safetensors.index.json"),
    ("pytorch_model.bin", "pytorch_model.bin.index.json"),
    ("open_clip_pytorch_model.bin",),
)


class SourceUnavailableError(ValueError):
  """A Hub id could not be fetched (offline, unknown repo, ...)."""


# A missing path that ends like a checkpoint file is a typo, not a Hub repo.
_FILE_SUFFIXES = (".npz", ".safetensors", ".bin", ".pth", ".pt", ".ckpt", ".h5", ".hdf5",
                  ".json")


def looks_like_hub_id(source: str) -> bool:
  if os.path.exists(source) or source.startswith(("/", ".", "~")):
    return False
  return bool(_HUB_ID.fullmatch(source)) and not source.lower().endswith(_FILE_SUFFIXES)


def read_folder_weights(folder: str) -> tensor_files.TensorFile:
  """All weights of a model folder as one mapping (shards merged)."""
  for single, *index in _WEIGHT_FILES:
    if os.path.isfile(os.path.join(folder, single)):
      return tensor_files.read_tensor_file(os.path.join(folder, single))
    if index and os.path.isfile(os.path.join(folder, index[0])):
      return _read_sharded(folder, index[0])
  raise tensor_files.CheckpointFileError(
      f"No weights in {folder}: expected model.safetensors or pytorch_model.bin (or a sharded "
      f"*.index.json); found {sorted(os.listdir(folder))}")


def _read_sharded(folder: str, index_name: str) -> tensor_files.TensorFile:
  with open(os.path.join(folder, index_name)) as f:
    weight_map = json.load(f)["weight_map"]
  shards = {name: tensor_files.read_tensor_file(os.path.join(folder, name))
            for name in sorted(set(weight_map.values()))}
  shapes = {k: shards[v].shape(k) for k, v in weight_map.items()}
  return tensor_files.TensorFile(folder, shapes, lambda k: shards[weight_map[k]][k])


def download(source: str) -> str:
  """Fetches a Hub repo's config and weights; returns the local folder."""
  repo_id = re.sub(r"^(hf://|hf-hub:)", "", source)
  repo_id, _, revision = repo_id.partition("@")
  revision = revision or None
  try:
    import huggingface_hub  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise SourceUnavailableError(
        f"{source!r} looks like a Hugging Face Hub id, but huggingface_hub is not installed. "
        + _manual_download_help(repo_id)) from e
  try:  # Already in the local cache: no network needed.
    return huggingface_hub.snapshot_download(
        repo_id, revision=revision, local_files_only=True,
        allow_patterns=list(_CONFIG_FILES) + [f for group in _WEIGHT_FILES for f in group]
        + ["*.safetensors", "pytorch_model-*.bin"])
  except Exception:  # pylint: disable=broad-except
    pass
  if _offline():
    raise SourceUnavailableError(
        f"{repo_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set. "
        + _manual_download_help(repo_id))
  _probe_endpoint(repo_id)
  try:
    api = huggingface_hub.HfApi()
    files = set(api.list_repo_files(repo_id, revision=revision))
    patterns = [f for f in _CONFIG_FILES if f in files] + _weight_patterns(files, repo_id)
    logging.info("Downloading %s from the Hugging Face Hub: %s", repo_id, patterns)
    return huggingface_hub.snapshot_download(repo_id, revision=revision,
                                             allow_patterns=patterns, etag_timeout=10)
  except SourceUnavailableError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise SourceUnavailableError(f"Could not download {repo_id!r} from the Hugging Face Hub: "
                                 f"{type(e).__name__}: {e}. " + _manual_download_help(repo_id)
                                 ) from e


def _weight_patterns(files: set[str], repo_id: str) -> list[str]:
  for single, *index in _WEIGHT_FILES:
    if single in files:
      return [single]
    if index and index[0] in files:
      stem = single.rsplit(".", 1)[0]
      return [index[0], f"{stem}-*"]
  raise SourceUnavailableError(f"Hub repo {repo_id!r} has no model.safetensors or "
                               f"pytorch_model.bin; it has {sorted(files)[:20]}")


def _offline() -> bool:
  value = os.environ.get("HF_HUB_OFFLINE", "")
  if value.upper() in ("1", "ON", "YES", "TRUE"):
    return True
  try:
    from huggingface_hub import constants  # pylint: disable=g-import-not-at-top
    return bool(constants.HF_HUB_OFFLINE)
  except ImportError:
    return False


def _probe_endpoint(repo_id: str, timeout: float = 3.0) -> None:
  """Fails fast when the Hub cannot be reached (huggingface_hub retries for minutes)."""
  if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
    return  # Only the proxy knows; let huggingface_hub try.
  endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
  parsed = urllib.parse.urlparse(endpoint)
  port = parsed.port or (443 if parsed.scheme == "https" else 80)
  try:
    socket.create_connection((parsed.hostname, port), timeout=timeout).close()
  except OSError as e:
    raise SourceUnavailableError(
        f"Cannot reach the Hugging Face Hub at {endpoint} to download {repo_id!r} "
        f"({type(e).__name__}: {e}). " + _manual_download_help(repo_id)) from e


def _manual_download_help(repo_id: str) -> str:
  local = repo_id.split("/")[-1]
  return (f"On a machine with internet access run `hf download {repo_id} config.json "
          f"model.safetensors --local-dir {local}` (older huggingface_hub: "
          f"`huggingface-cli download ...`; or download those two files from "
          f"https://huggingface.co/{repo_id}/tree/main), copy the folder here and pass its path "
          f"as the source (e.g. --source=/path/to/{local} or config.init_from).")


