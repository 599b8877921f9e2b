"""bge-onnx serve at twice the rate it sustains: latency of what it admits, 429s for the excess, none lost or wrong.

First the sustainable rate R: closed loop, 16 client threads sending /embed requests of 4 texts for --seconds.
Then an open loop at 2R for --seconds (requests sent on a fixed schedule, each on its own connection, whatever the
server answers), once against the default admission (--max-queue-ms 2000) and once with it off (--max-queue-ms 0:
only --max-concurrent-requests 512, the earlier behaviour). Each 200 is checked against the request encoded
in-process. Last, the official AsyncOpenAI client (2 retries, its default) sends 60 requests at once to a server
with --max-concurrent-requests 4: with Retry-After its retries wait, and the failures it gives up on are counted.
Client threads share the server's CPUs.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .harness import Report, log
from .serve_hostile import start
from .serve_load import _free_port, synthetic


def post(port: int, texts: list[str]) -> tuple[int, object, float]:
    began = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        connection.request("POST", "/embed", json.dumps({"inputs": texts}), {"content-type": "application/json"})
        response = connection.getresponse()
        payload = response.read()
    finally:
        connection.close()
    return response.status, json.loads(payload), time.perf_counter() - began


def sustainable(port: int, requests: list[list[str]], seconds: float) -> float:
    """Requests per second that 16 closed-loop clients get answered."""
    stop, done, lock = time.monotonic() + seconds, [0], threading.Lock()

    def worker(k: int) -> None:
        i = k
        while time.monotonic() < stop:
            status, _, _ = post(port, requests[i % len(requests)])
            if status == 200:
                with lock:
                    done[0] += 1
            i += 16

    began = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(worker, range(16)))
    return done[0] / (time.monotonic() - began)


def open_loop(port: int, requests: list[list[str]], expected: list[np.ndarray], rate: float, seconds: float) -> dict:
    n = int(rate * seconds)
    results: list = [None] * n
    began = time.perf_counter()

    def one(i: int) -> None:
        delay = began + i / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        try:
            status, body, latency = post(port, requests[i % len(requests)])
        except (OSError, http.client.HTTPException) as err:
            results[i] = ("lost", repr(err), 0.0)
            return
        if status == 200:
            got = np.asarray(body, np.float32)
            right = bool(((got * expected[i % len(requests)]).sum(1) >= 0.9999).all())
            results[i] = (200 if right else "wrong", None, latency)
        else:
            results[i] = (status, body, latency)

    with ThreadPoolExecutor(1024) as pool:
        list(pool.map(one, range(n)))
    latencies = sorted(r[2] for r in results if r[0] == 200)
    counts: dict = {}
    for r in results:
        counts[str(r[0])] = counts.get(str(r[0]), 0) + 1
    quantile = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else float("nan")
    return {"requests": n, "rate": rate, "statuses": counts, "p50_s": quantile(0.5), "p99_s": quantile(0.99),
            "max_s": latencies[-1] if latencies else float("nan"),
            "answered_per_s": counts.get("200", 0) / seconds}


def openai_burst(port: int, texts: list[str]) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=2)

    async def one(text: str) -> str:
        try:
            await client.embeddings.create(model="m", input=[text] * 8)
            return "ok"
        except openai.RateLimitError:
            return "429 after retries"
        except openai.APIError as err:
            return type(err).__name__

    async def run() -> list[str]:
        return await asyncio.gather(*(one(t) for t in texts))

    began = time.perf_counter()
    outcomes = asyncio.run(run())
    return {"requests": len(texts), "ok": outcomes.count("ok"), "failed": len(texts) - outcomes.count("ok"),
            "outcomes": {o: outcomes.count(o) for o in set(outcomes)}, "seconds": time.perf_counter() - began}


def main(argv: list[str], *, name: str = "serve-overload") -> None:
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks {name}", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a bge-onnx model folder")
    parser.add_argument("--precision", default="auto", choices=["fp32", "int8", "auto"])
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each phase (default 30)")
    args = parser.parse_args(argv)

    from bge_onnx import Embedder

    embedder = Embedder(args.model, precision=args.precision)
    words = synthetic(400, 40)
    requests = [words[i : i + 4] for i in range(0, len(words), 4)]
    expected = [embedder.encode(r) for r in requests]
    report = Report(name, "bge-onnx serve at twice its sustainable rate", argv, models={"model": args.model})
    data: dict = {}
    port = _free_port()
    process = start(None, args.model, args.precision, port)
    try:
        log("sustainable rate")
        rate = sustainable(port, requests, args.seconds)
    finally:
        process.terminate()
        process.wait(60)
    data["sustainable_per_s"] = rate
    rows = []
    for label, flags in (("--max-queue-ms 2000 (default)", []), ("--max-queue-ms 0 (count only, 512)",
                                                                 ["--max-queue-ms", "0"])):
        port = _free_port()
        process = start(None, args.model, args.precision, port, *flags)
        try:
            log(f"open loop at {2 * rate:.1f}/s: {label}")
            result = open_loop(port, requests, expected, 2 * rate, args.seconds)
        finally:
            process.terminate()
            process.wait(60)
        data[label] = result
        s = result["statuses"]
        rows.append([label, result["requests"], s.get("200", 0), s.get("429", 0), s.get("lost", 0), s.get("wrong", 0),
                     f"{result['answered_per_s']:.1f}", f"{result['p50_s']:.2f}", f"{result['p99_s']:.2f}",
                     f"{result['max_s']:.2f}"])
    port = _free_port()
    process = start(None, args.model, args.precision, port, "--max-concurrent-requests", "4")
    try:
        log("AsyncOpenAI burst")
        data["openai_burst"] = openai_burst(port, [f"burst text {i}" for i in range(60)])
    finally:
        process.terminate()
        process.wait(60)
    report.data = data
    report.text(f"Sustainable rate (16 closed-loop clients, 4 texts per request, precision {args.precision}): "
                f"{rate:.1f} requests/s. Open loop at twice that ({2 * rate:.1f}/s) for {args.seconds:g} s, each "
                "request on its own connection; latency quantiles of the 200s; 'wrong': a 200 whose vectors differ "
                "from the request encoded in-process (cosine < 0.9999); 'lost': no HTTP answer.")
    report.table(["admission", "sent", "200", "429", "lost", "wrong", "answered/s", "p50 s", "p99 s", "max s"], rows)
    burst = data["openai_burst"]
    report.text(f"AsyncOpenAI (max_retries=2) sending 60 requests of 8 texts at once to --max-concurrent-requests 4: "
                f"{burst['ok']} succeeded, {burst['failed']} failed ({json.dumps(burst['outcomes'])}) in "
                f"{burst['seconds']:.1f} s. The 429s carry Retry-After (whole seconds) and retry-after-ms, which the "
                "client reads first; each refused client is booked a later slot, so the retries come back spread out.")
    report.write()


if __name__ == "__main__":
    main(sys.argv[1:])
