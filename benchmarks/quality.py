"""Quality on real evaluation data: STS-B test Spearman and SciFact nDCG@10, next to the published MTEB scores.

Usage: python benchmarks/quality.py [MODEL] [--precision fp32 int8] [--reference HUB_ID] > benchmarks/results/quality-minilm.md
MODEL defaults to the packaged all-MiniLM-L6-v2 (exported on first use). Needs scipy and ../shared/data.
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

import numpy as np

from bge_onnx import Embedder
from bge_onnx.cli import default_model

from corpora import DATA


def stsb_spearman(embedder: Embedder) -> float:
    from scipy.stats import spearmanr

    rows = [json.loads(line) for line in (DATA / "stsb" / "sts-test.jsonl").read_text(encoding="utf-8").splitlines()]
    left = embedder.encode([r["sentence1"] for r in rows])
    right = embedder.encode([r["sentence2"] for r in rows])
    return float(spearmanr((left * right).sum(axis=1), [r["score"] for r in rows]).statistic)


def scifact_ndcg10(embedder: Embedder) -> float:
    """nDCG@10 over the full-corpus ranking, as MTEB scores SciFact (corpus text: title + " " + text)."""
    with gzip.open(DATA / "scifact" / "corpus.jsonl.gz", "rt", encoding="utf-8") as f:
        corpus = [json.loads(line) for line in f]
    queries = {q["_id"]: q["text"] for q in map(json.loads, (DATA / "scifact" / "queries.jsonl").open(encoding="utf-8"))}
    relevant: dict[str, set[str]] = defaultdict(set)
    with open(DATA / "scifact" / "qrels" / "test.tsv", encoding="utf-8") as f:
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
    with open(DATA / "reference_scores" / "reference_scores.tsv", encoding="utf-8") as f:
        for row in csv.reader(f, delimiter="\t"):
            if row[0] == model_id and (row[2], row[4]) in {("STSBenchmark", "cosine_spearman"), ("SciFact", "ndcg_at_10")}:
                out[row[2]] = float(row[5])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="model folder (default: the packaged all-MiniLM-L6-v2)")
    parser.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "int8", "fp16"])
    parser.add_argument("--reference", default="sentence-transformers/all-MiniLM-L6-v2", help="hub id of the published scores")
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # SciFact abstracts are truncated at max length, as in MTEB
    folder = args.model or default_model()
    ref = published(args.reference)
    rows = []
    start = time.perf_counter()
    for precision in args.precision:
        embedder = Embedder(folder, device="cpu", precision=precision)
        rows.append((precision, {"STSBenchmark": stsb_spearman(embedder), "SciFact": scifact_ndcg10(embedder)}))
    elapsed = time.perf_counter() - start
    print(f"# Quality: {args.reference} via bge-onnx ({', '.join(args.precision)}, max_length {embedder.max_length})\n")
    command = " ".join(["python benchmarks/quality.py", *([str(args.model)] if args.model else []), "--precision", *args.precision])
    print(f"Command: `{command}`; {time.strftime('%Y-%m-%d')}; {elapsed:.0f} s on CPU\n")
    print(f"| task | metric | precision | bge-onnx | published (MTEB) | difference | vs {args.precision[0]} |")
    print("|---|---|---|---|---|---|---|")
    for task, metric in (("STSBenchmark", "cosine_spearman"), ("SciFact", "ndcg_at_10")):
        for precision, scores in rows:
            value, reference = scores[task], ref.get(task)
            shown = f"{reference:.5f} | {value - reference:+.5f}" if reference is not None else "- | -"
            print(f"| {task} test | {metric} | {precision} | {value:.5f} | {shown} | {value - rows[0][1][task]:+.5f} |")


if __name__ == "__main__":
    main()
