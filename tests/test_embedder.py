"""Embedder behaviour on exported tiny models: shapes, order, instructions, truncation, threads."""

from __future__ import annotations

import threading
import warnings

import numpy as np
import pytest

from bge_onnx import Embedder, InputError, InputTypeError
from bge_onnx.batching import MAX_TOKENS_CPU, TOKENIZE_CHUNK, token_batches, tokenize_ahead
from bge_onnx.spec import Pooling
from tiny_models import VARIED_TEXTS


@pytest.fixture(scope="module")
def embedder(exported):
    return Embedder(exported["bert-mean"], device="cpu", batch_size=4)


def test_shapes_and_dtypes(embedder):
    assert embedder.encode(["a", "b", "c"]).shape == (3, embedder.dim)
    single = embedder.encode("just one")
    assert single.shape == (embedder.dim,) and single.dtype == np.float32
    empty = embedder.encode([])
    assert empty.shape == (0, embedder.dim) and empty.dtype == np.float32
    assert embedder.encode(iter(["from", "a generator"])).shape == (2, embedder.dim)
    np.testing.assert_allclose(single, embedder.encode(["just one"])[0], atol=1e-6)


def test_properties(exported, embedder):
    assert (embedder.dim, embedder.max_length, embedder.pooling) == (32, 64, Pooling.MEAN)
    assert Embedder(exported["bert-mean"], device="cpu", max_length=16).max_length == 16
    assert embedder.providers == ["CPUExecutionProvider"]


def test_normalize(embedder):
    raw = embedder.encode(VARIED_TEXTS[:5], normalize=False)
    unit = embedder.encode(VARIED_TEXTS[:5])
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-5)
    assert np.abs(np.linalg.norm(raw, axis=1) - 1.0).max() > 0.01
    np.testing.assert_allclose(unit, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-6)


def test_order_and_batch_invariance(embedder):
    texts = VARIED_TEXTS[:9] + ["short", "a bit longer text here", "x"]  # all within max_length
    together = embedder.encode(texts, batch_size=32)
    alone = np.stack([embedder.encode(t) for t in texts])
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(texts))
    shuffled = embedder.encode([texts[i] for i in perm], batch_size=3)
    for other in (alone, shuffled[np.argsort(perm)]):
        assert (together * other).sum(axis=1).min() >= 0.99999


def test_token_budget_batches():
    lengths = [300, 120, 100, 64, 64, 30, 10, 10, 9, 3, 1]  # sorted longest first, as run_sorted gives them
    batches = token_batches(lengths, batch_size=4, max_tokens=256)
    assert [list(b) for b in batches] == [[0], [1, 2], [3, 4, 5, 6], [7, 8, 9, 10]]
    for batch in batches:  # padded to the batch's first (longest) text
        assert len(batch) <= 4 and (len(batch) == 1 or len(batch) * lengths[batch[0]] <= 256)
    assert token_batches([], batch_size=4, max_tokens=256) == []


def test_token_budget_changes_speed_not_vectors(exported):
    texts = VARIED_TEXTS[:9] + ["short", "x", "a bit longer text here"] * 3  # all within max_length
    small = Embedder(exported["bert-mean"], device="cpu", max_tokens=8).encode(texts)
    large = Embedder(exported["bert-mean"], device="cpu", max_tokens=1 << 20, batch_size=1000).encode(texts)
    assert (small * large).sum(axis=1).min() >= 0.99999
    with pytest.raises(InputError, match="max_tokens must be a positive int, got 0"):
        Embedder(exported["bert-mean"], device="cpu", max_tokens=0)
    assert Embedder(exported["bert-mean"], device="cpu").max_tokens == MAX_TOKENS_CPU


def test_duplicates_and_empty_string(embedder):
    vectors = embedder.encode(["same", "", "same"])
    np.testing.assert_allclose(vectors[0], vectors[2], atol=1e-6)
    assert np.isfinite(vectors).all() and abs(np.linalg.norm(vectors[1]) - 1) < 1e-5


def test_queries_get_the_instruction_and_corpus_never(embedder):
    assert embedder.query_instruction == "query: "
    np.testing.assert_allclose(embedder.encode_queries(["what is x"]), embedder.encode(["query: what is x"]), atol=1e-6)
    np.testing.assert_allclose(embedder.encode_queries("what is x"), embedder.encode("query: what is x"), atol=1e-6)
    np.testing.assert_allclose(embedder.encode_corpus(["what is x"]), embedder.encode(["what is x"]), atol=1e-6)
    assert np.abs(embedder.encode_queries(["what is x"]) - embedder.encode(["what is x"])).max() > 1e-3


