"""bge-onnx optimize: an official ONNX export -> a bge-onnx folder, without torch, checked against the source graph."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from bge_onnx import Embedder, Reranker
from bge_onnx.errors import ExportError, ModelFilesError
from bge_onnx.spec import POOLED_OUTPUT, Precision, read_spec, sha256_file
from bge_onnx_export.optimize import optimize_model
from bge_onnx_export.parity import torch_embeddings, torch_scores
from bge_onnx_export.probes import PROBE_PAIRS, PROBE_TEXTS
from tiny_models import EMBED_KINDS, RERANK_KINDS, VARIED_TEXTS

# torch and transformers made unimportable: the conversion must not need them
_NO_TORCH = """
import sys
for name in ("torch", "transformers", "optimum"):
    sys.modules[name] = None
from bge_onnx.cli import main
code = main(sys.argv[1:])
assert not any(m.split(".")[0] in ("torch", "transformers", "optimum") for m in sys.modules if sys.modules[m])
sys.exit(code)
"""


@pytest.mark.parametrize("kind", EMBED_KINDS)
def test_optimized_folder_without_torch_gives_the_pytorch_vectors(kind, official, torch_models, tmp_path):
    out = tmp_path / "optimized"
    result = subprocess.run([sys.executable, "-c", _NO_TORCH, "optimize", str(official[kind]), "--out", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "against the source graph: min cosine" in result.stderr and "fused" in result.stderr
    spec = read_spec(out)
    assert spec.output == POOLED_OUTPUT and spec.source["reference"].startswith("the source ONNX graph")
    assert spec.source["graph_sha256"] == sha256_file(official[kind] / "onnx" / "model.onnx")
    assert spec.source["command"].startswith(f"bge-onnx optimize {official[kind]} --out {out}")
    fp32 = spec.variants["fp32"].parity
    assert fp32["min_cosine"] >= 0.99999 and fp32["fused_ops"].get("Attention") == 2
    assert fp32["last_layer_first_token_only"] is (spec.pooling.value == "cls")
    embedder = Embedder(out, device="cpu")
    model, tokenizer = torch_models[kind]
    texts = VARIED_TEXTS + list(PROBE_TEXTS)
    reference = torch_embeddings(model, tokenizer, texts, pooling=embedder.pooling, max_length=embedder.max_length)
    with pytest.warns(UserWarning, match="truncated"):
        np.testing.assert_allclose(embedder.encode(texts, normalize=False), reference, atol=1e-4)


@pytest.mark.parametrize("kind", RERANK_KINDS)
def test_optimized_reranker_gives_the_pytorch_scores(kind, official, torch_models, tmp_path):
    spec = optimize_model(official[kind], tmp_path / "optimized", log=None)
    assert spec.output == "logits"  # its scores against PyTorch's: below
    reranker = Reranker(tmp_path / "optimized", device="cpu")
    model, tokenizer = torch_models[kind]
    pairs = list(PROBE_PAIRS)
    reference = torch_scores(model, tokenizer, pairs, max_length=reranker.max_length)
    with pytest.warns(UserWarning, match="truncated"):
        assert np.abs(reranker.compute_score(pairs) - reference).max() <= 1e-4


def test_int8_is_gated_against_fp32_and_external_data_is_read(official, tmp_path):
    # bge-m3's stand-in keeps its weights in onnx/model.onnx_data
    spec = optimize_model(official["xlmr-cls"], tmp_path / "m3", precisions=["fp32", "int8"], allow_below_gate=True,
                          log=None)
    int8 = spec.variants["int8"].parity
    assert int8["reference"] == "fp32" and "min_cosine" in int8 and "passed" in int8
    vectors = Embedder(tmp_path / "m3", device="cpu", precision="int8").encode(["a text", "another text"])
    assert vectors.shape == (2, spec.dim) and np.isfinite(vectors).all()
    # the official graph's position ids (CumSum, Equal, Where, ConstantOfShape) keep their meaning at opset 21, so
    # its rows are quantised in place too
    graph = onnx.load(str(tmp_path / "m3" / spec.variants["int8"].file), load_external_data=False)
    assert next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) == 21


def test_overrides_and_bad_sources(official, exported, checkpoints, torch_models, tmp_path):
    spec = optimize_model(official["bert-cls"], tmp_path / "mean", pooling="mean", max_length=32,
                          query_instruction="q: ", log=None)
    assert (spec.pooling.value, spec.max_length, spec.query_instruction) == ("mean", 32, "q: ")
    # the recorded command has every option, quoted for a shell, and makes the same folder again
    command = shlex.split(spec.source["command"])
    assert command == ["bge-onnx", "optimize", str(official["bert-cls"]), "--out", str(tmp_path / "mean"), "--pooling",
                       "mean", "--max-length", "32", "--query-instruction", "q: ", "--precision", "fp32"]
    again = subprocess.run([sys.executable, "-m", "bge_onnx", *command[1:4], str(tmp_path / "again-mean"),
                            *command[5:], "--quiet"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    rebuilt = read_spec(tmp_path / "again-mean")
    assert (rebuilt.pooling, rebuilt.max_length, rebuilt.query_instruction) == (spec.pooling, 32, "q: ")
    assert rebuilt.files == spec.files
    model, tokenizer = torch_models["bert-cls"]  # the overridden pooling and length, against PyTorch
    reference = torch_embeddings(model, tokenizer, VARIED_TEXTS, pooling=spec.pooling, max_length=32)
    with pytest.warns(UserWarning, match="truncated"):
        got = Embedder(tmp_path / "mean", device="cpu").encode(VARIED_TEXTS, normalize=False)
    np.testing.assert_allclose(got, reference, atol=1e-4)
    with pytest.raises(ExportError, match="is a bge-onnx folder already"):
        optimize_model(exported["bert-cls"], tmp_path / "again", log=None)
    with pytest.raises(ModelFilesError, match=r"has no ONNX graph .*`bge-onnx export SRC"):
        optimize_model(checkpoints["bert-cls"], tmp_path / "none", log=None)
    with pytest.raises(ExportError, match="already exists and is not empty"):
        optimize_model(official["bert-cls"], tmp_path / "mean", log=None)


def test_a_graph_picked_by_file_or_path_and_a_quantised_one_refused(official, tmp_path):
    # a sentence-transformers export keeps several graphs in onnx/ (model.onnx, model_O1.onnx, model_qint8_*.onnx)
    import shutil

    from onnxruntime.quantization import QuantType, quantize_dynamic

    folder = Path(shutil.copytree(official["bert-mean"], tmp_path / "st"))
    shutil.copyfile(folder / "onnx" / "model.onnx", folder / "onnx" / "model_O1.onnx")
    quantize_dynamic(folder / "onnx" / "model.onnx", folder / "onnx" / "model_qint8.onnx", weight_type=QuantType.QInt8)
    texts = ["one graph of several", "picked by name"]
    reference = Embedder(official["bert-mean"], device="cpu").encode(texts)

    by_file = optimize_model(folder, tmp_path / "by-file", graph="onnx/model_O1.onnx", log=None)
    assert by_file.source["graph"] == "onnx/model_O1.onnx"
    np.testing.assert_allclose(Embedder(tmp_path / "by-file", device="cpu").encode(texts), reference, atol=1e-5)
    by_path = optimize_model(folder / "onnx" / "model_O1.onnx", tmp_path / "by-path", log=None)
    assert by_path.source["graph"] == "onnx/model_O1.onnx" and by_path.source["path"] == str(folder.resolve())

    with pytest.raises(ExportError, match=r"model_qint8.onnx is already quantised \(.*MatMulInteger.*\): optimize "
                                          r"starts from an fp32 graph .* \(--file onnx/model.onnx\)"):
        optimize_model(folder, tmp_path / "q", graph="onnx/model_qint8.onnx", log=None)
    assert not (tmp_path / "q").exists()
    with pytest.raises(ModelFilesError, match=r"has no ONNX graph onnx/model_O9.onnx \(it has onnx/model.onnx, "
                                              r"onnx/model_O1.onnx, onnx/model_qint8.onnx: pick one with --file\)"):
        optimize_model(folder, tmp_path / "none", graph="onnx/model_O9.onnx", log=None)

    # the command line, torch-free
    result = subprocess.run([sys.executable, "-c", _NO_TORCH, "optimize", str(folder), "--out", str(tmp_path / "cli"),
                             "--file", "onnx/model_qint8.onnx", "-q"], capture_output=True, text=True, check=False)
    assert result.returncode == 1 and "is already quantised" in result.stderr and "Report this" not in result.stderr


def test_a_quantised_graph_loaded_as_it_is_says_int8(official, tmp_path):
    # an export folder whose one graph is already int8 (no manifest): run as it is, and named for what it is
    import shutil

    from onnxruntime.quantization import QuantType, quantize_dynamic

    folder = Path(shutil.copytree(official["bert-mean"], tmp_path / "st"))
    quantize_dynamic(folder / "onnx" / "model.onnx", tmp_path / "q.onnx", weight_type=QuantType.QInt8)
    shutil.move(tmp_path / "q.onnx", folder / "onnx" / "model.onnx")
    embedder = Embedder(folder, device="cpu")
    assert embedder.precision is Precision.INT8
    assert Embedder(official["bert-mean"], device="cpu").precision is Precision.FP32  # the fp32 graph is not
    vectors = embedder.encode(["a quantised graph", "as it is"])
    reference = Embedder(official["bert-mean"], device="cpu").encode(["a quantised graph", "as it is"])
    assert (vectors * reference).sum(axis=1).min() > 0.9  # a random tiny model: int8 only roughly
    with pytest.raises(ModelFilesError, match=r"it has one graph, onnx/model.onnx, which is int8. For fp32 and int8, "
                                              r"convert its fp32 graph"):
        Embedder(folder, device="cpu", precision="fp32")
    info = subprocess.run([sys.executable, "-m", "bge_onnx", "info", str(folder)], capture_output=True, text=True,
                          check=True).stdout
    assert "variant int8:      onnx/model.onnx" in info and "variant fp32" not in info
    assert "parity not checked (the graph as published; not checked by bge-onnx)" in info
