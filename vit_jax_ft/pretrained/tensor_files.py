"""Reading named tensors from checkpoint files without running code from them.

Every reader returns a `TensorFile`: a read-only mapping from the file's tensor
names to numpy arrays, loaded one tensor at a time where the format allows it
so that converting a checkpoint needs about one copy of it in memory.

* `.safetensors`: parsed here (an 8-byte header length, a JSON header, raw
  little-endian data), so bfloat16 works without torch and truncation is
  detected from the header's offsets.
* `.bin` / `.pth` / `.pt`: PyTorch's zip format. With torch installed,
  `torch.load(weights_only=True)` (torch's own loader that refuses arbitrary
  code); without torch, a restricted unpickler that only knows how to rebuild
  tensors and dicts. Either way a file that asks for anything else is refused.
* `.npz`: `np.load(allow_pickle=False)`; bfloat16 arrays saved by JAX come back
  as 2-byte void arrays and are viewed as `ml_dtypes.bfloat16` (as timm does).
"""

from __future__ import annotations

import collections
import json
import os
import pickle
import struct
import zipfile
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import ml_dtypes
import numpy as np


class CheckpointFileError(ValueError):
  """A checkpoint file is missing, truncated, corrupted or of an unknown kind."""


_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16,
    "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class TensorFile(Mapping):
  """Read-only `name -> np.ndarray` mapping that loads each tensor on access.

  Attributes:
    path: the file (or folder) the tensors come from, for error messages.
    metadata: free-form string metadata stored in the file, if any.
  """

  def __init__(self, path: str, shapes: Mapping[str, tuple[int, ...]],
               load: Callable[[str], np.ndarray], metadata: Mapping[str, Any] | None = None):
    self.path = path
    self._shapes = dict(shapes)
    self._load = load
    self.metadata = dict(metadata or {})

  def __getitem__(self, name: str) -> np.ndarray:
    if name not in self._shapes:
      raise KeyError(name)
    return self._load(name)

  def __iter__(self) -> Iterator[str]:
    return iter(self._shapes)

  def __len__(self) -> int:
    return len(self._shapes)

  def shape(self, name: str) -> tuple[int, ...]:
    """The shape of a tensor without loading it."""
    return self._shapes[name]

  @classmethod
  def from_arrays(cls, path: str, arrays: Mapping[str, np.ndarray],
                  metadata: Mapping[str, Any] | None = None) -> "TensorFile":
    """Wraps tensors that are already in memory."""
    arrays = dict(arrays)
    return cls(path, {k: tuple(np.shape(v)) for k, v in arrays.items()},
               lambda k: np.asarray(arrays[k]), metadata)


def _require_file(path: str) -> int:
  if not os.path.isfile(path):
    raise CheckpointFileError(f"Checkpoint file not found: {path}")
  return os.path.getsize(path)


def read_safetensors(path: str) -> TensorFile:
  """Lazily reads a `.safetensors` file (any dtype, no torch needed)."""
  size = _require_file(path)
  try:
    with open(path, "rb") as f:
      (header_len,) = struct.unpack("<Q", f.read(8))
      if header_len > size - 8:
        raise ValueError(f"header of {header_len} bytes does not fit in {size} bytes")
      header = json.loads(f.read(header_len))
  except (struct.error, ValueError, UnicodeDecodeError) as e:
    raise CheckpointFileError(f"{path} is not a valid safetensors file (truncated or "
                              f"corrupted?): {e}") from e
  metadata = header.pop("__metadata__", None) or {}
  data_start = 8 + header_len
  entries = {}
  for name, info in header.items():
    if info["dtype"] not in _SAFETENSORS_DTYPES:
      raise CheckpointFileError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
    begin, end = info["data_offsets"]
    if data_start + end > size:
      raise CheckpointFileError(
          f"{path} is truncated: tensor {name!r} ends at byte {data_start + end} but the file "
          f"has {size} bytes. Download it again.")
    entries[name] = (np.dtype(_SAFETENSORS_DTYPES[info["dtype"]]), tuple(info["shape"]),
                     data_start + begin, end - begin)

  def load(name: str) -> np.ndarray:
    dtype, shape, offset, nbytes = entries[name]
    # Plain reads rather than a memmap: the converted copy replaces this one
    # right away, and mapped pages would stay resident until the file closes.
    with open(path, "rb") as f:
      f.seek(offset)
      buf = f.read(nbytes)
    if len(buf) != nbytes:
      raise CheckpointFileError(f"{path} is truncated while reading {name!r}.")
    return np.frombuffer(buf, dtype=dtype).reshape(shape)

  return TensorFile(path, {k: v[1] for k, v in entries.items()}, load, metadata)


