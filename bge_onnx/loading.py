"""Opening a model folder (manifest, file checks, tokenizer, session) and running length-sorted batches."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Encoding

from . import hub
from .errors import BgeOnnxError, InputError, ModelFilesError, WrongTaskError, caller_stacklevel
from .session import CUDA, Session, choose_providers
from .spec import ModelSpec, Precision, Task, read_spec, verify_files
from .tokenize import TOKENIZER_FILE, TextTokenizer, pad_batch


def check_positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be a positive int, got {value!r}")
    return value


# Padded tokens per forward pass on CPU. Measured on all-MiniLM-L6-v2 (benchmarks/results/batching-minilm-fp32.md):
# the cost per token grows with the batch's size in tokens (activations fall out of cache), and 512 was best or
# near best on every corpus (mixed texts 1.39x fixed batches of 32; 8192 tokens: 0.99x). A GPU wants large
# batches: on an H200 (benchmarks/results/gpu-minilm.md, fp16, mixed texts, against 16384) 4096 was 0.83-0.85x,
# 8192 0.95x, 65536 1.01x and 1.15x in two runs; 16384 keeps the activations of large models small enough for
# smaller GPUs.
MAX_TOKENS_CPU = 512
MAX_TOKENS_CUDA = 16384


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    folder: Path
    spec: ModelSpec
    tokenizer: TextTokenizer
    session: Session
    precision: Precision


def gate_passed(spec: ModelSpec, precision: Precision) -> bool:
    """Whether the folder holds a variant of this precision that passed its quality gate at export."""
    variant = spec.variants.get(precision.value)
    return variant is not None and (precision is Precision.FP32 or bool(variant.parity.get("passed")))


def choose_precision(spec: ModelSpec, precision: str | Precision, *, on_cuda: bool, folder: Path) -> Precision:
    """The variant to run: an explicit precision must exist; "auto" takes fp16 on CUDA, int8 on CPU, else fp32.

    "auto" takes a quantised variant only when it passed its quality gate at export (a forced export did not).
    """
    if precision == "auto":
        preferred = Precision.FP16 if on_cuda else Precision.INT8
        return preferred if gate_passed(spec, preferred) else Precision.FP32
    try:
        precision = Precision(precision)
    except ValueError:
        raise InputError(f"precision must be 'auto', 'fp32', 'int8' or 'fp16', got {precision!r}") from None
    if precision.value not in spec.variants:
        raise ModelFilesError(
            f"{folder} has no {precision.value} variant (it has {', '.join(sorted(spec.variants))}); add one with "
            f"`bge-onnx export SRC --out {folder} --precision {' '.join(sorted({*spec.variants, precision.value}))} --force` "
            "or pass precision='auto'"
        )
    if precision is Precision.FP16 and not on_cuda:
        warnings.warn(
            "precision='fp16' on CPU: onnxruntime runs it through casts, slower than fp32; fp16 is meant for CUDA",
            UserWarning,
            stacklevel=caller_stacklevel(),
        )
    return precision


def open_model(
    model: str | os.PathLike[str],
    *,
    task: Task,
    device: str,
    threads: int | None,
    max_length: int | None,
    revision: str | None,
    precision: str | Precision = "auto",
) -> LoadedModel:
    """Resolve, check and load a model folder for ``task``."""
    folder = hub.resolve(model, revision=revision)
    spec = read_spec(folder)
    if spec.task is not task:
        kinds = {Task.EMBED: ("an embedding", "Embedder"), Task.RERANK: ("a reranker", "Reranker")}
        raise WrongTaskError(
            f"{folder} holds {kinds[spec.task][0]} model ({spec.architecture}); load it with "
            f"bge_onnx.{kinds[spec.task][1]}, not {kinds[task][1]}"
        )
    if max_length is None:
        max_length = spec.max_length
    check_positive("max_length", max_length)
    if max_length > spec.max_positions:
        raise InputError(
            f"max_length={max_length} exceeds what the model can take ({spec.max_positions} tokens)"
        )
    providers = choose_providers(device)
    chosen = choose_precision(spec, precision, on_cuda=CUDA in providers, folder=folder)
    variant = spec.variants[chosen.value]
    # Hashing the files and parsing the graph each read every byte; both release the GIL, so the check runs
    # beside the load instead of before it (cold start: benchmarks/results/coldstart-minilm.md).
    checked = in_background(verify_files, folder, spec, [TOKENIZER_FILE, *variant.all_files])
    try:
        tokenizer = TextTokenizer(folder, max_length=max_length)
        session = Session(folder / variant.file, device=device, threads=threads, providers=providers)
    except BaseException as err:
        try:
            checked()  # a missing or changed file explains a failed load better than the parser does
        except BgeOnnxError as changed:
            raise changed from err
        raise
    checked()
    if precision == "auto" and chosen is Precision.FP16 and CUDA not in session.providers:
        # CUDA failed to start and the session fell back to CPU (with a warning): fp16 has no place there
        chosen = choose_precision(spec, "auto", on_cuda=False, folder=folder)
        variant = spec.variants[chosen.value]
        verify_files(folder, spec, variant.all_files)
        session = Session(folder / variant.file, device="cpu", threads=threads)
    return LoadedModel(folder, spec, tokenizer, session, chosen)


def in_background(function: Callable[..., None], *args: object) -> Callable[[], None]:
    """Start ``function(*args)`` in a thread; the returned callable waits for it and raises what it raised."""
    raised: list[BaseException] = []

    def target() -> None:
        try:
            function(*args)
        except BaseException as err:  # handed to the caller's thread by wait()
            raised.append(err)

    thread = threading.Thread(target=target, name="bge-onnx-verify", daemon=True)
    thread.start()

    def wait() -> None:
        thread.join()
        if raised:
            raise raised[0]

    return wait


class ModelHandle:
    """What Embedder and Reranker share: loading a folder for their task, and what it tells about itself."""

    task: Task

    def __init__(
        self,
        model: str | os.PathLike[str],
        *,
        device: str = "auto",
        threads: int | None = None,
        max_length: int | None = None,
        batch_size: int = 256,
        max_tokens: int | None = None,
        precision: str = "auto",
        revision: str | None = None,
    ) -> None:
        self.batch_size = check_positive("batch_size", batch_size)
        if max_tokens is not None:
            check_positive("max_tokens", max_tokens)
        self._model = open_model(
            model,
            task=self.task,
            device=device,
            threads=threads,
            max_length=max_length,
            revision=revision,
            precision=precision,
        )
        on_cuda = CUDA in self._model.session.providers
        if max_tokens is None:
            max_tokens = MAX_TOKENS_CUDA if on_cuda else MAX_TOKENS_CPU
        self.max_tokens = max_tokens
        self._tokenize_ahead = on_cuda

    def _run_chunks(
        self,
        items: Sequence,
        tokenize: Callable[[Sequence, int], tuple[list[Encoding], int]],
        *,
        width: int,
        reduce: Callable[[np.ndarray, dict[str, np.ndarray]], np.ndarray],
        batch_size: int,
        progress: Progress,
        what: str,
    ) -> np.ndarray:
        """Tokenise items chunk by chunk (ahead, on CUDA), run each chunk in length-sorted batches, and warn once
        about the items cut at max_length; rows come back in the items' order."""
        out = np.empty((len(items), width), dtype=np.float32)
        truncated = 0
        # closing(): if a batch fails, the worker's pending chunk is waited for and its thread ends here
        with contextlib.closing(tokenize_ahead(items, tokenize, ahead=self._tokenize_ahead)) as chunks:
            for at, encodings, cut in chunks:
                truncated += cut
                out[at : at + len(encodings)] = run_sorted(
                    self._model,
                    encodings,
                    batch_size=batch_size,
                    max_tokens=self.max_tokens,
                    width=width,
                    reduce=reduce,
                    progress=progress,
                )
        warn_truncated(truncated, len(items), self.max_length, what)
        return out

    @property
    def spec(self) -> ModelSpec:
        """The folder's manifest."""
        return self._model.spec

    @property
    def max_length(self) -> int:
        """Token limit per text (per pair for a reranker)."""
        return self._model.tokenizer.max_length

    @property
    def precision(self) -> Precision:
        """The variant in use (what precision="auto" chose)."""
        return self._model.precision

    @property
    def providers(self) -> list[str]:
        """The onnxruntime execution providers in use, e.g. ['CPUExecutionProvider']."""
        return list(self._model.session.providers)


