"""Token-budget batching: texts/s of bge-onnx for several max_tokens budgets vs fixed batches of 32, interleaved.

Chooses the runtime's default MAX_TOKENS. Same model folder, texts and threads for every setting; medians of
--reps interleaved runs (this host's speed drifts, so only ratios within one run mean anything).

Usage: python benchmarks/batching.py [--model DIR] [--precision fp32] [--reps 5] > benchmarks/results/batching-minilm.md
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import warnings

import onnxruntime as ort

from bge_onnx import Embedder
from bge_onnx.cli import default_model
from bge_onnx.session import usable_cpus
from corpora import corpora

SETTINGS = {
    "32 texts (no token budget)": dict(batch_size=32, max_tokens=1 << 30),
    "max_tokens 256": dict(batch_size=4096, max_tokens=256),
    "max_tokens 512": dict(batch_size=4096, max_tokens=512),
    "max_tokens 768": dict(batch_size=4096, max_tokens=768),
    "max_tokens 1024": dict(batch_size=4096, max_tokens=1024),
    "max_tokens 2048": dict(batch_size=4096, max_tokens=2048),
    "max_tokens 8192": dict(batch_size=4096, max_tokens=8192),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder (default: the packaged all-MiniLM-L6-v2)")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--texts", type=int, default=300)
    parser.add_argument("--threads", type=int, default=usable_cpus())
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    folder = args.model or default_model()
    models = {name: Embedder(folder, device="cpu", threads=args.threads, precision=args.precision, **kw)
              for name, kw in SETTINGS.items()}
    print(f"# Token-budget batching: {folder}, {args.precision}, CPU\n")
    print(f"Command: `python benchmarks/batching.py --precision {args.precision} --reps {args.reps} --texts {args.texts} "
          f"--threads {args.threads}`; {time.strftime('%Y-%m-%d')}; {platform.machine()}, {args.threads} threads, "
          f"onnxruntime {ort.__version__}. Medians of {args.reps} interleaved runs; ratio to fixed batches of 32.\n")
    print("| corpus | setting | texts/s | ratio |")
    print("|---|---|---|---|")
    for corpus, texts in corpora(args.texts).items():
        times: dict[str, list[float]] = {name: [] for name in models}
        for model in models.values():
            model.encode(texts)  # warm-up
        for _ in range(args.reps):
            for name, model in models.items():
                start = time.perf_counter()
                model.encode(texts)
                times[name].append(time.perf_counter() - start)
        base = statistics.median(times["32 texts (no token budget)"])
        for name in models:
            median = statistics.median(times[name])
            print(f"| {corpus} | {name} | {len(texts) / median:.1f} | {base / median:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
