"""Loading from a hub repo id, for real, against a local HTTP server that speaks the hub's file API."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from hubserver import COMMIT, Hub, Silent, hub_env


@pytest.fixture()
def hub(exported, checkpoints, tmp_path_factory):
    # the BGE repo as BAAI publishes it: model.safetensors and a pytorch_model.bin of the same weights
    both = Path(shutil.copytree(checkpoints["bert-cls"], tmp_path_factory.mktemp("both") / "bge-small-en-v1.5"))
    shutil.copyfile(both / "model.safetensors", both / "pytorch_model.bin")  # its bytes are never read: not fetched
    server = Hub({
        "acme/tiny-bge": exported["bert-cls"],
        "acme/raw-checkpoint": checkpoints["bert-cls"],
        "BAAI/bge-small-en-v1.5": both,
    })
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


_SCRIPT = """
import json, sys, numpy as np, bge_onnx
options = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
try:
    vectors = bge_onnx.Embedder(sys.argv[1], device="cpu", **options).encode(["hub text", "another"])
except bge_onnx.BgeOnnxError as err:
    print(type(err).__name__ + ": " + str(err)); sys.exit(1)
np.save(sys.argv[2], vectors)
"""


def _load(
    model: str, out: Path, home: Path, endpoint: str, offline: bool = False, **options: object
) -> subprocess.CompletedProcess:
    # huggingface_hub reads HF_ENDPOINT when imported, so each load runs in a fresh process
    return subprocess.run([sys.executable, "-c", _SCRIPT, model, str(out), json.dumps(options)],
                          env=hub_env(endpoint, home, offline), capture_output=True, text=True, timeout=300)


def test_repo_id_downloads_only_what_the_runtime_needs(hub, exported, tmp_path):
    endpoint = f"http://127.0.0.1:{hub.server_address[1]}"
    result = _load("acme/tiny-bge", tmp_path / "v.npy", tmp_path / "hf", endpoint)
    assert result.returncode == 0, result.stdout + result.stderr
    from bge_onnx import Embedder

    local = Embedder(exported["bert-cls"], device="cpu").encode(["hub text", "another"])
    np.testing.assert_allclose(np.load(tmp_path / "v.npy"), local, atol=1e-6)
    fetched = {r.split("/resolve/main/")[-1] for r in hub.requests if r.startswith("GET")}
    assert fetched == {"bge_onnx.json", "tokenizer.json", "model.onnx", "model.onnx.data"}

    # later loads work from the cache with the hub gone (serverless cold starts, offline hosts)
    hub.requests.clear()
    result = _load("acme/tiny-bge", tmp_path / "w.npy", tmp_path / "hf", endpoint, offline=True)
    assert result.returncode == 0, result.stdout + result.stderr
    np.testing.assert_allclose(np.load(tmp_path / "w.npy"), local, atol=1e-6)
    assert hub.requests == []


def test_unknown_repo_and_offline_miss(hub, tmp_path):
    endpoint = f"http://127.0.0.1:{hub.server_address[1]}"
    result = _load("acme/does-not-exist", tmp_path / "v.npy", tmp_path / "hf", endpoint)
    assert result.returncode == 1
    assert "ModelFilesError: hub repo 'acme/does-not-exist' does not exist, or is private" in result.stdout
    assert "HF_TOKEN" in result.stdout
    result = _load("acme/tiny-bge", tmp_path / "v.npy", tmp_path / "empty-cache", endpoint, offline=True)
    assert result.returncode == 1 and "is not in the local cache" in result.stdout
    assert "HF_HUB_OFFLINE=1 is set, which forbids the network" in result.stdout
    assert "`bge-onnx pull acme/tiny-bge`" in result.stdout and "check the network" not in result.stdout


_EXPORT = """
import sys
from bge_onnx_export import export_model
spec = export_model(sys.argv[1], sys.argv[2], log=None)
print(spec.source["id"], spec.source["revision"], spec.pooling.value, spec.query_instruction)
"""


def test_export_from_a_hub_repo_id(hub, tmp_path):
    endpoint = f"http://127.0.0.1:{hub.server_address[1]}"
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1"}

    def export(repo_id: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-c", _EXPORT, repo_id, str(tmp_path / repo_id.replace("/", "--"))],
            env=env, capture_output=True, text=True, timeout=300,
        )

    # a known id: pooling and instruction from the registry, the revision pinned to the commit served
    result = export("BAAI/bge-small-en-v1.5")
    assert result.returncode == 0, result.stderr[-3000:]
    fetched = [r for r in hub.requests if "/resolve/" in r]
    assert any(r.endswith("/model.safetensors") for r in fetched)
    assert not any("pytorch_model" in r for r in fetched), "the .bin beside the safetensors was downloaded too"
    assert result.stdout.split()[:3] == ["BAAI/bge-small-en-v1.5", COMMIT, "cls"]
    assert result.stdout.strip().endswith("Represent this sentence for searching relevant passages:")
    # an unknown id with no sentence-transformers config: the export asks instead of guessing
    result = export("acme/raw-checkpoint")
    assert result.returncode == 1 and "Pass --pooling cls or --pooling mean" in result.stderr


def test_auto_precision_downloads_only_the_chosen_variant_and_a_cached_load_makes_no_request(model_copy, tmp_path):
    from bge_onnx import Embedder, Precision
    from bge_onnx_export import precision

    repo = model_copy("bert-cls")
    # an int8 variant that passed its gate (a gate this tiny random model meets), so "auto" picks it on CPU
    precision.add_variant(repo, Precision.INT8, gate={"min_cosine": 0.0})
    expected = Embedder(repo, device="cpu", precision="int8").encode(["hub text", "another"])
    server = Hub({"acme/tiny-int8": repo})
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        result = _load("acme/tiny-int8", tmp_path / "v.npy", tmp_path / "hf", endpoint)
        assert result.returncode == 0, result.stdout + result.stderr
        fetched = {r.split("/resolve/main/")[-1] for r in server.requests if r.startswith("GET")}
        assert fetched == {"bge_onnx.json", "tokenizer.json", "model_int8.onnx", "model_int8.onnx.data"}  # not fp32
    finally:
        server.shutdown()
        server.server_close()
    np.testing.assert_allclose(np.load(tmp_path / "v.npy"), expected, atol=1e-6)

    # cached: no request at all, not even the HEAD that asks whether main moved (HF_HUB_OFFLINE unset)
    silent = Silent()
    try:
        result = _load("acme/tiny-int8", tmp_path / "w.npy", tmp_path / "hf", silent.endpoint)
        assert result.returncode == 0, result.stdout + result.stderr
        assert silent.connections == []
    finally:
        silent.close()
    np.testing.assert_allclose(np.load(tmp_path / "w.npy"), expected, atol=1e-6)


def test_gated_repo_and_unknown_revision_name_the_fix(tmp_path, exported):
    server = Hub({"acme/tiny-bge": exported["bert-cls"]}, gated=("acme/gated",))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        result = _load("acme/gated", tmp_path / "v.npy", tmp_path / "hf", endpoint)
        assert result.returncode == 1, result.stdout + result.stderr
        assert "hub repo 'acme/gated' is gated: accept its terms on the hub" in result.stdout
        assert "HF_TOKEN" in result.stdout
        result = _load("acme/tiny-bge", tmp_path / "v.npy", tmp_path / "hf", endpoint, revision="v9")
        assert result.returncode == 1, result.stdout + result.stderr
        assert "hub repo 'acme/tiny-bge' has no revision 'v9'" in result.stdout
    finally:
        server.shutdown()
        server.server_close()


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bge_onnx", *args], env=env, capture_output=True, text=True,
                          timeout=300, input="hub text\nanother\n")


def test_pull_fills_the_cache_for_local_files_only_loads(hub, exported, tmp_path):
    endpoint = f"http://127.0.0.1:{hub.server_address[1]}"
    home = tmp_path / "hf"
    result = _load("acme/tiny-bge", tmp_path / "v.npy", home, endpoint, local_files_only=True)
    assert result.returncode == 1 and "local_files_only=True forbids the network" in result.stdout
    assert "bge-onnx pull acme/tiny-bge" in result.stdout and hub.requests == []

    result = _cli("pull", "acme/tiny-bge", "--revision", COMMIT, env=hub_env(endpoint, home))
    assert result.returncode == 0, result.stderr
    folder = Path(result.stdout.strip())
    assert folder.is_dir() and COMMIT in folder.name
    assert {p.name for p in folder.iterdir()} == {"bge_onnx.json", "tokenizer.json", "model.onnx", "model.onnx.data"}

    silent = Silent()  # after a pull: no network, with local_files_only or without
    try:
        for options in ({"local_files_only": True, "revision": COMMIT}, {"revision": COMMIT}):
            result = _load("acme/tiny-bge", tmp_path / "w.npy", home, silent.endpoint, **options)
            assert result.returncode == 0, result.stdout + result.stderr
        # nor does it import huggingface_hub's downloader (~0.15 s of every cold start)
        script = (f"import sys, bge_onnx; bge_onnx.Embedder('acme/tiny-bge', device='cpu', revision={COMMIT!r}); "
                  "print('huggingface_hub.file_download' in sys.modules)")
        imported = subprocess.run([sys.executable, "-c", script], env=hub_env(silent.endpoint, home),
                                  capture_output=True, text=True, timeout=120)
        assert imported.stdout.strip() == "False", imported.stdout + imported.stderr
        result = _cli("embed", "acme/tiny-bge", "--revision", COMMIT, env=hub_env(silent.endpoint, home))
        assert result.returncode == 0, result.stderr
        assert silent.connections == []
    finally:
        silent.close()
    from bge_onnx import Embedder

    local = Embedder(exported["bert-cls"], device="cpu").encode(["hub text", "another"])
    np.testing.assert_allclose(np.load(tmp_path / "w.npy"), local, atol=1e-6)
    np.testing.assert_allclose(np.array([json.loads(line) for line in result.stdout.splitlines()]), local, atol=1e-6)


def test_models_lists_the_registry(tmp_path):
    from bge_onnx.registry import KNOWN_MODELS

    result = _cli("models", env=dict(os.environ))
    assert result.returncode == 0, result.stderr
    rows = [line.split("\t") for line in result.stdout.splitlines()]
    assert [row[0] for row in rows] == list(KNOWN_MODELS)
    for row in rows:
        known = KNOWN_MODELS[row[0]]
        assert row[1:5] == [known.task.value, known.pooling.value if known.pooling else "-", str(known.dim),
                            str(known.max_length)]
        assert row[5] == (known.query_instruction or "-")
        assert row[6] == (" ".join(known.onnx_files) or "-")
