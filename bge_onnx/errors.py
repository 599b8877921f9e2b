"""Every exception bge_onnx raises, under one base class (and the stacklevel helper its warnings use, and the pip line
for a missing extra).

Each subclass also inherits the builtin it refines, so ``except FileNotFoundError``,
``except TypeError`` and ``except ValueError`` keep working for callers who do not know us.

    BgeOnnxError
    ├── ModelFilesError      (FileNotFoundError)  a model file is missing
    ├── ModelIntegrityError  (ValueError)         a file is corrupt, altered or inconsistent
    ├── WrongTaskError       (ValueError)         an embedding folder given to Reranker, or the reverse
    ├── InputError           (ValueError)         a bad text, pair or option
    │   └── InputTypeError   (InputError, TypeError)  an input of the wrong type
    ├── ConfigError          (ValueError)         a bad setting of the process: flag, environment variable, server
    │                                             option (the operator's to fix, not a request's: a 500, not a 400)
    ├── ProviderError        (RuntimeError)       the requested execution provider cannot be used
    ├── PushError            (OSError)            the hub refused an upload or cannot be reached
    ├── MissingExtraError    (ImportError)        an adapter's package is not installed (the message: the pip line)
    └── ExportError          (RuntimeError)       export failed (bge_onnx_export only)
        └── ParityError                            the exported graph does not match PyTorch
"""

from __future__ import annotations

import sys


class BgeOnnxError(Exception):
    """Base class of every error raised by bge_onnx and bge_onnx_export."""


class ModelFilesError(BgeOnnxError, FileNotFoundError):
    """A model folder or one of its files is missing."""


class ModelIntegrityError(BgeOnnxError, ValueError):
    """A model file exists but is corrupt, altered since export, or inconsistent with the manifest."""


class WrongTaskError(BgeOnnxError, ValueError):
    """The model folder was exported for another task (embed vs rerank)."""


class InputError(BgeOnnxError, ValueError):
    """An input value is not acceptable (empty batch where one is needed, bad option, bad text)."""


class InputTypeError(InputError, TypeError):
    """An input has the wrong type (a non-str text, a pair that is not two strings)."""


class ConfigError(BgeOnnxError, ValueError):
    """A setting of the process (a flag, an environment variable, a server option) is missing or not acceptable."""


class ProviderError(BgeOnnxError, RuntimeError):
    """The requested onnxruntime execution provider (e.g. CUDA) is not usable."""


class PushError(BgeOnnxError, OSError):
    """Uploading a model folder to the hub failed: no token, no write access, or the hub unreachable."""


class MissingExtraError(BgeOnnxError, ImportError):
    """An optional package (an extra's, e.g. langchain-core for bge_onnx.langchain) is not installed."""


class ExportError(BgeOnnxError, RuntimeError):
    """Converting a checkpoint to ONNX failed."""


class ParityError(ExportError):
    """The exported graph's output differs from the PyTorch model's beyond the gate."""


def install_hint(extra: str) -> str:
    """The pip line that adds ``extra`` to this install: of bge-onnx-gpu on the CUDA build, else of bge-onnx
    (bge-onnx[...] on the CUDA build would bring back onnxruntime beside onnxruntime-gpu)."""
    import importlib.metadata

    try:
        importlib.metadata.distribution("bge-onnx-gpu")
        name = "bge-onnx-gpu"
    except importlib.metadata.PackageNotFoundError:
        name = "bge-onnx"
    return f'pip install "{name}[{extra}]"'


def caller_stacklevel() -> int:
    """The warnings stacklevel of the first frame outside bge_onnx, so a warning points at the user's line."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").startswith("bge_onnx"):
        frame, level = frame.f_back, level + 1
    return level
