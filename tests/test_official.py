"""ONNX exports that are not ours (the official BAAI repos' onnx/ folders): run as they are, from a folder or by name."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from bge_onnx_export.parity import torch_embeddings, torch_scores
from bge_onnx_export.probes import PROBE_PAIRS, PROBE_TEXTS
from hubserver import Hub, Silent, hub_env
from tiny_models import EMBED_KINDS, RERANK_KINDS, VARIED_TEXTS

from bge_onnx import Embedder, Reranker
from bge_onnx.errors import ModelFilesError, ModelIntegrityError
from bge_onnx.registry import EN_INSTRUCTION
from bge_onnx.spec import Pooling

TEXTS = VARIED_TEXTS + list(PROBE_TEXTS)


@pytest.mark.parametrize("kind", EMBED_KINDS)
def test_official_graph_gives_the_pytorch_vectors(kind, official, torch_models):
    embedder = Embedder(official[kind], device="cpu")
    # pooling from the folder's sentence-transformers config (bert-mean), else the registry (by folder name)
    assert embedder.pooling is (Pooling.MEAN if kind == "bert-mean" else Pooling.CLS)
    assert embedder.spec.output == "last_hidden_state"  # token states, pooled in numpy
    model, tokenizer = torch_models[kind]
    reference = torch_embeddings(model, tokenizer, TEXTS, pooling=embedder.pooling, max_length=embedder.max_length)
    with pytest.warns(UserWarning, match="truncated"):
        ours = embedder.encode(TEXTS, normalize=False)
    np.testing.assert_allclose(ours, reference, atol=1e-4)
    # the registry's instruction for bge-small-en-v1.5; bge-m3 and the sentence-transformers folder have none
    assert embedder.query_instruction == (EN_INSTRUCTION if kind == "bert-cls" else "")


@pytest.mark.parametrize("kind", RERANK_KINDS)
def test_official_reranker_graph_gives_the_pytorch_scores(kind, official, torch_models):
    reranker = Reranker(official[kind], device="cpu")
    model, tokenizer = torch_models[kind]
    pairs = list(PROBE_PAIRS) + [(q, p) for q in VARIED_TEXTS[:3] for p in VARIED_TEXTS]
    reference = torch_scores(model, tokenizer, pairs, max_length=reranker.max_length)
    with pytest.warns(UserWarning, match="truncated"):
        ours = reranker.compute_score(pairs)
    assert np.abs(ours - reference).max() <= 1e-4 and reference.std() > 1.0


def test_official_graph_has_no_int8_and_says_how_to_get_one(official):
    with pytest.raises(ModelFilesError, match=r"bge-onnx optimize .* --precision fp32 int8"):
        Embedder(official["bert-cls"], device="cpu", precision="int8")
    assert Embedder(official["bert-cls"], device="cpu").precision.value == "fp32"


def test_official_graph_with_an_unknown_pooling_names_the_fix(official, tmp_path):
    folder = shutil.copytree(official["bert-cls"], tmp_path / "some-unknown-model")
    with pytest.raises(ModelIntegrityError, match=r"cannot tell how .* pools .* --pooling cls\|mean"):
        Embedder(folder, device="cpu")


_LOAD = """
import sys, numpy as np, bge_onnx
cls = bge_onnx.Reranker if sys.argv[1] == "rerank" else bge_onnx.Embedder
workers = int(sys.argv[4]) if len(sys.argv) > 4 else None
try:
    model = cls(sys.argv[2], device="cpu")
    if sys.argv[1] == "rerank":
        out = model.compute_score([("hub text", "another")] * 4, workers=workers)[:1]
    else:
        out = model.encode(["hub text", "another"] * 2, workers=workers)[:2]
except bge_onnx.BgeOnnxError as err:
    print(type(err).__name__ + ": " + str(err)); sys.exit(1)
