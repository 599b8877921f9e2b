"""The HTTP server of ``bge-onnx serve`` (the [serve] extra): TEI's and OpenAI's APIs over Embedder and Reranker.

Nothing in ``bge_onnx`` imports this package; ``bge-onnx serve`` imports it when it runs.
"""

from .app import create_app
from .limits import ServeConfig

__all__ = ["ServeConfig", "create_app"]
