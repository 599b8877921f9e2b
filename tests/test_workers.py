"""workers=N: a large input split over worker processes gives what one process gives, in input order."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

from bge_onnx import Embedder, Reranker
from bge_onnx.errors import InputError
from tiny_models import VARIED_TEXTS


def test_workers_give_the_same_vectors_in_input_order(exported, sentences):
    embedder = Embedder(exported["bert-cls"], device="cpu")
    texts = sentences[:150] + VARIED_TEXTS
    try:
        with pytest.warns(UserWarning, match="truncated"):  # a worker's warning comes back to the caller
            shared = embedder.encode(texts, workers=2)
        with pytest.warns(UserWarning, match="truncated"):
            np.testing.assert_allclose(shared, embedder.encode(texts), atol=1e-6)
        pool = embedder._workers
        assert pool is not None and pool.processes == 2
        children = [child.pid for child in pool._children]
        np.testing.assert_allclose(embedder.encode_queries(texts[:40], workers=2), embedder.encode_queries(texts[:40]),
                                   atol=1e-6)
        chunks = list(embedder.encode_iter(texts[:100], chunk_size=30, workers=2, normalize=False))
        np.testing.assert_allclose(np.concatenate(chunks), embedder.encode(texts[:100], normalize=False), atol=1e-6)
        assert [child.pid for child in embedder._workers._children] == children  # started once, kept
        assert embedder.encode(texts[:3], workers=2).shape == (3, embedder.dim)  # too few to share: runs here
        with pytest.raises(InputError, match=r"texts\[7\] cannot be encoded as UTF-8"):
            embedder.encode(texts[:7] + ["bad \ud800"] + texts[:7], workers=2)
        with pytest.raises(InputError, match="workers must be a positive int"):
            embedder.encode(texts, workers=0)
    finally:
        embedder.close()
    assert all(child.poll() is not None for child in pool._children)  # close() stopped them



def test_threads_with_different_workers_share_one_embedder(exported, sentences):
    """The README's "one Embedder may be shared by threads", with workers=: a thread asking for another pool size
    waits for the running call instead of closing its pool under it."""
    embedder = Embedder(exported["bert-cls"], device="cpu")
    texts = sentences[:120]
    expected = embedder.encode(texts)
    results, failures = {}, []

    def call(k: int) -> None:
        try:
            for _ in range(2):
                results.setdefault(k, []).append(embedder.encode(texts, workers=2 + k % 2))
        except Exception as err:  # collected, so that the test names it
            failures.append(err)

    threads = [threading.Thread(target=call, args=(k,)) for k in range(4)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
    finally:
        embedder.close()
    assert failures == [] and sorted(results) == [0, 1, 2, 3]
    for vectors in results.values():
        for got in vectors:
            np.testing.assert_allclose(got, expected, atol=1e-6)

def test_int8_workers_give_each_text_its_own_vector(int8_exported, sentences):
    """Per-token int8 split over 2 worker processes: each text gets the vector it gets alone."""
    embedder = Embedder(int8_exported["bert-cls"], device="cpu", precision="int8")
    texts = sentences[:200]
    try:
        shared = embedder.encode(texts, workers=2)
    finally:
        embedder.close()
    alone = np.stack([embedder.encode([text])[0] for text in texts[::10]])
    np.testing.assert_allclose(shared[::10], alone, atol=1e-6)


def test_reranker_workers(exported):
    reranker = Reranker(exported["bert-rerank"], device="cpu")
    pairs = [(q, p) for q in VARIED_TEXTS[:4] for p in VARIED_TEXTS]
    try:
        with pytest.warns(UserWarning, match="truncated"):
            shared = reranker.compute_score(pairs, workers=2)
        with pytest.warns(UserWarning, match="truncated"):
            np.testing.assert_allclose(shared, reranker.compute_score(pairs), atol=1e-5)
        passages = VARIED_TEXTS * 3
        with pytest.warns(UserWarning, match="truncated"):
            ranked = reranker.rerank(VARIED_TEXTS[0], passages, top_k=5, workers=2)
        with pytest.warns(UserWarning, match="truncated"):
            alone = reranker.rerank(VARIED_TEXTS[0], passages, top_k=5, show_progress=True)
        scores = [r.score for r in alone]
        assert [r.index for r in ranked] == [r.index for r in alone] or len(set(np.round(scores, 4))) < 5
        np.testing.assert_allclose([r.score for r in ranked], scores, atol=1e-5)
    finally:
        reranker.close()


def test_workers_from_a_script_without_a_main_guard(exported, tmp_path):
    script = tmp_path / "embed.py"
    script.write_text(textwrap.dedent(f"""
        import numpy as np, bge_onnx
        embedder = bge_onnx.Embedder({str(exported["bert-mean"])!r}, device="cpu")
        texts = ["text number %d" % i for i in range(64)]
        assert np.allclose(embedder.encode(texts, workers=2), embedder.encode(texts), atol=1e-6)
        print("ok")
    """))
    # no `if __name__ == "__main__"`, no close(): the workers must not re-run the script, and must stop at exit
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_workers_share_the_weights_unless_told_otherwise(monkeypatch):
    # N worker processes on one host read one mapped copy of the weights (issue 23), unless the user set it to 0
    from bge_onnx.workers import _worker_env

    monkeypatch.delenv("BGE_ONNX_SHARE_WEIGHTS", raising=False)
    assert _worker_env()["BGE_ONNX_SHARE_WEIGHTS"] == "1"
    monkeypatch.setenv("BGE_ONNX_SHARE_WEIGHTS", "0")
    assert _worker_env()["BGE_ONNX_SHARE_WEIGHTS"] == "0"
