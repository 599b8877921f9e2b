"""text-embeddings-inference's API: POST /embed, /rerank, /predict, /similarity, /tokenize, /decode, /embed_sparse,
/embed_colbert, /embed_all, / and /invocations; GET /info, /health, /ping, /, /metrics.

Request and response shapes follow TEI 1.9's router (router/src/http/types.rs, server.rs); errors are
``{error, error_type}`` with TEI's error types and status codes (a failed inference is 424).
"""

from __future__ import annotations

import anyio
import numpy as np
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .._version import __version__
from ..checks import describe
from ..storage import convert
from .limits import (
    AUTH,
    BACKEND,
    BAD_JSON,
    EMPTY,
    NOT_FOUND,
    OVERLOADED,
    PAYLOAD,
    SLOW_BODY,
    UNHEALTHY,
    VALIDATION,
    Refusal,
    check_dimensions,
    check_direction,
    fields,
    flag,
    offered_dtypes,
    read_json,
    storage_form,
    texts_field,
    utf8_text,
)
from .render import JSONResponse
from .service import (
    Service,
    embed_request,
    rerank_request,
    score_request,
    sigmoid,
)

# refusal kind -> (HTTP status, TEI's error_type)
STATUS = {
    VALIDATION: (422, "Validation"),
    BAD_JSON: (422, "Validation"),
    EMPTY: (400, "Empty"),
    PAYLOAD: (413, "Validation"),
    SLOW_BODY: (408, "Validation"),
    AUTH: (401, "Unauthorized"),
    OVERLOADED: (429, "Overloaded"),
    UNHEALTHY: (503, "Unhealthy"),
    NOT_FOUND: (400, "Validation"),
    BACKEND: (424, "Backend"),
}
DTYPES = {"fp32": "float32", "int8": "int8", "fp16": "float16"}
LABEL = "LABEL_0"  # a reranker's one label, as /info's id2label names it


def error_response(refusal: Refusal) -> Response:
    status, error_type = STATUS[refusal.kind]
    return JSONResponse({"error": refusal.message, "error_type": error_type}, status_code=status,
                        headers=refusal.headers)


def _service(request: Request) -> Service:
    return request.app.state.service


def _prompt(service: Service, body: dict) -> str:
    """The text put before each input for TEI's prompt_name: "query" is the model's query instruction."""
    name = body.get("prompt_name")
    if name is None:
        return ""
    embedder = service.require("embed")
    available = ["query"] if embedder.query_instruction else []
    if name not in available:
        raise Refusal(VALIDATION, f"prompt_name {name!r} is not one of this model's prompts: {available or 'none'}",
                      param="prompt_name")
    return embedder.query_instruction


def _body(handler):
    """A route that reads the JSON body within --payload-limit and --body-timeout and hands it to
    ``handler(service, body)``."""

    async def endpoint(request: Request) -> Response:
        service = _service(request)
        config = service.config
        return await handler(service, await read_json(request, config.payload_limit, config.body_timeout))

    return endpoint


async def embed(service: Service, body: object) -> Response:
    service.require("embed")
    body = fields(body, ["inputs"])
    texts, _ = texts_field(body.get("inputs"), "inputs", limit=service.config.max_client_batch_size)
    check_direction(body)
    check_dimensions(body, service.require("embed").dim)
    prefix = _prompt(service, body)
    truncate = flag(body, "truncate", service.config.auto_truncate)
    normalize = flag(body, "normalize", True)
    dtype, ranges = storage_form(service.require("embed"), body.get("output_dtype"), "output_dtype",
                                 normalize=normalize)
    answer = await embed_request(service, [prefix + t for t in texts], name="inputs", truncate=truncate,
                                 normalize=normalize)
    return JSONResponse(convert(answer.rows, dtype, ranges), headers=answer.headers)


async def _multi(service: Service, body: object, output: str) -> tuple[list, dict]:
    service.require("embed")
    body = fields(body, ["inputs"])
    texts, _ = texts_field(body.get("inputs"), "inputs", limit=service.config.max_client_batch_size)
    check_direction(body)
    prefix = _prompt(service, body)
    truncate = flag(body, "truncate", service.config.auto_truncate)
    answer = await embed_request(service, [prefix + t for t in texts], name="inputs", truncate=truncate, output=output)
    return answer.rows, answer.headers


