"""LlamaIndex adapters: BgeOnnxEmbedding (a BaseEmbedding) and BgeOnnxRerank (a node postprocessor), thin over the runtime."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from .checks import check_texts, describe
from .embedder import Embedder
from .handle import LoadOptions, given_or_opened, model_or_name
from .errors import InputError, InputTypeError, MissingExtraError, install_hint
from .reranker import Reranker

try:
    from llama_index.core.base.embeddings.base import BaseEmbedding, Embedding
    from llama_index.core.postprocessor.types import BaseNodePostprocessor
    from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle
    from pydantic import ConfigDict, Field, PrivateAttr
except ImportError as err:
    raise MissingExtraError(f"bge_onnx.llama_index needs llama-index-core ({err}): {install_hint('llamaindex')}") from err

__all__ = ["BgeOnnxEmbedding", "BgeOnnxRerank"]



def _text(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise InputTypeError(f"{name} is {type(value).__name__} {describe(value)}, expected str")
    return value


class BgeOnnxEmbedding(BaseEmbedding):
    """A LlamaIndex ``BaseEmbedding`` over :class:`bge_onnx.Embedder`: queries with the model's instruction,
    texts (nodes) without, in batches.

    Args:
        model: an exported model folder or hub repo id (as for ``Embedder``); or give ``embedder=`` instead.
        model_name: the same as ``model``, under the name LlamaIndex's own embeddings use (and ``to_dict`` writes).
        embedder: an already built ``Embedder`` to share (then the load options must be left out).
        embed_batch_size: texts LlamaIndex hands over per call; default the Embedder's batch_size (the Embedder
            itself batches by tokens within it).
        options: how the model is opened, :class:`bge_onnx.LoadOptions` (device, precision, threads, max_length,
            batch_size, max_tokens, revision, local_files_only), as for :class:`bge_onnx.Embedder`.

    ``to_dict()`` records the model and the load options that differ from the defaults (those of a given Embedder:
    its folder, the precision it chose, its limits), so that ``from_dict`` loads the same model again.

    >>> Settings.embed_model = BgeOnnxEmbedding(model="bge-small-onnx")  # doctest: +SKIP
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, protected_namespaces=())
    load_options: dict[str, Any] = Field(default_factory=dict, description="LoadOptions that differ from defaults")
    _embedder: Embedder = PrivateAttr()

    def __init__(
        self,
        model: str | os.PathLike[str] | None = None,
        *,
        model_name: str | None = None,
        embedder: Embedder | None = None,
        embed_batch_size: int | None = None,
        num_workers: int | None = None,
        embeddings_cache: Any = None,
        **options: object,
    ) -> None:
        model = model_or_name(model, model_name)
        options = LoadOptions.of(type(self).__name__, options, also=(
            "model_name", "embedder", "embed_batch_size", "num_workers", "embeddings_cache"))
        embedder = given_or_opened(Embedder, model, embedder, name="embedder", options=options)
        if model is None:  # a given Embedder: record what reloads it
            on_cuda = "CUDAExecutionProvider" in embedder.providers
            model, options = embedder.folder, LoadOptions(
                device="cuda" if on_cuda else "cpu", precision=embedder.precision.value,
                threads=embedder._model.session.threads, max_length=embedder.max_length,
                batch_size=embedder.batch_size, max_tokens=embedder.max_tokens)
        super().__init__(
            model_name=os.fspath(model), embed_batch_size=embed_batch_size or embedder.batch_size,
            num_workers=num_workers, load_options=options.changed(),
            **({} if embeddings_cache is None else {"embeddings_cache": embeddings_cache}),
        )
        self._embedder = embedder

    def to_dict(self, **kwargs: Any) -> dict[str, Any]:
        """LlamaIndex's dict, the load options at its top level as keywords (what ``from_dict`` passes back)."""
        data = super().to_dict(**kwargs)
        data.update(data.pop("load_options", None) or {})
        return data

    @classmethod
    def class_name(cls) -> str:
        return "BgeOnnxEmbedding"

    @property
    def embedder(self) -> Embedder:
        return self._embedder

    def get_text_embedding_batch(self, texts: list[str], show_progress: bool = False, **kwargs: Any) -> list[Embedding]:
        # LlamaIndex cuts the list into embed_batch_size pieces: check it whole first, so that an error names the
        # text's index in the caller's list, not in a piece. (**kwargs: the base class's signature, passed on.)
        check_texts(texts, name="texts")
        return super().get_text_embedding_batch(texts, show_progress=show_progress, **kwargs)

    async def aget_text_embedding_batch(
        self, texts: list[str], show_progress: bool = False, **kwargs: Any
    ) -> list[Embedding]:
        check_texts(texts, name="texts")
        return await super().aget_text_embedding_batch(texts, show_progress=show_progress, **kwargs)

    def _get_query_embedding(self, query: str) -> Embedding:
        return self._embedder.encode_queries([_text(query, "query")])[0].tolist()

    def _get_text_embedding(self, text: str) -> Embedding:
        return self._embedder.encode_corpus([_text(text, "text")])[0].tolist()

    def _get_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return self._embedder.encode_corpus(texts).tolist()

    # onnxruntime releases the GIL while it runs, so a worker thread keeps the event loop free.
    async def _aget_query_embedding(self, query: str) -> Embedding:
        return await asyncio.to_thread(self._get_query_embedding, query)

    async def _aget_text_embedding(self, text: str) -> Embedding:
        return await asyncio.to_thread(self._get_text_embedding, text)

    async def _aget_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return await asyncio.to_thread(self._get_text_embeddings, texts)


