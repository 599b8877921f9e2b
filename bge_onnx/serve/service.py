"""The loaded models, their token counters and batching queues: what every API family's routes call."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import warnings
from collections.abc import Callable

import anyio
import numpy as np

from ..embedder import Embedder
from ..handle import LoadOptions
from ..m3 import M3Embedder
from ..pooling import normalize as l2_normalize
from ..reranker import Reranker
from ..session import CUDA, SPIN_ENV
from .batcher import Batcher, Timing
from .limits import (
    BACKEND,
    NOT_FOUND,
    OVERLOADED,
    UNHEALTHY,
    Refusal,
    RetryBook,
    ServeConfig,
    check_lengths,
)
from .metrics import Metrics
from .tokens import TokenCounter

log = logging.getLogger("bge_onnx.serve")

# A request with at most this many characters is tokenised on the event loop (tens of microseconds); a larger one in
# a worker thread.
INLINE_CHARS = 2000


class Service:
    """The loaded models, their token counters and batching queues; what the routes call."""

    def __init__(
        self,
        config: ServeConfig,
        metrics: Metrics,
        *,
        embedder: Embedder | None = None,
        reranker: Reranker | None = None,
    ) -> None:
        self.config, self.metrics = config, metrics
        self.embedder, self.reranker = embedder, reranker
        self.m3: M3Embedder | None = None  # bge-m3 with its heads: lexical weights and ColBERT vectors too
        self._m3_queues: dict[str, Batcher] = {}
        self.embed_tokens: TokenCounter | None = None
        self.rerank_tokens: TokenCounter | None = None
        self._embed_queue: Batcher | None = None
        self._rerank_queue: Batcher | None = None
        self.ready = False
        self.error: str | None = None
        self.started = int(time.time())  # /v1/models' "created"
        self.in_flight = 0  # requests on the work routes, counted by the gate (app.Gate)
        self._retries = RetryBook()

    def load(self) -> None:
        """Load the models (blocking: run it in a thread)."""
        config = self.config
        # a server waits between requests: its threads spin only within a call and sleep between them, unless
        # $BGE_ONNX_SPIN says otherwise (benchmarks/results/idle.md: as little idle CPU as sleeping, faster answers)
        os.environ.setdefault(SPIN_ENV, "run")
        options = dataclasses.asdict(LoadOptions(device=config.device, precision=config.precision,
                                                 threads=config.threads, max_length=config.max_length,
                                                 max_tokens=config.max_batch_tokens, revision=config.revision))
        if self.embedder is None and config.model is not None:
            self.embedder = Embedder(config.model, **options)
        if self.reranker is None and config.reranker is not None:
            self.reranker = Reranker(config.reranker, **options)
        if self.embedder is not None:
            self.embed_tokens = TokenCounter(self.embedder.folder)
            if self.embedder.spec.heads:
                self.m3 = M3Embedder.sharing(self.embedder)
        if self.reranker is not None:
            self.rerank_tokens = TokenCounter(self.reranker.folder)

    @property
    def batch_independent(self) -> bool:
        """Whether every loaded model's outputs are the same whatever else shares a batch."""
        return all(m.batch_independent for m in (self.embedder, self.reranker) if m is not None)

    async def start(self, on_failure: Callable[[], None] | None) -> None:
        # The runtime warns once per call about truncated texts; the server checks lengths itself and a request
        # asked for truncation (or the operator did, with --auto-truncate), so the warnings would only flood logs.
        warnings.filterwarnings("ignore", message=r"\d+ of \d+ (texts|pairs) exceeded max_length", category=UserWarning)
        try:
            await anyio.to_thread.run_sync(self.load)
        except Exception as err:  # reported on /health and in the log; the CLI exits 1
            self.error = f"{type(err).__name__}: {err}"
            log.error("bge-onnx serve: the model failed to load: %s", self.error)
            if on_failure is not None:
                on_failure()
            return
        # --isolate-batches only changes what a client gets where a graph's output depends on its batch (per-batch
        # int8 of older exports); elsewhere merged batches give the same vectors, faster
        wait, isolate = self.config.max_wait_ms / 1000, self.config.isolate_batches and not self.batch_independent
        if self.embedder is not None:
            embedder = self.embedder
            self._embed_queue = Batcher(lambda texts: embedder.encode(texts, normalize=False), name="embed",
                                        metrics=self.metrics, max_wait=wait, isolate=isolate, company=self.expecting)
            self._embed_queue.start()
        if self.m3 is not None:
            m3 = self.m3

            def lexical(texts: list[str]) -> list[dict[str, float]]:
                return m3.encode(texts, return_dense=False, return_sparse=True)["lexical_weights"]

            def colbert(texts: list[str]) -> list[np.ndarray]:
                return m3.encode(texts, return_dense=False, return_colbert_vecs=True)["colbert_vecs"]

            self._m3_queues = {output: Batcher(run, name=output, metrics=self.metrics, max_wait=wait, isolate=isolate,
                                               company=self.expecting)
                               for output, run in (("sparse", lexical), ("colbert", colbert))}
            for queue in self._m3_queues.values():
                queue.start()
        if self.reranker is not None:
            reranker = self.reranker
            self._rerank_queue = Batcher(lambda pairs: reranker.compute_score(pairs), name="rerank",
                                         metrics=self.metrics, max_wait=wait, isolate=isolate, company=self.expecting)
            self._rerank_queue.start()
        self.ready = True
        log.info("bge-onnx serve: ready")

    async def stop(self) -> None:
        for queue in self.queues():
            await queue.stop()

    def require(self, what: str) -> Embedder | Reranker:
        """The embedder ("embed") or reranker ("rerank"), or a refusal: still loading, or not served here."""
        if not self.ready:
            raise Refusal(UNHEALTHY, self.error and f"the model failed to load: {self.error}" or "the model is loading")
        model = self.embedder if what == "embed" else self.reranker
        if model is None:
            hint = "start it with --reranker MODEL" if what == "rerank" else "start it with a MODEL to embed with"
            raise Refusal(NOT_FOUND, f"this server has no {'reranker' if what == 'rerank' else 'embedding model'}; {hint}")
        return model

    async def measure(self, what: str, texts: list[str], limit: int) -> tuple[list[str], list[int], list[bool], float]:
        """Texts cut to what ``limit`` tokens need, tokens per text, which were cut (TokenCounter.measure), and the
        seconds it took; in a worker thread (tokenising a large request must not stall the event loop), but on the
        loop for a request under INLINE_CHARS, where the hop to a thread costs more than the tokenising."""
        counter = self.embed_tokens if what == "embed" else self.rerank_tokens
        start = time.perf_counter()
        if sum(map(len, texts)) <= INLINE_CHARS:
            clipped, counts, cut = counter.measure(texts, limit)
        else:
            clipped, counts, cut = await anyio.to_thread.run_sync(counter.measure, texts, limit)
        elapsed = time.perf_counter() - start
        self.metrics.tokenize_time.labels(what).observe(elapsed)
        return clipped, counts, cut, elapsed

    async def measure_pairs(self, queries: list[str], texts: list[str]) -> tuple[list, list, list, list, list, list,
                                                                            float]:
        """Queries and texts cut as the reranker will cut them, their tokens without special tokens and which were
        cut (each distinct query measured once), and the seconds it took."""
        reranker, counter = self.require("rerank"), self.rerank_tokens
        start = time.perf_counter()

        def run():
            distinct = list(dict.fromkeys(queries))
            measured = dict(zip(distinct, zip(*counter.measure(distinct, reranker.query_max_length, special=False))))
            query_clipped, query_counts, query_cut = zip(*(measured[q] for q in queries))
            return (list(query_clipped), list(query_counts), list(query_cut),
                    *counter.measure(texts, reranker.max_length, special=False))

        query_clipped, query_counts, query_cut, clipped, counts, cut = await anyio.to_thread.run_sync(run)
        elapsed = time.perf_counter() - start
        self.metrics.tokenize_time.labels("rerank").observe(elapsed)
        return query_clipped, clipped, query_counts, counts, query_cut, cut, elapsed

    async def embed(self, texts: list[str], tokens: int) -> tuple[np.ndarray, Timing]:
        """Raw pooled vectors (not normalised) for ``texts``, computed with whatever else is queued."""
        return await self._submit(self._embed_queue, texts, tokens)

    async def multi(self, output: str, texts: list[str], tokens: int) -> tuple[list, Timing]:
        """bge-m3's lexical weights (output "sparse") or ColBERT vectors ("colbert") for ``texts``."""
        self.require("embed")
        if self.m3 is None:
            what = "lexical weights" if output == "sparse" else "ColBERT vectors"
            raise Refusal(NOT_FOUND, f"this server's model has no {what}: serve a bge-m3 folder exported with its "
                          "heads (bge-onnx export BAAI/bge-m3 --out DIR)")
        return await self._submit(self._m3_queues[output], texts, tokens)

    async def score(self, pairs: list[tuple[str, str]], tokens: int) -> tuple[np.ndarray, Timing]:
        """Raw reranker logits for ``pairs``."""
        return await self._submit(self._rerank_queue, pairs, tokens)

    def expecting(self) -> bool:
        """Whether requests in flight are on their way to a queue, not in one yet (being read or tokenised): a
        queue that finds the model idle waits --max-wait-ms for company only then."""
        return self.in_flight > sum(queue.jobs for queue in self.queues())

    def queues(self) -> list[Batcher]:
        return [q for q in (self._embed_queue, self._rerank_queue, *self._m3_queues.values()) if q is not None]

    def admit(self, queue: Batcher, tokens: int) -> None:
        """Refuse new work (429) while the work already queued would keep it waiting longer than --max-queue-ms:
        admission by expected wait, so a burst cannot queue a request for minutes (a count of requests says little
        when one request holds 1 short text and the next 32 long ones)."""
        limit = self.config.max_queue_ms / 1000
        if limit <= 0:
            return
        wait = sum(q.backlog for q in self.queues())
        if wait > limit:
            retry = self._retries.next(free_in=wait - limit, interval=queue.seconds(tokens))
            raise Refusal(OVERLOADED, f"the server is overloaded: the work queued takes about {wait:.1f} s, over "
                          f"the {limit:g} s a request may wait (--max-queue-ms); retry later", retry_after=retry)

    async def _submit(self, queue: Batcher, items: list, tokens: int) -> tuple[np.ndarray, Timing]:
        self.admit(queue, tokens)
        try:
            return await queue.submit(items, tokens)
        except Exception as err:
            log.exception("bge-onnx serve: inference failed")
            raise Refusal(BACKEND, f"inference failed: {type(err).__name__}: {err}") from err



