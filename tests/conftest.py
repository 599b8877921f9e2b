"""Fixtures: tiny seeded models of every architecture (and the packaged real one), exported once per run."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from sentences import ordinary_sentences
from tiny_models import KINDS, RERANK_KINDS, build_checkpoint, build_official, minilm_path


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {kind: build_checkpoint(kind, root / name) for kind, (name, _) in KINDS.items()}


@pytest.fixture(scope="session")
def exported(checkpoints, tmp_path_factory) -> dict[str, Path]:
    from bge_onnx_export import export_model

    root = tmp_path_factory.mktemp("exported")
    out = {}
    for kind, (name, options) in KINDS.items():
        out[kind] = root / name
        export_model(checkpoints[kind], out[kind], log=None, **options)
    return out


@pytest.fixture(scope="session")
def traced(checkpoints, tmp_path_factory) -> dict[str, Path]:
    """kind -> the same checkpoint exported by tracing it with torch (graph_from="torch"); ``exported`` builds the
    graph from the weights."""
    from bge_onnx_export import export_model

    root = tmp_path_factory.mktemp("traced")
    out = {}
    for kind, (name, options) in KINDS.items():
        out[kind] = root / name
        export_model(checkpoints[kind], out[kind], log=None, graph_from="torch", **options)
    return out


@pytest.fixture(scope="session")
def int8_exported(exported, tmp_path_factory) -> dict[str, Path]:
    """kind -> a copy of the exported folder with its int8 variant (kept whether or not the random tiny model passes
    the gate: these folders test what int8 graphs do, not how accurate they are)."""
    from bge_onnx.spec import Precision
    from bge_onnx_export import precision

    root = tmp_path_factory.mktemp("int8")
    out = {}
    for kind in KINDS:
        out[kind] = Path(shutil.copytree(exported[kind], root / KINDS[kind][0]))
        precision.add_variant(out[kind], Precision.INT8, allow_below_gate=True)
    return out


@pytest.fixture(scope="session")
def official(checkpoints, tmp_path_factory) -> dict[str, Path]:
    """kind -> the checkpoint with its plain graph in onnx/, as the official BAAI repos publish it (bge-m3's
    stand-in with its weights in onnx/model.onnx_data)."""
    root = tmp_path_factory.mktemp("official")
    return {kind: build_official(checkpoints[kind], root / KINDS[kind][0], external_data=kind == "xlmr-cls")
            for kind in KINDS}


@pytest.fixture(scope="session")
def torch_models(checkpoints):
    """kind -> (PyTorch model, transformers tokenizer), the reference side."""
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    models = {}
    for kind, folder in checkpoints.items():
        cls = AutoModelForSequenceClassification if kind in RERANK_KINDS else AutoModel
        models[kind] = (cls.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder))
    return models


@pytest.fixture(scope="session")
def minilm_onnx(tmp_path_factory) -> Path:
    from bge_onnx_export import export_model

    out = tmp_path_factory.mktemp("real") / "all-MiniLM-L6-v2"
    export_model(minilm_path(), out, log=None)
    return out


@pytest.fixture()
def model_copy(exported, tmp_path):
    """A throwaway copy of an exported folder, for tests that damage it."""

    def copy(kind: str) -> Path:
        return Path(shutil.copytree(exported[kind], tmp_path / kind))

    return copy


@pytest.fixture(scope="session")
def sentences() -> list[str]:
    """Everyday sentences written by the tests themselves (a clone has no data set beside it)."""
    return ordinary_sentences(500)


@pytest.fixture(scope="session", autouse=True)
def own_cache(tmp_path_factory):
    """bge-onnx's cache (verification stamps, the default model's export) in the run's temporary folder, for every
    test and the processes they start: a run never reads or writes the user's ~/.cache/bge-onnx."""
    import os

    before = os.environ.get("BGE_ONNX_CACHE")
    os.environ["BGE_ONNX_CACHE"] = str(tmp_path_factory.mktemp("bge-onnx-cache"))
    yield
    if before is None:
        os.environ.pop("BGE_ONNX_CACHE", None)
    else:
        os.environ["BGE_ONNX_CACHE"] = before
