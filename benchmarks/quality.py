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


def stsb_rows() -> dict:
    """STS-B test: the pairs' sentences (left, right) and their gold scores."""
    rows = [json.loads(line) for line in (data_dir() / "stsb" / "sts-test.jsonl").read_text(encoding="utf-8").splitlines()]
    return {"left": [r["sentence1"] for r in rows], "right": [r["sentence2"] for r in rows],
            "scores": [r["score"] for r in rows]}


def stsb_spearman(embedder: Embedder) -> float:
    from scipy.stats import spearmanr

    data = stsb_rows()
    left, right = embedder.encode(data["left"]), embedder.encode(data["right"])
    return float(spearmanr((left * right).sum(axis=1), data["scores"]).statistic)


def scifact() -> dict:
    """SciFact as MTEB scores it: corpus texts (title + " " + text) and ids, the test queries with a relevant
    document (sorted by id) and their relevant documents."""
    with gzip.open(data_dir() / "scifact" / "corpus.jsonl.gz", "rt", encoding="utf-8") as f:
        corpus = [json.loads(line) for line in f]
    queries = {q["_id"]: q["text"] for q in map(json.loads, (data_dir() / "scifact" / "queries.jsonl").open(encoding="utf-8"))}
    relevant: dict[str, set[str]] = defaultdict(set)
    with open(data_dir() / "scifact" / "qrels" / "test.tsv", encoding="utf-8") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            if int(row["score"]) > 0:
                relevant[row["query-id"]].add(row["corpus-id"])
    query_ids = sorted(relevant)
    return {"docs": [(d["title"] + " " + d["text"]).strip() for d in corpus], "doc_ids": [d["_id"] for d in corpus],
            "queries": [queries[q] for q in query_ids], "query_ids": query_ids, "relevant": relevant}


def ndcg10(rankings: np.ndarray, data: dict) -> float:
    """Mean nDCG@10 of each query's ranked document indexes (its first 10 count)."""
    discounts = 1 / np.log2(np.arange(2, 12))
    total = 0.0
    for row, query_id in enumerate(data["query_ids"]):
        gains = np.array([data["doc_ids"][i] in data["relevant"][query_id] for i in rankings[row][:10]], dtype=float)
        ideal = discounts[: min(len(data["relevant"][query_id]), 10)].sum()
        total += float((gains * discounts[: len(gains)]).sum() / ideal)
    return total / len(data["query_ids"])


def scifact_ndcg10(embedder: Embedder) -> float:
    """nDCG@10 over the full-corpus ranking, as MTEB scores SciFact (corpus text: title + " " + text)."""
    data = scifact()
    docs = embedder.encode_corpus(data["docs"], batch_size=32)
    scores = embedder.encode_queries(data["queries"]) @ docs.T
    return ndcg10(np.argsort(-scores, axis=1, kind="stable")[:, :10], data)


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
