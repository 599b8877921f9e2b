"""Opening a model folder (manifest, file checks, tokenizer, session) and running length-sorted batches."""

from __future__ import annotations

import dataclasses
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Encoding

from . import hub
from .errors import InputError, WrongTaskError, caller_stacklevel
from .session import Session
from .spec import ModelSpec, Task, read_spec, verify_files
from .tokenize import TOKENIZER_FILE, TextTokenizer, pad_batch


def check_positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be a positive int, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    folder: Path
    spec: ModelSpec
    tokenizer: TextTokenizer
    session: Session


def open_model(
    model: str | os.PathLike[str],
    *,
    task: Task,
    device: str,
    threads: int | None,
    max_length: int | None,
    revision: str | None,
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
    variant = spec.variants["fp32"]
    verify_files(folder, spec, [TOKENIZER_FILE, *variant.all_files])
    tokenizer = TextTokenizer(folder, max_length=max_length)
    session = Session(folder / variant.file, device=device, threads=threads)
    return LoadedModel(folder, spec, tokenizer, session)


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
        batch_size: int = 32,
        revision: str | None = None,
    ) -> None:
        self.batch_size = check_positive("batch_size", batch_size)
        self._model = open_model(
            model, task=self.task, device=device, threads=threads, max_length=max_length, revision=revision
        )

    @property
    def spec(self) -> ModelSpec:
        """The folder's manifest."""
        return self._model.spec

    @property
    def max_length(self) -> int:
        """Token limit per text (per pair for a reranker)."""
        return self._model.tokenizer.max_length

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
    width: int,
    reduce: Callable[[np.ndarray, dict[str, np.ndarray]], np.ndarray],
    progress: Progress,
) -> np.ndarray:
    """Run encodings through the graph in length-sorted batches; rows come back in the caller's order.

    Sorting keeps padding (wasted compute) small; the longest batch goes first so a batch that does not
    fit in memory fails at once rather than at the end.
    """
    out = np.empty((len(encodings), width), dtype=np.float32)
    order = sorted(range(len(encodings)), key=lambda i: -len(encodings[i].ids))
    names = loaded.session.input_names
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        feeds = pad_batch([encodings[i] for i in rows], pad_id=loaded.spec.pad_token_id, input_names=names)
        out[rows] = reduce(loaded.session.run(feeds), feeds)
        progress.advance(len(rows))
    return out
