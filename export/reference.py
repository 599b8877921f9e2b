"""The parity gate's reference where torch is not installed: a numpy forward pass of the checkpoint, in float64,
written from transformers' BertModel / XLMRobertaModel and FlagEmbedding's bge-m3 heads, not from the graph.

The texts are tokenised by the runtime's tokenizer (the graph is what the gate checks; tokenisation is held to
transformers' by the test suite), and the results go to parity.py's gates as PyTorch's would.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bge_onnx.spec import Pooling
from bge_onnx.tokenize import TextTokenizer, pad_batch

from .checkpoint import Checkpoint

_ERF = np.frompyfunc(math.erf, 1, 1)


def erf(x: np.ndarray) -> np.ndarray:
    """erf of each element by the C library's (math.erf): exact to the last bit of a float64."""
    return _ERF(x).astype(np.float64)


def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def _linear(x: np.ndarray, c: Checkpoint, name: str) -> np.ndarray:
    return x @ c.encoder(name + ".weight").astype(np.float64).T + c.encoder(name + ".bias")


class NumpyEncoder:
    """The checkpoint's forward pass in float64."""

    def __init__(self, checkpoint: Checkpoint) -> None:
        self.c = checkpoint

    def hidden(self, input_ids: np.ndarray, attention_mask: np.ndarray,
               token_type_ids: np.ndarray | None = None) -> np.ndarray:
        """The last layer's token states, (batch, sequence, hidden)."""
        c = self.c
        if c.roberta:
            real = (input_ids != c.pad_id).astype(np.int64)
            positions = np.cumsum(real, axis=1) * real + c.pad_id
        else:
            positions = np.arange(input_ids.shape[1])[None, :]
        types = np.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        x = (c.encoder("embeddings.word_embeddings.weight")[input_ids].astype(np.float64)
             + c.encoder("embeddings.token_type_embeddings.weight")[types]
             + c.encoder("embeddings.position_embeddings.weight")[positions])
        x = _layer_norm(x, c.encoder("embeddings.LayerNorm.weight"), c.encoder("embeddings.LayerNorm.bias"), c.eps)
        blocked = np.where(attention_mask[:, None, None, :] > 0, 0.0, -np.inf)
        for i in range(c.layers):
            x = self._layer(x, f"encoder.layer.{i}.", blocked)
        return x

    def _layer(self, x: np.ndarray, p: str, blocked: np.ndarray) -> np.ndarray:
        c = self.c
        batch, length, width = x.shape
        size = width // c.heads

        def heads(t: np.ndarray) -> np.ndarray:  # (batch, heads, sequence, size)
            return t.reshape(batch, length, c.heads, size).transpose(0, 2, 1, 3)

        q, k, v = (heads(_linear(x, c, p + f"attention.self.{n}")) for n in ("query", "key", "value"))
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(size) + blocked
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        context = (scores / scores.sum(-1, keepdims=True)) @ v
        context = context.transpose(0, 2, 1, 3).reshape(batch, length, width)
        x = _layer_norm(_linear(context, c, p + "attention.output.dense") + x,
                        c.encoder(p + "attention.output.LayerNorm.weight"),
                        c.encoder(p + "attention.output.LayerNorm.bias"), c.eps)
        inner = _linear(x, c, p + "intermediate.dense")
        inner = 0.5 * inner * (1.0 + erf(inner / math.sqrt(2.0)))
        return _layer_norm(_linear(inner, c, p + "output.dense") + x, c.encoder(p + "output.LayerNorm.weight"),
                           c.encoder(p + "output.LayerNorm.bias"), c.eps)

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray,
               token_type_ids: np.ndarray | None = None) -> np.ndarray:
        """The classification head's one logit per row, (batch,)."""
        x = self.hidden(input_ids, attention_mask, token_type_ids)[:, 0]
        (dense, dense_bias), (out, out_bias) = self.c.classifier()
        x = np.tanh(x @ dense.astype(np.float64).T + dense_bias)
        return (x @ out.astype(np.float64).T + out_bias)[:, 0]


def _pool(hidden: np.ndarray, mask: np.ndarray, pooling: Pooling) -> np.ndarray:
    if Pooling(pooling) is Pooling.CLS:
        return hidden[:, 0]
    weights = mask[..., None].astype(np.float64)
    return (hidden * weights).sum(1) / np.maximum(weights.sum(1), 1e-9)


def _batches(encodings: list, pad_id: int, inputs: Sequence[str]):
    """Each text alone: no padding, so the reference never depends on masking (hidden() handles padded batches too,
    as the tests check)."""
    for encoding in encodings:
        yield pad_batch([encoding], pad_id=pad_id, input_names=inputs)


def numpy_embeddings(encoder: NumpyEncoder, folder: Path, texts: Sequence[str], *, pooling: Pooling,
                     max_length: int, pad_id: int, inputs: Sequence[str]) -> np.ndarray:
    """Pooled (not normalised) vectors, as parity.torch_embeddings gives them."""
    tokenizer = TextTokenizer(folder, max_length=max_length)
    encodings, _ = tokenizer.encode_texts(list(texts))
    rows = [_pool(encoder.hidden(**feeds), feeds["attention_mask"], pooling)
            for feeds in _batches(encodings, pad_id, inputs)]
    return np.concatenate(rows).astype(np.float32)


def numpy_scores(encoder: NumpyEncoder, folder: Path, pairs: Sequence[tuple[str, str]], *, max_length: int,
                 pad_id: int, inputs: Sequence[str]) -> np.ndarray:
    """Raw logits, pairs cut by FlagReranker's rules (query to 3/4 of max_length), as parity.torch_scores."""
    tokenizer = TextTokenizer(folder, max_length=max_length)
    encodings, _ = tokenizer.encode_pairs(list(pairs), query_max_length=max_length * 3 // 4)
    scores = [encoder.logits(**feeds) for feeds in _batches(encodings, pad_id, inputs)]
    return np.concatenate(scores).astype(np.float32)


def numpy_m3(encoder: NumpyEncoder, folder: Path, texts: Sequence[str], *, pooling: Pooling, max_length: int,
             pad_id: int, skip_ids: Sequence[int]) -> tuple[np.ndarray, list[dict[str, float]], list[np.ndarray]]:
    """bge-m3's three outputs as parity.torch_m3 gives them (FlagEmbedding's rules)."""
    (colbert, colbert_bias), (sparse, sparse_bias) = encoder.c.m3_heads
    dense = numpy_embeddings(encoder, folder, texts, pooling=pooling, max_length=max_length, pad_id=pad_id,
                             inputs=("input_ids", "attention_mask"))
    tokenizer = TextTokenizer(folder, max_length=max_length)
    encodings, _ = tokenizer.encode_texts(list(texts))
    lexical, multi = [], []
    for encoding in encodings:  # one at a time: no padding to mask
        ids = np.array([encoding.ids], dtype=np.int64)
        hidden = encoder.hidden(ids, np.ones_like(ids))[0]
        weights = np.maximum(hidden @ sparse.astype(np.float64).T + sparse_bias, 0.0)[:, 0]
        best: dict[str, float] = {}
        for token, weight in zip(encoding.ids, weights.tolist()):
            if token not in skip_ids and weight > 0:
                best[str(token)] = max(weight, best.get(str(token), 0.0))
        lexical.append(best)
        vectors = hidden[1:] @ colbert.astype(np.float64).T + colbert_bias
        multi.append((vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)).astype(np.float32))
    return dense, lexical, multi
