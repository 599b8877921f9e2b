"""bge_onnx.ray on a local Ray cluster started by the test: every row back once, the in-process vectors and scores."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import ray.data

from bge_onnx import Embedder, Reranker
from bge_onnx.errors import InputError
from bge_onnx.ray import embed_dataset, rerank_dataset
from tiny_models import VARIED_TEXTS, minilm_path


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def _embed_parquet(tmp_path, model, texts, **options) -> tuple[list[str], pa.Table]:
    """Parquet in, Ray Data, Parquet out; the output read back with plain pyarrow."""
    ids = [f"doc-{i}" for i in range(len(texts))]
    pq.write_table(pa.table({"id": ids, "text": texts}), tmp_path / "corpus.parquet")
    dataset = ray.data.read_parquet(str(tmp_path / "corpus.parquet"))
    embed_dataset(dataset, model, concurrency=(1, 2), batch_size=16, **options).write_parquet(str(tmp_path / "out"))
    return ids, pq.read_table(tmp_path / "out")


def _by_id(table: pa.Table, ids: list[str]) -> np.ndarray:
    assert table.column("embedding").type == pa.list_(pa.float32(), table.column("embedding").type.list_size)
    got = dict(zip(table.column("id").to_pylist(), table.column("embedding").to_pylist()))
    assert sorted(got) == sorted(ids) and table.num_rows == len(ids)  # every id back, once
    return np.array([got[i] for i in ids], dtype=np.float32)


def test_embed_dataset_parquet_in_and_out(cluster, exported, sentences, tmp_path):
    texts = sentences[:90] + VARIED_TEXTS
    ids, table = _embed_parquet(tmp_path, exported["bert-cls"], texts, precision="fp32")
    with pytest.warns(UserWarning, match="truncated"):
        expected = Embedder(exported["bert-cls"], device="cpu", precision="fp32").encode_corpus(texts)
    np.testing.assert_allclose(_by_id(table, ids), expected, atol=1e-6)


def test_int8_vectors_do_not_move_with_their_batch(cluster, sentences, tmp_path_factory, tmp_path):
    """Per-token int8 on the real all-MiniLM-L6-v2: Ray batches of 16 give each text the vector that one in-process
    call gives it (before issue 20, per-batch int8 moved them: min cosine 0.9985)."""
    from bge_onnx_export import export_model

    model = tmp_path_factory.mktemp("ray-int8") / "minilm"
    export_model(minilm_path(), model, precisions=("fp32", "int8"), log=None)
    texts = sentences[:120]
    ids, table = _embed_parquet(tmp_path, model, texts, precision="int8")
    expected = Embedder(model, device="cpu", precision="int8").encode_corpus(texts)
    got = _by_id(table, ids)
    print(f"int8 under Ray (batches of 16) vs one in-process call: max abs diff {np.abs(got - expected).max():.1e}")
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_query_kind_and_rerank_dataset(cluster, exported):
    queries = ray.data.from_items([{"text": t} for t in VARIED_TEXTS[:8]])
    rows = embed_dataset(queries, exported["bert-cls"], kind="query", batch_size=4).take_all()
    by_text = {r["text"]: r["embedding"] for r in rows}
    expected = Embedder(exported["bert-cls"], device="cpu").encode_queries(VARIED_TEXTS[:8])
    np.testing.assert_allclose(np.array([by_text[t] for t in VARIED_TEXTS[:8]]), expected, atol=1e-6)

    pairs = [(q, p) for q in VARIED_TEXTS[:3] for p in VARIED_TEXTS[:6]]
    dataset = ray.data.from_items([{"n": i, "query": q, "passage": p} for i, (q, p) in enumerate(pairs)])
    scored = sorted(rerank_dataset(dataset, exported["bert-rerank"], concurrency=(1, 2), batch_size=5).take_all(),
                    key=lambda r: r["n"])
    assert [r["n"] for r in scored] == list(range(len(pairs)))
    expected = Reranker(exported["bert-rerank"], device="cpu").compute_score(pairs)
    np.testing.assert_allclose([r["score"] for r in scored], expected, atol=1e-5)


def test_bad_arguments_and_rows(cluster, exported):
    items = ray.data.from_items([{"text": "x"}])
    with pytest.raises(InputError, match="kind must be one of"):
        embed_dataset(items, exported["bert-cls"], kind="doc")
    with pytest.raises(InputError, match="dataset must be a ray.data.Dataset, got list"):
        embed_dataset([{"text": "x"}], exported["bert-cls"])
    with pytest.raises(InputError, match=r"concurrency must be a positive int or a \(min, max\) pair"):
        embed_dataset(items, exported["bert-cls"], concurrency=(2, 1))
    with pytest.warns(RuntimeWarning, match="take all 2 CPUs of this Ray cluster"):
        embed_dataset(items, exported["bert-cls"], concurrency=2)  # lazily mapped: nothing runs, nothing stalls
    with pytest.raises(Exception, match="the dataset has no column 'body'"):
        embed_dataset(items, exported["bert-cls"], text_column="body").take_all()
    with pytest.raises(Exception, match="column 'text' holds NoneType None at row 1 of a batch of 2"):
        embed_dataset(ray.data.from_items([{"text": "a"}, {"text": None}]), exported["bert-cls"]).take_all()