def _npz_reason(e: Exception) -> str:
  # numpy's own message advises allow_pickle=True, which would let the file run code.
  if "allow_pickle" in str(e) or "pickle" in str(e).lower():
    return "it holds pickled Python objects, not plain arrays, and pickles are never loaded"
  return str(e)


def read_npz(path: str) -> TensorFile:
  """Lazily reads an `.npz` archive (vit_jax / big_vision checkpoints)."""
  _require_file(path)
  try:
    npz = np.load(path, allow_pickle=False)
    shapes = {}
    for name in npz.files:
      # Reading the member header gives the shape without loading the data.
      with npz.zip.open(name + ".npy") as member:
        version = np.lib.format.read_magic(member)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, _, _ = read_header(member)
      shapes[name] = tuple(shape)
  except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
    raise CheckpointFileError(f"{path} is not a readable .npz file (truncated or "
                              f"corrupted?): {_npz_reason(e)}") from e

  def load(name: str) -> np.ndarray:
    try:
      value = npz[name]
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
      raise CheckpointFileError(
          f"{path}: cannot read {name!r} (corrupted?): {_npz_reason(e)}") from e
    if value.dtype.kind == "V" and value.dtype.itemsize == 2:
      value = value.view(ml_dtypes.bfloat16)
    return value

  return TensorFile(path, shapes, load)


def read_torch(path: str) -> TensorFile:
  """Reads a PyTorch state dict (`.bin`, `.pth`, `.pt`) without running its code."""
  _require_file(path)
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    torch = None
  try:
    if torch is not None:
      obj = torch.load(path, map_location="cpu", weights_only=True)
    else:
      obj = _restricted_torch_load(path)
  except CheckpointFileError:
    raise
  except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ...
    raise CheckpointFileError(
        f"Cannot read PyTorch checkpoint {path} (truncated, corrupted, or it holds objects "
        f"other than tensors, which are never unpickled): {type(e).__name__}: {e}") from e
  state = _unwrap_state_dict(obj, path)
  arrays = {k: _to_numpy(v) for k, v in state.items() if _is_tensor_like(v)}
  return TensorFile.from_arrays(path, arrays)


def _unwrap_state_dict(obj: Any, path: str) -> Mapping[str, Any]:
  """Finds the state dict inside common training-checkpoint wrappers."""
  for key in ("state_dict", "model", "model_state_dict", "module"):
    if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
      obj = obj[key]
      break
  if not isinstance(obj, Mapping):
    raise CheckpointFileError(f"{path} does not hold a state dict (got {type(obj).__name__}).")
  prefix = "module."  # Saved from a DataParallel-wrapped model.
  if obj and all(k.startswith(prefix) for k in obj):
    obj = {k[len(prefix):]: v for k, v in obj.items()}
  return obj


def _is_tensor_like(value: Any) -> bool:
  return hasattr(value, "shape") and hasattr(value, "dtype")


def _to_numpy(value: Any) -> np.ndarray:
  if isinstance(value, np.ndarray):
    return value
  # A torch tensor: bfloat16 has no numpy dtype, so go through float32.
  if str(value.dtype) == "torch.bfloat16":
    value = value.float()
  return value.detach().cpu().numpy()