async def embed_sparse(service: Service, body: object) -> Response:
    """TEI's sparse embeddings: per input, [{"index": token id, "value": weight}] by index (bge-m3's lexical
    weights: each token id's largest weight, > 0, special tokens left out)."""
    rows, headers = await _multi(service, body, "sparse")
    return JSONResponse([[{"index": int(i), "value": w} for i, w in sorted(weights.items(), key=lambda kv: int(kv[0]))]
                         for weights in rows], headers=headers)


async def embed_colbert(service: Service, body: object) -> Response:
    """bge-m3's ColBERT vectors: per input, one L2-normalised vector per token after the first."""
    rows, headers = await _multi(service, body, "colbert")
    return JSONResponse([np.ascontiguousarray(vectors) for vectors in rows], headers=headers)


async def rerank(service: Service, body: object) -> Response:
    service.require("rerank")
    body = fields(body, ["query", "texts"])
    query = body.get("query")
    if not isinstance(query, str):
        raise Refusal(VALIDATION, f"query must be a string, got {type(query).__name__}", param="query")
    utf8_text(query, "query", "query")
    texts, _ = texts_field(body.get("texts"), "texts", limit=service.config.max_client_batch_size, single_ok=False)
    check_direction(body)
    truncate = flag(body, "truncate", service.config.auto_truncate)
    raw = flag(body, "raw_scores", False)
    return_text = flag(body, "return_text", False)
    answer = await rerank_request(service, query, texts, name="texts", truncate=truncate)
    scores = answer.rows if raw else sigmoid(answer.rows)
    ranks = []
    for i in np.argsort(-scores, kind="stable"):
        rank = {"index": int(i), "score": float(scores[i])}
        if return_text:
            rank["text"] = texts[i]
        ranks.append(rank)
    return JSONResponse(ranks, headers=answer.headers)


async def tokenize(service: Service, body: object) -> Response:
    service.require("embed" if service.config.model is not None else "rerank")
    body = fields(body, ["inputs"])
    texts, _ = texts_field(body.get("inputs"), "inputs", limit=service.config.max_client_batch_size)
    prefix = _prompt(service, body)
    special = flag(body, "add_special_tokens", True)
    counter = service.embed_tokens or service.rerank_tokens
    # in a worker thread: a large request's tokens with their offsets take a while, and the event loop must go on
    tokens = await anyio.to_thread.run_sync(
        lambda: counter.tokens([prefix + t for t in texts], add_special_tokens=special))
    return JSONResponse(tokens)


async def similarity(service: Service, body: object) -> Response:
    """TEI's /similarity: the cosine of ``source_sentence`` with each of ``sentences``, in their order."""
    service.require("embed")
    body = fields(body, ["inputs"])
    inputs = body.get("inputs")
    if not isinstance(inputs, dict):
        raise Refusal(VALIDATION, "inputs must be an object {\"source_sentence\": str, \"sentences\": [str]}, got "
                      f"{type(inputs).__name__} {describe(inputs)}", param="inputs")
    source = inputs.get("source_sentence")
    if not isinstance(source, str):
        raise Refusal(VALIDATION, f"inputs.source_sentence must be a string, got {type(source).__name__} "
                      f"{describe(source)}", param="inputs")
    utf8_text(source, "inputs.source_sentence", "inputs")
    limit = service.config.max_client_batch_size
    if limit < 2:
        raise Refusal(VALIDATION, "similarity needs two texts per request; --max-client-batch-size is 1")
    # the source counts against the limit, as in TEI
    sentences, _ = texts_field(inputs.get("sentences"), "inputs.sentences", limit=limit - 1, single_ok=False)
    parameters = body.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise Refusal(VALIDATION, f"parameters must be an object, got {describe(parameters)}", param="parameters")
    check_direction(parameters)
    prefix = _prompt(service, parameters)
    truncate = flag(parameters, "truncate", service.config.auto_truncate)
    texts = [prefix + t for t in (source, *sentences)]
    answer = await embed_request(service, texts, name="inputs", truncate=truncate, normalize=True)
    scores = answer.rows[1:] @ answer.rows[0]
    return JSONResponse([float(s) for s in scores], headers=answer.headers)


