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
from .parity import lexical_weights

_ERF = np.frompyfunc(math.erf, 1, 1)


def erf(x: np.ndarray) -> np.ndarray:
    """erf of each element by the C library's (math.erf): exact to the last bit of a float64."""
    return _ERF(x).astype(np.float64)


def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


class NumpyEncoder:
    """The checkpoint's forward pass in float64."""

    def __init__(self, checkpoint: Checkpoint) -> None:
        self.c = checkpoint

    def hidden(self, input_ids: np.ndarray, attention_mask: np.ndarray,
               token_type_ids: np.ndarray | None = None) -> np.ndarray:
        """The last layer's token states, (batch, sequence, hidden)."""
        return self.hidden_each([{"input_ids": input_ids, "attention_mask": attention_mask,
                                  "token_type_ids": token_type_ids}])[0]

    def hidden_each(self, batches: Sequence[dict[str, np.ndarray | None]]) -> list[np.ndarray]:
        """hidden() of each batch, layer by layer: each layer's weights are widened to float64 once for all."""
        states = [self._embeddings(**feeds) for feeds in batches]
        blocked = [np.where(feeds["attention_mask"][:, None, None, :] > 0, 0.0, -np.inf) for feeds in batches]
        for i in range(self.c.layers):
            weights = self._weights(f"encoder.layer.{i}.")
            states = [self._layer(x, weights, b) for x, b in zip(states, blocked)]
        return states

    def _embeddings(self, input_ids: np.ndarray, attention_mask: np.ndarray,
                    token_type_ids: np.ndarray | None = None) -> np.ndarray:
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
        return _layer_norm(x, c.encoder("embeddings.LayerNorm.weight"), c.encoder("embeddings.LayerNorm.bias"), c.eps)

    def _weights(self, p: str) -> dict[str, np.ndarray]:
        """One layer's tensors in float64, Linear weights transposed to (in, out)."""
        names = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                 "intermediate.dense", "output.dense")
        weights = {n: self.c.encoder(p + n + ".weight").astype(np.float64).T for n in names}
        weights |= {n + ".bias": self.c.encoder(p + n + ".bias").astype(np.float64) for n in names}
        for n in ("attention.output.LayerNorm", "output.LayerNorm"):
            weights |= {f"{n}.{k}": self.c.encoder(f"{p}{n}.{k}").astype(np.float64) for k in ("weight", "bias")}
        return weights

    def _layer(self, x: np.ndarray, w: dict[str, np.ndarray], blocked: np.ndarray) -> np.ndarray:
        c = self.c
        batch, length, width = x.shape
        size = width // c.heads

        def linear(t: np.ndarray, name: str) -> np.ndarray:
            return t @ w[name] + w[name + ".bias"]

        def heads(t: np.ndarray) -> np.ndarray:  # (batch, heads, sequence, size)
            return t.reshape(batch, length, c.heads, size).transpose(0, 2, 1, 3)

        q, k, v = (heads(linear(x, f"attention.self.{n}")) for n in ("query", "key", "value"))
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(size) + blocked
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        context = (scores / scores.sum(-1, keepdims=True)) @ v
        context = context.transpose(0, 2, 1, 3).reshape(batch, length, width)
        x = _layer_norm(linear(context, "attention.output.dense") + x, w["attention.output.LayerNorm.weight"],
                        w["attention.output.LayerNorm.bias"], c.eps)
        inner = linear(x, "intermediate.dense")
        inner = 0.5 * inner * (1.0 + erf(inner / math.sqrt(2.0)))
        return _layer_norm(linear(inner, "output.dense") + x, w["output.LayerNorm.weight"], w["output.LayerNorm.bias"],
                           c.eps)

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray,
               token_type_ids: np.ndarray | None = None) -> np.ndarray:
        """The classification head's one logit per row, (batch,)."""
        return self.head(self.hidden(input_ids, attention_mask, token_type_ids))

    def head(self, hidden: np.ndarray) -> np.ndarray:
        """The classification head on token states: one logit per row."""
        (dense, dense_bias), (out, out_bias) = self.c.classifier()
        x = np.tanh(hidden[:, 0] @ dense.astype(np.float64).T + dense_bias)
        return (x @ out.astype(np.float64).T + out_bias)[:, 0]


