"""bge-onnx: BGE embedding models and rerankers on onnxruntime, with the PyTorch model's vectors and no torch."""

from ._version import __version__
from .embedder import Embedder
from .errors import (
    BgeOnnxError,
    ConfigError,
    ExportError,
    InputError,
    InputTypeError,
    MissingExtraError,
    ModelFilesError,
    ModelIntegrityError,
    ParityError,
    ProviderError,
    PushError,
    WrongTaskError,
)
from .handle import LoadOptions
from .m3 import M3Embedder
from .reranker import Reranker, RerankResult
from .spec import ModelSpec, Pooling, Precision, Task, read_spec

__all__ = [
    "BgeOnnxError",
    "ConfigError",
    "Embedder",
    "ExportError",
    "InputError",
    "InputTypeError",
    "LoadOptions",
    "M3Embedder",
    "MissingExtraError",
    "ModelFilesError",
    "ModelIntegrityError",
    "ModelSpec",
    "ParityError",
    "Pooling",
    "Precision",
    "ProviderError",
    "PushError",
    "RerankResult",
    "Reranker",
    "Task",
    "WrongTaskError",
    "__version__",
    "read_spec",
]
