"""text-embeddings-inference's API: POST /embed, /rerank, /tokenize; GET /info, /health, /metrics.

Request and response shapes follow TEI's router (router/src/http/types.rs); errors are ``{error, error_type}``
with TEI's error types and status codes, but a failed inference is 500 (TEI: 424).
"""

from __future__ import annotations

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .. import __version__
from .limits import (
    AUTH,
    BACKEND,
    BAD_JSON,
    EMPTY,
    NOT_FOUND,
    OVERLOADED,
    PAYLOAD,
    UNHEALTHY,
    VALIDATION,
    Refusal,
    check_direction,
    fields,
    flag,
    read_json,
    texts_field,
    utf8_text,
)
from .service import Service, embed_request, multi_request, rerank_request, sigmoid

# refusal kind -> (HTTP status, TEI's error_type)
STATUS = {
    VALIDATION: (422, "Validation"),
    BAD_JSON: (422, "Validation"),
    EMPTY: (400, "Empty"),
    PAYLOAD: (413, "Validation"),
    AUTH: (401, "Unauthorized"),
    OVERLOADED: (429, "Overloaded"),
    UNHEALTHY: (503, "Unhealthy"),
    NOT_FOUND: (400, "Validation"),
    BACKEND: (500, "Backend"),
}
DTYPES = {"fp32": "float32", "int8": "int8", "fp16": "float16"}


def error_response(refusal: Refusal) -> Response:
    status, error_type = STATUS[refusal.kind]
    return JSONResponse({"error": refusal.message, "error_type": error_type}, status_code=status)


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


def _dimensions(service: Service, body: dict) -> None:
    """``dimensions`` other than the model's own: refused, as BGE models are not trained for truncated vectors."""
    value = body.get("dimensions")
    if value is None:
        return
    dim = service.require("embed").dim
    if value != dim or isinstance(value, bool):
        raise Refusal(VALIDATION, f"dimensions={value!r} is not supported: this model is not trained for truncated "
                                  f"(Matryoshka) vectors; omit it to get all {dim} dimensions", param="dimensions")


async def embed(request: Request) -> Response:
    service = _service(request)
    service.require("embed")
    body = fields(await read_json(request, service.config.payload_limit), ["inputs"])
    texts, _ = texts_field(body.get("inputs"), "inputs", limit=service.config.max_client_batch_size)
    check_direction(body)
    _dimensions(service, body)
    prefix = _prompt(service, body)
    truncate = flag(body, "truncate", service.config.auto_truncate)
    normalize = flag(body, "normalize", True)
    answer = await embed_request(service, [prefix + t for t in texts], name="inputs", truncate=truncate,
                                 normalize=normalize)
    return JSONResponse(answer.rows.tolist(), headers=answer.headers)


async def _multi(request: Request, output: str) -> tuple[list, dict]:
    service = _service(request)
    service.require("embed")
    body = fields(await read_json(request, service.config.payload_limit), ["inputs"])
    texts, _ = texts_field(body.get("inputs"), "inputs", limit=service.config.max_client_batch_size)
    check_direction(body)
    prefix = _prompt(service, body)
    truncate = flag(body, "truncate", service.config.auto_truncate)
    answer = await multi_request(service, output, [prefix + t for t in texts], name="inputs", truncate=truncate)
    return answer.rows, answer.headers


async def embed_sparse(request: Request) -> Response:
    """TEI's sparse embeddings: per input, [{"index": token id, "value": weight}] by index (bge-m3's lexical
    weights: each token id's largest weight, > 0, special tokens left out)."""
    rows, headers = await _multi(request, "sparse")
    return JSONResponse([[{"index": int(i), "value": w} for i, w in sorted(weights.items(), key=lambda kv: int(kv[0]))]
                         for weights in rows], headers=headers)


async def embed_colbert(request: Request) -> Response:
    """bge-m3's ColBERT vectors: per input, one L2-normalised vector per token after the first."""
    rows, headers = await _multi(request, "colbert")
    return JSONResponse([vectors.tolist() for vectors in rows], headers=headers)


async def rerank(request: Request) -> Response:
    service = _service(request)
    service.require("rerank")
    body = fields(await read_json(request, service.config.payload_limit), ["query", "texts"])
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


async def tokenize(request: Request) -> Response:
    service = _service(request)
    service.require("embed" if service.embedder is not None else "rerank")
    body = fields(await read_json(request, service.config.payload_limit), ["inputs"])
    texts, _ = texts_field(body.get("inputs"), "inputs", limit=service.config.max_client_batch_size)
    prefix = _prompt(service, body)
    special = flag(body, "add_special_tokens", True)
    counter = service.embed_tokens or service.rerank_tokens
    return JSONResponse(counter.tokens([prefix + t for t in texts], add_special_tokens=special))


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
        model_type = {"reranker": {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}}
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
    Route("/embed", embed, methods=["POST"]),
    Route("/embed_sparse", embed_sparse, methods=["POST"]),
    Route("/embed_colbert", embed_colbert, methods=["POST"]),
    Route("/rerank", rerank, methods=["POST"]),
    Route("/tokenize", tokenize, methods=["POST"]),
    Route("/info", info, methods=["GET"]),
    Route("/health", health, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
]
