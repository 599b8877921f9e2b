"""Tracing a transformers model into an ONNX graph with dynamic batch and sequence axes."""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from pathlib import Path

import torch

from bge_onnx.spec import Task

# Above this many bytes of weights the graph is saved with its weights in a side file (protobuf's 2 GB cap).
EXTERNAL_DATA_BYTES = 1_500_000_000


class _Encoder(torch.nn.Module):
    """The graph's body: token ids in; token states (embedders) or logits (rerankers) out."""

    def __init__(self, model: torch.nn.Module, task: Task) -> None:
        super().__init__()
        self.model = model
        self.field = "last_hidden_state" if task is Task.EMBED else "logits"

    def run(self, **inputs: torch.Tensor) -> torch.Tensor:
        return getattr(self.model(**inputs, return_dict=True), self.field)


class _WithTokenTypes(_Encoder):
    def forward(self, input_ids, attention_mask, token_type_ids):  # noqa: D102
        return self.run(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)


class _WithoutTokenTypes(_Encoder):
    def forward(self, input_ids, attention_mask):  # noqa: D102
        return self.run(input_ids=input_ids, attention_mask=attention_mask)


def input_names(with_token_types: bool) -> list[str]:
    names = ["input_ids", "attention_mask"]
    return names + ["token_type_ids"] if with_token_types else names


def export_graph(
    model: torch.nn.Module,
    path: Path,
    *,
    task: Task,
    with_token_types: bool,
    max_positions: int,
    external_data: bool | None = None,
) -> list[str]:
    """Write ``model`` as ONNX to ``path``; returns the file names written (graph, and weights if separate)."""
    wrapper = (_WithTokenTypes if with_token_types else _WithoutTokenTypes)(model, task).eval()
    names = input_names(with_token_types)
    # Example batch: 2 rows of 16 tokens, the second padded, so no axis is specialised to 1 or to a mask of ones.
    vocab = model.config.vocab_size
    ids = torch.randint(5, vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 10:] = 0
    examples = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    batch = torch.export.Dim("batch")
    sequence = torch.export.Dim("sequence", max=max_positions)
    if external_data is None:
        external_data = sum(p.numel() * p.element_size() for p in model.parameters()) > EXTERNAL_DATA_BYTES
    onnx_logger = logging.getLogger("torch.onnx")
    level = onnx_logger.level
    onnx_logger.setLevel(logging.ERROR)  # it lists every torchvision op it skips
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                wrapper,
                tuple(examples[n] for n in names),
                dynamo=True,
                input_names=names,
                output_names=["last_hidden_state" if task is Task.EMBED else "logits"],
                dynamic_shapes=tuple({0: batch, 1: sequence} for _ in names),
                opset_version=18,
                verbose=False,
            )
            program.save(str(path), external_data=external_data)
    finally:
        onnx_logger.setLevel(level)
    written = [path.name]
    if external_data:
        written += sorted(p.name for p in path.parent.iterdir() if p.name.startswith(path.name + "."))
    return written
