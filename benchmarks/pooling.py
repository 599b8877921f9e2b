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
    vectors, table = side_by_side(runs, texts, args.reps, new="in the graph", old="in numpy")
    print("# Pooling in the graph against pooling in numpy, on the CPU\n")
    print(f"Command: `python benchmarks/pooling.py {' '.join(sys.argv[1:])}`; {len(texts)} mixed texts per encode, "
          f"interleaved, median of {args.reps}.\n")
    print("\n".join(table) + "\n")


def side_by_side(runs: dict[str, Embedder], texts: list[str], reps: int, *, new: str, old: str):
    """Time each embedder's encode(texts), every other round in reverse order (A B C D D C B A ...); return the
    vectors and a markdown table that sets each contestant named with ``new`` against its ``old`` twin."""
    vectors = {name: model.encode(texts) for name, model in runs.items()}  # also the warm-up
    seconds = {name: [] for name in runs}
    for round_ in range(reps):  # every other round in reverse order, so that no one always goes first
        for name, model in list(runs.items())[:: -1 if round_ % 2 else 1]:
            start = time.perf_counter()
            model.encode(texts)
            seconds[name].append(time.perf_counter() - start)
    table = [f"| contestant | texts/s | {new} / {old} (speed) | per round | min cosine, {new} to {old} |",
             "|---|---|---|---|---|"]
    for name in runs:
        rate = len(texts) / statistics.median(seconds[name])
        if name.startswith(new):
            other = name.replace(new, old)
            ratio = statistics.median(seconds[other]) / statistics.median(seconds[name])
            rounds = ", ".join(f"{b / a:.2f}" for a, b in zip(seconds[name], seconds[other]))
            cosine = float(np.min(np.sum(vectors[name] * vectors[other], axis=1)))
            table.append(f"| {name} | {rate:.1f} | {ratio:.2f}x | {rounds} | {cosine:.6f} |")
        else:
            table.append(f"| {name} | {rate:.1f} | | | |")
    return vectors, table


if __name__ == "__main__":
    main()
