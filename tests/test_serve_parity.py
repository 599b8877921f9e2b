"""bge-onnx serve as a drop-in for text-embeddings-inference and OpenAI-style clients: huggingface_hub's
InferenceClient pointed at the server's URL, TEI's other routes (/similarity, /predict, /decode, /embed_all, /ping,
/invocations), byte offsets, TEI's metric names, CORS, input_type, /v1/models, a 413 that urllib reads, a
disconnected client's request left uncomputed. Real server processes; answers compared with in-process models."""

from __future__ import annotations

import json
import socket
import time

import numpy as np
import pytest
import test_serve
from test_serve import LONG, Server, _metric, assert_same_vectors, call

from bge_onnx import Embedder

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

embedder, reranker = test_serve.embedder, test_serve.reranker  # the same fp32 models, as fixtures here too


@pytest.fixture(scope="module")
def server(exported, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-parity") / "server.log"
    srv = Server(str(exported["bert-cls"]), "--reranker", str(exported["bert-rerank"]), "--precision", "fp32",
                 "--max-client-batch-size", "8", "--payload-limit", "20000", log=log)
    yield srv
    srv.stop()


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def test_huggingface_hubs_inference_client_at_the_servers_url(server, embedder):
    hub = pytest.importorskip("huggingface_hub")
    client = hub.InferenceClient(model=server.base)
    texts = ["The giant panda is a bear.", "Paris is the capital of France."]
    got = client.feature_extraction(texts[0])
    assert got.shape == (1, embedder.dim)
    assert_same_vectors(got, embedder.encode(texts[:1]))
    assert_same_vectors(client.feature_extraction(texts), embedder.encode(texts))
    scores = client.sentence_similarity("a bear from China", texts)
    vectors = embedder.encode(["a bear from China", *texts])
    np.testing.assert_allclose(scores, vectors[1:] @ vectors[0], atol=1e-5)


def test_root_invocations_ping_and_similarity(server, embedder):
    texts = ["first text", "a second one"]
    for path in ("/", "/invocations"):
        status, body, _ = call(server.base, "POST", path, {"inputs": texts})
        assert status == 200, body
        assert_same_vectors(body, embedder.encode(texts))
    for path in ("/ping", "/", "/health"):
        assert call(server.base, "GET", path)[0] == 200
    request = {"inputs": {"source_sentence": "what is a panda?", "sentences": texts},
               "parameters": {"prompt_name": "query", "truncate": True}}
    status, body, _ = call(server.base, "POST", "/similarity", request)
    assert status == 200
    vectors = embedder.encode_queries(["what is a panda?", *texts])  # the prompt goes before every text
    np.testing.assert_allclose(body, vectors[1:] @ vectors[0], atol=1e-5)
    cases = [
        ({"inputs": {"source_sentence": "q", "sentences": []}}, 400, "inputs.sentences cannot be empty"),
        ({"inputs": {"source_sentence": "q", "sentences": ["x"] * 8}}, 422,
         "inputs.sentences has 8 items; the limit is 7"),
        ({"inputs": {"source_sentence": 3, "sentences": ["x"]}}, 422, "inputs.source_sentence must be a string"),
        ({"inputs": "q"}, 422, "inputs must be an object"),
        ({"inputs": {"source_sentence": "q", "sentences": [LONG]}}, 422, "inputs[1] has at least"),
    ]
    for request, status_code, message in cases:
        status, body, _ = call(server.base, "POST", "/similarity", request)
        assert status == status_code and message in body["error"], (request, body)


def test_predict_scores_pairs_as_the_reranker_does(server, reranker):
    pairs = [["what is a panda?", "The giant panda is a bear."], ["what is a panda?", "Paris is in France."]]
    expected = reranker.compute_score([tuple(p) for p in pairs])
    status, body, _ = call(server.base, "POST", "/predict", {"inputs": pairs[0]})
    assert status == 200 and len(body) == 1 and body[0]["label"] == "LABEL_0"
    assert body[0]["score"] == pytest.approx(1 / (1 + np.exp(-expected[0])), abs=1e-6)
    status, body, _ = call(server.base, "POST", "/predict", {"inputs": pairs, "raw_scores": True})
    assert status == 200 and [row[0]["score"] for row in body] == pytest.approx(expected.tolist(), abs=1e-5)
    cases = [
        ({"inputs": "one text"}, 422, "inputs is one text; this server's reranker scores pairs"),
        ({"inputs": [["q"]]}, 422, "inputs[0] is one text"),
        ({"inputs": [["q", "d", "e"]]}, 422, "inputs[0] must be [query, passage]"),
        ({"inputs": []}, 400, "inputs cannot be empty"),
        ({"inputs": [["q", "d"]] * 9}, 422, "inputs has 9 items; the limit is 8"),
        ({"inputs": ["q", LONG]}, 422, "inputs has at least"),
        ({"inputs": ["q", "\ud800"]}, 422, "inputs[1] cannot be encoded as UTF-8"),
    ]
    for request, status_code, message in cases:
        status, body, _ = call(server.base, "POST", "/predict", request)
        assert status == status_code and message in body["error"], (request, body)


def test_tokenize_gives_byte_offsets_and_decode_inverts_it(server, embedder):
    text = "naïve café: 机器学习 🙂 ok"
    status, body, _ = call(server.base, "POST", "/tokenize", {"inputs": text})
    assert status == 200
    data = text.encode("utf-8")
    for token in body[0]:
        if not token["special"]:
            assert data[token["start"]:token["stop"]].decode("utf-8") == token["text"], token
    ids = [token["id"] for token in body[0]]
    status, decoded, _ = call(server.base, "POST", "/decode", {"ids": ids})
    assert status == 200 and decoded == [embedder_decode(embedder, ids, skip=True)]
    status, decoded, _ = call(server.base, "POST", "/decode", {"ids": [ids, ids[:3]], "skip_special_tokens": False})
    assert decoded == [embedder_decode(embedder, ids, skip=False), embedder_decode(embedder, ids[:3], skip=False)]
    cases = [
        ({"ids": []}, 400, "ids cannot be empty"),
        ({"ids": [1, 10**9]}, 422, "ids[1] is 1000000000, not a token id of this model"),
        ({"ids": [[1], ["x"]]}, 422, "ids[1][0] is 'x', not a token id"),
        ({"ids": "1 2"}, 422, "ids must be a list of token ids"),
    ]
    for request, status_code, message in cases:
        status, body, _ = call(server.base, "POST", "/decode", request)
        assert status == status_code and message in body["error"], (request, body)


def embedder_decode(embedder: Embedder, ids: list[int], *, skip: bool) -> str:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(embedder.folder / "tokenizer.json")).decode(ids, skip_special_tokens=skip)