@dataclasses.dataclass
class Answer:
    """What a route needs to respond: the rows (vectors or scores), tokens per input as computed, and headers."""

    rows: np.ndarray
    tokens: list[int]
    headers: dict[str, str]


async def embed_request(service: Service, texts: list[str], *, name: str, truncate: bool, normalize: bool = True,
                        output: str = "dense") -> Answer:
    """Check, queue and embed one request's texts (already prefixed with any instruction): dense vectors, or with
    ``output`` "sparse" / "colbert" bge-m3's lexical weights or ColBERT vectors."""
    start = time.perf_counter()
    embedder = service.require("embed")
    characters = sum(map(len, texts))
    service.metrics.tei_request("embed", len(texts))
    texts, counts, cut, tokenize = await service.measure("embed", texts, embedder.max_length)
    check_lengths(counts, cut, embedder.max_length, names=[f"{name}[{i}]" for i in range(len(texts))], param=name,
                  truncate=truncate)
    used = [min(c, embedder.max_length) for c in counts]
    if output == "dense":
        rows, timing = await service.embed(texts, sum(used))
        finite(rows)
    else:
        rows, timing = await service.multi(output, texts, sum(used))
    service.metrics.tei_success("embed", len(texts), total=time.perf_counter() - start, tokenize=tokenize,
                                queue=timing.queue, inference=timing.inference, lengths=used)
    if output == "dense" and normalize:
        rows = l2_normalize(rows)
    headers = timing_headers(start, tokenize, timing, tokens=sum(used), characters=characters,
                             device=_device(embedder))
    return Answer(rows, used, headers)


