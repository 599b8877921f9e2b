"""Top-k search over stored vectors in numpy: float or int8 dot products, Hamming distance over binary vectors,
and binary candidates rescored with the float query (the rescoring recipe for 1/32 of the storage)."""

from __future__ import annotations

import numpy as np

from .errors import InputError
from .storage import OutputDtype, convert, dequantize

# set bits of each byte value: the Hamming distance of packed vectors is the sum over their XOR's bytes (numpy >= 2
# counts them natively, np.bitwise_count; numpy 1.x through this table)
_POPCOUNT = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(axis=1).astype(np.uint16)
_bit_count = getattr(np, "bitwise_count", None)
# rows of the corpus compared at once, so that a (queries, rows, bytes) XOR stays small
_BLOCK = 4096


def _bits(vectors: np.ndarray, name: str) -> np.ndarray:
    """Packed sign bits as uint8: ubinary as it is, binary (int8, offset by -128) shifted back."""
    vectors = np.asarray(vectors)
    if vectors.dtype == np.int8:
        return vectors.view(np.uint8) ^ 0x80  # binary = ubinary - 128 in 8 bits: the top bit flipped
    if vectors.dtype != np.uint8:
        raise InputError(f"{name} must be binary (int8) or ubinary (uint8) packed bits, got {vectors.dtype}")
    return vectors


def _top(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best columns of each row of ``scores`` (higher is better), best first: (indexes, scores)."""
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    best = np.take_along_axis(part, order, axis=1)
    return best, np.take_along_axis(scores, best, axis=1)


def hamming(queries: np.ndarray, corpus: np.ndarray) -> np.ndarray:
    """Hamming distances (queries, corpus) between packed binary vectors (binary or ubinary, from encode)."""
    q, c = _bits(np.atleast_2d(queries), "queries"), _bits(corpus, "corpus")
    out = np.empty((len(q), len(c)), dtype=np.uint16)
    for start in range(0, len(c), _BLOCK):
        block = c[start:start + _BLOCK]
        differing = q[:, None, :] ^ block[None, :, :]
        counts = _POPCOUNT[differing] if _bit_count is None else _bit_count(differing)
        out[:, start:start + len(block)] = counts.sum(axis=2, dtype=np.uint16)
    return out


def search(
    queries: np.ndarray, corpus: np.ndarray, *, k: int = 10, ranges: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best corpus rows for each float query by dot product: (indexes (q, k), scores (q, k)), best first.
    ``corpus`` is float32, or int8/uint8 as encode stored it (dequantized with the ``ranges`` it was made with).

    >>> search(embedder.encode_queries(["a panda"]), stored, ranges=embedder.ranges)  # doctest: +SKIP
    """
    _positive(k, "k")
    vectors = corpus if corpus.dtype == np.float32 else dequantize(corpus, _need(ranges))
    return _top(np.atleast_2d(queries).astype(np.float32) @ vectors.T, k)


def search_binary(
    queries: np.ndarray,
    corpus: np.ndarray,
    *,
    k: int = 10,
    rescore: np.ndarray | None = None,
    ranges: np.ndarray | None = None,
    multiplier: int = 4,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best rows of a binary (or ubinary) ``corpus`` for each query: (indexes, scores), best first.

    Without ``rescore``: ``queries`` binary too, fewest differing bits first, the score minus the Hamming distance.
    With ``rescore``, the same corpus as float32 (or int8/uint8 with its ``ranges``): ``queries`` are float, their
    sign bits find ``k * multiplier`` candidates by Hamming distance, and the float query's dot products with the
    candidates' ``rescore`` vectors order them (the recipe that keeps binary's storage for the search).

    >>> search_binary(embedder.encode_queries(q), bits, rescore=stored_int8, ranges=embedder.ranges)  # doctest: +SKIP
    """
    _positive(k, "k")
    _positive(multiplier, "multiplier")
    queries = np.atleast_2d(queries)
    if rescore is None:
        return _top(-hamming(queries, corpus).astype(np.int32), k)
    floats = queries.astype(np.float32)
    candidates, _ = _top(-hamming(convert(floats, OutputDtype.UBINARY), corpus).astype(np.int32), k * multiplier)
    exact = rescore if rescore.dtype == np.float32 else dequantize(rescore, _need(ranges))
    scores = np.einsum("qd,qkd->qk", floats, exact[candidates])
    best, top = _top(scores, k)
    return np.take_along_axis(candidates, best, axis=1), top


def _positive(value: object, name: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InputError(f"{name} must be a positive int, got {value!r}")


def _need(ranges: np.ndarray | None) -> np.ndarray:
    if ranges is None:
        raise InputError("int8/uint8 vectors need the ranges they were made with (embedder.ranges)")
    return np.asarray(ranges, dtype=np.float32)
