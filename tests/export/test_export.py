"""Export behaviour: decisions, refusals, the parity gate, atomic output, external weights."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import numpy as np
import onnx
import pytest
from onnx import helper

from bge_onnx import Embedder, ExportError, ModelFilesError, ParityError
from bge_onnx.spec import POOLED_OUTPUT, read_spec, sha256_file, write_spec
from bge_onnx_export import export_model, parity
from bge_onnx_export.rewrite import POOLING_PREFIX, keep_first_token

from tiny_models import EMBED_KINDS, VARIED_TEXTS


def test_unknown_plain_checkpoint_needs_pooling(checkpoints, tmp_path):
    folder = shutil.copytree(checkpoints["bert-cls"], tmp_path / "my-bert")
    with pytest.raises(ExportError, match="Pass --pooling cls or --pooling mean"):
        export_model(folder, tmp_path / "out", log=None)
    assert not (tmp_path / "out").exists()
    spec = export_model(folder, tmp_path / "out", log=None, pooling="mean", check_parity=False)
    assert (spec.pooling.value, spec.query_instruction, spec.max_length) == ("mean", "", 128)


def test_parity_gate_refuses_and_writes_nothing(checkpoints, tmp_path, monkeypatch):
    # A gate no graph can pass must fail the export with the measured figure, leaving no folder behind.
    monkeypatch.setattr(parity, "MIN_COSINE", 1.5)
    out = tmp_path / "out"
    with pytest.raises(ParityError, match=r"min cosine 0\.99\d+ < 1\.5 on probe text \d+"):
        export_model(checkpoints["bert-mean"], out, log=None)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no staging folder left either


def test_score_gate_refuses(checkpoints, tmp_path, monkeypatch):
    monkeypatch.setattr(parity, "MAX_SCORE_DIFF", -1.0)
    with pytest.raises(ParityError, match="score diff"):
        export_model(checkpoints["bert-rerank"], tmp_path / "out", log=None)
    assert not (tmp_path / "out").exists()


def test_refuses_to_overwrite_unless_forced(checkpoints, exported, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(ExportError, match="already exists and is not empty"):
        export_model(checkpoints["bert-mean"], out, log=None, check_parity=False)
    assert (out / "keep.txt").read_text() == "precious"
    export_model(checkpoints["bert-mean"], out, log=None, check_parity=False, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.onnx").is_file()
    assert "min_cosine" not in read_spec(out).variants["fp32"].parity  # parity was not checked


def test_every_family_gets_fused_attention(exported):
    # onnxruntime's fusions must find one Attention per layer in BERT, XLM-R and the rerankers alike; a torch or
    # onnxruntime upgrade that changes the traced pattern would otherwise silently cost the speed they buy.
    for kind, folder in exported.items():
        layers = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
        fused = read_spec(folder).variants["fp32"].parity["fused_ops"]
        assert fused.get("Attention") == layers, (kind, fused)
        assert fused.get("SkipLayerNormalization") == 2 * layers, (kind, fused)
        # CLS pooling and rerank heads read only token 0: the last layer computes only it after its attention
        # (the parity tests hold these graphs to PyTorch's outputs)
        first_only = read_spec(folder).variants["fp32"].parity["last_layer_first_token_only"]
        assert first_only == (kind != "bert-mean"), kind


def test_first_token_cut_leaves_other_graphs_alone(exported):
    graph = onnx.load(str(exported["bert-mean"] / "model.onnx"))
    before = graph.SerializeToString()
    assert not keep_first_token(graph) and graph.SerializeToString() == before  # mean pooling reads every token
    for node in graph.graph.node:  # a graph whose attention was not fused
        if node.op_type == "Attention":
            node.op_type = "NotAttention"
    unfused = graph.SerializeToString()
    assert not keep_first_token(graph) and graph.SerializeToString() == unfused
    states = onnx.load(str(exported["bert-mean"] / "model.onnx"))
    _strip_pooling(states, dim=read_spec(exported["bert-mean"]).dim)  # now the token states are the graph's output
    whole = states.SerializeToString()
    assert not keep_first_token(states) and states.SerializeToString() == whole


def _strip_pooling(graph, dim: int) -> None:
    """Take the pooling nodes out of an fp32 graph: its output becomes the token states."""
    nodes = list(graph.graph.node)
    states = next(n for n in nodes if n.name.startswith(POOLING_PREFIX)).input[0]
    del graph.graph.node[:]
    graph.graph.node.extend(n for n in nodes if not n.name.startswith(POOLING_PREFIX))
    del graph.graph.output[:]
    graph.graph.output.append(helper.make_tensor_value_info(states, onnx.TensorProto.FLOAT, ["batch", "seq", dim]))


def _without_pooling(folder):
    """Turn an exported folder into one as exported before the graph pooled: token states out, fp32 only."""
    spec = read_spec(folder)
    path = folder / spec.variants["fp32"].file
    graph = onnx.load(str(path))
    _strip_pooling(graph, spec.dim)
    onnx.save(graph, str(path))
    fp32 = spec.variants["fp32"]
    write_spec(folder, dataclasses.replace(
        spec, output="last_hidden_state", variants={"fp32": fp32}, files={**spec.files, fp32.file: sha256_file(path)},
        format_version=1,
    ))


@pytest.mark.parametrize("kind", EMBED_KINDS)
def test_embedding_graph_pools_like_the_numpy_pooling_it_replaced(model_copy, kind):
    folder = model_copy(kind)
    graph = onnx.load(str(folder / "model.onnx"))
    assert [o.name for o in graph.graph.output] == [POOLED_OUTPUT] == [read_spec(folder).output]
    texts = VARIED_TEXTS * 3  # padded batches of mixed lengths: the mean must skip the padding
    with pytest.warns(UserWarning, match="truncated"):
        pooled = Embedder(folder, device="cpu").encode(texts, normalize=False)
    _without_pooling(folder)
    with pytest.warns(UserWarning, match="truncated"):
        old = Embedder(folder, device="cpu").encode(texts, normalize=False)  # older folders still load
    assert read_spec(folder).output == "last_hidden_state"
    np.testing.assert_allclose(pooled, old, rtol=1e-5, atol=1e-6)


def test_missing_source(tmp_path):
    with pytest.raises(ModelFilesError, match="neither an existing folder nor a hub repo id"):
        export_model(str(tmp_path / "nope" / "deeper"), tmp_path / "out", log=None)
    folder = tmp_path / "empty"
    folder.mkdir()
    with pytest.raises(ModelFilesError, match="config.json is missing"):
        export_model(folder, tmp_path / "out", log=None)


def test_unsupported_architecture(checkpoints, tmp_path):
    folder = shutil.copytree(checkpoints["bert-cls"], tmp_path / "gpt")
    text = (folder / "config.json").read_text().replace('"model_type": "bert"', '"model_type": "gpt2"')
    (folder / "config.json").write_text(text)
    with pytest.raises(ExportError, match="model_type 'gpt2'"):
        export_model(folder, tmp_path / "out", log=None)


def test_weights_in_a_side_file_by_default(checkpoints, int8_exported, tmp_path):
    # the default layout: each graph's weights in GRAPH.data, which onnxruntime maps from disk (issue 23)
    for precision, graph in (("fp32", "model.onnx"), ("int8", "model_int8.onnx")):
        variant = read_spec(int8_exported["bert-mean"]).variants[precision]
        assert variant.all_files == [graph, graph + ".data"]
        assert (int8_exported["bert-mean"] / graph).stat().st_size < 0.1 * (int8_exported["bert-mean"] / (graph + ".data")).stat().st_size
    out = tmp_path / "inline"
    spec = export_model(checkpoints["bert-mean"], out, log=None, external_data=False)
    assert spec.variants["fp32"].data_files == () and not (out / "model.onnx.data").exists()
    texts = ["inline weights", "still the same model"]
    mapped = Embedder(int8_exported["bert-mean"], device="cpu", precision="fp32").encode(texts)
    np.testing.assert_allclose(Embedder(out, device="cpu").encode(texts), mapped, atol=1e-6)


def test_every_file_is_readable_by_others(exported):
    # onnx writes a side file 0600; a container's non-root user must still read a folder built as root
    umask = os.umask(0)
    os.umask(umask)
    for path in exported["bert-mean"].iterdir():
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path.name


def test_instruction_and_length_overrides(checkpoints, tmp_path):
    spec = export_model(
        checkpoints["bert-mean"], tmp_path / "o", log=None, check_parity=False,
        query_instruction="query: ", max_length=32,
    )
    assert (spec.query_instruction, spec.max_length) == ("query: ", 32)
    with pytest.raises(ExportError, match="exceeds the model's 128 positions"):
        export_model(checkpoints["bert-mean"], tmp_path / "p", log=None, max_length=4096)


def test_export_by_id_fails_fast_on_a_silent_hub(tmp_path):
    # a hub that accepts connections and never answers: export used to print nothing for minutes (issue 25)
    import subprocess
    import sys

    from hubserver import Silent, hub_env

    silent = Silent()
    endpoint = silent.endpoint
    try:
        env = {**hub_env(endpoint, tmp_path / "hf"), "HF_HUB_ETAG_TIMEOUT": "2"}
        result = subprocess.run([sys.executable, "-m", "bge_onnx", "export", "acme/unreachable", "--out",
                                 str(tmp_path / "x")], env=env, capture_output=True, text=True, timeout=120, check=False)
    finally:
        silent.close()
    assert result.returncode == 1 and not (tmp_path / "x").exists()
    assert f"cannot reach the hub at {endpoint} to download 'acme/unreachable'" in result.stderr
    assert "within HF_HUB_ETAG_TIMEOUT=2 s" in result.stderr and "export from a local checkpoint folder" in result.stderr
