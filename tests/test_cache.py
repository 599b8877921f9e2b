"""Verification stamps (bge_onnx.cache): an unchanged file is hashed once, a changed one always, `bge-onnx verify`
hashes everything; and the session switches read from the environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bge_onnx import ConfigError, Embedder, ModelIntegrityError
from bge_onnx.cache import Stamps, identity


def stamped(folder: Path) -> dict:
    return Stamps(folder).files


def test_a_load_stamps_the_files_it_hashed(model_copy):
    folder = model_copy("bert-cls")
    Embedder(folder, device="cpu")
    files = stamped(folder)
    spec = json.loads((folder / "bge_onnx.json").read_text())
    assert {"tokenizer.json", "model.onnx", "model.onnx.data"} <= set(files)
    for name, entry in files.items():
        assert entry["hash"] == spec["files"][name]
        assert entry["identity"] == identity(folder / name)


def test_a_file_rewritten_with_its_old_mtime_is_hashed_again(model_copy):
    folder = model_copy("bert-cls")
    data = folder / "model.onnx.data"
    Embedder(folder, device="cpu")
    before = os.stat(data)
    with open(data, "r+b") as f:
        f.seek(64)
        f.write(b"\x7f\x7f\x7f\x7f")
    os.utime(data, ns=(before.st_atime_ns, before.st_mtime_ns))  # mtime put back; ctime cannot be
    assert os.stat(data).st_mtime_ns == before.st_mtime_ns
    with pytest.raises(ModelIntegrityError, match=r"model.onnx.data does not match the sha256 in bge_onnx.json"):
        Embedder(folder, device="cpu")


def test_a_changed_manifest_hash_is_not_vouched_for(model_copy):
    folder = model_copy("bert-cls")
    Embedder(folder, device="cpu")
    manifest = json.loads((folder / "bge_onnx.json").read_text())
    manifest["files"]["tokenizer.json"] = "0" * 64
    (folder / "bge_onnx.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelIntegrityError, match=r"tokenizer.json does not match the sha256"):
        Embedder(folder, device="cpu")


def test_an_unwritable_cache_still_loads(model_copy, monkeypatch, tmp_path):
    folder = model_copy("bert-cls")
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder would be")
    monkeypatch.setenv("BGE_ONNX_CACHE", str(blocker))
    first = Embedder(folder, device="cpu").encode(["a text"])
    assert stamped(folder) == {} and blocker.read_text().startswith("a file")
    np.testing.assert_array_equal(Embedder(folder, device="cpu").encode(["a text"]), first)


def test_stamps_live_in_the_cache_not_in_the_model_folder(model_copy):
    folder = model_copy("bert-cls")
    before = sorted(p.name for p in folder.iterdir())
    Embedder(folder, device="cpu")
    assert "model.onnx" in stamped(folder)
    assert sorted(p.name for p in folder.iterdir()) == before
    assert Stamps(folder).path.is_relative_to(Path(os.environ["BGE_ONNX_CACHE"]))


def verify(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bge_onnx", "verify", *args], capture_output=True, text=True)


def test_verify_hashes_in_full_what_a_stamp_vouches_for(model_copy):
    # a stamp is trusted by a load (the cache is as trusted as the model folder); `bge-onnx verify` is not
    folder = model_copy("bert-cls")
    data = folder / "model.onnx.data"
    result = verify(str(folder))
    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.split("\n")[:-1]) == sorted(
        f"ok\t{name}" for name in json.loads((folder / "bge_onnx.json").read_text())["files"])
    with open(data, "r+b") as f:
        f.seek(64)
        f.write(b"\x7f\x7f\x7f\x7f")
    stamps = Stamps(folder)
    stamps.add("model.onnx.data", stamps.files["model.onnx.data"]["hash"], identity(data))  # a forged stamp
    stamps.save()
    Embedder(folder, device="cpu")  # the forged stamp is believed
    result = verify(str(folder))
    assert result.returncode == 1
    assert "model.onnx.data does not match the sha256 in bge_onnx.json" in result.stderr


def test_verify_help_and_a_missing_folder(tmp_path):
    assert verify("--help").returncode == 0
    result = verify(str(tmp_path / "nothing"))
    assert result.returncode == 1 and "does not exist" in result.stderr


@pytest.mark.parametrize(("name", "expected"), [
    ("BGE_ONNX_SPIN", r"1 \(spin\), 0 \(sleep\) or run \(spin within a call\)"),
    ("BGE_ONNX_SHARE_WEIGHTS", "1/true/yes/on or 0/false/no/off"),
])
def test_switches_refuse_what_they_do_not_know(exported, monkeypatch, name, expected):
    monkeypatch.setenv(name, "maybe")
    with pytest.raises(ConfigError, match=rf"\${name} must be {expected}, got 'maybe'"):
        Embedder(exported["bert-mean"], device="cpu")


def test_each_spin_mode_gives_the_same_vectors(exported, sentences, monkeypatch):
    texts = sentences[:40]
    expected = Embedder(exported["bert-mean"], device="cpu").encode(texts)
    for value, mode, entries in (("run", "run", {"session.force_spinning_stop": "1"}),
                                 ("off", "0", {"session.intra_op.allow_spinning": "0"}),
                                 ("0", "0", {"session.intra_op.allow_spinning": "0"}), ("yes", "1", {})):
        monkeypatch.setenv("BGE_ONNX_SPIN", value)
        embedder = Embedder(exported["bert-mean"], device="cpu")
        assert embedder._model.session.spin == mode
        given = embedder._model.session._session.get_session_options()  # what onnxruntime was told
        for key in ("session.force_spinning_stop", "session.intra_op.allow_spinning"):
            if key in entries:
                assert given.get_session_config_entry(key) == entries[key]
            else:
                with pytest.raises(Exception, match="does not have configuration with key"):
                    given.get_session_config_entry(key)
        np.testing.assert_allclose(embedder.encode(texts), expected, atol=1e-6)


def test_shared_weights_give_the_same_vectors(exported, sentences, monkeypatch):
    texts = sentences[:40]
    packed = Embedder(exported["bert-mean"], device="cpu")
    monkeypatch.setenv("BGE_ONNX_SHARE_WEIGHTS", "1")
    monkeypatch.setenv("BGE_ONNX_SPIN", "1")
    shared = Embedder(exported["bert-mean"], device="cpu")
    assert shared._model.session.shares_weights and not packed._model.session.shares_weights
    np.testing.assert_allclose(shared.encode(texts), packed.encode(texts), atol=1e-6)