def _pool(hidden: np.ndarray, mask: np.ndarray, pooling: Pooling) -> np.ndarray:
    if Pooling(pooling) is Pooling.CLS:
        return hidden[:, 0]
    weights = mask[..., None].astype(np.float64)
    return (hidden * weights).sum(1) / np.maximum(weights.sum(1), 1e-9)


def _alone(encodings: list, pad_id: int, inputs: Sequence[str]) -> list[dict[str, np.ndarray]]:
    """Each text as a batch of its own: no padding, so the reference never depends on masking (hidden() handles
    padded batches too, as the tests check)."""
    return [pad_batch([encoding], pad_id=pad_id, input_names=inputs) for encoding in encodings]


def numpy_embeddings(encoder: NumpyEncoder, folder: Path, texts: Sequence[str], *, pooling: Pooling,
                     max_length: int, pad_id: int, inputs: Sequence[str]) -> np.ndarray:
    """Pooled (not normalised) vectors, as parity.torch_embeddings gives them."""
    tokenizer = TextTokenizer(folder, max_length=max_length)
    encodings, _ = tokenizer.encode_texts(list(texts))
    batches = _alone(encodings, pad_id, inputs)
    rows = [_pool(h, feeds["attention_mask"], pooling) for h, feeds in zip(encoder.hidden_each(batches), batches)]
    return np.concatenate(rows).astype(np.float32)


def numpy_scores(encoder: NumpyEncoder, folder: Path, pairs: Sequence[tuple[str, str]], *, max_length: int,
                 pad_id: int, inputs: Sequence[str]) -> np.ndarray:
    """Raw logits, pairs cut by FlagReranker's rules (query to 3/4 of max_length), as parity.torch_scores."""
    tokenizer = TextTokenizer(folder, max_length=max_length)
    encodings, _ = tokenizer.encode_pairs(list(pairs), query_max_length=max_length * 3 // 4)
    scores = [encoder.head(h) for h in encoder.hidden_each(_alone(encodings, pad_id, inputs))]
    return np.concatenate(scores).astype(np.float32)


def numpy_m3(encoder: NumpyEncoder, folder: Path, texts: Sequence[str], *, pooling: Pooling, max_length: int,
             pad_id: int, skip_ids: Sequence[int]) -> tuple[np.ndarray, list[dict[str, float]], list[np.ndarray]]:
    """bge-m3's three outputs as parity.torch_m3 gives them (FlagEmbedding's rules): pooled vectors, each token id's
    largest relu(sparse_linear(h)) > 0 but skip_ids', the L2-normalised colbert_linear(h) of the tokens after the
    first."""
    (colbert, colbert_bias), (sparse, sparse_bias) = encoder.c.m3_heads
    tokenizer = TextTokenizer(folder, max_length=max_length)
    encodings, _ = tokenizer.encode_texts(list(texts))
    batches = _alone(encodings, pad_id, ("input_ids", "attention_mask"))
    dense, lexical, multi = [], [], []
    for encoding, (hidden,), feeds in zip(encodings, encoder.hidden_each(batches), batches):
        dense.append(_pool(hidden[None], feeds["attention_mask"], pooling))
        weights = np.maximum(hidden @ sparse.astype(np.float64).T + sparse_bias, 0.0)[:, 0]
        lexical.append(lexical_weights(encoding.ids, weights.tolist(), skip_ids))
        vectors = hidden[1:] @ colbert.astype(np.float64).T + colbert_bias
        multi.append((vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)).astype(np.float32))
    return np.concatenate(dense).astype(np.float32), lexical, multi
