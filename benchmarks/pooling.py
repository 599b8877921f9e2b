"""Pooling in the graph against pooling in numpy on the CPU: the same exported graphs with their pooling nodes
removed (token states copied out and pooled in numpy, as folders exported before 2026-11-27 still run), fp32 and
int8, interleaved (A B C D D C B A ...), medians. On CUDA the same comparison is part of gpu.py.

Usage: python benchmarks/pooling.py MODEL [--texts 600] [--reps 5] > results/pooling-minilm.md
MODEL: an exported folder with an int8 variant (bge-onnx export ... --precision fp32 int8).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from corpora import corpora
from gpu import unpooled_copy

from bge_onnx import Embedder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--texts", type=int, default=600, help="mixed texts per encode (default 600)")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # truncation of long passages, on purpose
    texts = corpora(1000)["mixed"][: args.texts]
    old = unpooled_copy(args.model, Path(tempfile.mkdtemp()) / "unpooled")
    runs = {}
    for precision in ("fp32", "int8"):
        runs[f"in the graph, {precision}"] = Embedder(args.model, device="cpu", precision=precision)
        runs[f"in numpy, {precision}"] = Embedder(old, device="cpu", precision=precision)
    vectors = {name: model.encode(texts) for name, model in runs.items()}  # also the warm-up
    seconds = {name: [] for name in runs}
    for round_ in range(args.reps):  # every other round in reverse order, so that no one always goes first
        for name, model in list(runs.items())[:: -1 if round_ % 2 else 1]:
            start = time.perf_counter()
            model.encode(texts)
            seconds[name].append(time.perf_counter() - start)
    print("# Pooling in the graph against pooling in numpy, on the CPU\n")
    print(f"Command: `python benchmarks/pooling.py {' '.join(sys.argv[1:])}`; {len(texts)} mixed texts per encode, "
          f"interleaved, median of {args.reps}.\n")
    print("| contestant | texts/s | graph / numpy (speed) | per round | min cosine, graph to numpy |")
    print("|---|---|---|---|---|")
    for name in runs:
        rate = len(texts) / statistics.median(seconds[name])
        if name.startswith("in the graph"):
            other = name.replace("in the graph", "in numpy")
            ratio = statistics.median(seconds[other]) / statistics.median(seconds[name])
            rounds = ", ".join(f"{b / a:.2f}" for a, b in zip(seconds[name], seconds[other]))
            cosine = float(np.min(np.sum(vectors[name] * vectors[other], axis=1)))
            print(f"| {name} | {rate:.1f} | {ratio:.2f}x | {rounds} | {cosine:.6f} |")
        else:
            print(f"| {name} | {rate:.1f} | | | |")
    print()


if __name__ == "__main__":
    main()
