"""The real all-MiniLM-L6-v2 (packaged on PyPI) exported and compared with sentence-transformers' own encode."""

from __future__ import annotations

import numpy as np
import pytest

from bge_onnx import Embedder, Precision
from bge_onnx.spec import Pooling, Task, read_spec
from bge_onnx_export import precision
from bge_onnx_export.probes import PROBE_TEXTS
from tiny_models import VARIED_TEXTS, minilm_path


@pytest.fixture(scope="module")
def sentence_transformer():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_path()), device="cpu")


@pytest.fixture(scope="module")
def texts(sentences):
    long_texts = [
        "In information retrieval, dense vectors from a bi-encoder are compared with cosine similarity. " * k
        for k in (3, 8, 20)
    ]
    return sentences[:300] + VARIED_TEXTS + list(PROBE_TEXTS) + long_texts


def test_manifest_of_the_real_model(minilm_onnx, sentence_transformer):
    spec = read_spec(minilm_onnx)
    # sentence_bert_config's max_seq_length (256) wins over the tokenizer's model_max_length (512)
    assert spec.max_length == sentence_transformer.max_seq_length == 256
    assert (spec.pooling, spec.normalize, spec.dim) == (Pooling.MEAN, True, 384)
    assert spec.variants["fp32"].parity["min_cosine"] >= 0.99999


def test_matches_sentence_transformers(minilm_onnx, sentence_transformer, texts):
    assert len(texts) > 300
    reference = sentence_transformer.encode(texts, batch_size=32, convert_to_numpy=True)
    with pytest.warns(UserWarning, match="truncated"):
        ours = Embedder(minilm_onnx, device="cpu", precision="fp32").encode(texts)
    cosines = (ours * reference).sum(axis=1) / np.linalg.norm(reference, axis=1)
    assert cosines.min() >= 0.9999, (cosines.min(), texts[int(cosines.argmin())][:80])
    np.testing.assert_allclose(ours, reference, atol=1e-4)


def test_long_text_is_cut_at_256_not_128(minilm_onnx, sentence_transformer):
    text = "Tokens past one hundred and twenty eight still count for this model. " * 30
    reference = sentence_transformer.encode([text], convert_to_numpy=True)[0]
    with pytest.warns(UserWarning):
        ours = Embedder(minilm_onnx, device="cpu").encode(text)
        cut_short = Embedder(minilm_onnx, device="cpu", max_length=128).encode(text)
    assert float(ours @ reference) >= 0.9999
    # the fastembed trap: cutting at 128 gives a measurably different vector
    assert float(cut_short @ reference) < float(ours @ reference) - 1e-4


def test_int8_within_its_gate_on_sentences_it_was_not_gated_on(minilm_onnx, sentence_transformer, sentences, tmp_path):
    import shutil

    folder = shutil.copytree(minilm_onnx, tmp_path / "minilm")
    spec = precision.add_variant(folder, Precision.INT8)  # raises if no recipe passes the gate
    figures = spec.variants["int8"].parity
    assert figures["passed"] and figures["min_cosine"] >= 0.985 and figures["mean_cosine"] >= 0.995
    embedder = Embedder(folder, device="cpu")
    assert embedder.precision is Precision.INT8  # auto on CPU
    texts = sentences[100:500]
    reference = sentence_transformer.encode(texts, batch_size=32, convert_to_numpy=True)
    ours = embedder.encode(texts)
    held_out = precision.compare(Task.EMBED, reference, ours)
    assert precision.failures(held_out, figures["gate"]) == [], held_out
