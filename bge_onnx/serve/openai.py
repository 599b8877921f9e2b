"""OpenAI's embeddings API: POST /v1/embeddings (also /embeddings), and its error format.

``input`` is a string or a list of strings (token-id arrays are refused: this server takes text), ``encoding_format``
"float" or "base64" (little-endian float32 bytes; the official client asks for base64 unless told otherwise),
``dimensions`` only the model's own, ``model`` and ``user`` accepted and not checked. Vectors are L2-normalised.
"""

from __future__ import annotations

import base64

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

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
    fields,
    read_json,
    texts_field,
)
from .service import Service, embed_request

# refusal kind -> (HTTP status, OpenAI's error type, code)
STATUS = {
    VALIDATION: (400, "invalid_request_error", "invalid_value"),
    BAD_JSON: (400, "invalid_request_error", "invalid_json"),
    EMPTY: (400, "invalid_request_error", "empty_input"),
    PAYLOAD: (413, "invalid_request_error", "payload_too_large"),
    AUTH: (401, "invalid_request_error", "invalid_api_key"),
    OVERLOADED: (429, "rate_limit_error", "overloaded"),
    UNHEALTHY: (503, "server_error", "model_not_ready"),
    NOT_FOUND: (404, "invalid_request_error", "model_not_found"),
    BACKEND: (500, "server_error", "inference_failed"),
}


def error_response(refusal: Refusal) -> Response:
    status, error_type, code = STATUS[refusal.kind]
    error = {"message": refusal.message, "type": error_type, "param": refusal.param, "code": code}
    return JSONResponse({"error": error}, status_code=status)


def served_name(service: Service, body: dict) -> str:
    """The ``model`` to answer with: the one asked for (any string; one model is served), else the served one."""
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise Refusal(VALIDATION, f"model must be a string, got {type(model).__name__}", param="model")
    return model or service.config.model or service.config.reranker


async def embeddings(request: Request) -> Response:
    service: Service = request.app.state.service
    embedder = service.require("embed")
    body = fields(await read_json(request, service.config.payload_limit), ["input", "model"])
    texts, _ = texts_field(body.get("input"), "input", limit=service.config.max_client_batch_size)
    encoding = body.get("encoding_format")
    if encoding not in (None, "float", "base64"):
        raise Refusal(VALIDATION, f"encoding_format must be 'float' or 'base64', got {encoding!r}",
                      param="encoding_format")
    dimensions = body.get("dimensions")
    if dimensions is not None and (dimensions != embedder.dim or isinstance(dimensions, bool)):
        raise Refusal(VALIDATION, f"dimensions={dimensions!r} is not supported: this model is not trained for "
                                  f"truncated (Matryoshka) vectors; omit it to get all {embedder.dim} dimensions",
                      param="dimensions")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise Refusal(VALIDATION, f"user must be a string, got {type(user).__name__}", param="user")
    model = served_name(service, body)
    answer = await embed_request(service, texts, name="input", truncate=service.config.auto_truncate,
                                 normalize=True)
    data = []
    for i, row in enumerate(answer.rows):
        if encoding == "base64":
            vector = base64.b64encode(row.astype("<f4").tobytes()).decode("ascii")
        else:
            vector = row.tolist()
        data.append({"object": "embedding", "embedding": vector, "index": i})
    tokens = int(np.sum(answer.tokens))
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    return JSONResponse({"object": "list", "data": data, "model": model, "usage": usage}, headers=answer.headers)


ROUTES = [
    Route("/v1/embeddings", embeddings, methods=["POST"]),
    Route("/embeddings", embeddings, methods=["POST"]),
]
