"""ModelHandle: what Embedder and Reranker share (a folder opened for their task, its batch loop, its properties)."""

from __future__ import annotations

import difflib
import inspect
import os
from collections.abc import Sequence
from typing import TypeVar
from pathlib import Path

import numpy as np

from .batching import MAX_TOKENS_CPU, MAX_TOKENS_CUDA, Progress, Tokenize, run_chunks, warn_truncated
from .checks import positive_int
from .errors import InputError, InputTypeError
from .folder import batch_independent, open_model
from .hub import looks_like_repo_id
from .pooling import reducer
from .session import CUDA
from .spec import MANIFEST, ModelSpec, Precision, Task
from .workers import WorkerPool


class ModelHandle:
    """A model folder loaded for ``task``, run in length-sorted batches; Embedder and Reranker build on it."""

    task: Task

    def __new__(cls, *args: object, **options: object):
        """Refuse an unknown keyword before anything loads, naming this class (not ModelHandle.__init__, as Python's
        own TypeError would) and the nearest keyword it takes."""
        parameters = inspect.signature(cls.__init__).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            return super().__new__(cls)  # a subclass that takes any keyword says itself what it refuses
        known = [name for name in parameters if name not in ("self", "model")]
        unknown = next((name for name in options if name not in known and name != "model"), None)
        if unknown is not None:
            close = difflib.get_close_matches(unknown, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise InputTypeError(f"{cls.__name__}() got an unexpected keyword argument {unknown!r}{hint}; its "
                                 f"keywords are {', '.join(known)}")
        return super().__new__(cls)

    def __init__(
        self,
        model: str | os.PathLike[str] | None = None,
        *,
        device: str = "auto",
        threads: int | None = None,
        max_length: int | None = None,
        batch_size: int = 256,
        max_tokens: int | None = None,
        precision: str = "auto",
        revision: str | None = None,
        local_files_only: bool = False,
    ) -> None:
        if model is None:
            model = self._default_model()
        self.batch_size = positive_int("batch_size", batch_size)
        if max_tokens is not None:
            positive_int("max_tokens", max_tokens)
        self._model = open_model(
            model,
            task=self.task,
            device=device,
            threads=threads,
            max_length=max_length,
            revision=revision,
            precision=precision,
            local_files_only=local_files_only,
        )
        self._name = os.fspath(model)  # after open_model, which names a model argument of the wrong type
        on_cuda = CUDA in self._model.session.providers
        if max_tokens is None:
            max_tokens = MAX_TOKENS_CUDA if on_cuda else MAX_TOKENS_CPU
        self.max_tokens = max_tokens
        self._tokenize_ahead = on_cuda
        self._reduce = reducer(self._model.spec)
        self._workers: WorkerPool | None = None

    def _default_model(self) -> str | os.PathLike[str]:
        """The model when none is given: none, except for Embedder (the CLI's default)."""
        name = type(self).__name__
        raise InputTypeError(f"{name}() needs a model: a folder exported by bge-onnx or a hub repo id holding one, "
                             f"e.g. {name}('bge-small-en-v1.5-onnx')")

    def _run_chunks(
        self,
        items: Sequence,
        tokenize: Tokenize,
        *,
        width: int,
        batch_size: int,
        progress: Progress,
        what: str,
    ) -> np.ndarray:
        """Run items through the graph (batching.run_chunks) and warn once about those cut at max_length."""
        out, truncated = run_chunks(
            self._model.session,
            items,
            tokenize,
            pad_id=self._model.spec.pad_token_id,
            width=width,
            reduce=self._reduce,
            batch_size=batch_size,
            max_tokens=self.max_tokens,
            ahead=self._tokenize_ahead,
            progress=progress,
        )
        warn_truncated(truncated, len(items), self.max_length, what)
        return out

    @property
    def folder(self) -> Path:
        """The model folder in use (for a hub repo id, its cached snapshot)."""
        return self._model.folder

    def _pool(self, workers: int | None, items: int) -> WorkerPool | None:
        """The worker processes for ``workers`` > 1 (started on first use, kept until close()), or None to run here:
        for workers=None or 1, and for inputs too small to share (fewer than 2 items per worker)."""
        if workers is None or positive_int("workers", workers) == 1 or items < 2 * workers:
            return None
        if self._workers is None or self._workers.processes != workers:
            self.close()
            settings = {"precision": self.precision.value, "threads": max(1, self._model.session.threads // workers),
                        "max_length": self.max_length, "batch_size": self.batch_size, "max_tokens": self.max_tokens,
                        **self._worker_settings()}
            source = self._model.folder
            if not (source / MANIFEST).is_file() and looks_like_repo_id(self._name) and not Path(self._name).exists():
                # an official export opened by name: its pooling may come from the registry, by that name, so the
                # workers open the same cached snapshot by name too (no network)
                source, settings = self._name, {**settings, "revision": source.name, "local_files_only": True}
            self._workers = WorkerPool(source, task=self.task.value, processes=workers, settings=settings)
        return self._workers

    def _worker_settings(self) -> dict:
        return {}

    def close(self) -> None:
        """Stop the worker processes, if any were started (they also stop when the object is collected or at exit)."""
        if self._workers is not None:
            self._workers.close()
            self._workers = None

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
    def batch_independent(self) -> bool:
        """Whether an output is the same whatever else shares its batch: fp32, fp16 and per-token int8; not the
        per-batch int8 of exports older than issue 20."""
        return batch_independent(self._model.spec, self._model.precision)

    @property
    def providers(self) -> list[str]:
        """The onnxruntime execution providers in use, e.g. ['CPUExecutionProvider']."""
        return list(self._model.session.providers)


Handle = TypeVar("Handle", bound=ModelHandle)


def model_or_name(model: str | os.PathLike[str] | None, model_name: str | None) -> str | os.PathLike[str] | None:
    """An adapter's model, given as ``model`` or as ``model_name`` (the frameworks' own name for it), not both."""
    if model is not None and model_name is not None:
        raise InputError(f"give model= or model_name= (the same thing), not both: got {model!r} and {model_name!r}")
    return model if model is not None else model_name


def given_or_opened(
    cls: type[Handle],
    model: str | os.PathLike[str] | None,
    given: Handle | None,
    *,
    name: str,
    device: str,
    precision: str,
    threads: int | None,
    max_length: int | None,
    batch_size: int,
    max_tokens: int | None,
    revision: str | None,
    local_files_only: bool,
) -> Handle:
    """What an adapter (LangChain, LlamaIndex) runs on: the ``given`` Embedder/Reranker to share, or ``cls`` opened
    from ``model`` with these options; exactly one of ``model`` and ``given`` (named ``name``) must be given, and
    the load options only with ``model`` (a built one was loaded with its own)."""
    if (model is None) == (given is None):
        raise InputError(f"give either model= (a folder or repo id) or {name}= (an already built one), not both or none")
    if given is not None:
        options = {"device": device, "precision": precision, "threads": threads, "max_length": max_length,
                   "batch_size": batch_size, "max_tokens": max_tokens, "revision": revision,
                   "local_files_only": local_files_only}
        defaults = inspect.signature(ModelHandle.__init__).parameters
        beside = [key for key, value in options.items() if value != defaults[key].default]
        if beside:
            raise InputError(f"{', '.join(f'{key}=' for key in beside)} given beside {name}=, which was loaded with "
                             f"its own options: pass them when building the {cls.__name__}, or give model= instead")
        return given
    return cls(model, device=device, precision=precision, threads=threads, max_length=max_length,
               batch_size=batch_size, max_tokens=max_tokens, revision=revision, local_files_only=local_files_only)
