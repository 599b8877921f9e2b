"""bge-onnx serve against a peer server, infinity-emb, under the same load: throughput, p50/p99, cosine to
sentence-transformers.

Every server runs at once, each in its own process on 127.0.0.1; clients are threads of this process (one
keep-alive connection each) sending the same OpenAI-style embeddings requests (4 texts each) to every server, in
turns: for each corpus and client count, rounds of A B C D ..., each bounded in seconds, medians. Contestants:
bge-onnx serve fp32 and int8 (MODEL; --max-queue-ms 0, so that it queues as the peer does instead of answering
429, and --auto-truncate, so that it cuts a text over 256 tokens as the peer does instead of refusing it),
infinity-emb's torch engine on the sentence-transformers folder, and its optimum (ONNX) engine on a folder
prepared for it (see --infinity-onnx). The cosine compares each answered text with sentence-transformers on torch,
in this process. Clients and servers share the machine's CPUs.
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .corpora import corpora
from .harness import Report, log, versions
from .serve_load import _free_port, wait_healthy

TEXTS_PER_REQUEST = 4


class Contestant:
    def __init__(self, label: str, command: list[str], path: str, *, cwd: Path | None = None,
                 env: dict | None = None) -> None:
        self.label, self.path = label, path
        self.port = _free_port()
        command = [part.replace("{port}", str(self.port)) for part in command]
        self.process = subprocess.Popen(command, cwd=cwd, env={**os.environ, **(env or {})},
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.local = threading.local()

    def post(self, texts: list[str]) -> tuple[int, list | None]:
        body = json.dumps({"model": "all-MiniLM-L6-v2", "input": texts})
        for attempt in (1, 2):  # a kept connection the server closed while idle (keep-alive timeout): a new one
            connection = getattr(self.local, "connection", None)
            fresh = connection is None
            if fresh:
                connection = self.local.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
            try:
                connection.request("POST", self.path, body, {"content-type": "application/json"})
                response = connection.getresponse()
                payload = response.read()
                break
            except (OSError, http.client.HTTPException):
                self.local.connection = None
                if fresh or attempt == 2:
                    raise
        body = payload
        if response.status != 200:
            return response.status, None
        data = sorted(json.loads(body)["data"], key=lambda d: d["index"])
        return 200, [d["embedding"] for d in data]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()


def level(contestant: Contestant, requests: list[list[str]], expected: list[np.ndarray], clients: int,
          seconds: float) -> dict:
    """``clients`` closed-loop threads for ``seconds``: texts/s, latencies, statuses, worst cosine."""
    stop = time.monotonic() + seconds
    latencies, statuses, worst, texts, lock = [], {}, [1.0], [0], threading.Lock()

    def worker(k: int) -> None:
        i = k
        while time.monotonic() < stop:
            began = time.perf_counter()
            status, vectors = contestant.post(requests[i % len(requests)])
            elapsed = time.perf_counter() - began
            cosine = 1.0
            if vectors is not None:
                got = np.asarray(vectors, np.float32)
                reference = expected[i % len(requests)]
                cosine = float(((got * reference).sum(1) / np.linalg.norm(got, axis=1)).min())
            with lock:
                statuses[status] = statuses.get(status, 0) + 1
                if status == 200:
                    latencies.append(elapsed)
                    texts[0] += len(requests[i % len(requests)])
                    worst[0] = min(worst[0], cosine)
            i += clients

    began = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(worker, range(clients)))
    wall = time.monotonic() - began
    latencies.sort()
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else float("nan")  # noqa: E731
    return {"texts_per_s": texts[0] / wall, "p50_s": pick(0.5), "p99_s": pick(0.99), "statuses": statuses,
            "min_cosine": worst[0]}


def main(argv: list[str], *, name: str = "serve-peer") -> None:
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks {name}", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a bge-onnx folder with fp32 and int8")
    parser.add_argument("--st", type=Path, required=True,
                        help="the same model as a sentence-transformers folder (the packaged all-MiniLM-L6-v2)")
    parser.add_argument("--infinity", type=Path, required=True, help="the infinity_emb executable (its own venv)")
    parser.add_argument("--infinity-onnx", type=Path,
                        help="a folder for infinity's optimum engine: config.json (max_position_embeddings set to "
                             "the model's max_seq_length, 256: the engine cuts there), the tokenizer files and "
                             "model.onnx at its top (the engine finds it only when started in the folder with "
                             "--model-id .); omit to leave the optimum engine out")
    parser.add_argument("--clients", default="1,8,32,128")
    parser.add_argument("--corpora", default="short queries,passages", help="of benchmarks/corpora.py (default: "
                        "short queries,passages)")
    parser.add_argument("--seconds", type=float, default=8.0, help="per contestant, level and round (default 8)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--texts", type=int, default=400, help="texts per corpus (default 400)")
    args = parser.parse_args(argv)

    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(args.st), device="cpu")
    home = tempfile.mkdtemp(prefix="infinity-home-")
    peer_env = {"HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1", "INFINITY_HOME": home}
    # --auto-truncate: the peer and sentence-transformers cut a text over the model's 256 tokens; without it this
    # server refuses it (400), which a first run of this benchmark counted as slowness on passages
    serve = [sys.executable, "-m", "bge_onnx", "serve", str(args.model), "--port", "{port}", "--max-queue-ms", "0",
             "--auto-truncate"]
    contestants = [
        Contestant("bge-onnx fp32", [*serve, "--precision", "fp32"], "/v1/embeddings"),
        Contestant("bge-onnx int8", [*serve, "--precision", "int8"], "/v1/embeddings"),
        Contestant("infinity torch", [str(args.infinity), "v2", "--model-id", str(args.st), "--served-model-name",
                                      "all-MiniLM-L6-v2", "--engine", "torch", "--device", "cpu", "--port", "{port}",
                                      "--batch-size", "32"], "/embeddings", env=peer_env),
    ]
    if args.infinity_onnx:
        contestants.append(Contestant(
            "infinity optimum", [str(args.infinity), "v2", "--model-id", ".", "--served-model-name",
                                 "all-MiniLM-L6-v2", "--engine", "optimum", "--device", "cpu", "--port", "{port}",
                                 "--batch-size", "32", "--pooling-method", "mean", "--onnx-do-not-prefer-quantized"],
            "/embeddings", cwd=args.infinity_onnx, env=peer_env))
    data: dict = {"contestants": [c.label for c in contestants]}
    rows = []
    try:
        for contestant in contestants:
            wait_healthy(contestant.process, contestant.port, contestant.label)
        peer_version = subprocess.run([str(args.infinity.parent / "python"), "-c",
                                       "import importlib.metadata as m; print(m.version('infinity-emb'))"],
                                      capture_output=True, text=True, check=False).stdout.strip()
        data["infinity_emb"] = peer_version
        chosen = args.corpora.split(",")
        for corpus, texts in ((c, t) for c, t in corpora(args.texts).items() if c in chosen):
            requests = [texts[i : i + TEXTS_PER_REQUEST] for i in range(0, len(texts), TEXTS_PER_REQUEST)]
            expected = [reference.encode(r, normalize_embeddings=True) for r in requests]
            for contestant in contestants:  # warm-up
                for r in requests[:8]:
                    contestant.post(r)
            for clients in (int(c) for c in args.clients.split(",")):
                runs = {c.label: [] for c in contestants}
                for k in range(args.rounds):
                    for contestant in contestants:
                        log(f"{corpus}, {clients} clients, round {k + 1}: {contestant.label}")
                        runs[contestant.label].append(level(contestant, requests, expected, clients, args.seconds))
                summary = {}
                for label, results in runs.items():
                    summary[label] = {
                        "texts_per_s": statistics.median(r["texts_per_s"] for r in results),
                        "p50_s": statistics.median(r["p50_s"] for r in results),
                        "p99_s": statistics.median(r["p99_s"] for r in results),
                        "min_cosine": min(r["min_cosine"] for r in results),
                        "statuses": [r["statuses"] for r in results],
                        "not_200": sum(n for r in results for code, n in r["statuses"].items() if code != 200),
                    }
                data[f"{corpus} @ {clients}"] = summary
                peer = summary["infinity torch"]["texts_per_s"]
                for label, s in summary.items():
                    rows.append([corpus, clients, label, f"{s['texts_per_s']:.0f}", f"{s['texts_per_s'] / peer:.2f}x",
                                 f"{s['p50_s'] * 1000:.0f}", f"{s['p99_s'] * 1000:.0f}", f"{s['min_cosine']:.5f}",
                                 s["not_200"]])
    finally:
        for contestant in contestants:
            contestant.stop()
    report = Report(name, "bge-onnx serve against infinity-emb under the same load", argv,
                    models={"MODEL": args.model})
    report.data = data
    report.text(f"Peer: infinity-emb {data.get('infinity_emb', '?')} in its own venv (its pins: "
                "sentence-transformers<4, numpy<2); our side: " + ", ".join(f"{k} {v}" for k, v in versions().items())
                + f". {TEXTS_PER_REQUEST} texts per OpenAI-style request; {args.rounds} rounds of {args.seconds:g} s "
                "per contestant and level, in turns, medians; 'vs infinity torch': texts/s over infinity's torch "
                "engine's in the same level; cosine: the worst answered text against sentence-transformers on torch.")
    report.table(["corpus", "clients", "server", "texts/s", "vs infinity torch", "p50 ms", "p99 ms", "min cosine",
                  "answers not 200"], rows)
    report.write()


if __name__ == "__main__":
    main(sys.argv[1:])
