"""bge-onnx serve: real server processes on 127.0.0.1, real HTTP clients (urllib, the official openai client), answers
compared with in-process Embedder / Reranker on the same folders; limits, overload, auth, shutdown, batching."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from bge_onnx import Embedder, Reranker

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

LONG = " ".join(["panda"] * 400)  # over the tiny models' 128 tokens, long enough to be counted on a prefix only
MID = " ".join(["panda"] * 150)  # over 128 tokens, short enough to be counted in full
DEEP = 100_000  # JSON nesting past every Python's parser (3.13 parses 5,000 deep), 200 KB


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def call(base: str, method: str, path: str, body: object = None, *, raw: bytes | None = None,
         headers: dict | None = None, timeout: float = 60) -> tuple[int, object, dict]:
    """(status, parsed JSON body or text, headers) of one request; error statuses are returned, not raised."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(base + path, data=data, method=method,
                                     headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, payload, head = response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as err:
        status, payload, head = err.code, err.read(), dict(err.headers)
    try:
        return status, json.loads(payload), head
    except ValueError:
        return status, payload.decode(), head


class Server:
    """``python -m bge_onnx serve ...`` on a free port, up once /health answers 200."""

    def __init__(self, *args: str, env: dict | None = None, log: Path) -> None:
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bge_onnx", "serve", *args, "--port", str(self.port)],
            stdout=log.open("wb"), stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
        )
        deadline = time.monotonic() + 120
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited {self.process.returncode}: {log.read_text()}")
            with contextlib.suppress(OSError):
                if call(self.base, "GET", "/health", timeout=2)[0] == 200:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not healthy in time: {log.read_text()}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(30)