def test_truncation_warns_once_per_call(embedder):
    long = "word " * 500
    with pytest.warns(UserWarning, match=r"2 of 3 texts exceeded max_length=64 tokens and were truncated") as record:
        vectors = embedder.encode([long, "short", long + "tail"])
    assert len([w for w in record if "truncated" in str(w.message)]) == 1
    # truncation means the tail past 64 tokens is ignored
    np.testing.assert_allclose(vectors[0], vectors[2], atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        embedder.encode(["short texts", "do not warn"])


@pytest.mark.parametrize("ahead", [False, True])
def test_inputs_of_several_tokenising_chunks_give_the_same_results(exported, ahead):
    # more texts than one tokenising chunk; ahead (what CUDA does): the next is tokenised while the graph runs this one
    embedder = Embedder(exported["bert-cls"], device="cpu")
    embedder._tokenize_ahead = ahead
    texts = [f"{i} {VARIED_TEXTS[i % len(VARIED_TEXTS)]}" for i in range(2 * TOKENIZE_CHUNK + 7)]
    with pytest.warns(UserWarning) as record:
        whole = embedder.encode(texts)
    with pytest.warns(UserWarning) as part_record:
        parts = [embedder.encode(texts[i : i + 1000]) for i in range(0, len(texts), 1000)]  # one chunk each
    np.testing.assert_allclose(whole, np.concatenate(parts), atol=1e-5)

    def cut_counts(warned) -> list[int]:
        return [int(str(w.message).split()[0]) for w in warned if "truncated" in str(w.message)]

    assert len(cut_counts(record)) == 1 and cut_counts(record)[0] == sum(cut_counts(part_record)) > 0
    bad = texts[:]
    bad[TOKENIZE_CHUNK + 5] = "bad \ud800"  # in the second chunk: named by its index in the whole call
    with pytest.raises(InputError, match=rf"texts\[{TOKENIZE_CHUNK + 5}\] cannot be encoded"):
        embedder.encode(bad)


@pytest.mark.parametrize("ahead", [True, False])
def test_tokenize_ahead_tokenises_the_next_chunk_while_this_one_runs(ahead):
    items = list(range(2 * TOKENIZE_CHUNK + 5))
    called = {}  # chunk start -> (thread name, an event set when it was tokenised)

    def tokenize(chunk, start):
        called.setdefault(start, [None, threading.Event()])
        called[start][0] = threading.current_thread().name
        called[start][1].set()
        return [x * 10 for x in chunk], start % 3

    seen = []
    for start, encodings, cut in tokenize_ahead(items, tokenize, ahead=ahead):
        assert encodings == [x * 10 for x in items[start : start + TOKENIZE_CHUNK]] and cut == start % 3
        following = start + TOKENIZE_CHUNK
        if ahead and following < len(items):  # the worker gets to the next chunk while we hold this one
            called.setdefault(following, [None, threading.Event()])
            assert called[following][1].wait(10)
        seen.append(start)
    assert seen == [0, TOKENIZE_CHUNK, 2 * TOKENIZE_CHUNK]
    threads = {name for name, _ in called.values()}
    assert threads == ({"bge-onnx-tokenize_0"} if ahead else {threading.current_thread().name})


def test_huge_text_is_truncated_not_refused(embedder):
    with pytest.warns(UserWarning, match="truncated"):
        vector = embedder.encode("lorem ipsum " * 200_000)
    assert vector.shape == (embedder.dim,) and np.isfinite(vector).all()


def test_concurrent_threads_get_the_same_vectors(exported):
    embedder = Embedder(exported["bert-cls"], device="cpu", batch_size=3)
    texts = [f"sentence number {i} about {'cats' if i % 2 else 'markets'}" for i in range(24)]
    expected = embedder.encode(texts)
    results, errors = {}, []

    def work(k: int) -> None:
        try:
            for _ in range(5):
                order = np.random.default_rng(k).permutation(len(texts))
                got = embedder.encode([texts[i] for i in order])
                results.setdefault(k, []).append(got[np.argsort(order)])
        except Exception as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for runs in results.values():
        for got in runs:
            assert (got * expected).sum(axis=1).min() >= 0.99999


def test_bad_options(exported, embedder):
    with pytest.raises(InputError, match="batch_size must be a positive int, got 0"):
        embedder.encode(["x"], batch_size=0)
    with pytest.raises(InputError, match="batch_size must be a positive int, got -1"):
        Embedder(exported["bert-mean"], device="cpu", batch_size=-1)
    with pytest.raises(InputError, match=r"max_length=4096 exceeds what the model can take \(128 tokens\)"):
        Embedder(exported["bert-mean"], device="cpu", max_length=4096)


def test_progress_goes_to_stderr(embedder, capsys):
    embedder.encode(["a", "b", "c", "d", "e"], show_progress=True)
    captured = capsys.readouterr()
    assert captured.out == "" and "embedded: 5/5" in captured.err


def test_encode_iter_streams_in_order(embedder):
    texts = [f"streamed text number {i}" for i in range(23)]
    chunks = list(embedder.encode_iter(iter(texts), chunk_size=5))
    assert [len(c) for c in chunks] == [5, 5, 5, 5, 3]
    np.testing.assert_allclose(np.concatenate(chunks), embedder.encode(texts), atol=1e-6)
    assert list(embedder.encode_iter([])) == []
    with pytest.raises(InputTypeError, match=r"texts\[7\] is NoneType None, expected str"):
        list(embedder.encode_iter(iter(texts[:7] + [None]), chunk_size=5))
    with pytest.raises(InputError, match=r"texts\[6\] cannot be encoded as UTF-8"):
        list(embedder.encode_iter(texts[:6] + ["\udc80"], chunk_size=5))
    with pytest.raises(InputTypeError, match="texts must be an iterable of str, got str"):
        next(embedder.encode_iter("one string"))
    with pytest.raises(InputError, match="chunk_size must be a positive int, got 0"):
        next(embedder.encode_iter(texts, chunk_size=0))