def test_embed_all_is_refused_clearly(server):
    status, body, _ = call(server.base, "POST", "/embed_all", {"inputs": "x"})
    assert status == 400 and "embed_all is not available" in body["error"]


def test_teis_metric_names(server):
    call(server.base, "POST", "/embed", {"inputs": "counted"})
    call(server.base, "POST", "/embed", {"inputs": []})
    status, text, _ = call(server.base, "GET", "/metrics")
    assert status == 200
    for name in ('te_request_count{method="single"}', 'te_request_success{method="single"}',
                 'te_request_failure{err="validation"}', "te_request_duration_bucket", "te_embed_count",
                 "te_request_tokenization_duration_bucket", "te_request_queue_duration_bucket",
                 "te_request_inference_duration_bucket", "te_batch_next_size_bucket", "te_batch_next_tokens_bucket",
                 "te_queue_size", "te_request_input_length_bucket", "te_predict_duration_bucket"):
        assert name in text, name
    assert _metric(text, 'te_request_success{method="single"}') >= 1
    assert "bge_onnx_requests_total{" in text  # ours stay
    assert 'status="499"' not in text  # a connection closed after its answer is not a client that went away


def test_openai_input_type_truncate_models_and_the_rerank_name(server, embedder, exported):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0)
    queries = ["what is a panda?", "capital of France"]
    for input_type in ("query", "search_query"):
        answer = client.embeddings.create(model="m", input=queries, extra_body={"input_type": input_type})
        assert_same_vectors([d.embedding for d in answer.data], embedder.encode_queries(queries))
    answer = client.embeddings.create(model="m", input=queries, extra_body={"input_type": "search_document"})
    assert_same_vectors([d.embedding for d in answer.data], embedder.encode(queries))
    answer = client.embeddings.create(model="m", input=["ok", LONG], extra_body={"truncate": True})
    with pytest.warns(UserWarning, match="truncated"):
        assert_same_vectors([d.embedding for d in answer.data], embedder.encode(["ok", LONG]))
    answer = client.embeddings.create(model="m", input=["x"] * 20)  # over the TEI routes' 8, under OpenAI's 2048
    assert len(answer.data) == 20
    assert sorted(m.id for m in client.models.list()) == sorted([str(exported["bert-cls"]),
                                                                   str(exported["bert-rerank"])])
    status, body, _ = call(server.base, "POST", "/v1/rerank", {"query": "q", "documents": ["a", "b"]})
    assert status == 200 and body["model"] == str(exported["bert-rerank"])


