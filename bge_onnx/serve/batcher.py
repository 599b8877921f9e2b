"""The batching queue: concurrent requests' inputs merged into one call of the runtime, run off the event loop."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .metrics import Metrics

# Most inputs merged into one call: the runtime sorts and batches a call's inputs by its token budget in chunks of
# 2048 (bge_onnx.batching.TOKENIZE_CHUNK), so a larger call would not batch better, only answer its first request
# later.
MAX_MERGED = 2048


@dataclasses.dataclass
class Timing:
    """Where a request's time went, in seconds."""

    queue: float = 0.0
    inference: float = 0.0  # the runtime's call, timed in its thread
    call: float = 0.0  # the call as the event loop waited for it: inference and the hops to its thread and back


@dataclasses.dataclass
class _Job:
    items: Sequence
    tokens: int
    future: asyncio.Future
    enqueued: float
    timing: Timing = dataclasses.field(default_factory=Timing)


class Batcher:
    """Runs ``run(items) -> rows`` (one row per item) for many requests: whatever requests are waiting when the
    model is free go into one call, and each gets its own rows back.

    One call runs at a time, in a worker thread, so the event loop keeps answering other requests; onnxruntime
    uses all the threads it was given within that call. A request that finds the model idle waits up to
    ``max_wait`` seconds for company, but only while ``company()`` says other requests are on their way (read and
    being tokenised): a lone client's request runs at once; requests that arrive during a call wait for it anyway
    and run together next.
    With ``isolate``, each request gets calls of its own (int8: its vectors then do not depend on other requests).
    If a merged call fails, each of its requests is run alone, so only the one that fails gets the error.
    """

    def __init__(
        self,
        run: Callable[[list], np.ndarray],
        *,
        name: str,
        metrics: Metrics,
        max_wait: float,
        isolate: bool,
        company: Callable[[], bool] = lambda: True,
    ) -> None:
        self._run, self.name, self._metrics = run, name, metrics
        self.max_wait, self.isolate, self._company = max_wait, isolate, company
        self._pending: list[_Job] = []
        self._running_tokens = 0
        self._running_jobs = 0
        # (tokens, seconds) of the latest calls, and what they say a call costs: a fixed part and a part per token
        # (tokens / elapsed alone would take a run of short calls' overhead for slowness and overestimate a long
        # request's wait many times over)
        self._calls: collections.deque[tuple[int, float]] = collections.deque(maxlen=64)
        self.overhead, self.per_token = 0.0, None
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"bge-onnx-{name}")
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._serve(), name=f"bge-onnx-{self.name}-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True)

    @property
    def jobs(self) -> int:
        """Requests queued (whose clients are still there) or running here."""
        return sum(not job.future.done() for job in self._pending) + self._running_jobs

    @property
    def backlog(self) -> float:
        """Seconds of work queued or running, at the measured cost of a call (0 before the first call)."""
        tokens = self._running_tokens + sum(job.tokens for job in self._pending if not job.future.done())
        return self.seconds(tokens) if tokens else 0.0

    def seconds(self, tokens: int) -> float:
        """What a call of ``tokens`` tokens is expected to take (0 before the first call is measured)."""
        if self.per_token is None:
            return 0.0
        return self.overhead + tokens * self.per_token

    def _measured(self, tokens: int, elapsed: float) -> None:
        """Fit seconds = overhead + tokens x per_token to the latest calls (least squares; the mean cost per token
        while their sizes are all alike). In plain sums: it runs on the event loop after every call, where
        numpy's polyfit took ~90 us."""
        self._calls.append((tokens, elapsed))
        n = len(self._calls)
        sx = sum(t for t, _ in self._calls)
        sy = sum(s for _, s in self._calls)
        sxx = sum(t * t for t, _ in self._calls)
        sxy = sum(t * s for t, s in self._calls)
        spread = n * sxx - sx * sx  # n^2 x the sizes' variance
        if n >= 4 and spread > 0.01 * sx * sx:  # sizes' std above a tenth of their mean
            slope = (n * sxy - sx * sy) / spread
            if slope > 0:
                self.per_token, self.overhead = slope, max((sy - slope * sx) / n, 0.0)
                return
        self.per_token, self.overhead = sy / sx, 0.0

    async def submit(self, items: Sequence, tokens: int) -> tuple[np.ndarray, Timing]:
        """Queue ``items`` (``tokens`` long in all) and wait for their rows."""
        job = _Job(items, tokens, asyncio.get_running_loop().create_future(), time.perf_counter())
        self._pending.append(job)
        self._metrics.queue_depth.labels(self.name).inc(len(items))
        self._metrics.te_queue_size.inc(len(items))
        self._wakeup.set()
        rows = await job.future
        return rows, job.timing

    async def _serve(self) -> None:
        while True:
            while not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            if not self.isolate and self.max_wait > 0 and self._company():
                # only a request that found the model idle waits; one that waited through a call does not
                wait = self.max_wait - (time.perf_counter() - self._pending[0].enqueued)
                if wait > 0 and sum(len(j.items) for j in self._pending) < MAX_MERGED:
                    await asyncio.sleep(wait)
            jobs = self._take()
            self._metrics.queue_depth.labels(self.name).dec(sum(len(j.items) for j in jobs))
            self._metrics.te_queue_size.dec(sum(len(j.items) for j in jobs))
            jobs = [j for j in jobs if not j.future.done()]  # the client went away meanwhile
            if jobs:
                await self._call(jobs, split_on_error=len(jobs) > 1)

    def _take(self) -> list[_Job]:
        if self.isolate:
            return [self._pending.pop(0)]
        jobs, total = [], 0
        while self._pending and (not jobs or total + len(self._pending[0].items) <= MAX_MERGED):
            job = self._pending.pop(0)
            jobs.append(job)
            total += len(job.items)
        return jobs

    def _timed(self, items: list) -> tuple[np.ndarray, float]:
        began = time.perf_counter()
        rows = self._run(items)
        return rows, time.perf_counter() - began

    async def _call(self, jobs: list[_Job], *, split_on_error: bool) -> None:
        items = [item for job in jobs for item in job.items]
        start = time.perf_counter()
        for job in jobs:
            job.timing.queue = start - job.enqueued
            self._metrics.queue_time.labels(self.name).observe(job.timing.queue)
        tokens = sum(job.tokens for job in jobs)
        self._running_tokens, self._running_jobs = tokens, len(jobs)
        try:
            rows, inference = await asyncio.get_running_loop().run_in_executor(self._executor, self._timed, items)
        except Exception as err:  # any failure of the runtime is answered, never lost
            self._running_tokens = self._running_jobs = 0
            if split_on_error:
                for job in jobs:
                    if not job.future.done():  # its client may have gone meanwhile
                        await self._call([job], split_on_error=False)
                return
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(err)
            return
        elapsed = time.perf_counter() - start
        self._running_tokens = self._running_jobs = 0
        if elapsed > 0 and tokens > 0:
            self._measured(tokens, elapsed)
        self._metrics.inference_time.labels(self.name).observe(inference)
        self._metrics.batch_texts.labels(self.name).observe(len(items))
        self._metrics.batch_tokens.labels(self.name).observe(tokens)
        self._metrics.batch_requests.labels(self.name).observe(len(jobs))
        self._metrics.te_batch_next_size.observe(len(items))
        self._metrics.te_batch_next_tokens.observe(tokens)
        at = 0
        for job in jobs:
            job.timing.inference, job.timing.call = inference, elapsed
            if not job.future.done():
                job.future.set_result(rows[at : at + len(job.items)])
            at += len(job.items)
