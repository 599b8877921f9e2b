"""bge-onnx on a CUDA GPU: does the CUDA provider start, fp16 and fp32 parity with the PyTorch model, and throughput
against sentence-transformers on the same GPU (torch fp32 and fp16), interleaved; and which max_tokens pays there.

ST_FOLDER: the sentence-transformers model (the reference). MODEL: its bge-onnx export with an fp16 variant.
--texts: the corpora as JSON ({"name": [texts]}), for a GPU machine without the evaluation data; written by
--write-texts on a machine that has it. --device cpu --limit 200 tries the script out on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort

from bge_onnx import Embedder

from .harness import RESULTS, TRYOUTS, Report, interleave, log, medians

CUDA = "CUDAExecutionProvider"


def fresh_process(code: str) -> str:
    """Run code in a new interpreter (nothing imported yet); its last output line, or its error."""
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300)
    lines = (done.stdout.strip() or done.stderr.strip() or "(no output)").splitlines()
    return lines[-1] if done.returncode == 0 else f"exit {done.returncode}: {lines[-1]}"


def provider_checks(model: Path) -> list[str]:
    fp16 = model / "model_fp16.onnx"
    raw = (f"import onnxruntime as ort; s = ort.InferenceSession({str(fp16)!r}, providers=[{CUDA!r}]); "
           "print(s.get_providers())")
    ours = ("import time; t = time.perf_counter(); import bge_onnx; "
            f"e = bge_onnx.Embedder({str(model)!r}, device='cuda'); e.encode('hello'); "
            "print(e.providers, e.precision.value, f'{time.perf_counter() - t:.2f} s to import, load and embed one text')")
    return [
        f"- onnxruntime alone (no torch imported, no preload), CUDA asked for: `{fresh_process(raw)}`",
        f"- bge-onnx `Embedder(device='cuda')` in a fresh process: `{fresh_process(ours)}`",
    ]


def cosines(reference: np.ndarray, ours: np.ndarray) -> tuple[float, float]:
    ours = np.asarray(ours, dtype=np.float32)
    ours = ours / np.linalg.norm(ours, axis=1, keepdims=True)
    c = (reference * ours).sum(axis=1)
    return float(c.min()), float(c.mean())


def rates(runs: dict, items: list, rounds: int, warm: int = 256) -> dict:
    """Items per second of each run over items, interleaved, medians; each warmed on ``warm`` items first."""
    for run in runs.values():
        run(items[:warm])  # CUDA kernels, memory arenas
    def once(run) -> None:  # timed by interleave (the run's own return value is not seconds)
        run(items)

    seconds = medians(interleave({n: (lambda r=r: once(r)) for n, r in runs.items()}, rounds=rounds, warm=False))
    return {name: len(items) / s for name, s in seconds.items()}


def main(argv: list[str], *, name: str = "gpu") -> None:
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks {name}", description=__doc__.splitlines()[0])
    parser.add_argument("st_folder", type=Path, metavar="ST_FOLDER")
    parser.add_argument("model", type=Path, metavar="MODEL")
    parser.add_argument("--texts", type=Path, help="the corpora as JSON (see --write-texts)")
    parser.add_argument("--write-texts", type=Path, help="write the corpora to this JSON file and stop")
    parser.add_argument("--repeat", type=int, default=4, help="each corpus repeated this many times (default 4)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; figures are medians (default 3)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu only to try the script out")
    parser.add_argument("--limit", type=int, help="at most this many texts per corpus (to try the script out)")
    args = parser.parse_args(argv)
    if args.write_texts or not args.texts:
        from .corpora import corpora

        texts = corpora(1000)
        if args.write_texts:
            args.write_texts.write_text(json.dumps(texts, ensure_ascii=False))
            return
    else:
        texts = json.loads(args.texts.read_text())
    texts = {k: (items * args.repeat)[: args.limit] for k, items in texts.items() if k != "sentences"}
    device = args.device

    import torch
    from sentence_transformers import SentenceTransformer

    where = torch.cuda.get_device_name(0) if device == "cuda" else "the CPU (a try-out, not a GPU result)"
    report = Report(name, f"bge-onnx on CUDA: {args.st_folder.name} on {where}", argv, models={"MODEL": args.model})
    report.text(f"onnxruntime providers {', '.join(ort.get_available_providers())}; corpora of "
                f"{', '.join(f'{len(v)} {k}' for k, v in texts.items())}.")
    if device == "cuda":
        report.text("## Starting the CUDA provider", *provider_checks(args.model))

    log("loading models")
    st32 = SentenceTransformer(str(args.st_folder), device=device)
    st16 = SentenceTransformer(str(args.st_folder), device=device).half()
    reference_model = SentenceTransformer(str(args.st_folder), device="cpu")
    ours16 = Embedder(args.model, device=device, precision="fp16")
    ours32 = Embedder(args.model, device=device, precision="fp32")
    ours_cpu = Embedder(args.model, device="cpu", precision="fp32")
    if device == "cuda" and CUDA not in ours16.providers:
        raise SystemExit(f"CUDA did not start: providers {ours16.providers}")
    auto = Embedder(args.model)
    report.text(f"`Embedder(model)` with defaults on this machine: providers {auto.providers}, precision "
                f"{auto.precision.value}, max_tokens {auto.max_tokens}.")

    contestants = {"bge-onnx fp16": ours16.encode, "bge-onnx fp32": ours32.encode}
    for batch in (32, 128):  # 32 is sentence-transformers' default
        contestants[f"ST torch fp16, batch {batch}"] = lambda t, b=batch: st16.encode(t, batch_size=b, normalize_embeddings=True)
        contestants[f"ST torch fp32, batch {batch}"] = lambda t, b=batch: st32.encode(t, batch_size=b, normalize_embeddings=True)

    from bge_onnx_export.probes import GATE_TEXTS

    odd = ["", " ", "a", "word " * 600, "🙂" * 300, "\n\t", "机器学习" * 200, "x" * 5000]
    parity_texts = {"probe + odd texts": list(GATE_TEXTS) + odd, "mixed corpus": sorted(set(texts["mixed"]))}
    parity_rows, parity = [], {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # truncation of the long texts, on purpose
        references = {k: reference_model.encode(v, batch_size=32, normalize_embeddings=True) for k, v in parity_texts.items()}
        for contestant, run in {"bge-onnx fp32 (CPU)": ours_cpu.encode, **contestants}.items():
            cells = [cosines(references[k], run(v)) for k, v in parity_texts.items()]
            parity[contestant] = cells
            parity_rows.append([contestant, *(f"{lo:.5f} / {mean:.5f}" for lo, mean in cells)])
    report.text("## Parity with the PyTorch model (sentence-transformers fp32, on the CPU)")
    report.table(["contestant", *(f"{k}: min / mean cosine" for k in parity_texts)], parity_rows)

    names = list(contestants)
    throughput_rows, throughput = [], {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for corpus, items in texts.items():
            log(f"timing {corpus}")
            rate = rates(contestants, items, args.rounds)
            throughput[corpus] = rate
            best = {p: max(r for n, r in rate.items() if n.startswith("ST") and p in n) for p in ("fp16", "fp32")}
            throughput_rows.append([corpus, *(f"{rate[n]:.0f} ({rate[n] / best['fp16' if 'fp16' in n else 'fp32']:.2f}x)"
                                              for n in names)])
    report.text(f"## Throughput (texts/s, median of {args.rounds}, interleaved)",
                "In brackets: the ratio to the fastest sentence-transformers contestant at the same precision. ST is "
                "sentence-transformers on torch, on the same device.")
    report.table(["corpus", *names], throughput_rows)

    budgets = [4096, 8192, 16384, 65536]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        models = {b: Embedder(args.model, device=device, precision="fp16", max_tokens=b, batch_size=4096).encode
                  for b in budgets}
        budget_rate = rates(models, texts["mixed"], args.rounds)
    report.text("## max_tokens (padded tokens per batch) for fp16, mixed corpus, texts/s")
    report.table(["max_tokens", *map(str, budgets)], [["texts/s", *(f"{budget_rate[b]:.0f}" for b in budgets)]])
    report.data = {"parity": parity, "throughput": throughput, "max_tokens": budget_rate}
    report.write(RESULTS if device == "cuda" else TRYOUTS)
