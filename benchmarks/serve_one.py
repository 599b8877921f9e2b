"""One client against in-process encode, interleaved: the server's own cost per request, this tree vs a baseline.

One keep-alive connection sends /embed requests of 4 short texts one after another; in turns with it (A B C A B C
...), the same requests go through Embedder.encode in this process, and, with ``--baseline DIR``, to a server
started from another checkout (a ``git worktree`` of an earlier commit), and to a bare route on the same stack
(benchmarks/bare_server.py: one Starlette route, none of a server's checks, batching or metrics). Medians of the rounds. The client, the
in-process model and the servers share the machine's CPUs. Where this tree's time goes comes from its answers'
Server-Timing header (per request, medians): the route's tokenising, queueing, inference and the hop to the
inference thread and back; the rest of the route (checks, normalising, metrics); and outside the route, HTTP in
both processes, the body's JSON parse and the answer's JSON render; then the client's own JSON parse.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bge_onnx.session import SPIN_ENV

from .harness import Report, log
from .serve_hostile import start
from .serve_load import _free_port, synthetic, wait_healthy

# serving with none of a server's work (benchmarks/bare_server.py): one Starlette route that encodes in a thread
BARE = "bare Starlette route"


def main(argv: list[str], *, name: str = "serve-one") -> None:
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks {name}", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a bge-onnx model folder")
    parser.add_argument("--precision", default="auto", choices=["fp32", "int8", "auto"])
    parser.add_argument("--baseline", type=Path, help="another bge-onnx checkout, run as a second server")
    parser.add_argument("--baseline-label", default="baseline", help="its name in the results (e.g. a commit)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--requests", type=int, default=100, help="requests per round (default 100)")
    args = parser.parse_args(argv)

    from bge_onnx import Embedder

    embedder = Embedder(args.model, precision=args.precision)
    words = synthetic(4 * args.requests, 8)
    requests = [words[i : i + 4] for i in range(0, len(words), 4)]
    servers: dict[str, tuple[subprocess.Popen, http.client.HTTPConnection]] = {}

    phases: dict[str, list[float]] = {}

    def send(connection: http.client.HTTPConnection, texts: list[str], label: str = "") -> None:
        began = time.perf_counter()
        connection.request("POST", "/embed", json.dumps({"inputs": texts}), {"content-type": "application/json"})
        response = connection.getresponse()
        body = response.read()
        answered = time.perf_counter()
        if response.status != 200:
            raise SystemExit(f"serve_one: {response.status} {body[:200]!r}")
        json.loads(body)
        timing = response.getheader("server-timing")
        if label == "this tree" and timing:
            for name, seconds in server_timing(timing).items():
                phases.setdefault(name, []).append(seconds)
            phases.setdefault("round trip", []).append(answered - began)
            phases.setdefault("client JSON parse", []).append(time.perf_counter() - answered)

    try:
        for label, tree in [("this tree", None)] + ([(args.baseline_label, args.baseline)] if args.baseline else []):
            port = _free_port()
            servers[label] = (start(tree, args.model, args.precision, port),
                              http.client.HTTPConnection("127.0.0.1", port, timeout=120))
        port = _free_port()
        # the server's own setting of onnxruntime's threads (spin within a call), so that only the serving differs
        bare = subprocess.Popen([sys.executable, "-m", "benchmarks.bare_server", str(args.model), args.precision,
                                 str(port)], stdout=subprocess.DEVNULL, env={**os.environ, SPIN_ENV: "run"})
        servers[BARE] = (bare, http.client.HTTPConnection("127.0.0.1", port, timeout=120))
        wait_healthy(bare, port, "python -m benchmarks.bare_server")
        seconds = {label: [] for label in ["in-process", *servers]}
        for texts in requests[:10]:  # warm-up
            embedder.encode(texts)
            for _, connection in servers.values():
                send(connection, texts)
        for k in range(args.rounds):
            log(f"round {k + 1}/{args.rounds}")
            began = time.perf_counter()
            for texts in requests:
                embedder.encode(texts)
            seconds["in-process"].append(time.perf_counter() - began)
            if k == 0:
                phases.clear()  # the warm-up's
            for label, (_, connection) in servers.items():
                began = time.perf_counter()
                for texts in requests:
                    send(connection, texts, label)
                seconds[label].append(time.perf_counter() - began)
    finally:
        for process, _ in servers.values():
            process.terminate()
        for process, _ in servers.values():
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
    base = statistics.median(seconds["in-process"])
    rows, data = [], {}
    for label, values in seconds.items():
        per = statistics.median(values) / len(requests)
        data[label] = {"ms_per_request": per * 1000, "vs_in_process": base / statistics.median(values),
                       "rounds_s": values}
        rows.append([label, f"{per * 1000:.2f}", f"{base / statistics.median(values):.2f}x"])
    report = Report(name, "One client against in-process encode, interleaved", argv, models={"model": args.model})
    report.data = data
    report.text(f"{len(requests)} requests of 4 short texts per round, {args.rounds} rounds, in turns; precision "
                f"{args.precision}; medians. 'vs in-process': in-process time over the contestant's. '{BARE}' "
                "(benchmarks/bare_server.py) is serving with none of a server's work: uvicorn with httptools, one "
                "Starlette route that parses the body with orjson, encodes in a worker thread and writes the vectors "
                "with orjson, with none of a server's checks, batching or metrics; its onnxruntime threads spin within a "
                "call, as the server's do.")
    report.table(["contestant", "ms per request", "vs in-process"], rows)
    median = {name: statistics.median(values) * 1000 for name, values in phases.items()}
    route = ["tokenize", "queue", "inference", "hop"]
    breakdown = [
        ["inference (the runtime's call, in its thread)", median["inference"]],
        ["hop to the inference thread and back", median["hop"]],
        ["tokenising to count and check lengths", median["tokenize"]],
        ["queue (batching wait)", median["queue"]],
        ["rest of the route (checks, normalising, metrics)", median["total"] - sum(median[n] for n in route)],
        ["outside the route (HTTP both sides, the body's JSON, the answer's JSON)", median["round trip"] - median["total"]],
        ["client's JSON parse of the answer", median["client JSON parse"]],
    ]
    whole = median["round trip"] + median["client JSON parse"]
    data["this tree"]["phases_ms"] = {name: value for name, value in breakdown}
    report.text(f"Where this tree's {whole:.2f} ms go (medians per request from its Server-Timing header; the parts "
                f"are medians each, so they need not add up exactly). In-process encode of the same texts: "
                f"{per_request(seconds['in-process'], len(requests)):.2f} ms.")
    report.table(["part", "ms per request"], [[name, f"{value:.2f}"] for name, value in breakdown])
    report.write()


def server_timing(header: str) -> dict[str, float]:
    """A Server-Timing header's durations, in seconds."""
    out = {}
    for part in header.split(","):
        name, _, duration = part.strip().partition(";dur=")
        out[name] = float(duration) / 1000
    return out


def per_request(rounds: list[float], requests: int) -> float:
    return statistics.median(rounds) / requests * 1000


if __name__ == "__main__":
    main(sys.argv[1:])
