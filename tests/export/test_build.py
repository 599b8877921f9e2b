"""The torch-free export: tensors read without torch (and without running a pickle's code), the graph built from them,
and the numpy forward pass that is the gate's reference where torch is not installed, each held to PyTorch."""

from __future__ import annotations

import collections
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from bge_onnx import Embedder, Reranker
from bge_onnx.errors import ExportError
from bge_onnx.spec import read_spec
from bge_onnx_export import export_model
from bge_onnx_export.checkpoint import read
from bge_onnx_export.reference import NumpyEncoder
from bge_onnx_export.weights import read_checkpoint, read_safetensors, read_torch_pickle
from tiny_models import EMBED_KINDS, KINDS, RERANK_KINDS, VARIED_TEXTS, minilm_path

MAX_ABS_DIFF = 1e-5


def _same(ours, theirs) -> None:
    assert type(ours) is np.ndarray and ours.shape == tuple(theirs.shape)
    np.testing.assert_array_equal(ours, theirs.float().numpy() if theirs.is_floating_point() else theirs.numpy())


def test_torch_pickles_are_read_as_torch_reads_them(tmp_path):
    base = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    state = collections.OrderedDict(
        fp32=base, fp16=base.half(), bf16=base.bfloat16(), ints=torch.arange(7), transposed=base.t(),
        offset=base[2:], scalar=torch.tensor(3.5), parameter=torch.nn.Parameter(base[:, 1]),
    )
    torch.save(state, tmp_path / "state.pt")
    ours = read_torch_pickle(tmp_path / "state.pt")
    assert list(ours) == list(state)
    for name, tensor in state.items():
        _same(ours[name], tensor.detach())


def test_a_pickle_that_would_run_code_is_refused_unrun(tmp_path):
    class RunsCode:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "ran"),))

    torch.save({"weight": torch.zeros(2, 2), "hook": RunsCode()}, tmp_path / "evil.pt")
    with pytest.raises(ExportError, match=r"evil.pt could not be read as a weights-only state dict \(UnpicklingError: "
                                          r"refused global posix.system"):
        read_torch_pickle(tmp_path / "evil.pt")
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"weight": 1}))  # not torch's zip format
    with pytest.raises(ExportError, match=r"plain.pkl could not be read as a weights-only state dict \(BadZipFile"):
        read_torch_pickle(tmp_path / "plain.pkl")
    assert not (tmp_path / "ran").exists()


def test_safetensors_of_every_float_type_and_shards(tmp_path, checkpoints):
    from safetensors.torch import load_file, save_file

    base = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    tensors = {"f32": base, "f16": base.half(), "bf16": base.bfloat16(), "i64": torch.arange(5), "empty": base[:0]}
    save_file(tensors, tmp_path / "t.safetensors")
    ours = read_safetensors(tmp_path / "t.safetensors")
    for name, tensor in load_file(tmp_path / "t.safetensors").items():
        _same(ours[name], tensor)
    # a sharded checkpoint (an index and several files) and a pytorch_model.bin one hold the same tensors
    from transformers import AutoModel

    model = AutoModel.from_pretrained(checkpoints["bert-cls"])
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    (tmp_path / "bin").mkdir()
    shutil.move(tmp_path / "pytorch_model.bin", tmp_path / "bin" / "pytorch_model.bin")
    single = read_checkpoint(checkpoints["bert-cls"])
    for folder in (tmp_path / "sharded", tmp_path / "bin"):
        other = read_checkpoint(folder)
        for name, array in single.items():
            np.testing.assert_array_equal(other[name], array)


@pytest.mark.parametrize("kind", EMBED_KINDS + RERANK_KINDS)
def test_numpy_forward_pass_matches_pytorch(kind, checkpoints, torch_models):
    """The reference used where torch is not installed is itself held to PyTorch, padded batches included."""
    model, tokenizer = torch_models[kind]
    batch = tokenizer(VARIED_TEXTS, padding=True, truncation=True, max_length=64, return_tensors="pt")
    encoder = NumpyEncoder(read(checkpoints[kind], rerank=kind in RERANK_KINDS))
    feeds = {name: value.numpy() for name, value in batch.items()}
    with torch.no_grad():
        if kind in RERANK_KINDS:
            expected = model(**batch).logits[:, 0].numpy()
            ours = encoder.logits(**feeds)
            assert np.abs(ours - expected).max() <= MAX_ABS_DIFF * max(1.0, np.abs(expected).max())
        else:
            expected = model(**batch).last_hidden_state.numpy()
            mask = feeds["attention_mask"].astype(bool)
            # token states (not normalised) reach a few units, where PyTorch's float32 rounding is ~1e-5
            scale = max(1.0, np.abs(expected[mask]).max())
            assert np.abs(encoder.hidden(**feeds)[mask] - expected[mask]).max() <= MAX_ABS_DIFF * scale