def warn_truncated(cut: int, total: int, max_length: int, what: str = "texts") -> None:
    if cut:
        warnings.warn(
            f"{cut} of {total} {what} exceeded max_length={max_length} tokens and were truncated",
            UserWarning,
            stacklevel=caller_stacklevel(),
        )


class Progress:
    """A one-line progress counter on stderr; silent unless enabled."""

    def __init__(self, total: int | None, *, label: str, enabled: bool) -> None:
        self.total, self.label, self.enabled, self.done = total, label, enabled and total != 0, 0

    def advance(self, n: int) -> None:
        if self.enabled:
            self.done += n
            of = "" if self.total is None else f"/{self.total}"
            end = "\n" if self.total is not None and self.done >= self.total else ""
            sys.stderr.write(f"\r{self.label}: {self.done}{of}{end}")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.total is None and self.done:
            sys.stderr.write("\n")
            sys.stderr.flush()


def run_sorted(
    loaded: LoadedModel,
    encodings: Sequence[Encoding],
    *,
    batch_size: int,
    max_tokens: int,
    width: int,
    reduce: Callable[[np.ndarray, dict[str, np.ndarray]], np.ndarray],
    progress: Progress,
) -> np.ndarray:
    """Run encodings through the graph in length-sorted batches; rows come back in the caller's order.

    Sorting keeps padding (wasted compute) small; the longest batch goes first so a batch that does not
    fit in memory fails at once rather than at the end.
    """
    out = np.empty((len(encodings), width), dtype=np.float32)
    order = sorted(range(len(encodings)), key=lambda i: -len(encodings[i]))
    names = loaded.session.input_names
    for rows in token_batches([len(encodings[i]) for i in order], batch_size=batch_size, max_tokens=max_tokens):
        rows = [order[i] for i in rows]
        feeds = pad_batch([encodings[i] for i in rows], pad_id=loaded.spec.pad_token_id, input_names=names)
        out[rows] = reduce(loaded.session.run(feeds), feeds)
        progress.advance(len(rows))
    return out


