"""The PyTorch reference (transformers, FlagReranker's pair rules) and its comparison with the exported graph.

torch is imported by the functions that run it, so that the comparisons serve torch-free conversion too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

from bge_onnx.errors import ParityError
from bge_onnx.pooling import normalize
from bge_onnx.spec import Pooling

MIN_COSINE = 0.99999
MAX_SCORE_DIFF = 1e-3


def torch_embeddings(
    model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], *, pooling: Pooling, max_length: int, batch_size: int = 16
) -> np.ndarray:
    """Pooled (not normalised) vectors from the PyTorch model, tokenised by transformers."""
    import torch

    with torch.no_grad():
        return _torch_embeddings(model, tokenizer, texts, pooling=pooling, max_length=max_length, batch_size=batch_size)


def _torch_embeddings(model, tokenizer, texts, *, pooling, max_length, batch_size):
    import torch

    rows = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(
            list(texts[start : start + batch_size]),
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        hidden = model(**batch).last_hidden_state
        if pooling is Pooling.CLS:
            rows.append(hidden[:, 0])
        else:
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            rows.append((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9))
    return torch.cat(rows).float().numpy()


def torch_m3(model, heads, tokenizer, texts: Sequence[str], *, pooling: Pooling, max_length: int,
             skip_ids: Sequence[int], batch_size: int = 16) -> tuple[np.ndarray, list[dict[str, float]], list[np.ndarray]]:
    """bge-m3's outputs from the PyTorch encoder and heads, written after FlagEmbedding's BGEM3 model: pooled (not
    normalised) vectors; per text {token id: largest relu(sparse_linear(h)) > 0} without skip_ids; per text the
    L2-normalised colbert_linear(h) of its tokens after the first."""
    import torch

    colbert_linear, sparse_linear = heads
    dense = torch_embeddings(model, tokenizer, texts, pooling=pooling, max_length=max_length, batch_size=batch_size)
    lexical, multi = [], []
    with torch.no_grad():
        for text in texts:  # one at a time: no padding to mask
            batch = tokenizer([text], truncation=True, max_length=max_length, return_tensors="pt")
            hidden = model(**batch).last_hidden_state[0]
            weights = torch.relu(sparse_linear(hidden))[:, 0].tolist()
            lexical.append(lexical_weights(batch["input_ids"][0].tolist(), weights, skip_ids))
            multi.append(torch.nn.functional.normalize(colbert_linear(hidden[1:]), dim=-1).numpy())
    return dense, lexical, multi


def lexical_weights(ids: Sequence[int], weights: Sequence[float], skip_ids: Sequence[int]) -> dict[str, float]:
    """FlagEmbedding's lexical weights of one text: each token id's largest weight > 0, skip_ids left out."""
    best: dict[str, float] = {}
    for token, weight in zip(ids, weights):
        if token not in skip_ids and weight > 0:
            best[str(token)] = max(weight, best.get(str(token), 0.0))
    return best


MAX_LEXICAL_DIFF = 1e-4


def gate_m3(reference: tuple, ours: dict[str, Any], texts: Sequence[str], *, graph: str, against: str,
            log: Callable[[str], None]) -> dict[str, Any]:
    """gate_embeddings on the dense vectors, and the lexical weights (each text's, over the union of its token ids;
    within MAX_LEXICAL_DIFF) and ColBERT vectors (same rows, cosine >= MIN_COSINE) of every probe text."""
    dense, lexical, multi = reference
    figures = gate_embeddings(dense, ours["dense_vecs"], texts, graph=graph, against=against, log=log)
    lexical_diff, worst_lexical, colbert_min, worst_colbert = 0.0, 0, 1.0, 0
    for i, (a, b, p, q) in enumerate(zip(lexical, ours["lexical_weights"], multi, ours["colbert_vecs"])):
        diff = max((abs(a.get(t, 0.0) - b.get(t, 0.0)) for t in {*a, *b}), default=0.0)
        if diff > lexical_diff:
            lexical_diff, worst_lexical = diff, i
        cosine = float((p * q).sum(axis=1).min()) if p.shape == q.shape else -1.0
        if cosine < colbert_min:
            colbert_min, worst_colbert = cosine, i
    log(f"against {against}: lexical weights max abs diff {lexical_diff:.2e}, ColBERT vectors min cosine "
        f"{colbert_min:.7f}")
    if lexical_diff > MAX_LEXICAL_DIFF or colbert_min < MIN_COSINE:
        which, i = (("lexical weights", worst_lexical) if lexical_diff > MAX_LEXICAL_DIFF
                    else ("ColBERT vectors", worst_colbert))
        raise ParityError(
            f"the {graph}'s {which} differ from {against} (lexical max abs diff {lexical_diff:.2e} > "
            f"{MAX_LEXICAL_DIFF} or ColBERT min cosine {colbert_min:.7f} < {MIN_COSINE}) on probe text {i} "
            f"{texts[i][:60]!r}. Nothing was written."
        )
    return {**figures, "lexical_max_abs_diff": lexical_diff, "colbert_min_cosine": colbert_min}


def flag_pair(tokenizer: Any, model_type: str, query: str, passage: str, *, max_length: int, query_max_length: int) -> tuple[list[int], list[int]]:
    """Token ids and type ids of one pair, by FlagReranker's rules as they read on transformers 4.

    The query is cut to query_max_length tokens and the passage to max_length; then special tokens are
    added and only the passage is shortened to fit max_length (not at all when it is too short to absorb
    the excess, as transformers' prepare_for_model did). Written on transformers' Python tokenizer API and
    the models' documented layouts, independently of the runtime's Rust post-processing.
    """
    q = tokenizer(query, add_special_tokens=False, max_length=query_max_length, truncation=True)["input_ids"]
    p = tokenizer(passage, add_special_tokens=False, max_length=max_length, truncation=True)["input_ids"]
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    middle = [sep] if model_type == "bert" else [sep, sep]  # BERT: [CLS] q [SEP] p [SEP]; RoBERTa: <s> q </s></s> p </s>
    excess = len(q) + len(p) + len(middle) + 2 - max_length
    if 0 < excess < len(p):
        p = p[:-excess]
    ids = [cls, *q, *middle, *p, sep]
    if model_type == "bert":
        types = [0] * (len(q) + 2) + [1] * (len(p) + 1)
    else:
        types = [0] * len(ids)
    return ids, types


def torch_scores(
    model: torch.nn.Module,
    tokenizer: Any,
    pairs: Sequence[tuple[str, str]],
    *,
    max_length: int,
    query_max_length: int | None = None,
    batch_size: int = 16,
) -> np.ndarray:
    """Raw logits from the PyTorch cross-encoder, tokenised as FlagReranker does."""
    import torch

    with torch.no_grad():
        return _torch_scores(model, tokenizer, pairs, max_length=max_length, query_max_length=query_max_length,
                             batch_size=batch_size)


def _torch_scores(model, tokenizer, pairs, *, max_length, query_max_length, batch_size):
    import torch

    if query_max_length is None:
        query_max_length = max_length * 3 // 4
    model_type = model.config.model_type
    items = [
        flag_pair(tokenizer, model_type, q, p, max_length=max_length, query_max_length=query_max_length)
        for q, p in pairs
    ]
    scores = []
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        types = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (ids, type_ids) in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = 1
            types[row, : len(ids)] = torch.tensor(type_ids)
        inputs = {"input_ids": input_ids, "attention_mask": mask}
        if model.config.type_vocab_size > 1:
            inputs["token_type_ids"] = types
        scores.append(model(**inputs).logits[:, 0])
    return torch.cat(scores).float().numpy()


def embedding_parity(reference: np.ndarray, ours: np.ndarray) -> dict[str, Any]:
    """Min cosine and max abs difference of the L2-normalised vectors; the worst probe's index."""
    ref, out = normalize(reference), normalize(ours)
    cosines = (ref * out).sum(axis=1)
    return {
        "min_cosine": float(cosines.min()),
        "max_abs_diff": float(np.abs(ref - out).max()),
        "worst_index": int(cosines.argmin()),
        "texts": int(len(cosines)),
    }


def score_parity(reference: np.ndarray, ours: np.ndarray) -> dict[str, Any]:
    diff = np.abs(reference - ours)
    return {
        "max_abs_diff": float(diff.max()),
        "worst_index": int(diff.argmax()),
        "pairs": int(len(diff)),
        "same_order": bool((np.argsort(-reference, kind="stable") == np.argsort(-ours, kind="stable")).all()),
    }


def gate_embeddings(reference: np.ndarray, ours: np.ndarray, texts: Sequence[str], *, graph: str, against: str,
                    log: Callable[[str], None]) -> dict[str, Any]:
    """embedding_parity, logged, and a ParityError naming the worst probe text below MIN_COSINE."""
    figures = embedding_parity(reference, ours)
    log(f"against {against}: min cosine {figures['min_cosine']:.7f}, max abs diff {figures['max_abs_diff']:.2e}")
    if figures["min_cosine"] < MIN_COSINE:
        text = texts[figures["worst_index"]]
        raise ParityError(
            f"the {graph} differs from {against}: min cosine {figures['min_cosine']:.7f} < {MIN_COSINE} on probe "
            f"text {figures['worst_index']} {text[:60]!r}. Nothing was written. Report this with the versions of "
            "torch and onnxruntime."
        )
    return figures


def gate_scores(reference: np.ndarray, ours: np.ndarray, *, graph: str, against: str,
                log: Callable[[str], None]) -> dict[str, Any]:
    """score_parity, logged, and a ParityError naming the worst probe pair above MAX_SCORE_DIFF."""
    figures = score_parity(reference, ours)
    log(f"against {against}: max abs score diff {figures['max_abs_diff']:.2e}")
    if figures["max_abs_diff"] > MAX_SCORE_DIFF:
        raise ParityError(
            f"the {graph} differs from {against}: score diff {figures['max_abs_diff']:.2e} > {MAX_SCORE_DIFF} on "
            f"probe pair {figures['worst_index']}. Nothing was written."
        )
    return figures
