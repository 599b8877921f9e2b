"""bge-onnx serve under load: throughput and p50/p99 per concurrency against in-process encode, overload, peak RSS.

The server runs as its own process on 127.0.0.1 (``python -m bge_onnx serve``); clients are threads of this
process, each with one keep-alive connection, sending TEI /embed requests. Every level is bounded in requests and
in seconds. In-process: the same requests' texts through Embedder.encode one request at a time, in this process.
Overload: far more clients than --max-concurrent-requests at once; each answer must be the right vectors or a 429.
Client and server share the machine's CPUs, so the server's figures are a lower bound.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .harness import RESULTS, TRYOUTS, Report, log


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Client:
    """One keep-alive HTTP connection per thread."""

    def __init__(self, port: int) -> None:
        self.port, self.local = port, threading.local()

    def post(self, path: str, body: object) -> tuple[int, object]:
        connection = getattr(self.local, "connection", None)
        if connection is None:
            connection = self.local.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)
        try:
            connection.request("POST", path, json.dumps(body), {"content-type": "application/json"})
            response = connection.getresponse()
            return response.status, json.loads(response.read())
        except (OSError, http.client.HTTPException):
            self.local.connection = None
            raise


def start_server(args: argparse.Namespace, port: int, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "bge_onnx", "serve", str(args.model), "--port", str(port), "--precision",
               args.precision, "--max-client-batch-size", str(max(args.texts_per_request, 1)), "--auto-truncate",
               *(["--isolate-batches"] if args.isolate_batches else []), *extra]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_healthy(process, port, " ".join(command))
    return process


def wait_healthy(process: subprocess.Popen, port: int, label: str, seconds: float = 300) -> None:
    """Return once GET /health on ``port`` answers 200; exit the benchmark if ``process`` ends or time runs out."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"benchmarks: the server exited {process.returncode}: {label}")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", "/health")
            if connection.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    process.kill()
    raise SystemExit(f"benchmarks: the server was not healthy within {seconds:.0f} s: {label}")


def peak_rss_mb(pid: int, field: str = "VmHWM") -> float:
    """The process's peak RSS (VmHWM), or its RSS now (VmRSS), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def soak(client: Client, pid: int, requests: list[list[str]], seconds: float, clients: int = 8) -> dict:
    """``clients`` threads sending ``requests`` (mixed lengths) round and round for ``seconds``; the server's RSS
    every few seconds, from the first sample (after a warm-up pass) to the last."""
    stop = time.monotonic() + seconds
    samples, statuses, lock = [], {}, threading.Lock()

    def worker(offset: int) -> None:
        i = offset
        while time.monotonic() < stop:
            status, _ = client.post("/embed", {"inputs": requests[i % len(requests)]})
            with lock:
                statuses[status] = statuses.get(status, 0) + 1
            i += clients

    with ThreadPoolExecutor(clients) as pool:
        for k in range(clients):
            pool.submit(worker, k)
        while time.monotonic() < stop:
            samples.append((round(seconds - (stop - time.monotonic()), 1), peak_rss_mb(pid, "VmRSS")))
            time.sleep(min(5.0, max(stop - time.monotonic(), 0)))
    samples.append((seconds, peak_rss_mb(pid, "VmRSS")))
    return {"seconds": seconds, "clients": clients, "statuses": statuses, "rss_mb": samples}


def load_level(client: Client, requests: list[list[str]], concurrency: int, seconds: float,
               expected: list[np.ndarray]) -> dict:
    """Send ``requests`` from ``concurrency`` threads (stopping after ``seconds``); latency, throughput, and each
    answer's cosine to ``expected`` (the request encoded alone, in-process)."""
    latencies, texts, statuses, cosines, lock = [], [0], {}, [], threading.Lock()
    deadline = time.monotonic() + seconds
    queue = iter(enumerate(requests))

    def worker() -> None:
        while time.monotonic() < deadline:
            with lock:
                index, batch = next(queue, (None, None))
            if batch is None:
                return
            start = time.perf_counter()
            status, body = client.post("/embed", {"inputs": batch})
            elapsed = time.perf_counter() - start
            with lock:
                latencies.append(elapsed)
                statuses[status] = statuses.get(status, 0) + 1
                texts[0] += len(batch) if status == 200 else 0
                if status == 200:
                    cosines.extend((np.asarray(body, np.float32) * expected[index]).sum(axis=1).tolist())

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for _ in range(concurrency):
            pool.submit(worker)
    wall = time.perf_counter() - start
    latencies.sort()
    return {
        "requests": len(latencies), "statuses": statuses, "wall_s": wall, "texts_per_s": texts[0] / wall,
        "p50_ms": 1000 * statistics.median(latencies) if latencies else None,
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else None,
        "min_cosine": min(cosines) if cosines else None, "mean_cosine": statistics.fmean(cosines) if cosines else None,
    }


