"""Idle CPU: onnxruntime's threads spinning while they wait for work ($BGE_ONNX_SPIN=1, onnxruntime's default and
the library's), sleeping ($BGE_ONNX_SPIN=0), or spinning within a call and sleeping after it ($BGE_ONNX_SPIN=run, the
server's default), in the library and in `bge-onnx serve`.

Library: long-lived processes, one per setting, take turns (A B C A B C, a pause between turns so one's spinning
never overlaps another's work). Each turn measures short queries one at a time with 100 ms between them (a lightly
loaded service: latency and CPU per query), short queries back to back, a corpus encoded back to back (throughput),
and the CPU burned in the 2 seconds after a query. Server: `bge-onnx serve` processes, one per setting, in turns:
latency and CPU per short request (spaced 100 ms), one client's short requests back to back on one connection, CPU
per idle second after a request, and a burst of concurrent requests (throughput; admission by expected wait off, so
that none is refused). CPU is the process's user + system time (/proc), so every thread counts.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from .corpora import corpora
from .harness import TRYOUTS, Report, log
from .serve_load import _free_port, wait_healthy

SETTINGS = {"spin (BGE_ONNX_SPIN=1)": "1", "sleep (BGE_ONNX_SPIN=0)": "0", "spin within a call (BGE_ONNX_SPIN=run)": "run"}
QUERY = "how do I reset my password"

CHILD = r"""
import json, os, resource, sys, time, warnings
warnings.simplefilter("ignore")
import bge_onnx
def cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread, to the microsecond
    return usage.ru_utime + usage.ru_stime
texts = json.load(open(sys.argv[1], encoding="utf-8"))
embedder = bge_onnx.Embedder(sys.argv[2], device="cpu", precision=sys.argv[3])
embedder.encode(texts[:16])
print("ready", flush=True)
for line in sys.stdin:
    out = {}
    wall, used = [], []
    for _ in range(30):
        time.sleep(0.1)
        c, w = cpu(), time.perf_counter()
        embedder.encode([QUERY_TEXT])
        wall.append(time.perf_counter() - w)
        used.append(cpu() - c)
    out["query ms"] = 1000 * sorted(wall)[15]
    out["query cpu ms"] = 1000 * sorted(used)[15]
    wall = []
    for _ in range(30):
        w = time.perf_counter()
        embedder.encode([QUERY_TEXT])
        wall.append(time.perf_counter() - w)
    out["queries back to back ms"] = 1000 * sorted(wall)[15]
    c, w = cpu(), time.perf_counter()
    embedder.encode(texts)
    out["corpus s"], out["corpus cpu s"] = time.perf_counter() - w, cpu() - c
    embedder.encode([QUERY_TEXT])
    c = cpu()
    time.sleep(2.0)
    out["idle cpu ms/s"] = 1000 * (cpu() - c) / 2.0
    print(json.dumps(out), flush=True)
""".replace("QUERY_TEXT", repr(QUERY))


def process_cpu(pid: int) -> float:
    """User + system seconds of process ``pid`` (all its threads), from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def post(port: int, body: dict) -> int:
    """POST /embed; the status."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request("POST", "/embed", json.dumps({**body, "truncate": True}), {"Content-Type": "application/json"})
    response = connection.getresponse()
    response.read()
    connection.close()
    return response.status


def server_turn(pid: int, port: int, texts: list[str]) -> dict[str, float]:
    """One turn against a running server: CPU per spaced short request, per idle second, and a concurrent burst."""
    out = {}
    c = process_cpu(pid)
    statuses, walls = [], []
    for _ in range(20):
        time.sleep(0.1)
        start = time.perf_counter()
        statuses.append(post(port, {"inputs": QUERY}))
        walls.append(time.perf_counter() - start)
    out["request cpu ms"] = 1000 * (process_cpu(pid) - c) / 20
    out["request ms"] = 1000 * statistics.median(walls)
    connection, walls = http.client.HTTPConnection("127.0.0.1", port, timeout=60), []
    for _ in range(30):  # one client, back to back on one connection
        start = time.perf_counter()
        connection.request("POST", "/embed", json.dumps({"inputs": QUERY}), {"Content-Type": "application/json"})
        response = connection.getresponse()
        response.read()
        statuses.append(response.status)
        walls.append(time.perf_counter() - start)
    connection.close()
    out["back to back ms"] = 1000 * statistics.median(walls)
    c = process_cpu(pid)
    time.sleep(3.0)
    out["idle cpu ms/s"] = 1000 * (process_cpu(pid) - c) / 3.0
    bodies = [texts[k:k + 8] for k in range(0, len(texts), 8)]
    start = time.perf_counter()
    threads = [threading.Thread(target=lambda part=bodies[k::8]: statuses.extend(post(port, {"inputs": b}) for b in part))
               for k in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    out["burst s"] = time.perf_counter() - start
    if set(statuses) != {200}:
        raise SystemExit(f"benchmarks: the server answered {sorted(set(statuses))}, not only 200")
    return out


def table_rows(results: dict[str, list[dict]], keys: list[str], timed: str) -> list[list[str]]:
    """One row per setting: the median of each key, then ``timed``'s ratio to the first setting (per round, median)."""
    base = next(iter(results.values()))
    rows = []
    for label, turns in results.items():
        ratio = statistics.median(a[timed] / b[timed] for a, b in zip(turns, base))
        rows.append([label, *(f"{statistics.median(turn[key] for turn in turns):.2f}" for key in keys), f"{ratio:.3f}"])
    return rows


