"""ModelHandle: what Embedder, Reranker and M3Embedder share (a folder opened for their task, its batch loop, its
properties), and LoadOptions, the one definition of how a model is opened."""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import os
import threading
from collections.abc import Iterable, Sequence
from typing import TypeVar
from pathlib import Path

import numpy as np

from .batching import MAX_TOKENS_CPU, MAX_TOKENS_CUDA, Progress, Tokenize, run_chunks, warn_truncated
from .checks import positive_int
from .errors import InputError, InputTypeError
from .folder import LoadedModel, batch_independent, open_model
from .pooling import reducer
from .session import CUDA
from .spec import ModelSpec, Precision, Task
from .workers import WorkerPool, join, split


@dataclasses.dataclass(frozen=True)
class LoadOptions:
    """How a model is opened and run: the keywords Embedder, Reranker and M3Embedder take, and the ones the
    LangChain and LlamaIndex adapters, Ray, the server and the CLI pass on (tests hold every one of them to these
    names and defaults).

    Args:
        device: "auto" (CUDA if onnxruntime-gpu can use it, else CPU; CPU for precision="int8"), "cpu" or "cuda".
        precision: "auto" (int8 on CPU where exported, fp16 on CUDA, else fp32), "fp32", "fp16" or "int8".
        threads: onnxruntime's CPU threads; default the CPUs the process may use ($BGE_ONNX_THREADS).
        max_length: token limit per text (per pair for a reranker); default the model's.
        batch_size: most texts per forward pass.
        max_tokens: most padded tokens per forward pass; default 512 on CPU, 16384 on CUDA.
        revision: a hub revision (branch, tag or commit) for a repo id.
        local_files_only: never use the network for a repo id: the cache, or ModelFilesError.

    Raises:
        InputError: a count that is not a positive int.

    >>> LoadOptions.of("Embedder", {"precision": "fp32", "max_length": 128}).changed()
    {'precision': 'fp32', 'max_length': 128}
    """

    device: str = "auto"
    precision: str = "auto"
    threads: int | None = None
    max_length: int | None = None
    batch_size: int = 256
    max_tokens: int | None = None
    revision: str | None = None
    local_files_only: bool = False

    def __post_init__(self) -> None:
        positive_int("batch_size", self.batch_size)
        for name in ("threads", "max_length", "max_tokens"):
            if getattr(self, name) is not None:
                positive_int(name, getattr(self, name))

    @classmethod
    def of(cls, owner: str, keywords: dict[str, object], *, also: Iterable[str] = ()) -> LoadOptions:
        """The options in ``keywords``, refusing any other name as ``owner``() would (``also``: the owner's own
        keywords, offered as near matches)."""
        names = [field.name for field in dataclasses.fields(cls)]
        for key in keywords:
            if key not in names:
                raise unexpected_keyword(owner, key, list(dict.fromkeys([*also, *names])))
        return cls(**keywords)

    def changed(self) -> dict[str, object]:
        """The options that differ from the defaults."""
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)
                if getattr(self, field.name) != field.default}


def unexpected_keyword(owner: str, key: str, known: Sequence[str]) -> InputTypeError:
    """Python's TypeError for an unknown keyword, naming ``owner`` (not an __init__ deep inside) and the nearest
    keyword it takes."""
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return InputTypeError(f"{owner}() got an unexpected keyword argument {key!r}{hint}; its keywords are "
                          f"{', '.join(known)}")


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
            raise unexpected_keyword(cls.__name__, unknown, known)
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
        LoadOptions(device=device, precision=precision, threads=threads, max_length=max_length, batch_size=batch_size,
                    max_tokens=max_tokens, revision=revision, local_files_only=local_files_only)  # checks the counts
        loaded = open_model(model, task=self.task, device=device, threads=threads, max_length=max_length,
                            revision=revision, precision=precision, local_files_only=local_files_only)
        # os.fspath after open_model, which names a model argument of the wrong type
        self._attach(loaded, name=os.fspath(model), batch_size=batch_size, max_tokens=max_tokens)

    def _attach(self, loaded: LoadedModel, *, name: str, batch_size: int, max_tokens: int | None) -> None:
        """Run on ``loaded`` (opened as ``name``): what __init__ does once the model is open, and what another
        class over the same loaded model does (M3Embedder.sharing)."""
        self._model, self._name, self.batch_size = loaded, name, batch_size
        on_cuda = CUDA in loaded.session.providers
        if max_tokens is None:
            max_tokens = MAX_TOKENS_CUDA if on_cuda else MAX_TOKENS_CPU
        self.max_tokens = max_tokens
        self._tokenize_ahead = on_cuda
        self._reduce = reducer(loaded.spec)
        self._workers: WorkerPool | None = None
        self._workers_lock = threading.RLock()  # held while the pool is started, used or closed

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

    @staticmethod
    def _shares_work(workers: int | None, items: int) -> bool:
        """Whether a call with ``workers`` runs in worker processes: not for workers=None or 1, nor for inputs too
        small to share (fewer than 2 items per worker)."""
        return workers is not None and positive_int("workers", workers) > 1 and items >= 2 * workers

    def _in_workers(self, workers: int, method: str, items: list, options: dict) -> np.ndarray | dict:
        """``method`` over ``items`` split across ``workers`` processes (started on first use, kept until close()),
        rows in input order (for M3Embedder, each of its outputs). Threads take turns: one thread's call never closes the pool another's is running on."""
        with self._workers_lock:
            if self._workers is None or self._workers.processes != workers:
                self.close()
                self._workers = self._start_workers(workers)
            parts = self._workers.map(method, split(items, workers), options)
        return join(parts, workers, len(items))

    def _start_workers(self, workers: int) -> WorkerPool:
        settings = {"precision": self.precision.value, "threads": max(1, self._model.session.threads // workers),
                    "max_length": self.max_length, "batch_size": self.batch_size, "max_tokens": self.max_tokens,
                    **self._worker_settings()}
        source, pinned = self._model.reopen
        return WorkerPool(source, task=self._worker_task, processes=workers, settings={**settings, **pinned})

    @property
    def _worker_task(self) -> str:
        """What a worker process opens the model as (workers.main)."""
        return self.task.value

    def _worker_settings(self) -> dict:
        return {}

    def close(self) -> None:
        """Stop the worker processes, if any were started (they also stop when the object is collected or at exit);
        a call running on them in another thread finishes first."""
        with self._workers_lock:
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
    options: LoadOptions,
) -> Handle:
    """What an adapter (LangChain, LlamaIndex) runs on: the ``given`` Embedder/Reranker to share, or ``cls`` opened
    from ``model`` with ``options``; exactly one of ``model`` and ``given`` (named ``name``) must be given, and
    load options only with ``model`` (a built one was loaded with its own)."""
    if (model is None) == (given is None):
        raise InputError(f"give either model= (a folder or repo id) or {name}= (an already built one), not both or none")
    if given is not None:
        beside = options.changed()
        if beside:
            raise InputError(f"{', '.join(f'{key}=' for key in beside)} given beside {name}=, which was loaded with "
                             f"its own options: pass them when building the {cls.__name__}, or give model= instead")
        return given
    return cls(model, **dataclasses.asdict(options))