def _pairs(value: object, limit: int) -> tuple[list[tuple[str, str]], bool]:
    """/predict's inputs as (query, passage) pairs, and whether it was one: ``[query, passage]`` or a list of
    them. A lone text is refused: a reranker scores pairs."""
    def pair(item: object, name: str) -> tuple[str, str]:
        if isinstance(item, list) and len(item) == 2 and all(isinstance(x, str) for x in item):
            for k, text in enumerate(item):
                utf8_text(text, f"{name}[{k}]", "inputs")
            return item[0], item[1]
        if isinstance(item, str) or (isinstance(item, list) and len(item) == 1 and isinstance(item[0], str)):
            raise Refusal(VALIDATION, f"{name} is one text; this server's reranker scores pairs: send "
                          "[query, passage]", param="inputs")
        raise Refusal(VALIDATION, f"{name} must be [query, passage] (two strings), got {describe(item)}",
                      param="inputs")

    if value is None:
        raise Refusal(VALIDATION, "inputs is required", param="inputs")
    if isinstance(value, list) and not value:
        raise Refusal(EMPTY, "inputs cannot be empty", param="inputs")
    if isinstance(value, str) or (isinstance(value, list) and all(isinstance(x, str) for x in value)):
        return [pair(value, "inputs")], True
    if not isinstance(value, list):
        raise Refusal(VALIDATION, f"inputs must be [query, passage] or a list of them, got {describe(value)}",
                      param="inputs")
    if len(value) > limit:
        raise Refusal(VALIDATION, f"inputs has {len(value)} items; the limit is {limit} per request "
                      "(--max-client-batch-size)", param="inputs")
    return [pair(item, f"inputs[{i}]") for i, item in enumerate(value)], False


async def predict(service: Service, body: object) -> Response:
    """TEI's /predict for a reranker: per pair, [{"score", "label"}] (the sigmoid of its one logit, as TEI gives a
    single-label model, or the logit with raw_scores)."""
    service.require("rerank")
    body = fields(body, ["inputs"])
    pairs, single = _pairs(body.get("inputs"), service.config.max_client_batch_size)
    check_direction(body)
    truncate = flag(body, "truncate", service.config.auto_truncate)
    raw = flag(body, "raw_scores", False)
    names = ["inputs" if single else f"inputs[{i}]" for i in range(len(pairs))]
    answer = await score_request(service, [q for q, _ in pairs], [p for _, p in pairs],
                                 query_names=[f"{n}[0]" for n in names], text_names=names, param="inputs",
                                 query_param="inputs", truncate=truncate)
    scores = answer.rows if raw else sigmoid(answer.rows)
    rows = [[{"score": float(score), "label": LABEL}] for score in scores]
    return JSONResponse(rows[0] if single else rows, headers=answer.headers)


async def decode(service: Service, body: object) -> Response:
    """TEI's /decode: token ids back to text, one string per sequence."""
    service.require("embed" if service.config.model is not None else "rerank")
    body = fields(body, ["ids"])
    ids = body.get("ids")
    if ids is None:
        raise Refusal(VALIDATION, "ids is required", param="ids")
    if not isinstance(ids, list):
        raise Refusal(VALIDATION, f"ids must be a list of token ids or a list of them, got {describe(ids)}",
                      param="ids")
    sequences = ids if ids and all(isinstance(x, list) for x in ids) else [ids]
    if len(sequences) > service.config.max_client_batch_size:
        raise Refusal(VALIDATION, f"ids has {len(sequences)} sequences; the limit is "
                      f"{service.config.max_client_batch_size} per request (--max-client-batch-size)", param="ids")
    counter = service.embed_tokens or service.rerank_tokens
    for i, sequence in enumerate(sequences):
        name = "ids" if sequences[0] is ids else f"ids[{i}]"
        if not sequence:
            raise Refusal(EMPTY, f"{name} cannot be empty", param="ids")
        for k, token in enumerate(sequence):
            if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < counter.vocab_size:
                raise Refusal(VALIDATION, f"{name}[{k}] is {describe(token)}, not a token id of this model "
                              f"(0 to {counter.vocab_size - 1})", param="ids")
    special = flag(body, "skip_special_tokens", True)
    return JSONResponse(counter.decode(sequences, skip_special_tokens=special))


async def embed_all(service: Service, body: object) -> Response:
    """TEI's per-token embeddings: not available, as an exported graph pools inside."""
    service.require("embed")
    raise Refusal(NOT_FOUND, "embed_all is not available: this server's graphs pool inside and return one vector "
                  "per text; use /embed (or /embed_colbert for bge-m3's per-token vectors)")


async def post_root(service: Service, body: object) -> Response:
    """TEI's POST / (and SageMaker's /invocations): the loaded model's task. A similarity body ({"inputs":
    {"source_sentence", ...}}, huggingface_hub's sentence_similarity) and a rerank body ({"query", "texts"}) are
    answered as such; otherwise the embedding model embeds, or a reranker alone predicts."""
    if isinstance(body, dict):
        if isinstance(body.get("inputs"), dict):
            return await similarity(service, body)
        if "query" in body and "texts" in body:
            return await rerank(service, body)
    if service.config.model is not None:
        return await embed(service, body)
    return await predict(service, body)


