"""Reranker throughput and score parity: bge-onnx vs sentence-transformers' CrossEncoder (torch and ONNX backends).

No real cross-encoder's weights can be fetched here, so two stand-ins, both built on the fly (seeded):
- "tiny": the tests' two-layer BERT reranker (tests/tiny_models.py), where per-call overhead dominates;
- "MiniLM-L6": all-MiniLM-L6-v2's real encoder weights under a random one-unit classification head, the
  architecture and size of cross-encoder/ms-marco-MiniLM-L-6-v2 (its scores mean nothing; speed and parity do).
Pairs: SciFact test queries, each with its relevant abstracts and random others (title + text), 10 per query.
Each model is exported with bge-onnx (fp32 and int8); contestants run in their own processes, interleaved,
medians; parity is against the CrossEncoder on torch (raw logits).

The anchors' environment (--anchors-python): see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import sys
import tempfile
from pathlib import Path

import numpy as np

from bge_onnx.session import usable_cpus
from bge_onnx.spec import read_spec

from .compare import Worker, paired
from .harness import ROOT, Report, data_dir, interleave, log, medians


def scifact_pairs(queries: int, per_query: int = 10) -> list[list[str]]:
    """Seeded SciFact test queries, each with its relevant abstracts, then random others, ``per_query`` in all."""
    data = data_dir()
    rng = random.Random(0)
    text = {q["_id"]: q["text"] for q in map(json.loads, (data / "scifact" / "queries.jsonl").open(encoding="utf-8"))}
    with gzip.open(data / "scifact" / "corpus.jsonl.gz", "rt", encoding="utf-8") as f:
        docs = {d["_id"]: d["title"] + " " + d["text"] for d in map(json.loads, f)}
    relevant: dict[str, list[str]] = {}
    for line in (data / "scifact" / "qrels" / "test.tsv").read_text(encoding="utf-8").splitlines()[1:]:
        query, doc, _ = line.split("\t")
        relevant.setdefault(query, []).append(doc)
    ids = list(docs)
    pairs = []
    for query in rng.sample(sorted(relevant), queries):
        picked = relevant[query][:per_query]
        picked += rng.sample(ids, per_query - len(picked))
        pairs += [[text[query], docs[doc]] for doc in picked]
    return pairs


def build_models(work: Path, names: list[str]) -> dict[str, Path]:
    """Checkpoints -> bge-onnx folders (fp32 + int8, int8 kept even below its gate; the manifest says which).

    The tiny reranker is the tests' own (tests/tiny_models.py builds it from a seeded config).
    """
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    from bge_onnx_export import export_model

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import build_checkpoint, minilm_path

    checkpoints = {}
    if "tiny" in names:
        checkpoints["tiny"] = build_checkpoint("bert-rerank", work / "ckpt" / "bge-reranker-tiny-bert")
    if "MiniLM-L6" in names:
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


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(np.argsort(np.argsort(a)), np.argsort(np.argsort(b)))[0, 1])


def main(argv: list[str], *, name: str = "rerank") -> None:
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks {name}", description=__doc__.splitlines()[0])
    parser.add_argument("--anchors-python", required=True, help="the Python of the anchors' environment")
    parser.add_argument("--queries", type=int, default=50, help="SciFact queries, 10 pairs each (default 50)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; figures are medians (default 3)")
    parser.add_argument("--threads", type=int, default=usable_cpus())
    parser.add_argument("--models", nargs="+", default=["tiny", "MiniLM-L6"], choices=["tiny", "MiniLM-L6"])
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bge-onnx-rerank-"))
    pairs = scifact_pairs(args.queries)
    (work / "pairs.json").write_text(json.dumps({"scifact": pairs}), encoding="utf-8")
    folders = build_models(work, args.models)
    report = Report(name, "Rerankers: bge-onnx vs sentence-transformers' CrossEncoder", argv, models=folders)
    report.text(f"{args.threads} threads. {len(pairs)} SciFact (query, abstract) pairs, {args.queries} queries x 10. "
                f"{args.rounds} interleaved rounds: pairs/s are medians, ratios are taken within each round, then their "
                "median. Parity: raw scores (logits) against the CrossEncoder "
                "on torch.")
    report.data = {"pairs": len(pairs), "threads": args.threads, "models": {}}
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
        for contestant, (python, spec_) in table.items():
            log(f"{model}: starting {contestant}")
            workers[contestant] = Worker(python, {**spec_, "corpora": str(work / "pairs.json")})
        scores = {}
        for i, (contestant, worker) in enumerate(workers.items()):  # warm-up, and the scores for parity
            path = work / f"{model}-{i}.npy"
            worker.ask(f"save\tscifact\t{path}")
            scores[contestant] = np.load(path).reshape(-1)
        runs = {c: (lambda w=w: float(w.ask("run\tscifact"))) for c, w in workers.items()}
        seconds_by_round = interleave(runs, rounds=args.rounds, warm=False)
        median = medians(seconds_by_round)
        for worker in workers.values():
            worker.close()
        reference = scores["CrossEncoder, torch"]
        gate = "within" if int8.get("passed") else "BELOW"
        report.text(f"## {model} (max length {spec.max_length}; int8 recipe {int8.get('recipe')}, {gate} its gate: "
                    f"Spearman {int8.get('score_spearman', float('nan')):.4f} to fp32 on the gate pairs)")
        rows, figures = [], []
        for contestant, seconds in median.items():
            ours = scores[contestant]
            # the ratio within each round, then the median over rounds
            vs_torch = paired(seconds_by_round["CrossEncoder, torch"], seconds_by_round[contestant])
            figures.append({"contestant": contestant, "seconds": seconds_by_round[contestant], "vs_torch": vs_torch,
                            "max_abs_diff": float(np.abs(ours - reference).max()),
                            "spearman": spearman(reference, ours)})
            rows.append([contestant, f"{len(pairs) / seconds:.1f}", f"{vs_torch:.2f}x",
                         f"{np.abs(ours - reference).max():.2e}", f"{spearman(reference, ours):.5f}"])
        report.table(["contestant", "pairs/s", "vs CrossEncoder torch", "max abs score difference",
                      "Spearman to torch"], rows)
        report.data["models"][model] = figures
    report.write()