np.save(sys.argv[3], out)
"""


def _load(task: str, repo: str, out: Path, env: dict[str, str], workers: int = 1) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _LOAD, task, repo, str(out), str(workers)], env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture()
def official_hub(official):
    server = Hub({"BAAI/bge-m3": official["xlmr-cls"], "BAAI/bge-reranker-base": official["bert-rerank"],
                  "acme/st-mean-onnx": official["bert-mean"]})
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def test_official_repo_by_name_fetches_the_graph_and_configs_never_the_torch_weights(official_hub, official, tmp_path):
    endpoint = f"http://127.0.0.1:{official_hub.server_address[1]}"
    env = hub_env(endpoint, tmp_path / "hf")
    result = _load("embed", "BAAI/bge-m3", tmp_path / "v.npy", env)
    assert result.returncode == 0, result.stdout + result.stderr
    np.testing.assert_allclose(np.load(tmp_path / "v.npy"),
                               Embedder(official["xlmr-cls"], device="cpu").encode(["hub text", "another"]), atol=1e-6)
    fetched = {r.split("/resolve/main/")[-1] for r in official_hub.requests if r.startswith("GET")}
    assert fetched == {"onnx/model.onnx", "onnx/model.onnx_data", "config.json", "tokenizer.json",
                       "tokenizer_config.json"}

    official_hub.requests.clear()
    result = _load("embed", "acme/st-mean-onnx", tmp_path / "m.npy", env)  # sentence-transformers files come too
    assert result.returncode == 0, result.stdout + result.stderr
    fetched = {r.split("/resolve/main/")[-1] for r in official_hub.requests if r.startswith("GET")}
    assert fetched == {"onnx/model.onnx", "config.json", "tokenizer.json", "modules.json", "1_Pooling/config.json",
                       "sentence_bert_config.json", "tokenizer_config.json"}
    np.testing.assert_allclose(np.load(tmp_path / "m.npy"),
                               Embedder(official["bert-mean"], device="cpu").encode(["hub text", "another"]), atol=1e-6)

    result = _load("rerank", "BAAI/bge-reranker-base", tmp_path / "s.npy", env)
    assert result.returncode == 0, result.stdout + result.stderr
    np.testing.assert_allclose(np.load(tmp_path / "s.npy"),
                               Reranker(official["bert-rerank"], device="cpu").compute_score([("hub text", "another")]),
                               atol=1e-5)
    assert not any("safetensors" in r for r in official_hub.requests)

    # cached: no request at all, the hub silent
    silent = Silent()
    try:
        for task, repo in (("embed", "BAAI/bge-m3"), ("embed", "acme/st-mean-onnx"), ("rerank", "BAAI/bge-reranker-base")):
            result = _load(task, repo, tmp_path / "w.npy", hub_env(silent.endpoint, tmp_path / "hf"))
            assert result.returncode == 0, result.stdout + result.stderr
        # workers open the same cached snapshot by name: bge-m3's pooling comes from the registry, by its name
        result = _load("embed", "BAAI/bge-m3", tmp_path / "w.npy", hub_env(silent.endpoint, tmp_path / "hf"), workers=2)
        assert result.returncode == 0, result.stdout + result.stderr
        np.testing.assert_allclose(np.load(tmp_path / "w.npy"), np.load(tmp_path / "v.npy"), atol=1e-6)
        assert silent.connections == []
    finally:
        silent.close()

    # a cached file that changed since download fails against the hub's own hash, naming the file and the fix
    blob = next((tmp_path / "hf" / "hub" / "models--BAAI--bge-m3" / "snapshots").glob("*/onnx/model.onnx_data")).resolve()
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    result = _load("embed", "BAAI/bge-m3", tmp_path / "x.npy", hub_env(endpoint, tmp_path / "hf", offline=True))
    assert result.returncode == 1
    assert "ModelIntegrityError:" in result.stdout and "onnx/model.onnx_data does not match the hash the hub gave" in result.stdout
    assert "bge-onnx pull" in result.stdout


def test_repo_without_an_onnx_model(checkpoints, tmp_path):
    server = Hub({"acme/raw-checkpoint": checkpoints["bert-cls"]})
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        result = _load("embed", "acme/raw-checkpoint", tmp_path / "v.npy",
                       hub_env(f"http://127.0.0.1:{server.server_address[1]}", tmp_path / "hf"))
        assert result.returncode == 1
        assert "hub repo 'acme/raw-checkpoint' has neither bge_onnx.json nor an ONNX graph" in result.stdout
        assert "bge-onnx export acme/raw-checkpoint --out DIR" in result.stdout
        assert not any("safetensors" in r for r in server.requests)
    finally:
        server.shutdown()
        server.server_close()


def test_an_unreachable_hub_fails_within_its_timeout_when_nothing_is_cached(tmp_path):
    silent = Silent()  # accepts connections and never answers, as behind a firewall that drops replies
    try:
        env = {**hub_env(silent.endpoint, tmp_path / "hf"), "HF_HUB_ETAG_TIMEOUT": "2"}
        start = time.monotonic()
        result = _load("embed", "BAAI/bge-small-en-v1.5", tmp_path / "v.npy", env)
        took = time.monotonic() - start
    finally:
        silent.close()
    assert result.returncode == 1
    assert "cannot reach the hub at" in result.stdout and "HF_HUB_ETAG_TIMEOUT=2" in result.stdout
    assert "bge-onnx pull" in result.stdout
    assert took < 30, f"took {took:.0f} s"  # huggingface_hub alone retries for minutes


def test_info_describes_an_official_folder(official):
    result = subprocess.run([sys.executable, "-m", "bge_onnx", "info", str(official["bert-mean"]), "--json"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    spec = json.loads(result.stdout)
    assert (spec["pooling"], spec["output"], spec["variants"]["fp32"]["file"]) == ("mean", "last_hidden_state",
                                                                                 "onnx/model.onnx")
