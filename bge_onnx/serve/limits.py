"""What the server accepts: its settings, the refusal every API family renders, reading a body within the limit."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence

import anyio
from starlette.requests import Request

from ..checks import describe, json_loads, positive_int, utf8_problem
from ..errors import BgeOnnxError, ConfigError, InputError
from ..storage import OutputDtype, output_dtype

# The kinds of refusal; each API family maps them to its own status codes and error bodies (tei.py, openai.py).
VALIDATION = "validation"  # a wrong type, a bad value, too many inputs, a text over the model's limit
EMPTY = "empty"  # no input at all
PAYLOAD = "payload"  # the body is larger than --payload-limit
SLOW_BODY = "slow_body"  # the body did not arrive within --body-timeout
BAD_JSON = "bad_json"  # the body is not JSON
AUTH = "auth"  # --api-key is set and the request lacks it
OVERLOADED = "overloaded"  # --max-concurrent-requests requests are already in flight
UNHEALTHY = "unhealthy"  # the models are still loading (or failed to load)
BACKEND = "backend"  # inference failed
NOT_FOUND = "not_found"  # the route needs a model this server does not have


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """The settings of one server process (``bge-onnx serve`` builds it from flags and BGE_ONNX_* variables).

    Args:
        model: the embedding model (folder or hub id); None serves only ``reranker``.
        reranker: a reranker (folder or hub id) served beside it, or None.
        max_batch_tokens: padded tokens per forward pass (the runtime's ``max_tokens``); None: its default.
        cors_allow_origin: origins a browser may call from ("*": any); none: no CORS headers.
        max_client_batch_size: most inputs (texts, documents) in one request to TEI's routes and /v1/rerank.
        openai_max_inputs: most inputs in one request to /v1/embeddings (OpenAI's own limit, 2048, by default:
            its clients send that many; the token budget splits the work anyway).
        max_concurrent_requests: most requests in flight; one more is answered 429 at once.
        payload_limit: most bytes in a request body; a larger one is answered 413.
        body_timeout: seconds a request's body may take to arrive (it holds a slot of max_concurrent_requests
            meanwhile); later is answered 408 and the connection closed.
        auto_truncate: cut texts over the model's max length instead of refusing them (a request may say
            otherwise with ``truncate``).
        api_key: when set, every route but GET /health, /ping, / and /metrics needs ``Authorization: Bearer <api_key>``.
        max_wait_ms: how long a request that finds the model idle waits for others to batch with, when other
            requests are on their way (read or tokenised, not queued yet); a lone client's request runs at once.
        max_queue_ms: new work is answered 429 while the work queued ahead would take longer than this, at the
            model's measured rate (0: no such limit, only max_concurrent_requests).
        isolate_batches: run each request in batches of its own, never merged with others' texts, where the
            graph's output depends on its batch (per-batch int8 of older exports); a no-op elsewhere.
    """

    model: str | None
    reranker: str | None = None
    cors_allow_origin: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    port: int = 8080
    max_batch_tokens: int | None = None
    max_client_batch_size: int = 32
    openai_max_inputs: int = 2048
    max_concurrent_requests: int = 512
    payload_limit: int = 2_000_000
    auto_truncate: bool = False
    api_key: str | None = None
    max_wait_ms: float = 2.0
    max_queue_ms: float = 2000.0
    body_timeout: float = 60.0
    isolate_batches: bool = False
    precision: str = "auto"
    revision: str | None = None
    device: str = "auto"
    threads: int | None = None
    max_length: int | None = None

    def __post_init__(self) -> None:
        if self.model is None and self.reranker is None:
            raise ConfigError("serve needs a MODEL to embed with, a --reranker, or both")
        for name in ("max_client_batch_size", "openai_max_inputs", "max_concurrent_requests", "payload_limit"):
            positive_int(name, getattr(self, name), error=ConfigError)
        for name in ("max_wait_ms", "max_queue_ms"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not self.body_timeout > 0:
            raise ConfigError(f"body_timeout must be > 0 seconds, got {self.body_timeout!r}")
        if self.api_key == "":
            raise ConfigError("api_key is empty: give a key, or leave it unset to serve without one")


class Refusal(BgeOnnxError):
    """A request the server answers with an error: its kind (see the constants above), message and field."""

    def __init__(self, kind: str, message: str, *, param: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.kind, self.message, self.param, self.retry_after = kind, message, param, retry_after

    @property
    def headers(self) -> dict[str, str]:
        """Retry-After on a 429 (whole seconds, as HTTP has it, and retry-after-ms, which OpenAI's clients read
        first: whole seconds would bring the clients booked within one second back all at once); Connection: close
        after a body that was not read to its end (see read_json)."""
        headers = {}
        if self.retry_after is not None:
            headers["retry-after"] = str(max(1, math.ceil(self.retry_after)))
            headers["retry-after-ms"] = str(max(1, round(self.retry_after * 1000)))
        if self.kind in (PAYLOAD, SLOW_BODY):
            headers["connection"] = "close"
        return headers


# Bytes read and dropped from a body over --payload-limit before the 413 is sent: a client that sends its whole body
# before it reads (Python's urllib, many others) sees the 413 instead of a reset connection, and a huge body still
# costs only this much reading.
DRAIN = 64_000_000


MAX_RETRY_AFTER = 60.0


class RetryBook:
    """Retry-After values that spread refused clients over the time the server needs for them, like appointments:
    each refusal books the next free slot after the ones already booked. One value for all (the first version:
    "1") brought every client back in the same second, to be refused again: the official AsyncOpenAI client
    spent its 2 retries and failed 42 of 60 requests that way (benchmarks serve-overload)."""

    def __init__(self) -> None:
        self._until = 0.0

    def next(self, *, free_in: float, interval: float) -> float:
        """Seconds to tell a refused client: at least ``free_in`` from now (when the server expects room), plus
        ``interval`` (one such request's share of the server) after the last client booked."""
        now = time.monotonic()
        # at most a minute ahead: clients that never come back must not push the next ones out for ever (and
        # OpenAI's clients ignore a Retry-After over 60 s)
        self._until = min(max(self._until, now + free_in) + interval, now + MAX_RETRY_AFTER)
        return self._until - now


async def read_json(request: Request, limit: int, timeout: float) -> object:
    """The request's JSON body, read at most ``limit`` bytes far (a larger body is refused, its rest drained up to
    DRAIN bytes and the connection closed, so the client reads the 413) and within ``timeout`` seconds (a request
    holds one of --max-concurrent-requests while its body arrives: a client that stalls must not keep it)."""
    try:
        with anyio.fail_after(timeout):  # asyncio.timeout needs Python 3.11
            body = await _read_body(request, limit)
    except TimeoutError:
        raise Refusal(SLOW_BODY, f"the body did not arrive within {timeout:g} s (--body-timeout)") from None
    if not body.strip():
        raise Refusal(BAD_JSON, "the body is empty; send a JSON object")
    try:
        return json_loads(body)
    except ValueError as err:  # also UnicodeDecodeError
        raise Refusal(BAD_JSON, f"the body is not valid JSON: {err}") from err


async def _read_body(request: Request, limit: int) -> bytearray:
    declared = request.headers.get("content-length")
    too_large = None
    if declared is not None and declared.isdigit() and int(declared) > limit:
        too_large = f"the body has {int(declared)} bytes; the limit is {limit} (--payload-limit)"
        if int(declared) > DRAIN or request.headers.get("expect", "").lower() == "100-continue":
            # not worth reading: the client would not get to the answer anyway, or it waits for our word before
            # it sends the body (curl does for large bodies), and a 413 now saves it sending
            raise Refusal(PAYLOAD, too_large)
    body = bytearray()
    read = 0
    async for chunk in request.stream():
        read += len(chunk)
        if too_large is None and read > limit:
            too_large = f"the body has more than {limit} bytes; the limit is {limit} (--payload-limit)"
        if too_large is None:
            body += chunk
        elif read > DRAIN:
            break
    if too_large is not None:
        raise Refusal(PAYLOAD, too_large)
    return body


def fields(body: object, allowed: Sequence[str]) -> dict:
    """``body`` as a dict (a JSON object), or a refusal; unknown keys are ignored, as TEI and OpenAI do."""
    if not isinstance(body, dict):
        raise Refusal(VALIDATION, f"the body must be a JSON object with {', '.join(allowed)}, got {type(body).__name__}")
    return body


def utf8_text(text: str, label: str, name: str) -> str:
    """``text``, refused when it cannot be encoded as UTF-8: a lone surrogate ("\\ud800") is valid JSON that no
    tokenizer takes, and must get a 4xx like any bad input, not an error that drops the connection."""
    problem = utf8_problem(text)
    if problem:
        raise Refusal(VALIDATION, f"{label} {problem}: {describe(text)}; send valid Unicode text", param=name)
    return text


def texts_field(value: object, name: str, *, limit: int, single_ok: bool = True,
                limit_flag: str = "--max-client-batch-size") -> tuple[list[str], bool]:
    """Texts from a field that holds a str or a list of str: (texts, whether it was one str). Refuses a missing,
    empty or wrongly typed value, token-id arrays, text that is not valid Unicode, and more than ``limit`` items,
    naming the field."""
    if value is None:
        raise Refusal(VALIDATION, f"{name} is required", param=name)
    if isinstance(value, str) and single_ok:
        return [utf8_text(value, name, name)], True
    if not isinstance(value, list):
        kinds = "a string or a list of strings" if single_ok else "a list of strings"
        raise Refusal(VALIDATION, f"{name} must be {kinds}, got {type(value).__name__} {describe(value)}", param=name)
    if not value:
        raise Refusal(EMPTY, f"{name} cannot be empty", param=name)
    if len(value) > limit:
        raise Refusal(
            VALIDATION,
            f"{name} has {len(value)} items; the limit is {limit} per request ({limit_flag})",
            param=name,
        )
    for i, item in enumerate(value):
        if (isinstance(item, int) and not isinstance(item, bool)) or (
            isinstance(item, list) and all(isinstance(x, int) for x in item)
        ):
            raise Refusal(VALIDATION, f"{name}[{i}] is a token-id array; this server takes text only", param=name)
        if not isinstance(item, str):
            raise Refusal(
                VALIDATION, f"{name}[{i}] is {type(item).__name__} {describe(item)}, expected a string", param=name
            )
        utf8_text(item, f"{name}[{i}]", name)
    return value, False


def flag(body: dict, name: str, default: bool | None) -> bool | None:
    """A boolean field, or ``default`` when absent or null."""
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise Refusal(VALIDATION, f"{name} must be true or false, got {describe(value)}", param=name)
    return value


def check_lengths(counts: Sequence[int], cut: Sequence[bool], max_length: int, *, names: Sequence[str], param: str,
                  truncate: bool, limit_name: str = "the model's limit") -> None:
    """Refuse the first text over ``max_length`` tokens unless it may be truncated; ``names[i]`` is how a message
    names text i (a ``cut`` text was counted on a prefix only, so its count is a lower bound)."""
    if truncate:
        return
    for name, count, was_cut in zip(names, counts, cut):
        if count > max_length:
            raise Refusal(
                VALIDATION,
                f"{name} has {'at least ' if was_cut else ''}{count} tokens; {limit_name} is {max_length}. "
                'Shorten it, send "truncate": true, or start the server with --auto-truncate',
                param=param,
            )


def check_dimensions(body: dict, dim: int) -> None:
    """``dimensions`` other than the model's own: refused, as BGE models are not trained for truncated vectors."""
    value = body.get("dimensions")
    if value is not None and (value != dim or isinstance(value, bool)):
        raise Refusal(VALIDATION, f"dimensions={value!r} is not supported: this model is not trained for truncated "
                                  f"(Matryoshka) vectors; omit it to get all {dim} dimensions", param="dimensions")


def offered_dtypes(embedder) -> list[str]:
    """The output dtypes this embedder gives: int8 and uint8 only where it has per-dimension ranges."""
    has_ranges = embedder.ranges is not None
    return [d.value for d in OutputDtype if has_ranges or not d.needs_ranges]


def storage_form(embedder, value: object, param: str, *, normalize: bool = True):
    """(OutputDtype, ranges or None) for a request's ``output_dtype`` (None: float32), refused as a 400 naming
    ``param`` where the value is unknown or the model cannot give it."""
    if value is None:
        return OutputDtype.FLOAT32, None
    try:
        dtype = output_dtype(value)
    except InputError as err:
        raise Refusal(VALIDATION, f"{param}: {err}".replace("output_dtype must", "must"), param=param) from None
    if not dtype.needs_ranges:
        return dtype, None
    if not normalize:
        raise Refusal(VALIDATION, f"{param} {dtype.value!r} steps through the normalised vectors' ranges; "
                                  "send normalize: true", param=param)
    ranges = embedder.ranges
    if ranges is None:
        raise Refusal(VALIDATION, f"{param} {dtype.value!r} is not offered: this model was exported without "
                                  f"per-dimension ranges (offered: {', '.join(offered_dtypes(embedder))}; see /info)",
                      param=param)
    return dtype, ranges


def check_direction(body: dict) -> None:
    """TEI's truncation_direction: the runtime cuts the end of a text (right), never its start."""
    value = body.get("truncation_direction")
    if value is not None and value not in ("right", "Right"):
        raise Refusal(
            VALIDATION,
            f"truncation_direction {describe(value)} is not supported; this server truncates on the right",
            param="truncation_direction",
        )
