"""The LangChain and LlamaIndex adapters, with the real packages: their vector stores find what numpy finds on our
vectors, queries carry the instruction, the rerankers reorder as Reranker.rerank does."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest

from bge_onnx import Embedder, InputTypeError, LoadOptions, M3Embedder, Reranker
from bge_onnx.errors import install_hint

pytest.importorskip("langchain_core")
pytest.importorskip("llama_index.core")

from langchain_core.documents import Document
from langchain_core.vectorstores import InMemoryVectorStore
from llama_index.core import VectorStoreIndex
from llama_index.core.schema import NodeWithScore, TextNode

from bge_onnx.langchain import BgeOnnxEmbeddings
from bge_onnx.langchain import BgeOnnxRerank as LangChainRerank
from bge_onnx.llama_index import BgeOnnxEmbedding
from bge_onnx.llama_index import BgeOnnxRerank as LlamaIndexRerank
from bge_onnx.ray import embed_dataset

TARGETED = [
    "The giant panda is a bear native to the mountains of central China.",
    "Paris is the capital and largest city of France.",
    "Plants turn sunlight, water and carbon dioxide into sugar by photosynthesis.",
    "The football match was cancelled because of heavy snow.",
]
QUERIES = ["what is a panda?", "capital of France", "how do plants make their food", "a dog in the park"]
K = 5


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Nothing here may reach a server (an OpenAI default model or LLM, a tokenizer download): refuse it loudly."""
    connect = socket.socket.connect

    def refuse(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise OSError(f"test_integrations: network access to {address!r} refused")
        return connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture(scope="module")
def corpus(sentences) -> list[str]:
    return list(dict.fromkeys(sentences[:50] + TARGETED))  # unique texts, so a text names its index


@pytest.fixture(scope="module", params=["bert-cls", "minilm"])
def embedder(request, exported, minilm_onnx) -> Embedder:
    folder = exported["bert-cls"] if request.param == "bert-cls" else minilm_onnx
    return Embedder(folder, device="cpu", threads=1)


@pytest.fixture(scope="module")
def instructed(exported) -> Embedder:
    embedder = Embedder(exported["bert-cls"], device="cpu", threads=1)
    assert embedder.query_instruction  # bge-small-en-v1.5's registry entry: the test needs a model with one
    return embedder


@pytest.fixture(scope="module")
def reranker(exported) -> Reranker:
    return Reranker(exported["bert-rerank"], device="cpu", threads=1)


def numpy_top(embedder: Embedder, corpus: list[str], query: str, k: int) -> tuple[list[int], np.ndarray]:
    """The reference: dot products of our own normalised vectors, best first."""
    scores = embedder.encode_corpus(corpus) @ embedder.encode_queries(query)
    order = np.argsort(-scores, kind="stable")
    # a near-tie at the cut would make "the same top k" depend on float rounding, not on the adapter
    assert scores[order[k - 1]] - scores[order[k]] > 1e-5, "ill-posed query: near-tie at the cut"
    return [int(i) for i in order[:k]], scores[order[:k]]


# LangChain


def test_langchain_store_finds_numpy_top_k(embedder, corpus):
    store = InMemoryVectorStore(embedding=BgeOnnxEmbeddings(embedder=embedder))
    store.add_documents([Document(page_content=text, metadata={"i": i}) for i, text in enumerate(corpus)])
    for query in QUERIES:
        expected, scores = numpy_top(embedder, corpus, query, K)
        found = store.similarity_search_with_score(query, k=K)
        assert [doc.metadata["i"] for doc, _ in found] == expected, query
        assert [score for _, score in found] == pytest.approx(scores, abs=1e-5)


def test_langchain_finds_the_targeted_documents(minilm_onnx, corpus):
    store = InMemoryVectorStore(embedding=BgeOnnxEmbeddings(minilm_onnx, device="cpu", threads=1))
    store.add_texts(corpus)
    for query, target in zip(QUERIES[:3], TARGETED[:3]):  # the last query has no target
        assert store.similarity_search(query, k=1)[0].page_content == target


def test_langchain_query_has_the_instruction(instructed, corpus):
    embeddings = BgeOnnxEmbeddings(embedder=instructed)
    query = QUERIES[0]
    vector = embeddings.embed_query(query)
    assert type(vector) is list and all(type(x) is float for x in vector)
    np.testing.assert_array_equal(np.float32(vector), instructed.encode_queries(query))
    assert not np.allclose(vector, instructed.encode(query), atol=1e-3)  # the instruction changes it
    documents = embeddings.embed_documents(corpus[:7])
    assert type(documents) is list and len(documents) == 7 and type(documents[0][0]) is float
    np.testing.assert_array_equal(np.float32(documents), instructed.encode_corpus(corpus[:7]))


class ThreadRecordingEmbedder(Embedder):
    """An Embedder that notes which thread each call runs on (the test's own subclass, not a stand-in)."""

    threads_seen: list[int]

    def encode_corpus(self, *args, **kw):
        self.threads_seen.append(threading.get_ident())
        return super().encode_corpus(*args, **kw)

    def encode_queries(self, *args, **kw):
        self.threads_seen.append(threading.get_ident())
        return super().encode_queries(*args, **kw)


def test_langchain_async_equals_sync_off_the_event_loop(exported, corpus):
    embedder = ThreadRecordingEmbedder(exported["bert-cls"], device="cpu", threads=1)
    embedder.threads_seen = []
    embeddings = BgeOnnxEmbeddings(embedder=embedder)

    async def both():
        loop_thread = threading.get_ident()
        return loop_thread, await embeddings.aembed_documents(corpus), await embeddings.aembed_query(QUERIES[1])

    loop_thread, documents, query = asyncio.run(both())
    assert loop_thread not in embedder.threads_seen and len(embedder.threads_seen) == 2
    assert documents == embeddings.embed_documents(corpus)
    assert query == embeddings.embed_query(QUERIES[1])


def test_langchain_rerank_reorders_as_reranker(minilm_onnx, reranker, corpus):
    store = InMemoryVectorStore(embedding=BgeOnnxEmbeddings(minilm_onnx, device="cpu", threads=1))
    store.add_documents([Document(page_content=text, metadata={"i": i}) for i, text in enumerate(corpus)])
    compressor = LangChainRerank(reranker=reranker, top_n=4)
    for query in QUERIES:
        retrieved = store.similarity_search(query, k=12)
        expected = reranker.rerank(query, [doc.page_content for doc in retrieved], top_k=4)
        kept = compressor.compress_documents(retrieved, query)
        assert [doc.page_content for doc in kept] == [r.text for r in expected]
        assert [doc.metadata["i"] for doc in kept] == [retrieved[r.index].metadata["i"] for r in expected]
        assert [doc.metadata["relevance_score"] for doc in kept] == [r.score for r in expected]
    # async (the base class's thread) and normalised scores
    kept = asyncio.run(compressor.acompress_documents(retrieved, query))
    assert [doc.metadata["relevance_score"] for doc in kept] == [r.score for r in expected]
    normalized = LangChainRerank(reranker=reranker, top_n=2, normalize=True).compress_documents(retrieved, query)
    assert [d.metadata["relevance_score"] for d in normalized] == [
        r.score for r in reranker.rerank(query, [d.page_content for d in retrieved], top_k=2, normalize=True)
    ]


def test_langchain_rerank_loads_by_folder(exported):
    compressor = LangChainRerank(exported["bert-rerank"], device="cpu", threads=1, top_n=1)
    assert len(compressor.compress_documents([Document(page_content="a"), Document(page_content="b")], "q")) == 1
    assert compressor.compress_documents([], "q") == []


# LlamaIndex


def test_llama_index_retrieves_numpy_top_k(embedder, corpus):
    nodes = [TextNode(text=text, id_=str(i)) for i, text in enumerate(corpus)]
    index = VectorStoreIndex(nodes, embed_model=BgeOnnxEmbedding(embedder=embedder, embed_batch_size=16))
    retriever = index.as_retriever(similarity_top_k=K)
    for query in QUERIES:
        expected, scores = numpy_top(embedder, corpus, query, K)
        found = retriever.retrieve(query)
        assert [int(n.node.node_id) for n in found] == expected, query
        assert [n.score for n in found] == pytest.approx(scores, abs=1e-5)


def test_llama_index_query_and_text_embeddings(instructed, corpus):
    model = BgeOnnxEmbedding(embedder=instructed)
    query = QUERIES[2]
    vector = model.get_query_embedding(query)
    np.testing.assert_array_equal(np.float32(vector), instructed.encode_queries(query))
    assert not np.allclose(vector, instructed.encode(query), atol=1e-3)
    np.testing.assert_array_equal(np.float32(model.get_text_embedding(corpus[0])), instructed.encode_corpus(corpus[0]))
    batch = model.get_text_embedding_batch(corpus)
    np.testing.assert_array_equal(np.float32(batch), instructed.encode_corpus(corpus))

    async def asynchronous():
        return (
            await model.aget_query_embedding(query),
            await model.aget_text_embedding(corpus[0]),
            await model.aget_text_embedding_batch(corpus),
        )

    a_query, a_text, a_batch = asyncio.run(asynchronous())
    assert a_query == vector and a_text == model.get_text_embedding(corpus[0]) and a_batch == batch


def test_llama_index_rerank_reorders_as_reranker(minilm_onnx, reranker, corpus):
    nodes = [TextNode(text=text, id_=str(i)) for i, text in enumerate(corpus)]
    index = VectorStoreIndex(nodes, embed_model=BgeOnnxEmbedding(minilm_onnx, device="cpu", threads=1))
    postprocessor = LlamaIndexRerank(reranker=reranker, top_n=4)
    for query in QUERIES:
        retrieved = index.as_retriever(similarity_top_k=12).retrieve(query)
        expected = reranker.rerank(query, [n.node.get_content() for n in retrieved], top_k=4)
        kept = postprocessor.postprocess_nodes(retrieved, query_str=query)
        assert all(isinstance(n, NodeWithScore) for n in kept)
        assert [n.node.node_id for n in kept] == [retrieved[r.index].node.node_id for r in expected]
        assert [n.score for n in kept] == [r.score for r in expected]
    kept = asyncio.run(postprocessor.apostprocess_nodes(retrieved, query_str=query))
    assert [n.score for n in kept] == [r.score for r in expected]


def test_llama_index_rerank_loads_by_folder(exported):
    postprocessor = LlamaIndexRerank(exported["bert-rerank"], device="cpu", threads=1, top_n=1)
    nodes = [NodeWithScore(node=TextNode(text=t), score=0.0) for t in ("a", "b")]
    assert len(postprocessor.postprocess_nodes(nodes, query_str="q")) == 1
    assert postprocessor.postprocess_nodes([], query_str="q") == []
    with pytest.raises(ValueError, match="needs the query"):
        postprocessor.postprocess_nodes(nodes)


# bad input and construction


def test_non_str_text_names_its_index(exported):
    embedder = Embedder(exported["bert-cls"], device="cpu", threads=1)
    with pytest.raises(InputTypeError, match=r"passages\[2\] is int 7, expected str"):
        BgeOnnxEmbeddings(embedder=embedder).embed_documents(["a", "b", 7])
    with pytest.raises(InputTypeError, match=r"query is NoneType None, expected str"):
        BgeOnnxEmbeddings(embedder=embedder).embed_query(None)
    model = BgeOnnxEmbedding(embedder=embedder, embed_batch_size=4)
    with pytest.raises(InputTypeError, match=r"texts\[9\] is bytes b'x', expected str"):
        model.get_text_embedding_batch(["a"] * 9 + [b"x"])  # in the third piece of 4: the index is the caller's
    with pytest.raises(InputTypeError, match=r"texts\[5\] is int 1, expected str"):
        asyncio.run(model.aget_text_embedding_batch(["a"] * 5 + [1]))
    with pytest.raises(InputTypeError, match=r"query is int 3, expected str"):
        model.get_query_embedding(3)


def test_model_or_built_one(exported):
    embedder = Embedder(exported["bert-cls"], device="cpu", threads=1)
    for make, name in ((BgeOnnxEmbeddings, "embedder"), (BgeOnnxEmbedding, "embedder")):
        with pytest.raises(ValueError, match=f"either model= .* or {name}="):
            make()
        with pytest.raises(ValueError, match=f"either model= .* or {name}="):
            make(exported["bert-cls"], embedder=embedder)
    with pytest.raises(ValueError, match="either model= .* or reranker="):
        LlamaIndexRerank()
    with pytest.raises(ValueError, match="either model= .* or reranker="):
        LangChainRerank()
    # options beside a built one were ignored without a word
    for make in (BgeOnnxEmbeddings, BgeOnnxEmbedding):
        with pytest.raises(ValueError, match=r"precision=, threads= given beside embedder=, which was loaded with its "
                                             r"own options: pass them when building the Embedder"):
            make(embedder=embedder, precision="int8", threads=2)
        assert make(embedder=embedder, device="auto").embedder is embedder  # a default is not an option given



def test_load_options_are_defined_once(exported):
    """Every class takes LoadOptions' names with its defaults, and every adapter refuses a name it does not know as
    the class itself would, naming itself and the nearest keyword."""
    defaults = {field.name: field.default for field in dataclasses.fields(LoadOptions)}
    for cls in (Embedder, Reranker, M3Embedder):
        parameters = inspect.signature(cls.__init__).parameters
        assert {name: parameters[name].default for name in defaults} == defaults, cls
    folder = exported["bert-cls"]
    for make in (BgeOnnxEmbeddings, BgeOnnxEmbedding, LangChainRerank, LlamaIndexRerank, Embedder):
        with pytest.raises(InputTypeError, match=rf"^{make.__name__}\(\) got an unexpected keyword argument "
                                                 r"'precison' \(did you mean 'precision'\?\)"):
            make(folder, precison="fp32")
    with pytest.raises(InputTypeError, match=r"^embed_dataset\(\) got an unexpected keyword argument 'thread' "
                                             r"\(did you mean 'threads'\?\)"):
        embed_dataset(None, folder, thread=2)
    with pytest.raises(ValueError, match="max_tokens must be a positive int, got 0"):
        BgeOnnxEmbeddings(folder, max_tokens=0)
    loaded = BgeOnnxEmbeddings(folder, device="cpu", precision="fp32", max_length=32, max_tokens=64).embedder
    assert (loaded.precision.value, loaded.max_length, loaded.max_tokens) == ("fp32", 32, 64)

# imports


def _run(script: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)


@pytest.mark.parametrize(("module", "blocked", "extra"), [
    ("bge_onnx.langchain", "langchain_core", "langchain"),
    ("bge_onnx.llama_index", "llama_index", "llamaindex"),
])
def test_missing_package_says_the_pip_line(module, blocked, extra):
    # sys.modules[name] = None makes `import name` fail as if the package were not installed
    result = _run(
        f"import sys; sys.modules[{blocked!r}] = None\n"
        f"try:\n    import {module}\n"
        "except ImportError as err:\n    print(type(err).__name__, isinstance(err, __import__('bge_onnx').BgeOnnxError), err)"
    )
    line = result.stdout.strip()
    assert line.startswith("MissingExtraError True "), line  # also an ImportError: `except ImportError` works
    assert line.endswith(install_hint(extra)), line


def test_import_bge_onnx_loads_no_adapter(exported):
    script = (
        "import json, sys, bge_onnx, bge_onnx.cli\n"
        f"bge_onnx.Embedder({str(exported['bert-cls'])!r}, device='cpu').encode_queries('q')\n"
        "print(json.dumps(sorted(sys.modules)))"
    )
    result = _run(script)
    loaded = set(json.loads(result.stdout.strip().splitlines()[-1]))
    assert "bge_onnx.embedder" in loaded  # the check sees real imports
    assert not {m for m in loaded if m.split(".")[0] in ("langchain_core", "llama_index", "pydantic")}
    assert loaded.isdisjoint({"bge_onnx.langchain", "bge_onnx.llama_index", "bge_onnx.ray"})


def test_model_name_and_llama_index_round_trip(exported):
    # the frameworks' own classes take model_name=; LlamaIndex's to_dict/from_dict must load the same model again
    folder = str(exported["bert-cls"])
    texts = ["a round trip", "through to_dict"]
    built = BgeOnnxEmbedding(model_name=folder, device="cpu", precision="fp32", max_length=64)
    written = built.to_dict()
    assert {key: written[key] for key in ("device", "precision", "max_length")} == {
        "device": "cpu", "precision": "fp32", "max_length": 64}  # at the top level, as keywords
    again = BgeOnnxEmbedding.from_dict(written)
    assert (again.embedder.folder, again.embedder.max_length, again.embedder.precision.value) == (
        exported["bert-cls"], 64, "fp32")
    np.testing.assert_allclose(again.get_text_embedding_batch(texts), built.get_text_embedding_batch(texts), atol=1e-6)
    shared = BgeOnnxEmbedding(embedder=Embedder(folder, device="cpu", max_length=32))
    from_shared = BgeOnnxEmbedding.from_dict(shared.to_dict())
    assert from_shared.embedder.folder == exported["bert-cls"] and from_shared.embedder.max_length == 32
    np.testing.assert_allclose(from_shared.get_query_embedding("q"), shared.get_query_embedding("q"), atol=1e-6)

    by_name = BgeOnnxEmbeddings(model_name=folder, device="cpu")
    np.testing.assert_allclose(by_name.embed_documents(texts), Embedder(folder, device="cpu").encode_corpus(texts),
                               atol=1e-6)
    for make in (BgeOnnxEmbeddings, BgeOnnxEmbedding):
        with pytest.raises(ValueError, match="give model= or model_name= \\(the same thing\\), not both"):
            make(folder, model_name=folder)
