"""CLS or mean pooling of token states and L2 normalisation, in numpy (the only copy)."""

from __future__ import annotations

import numpy as np

from .spec import Pooling


def pool(hidden: np.ndarray, attention_mask: np.ndarray, pooling: Pooling) -> np.ndarray:
    """Reduce token states ``(batch, seq, dim)`` to one float32 vector per text ``(batch, dim)``.

    Mean pooling averages only the real tokens (mask 1), as sentence-transformers does.

    >>> pool(np.ones((1, 2, 3), np.float32), np.array([[1, 0]]), Pooling.MEAN).shape
    (1, 3)
    """
    if pooling is Pooling.CLS:
        return np.ascontiguousarray(hidden[:, 0], dtype=np.float32)
    mask = attention_mask.astype(np.float32)
    # mask (batch, 1, seq) @ hidden (batch, seq, dim): a BLAS sum, 3-5x faster than (hidden * mask).sum(axis=1)
    summed = np.matmul(mask[:, None, :], hidden.astype(np.float32, copy=False))[:, 0]
    counts = np.maximum(mask.sum(axis=1, keepdims=True), 1e-9)
    return (summed / counts).astype(np.float32, copy=False)


def normalize(vectors: np.ndarray) -> np.ndarray:
    """Scale each row to unit L2 norm; an all-zero row stays zero (eps as in torch's F.normalize)."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)