def test_real_model_both_ways_match_sentence_transformers(minilm_onnx, tmp_path):
    from sentence_transformers import SentenceTransformer

    traced = tmp_path / "traced"
    export_model(minilm_path(), traced, graph_from="torch", log=None)
    assert read_spec(minilm_onnx).variants["fp32"].parity["graph_from"] == "weights"
    assert read_spec(traced).variants["fp32"].parity["graph_from"] == "torch trace"
    texts = VARIED_TEXTS + ["Tokens past one hundred and twenty eight still count for this model. " * 30]
    reference = SentenceTransformer(str(minilm_path()), device="cpu").encode(texts, convert_to_numpy=True)
    with pytest.warns(UserWarning, match="truncated"):
        built = Embedder(minilm_onnx, device="cpu", precision="fp32").encode(texts)
        from_trace = Embedder(traced, device="cpu", precision="fp32").encode(texts)
    assert np.abs(built - reference).max() <= MAX_ABS_DIFF
    assert np.abs(from_trace - reference).max() <= MAX_ABS_DIFF


def test_what_the_builder_does_not_cover_is_traced_or_refused(checkpoints, tmp_path):
    relu = Path(shutil.copytree(checkpoints["bert-cls"], tmp_path / "bge-small-en-v1.5"))
    config = json.loads((relu / "config.json").read_text())
    (relu / "config.json").write_text(json.dumps({**config, "hidden_act": "relu"}))
    with pytest.raises(ExportError, match=r"cannot be built from its weights: hidden_act 'relu'; export it with "
                                          r"graph_from='torch' \(--graph-from torch\)"):
        export_model(relu, tmp_path / "refused", graph_from="weights", log=None)
    assert not (tmp_path / "refused").exists()
    lines = []
    spec = export_model(relu, tmp_path / "traced", log=lines.append)  # auto: traced with torch, and says why
    assert "built by tracing it with torch (hidden_act 'relu')" in lines[0]
    assert spec.variants["fp32"].parity["graph_from"] == "torch trace"
    with pytest.raises(ExportError, match="graph_from must be one of"):
        export_model(checkpoints["bert-cls"], tmp_path / "bad", graph_from="onnx", log=None)


def test_missing_tensor_names_file_and_tensor(checkpoints, tmp_path):
    from safetensors.numpy import load_file, save_file

    folder = Path(shutil.copytree(checkpoints["xlmr-rerank"], tmp_path / "bge-reranker-v2-m3"))
    tensors = load_file(folder / "model.safetensors")
    del tensors["classifier.out_proj.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ExportError, match=r"model.safetensors\) has no tensor 'classifier.out_proj.weight', which a "
                                          r"xlm-roberta reranker needs"):
        export_model(folder, tmp_path / "out", graph_from="weights", log=None)


@pytest.mark.parametrize("kind", list(KINDS))
def test_built_and_traced_graphs_agree_on_any_batch(kind, exported, traced):
    texts = VARIED_TEXTS * 2
    with pytest.warns(UserWarning, match="truncated"):
        if kind in RERANK_KINDS:
            pairs = list(zip(texts, reversed(texts)))
            built, other = (Reranker(f[kind], device="cpu").compute_score(pairs) for f in (exported, traced))
            scale = max(1.0, float(np.abs(other).max()))
        else:
            built, other = (Embedder(f[kind], device="cpu").encode(texts) for f in (exported, traced))
            scale = 1.0
    assert np.abs(built - other).max() <= MAX_ABS_DIFF * scale


def test_a_tensor_reaching_past_its_storage_is_refused(tmp_path):
    import zipfile

    torch.save({"weight": torch.zeros(4, 5)}, tmp_path / "whole.pt")
    with zipfile.ZipFile(tmp_path / "whole.pt") as source, zipfile.ZipFile(tmp_path / "short.pt", "w") as target:
        for item in source.infolist():  # the storage cut to 2 of its 20 floats: the layout would read past it
            data = source.read(item)
            target.writestr(item, data[:8] if item.filename.endswith("/data/0") else data)
    with pytest.raises(ExportError, match=r"short.pt could not be read .* a tensor of size \(4, 5\) at offset 0 "
                                          r"reaches past its storage of 2 elements"):
        read_torch_pickle(tmp_path / "short.pt")


def test_a_legacy_torch_checkpoint_is_traced(checkpoints, tmp_path):
    folder = Path(shutil.copytree(checkpoints["bert-cls"], tmp_path / "bge-small-en-v1.5"))
    state = {k: torch.from_numpy(v.copy()) for k, v in read_checkpoint(folder).items()}
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    lines = []
    spec = export_model(folder, tmp_path / "out", log=lines.append)
    assert "tracing it with torch (pytorch_model.bin is in torch's legacy (pre-1.6) format)" in lines[0]
    assert spec.variants["fp32"].parity["graph_from"] == "torch trace"
