"""Tokenising on the CPU: the tokenizer with and without character offsets, and tokenising a chunk ahead (in a
worker thread, while the graph runs the chunk before; what the runtime does on CUDA) against tokenising the chunks
in turn (what it does on CPU) and against tokenising the whole input first (one length sort over all of it, as
before 2026-11-27). Interleaved (A B C A B C ...), medians.

Usage: python benchmarks/tokenizing.py MODEL [--reps 5] > results/tokenizing-minilm.md
MODEL: an exported folder with an int8 variant (bge-onnx export ... --precision fp32 int8).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

from corpora import corpora

from bge_onnx import Embedder, loading, session


def timed(runs: dict, reps: int, warm: bool = True) -> dict[str, list[float]]:
    """Seconds of each run, taking turns (A B ... A B) for reps rounds, after one warm-up round if warm."""
    for run in runs.values() if warm else ():
        run()
    seconds = {name: [] for name in runs}
    for _ in range(reps):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # truncation of long passages, on purpose
    texts = corpora(1000)
    print("# Tokenising on the CPU\n")
    print(f"Command: `python benchmarks/tokenizing.py {' '.join(sys.argv[1:])}`; {session.usable_cpus()} CPUs; "
          "medians, interleaved.\n")

    embedder = Embedder(args.model, device="cpu", precision="int8")
    tokenizer = embedder._model.tokenizer._truncating
    mixed = texts["mixed"] * 4
    print(f"## The tokenizer with and without character offsets ({len(mixed)} mixed texts, seconds)\n")
    seconds = timed({"encode_batch": lambda: tokenizer.encode_batch(mixed),
                     "encode_batch_fast": lambda: tokenizer.encode_batch_fast(mixed)}, args.reps)
    same = all(a.ids == b.ids for a, b in zip(tokenizer.encode_batch(mixed), tokenizer.encode_batch_fast(mixed)))
    slow, fast = (statistics.median(seconds[k]) for k in ("encode_batch", "encode_batch_fast"))
    print("| encode_batch | encode_batch_fast (no offsets) | speed-up | same token ids |")
    print("|---|---|---|---|")
    print(f"| {slow:.3f} | {fast:.3f} | {slow / fast:.2f}x | {same} |\n")

    print(f"## A chunk ahead against the chunks in turn, int8 on the CPU (seconds per encode; chunks of "
          f"{loading.TOKENIZE_CHUNK})\n")
    print("| corpus | texts | a chunk ahead | in turn | all first | ahead / in turn (speed) | in turn / all first "
          "(speed) | ahead / in turn per round |")
    print("|---|---|---|---|---|---|---|---|")
    chunk = loading.TOKENIZE_CHUNK

    def encode(items: list[str], ahead: bool, chunked: bool = True):
        def run():
            embedder._tokenize_ahead = ahead
            loading.TOKENIZE_CHUNK = chunk if chunked else 10**9
            try:
                embedder.encode(items)
            finally:
                loading.TOKENIZE_CHUNK = chunk
        return run

    # the mixed corpus takes about a minute per encode here: no warm-up round (the queries' warmed the session)
    for corpus, items, reps, warm in (("short queries", texts["short queries"] * 4, args.reps, True),
                                      ("mixed", (texts["mixed"] * 5)[:4200], max(2, args.reps // 2), False)):
        print(f"timing {corpus}", file=sys.stderr, flush=True)
        runs = {"ahead": encode(items, True), "in turn": encode(items, False),
                "all first": encode(items, False, chunked=False)}
        seconds = timed(runs, reps, warm)
        ahead, turn, first = (statistics.median(seconds[k]) for k in runs)
        rounds = ", ".join(f"{b / a:.2f}" for a, b in zip(seconds["ahead"], seconds["in turn"]))
        print(f"| {corpus} | {len(items)} | {ahead:.2f} | {turn:.2f} | {first:.2f} | {turn / ahead:.2f}x | "
              f"{first / turn:.2f}x | {rounds} |")
    print()


if __name__ == "__main__":
    main()
