"""Worker processes for one model folder: a large input split over N processes, each with its own session.

Each worker is a fresh Python (``python -c "from bge_onnx.workers import main; main()"``) that loads the folder once and then answers
requests over its stdin/stdout: length-prefixed pickles, between this process and the children it started. A fresh
interpreter, not a fork: onnxruntime's threads do not survive a fork, and a spawned child would re-run the caller's
script, which then needs an ``if __name__ == "__main__"`` guard; this needs none, on any platform.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
import threading
import warnings
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from . import errors
from .errors import BgeOnnxError, caller_stacklevel
from .session import SHARE_WEIGHTS_ENV

_HEADER = struct.Struct("<Q")


def _send(stream: BinaryIO, message: object) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def _receive(stream: BinaryIO) -> Any:
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        raise EOFError("the worker closed its output")
    (size,) = _HEADER.unpack(header)
    return pickle.loads(stream.read(size))  # from a child this process started, never from outside


def _worker_env() -> dict[str, str]:
    """The workers' environment: unbuffered, and sharing the weights' pages unless $BGE_ONNX_SHARE_WEIGHTS says
    otherwise (N copies of the prepacked weights cost more memory than the unpacked kernels cost time on batches;
    docs/decisions.md section 14)."""
    return {SHARE_WEIGHTS_ENV: "1", **os.environ, "PYTHONUNBUFFERED": "1"}


class WorkerPool:
    """``processes`` workers holding one model folder each, loaded once; closed by :meth:`close` or at exit."""

    def __init__(self, folder: Path | str, *, task: str, processes: int, settings: dict[str, Any]) -> None:
        self.processes = processes
        self._lock = threading.Lock()  # one map at a time: each worker answers in order
        self._children = [
            subprocess.Popen([sys.executable, "-c", "from bge_onnx.workers import main; main()",
                              json.dumps({"folder": str(folder), "task": task, **settings})],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=_worker_env())
            for _ in range(processes)
        ]
        self._finalizer = weakref.finalize(self, _stop, list(self._children))
        for k, child in enumerate(self._children):
            answer = self._answer(k, child)
            if answer != "ready":
                self.close()
                kind, message = answer
                raise _error(kind)(f"worker {k} of {processes} could not load {folder}: {message}")

    def _answer(self, k: int, child: subprocess.Popen) -> Any:
        try:
            return _receive(child.stdout)
        except (EOFError, OSError, pickle.UnpicklingError) as err:
            code = child.poll()
            self.close()
            raise BgeOnnxError(f"worker {k} of {self.processes} died (exit status {code}); see its message above") from err

    def map(self, method: str, shares: Sequence[list], options: dict[str, Any]) -> list[np.ndarray]:
        """Run ``model.method(share, **options)`` in worker k for share k; the results in share order.

        Warnings a worker raised (texts truncated) are raised again here; an error in a worker is raised here as a
        BgeOnnxError naming the worker and the position of its share's items in the caller's input.
        """
        with self._lock:
            busy = [(k, child) for k, (child, share) in enumerate(zip(self._children, shares)) if share]
            for k, child in busy:
                _send(child.stdin, (method, shares[k], options))
            results: list[np.ndarray | None] = [None] * len(shares)
            failure = None
            for k, child in busy:
                status, value, caught = self._answer(k, child)
                for message in caught:
                    warnings.warn(message, UserWarning, stacklevel=caller_stacklevel())
                if status == "ok":
                    results[k] = value
                elif failure is None:
                    failure = (k, value)
        if failure is not None:
            k, (kind, message) = failure
            raise _error(kind)(f"worker {k} of {self.processes} (items {k}, {k + self.processes}, ... of the input): "
                               f"{message}")
        return [r for r in results if r is not None]

    def close(self) -> None:
        self._finalizer()


def _stop(children: list[subprocess.Popen]) -> None:
    for child in children:
        try:
            child.stdin.close()
        except OSError:
            pass
    for child in children:
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()


def _error(name: str) -> type[BgeOnnxError]:
    """The class of ours named ``name`` (an InputError in a worker stays one for the caller), else BgeOnnxError."""
    cls = getattr(errors, name, None)
    return cls if isinstance(cls, type) and issubclass(cls, BgeOnnxError) else BgeOnnxError


def split(items: list, n: int) -> list[list]:
    """Every n-th item to each share (neighbours in a corpus tend to be alike in length, so shares are too)."""
    return [items[k::n] for k in range(n)]


def join(parts: list, n: int, total: int) -> Any:
    """The inverse of split: rows back in input order, for arrays, lists, and dicts of them (M3Embedder.encode's,
    whose outputs not asked for are None)."""
    first = parts[0]
    if isinstance(first, dict):
        return {key: None if first[key] is None else join([part[key] for part in parts], n, total) for key in first}
    if isinstance(first, list):
        rows: list = [None] * total
        for k, part in enumerate(parts):
            rows[k::n] = part
        return rows
    out = np.empty((total, *first.shape[1:]), dtype=first.dtype)
    for k, part in enumerate(parts):
        out[k::n] = part
    return out


def main() -> None:
    """A worker: load the model, say ready, then answer (method, items, options) until stdin closes."""
    settings = json.loads(sys.argv[-1])
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing else may write to the answer stream
    try:
        from .embedder import Embedder
        from .m3 import M3Embedder
        from .reranker import Reranker

        cls = {"embed": Embedder, "rerank": Reranker, "m3": M3Embedder}[settings.pop("task")]
        model = cls(settings.pop("folder"), device="cpu", **settings)
    except Exception as err:  # the parent names the folder and raises
        _send(stdout, (type(err).__name__, f"{type(err).__name__}: {err}"))
        return
    _send(stdout, "ready")
    while True:
        try:
            method, items, options = _receive(stdin)
        except EOFError:
            return
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                answer = ("ok", getattr(model, method)(items, **options))
            except Exception as err:  # sent back by name: the caller raises the same class of ours
                answer = ("error", (type(err).__name__, f"{type(err).__name__}: {err}"))
        _send(stdout, (*answer, sorted({str(w.message) for w in caught})))
