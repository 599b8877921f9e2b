"""A reranker on a CUDA GPU: fp16 and fp32 scores against sentence-transformers' CrossEncoder on torch (fp32, CPU),
and throughput against the CrossEncoder on the same GPU (fp32 and fp16), interleaved (A B C ... A B C, medians).

The stand-in model is rerank.py's: all-MiniLM-L6-v2's encoder under a seeded one-unit head, the shape of
cross-encoder/ms-marco-MiniLM-L-6-v2 (its scores mean nothing; parity and speed do), exported on the machine that
runs this, with fp16 (its gate then runs on CUDA). Pairs: rerank.py's SciFact pairs.

ST_FOLDER: the packaged all-MiniLM-L6-v2 (or any BERT checkpoint). --pairs: the pairs as JSON, for a GPU machine
without the evaluation data; written by --write-pairs. --device cpu --queries 5 tries the script out without a GPU.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import warnings
from pathlib import Path

import numpy as np

from .gpu import rates
from .harness import RESULTS, TRYOUTS, Report, log


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra = np.argsort(np.argsort(a)).astype(np.float64)
    rb = np.argsort(np.argsort(b)).astype(np.float64)
    return float(np.corrcoef(ra, rb)[0, 1])


def main(argv: list[str], *, name: str = "gpu-rerank") -> None:
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks {name}", description=__doc__.splitlines()[0])
    parser.add_argument("st_folder", type=Path, metavar="ST_FOLDER")
    parser.add_argument("--pairs", type=Path, help="the pairs as JSON (see --write-pairs)")
    parser.add_argument("--write-pairs", type=Path, help="write the pairs to this JSON file and stop")
    parser.add_argument("--queries", type=int, default=50, help="SciFact queries, 10 pairs each (default 50)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; figures are medians (default 3)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu only to try the script out")
    args = parser.parse_args(argv)
    if args.write_pairs or not args.pairs:
        from .rerank import scifact_pairs

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
    from bge_onnx.tokenize import TextTokenizer
    from bge_onnx_export import export_model

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
        "bge-onnx fp16": ours16.compute_score,
        "bge-onnx fp32": ours32.compute_score,
        "CrossEncoder torch fp16": lambda p: ce16.predict(p, batch_size=32, activation_fn=identity),
        "CrossEncoder torch fp32": lambda p: ce32.predict(p, batch_size=32, activation_fn=identity),
    }
    tokenizer = TextTokenizer(folder, max_length=ours32.max_length)
    lengths = [len(e) for e in tokenizer.encode_pairs(pairs, query_max_length=ours32.query_max_length)[0]]
    where = torch.cuda.get_device_name(0) if device == "cuda" else "the CPU (a try-out, not a GPU result)"
    report = Report(name, f"A reranker on CUDA: MiniLM-L6 cross-encoder stand-in on {where}", argv,
                    models={"reranker": folder})
    report.text(f"{len(pairs)} SciFact pairs, {sum(lengths)} tokens (mean {np.mean(lengths):.0f}, max length "
                f"{spec.max_length}); providers {ours16.providers}. Export's fp16 gate on {gate['device']}: score "
                f"Spearman {gate['score_spearman']:.6f}, max abs diff {gate['max_abs_diff']:.2e} to fp32 on the gate pairs.")
    rows, parity = [], {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # long pairs are truncated on purpose
        reference = reference_model.predict(pairs, batch_size=32, activation_fn=identity)
        for contestant, run in contestants.items():
            scores = np.asarray(run(pairs), dtype=np.float64)
            top = np.mean([np.argmax(scores[i:i + 10]) == np.argmax(reference[i:i + 10])
                           for i in range(0, len(pairs), 10)])
            parity[contestant] = {"max_abs_diff": float(np.abs(scores - reference).max()),
                                  "spearman": spearman(scores, reference), "same_top1": float(top)}
            rows.append([contestant, f"{np.abs(scores - reference).max():.2e}", f"{spearman(scores, reference):.6f}",
                         f"{top:.0%}"])
        rate = rates(contestants, pairs, args.rounds, warm=64)
    report.text("## Scores against the CrossEncoder on torch (fp32, CPU)")
    report.table(["contestant", "max abs diff", "Spearman", "same top-1 per query"], rows)
    base = {p: rate[f"CrossEncoder torch {p}"] for p in ("fp16", "fp32")}
    report.text(f"## Throughput (pairs/s, median of {args.rounds}; ratio to the CrossEncoder at the same precision)")
    report.table(list(rate), [[f"{r:.0f} ({r / base[n.split()[-1]]:.2f}x)" for n, r in rate.items()]])
    report.data = {"parity": parity, "pairs_per_second": rate}
    report.write(RESULTS if device == "cuda" else TRYOUTS)
