"""Cohere's API as Cohere and infinity serve it. Errors use OpenAI's format, as infinity does.

POST /v1/rerank {query, documents, top_n, return_documents}: ``{results: [{index, relevance_score, document?}], model,
usage}``, best first; relevance_score is the sigmoid of the reranker's logit, in (0, 1); ``document`` is
``{"text": ...}`` as in Cohere's API. ``documents`` may hold strings or ``{"text": ...}`` objects.

POST /v1/embed and /v2/embed {texts, input_type, embedding_types, truncate}: L2-normalised vectors, by type
(``embeddings: {"float": [...], "int8": [...], ...}``, ``response_type: "embeddings_by_type"``) where
``embedding_types`` is given, and always on /v2; else /v1's plain ``embeddings: [[...]]`` ("embeddings_floats").
Types: float, int8, uint8 (the model's per-dimension ranges), binary, ubinary (sign bits packed, 8 to a byte), as
sentence-transformers' quantize_embeddings writes them. ``input_type`` "search_query" puts the model's query
instruction first ("search_document", "classification", "clustering": none); ``truncate`` "END" (the default) cuts
a long text, "NONE" refuses it.
"""

from __future__ import annotations

import time

import numpy as np
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..checks import describe
from ..storage import convert
from .limits import VALIDATION, Refusal, fields, flag, read_json, storage_form, texts_field, utf8_text
from .openai import served_name
from .render import JSONResponse
from .service import Service, embed_request, rerank_request, sigmoid

# Cohere's input_type -> whether the texts are queries (get the model's query instruction)
INPUT_TYPES = {"search_query": True, "search_document": False, "classification": False, "clustering": False}
# Cohere's embedding type -> bge_onnx.storage's output dtype
EMBEDDING_TYPES = {"float": "float32", "int8": "int8", "uint8": "uint8", "binary": "binary", "ubinary": "ubinary"}


def _documents(value: object, limit: int) -> list[str]:
    if isinstance(value, list):  # Cohere also takes {"text": ...} objects
        value = [item.get("text") if isinstance(item, dict) else item for item in value]
    texts, _ = texts_field(value, "documents", limit=limit, single_ok=False)
    return texts


async def rerank(request: Request) -> Response:
    service: Service = request.app.state.service
    service.require("rerank")
    config = service.config
    body = fields(await read_json(request, config.payload_limit, config.body_timeout), ["query", "documents"])
    query = body.get("query")
    if not isinstance(query, str):
        raise Refusal(VALIDATION, f"query must be a string, got {type(query).__name__} {describe(query)}",
                      param="query")
    utf8_text(query, "query", "query")
    texts = _documents(body.get("documents"), config.max_client_batch_size)
    top_n = body.get("top_n")
    if top_n is not None and (isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 1):
        raise Refusal(VALIDATION, f"top_n must be a positive integer, got {describe(top_n)}", param="top_n")
    return_documents = flag(body, "return_documents", False)
    model = served_name(service, body, task="rerank")
    truncate = flag(body, "truncate", config.auto_truncate)
    answer = await rerank_request(service, query, texts, name="documents", truncate=truncate)
    scores = sigmoid(answer.rows)
    results = []
    for i in np.argsort(-scores, kind="stable")[:top_n]:
        result = {"index": int(i), "relevance_score": float(scores[i])}
        if return_documents:
            result["document"] = {"text": texts[i]}
        results.append(result)
    tokens = int(np.sum(answer.tokens))
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    return JSONResponse({"object": "rerank", "results": results, "model": model, "usage": usage},
                        headers=answer.headers)


def _choice(body: dict, name: str, allowed, default: str | None) -> str | None:
    value = body.get(name, default)
    if value is not None and (not isinstance(value, str) or value not in allowed):
        raise Refusal(VALIDATION, f"{name} must be one of {', '.join(map(repr, allowed))}, got {describe(value)}",
                      param=name)
    return value


async def embed(request: Request) -> Response:
    service: Service = request.app.state.service
    embedder = service.require("embed")
    config = service.config
    body = fields(await read_json(request, config.payload_limit, config.body_timeout), ["texts", "model"])
    texts, _ = texts_field(body.get("texts"), "texts", limit=config.max_client_batch_size, single_ok=False)
    input_type = _choice(body, "input_type", INPUT_TYPES, None)
    truncate = _choice(body, "truncate", ("END", "NONE"), "END") == "END"
    types = body.get("embedding_types")
    by_type = types is not None or request.url.path.startswith("/v2/")
    types = ["float"] if types is None else types
    if not isinstance(types, list) or not types or not all(isinstance(t, str) for t in types):
        raise Refusal(VALIDATION, f"embedding_types must be a non-empty list of strings, got {describe(types)}",
                      param="embedding_types")
    forms = {}
    for name in dict.fromkeys(types):
        if name not in EMBEDDING_TYPES:
            raise Refusal(VALIDATION, f"embedding_types: {name!r} is not one of {', '.join(EMBEDDING_TYPES)}",
                          param="embedding_types")
        forms[name] = storage_form(embedder, EMBEDDING_TYPES[name], "embedding_types")
    model = served_name(service, body)
    prefix = embedder.query_instruction if INPUT_TYPES.get(input_type) else ""
    answer = await embed_request(service, [prefix + t for t in texts], name="texts", truncate=truncate,
                                 normalize=True)
    if by_type:
        embeddings = {name: convert(answer.rows, dtype, ranges) for name, (dtype, ranges) in forms.items()}
    else:
        embeddings = answer.rows
    tokens = int(np.sum(answer.tokens))
    meta = {"api_version": {"version": "2" if request.url.path.startswith("/v2/") else "1"},
            "billed_units": {"input_tokens": tokens}}
    return JSONResponse({"id": f"{model}-{time.time_ns()}", "embeddings": embeddings, "texts": texts, "meta": meta,
                         "response_type": "embeddings_by_type" if by_type else "embeddings_floats"},
                        headers=answer.headers)


ROUTES = [Route("/v1/rerank", rerank, methods=["POST"]), Route("/v1/embed", embed, methods=["POST"]),
          Route("/v2/embed", embed, methods=["POST"])]
