"""bge-onnx on a CUDA GPU: does the CUDA provider start, fp16 and fp32 parity with the PyTorch model, and throughput
against sentence-transformers on the same GPU (torch fp32 and fp16), interleaved (A B C ... A B C, medians).

Also where the time goes in bge-onnx's CUDA path: tokenising, the graph with its output copied to the host (what
the runtime does), and the graph with its output left on the GPU (IO binding), and which max_tokens pays; and the
pooling in the graph against the same graphs without it (token states copied out and pooled in numpy, as exported
before 2026-11-27).

Usage: python benchmarks/gpu.py ST_FOLDER MODEL [--texts texts.json] [--repeat 4] [--reps 3] > results/gpu-minilm.md
ST_FOLDER: the sentence-transformers model (the reference). MODEL: its bge-onnx export with an fp16 variant.
--texts: the corpora as JSON ({"name": [texts]}), for machines without ../shared/data; written by --write-texts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from bge_onnx import Embedder, loading
from bge_onnx.spec import read_spec, sha256_file, write_spec

CUDA = "CUDAExecutionProvider"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("st_folder", type=Path)
    parser.add_argument("model", type=Path)
    parser.add_argument("--texts", type=Path)
    parser.add_argument("--write-texts", type=Path, help="write the corpora to this JSON file and stop")
    parser.add_argument("--repeat", type=int, default=4, help="each corpus repeated this many times (default 4)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", default="cuda", help="cuda; cpu only to try the script out (default cuda)")
    parser.add_argument("--limit", type=int, help="at most this many texts per corpus (to try the script out)")
    args = parser.parse_args()
    if args.write_texts:
        from corpora import corpora

        args.write_texts.write_text(json.dumps(corpora(1000), ensure_ascii=False))
        return
    if args.texts:
        texts = json.loads(args.texts.read_text())
    else:
        from corpora import corpora

        texts = corpora(1000)
    texts = {name: (items * args.repeat)[: args.limit] for name, items in texts.items() if name != "sentences"}
    device = args.device

    import torch
    from sentence_transformers import SentenceTransformer

    gpu = torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "CPU"
    print(f"# bge-onnx on CUDA: {args.st_folder.name} on {gpu}\n")
    print(f"Command: `python benchmarks/gpu.py {' '.join(sys.argv[1:])}`  ")
    print(f"onnxruntime {ort.__version__} ({', '.join(ort.get_available_providers())}), torch {torch.__version__}, "
          f"Python {platform.python_version()}; corpora of {', '.join(f'{len(v)} {k}' for k, v in texts.items())}.\n")

    print("## Starting the CUDA provider\n")
    if device == "cuda":
        print("\n".join(provider_checks(args.model)) + "\n")

    log("loading models")
    st32 = SentenceTransformer(str(args.st_folder), device=device)
    st16 = SentenceTransformer(str(args.st_folder), device=device).half()
    reference_model = SentenceTransformer(str(args.st_folder), device="cpu")
    ours16 = Embedder(args.model, device=device, precision="fp16")
    has_fp32 = (args.model / "model.onnx").is_file()  # a folder copied without it (to a machine with little room)
    ours32 = Embedder(args.model, device=device, precision="fp32") if has_fp32 else None
    ours_cpu = Embedder(args.model, device="cpu", precision="fp32") if has_fp32 else None
    assert device == "cpu" or CUDA in ours16.providers, ours16.providers
    try:
        auto = Embedder(args.model)
        print(f"`Embedder(model)` with defaults on this machine: providers {auto.providers}, precision "
              f"{auto.precision.value}, max_tokens {auto.max_tokens}.\n")
    except Exception as err:  # a folder copied without all its variants
        print(f"`Embedder(model)` with defaults: {type(err).__name__}: {err}\n")

    contestants = {
        "bge-onnx fp16": lambda t: ours16.encode(t),
        **({"bge-onnx fp32": lambda t: ours32.encode(t)} if has_fp32 else {}),
    }
    for batch in (32, 128):  # 32 is sentence-transformers' default
        contestants[f"ST torch fp16, batch {batch}"] = lambda t, b=batch: st16.encode(t, batch_size=b,
                                                                                     normalize_embeddings=True)
        contestants[f"ST torch fp32, batch {batch}"] = lambda t, b=batch: st32.encode(t, batch_size=b,
                                                                                     normalize_embeddings=True)

    print("## Parity with the PyTorch model (fp32, on the CPU)\n")
    from bge_onnx_export.probes import GATE_TEXTS

    odd = ["", " ", "a", "word " * 600, "🙂" * 300, "\n\t", "机器学习" * 200, "x" * 5000]
    parity_texts = {"probe + odd texts": list(GATE_TEXTS) + odd, "mixed corpus": sorted(set(texts["mixed"]))}
    print("| contestant | " + " | ".join(f"{k}: min / mean cosine" for k in parity_texts) + " |")
    print("|---|" + "---|" * len(parity_texts))
    references = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # truncation of the long texts, on purpose
        for name, items in parity_texts.items():
            references[name] = reference_model.encode(items, batch_size=32, normalize_embeddings=True)
        rows = {**({"bge-onnx fp32 (CPU)": lambda t: ours_cpu.encode(t)} if has_fp32 else {}), **contestants}
        for contestant, run in rows.items():
            cells = [cosines(references[k], run(v)) for k, v in parity_texts.items()]
            print(f"| {contestant} | " + " | ".join(f"{lo:.5f} / {mean:.5f}" for lo, mean in cells) + " |")
    print()

    print(f"## Throughput on {gpu} (texts/s, median of {args.reps}, interleaved)\n")
    print("In brackets: the ratio to the fastest sentence-transformers contestant at the same precision. ST is "
          "sentence-transformers on torch, CUDA.\n")
    names = list(contestants)
    print("| corpus | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for corpus, items in texts.items():
            log(f"timing {corpus}")
            rate = rates(contestants, items, args.reps)
            best = {p: max(r for n, r in rate.items() if n.startswith("ST") and p in n) for p in ("fp16", "fp32")}
            cells = [f"{rate[n]:.0f} ({rate[n] / best['fp16' if 'fp16' in n else 'fp32']:.2f}x)" for n in names]
            print(f"| {corpus} | " + " | ".join(cells) + " |")
    print()

    print("## max_tokens (padded tokens per batch) for fp16 on CUDA, mixed corpus, texts/s\n")
    items = texts["mixed"]
    budgets = [4096, 8192, 16384, 65536]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        models = {b: Embedder(args.model, device=device, precision="fp16", max_tokens=b, batch_size=4096)
                  for b in budgets}
        rate = rates({b: model.encode for b, model in models.items()}, items, args.reps)
    print("| max_tokens | " + " | ".join(str(b) for b in budgets) + " |")
    print("|---|" + "---|" * len(budgets))
    print("| texts/s | " + " | ".join(f"{rate[b]:.0f}" for b in budgets) + " |\n")

    print("## Where the time goes (fp16, mixed corpus, default batching; seconds, median)\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        print(breakdown(ours16, items, args.reps, device))

    print("## Tokenising a chunk ahead against tokenising all first (fp16, texts/s, interleaved)\n")
    print(f"Inputs of more than {loading.TOKENIZE_CHUNK} texts are tokenised in chunks of that size, the next "
          "chunk in a worker thread while the graph runs this one; 'all first' tokenises the whole input, then runs "
          "it (as before 2026-11-27).\n")

    def chunked(chunk: int):
        def run(t):
            loading.TOKENIZE_CHUNK = chunk
            try:
                return ours16.encode(t)
            finally:
                loading.TOKENIZE_CHUNK = default_chunk
        return run

    default_chunk = loading.TOKENIZE_CHUNK
    print("| corpus | a chunk ahead | all first | ahead / all first |")
    print("|---|---|---|---|")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for corpus, corpus_items in texts.items():
            rate = rates({"ahead": chunked(default_chunk), "all first": chunked(10**9)}, corpus_items, args.reps)
            print(f"| {corpus} | {rate['ahead']:.0f} | {rate['all first']:.0f} | "
                  f"{rate['ahead'] / rate['all first']:.2f}x |")
    print()

    print("## Pooling in the graph against pooling in numpy (mixed corpus, texts/s, interleaved)\n")
    print("The same graphs with their pooling nodes removed: token states copied to the host and pooled in numpy, "
          "as folders exported before 2026-11-27 still run.\n")
    old = unpooled_copy(args.model, Path(tempfile.mkdtemp()) / "unpooled")
    precisions = ["fp16", "fp32"] if has_fp32 else ["fp16"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runs = {}
        for p in precisions:
            runs[f"in the graph, {p}"] = Embedder(args.model, device=device, precision=p).encode
            runs[f"in numpy, {p}"] = Embedder(old, device=device, precision=p).encode
        same = min(cosines(runs[f"in numpy, {p}"](items[:500]), runs[f"in the graph, {p}"](items[:500]))[0]
                   for p in precisions)
        rate = rates(runs, items, args.reps)
    print("| pooling | " + " | ".join(runs) + " |")
    print("|---|" + "---|" * len(runs))
    print("| texts/s | " + " | ".join(f"{rate[n]:.0f}" for n in runs) + " |")
    print("| graph / numpy | " + " | ".join(
        f"{rate[n] / rate[n.replace('in the graph', 'in numpy')]:.2f}x" if "graph" in n else "" for n in runs) + " |\n")
    print(f"Min cosine between the two ways on {len(items[:500])} mixed texts: {same:.6f}.\n")


def unpooled_copy(model: Path, out: Path) -> Path:
    """A copy of an exported folder whose graphs end in token states (cast to float32), without the pooling."""
    from bge_onnx_export.pooling import POOLING_PREFIX

    shutil.copytree(model, out)
    spec = read_spec(out)
    variants = {k: v for k, v in spec.variants.items() if (out / v.file).is_file()}
    files = dict(spec.files)
    for variant in variants.values():
        graph = onnx.load(str(out / variant.file))
        nodes = list(graph.graph.node)
        pooling = [n for n in nodes if n.name.startswith(POOLING_PREFIX)]
        # the token states: what the pooling reads that neither it nor the graph's inputs and constants make
        made = {o for n in pooling for o in n.output} | {i.name for i in graph.graph.input}
        made |= {t.name for t in graph.graph.initializer}
        (states,) = {i for n in pooling for i in n.input} - made
        del graph.graph.node[:]
        # (and the fp16 converter's cast of the pooled output to float32)
        graph.graph.node.extend(
            n for n in nodes if not n.name.startswith(POOLING_PREFIX) and spec.output not in n.output
        )
        graph.graph.node.append(onnx.helper.make_node("Cast", [states], ["token_states"], to=onnx.TensorProto.FLOAT))
        del graph.graph.output[:]
        graph.graph.output.append(onnx.helper.make_tensor_value_info(
            "token_states", onnx.TensorProto.FLOAT, ["batch", "sequence", spec.dim]))
        onnx.save(graph, str(out / variant.file))
        files[variant.file] = sha256_file(out / variant.file)
    write_spec(out, dataclasses.replace(
        spec, output="token_states", variants=variants, files=files, format_version=1))
    return out


def rates(runs: dict, items: list, reps: int, warm: int = 256) -> dict:
    """Items per second of each run over items, taking turns (A B C ... A B C) for reps rounds, medians."""
    for run in runs.values():
        run(items[:warm])  # warm up: CUDA kernels, memory arenas
    seconds = {name: [] for name in runs}
    for _ in range(reps):
        for name, run in runs.items():
            start = time.perf_counter()
            run(items)
            seconds[name].append(time.perf_counter() - start)
    return {name: len(items) / statistics.median(s) for name, s in seconds.items()}


def breakdown(model: Embedder, items: list[str], reps: int, device: str) -> str:
    """Tokenising; the graph with outputs copied to the host; the graph with outputs left on the GPU."""
    from bge_onnx.loading import token_batches
    from bge_onnx.tokenize import pad_batch

    loaded = model._model
    session = loaded.session._session
    names = loaded.session.input_names
    output = session.get_outputs()[0].name
    encodings, _ = loaded.tokenizer.encode_texts(items)
    order = sorted(range(len(encodings)), key=lambda i: -len(encodings[i].ids))
    batches = [
        pad_batch([encodings[order[i]] for i in rows], pad_id=loaded.spec.pad_token_id, input_names=names)
        for rows in token_batches([len(encodings[i].ids) for i in order], batch_size=model.batch_size,
                                  max_tokens=model.max_tokens)
    ]

    def to_host():
        for feeds in batches:
            session.run(None, feeds)

    def on_device():
        for feeds in batches:
            binding = session.io_binding()
            for name, array in feeds.items():
                binding.bind_cpu_input(name, array)
            binding.bind_output(output, device)
            session.run_with_iobinding(binding)

    def whole():
        model.encode(items)

    def tokenising():
        loaded.tokenizer.encode_texts(items)

    steps = {"whole encode()": whole, "tokenising": tokenising, "graph, output to host": to_host,
             "graph, output left on GPU (IO binding)": on_device}
    seconds = {name: [] for name in steps}
    for step in steps.values():
        step()
    for _ in range(reps):
        for name, step in steps.items():
            t = time.perf_counter()
            step()
            seconds[name].append(time.perf_counter() - t)
    tokens = sum(f["input_ids"].size for f in batches)
    lines = [f"{len(batches)} batches, {tokens} padded tokens.\n", "| step | seconds |", "|---|---|"]
    lines += [f"| {name} | {statistics.median(s):.4f} |" for name, s in seconds.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
