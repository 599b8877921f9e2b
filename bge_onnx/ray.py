"""Ray Data adapters: embed or rerank a Dataset with one Embedder / Reranker per actor, loaded once (the [ray] extra).

Batches travel as Arrow tables and the vectors come back as a plain ``fixed_size_list<float32>`` column, so the
Parquet that Ray writes is read by pyarrow, pandas, polars or DuckDB without Ray installed."""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any

import numpy as np

from .checks import positive_int
from .embedder import Embedder
from .errors import InputError, MissingExtraError, install_hint
from .handle import LoadOptions
from .reranker import Reranker
from .session import SHARE_WEIGHTS_ENV

__all__ = ["embed_dataset", "rerank_dataset"]

_KINDS = ("passage", "query", "text")


def _ray() -> Any:
    try:
        import ray
        import ray.data
    except ImportError as err:
        raise MissingExtraError(f"bge_onnx.ray needs Ray Data ({err}): {install_hint('ray')}") from err
    return ray


def _strings(table: Any, column: str) -> list[str]:
    if column not in table.column_names:
        raise InputError(f"the dataset has no column {column!r} (it has {', '.join(map(repr, table.column_names))})")
    values = table.column(column).to_pylist()
    for i, value in enumerate(values):
        if not isinstance(value, str):
            raise InputError(f"column {column!r} holds {type(value).__name__} {value!r} at row {i} of a batch of "
                             f"{len(values)}: every row needs a string")
    return values


def share_weights() -> None:
    """Actors on one node share the weights' pages (each actor is a process of its own), unless
    $BGE_ONNX_SHARE_WEIGHTS says otherwise (docs/decisions.md section 14)."""
    os.environ.setdefault(SHARE_WEIGHTS_ENV, "1")


class _EmbedActor:
    """One Embedder per actor, loaded when the actor starts; each batch gets a column of vectors."""

    def __init__(self, model: str, kind: str, columns: tuple[str, str], options: dict[str, Any]) -> None:
        share_weights()
        embedder = Embedder(model, **options)
        self.encode = {"passage": embedder.encode_corpus, "query": embedder.encode_queries,
                       "text": embedder.encode}[kind]
        self.text_column, self.output_column = columns

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        vectors = np.ascontiguousarray(self.encode(_strings(batch, self.text_column)), dtype=np.float32)
        column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])
        return batch.append_column(self.output_column, column)


class _RerankActor:
    """One Reranker per actor; each batch gets a column of scores."""

    def __init__(self, model: str, columns: tuple[str, str, str], normalize: bool, options: dict[str, Any]) -> None:
        share_weights()
        self.reranker = Reranker(model, **options)
        self.columns, self.normalize = columns, normalize

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        query, passage, output = self.columns
        pairs = list(zip(_strings(batch, query), _strings(batch, passage)))
        scores = self.reranker.compute_score(pairs, normalize=self.normalize)
        return batch.append_column(output, pa.array(np.asarray(scores, dtype=np.float32)))


def _map(dataset: Any, actor: type, args: tuple, concurrency: int | tuple[int, int], batch_size: int,
         threads: int) -> Any:
    """map_batches over an actor pool of ``concurrency`` actors (or a (min, max) range), each asking for
    ``threads`` CPUs; warns when the actors would take every CPU of the running cluster, which leaves none for
    Ray's read and write tasks and stalls the job."""
    ray = _ray()
    if not isinstance(dataset, ray.data.Dataset):
        raise InputError(f"dataset must be a ray.data.Dataset, got {type(dataset).__name__}")
    sizes = concurrency if isinstance(concurrency, tuple) else (concurrency, concurrency)
    if len(sizes) != 2 or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in sizes) \
            or sizes[0] > sizes[1]:
        raise InputError(f"concurrency must be a positive int or a (min, max) pair of them, got {concurrency!r}")
    positive_int("batch_size", batch_size)
    cpus = threads
    if ray.is_initialized():
        total = ray.cluster_resources().get("CPU", 0)
        if sizes[0] * cpus >= total:
            warnings.warn(f"{sizes[0]} actor(s) x {cpus} CPU(s) take all {total:g} CPUs of this Ray cluster, "
                          "leaving none for reading and writing: the job will wait for more CPUs; give fewer "
                          "actors, or a range such as concurrency=(1, n)", RuntimeWarning, stacklevel=3)
    return dataset.map_batches(
        actor,
        fn_constructor_args=args,
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=sizes[0], max_size=sizes[1]),
        num_cpus=cpus,
    )


def _options(owner: str, keywords: dict[str, object], own: tuple[str, ...]) -> LoadOptions:
    """The actors' load options: on the CPU with 1 thread unless told otherwise (Ray counts an actor's CPUs, not the
    GPU that device="auto" could take); ``batch_size`` is Ray's here (rows per batch), so the model keeps its own."""
    keywords = {"device": "cpu", **keywords}
    if keywords.get("threads") is None:
        keywords["threads"] = 1
    return LoadOptions.of(owner, keywords, also=own)


def embed_dataset(
    dataset: Any,
    model: str | os.PathLike[str],
    *,
    text_column: str = "text",
    output_column: str = "embedding",
    kind: str = "passage",
    concurrency: int | tuple[int, int] = 1,
    batch_size: int = 256,
    **options: object,
) -> Any:
    """A Ray Dataset with a column of float32 vectors added (``fixed_size_list<float32>``), computed by an actor
    pool, each actor holding one Embedder (loaded once per actor) and asking Ray for ``threads`` CPUs (default 1).

    Args:
        dataset: a ``ray.data.Dataset`` with a string column ``text_column``.
        model: a model folder (on every node: a shared path) or a hub repo id (each node downloads it, or reads its
            cache).
        kind: "passage" (encode_corpus), "query" (encode_queries: the model's instruction) or "text" (encode).
        concurrency: the number of actors, or a (min, max) range that Ray Data scales within.
        batch_size: rows per batch handed to an actor.
        options: how each actor opens the model, :class:`bge_onnx.LoadOptions` (not its batch_size); here device
            defaults to "cpu" and threads (also the CPUs Ray gives each actor) to 1.

    Returns:
        the dataset, lazily mapped (nothing runs until it is consumed or written).

    >>> embed_dataset(ray.data.read_parquet("corpus.parquet"), "bge-small-onnx", concurrency=4)  # doctest: +SKIP
    """
    if kind not in _KINDS:
        raise InputError(f"kind must be one of {', '.join(map(repr, _KINDS))}, got {kind!r}")
    load = _options("embed_dataset", options, ("text_column", "output_column", "kind", "concurrency", "batch_size"))
    args = (os.fspath(model), kind, (text_column, output_column), dataclasses.asdict(load))
    return _map(dataset, _EmbedActor, args, concurrency, batch_size, load.threads)


def rerank_dataset(
    dataset: Any,
    model: str | os.PathLike[str],
    *,
    query_column: str = "query",
    passage_column: str = "passage",
    output_column: str = "score",
    normalize: bool = False,
    concurrency: int | tuple[int, int] = 1,
    batch_size: int = 256,
    **options: object,
) -> Any:
    """A Ray Dataset with a float32 column of scores for its (query, passage) rows, as :func:`embed_dataset` does
    for vectors; ``normalize``: sigmoid scores in (0, 1)."""
    load = _options("rerank_dataset", options, ("query_column", "passage_column", "output_column", "normalize",
                                                 "concurrency", "batch_size"))
    args = (os.fspath(model), (query_column, passage_column, output_column), normalize, dataclasses.asdict(load))
    return _map(dataset, _RerankActor, args, concurrency, batch_size, load.threads)
