"""A reranker on a CUDA GPU: fp16 and fp32 scores against sentence-transformers' CrossEncoder on torch (fp32, CPU),
and throughput against the CrossEncoder on the same GPU (fp32 and fp16), interleaved (A B C ... A B C, medians).

The stand-in model is rerank.py's: all-MiniLM-L6-v2's encoder under a seeded one-unit head, the shape of
cross-encoder/ms-marco-MiniLM-L-6-v2 (its scores mean nothing; parity and speed do), exported on the machine that
runs this, with fp16 (its gate then runs on CUDA). Pairs: rerank.py's SciFact pairs.

Usage: python benchmarks/gpu_rerank.py ST_FOLDER [--pairs pairs.json] [--reps 3] > results/gpu-rerank-minilm.md
--pairs: the pairs as JSON, for machines without ../shared/data; written by --write-pairs.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("st_folder", type=Path)
    parser.add_argument("--pairs", type=Path)
    parser.add_argument("--write-pairs", type=Path, help="write the pairs to this JSON file and stop")
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", default="cuda", help="cuda; cpu only to try the script out (default cuda)")
    args = parser.parse_args()
    if args.write_pairs or not args.pairs:
        from rerank import scifact_pairs

        pairs = scifact_pairs(args.queries)
        if args.write_pairs:
            args.write_pairs.write_text(json.dumps(pairs, ensure_ascii=False))
            return
    else:
        pairs = json.loads(args.pairs.read_text())
    pairs = [tuple(p) for p in pairs]

    import torch
    from sentence_transformers import CrossEncoder
    from transformers import AutoTokenizer, BertForSequenceClassification

    from bge_onnx import Reranker
    from bge_onnx_export import export_model
    from gpu import rates

    device = args.device
    work = Path(tempfile.mkdtemp(prefix="bge-onnx-gpu-rerank-"))
    checkpoint = work / "minilm-l6-cross-encoder"
    torch.manual_seed(0)
    BertForSequenceClassification.from_pretrained(args.st_folder, num_labels=1).eval().save_pretrained(checkpoint)
    AutoTokenizer.from_pretrained(args.st_folder).save_pretrained(checkpoint)
    folder = work / "onnx"
    spec = export_model(checkpoint, folder, precisions=("fp32", "fp16"), log=log)
    gate = spec.variants["fp16"].parity

    identity = torch.nn.Identity()  # raw logits, as bge-onnx's compute_score returns them
    reference_model = CrossEncoder(str(checkpoint), device="cpu", max_length=spec.max_length)
    ce32 = CrossEncoder(str(checkpoint), device=device, max_length=spec.max_length)
    ce16 = CrossEncoder(str(checkpoint), device=device, max_length=spec.max_length)
    ce16.model.half()
    ours16 = Reranker(folder, device=device, precision="fp16")
    ours32 = Reranker(folder, device=device, precision="fp32")
    contestants = {
        "bge-onnx fp16": lambda p: ours16.compute_score(p),
        "bge-onnx fp32": lambda p: ours32.compute_score(p),
        "CrossEncoder torch fp16": lambda p: ce16.predict(p, batch_size=32, activation_fn=identity),
        "CrossEncoder torch fp32": lambda p: ce32.predict(p, batch_size=32, activation_fn=identity),
    }
    encodings, _ = ours32._model.tokenizer.encode_pairs(pairs, query_max_length=ours32.query_max_length)
    lengths = [len(e) for e in encodings]
    where = torch.cuda.get_device_name(0) if device == "cuda" else "CPU"
    print(f"# A reranker on CUDA: MiniLM-L6 cross-encoder stand-in on {where}\n")
    print(f"Command: `python benchmarks/gpu_rerank.py {' '.join(sys.argv[1:])}`; {time.strftime('%Y-%m-%d')}; "
          f"{len(pairs)} SciFact pairs, {sum(lengths)} tokens (mean {np.mean(lengths):.0f}, max length "
          f"{spec.max_length}); providers {ours16.providers}. Export's fp16 gate on {gate['device']}: score Spearman "
          f"{gate['score_spearman']:.6f}, max abs diff {gate['max_abs_diff']:.2e} to fp32 on the gate pairs.\n")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # long pairs are truncated on purpose
        reference = reference_model.predict(pairs, batch_size=32, activation_fn=identity)
        print("## Scores against the CrossEncoder on torch (fp32, CPU)\n")
        print("| contestant | max abs diff | Spearman | same top-1 per query |")
        print("|---|---|---|---|")
        for name, run in contestants.items():
            scores = np.asarray(run(pairs), dtype=np.float64)
            top = np.mean([np.argmax(scores[i:i + 10]) == np.argmax(reference[i:i + 10])
                           for i in range(0, len(pairs), 10)])
            print(f"| {name} | {np.abs(scores - reference).max():.2e} | {spearman(scores, reference):.6f} | "
                  f"{top:.0%} |")
        print()

        rate = rates(contestants, pairs, args.reps, warm=64)
    print(f"## Throughput (pairs/s, median of {args.reps}; ratio to the CrossEncoder at the same precision)\n")
    print("| " + " | ".join(rate) + " |")
    print("|" + "---|" * len(rate))
    base = {p: rate[f"CrossEncoder torch {p}"] for p in ("fp16", "fp32")}
    print("| " + " | ".join(f"{r:.0f} ({r / base[n.split()[-1]]:.2f}x)" for n, r in rate.items()) + " |")


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra = np.argsort(np.argsort(a)).astype(np.float64)
    rb = np.argsort(np.argsort(b)).astype(np.float64)
    return float(np.corrcoef(ra, rb)[0, 1])


if __name__ == "__main__":
    main()