class BgeOnnxRerank(BaseNodePostprocessor):
    """A LlamaIndex node postprocessor over :class:`bge_onnx.Reranker`: the ``top_n`` nodes most relevant to the
    query, best first, each scored by the reranker.

    Args:
        model: an exported reranker folder or hub repo id; or give ``reranker=`` instead.
        reranker: an already built ``Reranker`` to share.
        top_n: how many nodes to keep.
        normalize: scores as sigmoid(logit) in (0, 1) instead of raw logits.
        options: how the model is opened, :class:`bge_onnx.LoadOptions`, as for :class:`bge_onnx.Reranker`.

    >>> index.as_query_engine(node_postprocessors=[BgeOnnxRerank(model="bge-reranker-onnx")])  # doctest: +SKIP
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    top_n: int = Field(default=3, gt=0)
    normalize: bool = False
    _reranker: Reranker = PrivateAttr()

    def __init__(
        self,
        model: str | os.PathLike[str] | None = None,
        *,
        reranker: Reranker | None = None,
        top_n: int = 3,
        normalize: bool = False,
        **options: object,
    ) -> None:
        options = LoadOptions.of(type(self).__name__, options, also=("reranker", "top_n", "normalize"))
        super().__init__(top_n=top_n, normalize=normalize)
        self._reranker = given_or_opened(Reranker, model, reranker, name="reranker", options=options)

    @classmethod
    def class_name(cls) -> str:
        return "BgeOnnxRerank"

    @property
    def reranker(self) -> Reranker:
        return self._reranker

    def _postprocess_nodes(
        self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None = None
    ) -> list[NodeWithScore]:
        if query_bundle is None:
            raise InputError("BgeOnnxRerank needs the query: pass query_bundle= or query_str= to postprocess_nodes")
        # the text the node was embedded with (its content and the metadata meant for embedding), as LlamaIndex's
        # own rerankers score it
        texts = [n.node.get_content(metadata_mode=MetadataMode.EMBED) for n in nodes]
        ranked = self._reranker.rerank(query_bundle.query_str, texts, top_k=self.top_n, normalize=self.normalize)
        return [NodeWithScore(node=nodes[r.index].node, score=r.score) for r in ranked]
