"""Vectors for storage (bge_onnx.storage, encode's output_dtype): what sentence-transformers' quantize_embeddings
writes for the same ranges, ranges measured at export, calibrate(), and the errors."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from bge_onnx import Embedder, InputError
from bge_onnx_export import probes


@pytest.fixture(scope="module")
def embedder(exported) -> Embedder:
    return Embedder(exported["bert-mean"], device="cpu")


@pytest.mark.parametrize("dtype", ["int8", "uint8", "binary", "ubinary"])
def test_outputs_equal_sentence_transformers_quantize_embeddings(embedder, sentences, dtype):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from sentence_transformers.quantization import quantize_embeddings

    texts = sentences[:200]
    vectors = embedder.encode(texts)
    ours = embedder.encode(texts, output_dtype=dtype)
    reference = quantize_embeddings(vectors, dtype, ranges=embedder.ranges)
    assert ours.dtype == reference.dtype and ours.shape == reference.shape
    np.testing.assert_array_equal(ours, reference)
    np.testing.assert_array_equal(embedder.encode(texts[7], output_dtype=dtype), reference[7])  # one str
    queries = embedder.encode_queries(texts[:5], output_dtype=dtype)
    np.testing.assert_array_equal(queries, quantize_embeddings(embedder.encode_queries(texts[:5]), dtype,
                                                               ranges=embedder.ranges))
    chunks = list(embedder.encode_iter(iter(texts), chunk_size=64, output_dtype=dtype))
    np.testing.assert_array_equal(np.concatenate(chunks), reference)
    assert embedder.encode([], output_dtype=dtype).shape[0] == 0


def test_the_export_records_ranges_of_its_shipped_texts(exported, embedder):
    manifest = json.loads((exported["bert-mean"] / "bge_onnx.json").read_text())
    vectors = Embedder(exported["bert-mean"], device="cpu", precision="fp32").encode(list(probes.CALIBRATION_TEXTS))
    assert manifest["calibration"]["texts"] == len(probes.CALIBRATION_TEXTS)
    np.testing.assert_allclose(manifest["calibration"]["ranges"], [vectors.min(axis=0), vectors.max(axis=0)],
                               atol=1e-6)
    np.testing.assert_array_equal(embedder.ranges, np.asarray(manifest["calibration"]["ranges"], np.float32))
    assert "calibration" not in json.loads((exported["xlmr-rerank"] / "bge_onnx.json").read_text())


def test_calibrate_and_assigned_ranges_replace_the_exports(exported, sentences):
    embedder = Embedder(exported["bert-mean"], device="cpu")
    texts = sentences[200:300]
    ranges = embedder.calibrate(texts)
    vectors = embedder.encode(texts)
    np.testing.assert_array_equal(ranges, np.stack([vectors.min(axis=0), vectors.max(axis=0)]))
    stored = embedder.encode(texts, output_dtype="uint8")
    assert stored.min() == 0 and stored.max() == 255  # the corpus spans its own ranges
    other = Embedder(exported["bert-mean"], device="cpu")
    other.ranges = ranges  # e.g. np.load'ed from where the first process saved them
    np.testing.assert_array_equal(other.encode(texts, output_dtype="uint8"), stored)
    with pytest.raises(InputError, match=r"ranges must be finite float \(2, 32\)"):
        other.ranges = ranges[:, :5]


def test_refusals(model_copy, embedder):
    with pytest.raises(InputError, match="output_dtype must be one of float32, int8, uint8, binary, ubinary, got 'int4'"):
        embedder.encode(["x"], output_dtype="int4")
    with pytest.raises(InputError, match="steps through the normalised vectors' ranges; pass normalize=True"):
        embedder.encode(["x"], output_dtype="int8", normalize=False)
    folder = model_copy("bert-mean")  # as an export made before the ranges were recorded
    manifest = json.loads((folder / "bge_onnx.json").read_text())
    del manifest["calibration"]
    (folder / "bge_onnx.json").write_text(json.dumps(manifest))
    older = Embedder(folder, device="cpu")
    assert older.ranges is None and older.encode(["x"], output_dtype="ubinary").dtype == np.uint8
    with pytest.raises(InputError, match=r"needs per-dimension ranges, and .* was exported without them: call "
                                         r"embedder.calibrate\(texts\)"):
        older.encode(["x"], output_dtype="int8")
