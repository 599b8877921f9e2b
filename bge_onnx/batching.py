"""Running texts or pairs through a graph in length-sorted batches under a token budget, chunk by chunk, in order."""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence

import numpy as np
from tokenizers import Encoding

from .errors import caller_stacklevel
from .pooling import Reduce
from .session import Session
from .tokenize import pad_batch

# Padded tokens per forward pass. CPU: the cost per token grows with the batch's size in tokens (activations fall
# out of cache), and 512 was best or near best on every corpus for all-MiniLM-L6-v2 (docs/decisions.md). A GPU
# wants large batches: on an H200 4096 was 0.83-0.85x of 16384; 16384 keeps the activations of large models
# small enough for smaller GPUs.
MAX_TOKENS_CPU = 512
MAX_TOKENS_CUDA = 16384

# Inputs of more items than this are tokenised chunk by chunk, each chunk length-sorted on its own. On CUDA the
# next chunk is tokenised in a worker thread while the graph runs this one (1.08-1.19x on an H200); on CPU, where
# tokenising is about 1% of the time and competes with onnxruntime's threads for the cores, it did not pay, so
# there the chunks are tokenised in turn (docs/decisions.md).
TOKENIZE_CHUNK = 2048

# (items of one chunk, index of its first item in the whole input) -> (encodings, how many were truncated)
Tokenize = Callable[[Sequence, int], tuple[list[Encoding], int]]


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


def run_chunks(
    session: Session,
    items: Sequence,
    tokenize: Tokenize,
    *,
    pad_id: int,
    width: int,
    reduce: Reduce,
    batch_size: int,
    max_tokens: int,
    ahead: bool,
    progress: Progress,
) -> tuple[np.ndarray, int]:
    """Tokenise items chunk by chunk (with ``ahead``, the next chunk in a worker thread), run each chunk in
    length-sorted batches; return one row per item in the items' order, and how many items were truncated."""
    out = np.empty((len(items), width), dtype=np.float32)
    truncated = 0
    # closing(): if a batch fails, the worker's pending chunk is waited for and its thread ends here
    with contextlib.closing(tokenize_ahead(items, tokenize, ahead=ahead)) as chunks:
        for at, encodings, cut in chunks:
            truncated += cut
            out[at : at + len(encodings)] = run_sorted(
                session,
                encodings,
                pad_id=pad_id,
                batch_size=batch_size,
                max_tokens=max_tokens,
                width=width,
                reduce=reduce,
                progress=progress,
            )
    return out, truncated


def run_sorted(
    session: Session,
    encodings: Sequence[Encoding],
    *,
    pad_id: int,
    batch_size: int,
    max_tokens: int,
    width: int,
    reduce: Reduce,
    progress: Progress,
) -> np.ndarray:
    """Run encodings through the graph in length-sorted batches; rows come back in the caller's order.

    Sorting keeps padding (wasted compute) small; the longest batch goes first so a batch that does not
    fit in memory fails at once rather than at the end.
    """
    out = np.empty((len(encodings), width), dtype=np.float32)
    for rows, feeds in sorted_batches(encodings, pad_id=pad_id, input_names=session.input_names,
                                      batch_size=batch_size, max_tokens=max_tokens):
        out[rows] = reduce(session.run(feeds), feeds)
        progress.advance(len(rows))
    return out


def sorted_batches(
    encodings: Sequence[Encoding], *, pad_id: int, input_names: list[str], batch_size: int, max_tokens: int
) -> Iterator[tuple[list[int], dict[str, np.ndarray]]]:
    """(the encodings' indexes, padded feeds) per batch: sorted by length, longest first, within the budgets."""
    order = sorted(range(len(encodings)), key=lambda i: -len(encodings[i]))
    for rows in token_batches([len(encodings[i]) for i in order], batch_size=batch_size, max_tokens=max_tokens):
        rows = [order[i] for i in rows]
        yield rows, pad_batch([encodings[i] for i in rows], pad_id=pad_id, input_names=input_names)


def tokenize_ahead(items: Sequence, tokenize: Tokenize, *, ahead: bool) -> Iterator[tuple[int, list[Encoding], int]]:
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


def warn_truncated(cut: int, total: int, max_length: int, what: str = "texts") -> None:
    """One warning for the ``cut`` of ``total`` items that were truncated at max_length."""
    if cut:
        warnings.warn(
            f"{cut} of {total} {what} exceeded max_length={max_length} tokens and were truncated",
            UserWarning,
            stacklevel=caller_stacklevel(),
        )
