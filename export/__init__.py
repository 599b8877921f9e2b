"""bge_onnx_export: Hugging Face checkpoints of the BGE family -> self-describing ONNX model folders.

Exporting needs onnx (``pip install "bge-onnx[export]"``): the graph is built from the checkpoint's weights
(``build``), and checked against PyTorch where torch is installed or a numpy forward pass (``reference``) where it is
not. Only checkpoints outside the builder are traced with torch (``trace``; ``pip install "bge-onnx[export-torch]"``
after torch). The runtime package bge_onnx never imports this package; torch is imported only by ``trace``,
``heads`` and the functions of ``parity`` that run it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["export_model"]


def __getattr__(name: str) -> Any:
    if name == "export_model":
        from .pipeline import export_model

        return export_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
