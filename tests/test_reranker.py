"""Reranker behaviour: single pair vs batch, sigmoid, rerank ordering and top_k."""

from __future__ import annotations

import numpy as np
import pytest

from bge_onnx import InputError, InputTypeError, Reranker, RerankResult
from bge_onnx.batching import TOKENIZE_CHUNK

PASSAGES = [
    "The giant panda is a bear species endemic to China.",
    "hi",
    "Paris is the capital of France.",
    "Pandas eat bamboo almost exclusively.",
    "",
]


@pytest.fixture(scope="module", params=["bert-rerank", "xlmr-rerank"])
def reranker(request, exported):
    return Reranker(exported[request.param], device="cpu", batch_size=2)


def test_single_pair_list_and_empty(reranker):
    pairs = [("what is a panda?", p) for p in PASSAGES]
    scores = reranker.compute_score(pairs)
    assert scores.shape == (5,) and scores.dtype == np.float32
    single = reranker.compute_score(("what is a panda?", PASSAGES[0]))
    assert isinstance(single, float) and abs(single - scores[0]) < 1e-5
    assert reranker.compute_score(["what is a panda?", PASSAGES[0]]) == pytest.approx(single, abs=1e-6)
    empty = reranker.compute_score([])
    assert empty.shape == (0,) and empty.dtype == np.float32


def test_normalize_is_sigmoid(reranker):
    pairs = [("q", p) for p in PASSAGES]
    raw = reranker.compute_score(pairs)
    np.testing.assert_allclose(reranker.compute_score(pairs, normalize=True), 1 / (1 + np.exp(-raw.astype(np.float64))), atol=1e-6)


def test_batch_invariance(reranker):
    pairs = [("what is a panda?", p) for p in PASSAGES] + [("capital", p) for p in PASSAGES]
    np.testing.assert_allclose(reranker.compute_score(pairs, batch_size=1), reranker.compute_score(pairs, batch_size=32), atol=1e-4)


def test_pairs_of_several_tokenising_chunks_give_the_same_scores(exported):
    reranker = Reranker(exported["bert-rerank"], device="cpu")
    pairs = [(f"query {i % 7}", f"{i} {PASSAGES[i % len(PASSAGES)]}") for i in range(TOKENIZE_CHUNK + 9)]
    parts = [reranker.compute_score(pairs[i : i + 1000]) for i in range(0, len(pairs), 1000)]  # one chunk each
    np.testing.assert_allclose(reranker.compute_score(pairs), np.concatenate(parts), atol=1e-5)
    bad = pairs[:]
    bad[TOKENIZE_CHUNK + 3] = ("q", "bad \ud800")  # in the second chunk: named by its index in the whole call
    with pytest.raises(InputError, match=rf"passages\[{TOKENIZE_CHUNK + 3}\] cannot be encoded"):
        reranker.compute_score(bad)


def test_rerank_sorted_with_indices(reranker):
    scores = reranker.compute_score([("what is a panda?", p) for p in PASSAGES])
    results = reranker.rerank("what is a panda?", PASSAGES)
    assert [r.index for r in results] == list(np.argsort(-scores, kind="stable"))
    assert all(isinstance(r, RerankResult) and r.text == PASSAGES[r.index] for r in results)
    assert [r.score for r in results] == sorted((r.score for r in results), reverse=True)
    top = reranker.rerank("what is a panda?", PASSAGES, top_k=2)
    assert top == results[:2]
    assert reranker.rerank("q", []) == []
    assert len(reranker.rerank("q", PASSAGES, top_k=50)) == 5


def test_query_is_cut_to_three_quarters(exported):
    reranker = Reranker(exported["bert-rerank"], device="cpu", max_length=40)
    assert reranker.query_max_length == 30
    long_query = "word " * 100
    with pytest.warns(UserWarning, match="1 of 1 pairs exceeded max_length=40"):
        reranker.compute_score((long_query, "passage"))
    with pytest.raises(InputError, match="leaves no room for the passage"):
        Reranker(exported["bert-rerank"], device="cpu", max_length=40, query_max_length=38)


def test_bad_pairs(reranker):
    with pytest.raises(InputTypeError, match=r"pairs\[1\] is str 'oops', expected a \(query, passage\) pair"):
        reranker.compute_score([("q", "p"), "oops", ("q", "p")])
    with pytest.raises(InputTypeError, match=r"pairs\[0\]\[1\] \(the passage\) is NoneType None, expected str"):
        reranker.compute_score([("q", None)])
    with pytest.raises(InputTypeError, match=r"pairs\[0\] is tuple \('a', 'b', 'c'\)"):
        reranker.compute_score([("a", "b", "c")])
    with pytest.raises(InputTypeError, match="pairs must be a list of"):
        reranker.compute_score(42)
    with pytest.raises(InputTypeError, match=r"query is int 7, expected str"):
        reranker.rerank(7, ["p"])
    with pytest.raises(InputTypeError, match=r"passages\[1\] is bytes b'x', expected str"):
        reranker.rerank("q", ["p", b"x"])
    with pytest.raises(InputError, match=r"passages\[0\] cannot be encoded as UTF-8"):
        reranker.compute_score([("q", "bad \ud800")])
    with pytest.raises(InputError, match="top_k must be a positive int, got 0"):
        reranker.rerank("q", ["p"], top_k=0)
