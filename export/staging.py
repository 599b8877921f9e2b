"""The output folder of a conversion: the file names, where progress goes, the versions recorded, and moving the
finished folder into place (torch-free)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import sys
from pathlib import Path

import bge_onnx
from bge_onnx.errors import ExportError

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
    os.replace(staging, out)



# Above this many bytes of weights the graph is saved with its weights in a side file (protobuf's 2 GB cap).
EXTERNAL_DATA_BYTES = 1_500_000_000
