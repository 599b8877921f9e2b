"""Tracing a transformers model into an ONNX graph with dynamic batch and sequence axes (torch lives here)."""

from __future__ import annotations

import contextlib
import sys
import tempfile
import warnings
from pathlib import Path

import torch

from bge_onnx.spec import Pooling, Task

from .build import input_names
from .heads import OUTPUT_AXES, OUTPUTS, M3Body
from .rewrite import fuse


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


def export_graph(
    model: torch.nn.Module,
    path: Path,
    *,
    task: Task,
    with_token_types: bool,
    pooling: Pooling | None = None,
    external_data: bool = True,
    heads: tuple[torch.nn.Module, torch.nn.Module] | None = None,
    flash: bool = False,
) -> tuple[list[str], dict[str, int], bool]:
    """Write ``model`` as ONNX to ``path`` with onnxruntime's transformer fusions applied; an embedding graph
    ends in its pooling (output ``sentence_embedding``), a reranker's in its logits. Where only the first token
    of the last layer is read (CLS pooling, rerankers' heads), the last layer computes only that token after its
    attention (rewrite.keep_first_token). With bge-m3's ``heads`` (colbert_linear, sparse_linear) the graph has
    their outputs too (heads.M3Body), and every token of the last layer is kept. ``flash``: attention as
    rewrite.flash_attention makes it.

    Returns the file names written (graph, and weights if separate), the count of each fused op, and whether the
    last layer was cut to the first token.
    """
    with tempfile.TemporaryDirectory(prefix=".trace.", dir=path.parent) as work:
        traced = Path(work) / "traced.onnx"
        trace_model(model, traced, task=task, with_token_types=with_token_types, heads=heads, pooling=pooling)
        fused, first_token = fuse(
            traced,
            path,
            num_heads=model.config.num_attention_heads,
            hidden_size=model.config.hidden_size,
            external_data=external_data,
            pooling=pooling if task is Task.EMBED and heads is None else None,  # M3Body pools itself
            flash=flash,
        )
    written = [path.name]
    if external_data:
        written += sorted(p.name for p in path.parent.iterdir() if p.name.startswith(path.name + "."))
    return written, fused, first_token


def trace_model(model: torch.nn.Module, path: Path, *, task: Task, with_token_types: bool,
                heads: tuple[torch.nn.Module, torch.nn.Module] | None = None, pooling: Pooling | None = None) -> None:
    """Write the plain graph (token states or logits out, unfused), as optimum and the official repos publish it;
    with bge-m3's ``heads``, the pooled state, per-token lexical weights and ColBERT vectors out."""
    # torch's TorchScript exporter, not dynamo: onnxruntime's optimiser recognises attention only in the graph the
    # TorchScript exporter writes (all-MiniLM-L6-v2 on CPU, fp32: fused 1.07-1.10x the unfused graph, 1.08-1.17x
    # the dynamo exporter's; docs/decisions.md).
    names = input_names(with_token_types)
    if heads is not None:
        wrapper, outputs = M3Body(model, heads, pooling).eval(), list(OUTPUTS)
        names = input_names(False)  # XLM-RoBERTa: no token types
        axes = {name: {0: "batch", 1: "sequence"} for name in names} | OUTPUT_AXES
    else:
        wrapper = (_WithTokenTypes if with_token_types else _WithoutTokenTypes)(model, task).eval()
        outputs = ["last_hidden_state" if task is Task.EMBED else "logits"]
        axes = {name: {0: "batch", 1: "sequence"} for name in [*names, *outputs]}
    # Example batch: 2 rows of 16 tokens, the second padded, so no axis is specialised to 1 or to a mask of ones.
    vocab = model.config.vocab_size
    ids = torch.randint(5, vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 10:] = 0
    examples = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice and tracer warnings
        torch.onnx.export(
            wrapper,
            tuple(examples[n] for n in names),
            str(path),
            dynamo=False,
            input_names=names,
            output_names=outputs,
            dynamic_axes=axes,
            opset_version=17,
        )
