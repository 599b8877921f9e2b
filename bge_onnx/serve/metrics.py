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

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