def main(argv: list[str], *, name: str = "idle") -> None:
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks {name}", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a bge-onnx model folder")
    parser.add_argument("--precision", nargs="+", default=["fp32", "int8"])
    parser.add_argument("--texts", type=int, default=200, help="texts in the back-to-back corpus (default 200)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--try-out", action="store_true", help="write to benchmarks/out/ instead of results/")
    args = parser.parse_args(argv)

    texts = corpora(args.texts)["mixed"]
    report = Report(name, "Idle CPU: spinning after a run or not, library and server", argv,
                    models={"MODEL": args.model})
    report.text(__doc__.split("\n\n", 1)[1].replace("\n", " "))
    with tempfile.TemporaryDirectory() as work:
        corpus = Path(work) / "texts.json"
        corpus.write_text(json.dumps(texts), encoding="utf-8")
        for precision in args.precision:
            log(f"library, {precision}")
            children = {}
            for label, value in SETTINGS.items():
                children[label] = subprocess.Popen(
                    [sys.executable, "-c", CHILD, str(corpus), str(args.model), precision],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={**os.environ, "BGE_ONNX_SPIN": value})
                if children[label].stdout.readline().strip() != "ready":
                    raise SystemExit("benchmarks: a child failed to start")
            library = {label: [] for label in SETTINGS}
            for k in range(args.rounds):
                for label, child in children.items():
                    child.stdin.write("go\n")
                    child.stdin.flush()
                    library[label].append(json.loads(child.stdout.readline()))
                    time.sleep(0.3)
                log(f"  round {k + 1}/{args.rounds}")
            for child in children.values():
                child.stdin.close()
                child.wait()

            log(f"server, {precision}")
            servers = {}
            for label, value in SETTINGS.items():
                port = _free_port()
                process = subprocess.Popen(
                    [sys.executable, "-m", "bge_onnx", "serve", str(args.model), "--precision", precision, "--port",
                     str(port), "--max-queue-ms", "0"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "BGE_ONNX_SPIN": value})
                wait_healthy(process, port, label)
                servers[label] = (process, port)
            served = {label: [] for label in SETTINGS}
            try:
                for k in range(args.rounds):
                    for label, (process, port) in servers.items():
                        served[label].append(server_turn(process.pid, port, texts))
                        time.sleep(0.3)
                    log(f"  round {k + 1}/{args.rounds}")
            finally:
                for process, _ in servers.values():
                    process.terminate()
                    process.wait()

            report.text(f"## {precision}", "Library (Embedder), medians of the rounds; 'vs spin' = the ratio "
                        "within each round, then its median.")
            report.table(["setting", "short query ms", "CPU ms per query", "short queries back to back ms",
                          f"{len(texts)} texts back to back s", "CPU ms per idle second", "back to back, time vs spin"],
                         table_rows(library, ["query ms", "query cpu ms", "queries back to back ms", "corpus s",
                                              "idle cpu ms/s"], "corpus s"))
            report.text("Server (`bge-onnx serve`, POST /embed):")
            report.table(["setting", "short request ms", "CPU ms per short request", "one client back to back ms",
                          "CPU ms per idle second", f"{len(texts)} texts as 8-text requests from 8 clients s",
                          "burst, time vs spin"],
                         table_rows(served, ["request ms", "request cpu ms", "back to back ms", "idle cpu ms/s",
                                             "burst s"], "burst s"))
            report.data[precision] = {"library": library, "server": served}
    if args.try_out:
        report.write(TRYOUTS)
    else:
        report.write()
