"""bge_onnx_export: Hugging Face checkpoints of the BGE family -> self-describing ONNX model folders.

Needs torch and transformers (``pip install "bge-onnx[export]"``); the runtime package bge_onnx never imports it.
"""

from .pipeline import export_model

__all__ = ["export_model"]
