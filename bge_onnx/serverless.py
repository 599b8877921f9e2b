"""A serverless (AWS-Lambda-style) handler: one model per process, loaded on the first call, embeds each request.

Settings come from the environment, read when the model loads (a failed load is retried by the next call):

    BGE_ONNX_MODEL             an exported model folder or a hub repo id (required)
    BGE_ONNX_PRECISION         auto (default), fp32, int8 or fp16
    BGE_ONNX_REVISION          hub revision when BGE_ONNX_MODEL is a repo id
    BGE_ONNX_LOCAL_FILES_ONLY  1 (default): a repo id loads from the cache only, so a cold start never waits on
                               the network (fill the cache at build time with `bge-onnx pull`); 0 allows downloads
    BGE_ONNX_MAX_TEXTS         most texts per request (default 128), read on every call
    BGE_ONNX_THREADS           CPU threads (default: the CPUs the process may use)
    BGE_ONNX_SPIN              0 (default here): onnxruntime's threads sleep between calls instead of spinning;
                               1 spins, as onnxruntime does by default; run spins only within a call

A request is ``{"texts": [str, ...], "kind": "text" | "query" | "passage", "normalize": bool}`` (kind defaults to
"text": embedded as is; "query" puts the model's query instruction first; normalize defaults to true). It comes
either as the event itself (direct invocation) or as the ``body`` of an API Gateway / function URL event, a JSON
string, base64-encoded when ``isBase64Encoded``. The answer is ``{"embeddings": [[float, ...], ...], "model",
"dim", "precision"}``: returned as is to a direct invocation, as the JSON body of ``{"statusCode": 200, "headers",
"body"}`` to an HTTP event. A refused request gives status 400, a model that cannot load 500, each with
``{"error": message}`` (direct invocation: ``{"statusCode": 400, "error": message}``); no exception escapes.

``python -m bge_onnx.serverless < event.json`` runs one event and prints the response (exit 1 unless it is 200).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import sys
import threading
import time

from .checks import check_texts, describe, env_flag, json_loads
from .embedder import Embedder
from .errors import BgeOnnxError, ConfigError, InputError
from .session import SPIN_ENV

MODEL_ENV = "BGE_ONNX_MODEL"
PRECISION_ENV = "BGE_ONNX_PRECISION"
REVISION_ENV = "BGE_ONNX_REVISION"
LOCAL_FILES_ONLY_ENV = "BGE_ONNX_LOCAL_FILES_ONLY"
MAX_TEXTS_ENV = "BGE_ONNX_MAX_TEXTS"
# JSON spends ~21 bytes on a float32; Lambda caps a response at 6 MB: 128 vectors of 1024 dims take 2.8 MB
DEFAULT_MAX_TEXTS = 128
FIELDS = ("texts", "kind", "normalize")
KINDS = ("text", "query", "passage")
# keys by which an API Gateway (REST or HTTP API) or function URL event differs from a direct invocation's
HTTP_KEYS = ("body", "requestContext", "httpMethod", "routeKey")
JSON_HEADERS = {"content-type": "application/json"}

_embedder: Embedder | None = None
_name = ""  # the BGE_ONNX_MODEL it was loaded from
_lock = threading.Lock()


def handler(event: object, context: object = None) -> dict:
    """Embed the texts of one request with the process's model (loaded on the first call).

    Args:
        event: a direct request ``{"texts": [...], "kind": ..., "normalize": ...}``, or an API Gateway / function
            URL event whose ``body`` is that request as JSON.
        context: the Lambda context (unused).

    Returns:
        The response dict (see the module docstring); never raises.

    >>> handler({"texts": ["hello"]})["dim"]  # doctest: +SKIP
    384
    """
    http = isinstance(event, dict) and any(key in event for key in HTTP_KEYS)
    try:
        texts, kind, normalize = _request(event, http=http)
    except InputError as err:
        return _respond(http, 400, {"error": str(err)})
    except Exception as err:  # noqa: BLE001  a bad setting (BGE_ONNX_MAX_TEXTS) is the deployment's fault
        return _respond(http, 500, {"error": _describe_error(err)})
    try:
        embedder = model()
    except Exception as err:  # noqa: BLE001  any failure to load is reported; the next call loads again
        return _respond(http, 500, {"error": f"model not loaded: {_describe_error(err)}"})
    try:
        if kind == "query":
            vectors = embedder.encode_queries(texts, normalize=normalize)
        else:
            vectors = embedder.encode(texts, normalize=normalize)
    except InputError as err:  # e.g. a text with a lone surrogate, which JSON can carry
        return _respond(http, 400, {"error": str(err)})
    except Exception as err:  # noqa: BLE001  a handler answers; an escaping exception is an opaque 502
        return _respond(http, 500, {"error": _describe_error(err)})
    return _respond(http, 200, {
        "embeddings": vectors.tolist(),
        "model": _name,
        "dim": embedder.dim,
        "precision": embedder.precision.value,
    })


def model() -> Embedder:
    """The process's Embedder: loaded from the environment on first use, then kept for every later call.

    Raises:
        BgeOnnxError: a setting is missing or wrong, or the model cannot be loaded (nothing is kept: the next
            call loads again).

    >>> model() is model()  # doctest: +SKIP
    True
    """
    global _embedder, _name
    if _embedder is None:
        with _lock:  # Lambda calls one at a time; a local caller may not
            if _embedder is None:
                _name, _embedder = _load()
    return _embedder


def _load() -> tuple[str, Embedder]:
    name = os.environ.get(MODEL_ENV)
    if not name:
        raise ConfigError(f"${MODEL_ENV} is not set: set it to an exported model folder or a hub repo id")
    start = time.perf_counter()
    os.environ.setdefault(SPIN_ENV, "0")  # a warm function waits between calls, billed: no spinning there
    embedder = Embedder(
        name,
        precision=os.environ.get(PRECISION_ENV) or "auto",
        revision=os.environ.get(REVISION_ENV) or None,
        local_files_only=env_flag(LOCAL_FILES_ONLY_ENV, default=True),
    )
    # one line per load, on stderr (the function's log): how a cold start shows itself
    print(f"bge-onnx: loaded {name} ({embedder.precision.value}) in {time.perf_counter() - start:.2f} s",
          file=sys.stderr, flush=True)
    return name, embedder


def _max_texts() -> int:
    value = os.environ.get(MAX_TEXTS_ENV, "").strip()
    if not value:
        return DEFAULT_MAX_TEXTS
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"${MAX_TEXTS_ENV} must be a positive int, got {value!r}")
    return int(value)


def _request(event: object, *, http: bool) -> tuple[list[str], str, bool]:
    """(texts, kind, normalize) from an event, or InputError naming the bad field or item."""
    if http:
        request = _body(event)
    elif isinstance(event, dict):
        request = event
    else:
        raise InputError(f"the event must be a JSON object with 'texts', got {type(event).__name__} {describe(event)}")
    unknown = [key for key in request if key not in FIELDS]
    if unknown:
        raise InputError(f"unknown field {unknown[0]!r}; a request has {', '.join(FIELDS)}")
    if "texts" not in request:
        raise InputError("missing field 'texts': a list of the strings to embed")
    texts = request["texts"]
    if not isinstance(texts, list):
        raise InputError(f"texts must be a list of str, got {type(texts).__name__} {describe(texts)}")
    texts = check_texts(texts)  # names the first item that is not a str: texts[2] is int 5, expected str
    limit = _max_texts()
    if len(texts) > limit:
        raise InputError(
            f"texts has {len(texts)} items, more than the {limit} a request may have (${MAX_TEXTS_ENV}); "
            "send them in several requests"
        )
    kind = request.get("kind", "text")
    if kind not in KINDS:
        raise InputError(f"kind must be one of {', '.join(map(repr, KINDS))}, got {describe(kind)}")
    normalize = request.get("normalize", True)
    if not isinstance(normalize, bool):
        raise InputError(f"normalize must be true or false, got {describe(normalize)}")
    return texts, kind, normalize


def _body(event: dict) -> dict:
    """The request carried by an HTTP event's body (a JSON string, base64 when isBase64Encoded)."""
    body = event.get("body")
    if isinstance(body, dict):  # a test event written by hand, already parsed
        return body
    if not isinstance(body, str) or not body:
        raise InputError(f"the request has no body: POST a JSON object with 'texts' (body is {describe(body)})")
    if event.get("isBase64Encoded"):
        try:
            body = base64.b64decode(body, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError) as err:
            raise InputError(f"body is marked isBase64Encoded but is not base64 of UTF-8 text: {err}") from err
    try:
        request = json_loads(body)
    except ValueError as err:
        raise InputError(f"body is not valid JSON: {err}") from err
    if not isinstance(request, dict):
        raise InputError(f"body must be a JSON object with 'texts', got {type(request).__name__} {describe(request)}")
    return request


def _describe_error(err: Exception) -> str:
    return str(err) if isinstance(err, BgeOnnxError) else f"{type(err).__name__}: {err}"


def _respond(http: bool, status: int, body: dict) -> dict:
    if http:
        return {"statusCode": status, "headers": JSON_HEADERS, "body": json.dumps(body, separators=(",", ":"))}
    return body if status == 200 else {"statusCode": status, **body}


def main() -> int:
    """Run the event read from stdin, print the response; exit status 0 for a 200, else 1."""
    try:
        event = json_loads(sys.stdin.buffer.read())
    except ValueError as err:
        response = {"statusCode": 400, "error": f"stdin is not a JSON event: {err}"}
    else:
        response = handler(event, None)
    print(json.dumps(response, separators=(",", ":")))
    return 0 if response.get("statusCode", 200) == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
