"""bge-onnx against the tools users would pick instead, side by side in one run, at the same precision.

Contestants, each in its own process, all on the same model (all-MiniLM-L6-v2), texts and thread count:
sentence-transformers on torch (the reference vectors); sentence-transformers' ONNX backend with its fp32,
O3-optimised and dynamic int8 (avx512_vnni preset) graphs; fastembed and optimum's ORTModelForFeatureExtraction
running bge-onnx's own fp32 / int8 graphs (same files), fastembed's tokenizer set to the model's real 256 tokens;
bge-onnx fp32 and int8. A numpy float32 GEMM of the FFN's shape, with OPENBLAS_* unset in its process, gives the
roofline ratio (model FLOP/s over the hardware's GEMM FLOP/s, measured in the same rounds).

`compare` runs four corpora (short queries, sentences, passages, mixed); `by-length` runs SciFact passages cut to
fixed token lengths instead, and draws benchmarks/results/by-length.png (matplotlib).

The anchors need transformers 4 and optimum, which clash with the export extra's transformers 5: they run in their
own environment (--anchors-python); benchmarks/README.md shows how to make it and the sentence-transformers folder.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from bge_onnx.session import usable_cpus
from bge_onnx.spec import read_spec
from bge_onnx.tokenize import TextTokenizer

from .corpora import corpora, scifact_passages
from .harness import RESULTS, Gemm, Report, interleave, log, medians

HERE = Path(__file__).resolve().parent
TORCH = "sentence-transformers, torch"


class Worker:
    """One contestant in its own process (benchmarks/contestants.py), driven line by line over stdin/stdout."""

    def __init__(self, python: str, spec: dict) -> None:
        self.process = subprocess.Popen(
            [python, str(HERE / "contestants.py"), json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=HERE,
        )
        line = self.process.stdout.readline().strip()
        if line != "ready":
            raise RuntimeError(f"contestant {spec['kind']} failed to start ({line!r}); see its stderr above")

    def ask(self, command: str) -> str:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        answer = self.process.stdout.readline().strip()
        if not answer:
            raise RuntimeError(f"contestant died on {command!r}")
        return answer

    def close(self) -> None:
        self.process.stdin.write("quit\n")
        self.process.stdin.close()
        self.process.wait()


def contestants(args: argparse.Namespace) -> dict[str, tuple[str, str, dict]]:
    """name -> (precision, python, spec)."""
    own, anchors, t = sys.executable, args.anchors_python, args.threads
    st, model = str(args.st_folder), str(args.model)
    # the per-batch int8 of exports before issue 20, while folders holding it exist
    old = {"bge-onnx int8, per-batch (earlier exports)": ("int8", own, dict(
        kind="bge_onnx", folder=str(args.old_int8), precision="int8", threads=t))} if args.old_int8 else {}
    return {
        TORCH: ("fp32", anchors, dict(kind="sentence_transformers", folder=st, backend="torch", file_name=None, threads=t)),
        "sentence-transformers, onnx": ("fp32", anchors, dict(kind="sentence_transformers", folder=st, backend="onnx", file_name="onnx/model.onnx", threads=t)),
        "sentence-transformers, onnx O3": ("fp32", anchors, dict(kind="sentence_transformers", folder=st, backend="onnx", file_name="onnx/model_O3.onnx", threads=t)),
        "fastembed (bge-onnx's fp32 graph)": ("fp32", anchors, dict(kind="fastembed", folder=model, model_file="model.onnx", max_length=256, threads=t)),
        "optimum ORTModelForFeatureExtraction": ("fp32", anchors, dict(kind="optimum", folder=st, file_name="onnx/model.onnx", max_length=256, threads=t)),
        "bge-onnx fp32": ("fp32", own, dict(kind="bge_onnx", folder=model, precision="fp32", threads=t)),
        "sentence-transformers, onnx int8 (avx512_vnni)": ("int8", anchors, dict(kind="sentence_transformers", folder=st, backend="onnx", file_name="onnx/model_qint8_avx512_vnni.onnx", threads=t)),
        "fastembed (bge-onnx's int8 graph)": ("int8", anchors, dict(kind="fastembed", folder=model, model_file="model_int8.onnx", max_length=256, threads=t)),
        **old,
        "bge-onnx int8": ("int8", own, dict(kind="bge_onnx", folder=model, precision="int8", threads=t)),
    }


def paired(base: list[float], seconds: list[float]) -> float:
    """The median over rounds of base / seconds, each round's pair measured minutes apart at most."""
    return statistics.median(b / s for b, s in zip(base, seconds))


