"""The output folder of a conversion: the file names, where progress goes, the versions recorded, and moving the
finished folder into place (torch-free)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import onnx

import bge_onnx
from bge_onnx.errors import ExportError
from bge_onnx.spec import Precision

MODEL_FILE = "model.onnx"


def versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "bge_onnx": bge_onnx.__version__}
    for name in ("torch", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu", "tokenizers"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def place(staging: Path, out: Path, overwrite: bool) -> None:
    if out.exists():
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        elif overwrite and out.is_dir():
            shutil.rmtree(out)
        else:
            raise ExportError(f"{out} already exists and is not empty; pass overwrite=True (--force) to replace it")
    readable(staging)
    os.replace(staging, out)



def save_graph(model: onnx.ModelProto, path: Path) -> list[str]:
    """Save ``model`` to ``path`` with its weights in the side file ``path.name + ".data"``, which onnxruntime maps
    from disk: the load copies nothing, and processes on one host share the pages (docs/decisions.md section 14).
    Returns the names written. ``model``'s tensors point to the side file afterwards."""
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)  # onnx appends to an existing side file
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name,
              size_threshold=1024)
    return [path.name, data.name]


def readable(folder: Path) -> None:
    """Give every file in ``folder`` the mode a plain open() would (umask applied): onnx creates a side file
    private to its owner (0600), which a container's non-root user could not read."""
    umask = _umask()
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~umask)


def extra_precisions(precisions: Sequence[str]) -> list[Precision]:
    """The variants to add beside fp32, in Precision's order."""
    try:
        return sorted({Precision(p) for p in precisions} - {Precision.FP32}, key=list(Precision).index)
    except ValueError:
        raise ExportError(f"precisions must be among 'fp32', 'int8', 'fp16', got {list(precisions)!r}") from None


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse to write over a non-empty ``out`` unless ``overwrite``, before any work is done."""
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} already exists and is not empty; pass overwrite=True (--force) to replace it")


def make_staging(out: Path) -> Path:
    """A new folder beside ``out`` to write into, moved into place by ``place`` when complete."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    staging.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the model folder should not be
    return staging


def _umask() -> int:
    """This process's umask (reading it means setting it, then back)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask
