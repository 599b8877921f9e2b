"""The server's Prometheus metrics, in a registry of its own (one per app, so apps in one process do not clash)."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# seconds: from a millisecond (a cached short text) to a minute (a full batch of long passages on a slow CPU)
SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TEXTS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
TOKENS = (16, 64, 256, 1024, 4096, 16384, 65536, 262144)
# TEI's buckets: durations 1e-5 * 1.5^k s (k = 1..35), batch sizes 2^0..2^12, batch tokens 2^0..2^20, input lengths
# 2^0..2^19 (router/src/prometheus.rs)
TEI_SECONDS = tuple(1e-5 * 1.5**k for k in range(1, 36))
TEI_SIZES = tuple(2.0**k for k in range(13))
TEI_TOKENS = tuple(2.0**k for k in range(21))
TEI_LENGTHS = tuple(2.0**k for k in range(20))


class Metrics:
    """Requests by route and status, latency, batch sizes (texts, tokens), queue depth, time in each stage."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("bge_onnx_requests", "HTTP requests answered, by route and status code",
                                ["route", "status"], registry=registry)
        self.latency = Histogram("bge_onnx_request_duration_seconds", "Time from request to response, by route",
                                 ["route"], buckets=SECONDS, registry=registry)
        self.in_flight = Gauge("bge_onnx_requests_in_flight", "Requests being served (limited by "
                               "--max-concurrent-requests)", registry=registry)
        self.queue_depth = Gauge("bge_onnx_queue_depth", "Inputs waiting for the model, by model",
                                 ["model"], registry=registry)
        self.batch_texts = Histogram("bge_onnx_batch_texts", "Inputs per call of the model (merged requests)",
                                     ["model"], buckets=TEXTS, registry=registry)
        self.batch_tokens = Histogram("bge_onnx_batch_tokens", "Tokens per call of the model (merged requests)",
                                      ["model"], buckets=TOKENS, registry=registry)
        self.batch_requests = Histogram("bge_onnx_batch_requests", "Requests merged into one call of the model",
                                        ["model"], buckets=TEXTS, registry=registry)
        self.tokenize_time = Histogram("bge_onnx_tokenize_seconds", "Time a request spent counting its tokens",
                                       ["model"], buckets=SECONDS, registry=registry)
        self.queue_time = Histogram("bge_onnx_queue_seconds", "Time a request waited for the model",
                                    ["model"], buckets=SECONDS, registry=registry)
        self.inference_time = Histogram("bge_onnx_inference_seconds", "Time of one call of the model",
                                        ["model"], buckets=SECONDS, registry=registry)

        # TEI's metrics under TEI's names, so its dashboards work here too. TEI's counters carry no "_total" suffix,
        # which prometheus-client adds to every Counter: they are Gauges here that only go up (rate() works on them).
        self.te_request_count = Gauge("te_request_count", "TEI: requests received, by single or batch",
                                      ["method"], registry=registry)
        self.te_request_success = Gauge("te_request_success", "TEI: requests answered, by single or batch",
                                        ["method"], registry=registry)
        self.te_request_failure = Gauge("te_request_failure", "TEI: requests refused or failed, by cause",
                                        ["err"], registry=registry)
        self.te_queue_size = Gauge("te_queue_size", "TEI: inputs waiting for the model", registry=registry)
        self.te_request_input_length = Histogram("te_request_input_length", "TEI: tokens per input",
                                                 buckets=TEI_LENGTHS, registry=registry)
        self.te_batch_next_size = Histogram("te_batch_next_size", "TEI: inputs per call of the model",
                                            buckets=TEI_SIZES, registry=registry)
        self.te_batch_next_tokens = Histogram("te_batch_next_tokens", "TEI: tokens per call of the model",
                                              buckets=TEI_TOKENS, registry=registry)
        self.te_task: dict[str, dict] = {}
        for task in ("request", "embed", "predict"):
            stages = {stage: Histogram(f"te_{task}{suffix}_duration", f"TEI: {task} time{suffix.replace('_', ' ')}",
                                       buckets=TEI_SECONDS, registry=registry)
                      for stage, suffix in (("total", ""), ("tokenize", "_tokenization"), ("queue", "_queue"),
                                            ("inference", "_inference"))}
            if task != "request":
                stages["count"] = Gauge(f"te_{task}_count", f"TEI: {task} requests received", registry=registry)
                stages["success"] = Gauge(f"te_{task}_success", f"TEI: {task} requests answered", registry=registry)
            self.te_task[task] = stages

    def tei_request(self, task: str, inputs: int) -> None:
        """A request of ``inputs`` inputs to ``task`` ("embed" or "predict") starts being computed."""
        method = "single" if inputs == 1 else "batch"
        self.te_request_count.labels(method).inc()
        self.te_task[task]["count"].inc()

    def tei_success(self, task: str, inputs: int, *, total: float, tokenize: float, queue: float, inference: float,
                    lengths: list[int]) -> None:
        """A request of ``task`` answered: its times in seconds, tokens per input."""
        self.te_request_success.labels("single" if inputs == 1 else "batch").inc()
        self.te_task[task]["success"].inc()
        for stages in (self.te_task["request"], self.te_task[task]):
            for stage, seconds in (("total", total), ("tokenize", tokenize), ("queue", queue),
                                   ("inference", inference)):
                stages[stage].observe(seconds)
        for length in lengths:
            self.te_request_input_length.observe(length)

    def tei_failure(self, err: str) -> None:
        """A request refused or failed; ``err`` is TEI's cause ("validation", "overloaded", "inference", ...)."""
        self.te_request_failure.labels(err).inc()

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
