"""Vectors for storage: int8 and uint8 by per-dimension ranges, binary and ubinary by sign bits, written as
sentence-transformers' quantize_embeddings writes them, so that stored vectors interoperate."""

from __future__ import annotations

import enum

import numpy as np

from .errors import InputError


class OutputDtype(str, enum.Enum):
    FLOAT32 = "float32"
    INT8 = "int8"
    UINT8 = "uint8"
    BINARY = "binary"
    UBINARY = "ubinary"

    @property
    def needs_ranges(self) -> bool:
        return self in (OutputDtype.INT8, OutputDtype.UINT8)

    @property
    def numpy_dtype(self) -> np.dtype:
        """The element type of the rows :func:`convert` gives (little-endian float32, int8 or uint8)."""
        signed = self in (OutputDtype.INT8, OutputDtype.BINARY)
        return np.dtype("<f4" if self is OutputDtype.FLOAT32 else "i1" if signed else "u1")

    def width(self, dim: int) -> int:
        """The length of a row of ``dim`` dimensions in this form: binary packs 8 dimensions to a byte."""
        return -(-dim // 8) if self in (OutputDtype.BINARY, OutputDtype.UBINARY) else dim


def output_dtype(value: object) -> OutputDtype:
    """``value`` as an OutputDtype.

    Raises:
        InputError: not one of float32, int8, uint8, binary, ubinary.
    """
    try:
        return OutputDtype(value)
    except ValueError:
        raise InputError(f"output_dtype must be one of {', '.join(d.value for d in OutputDtype)}, "
                         f"got {value!r}") from None


def ranges_of(vectors: np.ndarray) -> np.ndarray:
    """The per-dimension ranges of ``vectors`` (n, dim): float32 (2, dim), the minimum then the maximum.

    Raises:
        InputError: no vectors to take them from.
    """
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or len(vectors) == 0:
        raise InputError(f"ranges need at least one vector of shape (n, dim), got shape {vectors.shape}")
    return np.stack([vectors.min(axis=0), vectors.max(axis=0)]).astype(np.float32)


def convert(vectors: np.ndarray, dtype: OutputDtype, ranges: np.ndarray | None = None) -> np.ndarray:
    """``vectors`` (float32, (n, dim) or (dim,)) as ``dtype``: int8/uint8 split each dimension's range into 256
    steps (values outside it are clipped), binary/ubinary pack the sign bits 8 dimensions to a byte (binary
    offset by -128 into int8), as sentence-transformers does."""
    if dtype is OutputDtype.FLOAT32:
        return vectors
    if dtype.needs_ranges:
        steps_taken = np.clip(np.floor((vectors - ranges[0]) / _steps(ranges)), 0, 255)
        return steps_taken.astype(np.uint8) if dtype is OutputDtype.UINT8 else (steps_taken - 128).astype(np.int8)
    packed = np.packbits(vectors > 0, axis=-1)
    return packed if dtype is OutputDtype.UBINARY else (packed - 128).astype(np.int8)


def dequantize(codes: np.ndarray, ranges: np.ndarray) -> np.ndarray:
    """int8/uint8 vectors back to float32: the middle of each code's step of its dimension's range."""
    levels = codes.astype(np.float32) + (128 if codes.dtype == np.int8 else 0)
    return (ranges[0] + (levels + 0.5) * _steps(ranges)).astype(np.float32)


def _steps(ranges: np.ndarray) -> np.ndarray:
    """Each dimension's step: its range over 255 (1 where the range is empty, as sentence-transformers does)."""
    steps = (ranges[1] - ranges[0]) / 255
    return np.where(steps == 0, 1, steps)
