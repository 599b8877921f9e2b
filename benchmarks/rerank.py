"""Reranker throughput and score parity: bge-onnx vs sentence-transformers' CrossEncoder (torch and ONNX backends).

No real cross-encoder's weights can be fetched here, so two stand-ins, both built on the fly (seeded):
- "tiny": the tests' two-layer BERT reranker (tests/tiny_models.py), where per-call overhead dominates;
- "MiniLM-L6": all-MiniLM-L6-v2's real encoder weights under a random one-unit classification head, the
  architecture and size of cross-encoder/ms-marco-MiniLM-L-6-v2 (its scores mean nothing; speed and parity do).
Pairs: SciFact test queries, each with its relevant abstracts and random others (title + text), 10 per query.
Each model is exported with bge-onnx (fp32 and int8); contestants run in their own processes, interleaved,
medians; parity is against the CrossEncoder on torch (raw logits).

Usage: python benchmarks/rerank.py --anchors-python ../anchors/bin/python [--queries 50] [--reps 3] \
    > benchmarks/results/rerank.md    (the anchors' environment: see compare.py)
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bge_onnx.session import usable_cpus
from bge_onnx.spec import read_spec
from compare import Worker, cpu_name
from corpora import DATA

HERE = Path(__file__).resolve().parent


def scifact_pairs(queries: int, per_query: int = 10) -> list[list[str]]:
    rng = random.Random(0)
    text = {q["_id"]: q["text"] for q in map(json.loads, (DATA / "scifact" / "queries.jsonl").open(encoding="utf-8"))}
    with gzip.open(DATA / "scifact" / "corpus.jsonl.gz", "rt", encoding="utf-8") as f:
        docs = {d["_id"]: d["title"] + " " + d["text"] for d in map(json.loads, f)}
    relevant: dict[str, list[str]] = {}
    for line in (DATA / "scifact" / "qrels" / "test.tsv").read_text(encoding="utf-8").splitlines()[1:]:
        query, doc, _ = line.split("\t")
        relevant.setdefault(query, []).append(doc)
    ids = list(docs)
    pairs = []
    for query in rng.sample(sorted(relevant), queries):
        picked = relevant[query][:per_query]
        picked += rng.sample(ids, per_query - len(picked))
        pairs += [[text[query], docs[doc]] for doc in picked]
    return pairs


def build_models(work: Path) -> dict[str, Path]:
    """Checkpoints -> bge-onnx folders (fp32 + int8, int8 kept even below its gate; the manifest says which)."""
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    from bge_onnx_export import export_model

    sys.path.insert(0, str(HERE.parent / "tests"))
    from tiny_models import build_checkpoint, minilm_path

    checkpoints = {"tiny": build_checkpoint("bert-rerank", work / "ckpt" / "bge-reranker-tiny-bert")}
    torch.manual_seed(0)
    minilm = BertForSequenceClassification.from_pretrained(minilm_path(), num_labels=1)
    checkpoints["MiniLM-L6"] = work / "ckpt" / "minilm-l6-cross-encoder"
    minilm.eval().save_pretrained(checkpoints["MiniLM-L6"])
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(checkpoints["MiniLM-L6"])
    folders = {}
    for name, checkpoint in checkpoints.items():
        folders[name] = work / "onnx" / checkpoint.name
        export_model(checkpoint, folders[name], precisions=("fp32", "int8"), allow_below_gate=True)
    return folders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--anchors-python", required=True)
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=usable_cpus())
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bge-onnx-rerank-"))
    pairs = scifact_pairs(args.queries)
    (work / "pairs.json").write_text(json.dumps({"scifact": pairs}), encoding="utf-8")
    folders = build_models(work)

    print("# Rerankers: bge-onnx vs sentence-transformers CrossEncoder\n")
    print(f"Command: `python benchmarks/rerank.py --anchors-python ANCHORS --queries {args.queries} --reps {args.reps} "
          f"--threads {args.threads}`; {time.strftime('%Y-%m-%d')}; {cpu_name()}, {args.threads} threads. "
          f"{len(pairs)} SciFact (query, abstract) pairs, {args.queries} queries x 10. Medians of {args.reps} interleaved "
          "rounds. Parity: raw scores (logits) against the CrossEncoder on torch.\n")
    for model, folder in folders.items():
        spec = read_spec(folder)
        int8 = spec.variants["int8"].parity
        t, ckpt = args.threads, str(folder.parent.parent / "ckpt" / folder.name)
        table = {
            "CrossEncoder, torch": (args.anchors_python, dict(kind="cross_encoder", folder=ckpt, backend="torch", max_length=spec.max_length, threads=t)),
            "CrossEncoder, onnx": (args.anchors_python, dict(kind="cross_encoder", folder=ckpt, backend="onnx", max_length=spec.max_length, threads=t)),
            "bge-onnx fp32": (sys.executable, dict(kind="bge_onnx_rerank", folder=str(folder), precision="fp32", threads=t)),
            "bge-onnx int8": (sys.executable, dict(kind="bge_onnx_rerank", folder=str(folder), precision="int8", threads=t)),
        }
        workers = {}
        for name, (python, spec_) in table.items():
            print(f"{model}: starting {name}", file=sys.stderr, flush=True)
            workers[name] = Worker(python, {**spec_, "corpora": str(work / "pairs.json")})
        scores, times = {}, {name: [] for name in workers}
        for name, worker in workers.items():
            path = work / f"{model}-{len(scores)}.npy"
            worker.ask(f"save\tscifact\t{path}")
            scores[name] = np.load(path).reshape(-1)
        for _ in range(args.reps):
            for name, worker in workers.items():
                times[name].append(float(worker.ask("run\tscifact")))
        for worker in workers.values():
            worker.close()
        reference, torch_seconds = scores["CrossEncoder, torch"], statistics.median(times["CrossEncoder, torch"])
        gate = "within" if int8.get("passed") else "BELOW"
        print(f"\n## {model} (max length {spec.max_length}; int8 recipe {int8.get('recipe')}, {gate} its gate: "
              f"Spearman {int8.get('score_spearman', float('nan')):.4f} to fp32 on the gate pairs)\n")
        print("| contestant | pairs/s | vs CrossEncoder torch | max abs score difference | Spearman to torch |")
        print("|---|---|---|---|---|")
        for name, seconds in times.items():
            ours = scores[name]
            rank = np.corrcoef(np.argsort(np.argsort(reference)), np.argsort(np.argsort(ours)))[0, 1]
            print(f"| {name} | {len(pairs) / statistics.median(seconds):.1f} | {torch_seconds / statistics.median(seconds):.2f}x | "
                  f"{np.abs(ours - reference).max():.2e} | {rank:.5f} |", flush=True)


if __name__ == "__main__":
    main()
