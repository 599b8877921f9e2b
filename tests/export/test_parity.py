"""Exported tiny models of every architecture against their PyTorch models, on the same texts."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from bge_onnx import Embedder, Reranker
from bge_onnx.errors import ExportError
from bge_onnx.registry import EN_INSTRUCTION
from bge_onnx.spec import Pooling, read_spec
from bge_onnx_export.parity import MAX_SCORE_DIFF, MIN_COSINE, torch_embeddings, torch_scores
from bge_onnx_export.probes import PROBE_PAIRS, PROBE_TEXTS
from bge_onnx_export.source import describe_source
from tiny_models import EMBED_KINDS, RERANK_KINDS, VARIED_TEXTS


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


# the export's two ways to a graph: built from the checkpoint's tensors (no torch), and traced with torch
GRAPH_FROM = ["weights", "torch"]
MAX_ABS_DIFF = 1e-5


@pytest.fixture(scope="module")
def folders(exported, traced) -> dict[str, dict[str, object]]:
    return {"weights": exported, "torch": traced}


@pytest.mark.parametrize("graph_from", GRAPH_FROM)
@pytest.mark.parametrize("kind", EMBED_KINDS)
def test_embeddings_match_pytorch(kind, graph_from, folders, torch_models):
    folder = folders[graph_from][kind]
    assert read_spec(folder).variants["fp32"].parity["graph_from"] == {"weights": "weights", "torch": "torch trace"}[graph_from]
    embedder = Embedder(folder, device="cpu")
    model, tokenizer = torch_models[kind]
    texts = VARIED_TEXTS + list(PROBE_TEXTS)
    reference = torch_embeddings(model, tokenizer, texts, pooling=embedder.pooling, max_length=embedder.max_length)
    with pytest.warns(UserWarning, match="truncated"):
        ours = embedder.encode(texts, normalize=False)
    assert ours.dtype == np.float32 and ours.shape == reference.shape
    # texts must get clearly different vectors, or a runtime that mixed up rows would pass
    unit = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    assert (unit @ unit.T)[~np.eye(len(texts), dtype=bool)].mean() < 0.95
    assert _cosines(ours, reference).min() >= 0.99999
    # unit vectors (what encode returns) within 1e-5; the raw pooled states reach several units, where float32's
    # rounding alone is ~1e-6 a step
    unit_ours = ours / np.linalg.norm(ours, axis=1, keepdims=True)
    assert np.abs(unit_ours - unit).max() <= MAX_ABS_DIFF
    np.testing.assert_allclose(ours, reference, atol=1e-4)


@pytest.mark.parametrize("graph_from", GRAPH_FROM)
@pytest.mark.parametrize("kind", RERANK_KINDS)
def test_scores_match_pytorch_and_spread(kind, graph_from, folders, torch_models):
    reranker = Reranker(folders[graph_from][kind], device="cpu")
    model, tokenizer = torch_models[kind]
    pairs = list(PROBE_PAIRS) + [(q, p) for q in VARIED_TEXTS[:5] for p in VARIED_TEXTS]
    reference = torch_scores(model, tokenizer, pairs, max_length=reranker.max_length)
    with pytest.warns(UserWarning, match="truncated"):
        ours = reranker.compute_score(pairs)
    assert ours.dtype == np.float32 and ours.shape == (len(pairs),)
    # relative to the scores' scale: the widened random heads give logits in the tens, where float32's own step is
    # ~2e-6 (the probe scores of a real reranker lie within about +-10)
    assert np.abs(ours - reference).max() <= MAX_ABS_DIFF * max(1.0, float(np.abs(reference).max()))
    # the head was widened so a constant or shuffled output cannot pass
    assert reference.std() > 1.0
    assert (np.argsort(-ours, kind="stable") == np.argsort(-reference, kind="stable")).mean() > 0.95
    assert np.corrcoef(ours, reference)[0, 1] > 0.9999


@pytest.mark.parametrize("kind", EMBED_KINDS + RERANK_KINDS)
def test_manifest_records_parity_and_hashes(kind, exported):
    spec = read_spec(exported[kind])
    figures = spec.variants["fp32"].parity
    if kind in EMBED_KINDS:
        assert figures["min_cosine"] >= MIN_COSINE and figures["texts"] == len(PROBE_TEXTS)
    else:
        assert figures["max_abs_diff"] <= MAX_SCORE_DIFF and figures["pairs"] == len(PROBE_PAIRS)
    on_disk = sorted(p.name for p in exported[kind].iterdir() if p.name != "bge_onnx.json")
    assert sorted(spec.files) == on_disk
    assert {"torch", "transformers", "onnxruntime", "bge_onnx"} <= set(spec.versions)
    raw = json.loads((exported[kind] / "bge_onnx.json").read_text())
    assert raw["task"] == spec.task.value


def test_pooling_comes_from_flag_config_or_registry(exported):
    # registry, by folder name: CLS and the English query instruction
    small = read_spec(exported["bert-cls"])
    assert (small.pooling, small.query_instruction) == (Pooling.CLS, EN_INSTRUCTION)
    assert small.source["id"] == "BAAI/bge-small-en-v1.5"
    # sentence-transformers folder: mean pooling, and its max_seq_length (64) beats the tokenizer's 512
    st = read_spec(exported["bert-mean"])
    assert (st.pooling, st.max_length, st.normalize, st.query_instruction) == (Pooling.MEAN, 64, True, "query: ")
    # registry: a folder named bge-m3 is CLS, no instruction, length capped by the tiny model's positions
    m3 = read_spec(exported["xlmr-cls"])
    assert (m3.pooling, m3.query_instruction, m3.max_length) == (Pooling.CLS, "", 128)
    assert m3.source["id"] == "BAAI/bge-m3"
    assert "token_type_ids" not in m3.inputs and "token_type_ids" in st.inputs


def test_checkpoint_config_wins_over_the_registry(checkpoints, tmp_path):
    # a sentence-transformers folder whose name the registry knows (CLS, English instruction): its own files win
    folder = shutil.copytree(checkpoints["bert-mean"], tmp_path / "bge-small-en-v1.5")
    (folder / "config_sentence_transformers.json").write_text(json.dumps({"prompts": {"query": "custom: "}}))
    source = describe_source(str(folder))
    assert (source.pooling, source.query_instruction, source.max_length) == (Pooling.MEAN, "custom: ", 64)
    assert source.source_id == "BAAI/bge-small-en-v1.5"
    # with no prompt of its own, the registry's instruction fills in
    (folder / "config_sentence_transformers.json").write_text(json.dumps({"prompts": {}}))
    assert describe_source(str(folder)).query_instruction == EN_INSTRUCTION


def test_explicit_pooling_wins_over_a_missing_or_unsupported_pooling_config(checkpoints, tmp_path):
    folder = shutil.copytree(checkpoints["bert-mean"], tmp_path / "no-pooling-module")
    modules = json.loads((folder / "modules.json").read_text())
    (folder / "modules.json").write_text(json.dumps([m for m in modules if not m["type"].endswith("Pooling")]))
    with pytest.raises(ExportError, match="has no Pooling module; pass --pooling cls|mean"):
        describe_source(str(folder))
    assert describe_source(str(folder), pooling="cls").pooling is Pooling.CLS
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_max_tokens": True}))
    with pytest.raises(ExportError, match="uses pooling"):
        describe_source(str(folder))
    assert describe_source(str(folder), pooling="mean").pooling is Pooling.MEAN


def test_mean_and_cls_really_differ(exported):
    # The same BERT body pooled two ways must give different vectors, or pooling is not applied.
    texts = ["a cat sat on the mat", "stock markets fell sharply today"]
    mean = Embedder(exported["bert-mean"], device="cpu").encode(texts)
    cls = Embedder(exported["bert-cls"], device="cpu").encode(texts)
    assert _cosines(mean, cls).max() < 0.999
