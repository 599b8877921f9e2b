"""bge_onnx_export: Hugging Face checkpoints of the BGE family -> self-describing ONNX model folders.

Exporting needs torch and transformers (``pip install "bge-onnx[export]"``); the runtime package bge_onnx never
imports this package. ``export_model`` is imported on first use, so that the torch-free modules here (``rewrite``:
fusions, pooling, first-token cut; ``precision``: int8 and fp16; ``probes``) load without torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["export_model"]


def __getattr__(name: str) -> Any:
    if name == "export_model":
        from .pipeline import export_model

        return export_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
