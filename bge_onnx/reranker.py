"""Reranker: (query, passage) pairs -> relevance scores from an exported cross-encoder."""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from .errors import InputError, InputTypeError
from .batching import Progress
from .checks import check_pairs, check_texts, describe, positive_int
from .handle import ModelHandle
from .tokenize import check_encodable
from .spec import Task


@dataclasses.dataclass(frozen=True)
class RerankResult:
    """One passage of a rerank: its position in the input, its score and its text."""

    index: int
    score: float
    text: str


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-x.astype(np.float64)))).astype(np.float32)


class Reranker(ModelHandle):
    """Scores (query, passage) pairs like FlagReranker, without torch.

    Args:
        model: an exported reranker folder or a hub repo id holding one.
        device, threads, batch_size, max_tokens, precision, revision, local_files_only: as for
            :class:`bge_onnx.Embedder`.
        max_length: token limit of a whole pair (FlagReranker's default: 512).
        query_max_length: token limit of the query part; default ``max_length * 3 // 4`` as in FlagReranker.

    >>> Reranker("bge-reranker-onnx").compute_score(("what is a panda?", "The giant panda is a bear."))  # doctest: +SKIP
    5.26
    """

    task = Task.RERANK

    def __init__(
        self,
        model: str | os.PathLike[str] | None = None,
        *,
        device: str = "auto",
        threads: int | None = None,
        max_length: int | None = None,
        query_max_length: int | None = None,
        batch_size: int = 256,
        max_tokens: int | None = None,
        precision: str = "auto",
        revision: str | None = None,
        local_files_only: bool = False,
    ) -> None:
        super().__init__(
            model,
            device=device,
            threads=threads,
            max_length=max_length,
            batch_size=batch_size,
            max_tokens=max_tokens,
            precision=precision,
            revision=revision,
            local_files_only=local_files_only,
        )
        limit = self._model.tokenizer.max_length
        if query_max_length is None:
            query_max_length = limit * 3 // 4
        positive_int("query_max_length", query_max_length)
        if query_max_length + self._model.tokenizer.pair_specials >= limit:
            raise InputError(
                f"query_max_length={query_max_length} leaves no room for the passage within max_length={limit}"
            )
        self.query_max_length = query_max_length

    def _worker_settings(self) -> dict:
        return {"query_max_length": self.query_max_length}

    def compute_score(
        self,
        pairs: tuple[str, str] | list[tuple[str, str]],
        *,
        normalize: bool = False,
        batch_size: int | None = None,
        show_progress: bool = False,
        workers: int | None = None,
    ) -> float | np.ndarray:
        """Score pairs: raw logits, or sigmoid(logit) in (0, 1) when ``normalize``.

        Args:
            pairs: one (query, passage) pair, or a list of them.
            workers: split the pairs over this many processes, as :meth:`Embedder.encode` does.

        Returns:
            a float for one pair, else float32 ``(n,)`` (``(0,)`` for an empty list).

        Raises:
            InputTypeError: a pair is not two str (the message names its index).
            InputError: a text cannot be encoded as UTF-8.

        >>> reranker.compute_score([("q", "relevant"), ("q", "unrelated")])  # doctest: +SKIP
        array([ 3.1, -7.9], dtype=float32)
        """
        if isinstance(pairs, (tuple, list)) and len(pairs) == 2 and isinstance(pairs[0], str):
            return float(self.compute_score([pairs], normalize=normalize, batch_size=batch_size)[0])
        items = check_pairs(pairs)
        batch_size = self.batch_size if batch_size is None else positive_int("batch_size", batch_size)
        if not items:
            return np.zeros((0,), dtype=np.float32)
        if self._shares_work(workers, len(items)):
            check_encodable([text for pair in items for text in pair], name="pair texts")
            return self._in_workers(workers, "compute_score", items, {"normalize": normalize, "batch_size": batch_size})
        progress = Progress(len(items), label="scored", enabled=show_progress)

        def tokenize(chunk: list[tuple[str, str]], at: int) -> tuple[list, int]:
            return self._model.tokenizer.encode_pairs(chunk, query_max_length=self.query_max_length, start=at)

        scores = self._run_chunks(
            items,
            tokenize,
            width=1,
            batch_size=batch_size,
            progress=progress,
            what="pairs",
        )[:, 0]
        return _sigmoid(scores) if normalize else scores

    def rerank(
        self,
        query: str,
        passages: list[str],
        *,
        top_k: int | None = None,
        normalize: bool = False,
        batch_size: int | None = None,
        show_progress: bool = False,
        workers: int | None = None,
    ) -> list[RerankResult]:
        """Score each passage against ``query`` and return them best first (ties keep input order).

        Args:
            top_k: keep only the best ``top_k``; default all.
            normalize, batch_size, show_progress, workers: as for :meth:`compute_score`.

        >>> reranker.rerank("what is a panda?", ["hi", "The giant panda is a bear."], top_k=1)  # doctest: +SKIP
        [RerankResult(index=1, score=5.2, text='The giant panda is a bear.')]
        """
        if not isinstance(query, str):
            raise InputTypeError(f"query is {type(query).__name__} {describe(query)}, expected str")
        items = check_texts(passages, name="passages")
        if top_k is not None:
            positive_int("top_k", top_k)
        scores = self.compute_score([(query, p) for p in items], normalize=normalize, batch_size=batch_size,
                                    show_progress=show_progress, workers=workers)
        order = np.argsort(-scores, kind="stable")[:top_k]
        return [RerankResult(int(i), float(scores[i]), items[i]) for i in order]
