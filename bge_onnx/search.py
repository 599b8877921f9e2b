"""Top-k search over stored vectors in numpy: float or int8 dot products, Hamming distance over binary vectors,
and binary candidates rescored with the float query (the rescoring recipe for 1/32 of the storage). The Hamming
search can run on FAISS's IndexBinaryFlat instead (``backend="faiss"``, the faiss extra): 23x numpy's speed over
100,000 vectors (benchmarks/results/storage.md)."""

from __future__ import annotations

import numpy as np

from .errors import InputError, MissingExtraError, install_hint
from .storage import OutputDtype, convert, dequantize

BACKENDS = ("numpy", "faiss")

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


def _nearest(query_bits: np.ndarray, corpus: np.ndarray, count: int, backend: str) -> tuple[np.ndarray, np.ndarray]:
    """The ``count`` corpus rows nearest each query by Hamming distance: (indexes, distances), nearest first (rows at
    the same distance in either backend's order)."""
    if backend == "numpy":
        indexes, negated = _top(-hamming(query_bits, corpus).astype(np.int32), count)
        return indexes, -negated
    try:
        import faiss
    except ImportError as err:
        raise MissingExtraError(f"backend='faiss' needs FAISS: {install_hint('faiss')}") from err
    bits = np.ascontiguousarray(_bits(corpus, "corpus"))
    index = faiss.IndexBinaryFlat(bits.shape[1] * 8)
    index.add(bits)
    distances, indexes = index.search(np.ascontiguousarray(_bits(query_bits, "queries")), min(count, len(bits)))
    return indexes.astype(np.int64), distances.astype(np.int32)


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
    backend: str = "numpy",
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best rows of a binary (or ubinary) ``corpus`` for each query: (indexes, scores), best first.

    Without ``rescore``: ``queries`` binary too, fewest differing bits first, the score minus the Hamming distance.
    With ``rescore``, the same corpus as float32 (or int8/uint8 with its ``ranges``): ``queries`` are float, their
    sign bits find ``k * multiplier`` candidates by Hamming distance, and the float query's dot products with the
    candidates' ``rescore`` vectors order them (the recipe that keeps binary's storage for the search).
    ``backend`` "faiss" finds the nearest bits with FAISS's IndexBinaryFlat (built over ``corpus`` on each call,
    about 2 ms per 100,000 vectors of 384 bits): the same distances, rows at equal distance in its order.

    >>> search_binary(embedder.encode_queries(q), bits, rescore=stored_int8, ranges=embedder.ranges)  # doctest: +SKIP
    """
    _positive(k, "k")
    _positive(multiplier, "multiplier")
    if backend not in BACKENDS:
        raise InputError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    queries = np.atleast_2d(queries)
    if rescore is None:
        indexes, distances = _nearest(queries, corpus, k, backend)
        return indexes, -distances
    floats = queries.astype(np.float32)
    candidates, _ = _nearest(convert(floats, OutputDtype.UBINARY), corpus, k * multiplier, backend)
    picked = rescore[candidates]  # only the candidates' vectors are dequantized, not the corpus
    exact = picked if picked.dtype == np.float32 else dequantize(picked, _need(ranges))
    scores = np.einsum("qd,qkd->qk", floats, exact)
    best, top = _top(scores, k)
    return np.take_along_axis(candidates, best, axis=1), top


def _positive(value: object, name: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InputError(f"{name} must be a positive int, got {value!r}")


def _need(ranges: np.ndarray | None) -> np.ndarray:
    if ranges is None:
        raise InputError("int8/uint8 vectors need the ranges they were made with (embedder.ranges)")
    return np.asarray(ranges, dtype=np.float32)
