"""The app factory: the models and their queues (Service), the gate every request passes, the routes of each API."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import Callable

from starlette.applications import Starlette
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..embedder import Embedder
from ..reranker import Reranker
from . import cohere, openai, tei
from .limits import (
    AUTH,
    BACKEND,
    NOT_FOUND,
    OVERLOADED,
    UNHEALTHY,
    Refusal,
    RetryBook,
    ServeConfig,
)
from .metrics import Metrics
from .service import Service

log = logging.getLogger("bge_onnx.serve")

# GET routes open without the API key, and never counted against --max-concurrent-requests (a prober must always
# get in); GET / is TEI's health check too
OPEN_ROUTES = ("/health", "/ping", "/metrics", "/")
# the routes that do work (POST); each request in flight on them counts against --max-concurrent-requests
WORK_ROUTES = ("/embed", "/embed_sparse", "/embed_colbert", "/embed_all", "/rerank", "/predict", "/similarity",
               "/tokenize", "/decode", "/", "/invocations", "/v1/embeddings", "/embeddings", "/v1/rerank", "/v1/embed",
               "/v2/embed")
OPENAI_STYLE = ("/v1/embeddings", "/embeddings", "/v1/rerank", "/v1/models", "/v1/embed", "/v2/embed")
DISCONNECTED = 499  # the status recorded for a request whose client went away before its answer (nginx's code)


# refusal kind -> TEI's te_request_failure label (the rest are "validation")
FAILURES = {BACKEND: "inference", NOT_FOUND: "model_type", UNHEALTHY: "inference", OVERLOADED: "overloaded"}


def render(path: str, refusal: Refusal) -> Response:
    """A refusal in the error format of the API family that ``path`` belongs to."""
    if path in OPENAI_STYLE:
        return openai.error_response(refusal)
    return tei.error_response(refusal)


class Gate:
    """Every request passes here: the API key, the concurrency limit (429 at once, with Retry-After, never a queue
    without bound), the request metrics, and a client's disconnect: a request whose client goes away is cancelled,
    so its texts leave the queue uncomputed. Pure ASGI, so a streamed response or a disconnect is not hidden."""

    def __init__(self, app: ASGIApp, *, config: ServeConfig, metrics: Metrics, service: Service) -> None:
        self.app, self.config, self.metrics, self.service = app, config, metrics, service
        self.latency = 0.1  # seconds a work request takes, a moving average: what Retry-After is made of
        self._retries = RetryBook()
        self._key = f"Bearer {config.api_key}".encode() if config.api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, method = scope["path"], scope["method"]
        known = (*OPEN_ROUTES, *WORK_ROUTES, "/info", "/v1/models")
        route = path if path in known else "other"  # bounded label values
        is_open = path in OPEN_ROUTES and method in ("GET", "HEAD")
        counted = path in WORK_ROUTES and method == "POST"
        start, status, asked = time.perf_counter(), [None], []  # status: the answer's, once it has started
        # a client that sends "Expect: 100-continue" waits for our word before it sends its body: an answer given
        # without reading the body closes the connection, or the unsent body would be taken for the next request
        withheld = (b"expect", b"100-continue") in [(k, v.lower()) for k, v in scope["headers"]]

        async def receive_body() -> Message:
            asked.append(True)
            return await receive()

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                if withheld and not asked:
                    message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        try:
            refusal = None
            if self._key is not None and not is_open and method != "OPTIONS" and not self._authorized(scope):
                refusal = Refusal(AUTH, "missing or wrong API key: send the header 'Authorization: Bearer <key>'")
            elif counted and self.service.in_flight >= self.config.max_concurrent_requests:
                self.metrics.tei_failure("overloaded")
                refusal = Refusal(OVERLOADED, f"the server is overloaded: {self.service.in_flight} requests in flight, "
                                  f"the limit is {self.config.max_concurrent_requests}; retry later",
                                  retry_after=self._retry_after())
            if refusal is not None:
                await render(path, refusal)(scope, receive_body, send_status)
                return
            if not counted:
                await self._run(scope, receive_body, send_status, status)
                return
            self.service.in_flight += 1
            self.metrics.in_flight.inc()
            try:
                if not await self._run_unless_gone(scope, receive_body, send_status, status):
                    status[0] = DISCONNECTED
            finally:
                self.service.in_flight -= 1
                self.metrics.in_flight.dec()
                if (status[0] or 500) < 400:
                    self.latency += 0.2 * (time.perf_counter() - start - self.latency)
        finally:
            self.metrics.requests.labels(route, str(status[0] or 500)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)

    async def _run_unless_gone(self, scope: Scope, receive: Receive, send: Send, status: list) -> bool:
        """Run the app; once it has read the whole body, a disconnect from the client before the answer starts
        (``status[0]`` still None: ``send`` records it) cancels it (a request waiting in a batching queue then leaves
        it). False if the client went away first. (After the answer ends, uvicorn's receive() reports a disconnect
        too: that one must not cancel anything.)"""
        body_read, gone = asyncio.Event(), []
        task = asyncio.current_task()

        async def tracked_receive() -> Message:
            message = await receive()
            if message["type"] == "http.disconnect" or not message.get("more_body", False):
                body_read.set()
            return message

        async def watch() -> None:
            await body_read.wait()
            while (await receive())["type"] != "http.disconnect":
                pass
            if status[0] is None:
                gone.append(True)
                task.cancel()

        watcher = asyncio.ensure_future(watch())
        try:
            await self._run(scope, tracked_receive, send, status)
            return True
        except asyncio.CancelledError:
            if not gone:
                raise  # the server is stopping, not the client
            task.uncancel()  # our own cancel, handled: the task goes on to record the request
            return False
        finally:
            watcher.cancel()

    async def _run(self, scope: Scope, receive: Receive, send: Send, status: list) -> None:
        """The app, with an error no route handled logged and answered here, in the error format of the path's API
        family (TEI's 424, OpenAI's 500), if its answer has not started (``status[0]`` still None: ``send`` records
        it). (Starlette's outermost middleware would answer it too, then raise it again to the server, which drops
        the connection: a client's next request on it would fail.)"""
        try:
            await self.app(scope, receive, send)
        except Exception as err:
            if status[0] is not None:
                raise
            log.error("bge-onnx serve: %s %s failed", scope["method"], scope["path"], exc_info=err)
            self.metrics.tei_failure("inference")
            text = str(err).encode("utf-8", "backslashreplace").decode()  # JSON takes no lone surrogate
            await render(scope["path"], Refusal(BACKEND, f"internal error: {type(err).__name__}: {text}"))(
                scope, receive, send)

    def _retry_after(self) -> int:
        """When to come back: a slot frees within one request's time; each refused client after that gets the
        next of max_concurrent_requests slots per request time."""
        return self._retries.next(free_in=self.latency, interval=self.latency / self.config.max_concurrent_requests)

    def _authorized(self, scope: Scope) -> bool:
        given = dict(scope["headers"]).get(b"authorization", b"")
        return hmac.compare_digest(given, self._key)


async def _refusal_handler(request: Request, err: Exception) -> Response:
    assert isinstance(err, Refusal)  # registered for Refusal only
    request.app.state.service.metrics.tei_failure(FAILURES.get(err.kind, "validation"))
    return render(request.url.path, err)


async def _gone_handler(request: Request, err: Exception) -> Response:
    """The client closed its connection while its body was being read: nobody to answer, nothing to log."""
    return Response(status_code=DISCONNECTED)


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
        exception_handlers={Refusal: _refusal_handler, ClientDisconnect: _gone_handler},
        lifespan=lifespan,
    )
    app.state.service = service
    app.add_middleware(Gate, config=config, metrics=metrics, service=service)
    if config.cors_allow_origin:
        # outside the gate, so a browser's preflight (OPTIONS, without the API key) is answered
        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_allow_origin), allow_methods=["GET", "POST"],
                           allow_headers=["content-type", "authorization"])
    return app