def _describe(model, *, config) -> dict:
    return {
        "model_id": str(model.spec.source.get("id") or model.folder.name),
        "model_sha": model.spec.source.get("revision"),
        "model_dtype": DTYPES.get(model.precision.value, model.precision.value),
        "max_input_length": model.max_length,
        "providers": model.providers,
    }


async def info(request: Request) -> Response:
    service = _service(request)
    config = service.config
    if not service.ready:
        service.require("embed")  # refuses: loading or failed
    main = service.embedder or service.reranker
    described = _describe(main, config=config)
    if service.embedder is not None:
        model_type = {"embedding": {"pooling": main.pooling.value}}
    else:
        model_type = {"reranker": {"id2label": {"0": LABEL}, "label2id": {LABEL: 0}}}
    independent = service.batch_independent
    isolated = config.isolate_batches and not independent
    if isolated:
        batching = "isolated: each request runs in batches of its own (--isolate-batches)"
    else:
        batching = f"merged: requests waiting together share batches (a lone request waits up to {config.max_wait_ms} ms)"
    if independent:
        note = ("a request's vectors do not depend on what else is batched: fp32, fp16 and per-token int8 graphs "
                "give each text the vector it gets alone (within 1e-6), so --isolate-batches changes nothing")
    else:
        note = ("this folder's int8 graph (an older export) scales activations per batch, so in merged mode a "
                "request's vectors move slightly with what else is batched (all-MiniLM-L6-v2: min cosine 0.998 to "
                "the request alone); --isolate-batches keeps each request in batches of its own, or re-export the "
                "model for per-token int8")
    body = {
        **described,
        "served_model_name": config.model or config.reranker,
        "model_type": model_type,
        "max_concurrent_requests": config.max_concurrent_requests,
        "max_queue_ms": config.max_queue_ms,
        "max_batch_tokens": main.max_tokens,
        "max_batch_requests": None,
        "max_client_batch_size": config.max_client_batch_size,
        "payload_limit": config.payload_limit,
        "auto_truncate": config.auto_truncate,
        "tokenization_workers": 1,
        "version": __version__,
        "sha": None,
        "docker_label": None,
        "batching": {
            "mode": "isolated" if isolated else "merged",
            "description": batching,
            "max_wait_ms": config.max_wait_ms,
            "vectors_depend_on_other_requests": not independent and not isolated,
            "note": note,
        },
    }
    if service.embedder is not None:
        body["dimensions"] = service.embedder.dim
        body["query_instruction"] = service.embedder.query_instruction
        # for storage: /embed's and /v1/embeddings' output_dtype, /v1/embed's embedding_types ("float" is float32)
        body["output_dtypes"] = offered_dtypes(service.embedder)
    if service.embedder is not None and service.reranker is not None:
        body["reranker"] = _describe(service.reranker, config=config)
    return JSONResponse(body)


async def health(request: Request) -> Response:
    service = _service(request)
    if not service.ready:
        return error_response(Refusal(UNHEALTHY, service.error and f"the model failed to load: {service.error}"
                                      or "the model is loading"))
    return Response(status_code=200)


async def metrics(request: Request) -> Response:
    service = _service(request)
    return Response(service.metrics.render(), media_type=service.metrics.content_type)


ROUTES = [
    Route("/embed", _body(embed), methods=["POST"]),
    Route("/embed_sparse", _body(embed_sparse), methods=["POST"]),
    Route("/embed_colbert", _body(embed_colbert), methods=["POST"]),
    Route("/embed_all", _body(embed_all), methods=["POST"]),
    Route("/rerank", _body(rerank), methods=["POST"]),
    Route("/predict", _body(predict), methods=["POST"]),
    Route("/similarity", _body(similarity), methods=["POST"]),
    Route("/tokenize", _body(tokenize), methods=["POST"]),
    Route("/decode", _body(decode), methods=["POST"]),
    Route("/", _body(post_root), methods=["POST"]),
    Route("/invocations", _body(post_root), methods=["POST"]),
    Route("/info", info, methods=["GET"]),
    Route("/health", health, methods=["GET"]),
    Route("/ping", health, methods=["GET"]),
    Route("/", health, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
]
