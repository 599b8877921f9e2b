"""Quality on real evaluation data: STS-B test Spearman and SciFact nDCG@10, next to the published MTEB scores.

MODEL defaults to the packaged all-MiniLM-L6-v2 (exported on first use). Needs scipy and the evaluation data.
With several precisions, each is scored and compared with the first (fp32).
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import time
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np

from bge_onnx import Embedder
from bge_onnx.default_model import default_model

from .harness import Report, data_dir, log


def stsb_spearman(embedder: Embedder) -> float:
    from scipy.stats import spearmanr

    rows = [json.loads(line) for line in (data_dir() / "stsb" / "sts-test.jsonl").read_text(encoding="utf-8").splitlines()]
    left = embedder.encode([r["sentence1"] for r in rows])
    right = embedder.encode([r["sentence2"] for r in rows])
    return float(spearmanr((left * right).sum(axis=1), [r["score"] for r in rows]).statistic)


def scifact_ndcg10(embedder: Embedder) -> float:
    """nDCG@10 over the full-corpus ranking, as MTEB scores SciFact (corpus text: title + " " + text)."""
    with gzip.open(data_dir() / "scifact" / "corpus.jsonl.gz", "rt", encoding="utf-8") as f:
        corpus = [json.loads(line) for line in f]
    queries = {q["_id"]: q["text"] for q in map(json.loads, (data_dir() / "scifact" / "queries.jsonl").open(encoding="utf-8"))}
    relevant: dict[str, set[str]] = defaultdict(set)
    with open(data_dir() / "scifact" / "qrels" / "test.tsv", encoding="utf-8") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            if int(row["score"]) > 0:
                relevant[row["query-id"]].add(row["corpus-id"])
    doc_ids = [d["_id"] for d in corpus]
    docs = embedder.encode_corpus([(d["title"] + " " + d["text"]).strip() for d in corpus], batch_size=32)
    query_ids = sorted(relevant)
    scores = embedder.encode_queries([queries[q] for q in query_ids]) @ docs.T
    discounts = 1 / np.log2(np.arange(2, 12))
    total = 0.0
    for row, query_id in enumerate(query_ids):
        top = np.argsort(-scores[row], kind="stable")[:10]
        gains = np.array([doc_ids[i] in relevant[query_id] for i in top], dtype=float)
        ideal = discounts[: min(len(relevant[query_id]), 10)].sum()
        total += float((gains * discounts).sum() / ideal)
    return total / len(query_ids)


def published(model_id: str) -> dict[str, float]:
    out = {}
    with open(data_dir() / "reference_scores" / "reference_scores.tsv", encoding="utf-8") as f:
        for row in csv.reader(f, delimiter="\t"):
            if row[0] == model_id and (row[2], row[4]) in {("STSBenchmark", "cosine_spearman"), ("SciFact", "ndcg_at_10")}:
                out[row[2]] = float(row[5])
    return out


def main(argv: list[str], *, name: str = "quality") -> None:
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks {name}", description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", type=Path, help="model folder (default: the packaged all-MiniLM-L6-v2)")
    parser.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "int8", "fp16"])
    parser.add_argument("--reference", default="sentence-transformers/all-MiniLM-L6-v2", help="hub id of the published scores")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")  # SciFact abstracts are truncated at max length, as in MTEB
    folder = args.model or default_model()
    ref = published(args.reference)
    report = Report(name, f"Quality: {args.reference} via bge-onnx ({', '.join(args.precision)})", argv,
                    models={"MODEL": folder})
    scores = {}
    start = time.perf_counter()
    for precision in args.precision:
        log(f"scoring {precision}")
        embedder = Embedder(folder, device="cpu", precision=precision)
        scores[precision] = {"STSBenchmark": stsb_spearman(embedder), "SciFact": scifact_ndcg10(embedder)}
    report.text(f"max_length {embedder.max_length}; {time.perf_counter() - start:.0f} s on CPU.")
    rows = []
    first = args.precision[0]
    for task, metric in (("STSBenchmark", "cosine_spearman"), ("SciFact", "ndcg_at_10")):
        for precision, values in scores.items():
            value, reference = values[task], ref.get(task)
            shown = [f"{reference:.5f}", f"{value - reference:+.5f}"] if reference is not None else ["-", "-"]
            rows.append([f"{task} test", metric, precision, f"{value:.5f}", *shown, f"{value - scores[first][task]:+.5f}"])
    report.table(["task", "metric", "precision", "bge-onnx", "published (MTEB)", "difference", f"vs {first}"], rows)
    report.data = {"published": ref, "scores": scores}
    report.write()
