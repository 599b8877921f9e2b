"""LangChain adapters: BgeOnnxEmbeddings (an Embeddings) and BgeOnnxRerank (a document compressor), thin over the runtime."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence

from .checks import describe
from .embedder import Embedder
from .handle import LoadOptions, given_or_opened, model_or_name
from .errors import InputTypeError, MissingExtraError, install_hint
from .reranker import Reranker

try:
    from langchain_core.callbacks import Callbacks
    from langchain_core.documents import BaseDocumentCompressor, Document
    from langchain_core.embeddings import Embeddings
    from pydantic import ConfigDict, Field, PrivateAttr
except ImportError as err:
    raise MissingExtraError(f"bge_onnx.langchain needs langchain-core ({err}): {install_hint('langchain')}") from err

__all__ = ["BgeOnnxEmbeddings", "BgeOnnxRerank"]


class BgeOnnxEmbeddings(Embeddings):
    """A LangChain ``Embeddings`` over :class:`bge_onnx.Embedder`: documents as passages, queries with the
    model's query instruction.

    Args:
        model: an exported model folder or hub repo id (as for ``Embedder``); or give ``embedder=`` instead.
        model_name: the same as ``model``, under the name of LangChain's HuggingFaceEmbeddings and FastEmbedEmbeddings.
        embedder: an already built ``Embedder`` to share (then the other options must be left out).
        options: how the model is opened, :class:`bge_onnx.LoadOptions` (device, precision, threads, max_length,
            batch_size, max_tokens, revision, local_files_only), as for :class:`bge_onnx.Embedder`.

    Raises:
        InputError: neither or both of ``model`` and ``embedder``, or options beside ``embedder``; InputTypeError: a
            text that is not a str, or an unknown keyword.

    >>> BgeOnnxEmbeddings(model="bge-small-onnx").embed_query("what is a panda?")[:2]  # doctest: +SKIP
    [0.012, -0.034]
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | None = None,
        *,
        model_name: str | None = None,
        embedder: Embedder | None = None,
        **options: object,
    ) -> None:
        options = LoadOptions.of(type(self).__name__, options, also=("model_name", "embedder"))
        self.embedder = given_or_opened(Embedder, model_or_name(model, model_name), embedder, name="embedder",
                                        options=options)

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        """Embed passages to search in (:meth:`Embedder.encode_corpus`, no instruction)."""
        return self.embedder.encode_corpus(texts).tolist()

    def embed_query(self, text: str) -> list[float]:
        """Embed a search query with the model's instruction (:meth:`Embedder.encode_queries`)."""
        if not isinstance(text, str):
            raise InputTypeError(f"query is {type(text).__name__} {describe(text)}, expected str")
        return self.embedder.encode_queries(text).tolist()

    # onnxruntime releases the GIL while it runs, so a worker thread keeps the event loop free.
    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        return await asyncio.to_thread(self.embed_documents, texts)

    async def aembed_query(self, text: str) -> list[float]:
        return await asyncio.to_thread(self.embed_query, text)


class BgeOnnxRerank(BaseDocumentCompressor):
    """A LangChain document compressor over :class:`bge_onnx.Reranker`: keeps the ``top_n`` documents most
    relevant to the query, best first, each with its score in ``metadata["relevance_score"]``.

    Args:
        model: an exported reranker folder or hub repo id; or give ``reranker=`` instead.
        reranker: an already built ``Reranker`` to share.
        top_n: how many documents to keep.
        normalize: scores as sigmoid(logit) in (0, 1) instead of raw logits.
        options: how the model is opened, :class:`bge_onnx.LoadOptions`, as for :class:`bge_onnx.Reranker`.

    >>> BgeOnnxRerank(model="bge-reranker-onnx", top_n=2).compress_documents(docs, "what is a panda?")  # doctest: +SKIP
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

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

    @property
    def reranker(self) -> Reranker:
        return self._reranker

    def compress_documents(
        self, documents: Sequence[Document], query: str, callbacks: Callbacks | None = None
    ) -> Sequence[Document]:
        """The ``top_n`` documents, best first (:meth:`Reranker.rerank`), as copies with ``relevance_score`` added."""
        documents = list(documents)
        ranked = self._reranker.rerank(
            query, [doc.page_content for doc in documents], top_k=self.top_n, normalize=self.normalize
        )
        return [
            Document(
                page_content=documents[r.index].page_content,
                metadata={**documents[r.index].metadata, "relevance_score": r.score},
                id=documents[r.index].id,
            )
            for r in ranked
        ]