async def score_request(service: Service, queries: list[str], texts: list[str], *, query_names: list[str],
                        text_names: list[str], param: str, query_param: str, truncate: bool) -> Answer:
    """Check, queue and score (query, text) pairs: raw logits, in input order. ``query_names[i]`` and
    ``text_names[i]`` are how messages name pair i's parts."""
    start = time.perf_counter()
    reranker = service.require("rerank")
    characters = sum(len(q) + len(t) for q, t in zip(queries, texts))
    service.metrics.tei_request("predict", len(texts))
    queries, texts, query_counts, counts, query_cut, cut, tokenize = await service.measure_pairs(queries, texts)
    specials = service.rerank_tokens.pair_specials
    pairs = [q + c + specials for q, c in zip(query_counts, counts)]
    check_lengths(query_counts, query_cut, reranker.query_max_length, names=query_names, param=query_param,
                  truncate=truncate, limit_name="the reranker's query limit")
    check_lengths(pairs, cut, reranker.max_length, names=text_names, param=param, truncate=truncate)
    used = [min(c, reranker.max_length) for c in pairs]
    scores, timing = await service.score(list(zip(queries, texts)), sum(used))
    finite(scores)
    service.metrics.tei_success("predict", len(texts), total=time.perf_counter() - start, tokenize=tokenize,
                                queue=timing.queue, inference=timing.inference, lengths=used)
    headers = timing_headers(start, tokenize, timing, tokens=sum(used), characters=characters,
                             device=_device(reranker))
    return Answer(scores, used, headers)