# Inputs of more items than this are tokenised chunk by chunk, each chunk length-sorted on its own. On CUDA the
# next chunk is tokenised in a worker thread while the graph runs this one: tokenising was 45% of encode() there,
# and this made it 1.08-1.19x faster on an H200 (benchmarks/results/gpu-minilm.md). On CPU, where tokenising is
# about 1% of the time and competes with onnxruntime's threads for the cores, it was 0.95-1.03x over three runs
# (benchmarks/results/tokenizing-minilm.md), so there the chunks are tokenised in turn, without a thread.
TOKENIZE_CHUNK = 2048


def tokenize_ahead(
    items: Sequence, tokenize: Callable[[Sequence, int], tuple[list[Encoding], int]], *, ahead: bool
) -> Iterator[tuple[int, list[Encoding], int]]:
    """Yield (first item's index, encodings, how many were cut) per chunk of items; with ``ahead``, while the
    caller runs one chunk the next is tokenised in a worker thread (the tokenizer and onnxruntime release the GIL).

    ``tokenize(chunk_items, start)`` must name bad items by ``start`` + their index in the chunk.
    """
    chunk = TOKENIZE_CHUNK
    starts = range(0, len(items), chunk)
    if not ahead or len(starts) < 2:
        for start in starts:
            yield (start, *tokenize(items[start : start + chunk], start))
        return
    from concurrent.futures import ThreadPoolExecutor  # here: its import costs ~8 ms of every cold start

    with ThreadPoolExecutor(1, thread_name_prefix="bge-onnx-tokenize") as worker:
        next_chunk = worker.submit(tokenize, items[:chunk], 0)
        for start in starts:
            encodings, cut = next_chunk.result()
            if start + chunk < len(items):
                next_chunk = worker.submit(tokenize, items[start + chunk : start + 2 * chunk], start + chunk)
            yield start, encodings, cut


def token_batches(lengths: Sequence[int], *, batch_size: int, max_tokens: int) -> list[range]:
    """Split positions 0..n-1 of lengths sorted longest first into batches of at most batch_size items and at
    most max_tokens padded tokens (each batch pads to its first, longest item); a text longer than max_tokens
    gets a batch of its own."""
    batches, start = [], 0
    while start < len(lengths):
        fit = max(1, min(batch_size, max_tokens // max(1, lengths[start])))
        batches.append(range(start, min(start + fit, len(lengths))))
        start += fit
    return batches