def in_process(embedder, requests: list[list[str]], seconds: float) -> float:
    """Texts/s of Embedder.encode over the same requests, one request per call."""
    warnings.filterwarnings("ignore", message=r"\d+ of \d+ texts exceeded max_length")  # the server truncates too
    done, start = 0, time.perf_counter()
    for batch in requests:
        embedder.encode(batch)
        done += len(batch)
        if time.perf_counter() - start > seconds:
            break
    return done / (time.perf_counter() - start)


def overload(client: Client, embedder, texts: list[str], clients: int, right: float) -> dict:
    """``clients`` requests at once against a small --max-concurrent-requests: right vectors (cosine to the text
    encoded alone at least ``right``) or 429, none lost."""
    expected = {t: embedder.encode([t])[0] for t in texts}  # each alone, as each request is sent
    barrier = threading.Barrier(clients)

    def one(text: str) -> str:
        barrier.wait()
        try:
            status, body = client.post("/embed", {"inputs": [text]})
        except (OSError, http.client.HTTPException) as err:
            return f"lost ({type(err).__name__})"
        if status == 429:
            return "429"
        if status != 200:
            return f"status {status}"
        return "right" if float(np.dot(np.asarray(body[0], np.float32), expected[text])) >= right else "wrong"

    with ThreadPoolExecutor(clients) as pool:
        outcomes = list(pool.map(one, [texts[i % len(texts)] for i in range(clients)]))
    return {k: outcomes.count(k) for k in sorted(set(outcomes))}