async def rerank_request(service: Service, query: str, texts: list[str], *, name: str, truncate: bool) -> Answer:
    """Check, queue and score one query against texts: raw logits, in input order."""
    return await score_request(service, [query] * len(texts), texts, query_names=["query"] * len(texts),
                               text_names=[f"{name}[{i}]" for i in range(len(texts))], param=name,
                               query_param="query", truncate=truncate)


def finite(rows: np.ndarray) -> None:
    """Refuse to answer NaN or infinity (a broken graph or a float16 overflow): JSON has no such numbers, and orjson
    would write them as null."""
    if not np.isfinite(rows).all():
        raise Refusal(BACKEND, "inference failed: the model gave NaN or infinite values")


def sigmoid(scores: np.ndarray) -> np.ndarray:
    """Scores in (0, 1), as Reranker.compute_score(normalize=True) gives them."""
    return (1.0 / (1.0 + np.exp(-scores.astype(np.float64)))).astype(np.float32)


def _device(model: Embedder | Reranker) -> str:
    return "gpu" if CUDA in model.providers else "cpu"


def timing_headers(start: float, tokenize: float, timing: Timing, *, tokens: int, characters: int,
                   device: str) -> dict[str, str]:
    """TEI's response headers: where the request's time went (whole milliseconds) and what it computed; and the
    same to the microsecond as the W3C's Server-Timing (browsers' developer tools show it), with the hop to the
    inference thread and back ("hop") apart from the runtime's own time."""
    total = time.perf_counter() - start
    phases = {"tokenize": tokenize, "queue": timing.queue, "inference": timing.inference,
              "hop": timing.call - timing.inference, "total": total}
    return {
        "x-compute-type": device,
        "x-compute-time": str(int(total * 1000)),
        "x-total-time": str(int(total * 1000)),
        "x-tokenization-time": str(int(tokenize * 1000)),
        "x-queue-time": str(int(timing.queue * 1000)),
        "x-inference-time": str(int(timing.inference * 1000)),
        "x-compute-tokens": str(tokens),
        "x-compute-characters": str(characters),
        "server-timing": ", ".join(f"{name};dur={seconds * 1000:.3f}" for name, seconds in phases.items()),
    }
