"""bge-onnx embed --input FILE -o OUT through real subprocesses: formats, ids, atomic output, --resume, bad rows."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa  # the test extra installs it, as the files extra does
import pyarrow.parquet as pq
import pytest

from bge_onnx import Embedder


def cli(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bge_onnx", *args], check=False, input=stdin,
                          capture_output=True, timeout=600)


@pytest.fixture(scope="module")
def model(exported) -> str:
    return str(exported["bert-mean"])


@pytest.fixture(scope="module")
def encoder(model):
    return Embedder(model, device="cpu")


def texts(n: int) -> list[str]:
    return [f"passage {i}: " + "word " * (i % 13) for i in range(n)]


def write_input(path, fmt: str, items: list[str], ids: list | None = None) -> None:
    if fmt == "txt":
        path.write_text("".join(t + "\n" for t in items), encoding="utf-8")
    elif fmt == "jsonl":
        rows = [{"text": t} if ids is None else {"doc": i, "text": t} for t, i in zip(items, ids or items)]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    else:
        columns = {"text": items} if ids is None else {"doc": ids, "text": items}
        pq.write_table(pa.table(columns), path, row_group_size=700)


def read_output(path) -> tuple[list, np.ndarray]:
    """(ids, vectors) of an output file; ids None for .npy."""
    if path.suffix == ".npy":
        return None, np.load(path)
    if path.suffix == ".parquet":
        table = pq.read_table(path)
        assert table.schema.field("embedding").type == pa.list_(pa.float32())
        return table["id"].to_pylist(), np.array(table["embedding"].to_pylist(), dtype=np.float32)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return [r["id"] for r in rows], np.array([r["embedding"] for r in rows], dtype=np.float32)


@pytest.mark.parametrize("source, target", [("txt", "npy"), ("jsonl", "parquet"), ("parquet", "jsonl"),
                                            ("parquet", "parquet"), ("jsonl", "npy")])
def test_formats_and_ids(model, encoder, tmp_path, source, target):
    items = texts(1500)  # more than one chunk (1024 rows) and, for Parquet, several row groups
    ids = None if source == "txt" else [f"doc-{i}" for i in range(len(items))]
    src, out = tmp_path / f"in.{source}", tmp_path / f"out.{target}"
    write_input(src, source, items, ids)
    args = ["embed", model, "--input", str(src), "-o", str(out)] + ([] if ids is None else ["--id-field", "doc"])
    result = cli(*args)
    assert result.returncode == 0, result.stderr
    assert f"wrote 1500 vectors to {out}".encode() in result.stderr and result.stdout == b""
    got_ids, vectors = read_output(out)
    np.testing.assert_allclose(vectors, encoder.encode(items), atol=1e-6)
    assert vectors.dtype == np.float32 and vectors.shape == (1500, 32)
    if got_ids is not None:
        assert got_ids == (ids or list(range(1, 1501)))
    assert not (tmp_path / f"out.{target}.partial").exists()


def test_line_numbers_are_ids_and_empty_input(model, tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.parquet"
    src.write_text('"a"\n\n{"text": "b", "id": 70}\n{"text": "c"}\n', encoding="utf-8")
    assert cli("embed", model, "--input", str(src), "-o", str(out)).returncode == 0
    assert read_output(out)[0] == [1, 70, 4]  # the 1-based line number when a row has no id
    src.write_text("", encoding="utf-8")
    for name in ("empty.npy", "empty.parquet", "empty.jsonl"):
        result = cli("embed", model, "--input", str(src), "-o", str(tmp_path / name))
        assert result.returncode == 0, result.stderr
        assert read_output(tmp_path / name)[1].shape[0] == 0
    assert np.load(tmp_path / "empty.npy").shape == (0, 32)


def test_bad_rows_stop_the_run_naming_the_line_and_leave_no_output(model, tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.npy"
    lines = [json.dumps(t) for t in texts(1100)]
    lines[1049] = '{"text": 5}'
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = cli("embed", model, "--input", str(src), "-o", str(out))
    assert result.returncode == 1 and b"Traceback" not in result.stderr
    assert f"error: {src} line 1050: expected a JSON string or an object with a string 'text', got int 5".encode() \
        in result.stderr
    assert not out.exists()  # nothing that looks finished; the first chunk waits in out.npy.partial for --resume
    assert (tmp_path / "out.npy.partial").stat().st_size == 128 + 1024 * 32 * 4

    lines[1049] = '{"txt": "x"}'
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = cli("embed", model, "--input", str(src), "-o", str(out))  # the partial output is never wiped unasked
    assert result.returncode == 1
    assert f"{out}.partial holds the output of an interrupted run: --resume continues it, --force discards it".encode() \
        in result.stderr
    assert (tmp_path / "out.npy.partial").stat().st_size == 128 + 1024 * 32 * 4
    result = cli("embed", model, "--input", str(src), "-o", str(out), "--force")
    assert b"line 1050: expected a JSON string or an object with a string 'text', got no 'text' field" in result.stderr

    txt = tmp_path / "in.txt"
    txt.write_bytes(b"fine\nalso fine\nbad \xff byte\n")
    result = cli("embed", model, "--input", str(txt), "-o", str(tmp_path / "t.parquet"))
    assert result.returncode == 1 and f"{txt} line 3 is not valid UTF-8 (invalid start byte at byte 4)".encode() \
        in result.stderr
    assert not (tmp_path / "t.parquet").exists()
    # nothing was written before the bad row: nothing is left to resume from
    assert not (tmp_path / "t.parquet.partial").exists() and not (tmp_path / "t.parquet.partial.rows").exists()


def test_lone_surrogate_on_stdin_names_the_line(model):
    stdin = "".join(json.dumps(t) + "\n" for t in texts(38)) + '"bad \\ud800 text"\n'
    result = cli("embed", model, "--input", "jsonl", stdin=stdin.encode())
    assert result.returncode == 1
    assert b"error: stdin line 39: cannot be encoded as UTF-8 (surrogates not allowed at position 4)" in result.stderr
    assert b"texts[38]" not in result.stderr


def test_rejects_file(model, encoder, tmp_path):
    src, out, rejects = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "rejects.jsonl"
    src.write_bytes(b'"one"\n{"text": null}\n"\\udc80"\n\xff\xfe\n{broken\n"two"\n{"title": "x"}\n')
    result = cli("embed", model, "--input", str(src), "-o", str(out), "--rejects", str(rejects))
    assert result.returncode == 0, result.stderr
    assert b"wrote 2 vectors to" in result.stderr and f"; 5 bad rows rejected to {rejects}".encode() in result.stderr
    ids, vectors = read_output(out)
    assert ids == [1, 6]
    np.testing.assert_allclose(vectors, encoder.encode(["one", "two"]), atol=1e-6)
    rows = [json.loads(line) for line in rejects.read_text(encoding="utf-8").splitlines()]
    assert [r["line"] for r in rows] == [2, 3, 4, 5, 7]
    assert rows[0]["reason"] == "expected a JSON string or an object with a string 'text', got NoneType None"
    assert rows[0]["row"] == '{"text": null}'
    assert rows[1]["reason"].startswith("cannot be encoded as UTF-8 (surrogates not allowed at position 0)")
    assert rows[2] == {"line": 4, "reason": "not valid UTF-8 (invalid start byte at byte 0)", "row": "\\xff\\xfe"}
    assert rows[3]["reason"].startswith("not valid JSON: ") and rows[3]["row"] == "{broken"
    assert rows[4]["reason"].endswith("got no 'text' field")


@pytest.mark.parametrize("target", ["npy", "parquet", "jsonl"])
def test_resume_after_a_bad_row_equals_a_full_run(model, tmp_path, target):
    items = texts(2500)
    src, out, full = tmp_path / "in.jsonl", tmp_path / f"out.{target}", tmp_path / f"full.{target}"
    rows = [{"text": t, "id": f"d{i}"} for i, t in enumerate(items)]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows[:2100]) + '{"text": []}\n', encoding="utf-8")
    assert cli("embed", model, "--input", str(src), "-o", str(out)).returncode == 1
    assert not out.exists()
    src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")  # the input, fixed
    result = cli("embed", model, "--input", str(src), "-o", str(out), "--resume")
    assert result.returncode == 0, result.stderr
    assert b"wrote 2500 vectors to" in result.stderr and b"(2048 of them by an earlier run)" in result.stderr
    assert cli("embed", model, "--input", str(src), "-o", str(full)).returncode == 0
    (ids, vectors), (full_ids, full_vectors) = read_output(out), read_output(full)
    assert ids == full_ids
    np.testing.assert_allclose(vectors, full_vectors, atol=1e-6)
    assert not (tmp_path / f"out.{target}.partial").exists()


def test_interrupted_run_leaves_no_output_and_resumes(model, encoder, tmp_path):
    items = texts(6000)
    src, out = tmp_path / "in.txt", tmp_path / "out.npy"
    write_input(src, "txt", items)
    partial = tmp_path / "out.npy.partial"
    # --batch-size 1 makes the run slow enough to be interrupted midway
    process = subprocess.Popen([sys.executable, "-m", "bge_onnx", "embed", model, "--input", str(src), "-o", str(out),
                                "--batch-size", "1"], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (partial.is_file() and partial.stat().st_size > 128) and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=60) == 130, process.stderr.read()
    assert not out.exists() and partial.is_file()
    written = (partial.stat().st_size - 128) // (32 * 4)
    assert 0 < written < len(items)
    said = process.stderr.read()
    assert f"interrupted; {written} vectors are kept in {partial}: run the same command with --resume".encode() in said
    with open(partial, "ab") as file:  # as if killed in the middle of a row: --resume drops the piece
        file.write(b"\x00" * 10)
    result = cli("embed", model, "--input", str(src), "-o", str(out), "--resume")
    assert result.returncode == 0, result.stderr
    assert f"wrote 6000 vectors to {out} ({written} of them by an earlier run)".encode() in result.stderr
    np.testing.assert_allclose(np.load(out), encoder.encode(items), atol=1e-6)


def test_stdin_to_npy_file_and_usage(model, encoder, tmp_path):
    out = tmp_path / "v.npy"
    result = cli("embed", model, "-o", str(out), stdin=b"x\ny\n")
    assert result.returncode == 0, result.stderr
    np.testing.assert_allclose(np.load(out), encoder.encode(["x", "y"]), atol=1e-6)
    result = cli("embed", model, "--resume", stdin=b"x\n")
    assert result.returncode == 1 and b"--resume continues a file: pass -o FILE" in result.stderr
    result = cli("embed", model, "--input", str(tmp_path / "missing.jsonl"), "-o", str(out))
    assert result.returncode == 1 and b"missing.jsonl' does not exist" in result.stderr
    result = cli("embed", model, "--input", str(tmp_path / "v.npy"), "-o", str(tmp_path / "o.npy"))
    assert result.returncode == 1 and b"pass --input-format txt|jsonl|parquet" in result.stderr
    result = cli("embed", model, "-o", str(tmp_path / "o.csv"), stdin=b"x\n")
    assert result.returncode == 1 and b"name it .npy, .jsonl or .parquet, or pass --format" in result.stderr


def test_help():
    result = cli("embed", "--help")
    assert result.returncode == 0
    for option in (b"--input FILE", b"--input-format", b"--text-field", b"--id-field", b"--resume", b"--rejects",
                   b"FILE.partial"):
        assert option in result.stdout


def test_parquet_without_pyarrow_says_what_to_install(tmp_path):
    script = (
        "import sys; sys.modules['pyarrow'] = None; from bge_onnx.cli import main; "
        f"sys.exit(main(['embed', 'unused', '--input', {str(tmp_path / 'in.parquet')!r}, '--input-format', 'parquet']))"
    )
    (tmp_path / "in.parquet").write_bytes(b"")
    result = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert 'Parquet files need pyarrow' in result.stderr and 'pip install "bge-onnx[files]"' in result.stderr


@pytest.mark.parametrize("target", ["npy", "jsonl", "parquet"])
def test_resume_refuses_an_input_that_changed(model, encoder, tmp_path, target):
    # the same rows in another order would have scrambled the output (duplicated and missing ids) and exited 0
    rows = [{"id": f"d{i}", "text": t} for i, t in enumerate(texts(2300))]
    src, out = tmp_path / "in.jsonl", tmp_path / f"out.{target}"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows[:2100]) + '{"text": 1}\n', encoding="utf-8")
    assert cli("embed", model, "--input", str(src), "-o", str(out)).returncode == 1
    moved = rows[1:] + rows[:1]
    src.write_text("".join(json.dumps(r) + "\n" for r in moved), encoding="utf-8")
    result = cli("embed", model, "--input", str(src), "-o", str(out), "--resume")
    assert result.returncode == 1 and not out.exists()
    assert f"{src} line 1 is not the row {out}.partial holds in its place (row 1): the input or its order " \
        "changed".encode() in result.stderr
    moved = rows[:1500] + [{"id": "d1500", "text": "edited"}] + rows[1501:]
    src.write_text("".join(json.dumps(r) + "\n" for r in moved), encoding="utf-8")
    result = cli("embed", model, "--input", str(src), "-o", str(out), "--resume")
    assert result.returncode == 1 and b"line 1501 is not the row" in result.stderr
    result = cli("embed", model, "--input", str(src), "-o", str(out), "--resume", "--force")
    assert result.returncode == 1 and b"pass one of them" in result.stderr
    result = cli("embed", model, "--input", str(src), "-o", str(out), "--force")
    assert result.returncode == 0, result.stderr
    ids, vectors = read_output(out)
    assert ids is None or ids == [r["id"] for r in moved]
    np.testing.assert_allclose(vectors, encoder.encode([r["text"] for r in moved]), atol=1e-6)
    assert not (tmp_path / f"out.{target}.partial").exists() and not (tmp_path / f"out.{target}.partial.rows").exists()


def test_resumed_reject_count_agrees_with_the_rejects_file(model, tmp_path):
    rows = [json.dumps({"id": i, "text": t}) for i, t in enumerate(texts(2200))]
    for k in (10, 20, 2150):
        rows[k] = '{"id": %d, "text": null}' % k
    stopper = rows[1500]
    rows[1500] = '{"id": "a string among ints", "text": "x"}'  # Parquet's id column takes one type: the run stops
    src, out, rejects = tmp_path / "in.jsonl", tmp_path / "out.parquet", tmp_path / "rejects.jsonl"
    src.write_text("\n".join(rows) + "\n", encoding="utf-8")
    result = cli("embed", model, "--input", str(src), "-o", str(out), "--rejects", str(rejects))
    assert result.returncode == 1 and b"ids must all be of one type for Parquet" in result.stderr
    assert [json.loads(line)["line"] for line in rejects.read_text(encoding="utf-8").splitlines()] == [11, 21]
    rows[1500] = stopper
    src.write_text("\n".join(rows) + "\n", encoding="utf-8")
    result = cli("embed", model, "--input", str(src), "-o", str(out), "--resume", "--rejects", str(rejects))
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line)["line"] for line in rejects.read_text(encoding="utf-8").splitlines()]
    assert lines == [11, 21, 2151]
    assert f"wrote 2197 vectors to {out} (1024 of them by an earlier run); 3 bad rows rejected".encode() in result.stderr


@pytest.mark.parametrize("dtype", ["int8", "uint8", "binary", "ubinary"])
def test_output_dtype_in_every_format(model, encoder, tmp_path, dtype):
    """--output-dtype writes the codes encode(output_dtype=...) gives (as sentence-transformers' quantize_embeddings
    writes them): int8/uint8 arrays in .npy, integers in JSONL, list<int8>/list<uint8> in Parquet."""
    items = texts(300)
    src = tmp_path / "in.txt"
    write_input(src, "txt", items)
    expected = encoder.encode(items, output_dtype=dtype)
    for target in ("npy", "jsonl", "parquet"):
        out = tmp_path / f"out-{dtype}.{target}"
        result = cli("embed", model, "--input", str(src), "-o", str(out), "--output-dtype", dtype)
        assert result.returncode == 0, result.stderr
        if target == "npy":
            got = np.load(out)
        elif target == "parquet":
            table = pq.read_table(out)
            assert table.schema.field("embedding").type == pa.list_(pa.from_numpy_dtype(expected.dtype))
            got = np.array(table["embedding"].to_pylist(), dtype=expected.dtype)
        else:
            got = np.array([json.loads(line)["embedding"] for line in out.read_text().splitlines()], dtype=expected.dtype)
        assert got.dtype == expected.dtype and got.shape == expected.shape == (300, 4 if "binary" in dtype else 32)
        # the CLI's chunks may batch a text otherwise than one encode() call: a value on a step's edge may move
        difference = np.abs(got.astype(np.int16) - expected.astype(np.int16))
        assert (difference == 0).mean() >= 0.99 and (difference.max() <= 1 or "binary" in dtype)
    # a partial output of another dtype is not resumed into
    from bge_onnx.files import NpyWriter

    partial = tmp_path / "mixed.npy"
    writer = NpyWriter(str(partial), 32, with_ids=False, output_dtype=dtype)  # as an interrupted run leaves it
    writer.start(resume=False)
    writer.write([], expected[:10])
    writer.close()
    result = cli("embed", model, "--input", str(src), "-o", str(partial), "--resume")
    assert result.returncode == 1 and b"is not a partial .npy of 32-wide float32 rows" in result.stderr
    from bge_onnx.files import JsonlWriter, ParquetWriter

    for cls, suffix, message in ((JsonlWriter, "jsonl", b"is not a partial JSONL of 32-wide float32 rows"),
                                 (ParquetWriter, "parquet", b"rows, not list<item: float>")):
        partial = tmp_path / f"mixed.{suffix}"
        writer = cls(str(partial), 32, with_ids=True, output_dtype=dtype)
        writer.start(resume=False)
        writer.write(list(range(10)), expected[:10])
        writer.close()
        result = cli("embed", model, "--input", str(src), "-o", str(partial), "--resume")
        assert result.returncode == 1 and message in result.stderr, result.stderr
