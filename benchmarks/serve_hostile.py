"""bge-onnx serve against hostile bodies: the server's RSS under 8 concurrent ~1.9 MB requests with truncate: true.

Each tree runs in a server process of its own, fresh: this checkout, and with ``--baseline DIR`` another checkout of
bge-onnx (a ``git worktree`` of an earlier commit) started on the same model with PYTHONPATH=DIR. Two request shapes:
32 texts of ~59 KB, and one text of ~1.9 MB. The answers are checked against the texts' first words embedded
in-process (the vectors must not change with the size of the text beyond the model's limit).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .harness import Report, log
from .serve_load import _free_port, peak_rss_mb, synthetic, wait_healthy

CLIENTS = 8


def start(tree: Path | None, model: Path, precision: str, port: int, *extra: str) -> subprocess.Popen:
    """``bge-onnx serve`` from ``tree`` (None: this checkout) on ``port``, once /health answers 200."""
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
    command = [sys.executable, "-m", "bge_onnx", "serve", str(model), "--port", str(port), "--precision", precision,
               "--max-client-batch-size", "32", *extra]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                               cwd=tree or Path.cwd())
    wait_healthy(process, port, " ".join(command))
    return process


def post(port: int, body: bytes) -> tuple[int, object]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    connection.request("POST", "/embed", body, {"content-type": "application/json"})
    response = connection.getresponse()
    payload = response.read()
    try:
        return response.status, json.loads(payload)
    except ValueError:
        return response.status, payload.decode(errors="replace")


def burst(tree: Path | None, model: Path, precision: str, texts: list[str], expected: np.ndarray) -> dict:
    port = _free_port()
    process = start(tree, model, precision, port)
    try:
        body = json.dumps({"inputs": texts, "truncate": True}).encode()
        ready = peak_rss_mb(process.pid, "VmRSS")
        began = time.perf_counter()
        with ThreadPoolExecutor(CLIENTS) as pool:
            answers = list(pool.map(lambda _: post(port, body), range(CLIENTS)))
        seconds = time.perf_counter() - began
        statuses = {}
        worst = 1.0
        for status, answer in answers:
            statuses[status] = statuses.get(status, 0) + 1
            if status == 200:
                got = np.asarray(answer, dtype=np.float32)
                worst = min(worst, float(((got * expected).sum(1)).min()))
        time.sleep(1.0)
        return {"body_mb": len(body) / 1e6, "rss_ready_mb": ready, "peak_rss_mb": peak_rss_mb(process.pid),
                "rss_after_mb": peak_rss_mb(process.pid, "VmRSS"), "seconds": seconds, "statuses": statuses,
                "min_cosine_to_first_words": worst}
    finally:
        process.terminate()
        process.wait(60)


def main(argv: list[str], *, name: str = "serve-hostile") -> None:
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks {name}", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a bge-onnx model folder")
    parser.add_argument("--precision", default="auto", choices=["fp32", "int8", "auto"])
    parser.add_argument("--baseline", type=Path, help="another bge-onnx checkout to run the same requests against")
    parser.add_argument("--baseline-label", default="baseline", help="its name in the results (e.g. a commit)")
    args = parser.parse_args(argv)

    from bge_onnx import Embedder

    embedder = Embedder(args.model, precision=args.precision)
    words = synthetic(200, 40)
    shapes = {}
    for label, count, size in (("32 texts of ~59 KB", 32, 59_000), ("1 text of ~1.9 MB", 1, 1_900_000)):
        texts = []
        for k in range(count):
            text, i = [], k
            while sum(map(len, text)) < size:
                text.append(words[i % len(words)])
                i += 7
            texts.append(" ".join(text))
        shapes[label] = texts

    report = Report(name, "bge-onnx serve against large truncate requests: peak RSS", argv, models={"model": args.model})
    trees = [("this tree", None)] + ([(args.baseline_label, args.baseline)] if args.baseline else [])
    rows, data = [], {}
    for label, texts in shapes.items():
        expected = embedder.encode([t[:20_000] for t in texts])  # far beyond max_length tokens: the same vectors
        for tree_label, tree in trees:
            log(f"{tree_label}: {CLIENTS} x {label}")
            result = burst(tree, args.model, args.precision, texts, expected)
            data[f"{tree_label} | {label}"] = result
            rows.append([tree_label, label, f"{result['body_mb']:.2f}", f"{result['rss_ready_mb']:.0f}",
                         f"{result['peak_rss_mb']:.0f}", f"{result['rss_after_mb']:.0f}", f"{result['seconds']:.1f}",
                         json.dumps(result["statuses"]), f"{result['min_cosine_to_first_words']:.6f}"])
    report.data = data
    report.text(f"{CLIENTS} clients at once, each POSTing the same /embed body with \"truncate\": true to a fresh "
                f"server (precision {args.precision}, --max-client-batch-size 32). RSS of the server process: at "
                "ready, its peak (VmHWM) and 1 s after the burst. The cosine compares each answer with the texts' "
                "first 20,000 characters embedded in-process.")
    report.table(["server", "request", "body MB", "RSS ready MB", "peak RSS MB", "RSS after MB", "burst s",
                  "statuses", "min cosine"], rows)
    report.write()


if __name__ == "__main__":
    main(sys.argv[1:])
