"""Bad input and bad model folders: each gives a clear error naming what was wrong."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from bge_onnx import (
    BgeOnnxError, ConfigError, Embedder, InputError, InputTypeError, ModelFilesError, ModelIntegrityError,
    ProviderError, Reranker, WrongTaskError,
)


@pytest.fixture(scope="module")
def embedder(exported):
    return Embedder(exported["bert-cls"], device="cpu")


@pytest.mark.parametrize(
    ("texts", "message"),
    [
        (["ok", 42, "ok"], r"texts\[1\] is int 42, expected str"),
        (["ok", None], r"texts\[1\] is NoneType None, expected str"),
        ([b"bytes"], r"texts\[0\] is bytes b'bytes', expected str"),
        ([["nested"]], r"texts\[0\] is list \['nested'\], expected str"),
        (b"raw bytes", r"texts must be a list of str, got bytes"),
        (3.5, r"texts must be a list of str, got float 3.5"),
        ({"text": "x"}.items(), r"texts\[0\] is tuple \('text', 'x'\), expected str"),
    ],
)
def test_bad_texts_name_the_item(embedder, texts, message):
    with pytest.raises(InputTypeError, match=message) as info:
        embedder.encode(texts)
    assert isinstance(info.value, TypeError) and isinstance(info.value, BgeOnnxError)


def test_lone_surrogate_names_index_and_position(embedder):
    with pytest.raises(InputError, match=r"texts\[2\] cannot be encoded as UTF-8 \(surrogates not allowed at position 4\)"):
        embedder.encode(["fine", "also fine", "bad \udc80 text"])
    with pytest.raises(InputError, match=r"queries\[0\] cannot be encoded"):
        embedder.encode_queries(["\ud83d"])


def test_long_repr_is_shortened(embedder):
    with pytest.raises(InputTypeError) as info:
        embedder.encode([list(range(1000))])
    assert len(str(info.value)) < 200


def test_missing_folder_and_manifest(tmp_path):
    with pytest.raises(ModelFilesError, match="does not exist"):
        Embedder(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=r"bge_onnx.json is missing: .* is not a bge-onnx model folder"):
        Embedder(tmp_path)
    with pytest.raises(InputTypeError, match="must be a folder path or a hub repo id"):
        Embedder(42)


def test_missing_model_file(model_copy):
    folder = model_copy("bert-cls")
    (folder / "model.onnx").unlink()
    with pytest.raises(ModelFilesError, match=r"model.onnx is missing \(listed in bge_onnx.json\)"):
        Embedder(folder)


def test_changed_file_fails_the_hash(model_copy):
    folder = model_copy("bert-cls")
    with open(folder / "model.onnx", "r+b") as f:
        f.seek(1000)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(ModelIntegrityError, match=r"model.onnx does not match the sha256 in bge_onnx.json"):
        Embedder(folder)


def test_hash_is_checked_when_the_graph_loads(model_copy):
    # the check runs beside the session's load: a graph that loads fine must still fail on a wrong hash
    folder = model_copy("bert-cls")
    manifest = json.loads((folder / "bge_onnx.json").read_text())
    manifest["files"]["model.onnx"] = "0" * 64
    (folder / "bge_onnx.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelIntegrityError, match=r"model.onnx does not match the sha256 in bge_onnx.json"):
        Embedder(folder)


def test_unparseable_changed_graph_reports_the_hash(model_copy):
    folder = model_copy("bert-cls")
    (folder / "model.onnx").write_bytes(b"this is not a protobuf")
    with pytest.raises(ModelIntegrityError, match=r"model.onnx does not match the sha256 in bge_onnx.json"):
        Embedder(folder)


def test_corrupt_onnx_with_matching_hash(model_copy):
    from bge_onnx.spec import sha256_file

    folder = model_copy("bert-cls")
    (folder / "model.onnx").write_bytes(b"this is not a protobuf")
    manifest = json.loads((folder / "bge_onnx.json").read_text())
    manifest["files"]["model.onnx"] = sha256_file(folder / "model.onnx")
    (folder / "bge_onnx.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelIntegrityError, match=r"model.onnx could not be loaded by onnxruntime"):
        Embedder(folder)


def test_corrupt_tokenizer_with_matching_hash(model_copy):
    from bge_onnx.spec import sha256_file

    folder = model_copy("bert-cls")
    (folder / "tokenizer.json").write_text("{not json")
    manifest = json.loads((folder / "bge_onnx.json").read_text())
    manifest["files"]["tokenizer.json"] = sha256_file(folder / "tokenizer.json")
    (folder / "bge_onnx.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelIntegrityError, match=r"tokenizer.json is not a valid tokenizer file"):
        Embedder(folder)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: "{broken", r"bge_onnx.json is not valid JSON"),
        (lambda m: json.dumps([1, 2]), r"must hold a JSON object, got list"),
        (lambda m: json.dumps({**m, "format_version": 99}), r"format_version 99; this bge-onnx reads versions 1, 2"),
        (lambda m: json.dumps({**m, "pooling": "max"}), r"not a valid manifest: 'max' is not a valid Pooling"),
        (lambda m: json.dumps({**m, "dim": 0}), r"dim must be a positive int, got 0"),
    ],
)
def test_bad_manifest(model_copy, edit, message):
    folder = model_copy("bert-cls")
    manifest = json.loads((folder / "bge_onnx.json").read_text())
    (folder / "bge_onnx.json").write_text(edit(manifest))
    with pytest.raises(ModelIntegrityError, match=message):
        Embedder(folder)


def test_wrong_task_both_ways(exported):
    with pytest.raises(WrongTaskError, match=r"holds an embedding model \(BertModel\); load it with bge_onnx.Embedder, not Reranker"):
        Reranker(exported["bert-cls"])
    with pytest.raises(WrongTaskError, match=r"holds a reranker model .*load it with bge_onnx.Reranker, not Embedder"):
        Embedder(exported["xlmr-rerank"])


def test_cuda_requested_without_cuda_is_an_error_not_a_fallback(exported):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this machine has CUDA: the error path cannot be reached")  # never on CI's CPU machine
    from bge_onnx.session import has_nvidia_gpu

    if has_nvidia_gpu():  # a GPU without onnxruntime-gpu: the fix is the GPU build, from the checkout
        message = r"device='cuda' but onnxruntime offers no CUDAExecutionProvider.*pip install ./gpu \(in a bge-onnx checkout\)"
    else:  # no GPU at all (CI): no install line, which could not help
        message = r"device='cuda' but this machine shows no NVIDIA GPU .*run on the CPU with device='cpu'"
    with pytest.raises(ProviderError, match=message):
        Embedder(exported["bert-cls"], device="cuda")
    with pytest.raises(InputError, match=r"device must be 'auto', 'cpu' or 'cuda', got 'tpu'"):
        Embedder(exported["bert-cls"], device="tpu")
    assert Embedder(exported["bert-cls"], device="auto").providers == ["CPUExecutionProvider"]


def test_configuration_and_missing_extras_raise_the_promised_classes(exported):
    """A bad setting is a ConfigError (ValueError), a missing extra a MissingExtraError (ImportError), and an error
    in a worker process reaches the caller as the same class."""
    pytest.importorskip("starlette")
    from bge_onnx.serve import ServeConfig
    from bge_onnx.workers import WorkerPool

    with pytest.raises(ConfigError, match="serve needs a MODEL"):
        ServeConfig(None)
    with pytest.raises(ValueError, match="max_client_batch_size must be a positive int"):
        ServeConfig("m", max_client_batch_size=0)
    script = ("import sys; sys.modules['pyarrow'] = None; from bge_onnx.files import _pyarrow; "
              "from bge_onnx.errors import MissingExtraError\n"
              "try:\n    _pyarrow()\nexcept MissingExtraError as err:\n    print('ok', err)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert result.stdout.startswith("ok") and 'pip install "bge-onnx[files]"' in result.stdout, result.stderr
    pool = WorkerPool(exported["bert-cls"], task="embed", processes=2, settings={"precision": "fp32"})
    try:
        with pytest.raises(InputTypeError, match=r"worker 1 of 2 .*InputTypeError"):
            pool.map("encode", [["fine"], ["fine", 42]], {})
    finally:
        pool.close()


def test_no_model_is_the_default_model_for_an_embedder_and_an_error_otherwise(minilm_onnx, monkeypatch, tmp_path):
    # as the CLI: Embedder() runs the packaged all-MiniLM-L6-v2 from the cache (exported there on first use)
    from bge_onnx import M3Embedder, Reranker

    shutil.copytree(minilm_onnx, tmp_path / "cache" / "all-MiniLM-L6-v2")
    monkeypatch.setenv("BGE_ONNX_CACHE", str(tmp_path / "cache"))
    text = ["the default model, from Python"]
    np.testing.assert_allclose(Embedder(device="cpu").encode(text), Embedder(minilm_onnx, device="cpu").encode(text),
                               atol=1e-6)
    for cls in (Reranker, M3Embedder):
        with pytest.raises(InputTypeError, match=rf"{cls.__name__}\(\) needs a model: a folder exported by bge-onnx"):
            cls(device="cpu")


def test_nvidia_gpu_is_read_from_the_driver_files(tmp_path):
    from bge_onnx.session import has_nvidia_gpu

    (tmp_path / "proc").mkdir()
    assert not has_nvidia_gpu(tmp_path)
    (tmp_path / "proc" / "driver" / "nvidia" / "gpus" / "0000:01:00.0").mkdir(parents=True)
    assert has_nvidia_gpu(tmp_path)


def test_an_unknown_keyword_names_the_class_and_the_nearest_keyword(exported):
    from bge_onnx import Embedder, M3Embedder, Reranker

    with pytest.raises(InputTypeError, match=r"^Embedder\(\) got an unexpected keyword argument 'devce' \(did you "
                                             r"mean 'device'\?\); its keywords are device, threads, max_length"):
        Embedder(exported["bert-cls"], devce="cpu")
    with pytest.raises(TypeError, match=r"^Reranker\(\) got an unexpected keyword argument 'query_max_len' \(did you "
                                        r"mean 'query_max_length'\?\)"):  # still a TypeError, as Python's own
        Reranker(exported["bert-rerank"], query_max_len=10)
    with pytest.raises(InputTypeError, match=r"^M3Embedder\(\) got an unexpected keyword argument 'colour'; its"):
        M3Embedder(exported["xlmr-cls"], colour="blue")
    assert Embedder(model=exported["bert-cls"], device="cpu").dim == 32  # model= by name still works

    class Options(Embedder):  # a subclass that takes any keyword decides itself
        def __init__(self, model, **options):
            self.extra = options.pop("extra", None)
            super().__init__(model, **options)

    assert Options(exported["bert-cls"], device="cpu", extra=1).extra == 1

