"""Embedding large files for the command line: streamed readers (txt, jsonl, parquet), staged writers (npy, jsonl,
parquet) that rename into place only when complete, resuming, and rejected rows."""

from __future__ import annotations

import collections
import hashlib
import json
import os
import shutil
import struct
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .checks import CLEAN_HINT, describe, json_loads, utf8_problem
from .errors import InputError, MissingExtraError, install_hint
from .storage import output_dtype as output_dtype_of

INPUT_FORMATS = {".txt": "txt", ".text": "txt", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
OUTPUT_FORMATS = {".npy": "npy", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}

# Texts embedded per step (Embedder.encode_iter's chunk): the most rows held in memory at once, and the rows of one
# Parquet row group.
CHUNK = 1024

# A .npy header of fixed size, so that the shape, known only at the end of a stream, is written over the placeholder
# in place (numpy's own headers are padded to 64 bytes too; any length is valid).
NPY_HEADER = 128


def _pyarrow():
    """pyarrow and pyarrow.parquet, which only Parquet files need (the files extra)."""
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError as err:
        raise MissingExtraError(f"Parquet files need pyarrow ({err}): {install_hint('files')}") from err
    return pyarrow, pyarrow.parquet


@dataclass(frozen=True)
class Row:
    """One text to embed: its 1-based line (or row) number, its id, its text."""

    number: int
    id: object
    text: str


@dataclass(frozen=True)
class BadRow:
    """A row that cannot be embedded: its number, why, and the row as read (for the rejects file)."""

    number: int
    reason: str
    raw: object


class Source:
    """The rows of stdin or a file, read lazily; ``position`` and ``total`` (bytes, or rows for Parquet) feed the
    progress bar."""

    def __init__(self, path: str | None, fmt: str | None, *, text_field: str = "text", id_field: str | None = None):
        if path is None:
            self.path, self.name, self.fmt = None, "stdin", fmt or "txt"
        else:
            self.path, self.name = Path(path), path
            self.fmt = fmt or INPUT_FORMATS.get(self.path.suffix.lower())
            if self.fmt is None:
                raise InputError(f"cannot tell the format of {path!r} from its extension; pass --input-format "
                                 "txt|jsonl|parquet")
            if not self.path.is_file():
                raise InputError(f"input file {path!r} does not exist")
        self.text_field, self.id_field = text_field, id_field
        self.where = f"{self.name} row" if self.fmt == "parquet" else f"{self.name} line"
        self.unit, self.position, self.total = ("rows", 0, None) if self.fmt == "parquet" else ("B", 0, None)
        if self.fmt == "parquet":
            self._parquet = _pyarrow()[1].ParquetFile(self.path)
            self.total = self._parquet.metadata.num_rows
            self._check_columns()
        elif self.path is not None:
            self.total = self.path.stat().st_size

    def message(self, bad: BadRow) -> str:
        """The error for a bad row, naming its line."""
        joint = " is " if bad.reason.startswith("not ") else ": "
        return f"{self.where} {bad.number}{joint}{bad.reason}"

    def rows(self) -> Iterator[Row | BadRow]:
        if self.fmt == "parquet":
            yield from self._parquet_rows()
        elif self.path is None:
            yield from self._line_rows(sys.stdin.buffer)
        else:
            with open(self.path, "rb") as stream:
                yield from self._line_rows(stream)

    def _text(self, number: int, id_: object, text: object, raw: object) -> Row | BadRow:
        if not isinstance(text, str):
            return BadRow(number, f"expected a JSON string or an object with a string {self.text_field!r}, got "
                                  f"{type(text).__name__} {describe(text)}", raw)
        problem = utf8_problem(text)
        if problem:
            return BadRow(number, f"{problem}; clean it first, e.g. {CLEAN_HINT}", raw)
        return Row(number, number if id_ is None else id_, text)

    def _line_rows(self, stream) -> Iterator[Row | BadRow]:
        for number, raw in enumerate(stream, start=1):
            self.position += len(raw)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield BadRow(number, f"not valid UTF-8 ({err.reason} at byte {err.start})",
                             raw.decode("utf-8", "backslashreplace").rstrip("\r\n"))
                continue
            line = line.removesuffix("\n").removesuffix("\r")
            if self.fmt == "txt":
                yield self._text(number, None, line, line)
                continue
            if not line.strip():
                continue
            try:
                item = json_loads(line)
            except ValueError as err:
                yield BadRow(number, f"not valid JSON: {err}", line)
                continue
            if not isinstance(item, dict):
                yield self._text(number, None, item, line)
            elif self.text_field not in item:
                yield BadRow(number, f"expected a JSON string or an object with a string {self.text_field!r}, "
                                     f"got no {self.text_field!r} field", line)
            else:
                yield self._text(number, item.get(self.id_field or "id"), item[self.text_field], line)

    def _check_columns(self) -> None:
        pa = _pyarrow()[0]
        schema = self._parquet.schema_arrow
        if self.text_field not in schema.names:
            raise InputError(f"{self.name} has no column {self.text_field!r} (it has {', '.join(schema.names)}); "
                             "pass --text-field")
        kind = schema.field(self.text_field).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise InputError(f"{self.name}: column {self.text_field!r} is {kind}, expected strings")
        if self.id_field is not None and self.id_field not in schema.names:
            raise InputError(f"{self.name} has no id column {self.id_field!r} (it has {', '.join(schema.names)})")
        self._id_column = self.id_field or ("id" if "id" in schema.names else None)

    def _parquet_rows(self) -> Iterator[Row | BadRow]:
        columns = [self.text_field] + ([self._id_column] if self._id_column else [])
        number = 0
        for batch in self._parquet.iter_batches(batch_size=CHUNK, columns=columns):
            texts = batch.column(self.text_field).to_pylist()
            ids = batch.column(self._id_column).to_pylist() if self._id_column else [None] * len(texts)
            for text, id_ in zip(texts, ids):
                number += 1
                yield self._text(number, id_, text, {self.text_field: text, "id": id_})
            self.position += len(texts)


class Writer:
    """Writes vectors to ``path`` + ".partial" and renames it to ``path`` in :meth:`finish`; a run that stops
    before leaves only the partial file, which :meth:`start` with resume=True continues. ``path`` None: stdout."""

    suffix = ".partial"

    def __init__(self, path: str | None, dim: int, *, with_ids: bool, output_dtype: str = "float32") -> None:
        self.path = None if path is None else Path(path)
        self.partial = None if path is None else Path(path + self.suffix)
        self.with_ids, self.rows = with_ids, 0
        # a row as encode(output_dtype=...) gives it: float32 or one-byte codes; binary packs 8 dimensions a byte
        form = output_dtype_of(output_dtype)
        self.dtype, self.dim = form.numpy_dtype, form.width(dim)

    def start(self, *, resume: bool) -> int:
        """Open the output; returns the rows a previous run already wrote (0 unless resuming)."""
        raise NotImplementedError

    def write(self, ids: list, vectors: np.ndarray) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Close without finishing: the partial output stays for --resume."""

    def discard(self) -> None:
        """Close and remove the partial output (a run that failed before writing a row leaves nothing behind)."""
        self.close()
        if self.partial is not None and self.partial.is_dir():
            shutil.rmtree(self.partial)
        elif self.partial is not None:
            self.partial.unlink(missing_ok=True)


class NpyWriter(Writer):
    """float32 (n, dim), or the codes' int8 / uint8 (n, dim or dim / 8): a fixed-size header, then rows as they come; the header gets the real n at the end. The
    rows already written are recoverable from the partial file's size."""

    def start(self, *, resume: bool) -> int:
        if self.path is None:  # stdout: staged in an unnamed temporary file, copied out at the end
            self.file = tempfile.TemporaryFile()  # noqa: SIM115 (open across write() calls; close() closes it)
        elif resume and self.partial.is_file():
            self.file = open(self.partial, "r+b")  # noqa: SIM115 (open across write() calls; close() closes it)
            header = self.file.read(NPY_HEADER)
            if header[:8] != b"\x93NUMPY\x01\x00" or _npy_header(0, self.dim, self.dtype) != header:
                self.file.close()
                raise InputError(f"{self.partial} is not a partial .npy of {self.dim}-wide {self.dtype} rows from "
                                 "this model; remove it or run without --resume")
            row = self.dtype.itemsize * self.dim
            self.rows = (self.partial.stat().st_size - NPY_HEADER) // row
            self.file.truncate(NPY_HEADER + self.rows * row)  # a row cut short by the interruption
            self.file.seek(0, os.SEEK_END)
            return self.rows
        else:
            self.file = open(self.partial, "wb")  # noqa: SIM115 (open across write() calls; close() closes it)
        self.file.write(_npy_header(0, self.dim, self.dtype))
        return 0

    def write(self, ids: list, vectors: np.ndarray) -> None:
        self.file.write(np.ascontiguousarray(vectors, dtype=self.dtype).tobytes())
        self.file.flush()
        self.rows += len(vectors)

    def finish(self) -> None:
        self.file.seek(0)
        self.file.write(_npy_header(self.rows, self.dim, self.dtype))
        if self.path is None:
            self.file.seek(0)
            shutil.copyfileobj(self.file, sys.stdout.buffer)
            sys.stdout.buffer.flush()
            self.file.close()
            return
        _durable(self.file)
        self.file.close()
        os.replace(self.partial, self.path)

    def close(self) -> None:
        if not self.file.closed:
            self.file.close()


def _npy_header(rows: int, dim: int, dtype: np.dtype) -> bytes:
    text = f"{{'descr': '{dtype.str}', 'fortran_order': False, 'shape': ({rows}, {dim}), }}"
    text = text.ljust(NPY_HEADER - 11) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode("latin1")


def _durable(file) -> None:
    file.flush()
    os.fsync(file.fileno())


class JsonlWriter(Writer):
    """One line per vector: a JSON array, or ``{"id": ..., "embedding": [...]}`` with ids."""

    def start(self, *, resume: bool) -> int:
        if self.path is None:
            self.file = sys.stdout
            return 0
        if resume and self.partial.is_file():
            with open(self.partial, "rb") as partial:  # count whole lines; drop a last line cut short
                end = 0
                for line in partial:
                    if not line.endswith(b"\n"):
                        break
                    end += len(line)
                    self.rows += 1
            os.truncate(self.partial, end)
            self._check_first_row()
            self.file = open(self.partial, "a", encoding="utf-8")  # noqa: SIM115 (open across write() calls; close() closes it)
            return self.rows
        self.file = open(self.partial, "w", encoding="utf-8")  # noqa: SIM115 (open across write() calls; close() closes it)
        return 0

    def _check_first_row(self) -> None:
        """Refuse to resume a partial output whose rows are of another width or type (floats vs integer codes)."""
        with open(self.partial, encoding="utf-8") as partial:
            first = partial.readline()
        if not first:
            return
        row = json.loads(first)
        vector = row.get("embedding") if isinstance(row, dict) else row
        codes = self.dtype.kind in "iu"
        if not isinstance(vector, list) or len(vector) != self.dim or \
                any(isinstance(v, int) != codes for v in vector):
            raise InputError(f"{self.partial} is not a partial JSONL of {self.dim}-wide {self.dtype} rows from this "
                             "model and --output-dtype; remove it or run without --resume")

    def write(self, ids: list, vectors: np.ndarray) -> None:
        if self.with_ids:
            lines = (json.dumps({"id": i, "embedding": v}, ensure_ascii=False) for i, v in zip(ids, vectors.tolist()))
        else:
            lines = (json.dumps(v) for v in vectors.tolist())
        self.file.writelines(line + "\n" for line in lines)
        self.file.flush()
        self.rows += len(vectors)

    def finish(self) -> None:
        if self.path is not None:
            _durable(self.file)
            self.file.close()
            os.replace(self.partial, self.path)

    def close(self) -> None:
        if self.file is not sys.stdout and not self.file.closed:
            self.file.close()


class ParquetWriter(Writer):
    """Columns id and embedding (list<float32>, or list<int8> / list<uint8> for codes). Staged as a folder of one-chunk parts, each renamed into place
    when written (so an interruption loses at most the chunk in flight); :meth:`finish` joins them, one row group
    per part, into the final file."""

    def start(self, *, resume: bool) -> int:
        if self.path is None:
            raise InputError("Parquet output needs a file: -o FILE.parquet")
        self.pa, self.pq = _pyarrow()
        self.id_type = None
        if resume and self.partial.is_dir():
            wanted = self.pa.list_(self.pa.from_numpy_dtype(self.dtype))
            for part in self._parts():
                meta = self.pq.ParquetFile(part)
                if meta.schema_arrow.field("embedding").type != wanted:
                    raise InputError(f"{part} holds {meta.schema_arrow.field('embedding').type} rows, not {wanted}: "
                                     "not this --output-dtype's partial output; remove it or run without --resume")
                self.rows += meta.metadata.num_rows
                self.id_type = meta.schema_arrow.field("id").type
            return self.rows
        if self.partial.exists():
            shutil.rmtree(self.partial) if self.partial.is_dir() else self.partial.unlink()
        self.partial.mkdir()
        return 0

    def _parts(self) -> list[Path]:
        return sorted(self.partial.glob("part-*.parquet"))

    def write(self, ids: list, vectors: np.ndarray) -> None:
        pa = self.pa
        if self.id_type is None:
            self.id_type = pa.int64() if all(isinstance(i, int) for i in ids) else pa.string()
        if pa.types.is_string(self.id_type):
            ids = [i if isinstance(i, str) else json.dumps(i) for i in ids]
        try:
            id_column = pa.array(ids, type=self.id_type)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as err:
            raise InputError(f"ids must all be of one type for Parquet (the first were {self.id_type}): {err}") from err
        n, dim = vectors.shape
        offsets = pa.array(np.arange(0, (n + 1) * dim, dim, dtype=np.int32))
        values = pa.array(np.ascontiguousarray(vectors, dtype=self.dtype).ravel())
        table = pa.table({"id": id_column, "embedding": pa.ListArray.from_arrays(offsets, values)})
        part = self.partial / f"part-{len(self._parts()):06d}.parquet"
        self.pq.write_table(table, f"{part}.tmp")
        os.replace(f"{part}.tmp", part)
        self.rows += n

    def finish(self) -> None:
        pa = self.pa
        schema = pa.schema([("id", self.id_type or pa.int64()), ("embedding", pa.list_(pa.from_numpy_dtype(self.dtype)))])
        joined = self.partial / "joined.tmp"
        with self.pq.ParquetWriter(joined, schema) as out:
            for part in self._parts():
                out.write_table(self.pq.read_table(part).cast(schema))
        with open(joined, "rb") as file:
            os.fsync(file.fileno())
        os.replace(joined, self.path)
        shutil.rmtree(self.partial)


WRITERS = {"npy": NpyWriter, "jsonl": JsonlWriter, "parquet": ParquetWriter}


class Ledger:
    """OUT.partial.rows: an 8-byte fingerprint of each row whose vector the partial output holds, in order, so that
    --resume can check that the input still has the same rows in the same place. A chunk's fingerprints are written
    before its vectors, so the ledger never holds fewer rows than the partial output."""

    size = 8

    def __init__(self, writer: Writer) -> None:
        self.path = None if writer.partial is None else Path(str(writer.partial) + ".rows")
        self.file = None

    @classmethod
    def fingerprint(cls, row: Row, prefix: str) -> bytes:
        """The row as it is embedded: its id and its text (with the query instruction, if any)."""
        data = json.dumps([row.id, prefix + row.text], ensure_ascii=False, default=repr).encode("utf-8", "surrogatepass")
        return hashlib.blake2b(data, digest_size=cls.size).digest()

    def read(self, rows: int, partial: Path) -> bytes:
        """The first ``rows`` fingerprints, for a resumed run (the ledger is cut there: the rest is written again)."""
        try:
            with open(self.path, "r+b") as file:
                data = file.read(rows * self.size)
                file.truncate(rows * self.size)
        except FileNotFoundError:
            data = b""
        if len(data) < rows * self.size:
            raise InputError(f"{partial} holds {rows} rows but {self.path} does not list them (an older bge-onnx "
                             "wrote it, or it was removed), so --resume cannot check the input; run with --force to "
                             "start over")
        return data

    def open(self, *, resume: bool) -> None:
        if self.path is not None:
            self.file = open(self.path, "ab" if resume else "wb")  # noqa: SIM115 (open across add() calls; close() closes it)

    def add(self, fingerprints: list[bytes]) -> None:
        if self.file is not None:
            self.file.write(b"".join(fingerprints))
            self.file.flush()

    def close(self, *, remove: bool) -> None:
        if self.file is not None:
            self.file.close()
        if remove and self.path is not None:
            self.path.unlink(missing_ok=True)


def output_format(path: str | None, fmt: str | None) -> str:
    """--format if given, else the output file's extension, else jsonl."""
    if fmt:
        return fmt
    if path is None:
        return "jsonl"
    found = OUTPUT_FORMATS.get(Path(path).suffix.lower())
    if found is None:
        raise InputError(f"cannot tell the format of {path!r} from its extension; name it .npy, .jsonl or "
                         ".parquet, or pass --format")
    return found


@dataclass(frozen=True)
class Summary:
    """What a run did: rows written (including those of resumed runs), rows skipped on resume, rows rejected."""

    written: int
    resumed: int
    rejected: int


def embed_rows(
    embedder,
    source: Source,
    writer: Writer,
    *,
    resume: bool = False,
    force: bool = False,
    rejects: str | None = None,
    prefix: str = "",
    batch_size: int | None = None,
    normalize: bool = True,
    progress: bool = False,
    output_dtype: str = "float32",
) -> Summary:
    """Embed every row of ``source`` into ``writer``, CHUNK rows at a time, in input order.

    A bad row raises InputError naming its line, unless ``rejects`` names a file: then it is written there
    (one JSON object per line: line, reason, row) and skipped. With ``resume``, the rows that the writer already
    holds are read again but not embedded, each checked against the ledger of the rows written; without it, an
    existing partial output is an error unless ``force`` (then it is discarded).
    """
    ledger = Ledger(writer)
    partial = writer.partial
    if partial is not None and not resume and not force and (partial.exists() or ledger.path.exists()):
        raise InputError(f"{partial} holds the output of an interrupted run: --resume continues it, --force "
                         "discards it and starts over")
    done = writer.start(resume=resume)
    rows = source.rows()
    last_skipped = 0
    finished = False
    try:
        expected = ledger.read(done, partial) if done else b""
        skipped = 0
        while skipped < done:  # a resumed run: pass over the rows already written, without embedding them
            row = next(rows, None)
            if row is None:
                raise InputError(f"{partial} holds {done} rows but {source.name} has only {skipped}; "
                                 "it is not this input's partial output: run with --force to start over")
            last_skipped = row.number
            if isinstance(row, Row):
                at = slice(skipped * Ledger.size, (skipped + 1) * Ledger.size)
                if Ledger.fingerprint(row, prefix) != expected[at]:
                    raise InputError(
                        f"{source.name} line {row.number} is not the row {partial} holds in its place (row "
                        f"{skipped + 1}): the input or its order changed since the interrupted run. Resume with the "
                        "input it had, or run with --force to start over")
                skipped += 1
        ledger.open(resume=done > 0)
        reject_file, kept = _open_rejects(rejects, resume=resume, after=last_skipped) if rejects else (None, 0)
        rejected = [kept]
        ids: collections.deque = collections.deque()

        def texts() -> Iterator[str]:
            for row in rows:
                if isinstance(row, BadRow):
                    if reject_file is None:
                        raise InputError(source.message(row))
                    reject_file.write(json.dumps({"line": row.number, "reason": row.reason, "row": row.raw}) + "\n")
                    rejected[0] += 1
                    continue
                ids.append((row.id, Ledger.fingerprint(row, prefix) if ledger.file is not None else b""))
                yield prefix + row.text

        bar = _progress_bar(source) if progress else None
        try:
            chunks = embedder.encode_iter(texts(), batch_size=batch_size, chunk_size=CHUNK, normalize=normalize,
                                          show_progress=progress and bar is None, output_dtype=output_dtype)
            for vectors in chunks:
                chunk = [ids.popleft() for _ in range(len(vectors))]
                ledger.add([fingerprint for _, fingerprint in chunk])
                writer.write([id_ for id_, _ in chunk], vectors)
                if reject_file is not None:
                    reject_file.flush()
                if bar is not None:
                    bar.update(source.position - bar.n)
        finally:
            if bar is not None:
                bar.close()
            if reject_file is not None:
                reject_file.close()
        writer.finish()
        finished = True
    finally:
        if not finished and writer.rows == 0:  # nothing to resume from: leave nothing behind
            writer.discard()
            ledger.close(remove=True)
        else:
            writer.close()
            ledger.close(remove=finished)
    return Summary(written=writer.rows, resumed=done, rejected=rejected[0])


def _open_rejects(path: str, *, resume: bool, after: int):
    """The rejects file and the rejects it keeps: new, or on resume kept up to line ``after`` (later lines are read,
    and rejected, again)."""
    if resume and os.path.isfile(path):
        with open(path, encoding="utf-8") as old:
            kept = [line for line in old if line.endswith("\n") and json.loads(line)["line"] <= after]
        file = open(path, "w", encoding="utf-8")  # noqa: SIM115 (the caller closes it)
        file.writelines(kept)
        return file, len(kept)
    return open(path, "w", encoding="utf-8"), 0


def _progress_bar(source: Source):
    """A tqdm bar on stderr when tqdm is installed, else None (the caller's plain counter then)."""
    try:
        from tqdm import tqdm
    except ImportError:  # optional: pip install "bge-onnx[files]"
        return None
    scale = source.unit == "B"
    return tqdm(total=source.total, unit=source.unit, unit_scale=scale, unit_divisor=1024 if scale else 1000,
                desc="embedding", file=sys.stderr, dynamic_ncols=True)
