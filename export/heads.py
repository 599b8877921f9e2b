"""bge-m3's heads: colbert_linear.pt and sparse_linear.pt beside the encoder, loaded without running a pickle's code,
and the graph body that computes dense, lexical and ColBERT outputs in one pass (torch lives here)."""

from __future__ import annotations

from pathlib import Path

import torch

from bge_onnx.errors import ExportError
from bge_onnx.spec import POOLED_OUTPUT, Pooling

from .source import COLBERT_FILE, SPARSE_FILE

LEXICAL_OUTPUT = "token_weights"
COLBERT_OUTPUT = "colbert_vecs"


def _linear(path: Path, hidden: int, outputs: int | None) -> torch.nn.Linear:
    """A Linear(hidden, outputs) from a state dict saved with torch.save; ``outputs`` None: any width."""
    try:
        # weights_only: tensors and plain containers only; a pickle that would run code is refused
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # an UnpicklingError for code, RuntimeError/EOFError/... for a damaged file
        raise ExportError(f"{path} could not be read as a weights-only state dict ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''})") from err
    if not isinstance(state, dict) or not isinstance(state.get("weight"), torch.Tensor):
        raise ExportError(f"{path} must hold a Linear layer's state dict with 'weight' and 'bias', got "
                          f"{type(state).__name__} with keys {sorted(state) if isinstance(state, dict) else []}")
    weight, bias = state["weight"], state.get("bias")
    width = weight.shape[0] if weight.dim() == 2 else -1
    expected = (outputs or width, hidden)
    if tuple(weight.shape) != expected or bias is None or tuple(bias.shape) != (expected[0],):
        raise ExportError(
            f"{path} holds weight {tuple(weight.shape)} and bias {None if bias is None else tuple(bias.shape)}; "
            f"this encoder's hidden size is {hidden}, so a weight {expected} and a bias ({expected[0]},) were expected"
        )
    layer = torch.nn.Linear(hidden, expected[0])
    layer.load_state_dict({"weight": weight.float(), "bias": bias.float()})
    return layer.eval()


def load_heads(folder: Path, hidden: int) -> tuple[torch.nn.Linear, torch.nn.Linear]:
    """(colbert_linear, sparse_linear), checked against the encoder's hidden size."""
    return _linear(folder / COLBERT_FILE, hidden, None), _linear(folder / SPARSE_FILE, hidden, 1)


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
