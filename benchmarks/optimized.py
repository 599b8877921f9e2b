"""bge-onnx optimize's folders against the official ONNX graph run as it is, side by side in one run, CPU.

The source is a folder in the official layout (onnx/model.onnx beside tokenizer and configs, as the BAAI repos and
sentence-transformers publish it). The script converts it with `bge-onnx optimize --precision fp32 int8` (torch is
not used), then times, each in its own process on the same texts and threads: the official graph run as it is by
bge-onnx (token states pooled in numpy), the same graph through sentence-transformers' ONNX backend when an anchors
Python is given, and the optimised fp32 and int8 folders. Ratios are per round, then their median.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bge_onnx.session import usable_cpus

from .compare import Worker, paired
from .corpora import corpora
from .harness import TRYOUTS, Report, interleave, log, medians

OFFICIAL = "official graph as is (bge-onnx runtime)"


def main(argv: list[str], *, name: str = "optimized") -> None:
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks {name}", description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, required=True, help="folder with onnx/model.onnx (official layout)")
    parser.add_argument("--anchors-python", help="the anchors' Python, for sentence-transformers' ONNX backend")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--texts", type=int, default=200, help="texts per corpus (default 200)")
    parser.add_argument("--threads", type=int, default=usable_cpus())
    parser.add_argument("--corpora", nargs="+", default=["sentences", "passages", "mixed"], metavar="NAME")
    args = parser.parse_args(argv)

    from bge_onnx_export.optimize import optimize_model

    out = TRYOUTS / f"optimized-{args.source.name}"
    start = time.perf_counter()
    optimize_model(args.source, out, precisions=["fp32", "int8"], overwrite=True, log=log)
    took = time.perf_counter() - start
    report = Report(name, f"bge-onnx optimize against the official graph run as it is: {args.source.name}, CPU",
                    argv, models={"OPTIMIZED": out})
    spec = json.loads((out / "bge_onnx.json").read_text())
    texts = {c: items for c, items in corpora(args.texts).items() if c in args.corpora}
    work = Path(tempfile.mkdtemp(prefix="bge-onnx-optimized-"))
    (work / "corpora.json").write_text(json.dumps(texts), encoding="utf-8")
    table = {
        OFFICIAL: dict(kind="bge_onnx", folder=str(args.source), precision="fp32", threads=args.threads),
        "optimised fp32": dict(kind="bge_onnx", folder=str(out), precision="fp32", threads=args.threads),
        "optimised int8": dict(kind="bge_onnx", folder=str(out), precision="int8", threads=args.threads),
    }
    pythons = {c: None for c in table}
    if args.anchors_python:
        table["official graph, sentence-transformers onnx backend"] = dict(
            kind="sentence_transformers", folder=str(args.source), backend="onnx", file_name="onnx/model.onnx",
            threads=args.threads)
        pythons["official graph, sentence-transformers onnx backend"] = args.anchors_python
    workers = {}
    for contestant, worker_spec in table.items():
        log(f"starting {contestant}")
        workers[contestant] = Worker(pythons.get(contestant) or sys.executable,
                                     {**worker_spec, "corpora": str(work / "corpora.json")})
    fp32 = spec["variants"]["fp32"]["parity"]
    int8 = spec["variants"].get("int8", {}).get("parity", {})
    report.text(
        f"Converted in {took:.1f} s without torch: fused "
        + ", ".join(f"{n} {op}" for op, n in fp32.get("fused_ops", {}).items())
        + f"; the last layer cut to the first token: {fp32.get('last_layer_first_token_only')}; fp32 against the "
        f"source graph on the probe set: min cosine {fp32.get('min_cosine', float('nan')):.7f}; int8 recipe "
        f"{int8.get('recipe')}, gate passed: {int8.get('passed')}.",
        f"{args.threads} threads, {args.rounds} interleaved rounds; texts/s are medians; ratios to the official graph "
        "run as it is are taken within each round, then their median. Cosines are to that graph's vectors.",
    )
    report.data = {"threads": args.threads, "rounds": args.rounds, "convert_seconds": took, "corpora": []}
    rows = []
    for corpus, items in texts.items():
        log(f"{corpus}: {len(items)} texts")
        paths = {c: work / f"{i}-{corpus}.npy" for i, c in enumerate(workers)}
        for contestant, worker in workers.items():  # warm-up, and the vectors for the cosine column
            worker.ask(f"save\t{corpus}\t{paths[contestant]}")
        reference = np.load(paths[OFFICIAL])
        seconds = interleave({c: (lambda w=w: float(w.ask(f"run\t{corpus}"))) for c, w in workers.items()},
                             rounds=args.rounds, warm=False)
        median = medians(seconds)
        figures = []
        for contestant, times in seconds.items():
            ratio = paired(seconds[OFFICIAL], times)
            vectors = np.load(paths[contestant])
            cos = (vectors * reference).sum(axis=1) / np.linalg.norm(vectors, axis=1) / np.linalg.norm(reference, axis=1)
            figures.append({"contestant": contestant, "seconds": times, "vs_official": ratio,
                            "min_cosine": float(cos.min()), "mean_cosine": float(cos.mean())})
            rows.append([corpus, contestant, f"{len(items) / median[contestant]:.1f}", f"{ratio:.2f}x",
                         f"{cos.min():.5f} / {cos.mean():.6f}"])
        report.data["corpora"].append({"corpus": corpus, "texts": len(items), "contestants": figures})
    report.table(["corpus", "contestant", "texts/s", "vs official graph as is", "min / mean cosine to it"], rows)
    for worker in workers.values():
        worker.close()
    report.write()
