"""OpenAI's embeddings API: POST /v1/embeddings (also /embeddings), GET /v1/models, and its error format.

``input`` is a string or a list of up to --openai-max-inputs strings (token-id arrays are refused: this server takes
text), ``encoding_format`` "float" or "base64" (little-endian float32 bytes; the official client asks for base64
unless told otherwise), ``dimensions`` only the model's own, ``model`` and ``user`` accepted and not checked.
Vectors are L2-normalised. Beyond OpenAI's fields, as the OpenAI-style APIs of Cohere, Voyage and NVIDIA do:
``input_type`` "query" / "search_query" puts the model's query instruction before each text ("passage",
"document", "search_document": none), ``prompt_name`` "query" the same (TEI's name), and ``truncate`` as on /embed.
``output_dtype`` "int8", "uint8", "binary" or "ubinary" (an extension, as on /embed) gives vectors for storage
(bge_onnx.storage: sentence-transformers' quantize_embeddings' conventions): integer lists, or with base64 the raw
bytes of that type (binary/ubinary: dim / 8 bytes, the sign bits packed).
"""

from __future__ import annotations

import base64

import numpy as np
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

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
    fields,
    flag,
    read_json,
    storage_form,
    texts_field,
    utf8_text,
)
from .render import JSONResponse
from .service import Service, embed_request

# refusal kind -> (HTTP status, OpenAI's error type, code)
STATUS = {
    VALIDATION: (400, "invalid_request_error", "invalid_value"),
    BAD_JSON: (400, "invalid_request_error", "invalid_json"),
    EMPTY: (400, "invalid_request_error", "empty_input"),
    PAYLOAD: (413, "invalid_request_error", "payload_too_large"),
    SLOW_BODY: (408, "invalid_request_error", "request_timeout"),
    AUTH: (401, "invalid_request_error", "invalid_api_key"),
    OVERLOADED: (429, "rate_limit_error", "overloaded"),
    UNHEALTHY: (503, "server_error", "model_not_ready"),
    NOT_FOUND: (404, "invalid_request_error", "model_not_found"),
    BACKEND: (500, "server_error", "inference_failed"),
}


def error_response(refusal: Refusal) -> Response:
    status, error_type, code = STATUS[refusal.kind]
    error = {"message": refusal.message, "type": error_type, "param": refusal.param, "code": code}
    return JSONResponse({"error": error}, status_code=status, headers=refusal.headers)


# input_type -> whether the text is a query (gets the model's query instruction)
INPUT_TYPES = {"query": True, "search_query": True, "passage": False, "document": False, "search_document": False}


def served_name(service: Service, body: dict, *, task: str = "embed") -> str:
    """The ``model`` to answer with: the one asked for (any string; one model per task is served), else the one
    served for ``task`` ("embed" or "rerank")."""
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise Refusal(VALIDATION, f"model must be a string, got {type(model).__name__}", param="model")
    if model:
        utf8_text(model, "model", "model")  # it is written back in the answer
    served = service.config.reranker if task == "rerank" else service.config.model
    return model or served


def _query_prefix(embedder, body: dict) -> str:
    """The model's query instruction where ``input_type`` or ``prompt_name`` says the inputs are queries."""
    input_type, prompt = body.get("input_type"), body.get("prompt_name")
    if input_type is not None and (not isinstance(input_type, str) or input_type not in INPUT_TYPES):
        raise Refusal(VALIDATION, f"input_type {input_type!r:.80} is not one of {', '.join(INPUT_TYPES)}",
                      param="input_type")
    if prompt is not None and prompt != "query":
        raise Refusal(VALIDATION, f"prompt_name {prompt!r} is not one of this model's prompts: ['query']",
                      param="prompt_name")
    return embedder.query_instruction if INPUT_TYPES.get(input_type) or prompt == "query" else ""


async def models(request: Request) -> Response:
    """OpenAI's model list: the models this server serves."""
    service: Service = request.app.state.service
    config = service.config
    data = [{"id": name, "object": "model", "created": service.started, "owned_by": "bge-onnx"}
            for name in (config.model, config.reranker) if name is not None]
    return JSONResponse({"object": "list", "data": data})


async def embeddings(request: Request) -> Response:
    service: Service = request.app.state.service
    embedder = service.require("embed")
    config = service.config
    body = fields(await read_json(request, config.payload_limit, config.body_timeout), ["input", "model"])
    texts, _ = texts_field(body.get("input"), "input", limit=config.openai_max_inputs,
                           limit_flag="--openai-max-inputs")
    encoding = body.get("encoding_format")
    if encoding not in (None, "float", "base64"):
        raise Refusal(VALIDATION, f"encoding_format must be 'float' or 'base64', got {encoding!r}",
                      param="encoding_format")
    check_dimensions(body, embedder.dim)
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise Refusal(VALIDATION, f"user must be a string, got {type(user).__name__}", param="user")
    model = served_name(service, body)
    prefix = _query_prefix(embedder, body)
    truncate = flag(body, "truncate", config.auto_truncate)
    dtype, ranges = storage_form(embedder, body.get("output_dtype"), "output_dtype")
    answer = await embed_request(service, [prefix + t for t in texts], name="input", truncate=truncate,
                                 normalize=True)
    data = []
    for i, row in enumerate(convert(answer.rows, dtype, ranges)):
        if encoding == "base64":  # little-endian float32, or the one-byte codes as they are
            vector = base64.b64encode(row.astype("<f4" if row.dtype == np.float32 else row.dtype).tobytes()).decode(
                "ascii")
        else:
            vector = row
        data.append({"object": "embedding", "embedding": vector, "index": i})
    tokens = int(np.sum(answer.tokens))
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    return JSONResponse({"object": "list", "data": data, "model": model, "usage": usage}, headers=answer.headers)


ROUTES = [
    Route("/v1/embeddings", embeddings, methods=["POST"]),
    Route("/embeddings", embeddings, methods=["POST"]),
    Route("/v1/models", models, methods=["GET"]),
]
