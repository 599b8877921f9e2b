"""onnxruntime session settings, measured: graph optimisation level, thread spinning, memory arena.

Each setting gets its own session on the same graph, swapped into one Embedder (so tokenising and batching are
bge-onnx's own), and the settings take turns on each corpus (A B C ... A B C, medians). Ratios are to the
runtime's settings (all graph optimisations, spinning on, arena on, threads = usable CPUs).

Usage: python benchmarks/session_options.py MODEL [--precision fp32] [--reps 5] > benchmarks/results/session-options-minilm.md
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import onnxruntime as ort

from bge_onnx import Embedder
from corpora import corpora

LEVELS = ort.GraphOptimizationLevel
SETTINGS = {
    "bge-onnx's (ORT_ENABLE_ALL, spinning, arena)": {},
    "ORT_ENABLE_EXTENDED": {"level": LEVELS.ORT_ENABLE_EXTENDED},
    "ORT_ENABLE_BASIC": {"level": LEVELS.ORT_ENABLE_BASIC},
    "no thread spinning": {"spinning": False},
    "no memory arena": {"arena": False},
}


def session(path: str, threads: int, level=LEVELS.ORT_ENABLE_ALL, spinning=True, arena=True) -> tuple[ort.InferenceSession, float]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = level
    options.enable_cpu_mem_arena = arena
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    start = time.perf_counter()
    made = ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
    return made, time.perf_counter() - start


def time_sessions(embedder: Embedder, sessions: dict[str, ort.InferenceSession], items: list[str],
                  reps: int) -> dict[str, list[float]]:
    """encode() seconds with each session swapped into the embedder in turn (A B C ... A B C), for reps rounds."""
    runtime_session = embedder._model.session
    times = {name: [] for name in sessions}
    for _ in range(reps):
        for name, made in sessions.items():
            runtime_session._session = made
            start = time.perf_counter()
            embedder.encode(items)
            times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # passages are truncated at max length on purpose
    embedder = Embedder(args.model, device="cpu", precision=args.precision)
    loaded = embedder._model.session  # the runtime's Session; its onnxruntime session is swapped per setting
    path = str(embedder._model.folder / embedder.spec.variants[embedder.precision.value].file)
    sessions, starts = {}, {}
    for name, setting in SETTINGS.items():
        sessions[name], starts[name] = session(path, loaded.threads, **setting)
    texts = {k: v for k, v in corpora(200).items() if k in ("short queries", "passages", "mixed")}
    print(f"# onnxruntime session settings: {embedder._model.folder.name}, {args.precision}\n")
    print(f"Command: `python benchmarks/session_options.py {embedder._model.folder.name} --precision {args.precision} "
          f"--reps {args.reps}`; {time.strftime('%Y-%m-%d')}; onnxruntime {ort.__version__}, {loaded.threads} threads. "
          f"Speed: encode() time of bge-onnx's settings over this setting's, medians of {args.reps} interleaved; "
          "above 1 is faster.\n")
    print("| setting | session start s | " + " | ".join(texts) + " |")
    print("|---|---|" + "---|" * len(texts))
    ratios = {name: [] for name in SETTINGS}
    for corpus, items in texts.items():
        time_sessions(embedder, sessions, items, 1)  # warm-up
        times = time_sessions(embedder, sessions, items, args.reps)
        base = statistics.median(times[next(iter(SETTINGS))])
        for name in SETTINGS:
            ratios[name].append(base / statistics.median(times[name]))
    for name in SETTINGS:
        print(f"| {name} | {starts[name]:.3f} | " + " | ".join(f"{r:.2f}x" for r in ratios[name]) + " |")


if __name__ == "__main__":
    main()
