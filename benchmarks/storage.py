"""Vectors for storage: what int8, binary and binary + rescoring cost in retrieval and similarity, their bytes per
vector, and their search time over 100,000 vectors.

For each graph of MODEL (fp32, int8): SciFact nDCG@10 (full-corpus ranking, as MTEB scores it, corpus text title +
" " + text) and STS-B test Spearman (cosine of each pair) with the vectors stored as float32, int8 (the export's
ranges, dequantized for the dot product), binary (Hamming distance; STS-B: 1 - distance / dim), and binary
candidates x2, x4, x10 rescored with the float query against the float32 and against the int8 vectors
(bge_onnx.search); and float32 cut to its first half and quarter of dimensions, renormalised (what `dimensions` would
give: the model was not trained for it). Search time: 100 queries against 100,000 random unit vectors of the model's dimension, medians
of --rounds interleaved rounds, numpy (and search_binary's FAISS backend where faiss is installed).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from pathlib import Path

import numpy as np

from bge_onnx import Embedder
from bge_onnx.search import hamming, search, search_binary
from bge_onnx.storage import OutputDtype, convert, dequantize

from .harness import TRYOUTS, Report, log
from .quality import ndcg10, scifact, stsb_rows


def first(vectors: np.ndarray, keep: int) -> np.ndarray:
    """The first ``keep`` dimensions, renormalised."""
    cut = vectors[:, :keep]
    return cut / np.linalg.norm(cut, axis=1, keepdims=True)


def measure(embedder: Embedder, data: dict) -> dict[str, dict[str, float]]:
    from scipy.stats import spearmanr

    ranges = embedder.ranges
    floats = embedder.encode_corpus(data["docs"], batch_size=32)
    docs = {"float32": floats, "int8": convert(floats, OutputDtype.INT8, ranges),
            "binary": convert(floats, OutputDtype.BINARY)}
    queries = embedder.encode_queries(data["queries"])
    query_bits = convert(queries, OutputDtype.UBINARY)
    forms = {
        "float32": lambda: search(queries, docs["float32"], k=10)[0],
        "int8": lambda: search(queries, docs["int8"], k=10, ranges=ranges)[0],
        "binary": lambda: search_binary(query_bits, docs["binary"], k=10)[0],
    }
    for m in (2, 4, 10):
        forms[f"binary + rescore x{m} (float32)"] = (
            lambda m=m: search_binary(queries, docs["binary"], k=10, rescore=docs["float32"], multiplier=m)[0])
        forms[f"binary + rescore x{m} (int8)"] = (
            lambda m=m: search_binary(queries, docs["binary"], k=10, rescore=docs["int8"], ranges=ranges,
                                      multiplier=m)[0])
    # truncated vectors (what `dimensions` would give): neither BGE v1.5, bge-m3 nor all-MiniLM-L6-v2 was trained for
    # them (no Matryoshka loss), so this measures what truncating anyway costs
    for keep in (embedder.dim // 2, embedder.dim // 4):
        forms[f"float32, first {keep} dimensions"] = (
            lambda keep=keep: search(first(queries, keep), first(floats, keep), k=10)[0])
    out = {name: {"ndcg10": ndcg10(run(), data)} for name, run in forms.items()}

    left_floats, right_floats = embedder.encode(data["left"]), embedder.encode(data["right"])
    left = {"float32": left_floats, "int8": convert(left_floats, OutputDtype.INT8, ranges),
            "binary": convert(left_floats, OutputDtype.BINARY)}
    right = {"float32": right_floats, "int8": convert(right_floats, OutputDtype.INT8, ranges),
             "binary": convert(right_floats, OutputDtype.BINARY)}

    def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return (a * b).sum(axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)

    similarity = {
        "float32": cosine(left["float32"], right["float32"]),
        "int8": cosine(dequantize(left["int8"], ranges), dequantize(right["int8"], ranges)),
        "binary": 1 - np.array([hamming(a, b[None])[0, 0] for a, b in zip(left["binary"], right["binary"])]) / embedder.dim,
    }
    for keep in (embedder.dim // 2, embedder.dim // 4):
        similarity[f"float32, first {keep} dimensions"] = cosine(left_floats[:, :keep], right_floats[:, :keep])
    for name, values in similarity.items():
        out[name]["spearman"] = float(spearmanr(values, data["scores"]).statistic)
    return out


def speed(dim: int, rounds: int) -> dict[str, float]:
    """Seconds for 100 queries over 100,000 random unit vectors, per form (medians of interleaved rounds)."""
    from bge_onnx.storage import ranges_of

    rng = np.random.default_rng(0)
    corpus = rng.standard_normal((100_000, dim), dtype=np.float32)
    corpus /= np.linalg.norm(corpus, axis=1, keepdims=True)
    queries = corpus[rng.choice(len(corpus), 100, replace=False)] + 0.01 * rng.standard_normal((100, dim), dtype=np.float32)
    ranges = ranges_of(corpus)
    int8, bits = convert(corpus, OutputDtype.INT8, ranges), convert(corpus, OutputDtype.BINARY)
    query_bits = convert(queries, OutputDtype.UBINARY)
    runs = {
        "float32": lambda: search(queries, corpus, k=10),
        "int8": lambda: search(queries, int8, k=10, ranges=ranges),
        "binary": lambda: search_binary(query_bits, bits, k=10),
        "binary + rescore x4 (int8)": lambda: search_binary(queries, bits, k=10, rescore=int8, ranges=ranges,
                                                             multiplier=4),
    }
    if importlib.util.find_spec("faiss") is not None:  # the faiss extra: IndexBinaryFlat, built on each call
        runs["binary, FAISS"] = lambda: search_binary(query_bits, bits, k=10, backend="faiss")
        runs["binary + rescore x4 (int8), FAISS"] = lambda: search_binary(
            queries, bits, k=10, rescore=int8, ranges=ranges, multiplier=4, backend="faiss")
    seconds = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in seconds.items()}


def main(argv: list[str], *, name: str = "storage") -> None:
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks {name}", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a bge-onnx embedding folder (with ranges)")
    parser.add_argument("--precision", nargs="+", default=["fp32", "int8"])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the search timing (default 5)")
    parser.add_argument("--try-out", action="store_true", help="write to benchmarks/out/ instead of results/")
    args = parser.parse_args(argv)

    data = {**scifact(), **stsb_rows()}
    report = Report(name, "Vectors for storage: retrieval and similarity kept, bytes, search time", argv,
                    models={"MODEL": args.model})
    report.text(__doc__.split("\n\n", 1)[1].replace("\n", " "))
    results = {}
    for precision in args.precision:
        log(f"{precision}: SciFact and STS-B")
        embedder = Embedder(args.model, device="cpu", precision=precision)
        results[precision] = measure(embedder, data)
    dim = embedder.dim
    sizes = {"float32": 4 * dim, "int8": dim, "binary": (dim + 7) // 8}
    for precision, found in results.items():
        base = found["float32"]
        rows = []
        for form, figures in found.items():
            stored = "binary" if form.startswith("binary") else form
            if form.startswith("float32, first"):
                sizes[form] = 4 * int(form.split()[2])
            spearman = f"{figures['spearman']:.5f} ({100 * figures['spearman'] / base['spearman']:.1f}%)" \
                if "spearman" in figures else ""
            rows.append([form, f"{sizes[stored]} B" + (" + rescoring vectors" if "rescore" in form else ""),
                         f"{figures['ndcg10']:.5f} ({100 * figures['ndcg10'] / base['ndcg10']:.1f}%)", spearman])
        report.text(f"## {precision} graph")
        report.table(["stored as", "bytes per vector", "SciFact nDCG@10 (of float32)", "STS-B Spearman (of float32)"],
                     rows)
    log("search time")
    seconds = speed(dim, args.rounds)
    report.text(f"## Search time: 100 queries over 100,000 random unit vectors of {dim} dimensions (numpy; FAISS "
                "where installed: search_binary's backend='faiss', its IndexBinaryFlat built on each call)")
    report.table(["stored as", "seconds", "vs float32"],
                 [[form, f"{s:.3f}", f"{seconds['float32'] / s:.2f}x"] for form, s in seconds.items()])
    report.data = {"quality": results, "search_seconds": seconds, "bytes": sizes}
    if args.try_out:
        report.write(TRYOUTS)
    else:
        report.write()
