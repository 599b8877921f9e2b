"""The app factory: the models and their queues (Service), the gate every request passes, the routes of each API."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..embedder import Embedder
from ..reranker import Reranker
from . import cohere, openai, tei
from .limits import AUTH, BACKEND, OVERLOADED, Refusal, ServeConfig
from .metrics import Metrics
from .service import Service

log = logging.getLogger("bge_onnx.serve")

# open without the API key, and never counted against --max-concurrent-requests (a prober must always get in)
OPEN_ROUTES = ("/health", "/metrics")
# the routes that do work; each request in flight on them counts against --max-concurrent-requests
WORK_ROUTES = ("/embed", "/rerank", "/tokenize", "/v1/embeddings", "/embeddings", "/v1/rerank")
OPENAI_STYLE = ("/v1/embeddings", "/embeddings", "/v1/rerank")


def render(path: str, refusal: Refusal) -> Response:
    """A refusal in the error format of the API family that ``path`` belongs to."""
    if path in OPENAI_STYLE:
        return openai.error_response(refusal)
    return tei.error_response(refusal)


class Gate:
    """Every request passes here: the API key, the concurrency limit (429 at once, never a queue without bound),
    and the request metrics. Pure ASGI, so a streamed response or a disconnect is not buffered or hidden."""

    def __init__(self, app: ASGIApp, *, config: ServeConfig, metrics: Metrics) -> None:
        self.app, self.config, self.metrics = app, config, metrics
        self.in_flight = 0
        self._key = f"Bearer {config.api_key}".encode() if config.api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        route = path if path in (*OPEN_ROUTES, *WORK_ROUTES, "/info") else "other"  # bounded label values
        start, status = time.perf_counter(), [500]

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            refusal = None
            if self._key is not None and path not in OPEN_ROUTES and not self._authorized(scope):
                refusal = Refusal(AUTH, "missing or wrong API key: send the header 'Authorization: Bearer <key>'")
            elif path in WORK_ROUTES and self.in_flight >= self.config.max_concurrent_requests:
                refusal = Refusal(OVERLOADED, f"the server is overloaded: {self.in_flight} requests in flight, the "
                                              f"limit is {self.config.max_concurrent_requests}; retry later")
            if refusal is not None:
                await render(path, refusal)(scope, receive, send_status)
                return
            counted = path in WORK_ROUTES
            if counted:
                self.in_flight += 1
                self.metrics.in_flight.inc()
            try:
                await self.app(scope, receive, send_status)
            finally:
                if counted:
                    self.in_flight -= 1
                    self.metrics.in_flight.dec()
        finally:
            self.metrics.requests.labels(route, str(status[0])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)

    def _authorized(self, scope: Scope) -> bool:
        given = dict(scope["headers"]).get(b"authorization", b"")
        return hmac.compare_digest(given, self._key)


async def _refusal_handler(request: Request, err: Exception) -> Response:
    assert isinstance(err, Refusal)  # registered for Refusal only
    return render(request.url.path, err)


async def _error_handler(request: Request, err: Exception) -> Response:
    log.error("bge-onnx serve: %s %s failed", request.method, request.url.path, exc_info=err)
    return render(request.url.path, Refusal(BACKEND, f"internal error: {type(err).__name__}: {err}"))


def create_app(
    config: ServeConfig,
    *,
    embedder: Embedder | None = None,
    reranker: Reranker | None = None,
    on_load_failure: Callable[[], None] | None = None,
) -> Starlette:
    """The ASGI app of ``bge-onnx serve``: TEI's routes, OpenAI's embeddings, a Cohere-style rerank.

    The models load in a worker thread after the app starts, so /health answers 503 until they are ready.

    Args:
        config: the server's settings.
        embedder, reranker: models already loaded, used instead of loading ``config.model`` / ``config.reranker``.
        on_load_failure: called if loading fails (the CLI stops the server then).

    >>> app = create_app(ServeConfig("bge-small-onnx"))  # doctest: +SKIP
    """
    metrics = Metrics()
    service = Service(config, metrics, embedder=embedder, reranker=reranker)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        loading = asyncio.get_running_loop().create_task(service.start(on_load_failure))
        try:
            yield
        finally:
            loading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loading
            await service.stop()

    app = Starlette(
        routes=[*tei.ROUTES, *openai.ROUTES, *cohere.ROUTES],
        exception_handlers={Refusal: _refusal_handler, Exception: _error_handler},
        lifespan=lifespan,
    )
    app.state.service = service
    app.add_middleware(Gate, config=config, metrics=metrics)
    return app