def test_a_body_over_the_limit_is_read_and_answered_413(server):
    # urllib sends its whole body before it reads: the server drains it, so the client sees the 413, not a reset
    raw = b'{"inputs": "' + b"x" * 5_000_000 + b'"}'
    status, body, _ = call(server.base, "POST", "/embed", raw=raw)
    assert status == 413 and "the limit is 20000 (--payload-limit)" in body["error"]
    status, body, _ = call(server.base, "POST", "/v1/embeddings", raw=raw)
    assert status == 413 and body["error"]["code"] == "payload_too_large"


def test_a_request_whose_client_disconnects_is_never_computed(exported, tmp_path):
    srv = Server(str(exported["bert-cls"]), "--precision", "fp32", "--max-wait-ms", "3000", log=tmp_path / "log")
    try:
        _, before, _ = call(srv.base, "GET", "/metrics")
        body = json.dumps({"inputs": ["abandoned"]}).encode()
        head = b"POST /embed HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
        with socket.create_connection(("127.0.0.1", srv.port)) as slow:
            # a request still sending its body is on its way: the queue waits --max-wait-ms for it ...
            slow.sendall(head % len(body) + body[:5])
            time.sleep(0.3)
            with socket.create_connection(("127.0.0.1", srv.port)) as sock:
                sock.sendall(head % len(body) + body)
                time.sleep(0.5)  # ... so this one waits in the queue for company; then its client goes away
            gone = 'bge_onnx_requests_total{route="/embed",status="499"}'
            deadline = time.monotonic() + 10
            while _metric(call(srv.base, "GET", "/metrics")[1], gone) < 1 and time.monotonic() < deadline:
                time.sleep(0.1)
        # the slow client went too, mid-body: also 499, nothing logged as a failure
        deadline = time.monotonic() + 10
        while _metric(call(srv.base, "GET", "/metrics")[1], gone) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(3.0)  # past the wait: had the first stayed queued, the model would have run now
        _, after, _ = call(srv.base, "GET", "/metrics")
        assert _metric(after, gone) == 2, after
        key = 'bge_onnx_batch_texts_count{model="embed"}'
        assert _metric(after, key) == _metric(before, key)
        assert _metric(after, 'bge_onnx_queue_depth{model="embed"}') == 0
        assert call(srv.base, "POST", "/embed", {"inputs": "next"})[0] == 200
        _, after, _ = call(srv.base, "GET", "/metrics")
        assert _metric(after, gone) == 2 and 'status="500"' not in after
        assert "Traceback" not in (tmp_path / "log").read_text()
    finally:
        srv.stop()


def test_cors_only_when_asked(exported):
    from starlette.testclient import TestClient

    from bge_onnx.serve import ServeConfig, create_app

    preflight = {"origin": "https://app.example", "access-control-request-method": "POST",
                 "access-control-request-headers": "content-type"}
    app = create_app(ServeConfig(str(exported["bert-cls"]), precision="fp32", api_key="k",
                                 cors_allow_origin=("https://app.example",)))
    with TestClient(app) as client:
        response = client.options("/embed", headers=preflight)
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == "https://app.example"
        response = client.options("/embed", headers={**preflight, "origin": "https://evil.example"})
        assert "access-control-allow-origin" not in response.headers
    app = create_app(ServeConfig(str(exported["bert-cls"]), precision="fp32"))
    with TestClient(app) as client:
        response = client.get("/health", headers={"origin": "https://app.example"})
        assert "access-control-allow-origin" not in response.headers


def test_json_answers_without_orjson_are_the_same_numbers(monkeypatch):
    from bge_onnx.serve import render

    rows = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    content = {"data": [{"embedding": rows[1], "index": 1}], "rows": rows, "score": np.float32(0.5)}
    fast = json.loads(render.JSONResponse(content).body)
    monkeypatch.setattr(render, "orjson", None)
    plain = json.loads(render.JSONResponse(content).body)
    assert np.array_equal(np.asarray(fast["rows"], np.float32), rows)  # float32's shortest form round-trips
    assert np.array_equal(np.asarray(plain["rows"], np.float32), rows)
    assert np.array_equal(np.asarray(fast["data"][0]["embedding"], np.float32), rows[1]) and fast["score"] == 0.5
    assert plain["data"][0]["index"] == 1 and plain["score"] == 0.5
