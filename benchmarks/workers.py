"""All cores of one machine: N processes with T/N threads each against one process with T threads, same texts.

Each contestant is a set of fresh processes that load the model once and then, on a signal, encode their share of
the corpus (every N-th text, so the shares have alike lengths); the time is from the signal to the last answer.
Rounds alternate the contestants (A B A B ...); the ratio is taken within each round, then its median. This is the
measurement behind `workers=` (issue 15): whether splitting a large input over processes beats intra-op threads.
N processes run twice: with onnxruntime's prepacked weights (a copy per process) and with the weights shared
($BGE_ONNX_SHARE_WEIGHTS=1, prepacking off), as `workers=N` runs them (issue 23; their memory: results/share.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bge_onnx.session import usable_cpus

from .corpora import corpora
from .harness import TRYOUTS, Report, log

CHILD = r"""
import json, sys, time, warnings
warnings.simplefilter("ignore")
import bge_onnx
texts = json.load(open(sys.argv[1], encoding="utf-8"))[sys.argv[2]]
share, n, threads = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
part = texts[share::n]
embedder = bge_onnx.Embedder(sys.argv[6], device="cpu", precision=sys.argv[7], threads=threads)
embedder.encode(part[:8])
print("ready", flush=True)
for line in sys.stdin:
    start = time.perf_counter()
    embedder.encode(part)
    print(time.perf_counter() - start, flush=True)
"""


class Contestant:
    """``processes`` fresh processes with ``threads`` threads each, holding their share of one corpus."""

    def __init__(self, corpus_file: Path, corpus: str, processes: int, threads: int, model: Path, precision: str,
                 share: bool):
        env = {**os.environ, "BGE_ONNX_SHARE_WEIGHTS": "1" if share else "0"}
        self.procs = [
            subprocess.Popen([sys.executable, "-c", CHILD, str(corpus_file), corpus, str(k), str(processes),
                              str(threads), str(model), precision], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, env=env)
            for k in range(processes)
        ]
        for proc in self.procs:
            if proc.stdout.readline().strip() != "ready":
                raise SystemExit("benchmarks: a worker failed to start")

    def run(self) -> float:
        start = time.perf_counter()
        for proc in self.procs:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        for proc in self.procs:
            proc.stdout.readline()
        return time.perf_counter() - start

    def close(self) -> None:
        for proc in self.procs:
            proc.stdin.close()
            proc.wait()


def label(layout: tuple[int, int, bool]) -> str:
    processes, threads, share = layout
    return f"{processes} x {threads}" + (", weights shared (as workers=N)" if share else "")


def main(argv: list[str], *, name: str = "workers") -> None:
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks {name}", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a bge-onnx model folder with fp32 and int8")
    parser.add_argument("--precision", nargs="+", default=["fp32", "int8"])
    parser.add_argument("--texts", type=int, default=400, help="texts per corpus (default 400)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7)")
    parser.add_argument("--try-out", action="store_true", help="write to benchmarks/out/ instead of results/")
    args = parser.parse_args(argv)

    cpus = usable_cpus()
    # (processes, threads, weights shared): workers=N shares them ($BGE_ONNX_SHARE_WEIGHTS=1 in its processes)
    splits = [(n, max(1, cpus // n)) for n in range(2, cpus + 1) if cpus % n == 0]
    layouts = [(1, cpus, False), *[(n, t, share) for n, t in splits for share in (False, True)]]
    report = Report(name, "All cores: N worker processes against one process with N threads", argv,
                    models={"MODEL": args.model})
    picked = corpora(args.texts)
    texts = {c: picked[c] for c in ("sentences", "passages", "mixed")}
    work = Path(tempfile.mkdtemp(prefix="bge-onnx-workers-"))
    (work / "corpora.json").write_text(json.dumps(texts), encoding="utf-8")
    report.text(f"{cpus} usable CPUs. Layouts (processes x threads): "
                + ", ".join(label(layout) for layout in layouts)
                + f". {args.rounds} interleaved rounds; speed is 1 x {cpus}'s time over the layout's, per round, "
                "then the median (above 1: the layout is faster). Model load is not timed (workers start once).")
    rows, data = [], []
    for precision in args.precision:
        for corpus, items in texts.items():
            log(f"{precision} {corpus}")
            contestants = {layout: Contestant(work / "corpora.json", corpus, layout[0], layout[1], args.model,
                                                 precision, layout[2])
                           for layout in layouts}
            seconds = {layout: [] for layout in layouts}
            for _ in range(args.rounds):
                for layout, contestant in contestants.items():
                    seconds[layout].append(contestant.run())
            for contestant in contestants.values():
                contestant.close()
            base = seconds[layouts[0]]
            for layout, times in seconds.items():
                speed = statistics.median(b / t for b, t in zip(base, times))
                rows.append([precision, corpus, label(layout),
                             f"{len(items) / statistics.median(times):.1f}", f"{speed:.2f}x"])
                data.append({"precision": precision, "corpus": corpus, "processes": layout[0], "threads": layout[1],
                             "shared_weights": layout[2], "seconds": times, "speed_vs_one_process": speed})
    report.table(["precision", "corpus", "processes x threads", "texts/s", f"speed vs 1 x {cpus}"], rows)
    report.data = {"cpus": cpus, "rounds": args.rounds, "runs": data}
    if args.try_out:
        report.write(TRYOUTS)
    else:
        report.write()
