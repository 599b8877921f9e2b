"""bge_onnx.search: top-k over float, int8 and binary vectors, and binary candidates rescored, against brute force."""

from __future__ import annotations

import numpy as np
import pytest

from bge_onnx import Embedder, InputError
from bge_onnx.search import dequantize, hamming, search, search_binary


@pytest.fixture(scope="module")
def stored(exported, sentences):
    embedder = Embedder(exported["bert-mean"], device="cpu")
    docs, queries = sentences[:300], sentences[300:320]
    return {
        "embedder": embedder,
        "float": embedder.encode(docs),
        "int8": embedder.encode(docs, output_dtype="int8"),
        "binary": embedder.encode(docs, output_dtype="binary"),
        "ubinary": embedder.encode(docs, output_dtype="ubinary"),
        "queries": embedder.encode(queries),
        "query_bits": embedder.encode(queries, output_dtype="binary"),
    }


def test_float_search_is_the_brute_force_ranking(stored):
    indexes, scores = search(stored["queries"], stored["float"], k=7)
    full = stored["queries"] @ stored["float"].T
    np.testing.assert_array_equal(indexes, np.argsort(-full, axis=1, kind="stable")[:, :7])
    np.testing.assert_allclose(scores, np.take_along_axis(full, indexes, axis=1), rtol=1e-6)


def test_hamming_counts_differing_bits(stored):
    unpacked = np.unpackbits(stored["ubinary"], axis=1)
    queries = np.unpackbits((stored["query_bits"].astype(np.int16) + 128).astype(np.uint8), axis=1)
    expected = (queries[:, None, :] != unpacked[None, :, :]).sum(axis=2)
    np.testing.assert_array_equal(hamming(stored["query_bits"], stored["binary"]), expected)
    np.testing.assert_array_equal(hamming(stored["query_bits"], stored["ubinary"]), expected)
    indexes, scores = search_binary(stored["query_bits"], stored["binary"], k=5)
    assert (np.diff(-scores, axis=1) >= 0).all()  # fewest differing bits first
    np.testing.assert_array_equal(-scores, np.take_along_axis(expected, indexes, axis=1))


def test_rescored_binary_search_over_the_whole_corpus_is_the_float_ranking(stored):
    exact, _ = search(stored["queries"], stored["float"], k=5)
    every = len(stored["float"]) // 5  # k * multiplier covers the corpus: rescoring alone orders it
    indexes, _ = search_binary(stored["queries"], stored["binary"], k=5, rescore=stored["float"], multiplier=every)
    np.testing.assert_array_equal(indexes, exact)
    ranges = stored["embedder"].ranges
    via_int8, _ = search_binary(stored["queries"], stored["binary"], k=5, rescore=stored["int8"], ranges=ranges,
                                multiplier=every)
    np.testing.assert_array_equal(via_int8, search(stored["queries"], stored["int8"], k=5, ranges=ranges)[0])


def test_dequantized_int8_is_within_half_a_step(stored):
    ranges = stored["embedder"].ranges
    inside = (stored["float"] >= ranges[0]) & (stored["float"] <= ranges[1])
    step = (ranges[1] - ranges[0]) / 255
    error = np.abs(dequantize(stored["int8"], ranges) - stored["float"])
    assert (error[inside] <= np.broadcast_to(step, error.shape)[inside] * 0.5 + 1e-6).all()


def test_refusals(stored):
    with pytest.raises(InputError, match="k must be a positive int, got 0"):
        search(stored["queries"], stored["float"], k=0)
    with pytest.raises(InputError, match=r"need the ranges they were made with \(embedder.ranges\)"):
        search(stored["queries"], stored["int8"])
    with pytest.raises(InputError, match="must be binary \\(int8\\) or ubinary \\(uint8\\) packed bits, got float32"):
        search_binary(stored["queries"], stored["binary"])


def test_faiss_backend_finds_what_numpy_finds(stored):
    # FAISS's IndexBinaryFlat: the same Hamming distances, and the same rescored results (rows at equal distance may
    # come in another order, so the candidates are compared as distances, the rescored ranking where it covers all)
    for corpus in (stored["binary"], stored["ubinary"]):
        _, numpy_scores = search_binary(stored["query_bits"], corpus, k=9)
        faiss_rows, faiss_scores = search_binary(stored["query_bits"], corpus, k=9, backend="faiss")
        np.testing.assert_array_equal(faiss_scores, numpy_scores)
        expected = hamming(stored["query_bits"], corpus)
        np.testing.assert_array_equal(-faiss_scores, np.take_along_axis(expected, faiss_rows, axis=1))
    every = len(stored["float"]) // 5
    exact, _ = search(stored["queries"], stored["float"], k=5)
    rescored, _ = search_binary(stored["queries"], stored["binary"], k=5, rescore=stored["float"], multiplier=every,
                                backend="faiss")
    np.testing.assert_array_equal(rescored, exact)
    # more candidates than rows: all of them, no -1 padding from FAISS
    rows, _ = search_binary(stored["query_bits"][:2], stored["binary"][:3], k=10, backend="faiss")
    assert sorted(rows[0]) == [0, 1, 2]
    with pytest.raises(InputError, match="backend must be one of numpy, faiss, got 'annoy'"):
        search_binary(stored["query_bits"], stored["binary"], backend="annoy")


def test_faiss_backend_without_faiss_says_what_to_install():
    import subprocess
    import sys

    script = ("import sys; sys.modules['faiss'] = None; import numpy as np; from bge_onnx.search import search_binary; "
              "search_binary(np.zeros((1, 4), np.uint8), np.zeros((3, 4), np.uint8), backend='faiss')")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and 'MissingExtraError: backend=\'faiss\' needs FAISS: pip install "bge-onnx[faiss]"' \
        in result.stderr