def model_flops(folder: Path, lengths: list[int]) -> float:
    """Multiply-adds x 2 of the encoder layers for texts of these token lengths (embeddings and pooling left out)."""
    config = json.loads((folder / "config.json").read_text())
    h, i, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    return sum(2 * layers * (t * (4 * h * h + 2 * h * i) + 2 * t * t * h) for t in lengths)


def cut_to_lengths(folder: Path, passages: list[str], lengths: list[int], n: int) -> dict[str, list[str]]:
    """n passages of at least max(lengths) tokens, each cut to about N tokens (its first N - 2 pieces, decoded)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.no_truncation()
    long_enough = [e.ids for e in tokenizer.encode_batch(passages) if len(e.ids) >= max(lengths)][:n]
    return {f"{n} tokens": tokenizer.decode_batch([ids[1 : n - 1] for ids in long_enough]) for n in lengths}


def main(argv: list[str], *, name: str = "compare") -> None:
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks {name}", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="bge-onnx folder with fp32 and int8 variants")
    parser.add_argument("--st-folder", type=Path, required=True, help="sentence-transformers folder with onnx/ graphs")
    parser.add_argument("--anchors-python", required=True, help="the Python of the anchors' environment")
    parser.add_argument("--old-int8", type=Path, metavar="FOLDER",
                        help="a folder whose int8 graph is the per-batch int8 of earlier exports: one more contestant")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; figures are medians (default 3)")
    parser.add_argument("--texts", type=int, default=200, help="texts per corpus (default 200)")
    parser.add_argument("--threads", type=int, default=usable_cpus())
    parser.add_argument("--lengths", type=int, nargs="+", default=[16, 32, 64, 128, 256], metavar="TOKENS",
                        help="by-length: the token lengths (default 16 32 64 128 256)")
    args = parser.parse_args(argv)

    if name == "by-length":
        texts = cut_to_lengths(args.model, scifact_passages(), args.lengths, args.texts)
        title = "bge-onnx vs the alternatives by text length: all-MiniLM-L6-v2 on CPU"
    else:
        texts = corpora(args.texts)
        title = "bge-onnx vs the alternatives: all-MiniLM-L6-v2 on CPU"
    report = Report(name, title, argv, models={"MODEL": args.model, **({"OLD": args.old_int8} if args.old_int8 else {})})
    tokenizer = TextTokenizer(args.model, max_length=read_spec(args.model).max_length)
    lengths = {corpus: [len(e) for e in tokenizer.encode_texts(items)[0]] for corpus, items in texts.items()}
    work = Path(tempfile.mkdtemp(prefix="bge-onnx-compare-"))
    (work / "corpora.json").write_text(json.dumps(texts), encoding="utf-8")
    table = contestants(args)
    workers = {}
    for contestant, (_, python, spec) in table.items():
        log(f"starting {contestant}")
        workers[contestant] = Worker(python, {**spec, "corpora": str(work / "corpora.json")})
    gemm = Gemm(threads=args.threads)
    report.text(
        f"{args.threads} threads. {args.rounds} interleaved rounds; texts/s are medians; ratios are taken within each "
        "round, then their median: to sentence-transformers on torch, and to the fastest other contestant of the "
        "same precision. Roofline: the model's FLOP/s over a numpy float32 "
        f"{'x'.join(map(str, gemm.shape))} GEMM's, measured right after each timing with OPENBLAS_* unset "
        f"(kernel: {', '.join(str(k.get('architecture') or k.get('internal_api')) for k in gemm.kernel)}). "
        "Cosines are to sentence-transformers on torch's vectors."
    )
    report.data = {"threads": args.threads, "rounds": args.rounds, "gemm_kernel": gemm.kernel, "corpora": []}
    for corpus, items in texts.items():
        log(f"{corpus}: {len(items)} texts")
        paths = {c: work / f"{i}-{abs(hash(corpus))}.npy" for i, c in enumerate(workers)}
        for contestant, worker in workers.items():  # warm-up, and the vectors for the cosine columns
            worker.ask(f"save\t{corpus}\t{paths[contestant]}")
        reference = np.load(paths[TORCH])
        # each timing is followed by a GEMM, so that each has the hardware's rate of its own moment beside it
        gemm_rates: dict[str, list[float]] = {c: [] for c in workers}

        def timed(contestant: str, worker: Worker) -> float:
            seconds = float(worker.ask(f"run\t{corpus}"))
            gemm_rates[contestant].append(gemm.rate())
            return seconds

        seconds = interleave({c: (lambda c=c, w=w: timed(c, w)) for c, w in workers.items()},
                             rounds=args.rounds, warm=False)
        median = medians(seconds)
        flops, tokens = model_flops(args.model, lengths[corpus]), sum(lengths[corpus])
        rows, figures = [], []
        for contestant, times in seconds.items():
            precision = table[contestant][0]
            # ratios per round (contestants of one round ran minutes apart at most), then their median
            vs_torch = paired(seconds[TORCH], times)
            others = [o for o in seconds
                      if o != contestant and table[o][0] == precision and not o.startswith("bge-onnx")]
            best_other = None
            if others and contestant.startswith("bge-onnx"):
                best_other = paired([min(seconds[o][r] for o in others) for r in range(args.rounds)], times)
            roofline = statistics.median(flops / t / g for t, g in zip(times, gemm_rates[contestant]))
            vectors = np.load(paths[contestant])
            cos = (vectors * reference).sum(axis=1) / np.linalg.norm(vectors, axis=1) / np.linalg.norm(reference, axis=1)
            figures.append({"contestant": contestant, "precision": precision, "seconds": times,
                            "gemm_flops": gemm_rates[contestant], "vs_torch": vs_torch, "vs_best_other": best_other,
                            "roofline": roofline, "min_cosine": float(cos.min()), "mean_cosine": float(cos.mean())})
            rows.append([contestant, precision, f"{len(items) / median[contestant]:.1f}",
                         f"{tokens / median[contestant]:.0f}", f"{vs_torch:.2f}x",
                         f"{best_other:.2f}x" if best_other else "", f"{roofline * 100:.0f}%",
                         f"{cos.min():.5f} / {cos.mean():.6f}"])
        peak = statistics.median(g for rates in gemm_rates.values() for g in rates)
        report.text(f"## {corpus}: {len(items)} texts, {tokens} tokens (mean {tokens / len(items):.0f}); "
                    f"GEMM median {peak / 1e9:.0f} GFLOP/s")
        report.table(["contestant", "precision", "texts/s", "tokens/s", "vs torch", "vs best other, same precision",
                      "roofline", "min / mean cosine to torch"], rows)
        report.data["corpora"].append({"corpus": corpus, "texts": len(items), "tokens": tokens,
                                       "gemm_flops": peak, "model_flops": flops, "contestants": figures})
    for worker in [*workers.values()]:
        worker.close()
    gemm.close()
    if name == "by-length":
        report.text(f"![throughput by text length]({plot(report.data['corpora'], RESULTS / 'by-length.png')})")
    report.write()


def plot(corpora_figures: list[dict], out: Path) -> str:
    """Tokens/s and speed against torch by text length, one line per contestant; returns the file's name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[float, float, float]]] = {}
    for corpus in corpora_figures:
        for c in corpus["contestants"]:
            series.setdefault(c["contestant"], []).append(
                (corpus["tokens"] / corpus["texts"], corpus["tokens"] / statistics.median(c["seconds"]), c["vs_torch"]))
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    for contestant, points in series.items():
        style, width = ("-", 2.5) if contestant.startswith("bge-onnx") else ("--", 1.2)
        length, rate, ratio = zip(*sorted(points))
        left.plot(length, rate, style, marker="o", linewidth=width, label=contestant)
        right.plot(length, ratio, style, marker="o", linewidth=width, label=contestant)
    for axis, title in ((left, "tokens/s"), (right, "speed vs sentence-transformers on torch (x)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("tokens per text")
        axis.set_title(title)
        axis.grid(True, alpha=0.3)
    right.legend(fontsize=8)
    fig.suptitle("all-MiniLM-L6-v2 on CPU, by text length (python -m benchmarks by-length; medians, interleaved)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out.name
