"""python -m benchmarks NAME [options]: run one benchmark (each writes benchmarks/results/NAME.md and .json)."""

from __future__ import annotations

import importlib
import sys

# name -> (module, what it measures)
BENCHMARKS = {
    "compare": ("compare", "throughput and accuracy against sentence-transformers, fastembed and optimum, CPU"),
    "by-length": ("compare", "the same contestants on texts cut to fixed token lengths, and the plot"),
    "coldstart": ("coldstart", "import + load + first text in a fresh process, peak RSS, installed size"),
    "quality": ("quality", "STS-B Spearman and SciFact nDCG@10 against the published MTEB scores, per precision"),
    "rerank": ("rerank", "reranker throughput and scores against sentence-transformers' CrossEncoder, CPU"),
    "optimized": ("optimized", "bge-onnx optimize's fp32/int8 folders against the official ONNX graph run as it is"),
    "runtime-env": ("runtime_env", "the Dockerfile's runtime stage in a fresh venv: size, no torch, serverless cold start"),
    "int8": ("int8", "per-token int8 recipes: accuracy vs fp32, batch drift, speed; the int8 kernels, CPU"),
    "workers": ("workers", "all cores: N worker processes against one process with N threads, CPU"),
    "m3-long": ("m3_long", "bge-m3's shape (random weights): peak RSS and time per text at 512, 2048, 8192 tokens"),
    "parity": ("parity", "every architecture and the packaged real model against PyTorch, built from weights and traced, fp32"),
    "export-cost": ("export_cost", "an export's wall time and peak RSS each way: built without torch, built, traced"),
    "main-command": ("main_command", "the README's main command in a fresh venv: install time, size, no torch; --before REV"),
    "serve-load": ("serve_load", "bge-onnx serve over HTTP: throughput, p50/p99 per concurrency vs in-process, overload, RSS"),
    "serve-hostile": ("serve_hostile", "bge-onnx serve: peak RSS under 8 concurrent ~1.9 MB truncate requests, vs a baseline"),
    "serve-overload": ("serve_overload", "bge-onnx serve at twice its sustainable rate: p50/p99, 429s, none lost or wrong"),
    "serve-one": ("serve_one", "bge-onnx serve, one client, interleaved with in-process encode (and a baseline tree)"),
    "serve-peer": ("serve_peer", "bge-onnx serve against infinity-emb (torch and optimum engines), same load, interleaved"),
    "idle": ("idle", "onnxruntime's threads spinning after a run or not: idle CPU, short-query CPU, throughput, library and server"),
    "storage": ("storage", "int8 / binary / binary + rescore vectors: SciFact nDCG@10, STS-B, bytes, search time"),
    "phases": ("phases", "a cold load by phase: imports, hashes, tokenizer, session (parse, optimise, prepack), first run"),
    "share": ("share", "weights shared between processes: PSS of 1, 2 and 4 processes per folder layout"),
    "gpu": ("gpu", "CUDA: provider start, fp16/fp32 parity, throughput against sentence-transformers on the GPU"),
    "gpu-rerank": ("gpu_rerank", "CUDA: reranker parity and throughput against the CrossEncoder on the GPU"),
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "list"):
        print(__doc__.strip() + "\n\nbenchmarks:")
        for name, (_, what) in BENCHMARKS.items():
            print(f"  {name:<11} {what}")
        print("\n`python -m benchmarks NAME --help` lists a benchmark's options; benchmarks/README.md says what each needs.")
        return 0
    name, *rest = argv
    if name not in BENCHMARKS:
        print(f"benchmarks: unknown benchmark {name!r}; one of: {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"benchmarks.{BENCHMARKS[name][0]}")
    module.main(rest, name=name)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
