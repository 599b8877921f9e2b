"""Rerank as Cohere and infinity serve it: POST /v1/rerank {query, documents, top_n, return_documents}.

The answer is ``{results: [{index, relevance_score, document?}], model, usage}``, best first; relevance_score is the
sigmoid of the reranker's logit, in (0, 1); ``document`` is ``{"text": ...}`` as in Cohere's API. ``documents`` may
hold strings or ``{"text": ...}`` objects. Errors use OpenAI's format, as infinity does.
"""

from __future__ import annotations

import numpy as np
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..checks import describe
from .limits import VALIDATION, Refusal, fields, flag, read_json, texts_field, utf8_text
from .openai import served_name
from .render import JSONResponse
from .service import Service, rerank_request, sigmoid


def _documents(value: object, limit: int) -> list[str]:
    if isinstance(value, list):  # Cohere also takes {"text": ...} objects
        value = [item.get("text") if isinstance(item, dict) else item for item in value]
    texts, _ = texts_field(value, "documents", limit=limit, single_ok=False)
    return texts


async def rerank(request: Request) -> Response:
    service: Service = request.app.state.service
    service.require("rerank")
    body = fields(await read_json(request, service.config.payload_limit), ["query", "documents"])
    query = body.get("query")
    if not isinstance(query, str):
        raise Refusal(VALIDATION, f"query must be a string, got {type(query).__name__} {describe(query)}",
                      param="query")
    utf8_text(query, "query", "query")
    texts = _documents(body.get("documents"), service.config.max_client_batch_size)
    top_n = body.get("top_n")
    if top_n is not None and (isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 1):
        raise Refusal(VALIDATION, f"top_n must be a positive integer, got {describe(top_n)}", param="top_n")
    return_documents = flag(body, "return_documents", False)
    model = served_name(service, body, task="rerank")
    truncate = flag(body, "truncate", service.config.auto_truncate)
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


ROUTES = [Route("/v1/rerank", rerank, methods=["POST"])]
