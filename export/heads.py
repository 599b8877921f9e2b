"""bge-m3's heads: colbert_linear.pt and sparse_linear.pt beside the encoder, loaded without running a pickle's code,
and the graph body that computes dense, lexical and ColBERT outputs in one pass (torch lives here)."""

from __future__ import annotations

from pathlib import Path

import torch

from bge_onnx.spec import POOLED_OUTPUT, Pooling

from .build import COLBERT_OUTPUT, LEXICAL_OUTPUT
from .source import COLBERT_FILE, SPARSE_FILE
from .weights import read_linear


def load_heads(folder: Path, hidden: int) -> tuple[torch.nn.Linear, torch.nn.Linear]:
    """(colbert_linear, sparse_linear) as torch layers, read by weights.read_linear (no pickle code runs) and
    checked against the encoder's hidden size."""
    layers = []
    for name, outputs in ((COLBERT_FILE, None), (SPARSE_FILE, 1)):
        weight, bias = read_linear(folder / name, hidden, outputs)
        layer = torch.nn.Linear(hidden, weight.shape[0])
        layer.load_state_dict({"weight": torch.from_numpy(weight), "bias": torch.from_numpy(bias)})
        layers.append(layer.eval())
    return layers[0], layers[1]


class M3Body(torch.nn.Module):
    """Encoder + heads, as FlagEmbedding's BGEM3 model computes them: the pooled (first-token) state, unnormalised
    (the runtime normalises it); relu(sparse_linear(h)) per token; colbert_linear(h) of every token after the first,
    masked and L2-normalised. Which ids get no lexical weight, and the per-text lengths, are the runtime's work."""

    def __init__(self, model: torch.nn.Module, heads: tuple[torch.nn.Linear, torch.nn.Linear], pooling: Pooling):
        super().__init__()
        self.model, (self.colbert, self.sparse), self.pooling = model, heads, Pooling(pooling)

    def forward(self, input_ids, attention_mask):
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        if self.pooling is Pooling.CLS:
            dense = hidden[:, 0]
        else:
            dense = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        weights = torch.relu(self.sparse(hidden)).squeeze(-1)
        colbert = torch.nn.functional.normalize(self.colbert(hidden[:, 1:]) * mask[:, 1:], dim=-1)
        return dense, weights, colbert


OUTPUTS = (POOLED_OUTPUT, LEXICAL_OUTPUT, COLBERT_OUTPUT)
OUTPUT_AXES = {POOLED_OUTPUT: {0: "batch"}, LEXICAL_OUTPUT: {0: "batch", 1: "sequence"},
               COLBERT_OUTPUT: {0: "batch", 1: "sequence_after_first"}}