@pytest.fixture(scope="module")
def server(exported, tmp_path_factory):
    """fp32 embedder + reranker; small limits; 20 ms for company, so concurrent requests merge."""
    log = tmp_path_factory.mktemp("serve") / "server.log"
    srv = Server(str(exported["bert-cls"]), "--reranker", str(exported["bert-rerank"]), "--precision", "fp32",
                 "--max-client-batch-size", "8", "--openai-max-inputs", "12", "--payload-limit", "20000",
                 "--max-wait-ms", "20", log=log)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def embedder(exported):
    return Embedder(exported["bert-cls"], device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def reranker(exported):
    return Reranker(exported["bert-rerank"], device="cpu", precision="fp32")


def assert_same_vectors(got, expected) -> None:
    got = np.asarray(got, dtype=np.float32)
    assert got.shape == expected.shape
    cosines = (got * expected).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(expected, axis=1)
    assert cosines.min() >= 0.99999, cosines


def test_import_bge_onnx_does_not_import_the_server():
    script = ("import sys, bge_onnx, bge_onnx.cli; bad = [m for m in ('starlette', 'uvicorn', 'prometheus_client', "
              "'anyio', 'bge_onnx.serve') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_serve_without_the_extra_says_what_to_install(exported):
    script = ("import sys; sys.modules['uvicorn'] = None; from bge_onnx.cli import main; "
              f"sys.exit(main(['serve', {str(exported['bert-cls'])!r}]))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 1
    assert "serve needs starlette, uvicorn and prometheus-client" in result.stderr
    assert 'pip install "bge-onnx[serve]"' in result.stderr and "Traceback" not in result.stderr


def test_tei_embed_matches_in_process(server, embedder):
    texts = ["The giant panda is a bear.", "", "Paris is the capital of France."]
    status, body, headers = call(server.base, "POST", "/embed", {"inputs": texts})
    assert status == 200, body
    assert_same_vectors(body, embedder.encode(texts))
    for name in ("x-compute-time", "x-queue-time", "x-inference-time", "x-tokenization-time", "x-compute-tokens"):
        assert int(headers[name]) >= 0
    timing = dict(part.strip().split(";dur=") for part in headers["server-timing"].split(","))
    phases = {name: float(value) for name, value in timing.items()}
    assert list(phases) == ["tokenize", "queue", "inference", "hop", "total"] and min(phases.values()) >= 0
    assert phases["tokenize"] + phases["queue"] + phases["inference"] + phases["hop"] <= phases["total"]
    assert abs(int(headers["x-inference-time"]) - phases["inference"]) < 1.001  # TEI's header: whole milliseconds
    status, body, _ = call(server.base, "POST", "/embed", {"inputs": "one text"})
    assert status == 200 and len(body) == 1  # always a 2-D list
    assert_same_vectors(body, embedder.encode(["one text"]))
    status, body, _ = call(server.base, "POST", "/embed", {"inputs": texts, "normalize": False})
    np.testing.assert_allclose(np.array(body, np.float32), embedder.encode(texts, normalize=False), rtol=1e-5, atol=1e-6)
    status, body, _ = call(server.base, "POST", "/embed", {"inputs": ["what is a panda?"], "prompt_name": "query"})
    assert status == 200
    assert_same_vectors(body, embedder.encode_queries(["what is a panda?"]))
    status, body, _ = call(server.base, "POST", "/embed", {"inputs": [LONG], "truncate": True})
    assert status == 200
    with pytest.warns(UserWarning, match="truncated"):
        assert_same_vectors(body, embedder.encode([LONG]))


def test_openai_client_base64_and_float(server, embedder):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0)
    texts = ["first text", "a second, longer text about pandas"]
    expected = embedder.encode(texts)
    answer = client.embeddings.create(model="bge-small", input=texts)  # the client asks for base64 here
    assert [d.index for d in answer.data] == [0, 1] and answer.model == "bge-small"
    assert_same_vectors([d.embedding for d in answer.data], expected)
    assert answer.usage.prompt_tokens == answer.usage.total_tokens == sum(embedder_tokens(embedder, texts))
    answer = client.embeddings.create(model="bge-small", input="first text", encoding_format="float")
    assert_same_vectors([answer.data[0].embedding], expected[:1])
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model="bge-small", input=texts, dimensions=8)
    assert "not trained for truncated" in str(caught.value)


def plain_tokenizer(embedder: Embedder):
    """The model's tokenizer.json without the padding and truncation some files have built in."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(embedder.folder / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def embedder_tokens(embedder: Embedder, texts: list[str]) -> list[int]:
    return [len(e) for e in plain_tokenizer(embedder).encode_batch(texts)]


def test_openai_wire_format_and_errors(server, embedder):
    status, body, _ = call(server.base, "POST", "/v1/embeddings", {"input": ["a b"], "encoding_format": "base64"})
    assert status == 200 and body["object"] == "list" and body["data"][0]["object"] == "embedding"
    vector = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), dtype="<f4")
    assert_same_vectors([vector], embedder.encode(["a b"]))
    status, body, _ = call(server.base, "POST", "/embeddings", {"input": "a b"})
    assert status == 200 and isinstance(body["data"][0]["embedding"], list)
    cases = [
        ({"input": []}, "input cannot be empty", "input"),
        ({"model": "x"}, "input is required", "input"),
        ({"input": [1, 2, 3]}, "input[0] is a token-id array", "input"),
        ({"input": ["ok", 7.5]}, "input[1] is float 7.5, expected a string", "input"),
        ({"input": ["x"] * 13}, "input has 13 items; the limit is 12 per request (--openai-max-inputs)", "input"),
        ({"input": "x", "input_type": "classification"}, "input_type 'classification' is not one of", "input_type"),
        ({"input": "x", "prompt_name": "doc"}, "prompt_name 'doc' is not one of", "prompt_name"),
        ({"input": "x", "truncate": "yes"}, "truncate must be true or false", "truncate"),
        ({"input": ["ok", MID]}, "input[1] has 152 tokens; the model's limit is 128", "input"),
        ({"input": ["ok", LONG]}, "input[1] has at least ", "input"),
        ({"input": "x", "encoding_format": "int8"}, "encoding_format must be 'float' or 'base64'", "encoding_format"),
        ({"input": "x", "dimensions": 8}, "dimensions=8 is not supported", "dimensions"),
        ({"input": "\ud800"}, "input cannot be encoded as UTF-8 (surrogates not allowed at position 0)", "input"),
        ({"input": ["ok", "a\udfffb"]}, "input[1] cannot be encoded as UTF-8", "input"),
        ({"input": "x", "model": "m\ud800"}, "model cannot be encoded as UTF-8", "model"),  # echoed in the answer
    ]
    for request, message, param in cases:
        status, body, _ = call(server.base, "POST", "/v1/embeddings", request)
        assert status == 400, (request, body)
        assert message in body["error"]["message"] and body["error"]["param"] == param
        assert body["error"]["type"] == "invalid_request_error" and body["error"]["code"]
    status, body, _ = call(server.base, "POST", "/v1/embeddings", raw=b"{not json")
    assert status == 400 and "the body is not valid JSON" in body["error"]["message"]
    status, body, _ = call(server.base, "POST", "/v1/embeddings", raw=b'{"input": "' + b"x" * 30000 + b'"}')
    assert status == 413 and "the limit is 20000 (--payload-limit)" in body["error"]["message"]


def test_tei_errors(server):
    cases = [
        ("/embed", {"inputs": []}, 400, "Empty", "inputs cannot be empty"),
        ("/embed", {"inputs": 5}, 422, "Validation", "inputs must be a string or a list of strings, got int 5"),
        ("/embed", {"inputs": ["x"] * 9}, 422, "Validation", "inputs has 9 items; the limit is 8"),
        ("/embed", {"inputs": [MID]}, 422, "Validation", "inputs[0] has 152 tokens; the model's limit is 128"),
        ("/embed", {"inputs": [LONG]}, 422, "Validation", "inputs[0] has at least "),
        ("/embed", {"inputs": "x", "normalize": "yes"}, 422, "Validation", "normalize must be true or false"),
        ("/embed", {"inputs": "x", "prompt_name": "doc"}, 422, "Validation", "prompt_name 'doc' is not one of"),
        ("/embed", {"inputs": "x", "truncation_direction": "left"}, 422, "Validation", "truncates on the right"),
        ("/embed", ["x"], 422, "Validation", "the body must be a JSON object"),
        ("/rerank", {"query": "q", "texts": []}, 400, "Empty", "texts cannot be empty"),
        ("/rerank", {"query": 1, "texts": ["a"]}, 422, "Validation", "query must be a string"),
        ("/rerank", {"query": "q", "texts": "a"}, 422, "Validation", "texts must be a list of strings"),
        ("/rerank", {"query": "q", "texts": [MID]}, 422, "Validation", "texts[0] has 154 tokens"),
        ("/rerank", {"query": "q", "texts": [LONG]}, 422, "Validation", "texts[0] has at least "),
        ("/embed", {"inputs": "\ud800"}, 422, "Validation", "inputs cannot be encoded as UTF-8"),
        ("/embed", {"inputs": ["ok", "\ud800"]}, 422, "Validation", "inputs[1] cannot be encoded as UTF-8"),
        ("/tokenize", {"inputs": "\ud800"}, 422, "Validation", "inputs cannot be encoded as UTF-8"),
        ("/rerank", {"query": "\ud800", "texts": ["a"]}, 422, "Validation", "query cannot be encoded as UTF-8"),
        ("/rerank", {"query": "q", "texts": ["a", "\udc00"]}, 422, "Validation", "texts[1] cannot be encoded"),
        ("/embed_sparse", {"inputs": "x"}, 400, "Validation", "this server's model has no lexical weights: serve a bge-m3"),
        ("/embed_colbert", {"inputs": "x"}, 400, "Validation", "this server's model has no ColBERT vectors"),
    ]
    for path, request, status_code, error_type, message in cases:
        status, body, _ = call(server.base, "POST", path, request)
        assert (status, body["error_type"]) == (status_code, error_type), (request, body)
        assert message in body["error"], body
    status, body, _ = call(server.base, "POST", "/embed", raw=b'{"inputs": ')
    assert status == 422 and "the body is not valid JSON" in body["error"]
    # a lone surrogate leaves the keep-alive connection open: the next request on it is answered
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        for payload, expected in (('{"inputs": "\\ud800"}', 422), ('{"inputs": "fine"}', 200)) * 3:
            connection.request("POST", "/embed", body=payload, headers={"content-type": "application/json"})
            response = connection.getresponse()
            response.read()
            assert response.status == expected
    finally:
        connection.close()
    status, body, _ = call(server.base, "POST", "/embed", raw=b'{"inputs": "' + b"x" * 30000 + b'"}')
    assert status == 413 and "--payload-limit" in body["error"]
    status, body, _ = call(server.base, "GET", "/embed")
    assert status == 405


def test_rerank_tei_and_cohere_match_in_process(server, reranker):
    query, texts = "what is a panda?", ["hi", "The giant panda is a bear.", "Paris is in France."]
    expected = reranker.rerank(query, texts, normalize=True)
    status, body, _ = call(server.base, "POST", "/rerank", {"query": query, "texts": texts, "return_text": True})
    assert status == 200
    assert [r["index"] for r in body] == [e.index for e in expected]
    assert [r["score"] for r in body] == pytest.approx([e.score for e in expected], abs=1e-6)
    assert [r["text"] for r in body] == [e.text for e in expected]
    raw = reranker.compute_score([(query, t) for t in texts])
    status, body, _ = call(server.base, "POST", "/rerank", {"query": query, "texts": texts, "raw_scores": True})
    by_index = sorted((r["index"], r["score"]) for r in body)
    assert [i for i, _ in by_index] == list(range(len(raw)))
    assert [score for _, score in by_index] == pytest.approx(raw.tolist(), abs=1e-5)
    assert "text" not in body[0]
    request = {"query": query, "documents": [texts[0], {"text": texts[1]}, texts[2]], "top_n": 2,
               "return_documents": True, "model": "my-reranker"}
    status, body, _ = call(server.base, "POST", "/v1/rerank", request)
    assert status == 200 and body["model"] == "my-reranker" and body["usage"]["total_tokens"] > 0
    assert [r["index"] for r in body["results"]] == [e.index for e in expected[:2]]
    assert [r["relevance_score"] for r in body["results"]] == pytest.approx([e.score for e in expected[:2]], abs=1e-6)
    assert body["results"][0]["document"] == {"text": expected[0].text}
    status, body, _ = call(server.base, "POST", "/v1/rerank", {"query": query, "documents": texts, "top_n": 0})
    assert status == 400 and body["error"]["param"] == "top_n"
    status, body, _ = call(server.base, "POST", "/v1/rerank", {"query": query, "documents": texts, "model": "\udc00"})
    assert status == 400 and body["error"]["param"] == "model" and "cannot be encoded as UTF-8" in body["error"]["message"]


def test_tokenize_info_health_metrics(server, embedder):
    status, body, _ = call(server.base, "POST", "/tokenize", {"inputs": ["hello world"]})
    assert status == 200 and len(body) == 1
    assert body[0][0]["special"] and not body[0][1]["special"]
    assert "".join(t["text"] for t in body[0] if not t["special"]).replace("##", "") in ("helloworld", "hello world")
    assert [t["id"] for t in body[0]] == embedder_ids(embedder, "hello world")
    status, info, _ = call(server.base, "GET", "/info")
    assert status == 200 and info["model_dtype"] == "float32" and info["model_type"] == {"embedding": {"pooling": "cls"}}
    assert info["max_input_length"] == 128 and info["max_client_batch_size"] == 8 and info["payload_limit"] == 20000
    assert info["batching"]["mode"] == "merged" and info["reranker"]["model_dtype"] == "float32"
    assert info["dimensions"] == 32 and info["version"]
    assert call(server.base, "GET", "/health")[0] == 200
    status, text, headers = call(server.base, "GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    for name in ("bge_onnx_requests_total{", "bge_onnx_request_duration_seconds_bucket", "bge_onnx_queue_depth",
                 "bge_onnx_batch_texts_bucket", "bge_onnx_batch_tokens_bucket", "bge_onnx_queue_seconds_bucket",
                 "bge_onnx_inference_seconds_bucket", "bge_onnx_tokenize_seconds_bucket", "bge_onnx_requests_in_flight"):
        assert name in text, name
    assert 'route="/embed",status="422"' in text


def embedder_ids(embedder: Embedder, text: str) -> list[int]:
    return plain_tokenizer(embedder).encode(text).ids


def _metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def test_concurrent_clients_each_get_their_own_vectors(server, embedder, sentences):
    # different lengths and counts per request, sent at once: merged into shared batches, split back
    requests = [sentences[i * 5 : i * 5 + 1 + i % 5] + [LONG[: 20 * (i + 1)]] for i in range(16)]

    def send(texts):
        return call(server.base, "POST", "/embed", {"inputs": texts})

    def calls_and_requests() -> tuple[float, float]:
        _, text, _ = call(server.base, "GET", "/metrics")
        return (_metric(text, 'bge_onnx_batch_requests_count{model="embed"}'),
                _metric(text, 'bge_onnx_batch_requests_sum{model="embed"}'))

    merged_once = False
    for _ in range(5):  # whether a round merges depends on when the requests arrive; a server that merges does soon
        before = calls_and_requests()
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(send, requests))
        for texts, (status, body, _) in zip(requests, answers):
            assert status == 200, body
            assert_same_vectors(body, embedder.encode(texts))
        after = calls_and_requests()
        calls, queued = after[0] - before[0], after[1] - before[1]
        assert queued == 16 and 1 <= calls <= 16  # every request went through the batching queue once
        if calls < 16:
            merged_once = True  # some requests shared a call of the model
            break
    assert merged_once


def test_int8_server_gives_each_request_the_vectors_it_gets_alone(int8_exported, sentences, tmp_path):
    """Per-token int8 under merged batches: concurrent requests of mixed lengths each get exactly what the request
    encoded alone gets; --isolate-batches is then a no-op (/info says the mode stays merged)."""
    srv = Server(str(int8_exported["bert-cls"]), "--reranker", str(int8_exported["bert-rerank"]), "--precision",
                 "int8", "--max-wait-ms", "50", "--isolate-batches", log=tmp_path / "server.log")
    try:
        info = call(srv.base, "GET", "/info")[1]
        assert info["model_dtype"] == "int8"
        assert info["batching"]["mode"] == "merged" and info["batching"]["vectors_depend_on_other_requests"] is False
        assert "--isolate-batches changes nothing" in info["batching"]["note"]
        requests = [sentences[i * 3: i * 3 + 1 + i % 4] + [LONG[: 30 * (i + 1)]] for i in range(16)]
        _, before, _ = call(srv.base, "GET", "/metrics")
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda texts: call(srv.base, "POST", "/embed", {"inputs": texts}), requests))
        _, after, _ = call(srv.base, "GET", "/metrics")
        pairs = [(sentences[i], sentences[i + 1]) for i in range(12)]
        with ThreadPoolExecutor(12) as pool:
            scores = list(pool.map(lambda pair: call(srv.base, "POST", "/rerank", {
                "query": pair[0], "texts": [pair[1], LONG[:200]], "raw_scores": True})[1], pairs))
    finally:
        srv.stop()
    model = Embedder(int8_exported["bert-cls"], device="cpu", precision="int8")
    for texts, (status, body, _) in zip(requests, answers):
        assert status == 200, body
        np.testing.assert_allclose(np.asarray(body, np.float32), model.encode(texts), atol=1e-6)
    calls = _metric(after, 'bge_onnx_batch_requests_count{model="embed"}') - _metric(before, 'bge_onnx_batch_requests_count{model="embed"}')
    assert calls < 16  # requests shared calls of the model
    reranker = Reranker(int8_exported["bert-rerank"], device="cpu", precision="int8")
    for (query, passage), answer in zip(pairs, scores):
        expected = reranker.compute_score([(query, passage), (query, LONG[:200])])
        got = sorted(answer, key=lambda item: item["index"])
        np.testing.assert_allclose([item["score"] for item in got], expected, atol=1e-5)


@pytest.fixture(scope="module")
def guarded(exported, tmp_path_factory):
    """Settings from environment variables: an API key, at most 2 requests in flight, 400 ms for company, 2 s for a
    body to arrive."""
    log = tmp_path_factory.mktemp("serve-guarded") / "server.log"
    env = {"BGE_ONNX_API_KEY": "sekret", "BGE_ONNX_MAX_CONCURRENT_REQUESTS": "2", "BGE_ONNX_MAX_WAIT_MS": "400",
           "BGE_ONNX_PRECISION": "fp32", "BGE_ONNX_BODY_TIMEOUT": "2"}
    srv = Server(str(exported["bert-cls"]), env=env, log=log)
    yield srv
    srv.stop()


def test_api_key(guarded):
    status, body, _ = call(guarded.base, "POST", "/embed", {"inputs": "x"})
    assert status == 401 and "Authorization: Bearer <key>" in body["error"]
    status, body, _ = call(guarded.base, "POST", "/v1/embeddings", {"input": "x"}, headers={"authorization": "Bearer no"})
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert call(guarded.base, "GET", "/info")[0] == 401
    assert call(guarded.base, "GET", "/health")[0] == 200 and call(guarded.base, "GET", "/metrics")[0] == 200
    assert call(guarded.base, "GET", "/ping")[0] == 200 and call(guarded.base, "GET", "/")[0] == 200
    assert call(guarded.base, "POST", "/", {"inputs": "x"})[0] == 401  # TEI's POST / does work: it needs the key
    status, body, _ = call(guarded.base, "POST", "/embed", {"inputs": "x"}, headers={"authorization": "Bearer sekret"})
    assert status == 200 and len(body) == 1


def test_json_nested_too_deep_is_bad_json(guarded):
    """JSON nested deeper than Python's parser goes (a RecursionError inside json.loads) is refused as bad JSON, and
    the keep-alive connection stays open."""
    deep = '{"inputs": ' + "[" * DEEP + "]" * DEEP + "}"
    auth = {"authorization": "Bearer sekret", "content-type": "application/json"}
    status, body, _ = call(guarded.base, "POST", "/v1/embeddings", raw=deep.replace("inputs", "input").encode(),
                           headers=auth)
    assert status == 400 and "not valid JSON: JSON nested too deeply" in body["error"]["message"], body
    connection = http.client.HTTPConnection("127.0.0.1", guarded.port, timeout=30)
    try:
        for payload, expected in ((deep, 422), ('{"inputs": "fine"}', 200)) * 2:
            connection.request("POST", "/embed", body=payload, headers=auth)
            response = connection.getresponse()
            answer = response.read()
            assert response.status == expected, answer[:200]
            if expected == 422:
                assert b"not valid JSON: JSON nested too deeply" in answer
    finally:
        connection.close()


def _until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends on ``sock`` until it closes the connection (a socket timeout if it never does)."""
    sock.settimeout(30)
    answer = b""
    while chunk := sock.recv(65536):
        answer += chunk
    return answer


def test_a_stalled_body_gets_408_and_frees_its_slot(guarded):
    """Clients that send a part of their bodies and stall hold both of the 2 slots (--max-concurrent-requests) only
    until --body-timeout: each gets 408 and its connection closed, and the next request is served. A refusal sent
    before a body the client holds back for 100-continue closes the connection: that body must not be read as the
    next request."""
    auth = {"authorization": "Bearer sekret"}
    head = (b"POST /embed HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer sekret\r\n"
            b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n")
    stalled = [socket.create_connection(("127.0.0.1", guarded.port)) for _ in range(2)]
    try:
        for sock in stalled:
            sock.sendall(head + b'{"inp')
        time.sleep(0.5)
        status, body, _ = call(guarded.base, "POST", "/embed", {"inputs": "x"}, headers=auth)
        assert status == 429 and "2 requests in flight" in body["error"], body
        began = time.monotonic()
        for sock in stalled:
            answer = _until_closed(sock)
            assert answer.startswith(b"HTTP/1.1 408") and b"connection: close" in answer.lower(), answer
            assert b"did not arrive within 2 s (--body-timeout)" in answer
        assert time.monotonic() - began < 20
    finally:
        for sock in stalled:
            sock.close()
    assert call(guarded.base, "POST", "/embed", {"inputs": "x"}, headers=auth)[0] == 200
    # answered before the body was asked for: a wrong key, and a route that needs a model this server lacks
    for path, key, status in (("/embed", b"no", b"401"), ("/v1/rerank", b"sekret", b"404")):
        with socket.create_connection(("127.0.0.1", guarded.port)) as sock:
            sock.sendall(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer " + key +
                         b"\r\nContent-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: 15\r\n\r\n")
            answer = _until_closed(sock)
        assert answer.startswith(b"HTTP/1.1 " + status) and b"connection: close" in answer.lower(), answer


def test_burst_over_the_limit_gets_429_while_others_succeed(guarded, embedder):
    auth = {"authorization": "Bearer sekret"}
    texts = [f"request number {i}" for i in range(12)]
    start = threading.Barrier(12)

    def send(text):
        start.wait()
        return call(guarded.base, "POST", "/embed", {"inputs": [text]}, headers=auth)

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(send, texts))
    statuses = [status for status, _, _ in answers]
    assert set(statuses) <= {200, 429} and statuses.count(200) >= 1 and statuses.count(429) >= 1, statuses
    for text, (status, body, headers) in zip(texts, answers):
        if status == 200:
            assert_same_vectors(body, embedder.encode([text]))
        else:
            assert body["error_type"] == "Overloaded" and "the limit is 2" in body["error"]
            assert int(headers["retry-after"]) >= 1 and int(headers["retry-after-ms"]) >= 1  # when to come back
    assert call(guarded.base, "POST", "/embed", {"inputs": "after"}, headers=auth)[0] == 200


def test_sigterm_finishes_the_request_in_flight_then_exits_0(exported, embedder, tmp_path):
    srv = Server(str(exported["bert-cls"]), "--precision", "fp32", "--max-wait-ms", "1500", log=tmp_path / "log")
    try:
        with ThreadPoolExecutor(1) as pool, socket.create_connection(("127.0.0.1", srv.port)) as slow:
            # a client still sending its body is company on its way, so the request below waits in the queue for it
            slow.sendall(b"POST /embed HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                         b"content-length: 100\r\n\r\n{")
            time.sleep(0.3)
            pending = pool.submit(call, srv.base, "POST", "/embed", {"inputs": ["still answered"]})
            time.sleep(0.5)
            srv.process.send_signal(signal.SIGTERM)
            slow.close()
            status, body, _ = pending.result(timeout=60)
        assert status == 200
        assert_same_vectors(body, embedder.encode(["still answered"]))
        assert srv.process.wait(30) == 0, (tmp_path / "log").read_text()
    finally:
        srv.stop()


def test_a_model_that_fails_to_load_stops_the_server_with_exit_1(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bge_onnx", "serve", str(tmp_path / "nowhere"), "--port",
                             str(_free_port())], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 1
    assert "the model failed to load: ModelFilesError: model folder" in result.stderr

# In-process: the app with models handed to it, through Starlette's TestClient.

def _client(app):
    from starlette.testclient import TestClient

    return TestClient(app)


def test_health_is_503_while_the_model_loads(exported):
    from bge_onnx.serve import ServeConfig, create_app

    app = create_app(ServeConfig(str(exported["bert-cls"]), precision="fp32"))
    service, release = app.state.service, threading.Event()
    load = service.load
    service.load = lambda: (release.wait(30), load())
    with _client(app) as client:
        response = client.get("/health")
        assert response.status_code == 503
        assert response.json() == {"error": "the model is loading", "error_type": "Unhealthy"}
        assert client.post("/embed", json={"inputs": "x"}).status_code == 503
        assert client.post("/v1/embeddings", json={"input": "x"}).json()["error"]["code"] == "model_not_ready"
        release.set()
        deadline = time.monotonic() + 30
        while client.get("/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert client.post("/embed", json={"inputs": "x"}).status_code == 200


def test_inference_error_answers_that_request_with_424_and_the_server_goes_on(exported):
    from bge_onnx.serve import ServeConfig, create_app

    class Flaky(Embedder):
        def encode(self, texts, **options):
            if "boom" in texts:
                raise RuntimeError("the runtime failed")
            return super().encode(texts, **options)

    flaky = Flaky(exported["bert-cls"], device="cpu", precision="fp32")
    app = create_app(ServeConfig(str(exported["bert-cls"]), max_wait_ms=200), embedder=flaky)
    with _client(app) as client:
        while client.get("/health").status_code != 200:
            time.sleep(0.05)
        with ThreadPoolExecutor(2) as pool:  # sent together: merged into one call, which fails
            bad = pool.submit(client.post, "/embed", json={"inputs": ["boom"]})
            time.sleep(0.05)
            good = pool.submit(client.post, "/embed", json={"inputs": ["fine"]})
            bad, good = bad.result(), good.result()
        assert bad.status_code == 424  # TEI's status for a failed inference
        assert bad.json() == {"error": "inference failed: RuntimeError: the runtime failed", "error_type": "Backend"}
        assert good.status_code == 200
        assert_same_vectors(good.json(), flaky.encode(["fine"]))
        response = client.post("/v1/embeddings", json={"input": "boom"})
        assert response.status_code == 500 and response.json()["error"]["type"] == "server_error"
        assert client.post("/embed", json={"inputs": "again"}).status_code == 200


def test_admission_by_expected_wait_bounds_latency_and_loses_nothing(exported):
    """A burst far over what the model does in --max-queue-ms: the excess gets 429 with Retry-After at once, every
    admitted request its own right vector. (The latency bound this gives is measured in benchmarks serve-hostile.)"""
    from bge_onnx.serve import ServeConfig, create_app

    class Slow(Embedder):  # 0.1 s per text: a slow CPU, deterministically
        def encode(self, texts, **options):
            time.sleep(0.1 * len(texts))
            return super().encode(texts, **options)

    slow = Slow(exported["bert-cls"], device="cpu", precision="fp32")
    app = create_app(ServeConfig(str(exported["bert-cls"]), max_wait_ms=0, max_queue_ms=300), embedder=slow)
    texts = [f"request {i} " + "word " * (i % 7) for i in range(40)]
    with _client(app) as client:
        while client.get("/health").status_code != 200:
            time.sleep(0.05)
        assert client.post("/embed", json={"inputs": ["warm up: the rate is measured"]}).status_code == 200

        with ThreadPoolExecutor(40) as pool:  # 4 s of work at once: about 0.3 s of it is admitted at a time
            answers = list(pool.map(lambda text: client.post("/embed", json={"inputs": [text]}), texts))
    statuses = [response.status_code for response in answers]
    assert set(statuses) == {200, 429} and statuses.count(429) >= 20, statuses
    for text, response in zip(texts, answers):
        if response.status_code == 200:
            assert_same_vectors(response.json(), slow.encode([text]))
        else:
            assert "--max-queue-ms" in response.json()["error"] and int(response.headers["retry-after"]) >= 1


@pytest.mark.parametrize("isolate", [False, True])
def test_batcher_merges_or_isolates_requests(isolate):
    from bge_onnx.serve.batcher import Batcher
    from bge_onnx.serve.metrics import Metrics

    calls = []

    def run(items):
        calls.append(list(items))
        return np.array([[float(item)] for item in items], dtype=np.float32)

    async def main():
        batcher = Batcher(run, name="embed", metrics=Metrics(), max_wait=0.05, isolate=isolate)
        batcher.start()
        requests = [list(range(i * 10, i * 10 + 1 + i)) for i in range(5)]
        answers = await asyncio.gather(*(batcher.submit(items, len(items)) for items in requests))
        await batcher.stop()
        return requests, answers

    requests, answers = asyncio.run(main())
    for items, (rows, timing) in zip(requests, answers):
        assert rows[:, 0].tolist() == items and timing.queue >= 0 and timing.inference >= 0
    if isolate:
        assert calls == requests  # each request alone: int8's per-batch scales see only its own texts
    else:
        assert calls == [[item for items in requests for item in items]]  # one call for all five



def test_batcher_cost_fit_is_least_squares():
    """The call-cost model behind admission and Retry-After: numpy's polyfit over the same calls, computed here."""
    from bge_onnx.serve.batcher import Batcher
    from bge_onnx.serve.metrics import Metrics

    rng = np.random.default_rng(7)
    batcher = Batcher(lambda items: items, name="embed", metrics=Metrics(), max_wait=0, isolate=False)
    calls = [(int(t), 0.002 + 3e-5 * t + float(rng.normal(0, 1e-4))) for t in rng.integers(20, 4000, 100)]
    for tokens, seconds in calls:
        batcher._measured(tokens, seconds)
    slope, intercept = np.polyfit([t for t, _ in calls[-64:]], [s for _, s in calls[-64:]], 1)
    assert batcher.per_token == pytest.approx(slope, rel=1e-9)
    assert batcher.overhead == pytest.approx(intercept, rel=1e-9)
    same = Batcher(lambda items: items, name="embed", metrics=Metrics(), max_wait=0, isolate=False)
    for _ in range(5):  # sizes all alike: the mean cost per token, no overhead
        same._measured(100, 0.01)
    assert same.per_token == pytest.approx(1e-4) and same.overhead == 0.0

def _codes(values, dtype: str) -> np.ndarray:
    return np.asarray(values, dtype=np.uint8 if dtype in ("uint8", "ubinary") else np.int8)


def _nearly_equal(got: np.ndarray, expected: np.ndarray) -> None:
    """Codes as sentence-transformers' quantize_embeddings gives them for the in-process vectors; the server may batch
    the texts otherwise, so a value on a step's edge may land one step off (never more)."""
    assert got.shape == expected.shape and got.dtype == expected.dtype
    difference = np.abs(got.astype(np.int16) - expected.astype(np.int16))
    assert difference.max() <= (1 if got.shape[1] == expected.shape[1] and got.dtype == np.int8 else 255)
    assert (difference == 0).mean() >= 0.99


def test_vectors_for_storage_on_every_route(server, embedder, model_copy):
    from sentence_transformers.quantization import quantize_embeddings

    from bge_onnx.serve.limits import Refusal, storage_form

    texts = ["first text", "a second, longer text about pandas", "機械学習", "x"]
    floats = embedder.encode(texts)
    status, info, _ = call(server.base, "GET", "/info")
    assert status == 200 and info["output_dtypes"] == ["float32", "int8", "uint8", "binary", "ubinary"]
    for dtype in ("int8", "uint8", "binary", "ubinary"):
        expected = quantize_embeddings(floats, dtype, ranges=embedder.ranges)
        status, rows, _ = call(server.base, "POST", "/embed", {"inputs": texts, "output_dtype": dtype})
        assert status == 200, rows
        _nearly_equal(_codes(rows, dtype), expected)
        status, answer, _ = call(server.base, "POST", "/v1/embeddings",
                                 {"input": texts, "output_dtype": dtype, "encoding_format": "base64"})
        assert status == 200, answer
        raw = [np.frombuffer(base64.b64decode(d["embedding"]), dtype=expected.dtype) for d in answer["data"]]
        _nearly_equal(np.stack(raw), expected)
        status, answer, _ = call(server.base, "POST", "/v1/embeddings", {"input": texts, "output_dtype": dtype})
        _nearly_equal(_codes([d["embedding"] for d in answer["data"]], dtype), expected)
    # Cohere: several types in one answer, queries with the model's instruction
    queries = embedder.encode_queries(texts)
    status, answer, _ = call(server.base, "POST", "/v2/embed", {
        "texts": texts, "input_type": "search_query", "embedding_types": ["float", "int8", "ubinary"]})
    assert status == 200 and answer["response_type"] == "embeddings_by_type" and answer["texts"] == texts
    assert sorted(answer["embeddings"]) == ["float", "int8", "ubinary"]
    assert_same_vectors(answer["embeddings"]["float"], queries)
    for dtype in ("int8", "ubinary"):
        _nearly_equal(_codes(answer["embeddings"][dtype], dtype),
                      quantize_embeddings(queries, dtype, ranges=embedder.ranges))
    assert answer["meta"]["billed_units"]["input_tokens"] == sum(embedder_tokens(embedder, [
        embedder.query_instruction + t for t in texts]))
    status, answer, _ = call(server.base, "POST", "/v1/embed", {"texts": texts, "input_type": "search_document"})
    assert status == 200 and answer["response_type"] == "embeddings_floats"
    assert_same_vectors(answer["embeddings"], floats)
    # refusals name the field, in each family's format
    status, error, _ = call(server.base, "POST", "/embed", {"inputs": "x", "output_dtype": "int4"})
    assert status == 422 and "output_dtype: must be one of float32, int8, uint8, binary, ubinary, got 'int4'" in \
        error["error"]
    status, error, _ = call(server.base, "POST", "/embed", {"inputs": "x", "output_dtype": "int8", "normalize": False})
    assert status == 422 and "send normalize: true" in error["error"]
    status, error, _ = call(server.base, "POST", "/v1/embed", {"texts": ["x"], "embedding_types": ["int4"]})
    assert status == 400 and error["error"]["param"] == "embedding_types" and "'int4' is not one of" in \
        error["error"]["message"]
    status, error, _ = call(server.base, "POST", "/v1/embed", {"texts": ["x"], "truncate": "START"})
    assert status == 400 and error["error"]["param"] == "truncate"
    for body in ({"texts": ["x"], "input_type": "image"}, {"texts": ["x"], "input_type": []}):
        status, error, _ = call(server.base, "POST", "/v1/embed", body)
        assert status == 400 and error["error"]["param"] == "input_type", error
    status, error, _ = call(server.base, "POST", "/v1/embeddings", {"input": "x", "input_type": {"a": 1}})
    assert status == 400 and error["error"]["param"] == "input_type", error
    # a model exported before ranges were recorded offers no int8/uint8, and says so
    folder = model_copy("bert-cls")
    manifest = json.loads((folder / "bge_onnx.json").read_text())
    del manifest["calibration"]
    (folder / "bge_onnx.json").write_text(json.dumps(manifest))
    older = Embedder(folder, device="cpu")
    with pytest.raises(Refusal, match=r"output_dtype 'uint8' is not offered: this model was exported without "
                                      r"per-dimension ranges \(offered: float32, binary, ubinary; see /info\)"):
        storage_form(older, "uint8", "output_dtype")


def test_an_error_no_route_handled_is_answered_by_the_gate():
    """An exception that escaped every route is logged and answered by the gate in the error format of the path's
    API family (TEI's 424, OpenAI's 500), so the ASGI call ends normally: left to Starlette's outermost middleware,
    it is answered and then raised again to uvicorn, which drops the keep-alive connection. An app that fails after
    its answer started is not answered twice."""
    from bge_onnx.serve.app import Gate
    from bge_onnx.serve.limits import ServeConfig
    from bge_onnx.serve.metrics import Metrics
    from bge_onnx.serve.service import Service

    async def failing(scope, receive, send):
        raise RuntimeError("boom")

    async def failing_late(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        raise RuntimeError("late")

    def run(app, path: str) -> tuple[list[dict], Metrics]:
        config, metrics = ServeConfig("unused"), Metrics()
        gate = Gate(app, config=config, metrics=metrics, service=Service(config, metrics))
        sent = []

        async def receive() -> dict:
            return {"type": "http.request", "body": b"{}", "more_body": False}

        async def send(message: dict) -> None:
            sent.append(message)

        asyncio.run(gate({"type": "http", "method": "POST", "path": path, "headers": []}, receive, send))
        return sent, metrics

    sent, metrics = run(failing, "/embed")
    assert sent[0]["status"] == 424
    assert json.loads(sent[1]["body"]) == {"error": "internal error: RuntimeError: boom", "error_type": "Backend"}
    assert metrics.registry.get_sample_value("te_request_failure", {"err": "inference"}) == 1
    assert metrics.registry.get_sample_value("bge_onnx_requests_total", {"route": "/embed", "status": "424"}) == 1
    sent, _ = run(failing, "/v1/embeddings")
    assert sent[0]["status"] == 500
    assert json.loads(sent[1]["body"])["error"]["message"] == "internal error: RuntimeError: boom"
    with pytest.raises(RuntimeError, match="late"):
        run(failing_late, "/embed")