def synthetic(n: int, words: int) -> list[str]:
    rng = np.random.default_rng(0)
    vocabulary = ["the", "a", "panda", "bear", "eats", "bamboo", "in", "china", "mountains", "forest", "river", "city", "capital", "of", "france", "paris"]
    return [" ".join(rng.choice(vocabulary, size=max(1, int(rng.integers(words // 2, words + 1))))) for _ in range(n)]


def main(argv: list[str], *, name: str = "serve-load") -> None:
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks {name}", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a bge-onnx model folder")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "int8", "fp16", "auto"])
    parser.add_argument("--concurrency", default="1,8,32,128", help="client counts (default 1,8,32,128)")
    parser.add_argument("--requests", type=int, default=400, help="requests per level at most (default 400)")
    parser.add_argument("--seconds", type=float, default=30, help="seconds per level at most (default 30)")
    parser.add_argument("--texts-per-request", type=int, default=4, help="texts per request (default 4)")
    parser.add_argument("--soak", type=float, default=0, metavar="SECONDS",
                        help="after the levels: mixed lengths from 8 clients for this long, the server's RSS sampled")
    parser.add_argument("--isolate-batches", action="store_true", help="serve with --isolate-batches")
    parser.add_argument("--stem", default="", help="results file name (default: the benchmark's name)")
    parser.add_argument("--overload-clients", type=int, default=256, help="clients at once in the overload test")
    parser.add_argument("--synthetic", action="store_true",
                        help="generated texts instead of the evaluation data (a try-out; results go to benchmarks/out)")
    args = parser.parse_args(argv)
    from bge_onnx import Embedder

    if args.synthetic:
        corpora = {"short queries": synthetic(2000, 12), "passages": synthetic(1000, 200)}
    else:
        from .corpora import corpora as load_corpora

        picked = load_corpora(1000)  # SciFact has 1,109 queries
        corpora = {"short queries": picked["short queries"], "passages": picked["passages"]}
    levels = [int(c) for c in args.concurrency.split(",")]
    report = Report(name, "bge-onnx serve under load: TEI /embed over HTTP on 127.0.0.1 against in-process encode",
                    argv, models={"MODEL": args.model}, stem=args.stem)
    embedder = Embedder(args.model, precision=args.precision)
    port = _free_port()
    # admission by expected wait off, so that every level measures what the server does with that many clients
    # queued (serve-overload measures the admission)
    server = start_server(args, port, "--max-queue-ms", "0")
    client = Client(port)
    rows, data = [], {}
    try:
        for corpus, texts in corpora.items():
            k = args.texts_per_request
            requests = [texts[i : i + k] for i in range(0, len(texts) - k + 1, k)][: args.requests]
            base = in_process(embedder, requests, args.seconds)
            expected = [embedder.encode(batch) for batch in requests]
            for level in levels:
                log(f"{corpus}: {level} clients")
                result = load_level(client, requests, level, args.seconds, expected)
                result["in_process_texts_per_s"] = base
                data[f"{corpus} @ {level}"] = result
                rows.append([corpus, level, result["requests"], f"{result['texts_per_s']:.0f}", f"{base:.0f}",
                             f"{result['texts_per_s'] / base:.2f}x", f"{result['p50_ms']:.1f}",
                             f"{result['p99_ms']:.1f}", f"{result['min_cosine']:.5f} / {result['mean_cosine']:.6f}",
                             json.dumps(result["statuses"])])
        data["peak_rss_mb_after_load"] = peak_rss_mb(server.pid)
        if args.soak:
            mixed = [r for pair in zip(*(
                [texts[i : i + args.texts_per_request] for i in range(0, len(texts) - args.texts_per_request + 1,
                                                                      args.texts_per_request)]
                for texts in corpora.values())) for r in pair]
            log(f"soak: {args.soak:.0f} s")
            data["soak"] = soak(client, server.pid, mixed, args.soak)
    finally:
        server.terminate()
        server.wait(60)
    report.text(
        f"Precision {args.precision}; batching {'isolated per request (--isolate-batches)' if args.isolate_batches else 'merged across requests'}; "
        f"{args.texts_per_request} texts per request; each level bounded by {args.requests} requests and {args.seconds:.0f} s. "
        "The server runs with --max-queue-ms 0 (no admission by expected wait: each level measures the queue its "
        "clients make; serve-overload measures the admission). "
        "Client threads run in this process on the same CPUs as the server. In-process: the same requests through "
        "Embedder.encode one request per call, measured once per corpus before the levels (not interleaved). Cosines: "
        "each answered text against that request encoded alone in-process."
    )
    report.table(["corpus", "clients", "requests", "server texts/s", "in-process texts/s", "server / in-process",
                  "p50 ms", "p99 ms", "min / mean cosine to the request encoded alone", "statuses"], rows)
    limit = 8
    server = start_server(args, port, "--max-concurrent-requests", str(limit))
    try:
        # the per-batch int8 of older exports moves a text's vector a little with its neighbours: "right" is then
        # the int8 gate's floor, not fp32's
        right = 0.99999 if embedder.batch_independent or args.isolate_batches else 0.985
        outcome = overload(Client(port), embedder, corpora["short queries"][:64], args.overload_clients, right)
        data["overload"] = {"clients": args.overload_clients, "limit": limit, "outcomes": outcome,
                            "peak_rss_mb": peak_rss_mb(server.pid)}
    finally:
        server.terminate()
        server.wait(60)
    if "soak" in data:
        rss = data["soak"]["rss_mb"]
        report.text(f"Soak: {args.soak:.0f} s of short queries and passages alternating, from 8 clients after the levels "
                    f"above: {json.dumps(data['soak']['statuses'])}; server RSS {rss[0][1]:.0f} MB at the start, "
                    f"{rss[-1][1]:.0f} MB at the end (max {max(r for _, r in rss):.0f} MB; samples every 5 s in the JSON).")
    report.text(f"Overload ('right': cosine to the text encoded alone >= {right}): "
                f"{args.overload_clients} clients at once, --max-concurrent-requests {limit}: "
                f"{json.dumps(outcome)}; server peak RSS {data['overload']['peak_rss_mb']:.0f} MB "
                f"(after the load levels: {data['peak_rss_mb_after_load']:.0f} MB).")
    report.data = data
    report.write(TRYOUTS if args.synthetic else RESULTS)