# Storage classes a PyTorch zip file may name, and the numpy dtype of each.
_TORCH_STORAGES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


def _rebuild_tensor(storage, storage_offset, size, stride, *unused_args):
  """Stand-in for torch._utils._rebuild_tensor_v2 on numpy storages."""
  itemsize = storage.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(
      storage[storage_offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride))
  return np.array(view)


def _rebuild_parameter(data, *unused_args):
  return data


class _TensorOnlyUnpickler(pickle.Unpickler):
  """Unpickles a PyTorch state dict, refusing every global but tensors and dicts."""

  def __init__(self, file, zf: zipfile.ZipFile, root: str, path: str):
    super().__init__(file)
    self._zf, self._root, self._path = zf, root, path

  def find_class(self, module: str, name: str):
    if (module, name) == ("collections", "OrderedDict"):
      return collections.OrderedDict
    if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
      return _rebuild_tensor
    if (module, name) == ("torch._utils", "_rebuild_parameter"):
      return _rebuild_parameter
    if module == "torch" and name in _TORCH_STORAGES:
      return np.dtype(_TORCH_STORAGES[name])
    raise CheckpointFileError(
        f"{self._path} asks to unpickle {module}.{name}; only tensors and dicts are read "
        "(install torch to read files it can load with weights_only=True).")

  def persistent_load(self, pid):
    _, dtype, key, _, numel = pid
    data = self._zf.read(f"{self._root}/data/{key}")
    return np.frombuffer(data, dtype=dtype, count=numel)


def _restricted_torch_load(path: str) -> Any:
  """Reads PyTorch's zip serialization with numpy only (no torch, no code)."""
  if not zipfile.is_zipfile(path):
    raise CheckpointFileError(
        f"{path} is not a PyTorch zip checkpoint (legacy pre-1.6 format or corrupted); "
        "install torch to read legacy files.")
  with zipfile.ZipFile(path) as zf:
    pkl = [n for n in zf.namelist() if n.endswith("/data.pkl")]
    if not pkl:
      raise CheckpointFileError(f"{path} has no data.pkl: not a PyTorch checkpoint.")
    root = pkl[0][: -len("/data.pkl")]
    with zf.open(pkl[0]) as f:
      return _TensorOnlyUnpickler(f, zf, root, path).load()


def read_tensor_file(path: str) -> TensorFile:
  """Dispatches on the file extension."""
  ext = os.path.splitext(path)[1].lower()
  if ext == ".safetensors":
    return read_safetensors(path)
  if ext in (".bin", ".pth", ".pt", ".ckpt"):
    return read_torch(path)
  if ext == ".npz":
    return read_npz(path)
  raise CheckpointFileError(f"Unknown checkpoint file type {ext!r}: {path}")


_NUMPY_TO_SAFETENSORS = {np.dtype(v): k for k, v in _SAFETENSORS_DTYPES.items()}


def write_safetensors(path: str, arrays: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
  """Writes a `.safetensors` file (the format `transformers` loads), numpy only."""
  header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
  offset = 0
  arrays = {k: np.asarray(v, order="C") for k, v in arrays.items()}  # keeps 0-d shapes
  for name in sorted(arrays):
    value = arrays[name]
    header[name] = {"dtype": _NUMPY_TO_SAFETENSORS[value.dtype], "shape": list(value.shape),
                    "data_offsets": [offset, offset + value.nbytes]}
    offset += value.nbytes
  encoded = json.dumps(header, separators=(",", ":")).encode()
  encoded += b" " * (-len(encoded) % 8)  # Data starts 8-byte aligned.
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(encoded)))
    f.write(encoded)
    for name in sorted(arrays):
      f.write(arrays[name].tobytes())
  os.replace(tmp, path)
