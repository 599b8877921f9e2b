"""A checkpoint's tensors as numpy arrays, without torch: safetensors files (one, or shards with an index) and
torch.save's zip pickles, the latter read by an unpickler that builds tensors and plain containers and refuses any
other object (what ``torch.load(weights_only=True)`` allows), so that reading a file never runs its code."""

from __future__ import annotations

import collections
import json
import pickle
import zipfile
from pathlib import Path

import numpy as np

from bge_onnx.errors import ExportError, ModelFilesError

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH_BIN = "pytorch_model.bin"

# safetensors' dtype names; BF16 is read as its 16 high bits of a float32
_SAFETENSORS_TYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64,
                      "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
# torch's storage classes, as the pickle names them
_STORAGE_TYPES = {"FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
                  "BFloat16Storage": np.uint16, "LongStorage": np.int64, "IntStorage": np.int32,
                  "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_}


def _as_float32(array: np.ndarray, bfloat16: bool) -> np.ndarray:
    if bfloat16:
        return (array.astype(np.uint32) << 16).view(np.float32)
    # copy=False: float32 tensors stay views of the mapped file, read when used
    return array.astype(np.float32, copy=False) if np.issubdtype(array.dtype, np.floating) else array


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a .safetensors file (floats as float32), mapped from disk."""
    try:
        with open(path, "rb") as file:
            size = int.from_bytes(file.read(8), "little")
            header = json.loads(file.read(size))
        data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + size) if path.stat().st_size > 8 + size else None
        tensors = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            dtype, shape, (begin, end) = _SAFETENSORS_TYPES[entry["dtype"]], entry["shape"], entry["data_offsets"]
            array = np.frombuffer(data[begin:end], dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)
            tensors[name] = _as_float32(array, entry["dtype"] == "BF16")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ExportError(f"{path} is not a readable safetensors file ({type(err).__name__}: {err})") from err
    return tensors


class _Storage:
    """A storage the pickle refers to: its bytes are read from the zip when a tensor is built on it."""

    def __init__(self, archive: zipfile.ZipFile, prefix: str, key: str, dtype: type) -> None:
        self.archive, self.name, self.dtype = archive, f"{prefix}/data/{key}", dtype
        self._array: np.ndarray | None = None

    def array(self) -> np.ndarray:
        if self._array is None:  # read once, however many tensors are views of it
            self._array = np.frombuffer(self.archive.read(self.name), dtype=np.dtype(self.dtype).newbyteorder("<"))
        return self._array


def _rebuild_tensor(storage: _Storage, offset: int, size: tuple, stride: tuple, *_unused) -> np.ndarray:
    flat = storage.array()
    itemsize = flat.dtype.itemsize
    numbers = [offset, *size, *stride]
    if (not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in numbers)
            or len(size) != len(stride)):
        raise pickle.UnpicklingError(f"refused tensor layout offset {offset!r}, size {size!r}, stride {stride!r}")
    # the last element the view reaches must lie inside the storage: as_strided itself would read past it
    last = offset + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else offset - 1
    if last >= len(flat):
        raise pickle.UnpicklingError(f"a tensor of size {tuple(size)} at offset {offset} reaches past its storage "
                                     f"of {len(flat)} elements")
    if not size:
        return _as_float32(flat[offset:offset + 1].reshape(()), storage.dtype is np.uint16)
    view = np.lib.stride_tricks.as_strided(flat[offset:], shape=size, strides=[s * itemsize for s in stride])
    return _as_float32(np.ascontiguousarray(view), storage.dtype is np.uint16)


def _rebuild_parameter(data: np.ndarray, *_unused) -> np.ndarray:
    return data


class _TensorsOnly(pickle.Unpickler):
    """Builds tensors (as numpy arrays), OrderedDicts and plain values; refuses every other global."""

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str) -> None:
        super().__init__(file)
        self.archive, self.prefix = archive, prefix
        self.storages: dict[tuple[str, type], _Storage] = {}

    def find_class(self, module: str, name: str):
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_TYPES:
            return _STORAGE_TYPES[name]
        raise pickle.UnpicklingError(f"refused global {module}.{name}: only tensors and containers are read")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage" and pid[1] in _STORAGE_TYPES.values()):
            raise pickle.UnpicklingError(f"refused persistent id {pid!r:.80}")
        key = (str(pid[2]), pid[1])
        if key not in self.storages:  # one per key: tensors sharing a storage read it once
            self.storages[key] = _Storage(self.archive, self.prefix, *key)
        return self.storages[key]


def read_torch_pickle(path: Path) -> object:
    """What torch.save wrote to ``path`` (its zip format), with tensors as numpy arrays (floats as float32).

    Raises:
        ExportError: not a torch zip file, or a pickle that names anything beside tensors and containers.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
            if len(pickles) != 1:
                raise ValueError("no data.pkl in the archive (torch's legacy, pre-1.6 format is not read)")
            prefix = pickles[0][: -len("/data.pkl")]
            byteorder = f"{prefix}/byteorder"
            if byteorder in archive.namelist() and archive.read(byteorder).strip() != b"little":
                raise ValueError("big-endian tensors")
            with archive.open(pickles[0]) as file:
                return _TensorsOnly(file, archive, prefix).load()
    except Exception as err:  # zipfile.BadZipFile, UnpicklingError, EOFError, ValueError ...
        raise ExportError(f"{path} could not be read as a weights-only state dict ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''})") from err


def read_linear(path: Path, hidden: int, outputs: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(weight, bias) of a Linear(hidden, outputs) layer's state dict saved with torch.save; ``outputs`` None: any
    width. bge-m3's colbert_linear.pt and sparse_linear.pt are such files."""
    state = read_torch_pickle(path)
    weight = state.get("weight") if isinstance(state, dict) else None
    if not isinstance(weight, np.ndarray):
        raise ExportError(f"{path} must hold a Linear layer's state dict with 'weight' and 'bias', got "
                          f"{type(state).__name__} with keys {sorted(state) if isinstance(state, dict) else []}")
    bias = state.get("bias")
    width = weight.shape[0] if weight.ndim == 2 else -1
    expected = (outputs or width, hidden)
    if weight.shape != expected or not isinstance(bias, np.ndarray) or bias.shape != (expected[0],):
        raise ExportError(
            f"{path} holds weight {weight.shape} and bias {None if bias is None else getattr(bias, 'shape', bias)}; "
            f"this encoder's hidden size is {hidden}, so a weight {expected} and a bias ({expected[0]},) were expected"
        )
    return weight.astype(np.float32), bias.astype(np.float32)


def weight_files(folder: Path) -> list[Path]:
    """The files that hold a checkpoint's weights: model.safetensors, its shards, or pytorch_model.bin."""
    if (folder / SAFETENSORS).is_file():
        return [folder / SAFETENSORS]
    if (folder / SAFETENSORS_INDEX).is_file():
        try:
            index = json.loads((folder / SAFETENSORS_INDEX).read_text(encoding="utf-8"))
            return [folder / name for name in sorted(set(index["weight_map"].values()))]
        except (ValueError, KeyError, TypeError) as err:
            raise ExportError(f"{folder / SAFETENSORS_INDEX} is not a valid shard index: {err}") from err
    if (folder / PYTORCH_BIN).is_file():
        return [folder / PYTORCH_BIN]
    raise ModelFilesError(f"{folder} has no weights: expected {SAFETENSORS}, {SAFETENSORS_INDEX} or {PYTORCH_BIN}")


def unreadable(folder: Path) -> str | None:
    """Why this reader cannot read the checkpoint's weights (so the export traces it with torch), or None."""
    try:
        files = weight_files(folder)
    except (ModelFilesError, ExportError) as err:
        return str(err)
    legacy = [p.name for p in files if p.suffix == ".bin" and not zipfile.is_zipfile(p)]
    return f"{legacy[0]} is in torch's legacy (pre-1.6) format" if legacy else None


def read_checkpoint(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of the checkpoint in ``folder``, by its name in the state dict."""
    tensors: dict[str, np.ndarray] = {}
    for path in weight_files(folder):
        if not path.is_file():
            raise ModelFilesError(f"{path} is missing (named in {SAFETENSORS_INDEX})")
        if path.suffix == ".safetensors":
            tensors.update(read_safetensors(path))
        else:
            state = read_torch_pickle(path)
            if not isinstance(state, dict):
                raise ExportError(f"{path} holds a {type(state).__name__}, not a state dict")
            tensors.update({k: v for k, v in state.items() if isinstance(v, np.ndarray)})
    return tensors
