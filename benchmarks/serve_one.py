"""One client against in-process encode, interleaved: the server's own cost per request, this tree vs a baseline.

One keep-alive connection sends /embed requests of 4 short texts one after another; in turns with it (A B C A B C
...), the same requests go through Embedder.encode in this process, and, with ``--baseline DIR``, to a server
started from another checkout (a ``git worktree`` of an earlier commit). Medians of the rounds. The client, the
in-process model and the servers share the machine's CPUs.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import time
from pathlib import Path

from .harness import Report, log
from .serve_hostile import start
from .serve_load import _free_port, synthetic


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
    servers = {}
    for label, tree in [("this tree", None)] + ([(args.baseline_label, args.baseline)] if args.baseline else []):
        port = _free_port()
        servers[label] = (start(tree, args.model, args.precision, port),
                          http.client.HTTPConnection("127.0.0.1", port, timeout=120))

    def send(connection: http.client.HTTPConnection, texts: list[str]) -> None:
        connection.request("POST", "/embed", json.dumps({"inputs": texts}), {"content-type": "application/json"})
        response = connection.getresponse()
        body = response.read()
        if response.status != 200:
            raise SystemExit(f"serve_one: {response.status} {body[:200]!r}")
        json.loads(body)

    seconds = {label: [] for label in ["in-process", *servers]}
    try:
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
            for label, (_, connection) in servers.items():
                began = time.perf_counter()
                for texts in requests:
                    send(connection, texts)
                seconds[label].append(time.perf_counter() - began)
    finally:
        for process, _ in servers.values():
            process.terminate()
            process.wait(60)
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
                f"{args.precision}; medians. 'vs in-process': in-process time over the contestant's.")
    report.table(["contestant", "ms per request", "vs in-process"], rows)
    report.write()


if __name__ == "__main__":
    main(sys.argv[1:])
