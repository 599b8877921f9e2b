"""A BERT or XLM-RoBERTa checkpoint read without torch: its config and its tensors by the names transformers gives
them, for the graph builder (build.py) and the numpy reference (reference.py)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from bge_onnx.errors import ExportError

from .weights import read_checkpoint, read_linear, weight_files

# What the builder writes as the export writes it; anything else goes through torch's tracer.
BUILDABLE_TYPES = ("bert", "xlm-roberta", "roberta")
BUILDABLE_ACTIVATIONS = ("gelu",)  # erf GELU: onnxruntime's BiasGelu
HEADS = ("BertForSequenceClassification", "XLMRobertaForSequenceClassification", "RobertaForSequenceClassification")
_PREFIXES = ("", "bert.", "roberta.", "model.")


def unbuildable(config: dict, architecture: str) -> str | None:
    """Why the builder cannot write this checkpoint's graph (so the export traces it with torch), or None."""
    model_type = config.get("model_type")
    if model_type not in BUILDABLE_TYPES:
        return f"model_type {model_type!r}"
    if config.get("hidden_act", "gelu") not in BUILDABLE_ACTIVATIONS:
        return f"hidden_act {config.get('hidden_act')!r}"
    if config.get("position_embedding_type", "absolute") != "absolute":
        return f"position_embedding_type {config.get('position_embedding_type')!r}"
    if architecture.endswith("ForSequenceClassification") and architecture not in HEADS:
        return f"architecture {architecture!r}"
    if not architecture.endswith("ForSequenceClassification") and not architecture.endswith("Model"):
        return f"architecture {architecture!r}"
    return None


@dataclasses.dataclass
class Checkpoint:
    """The encoder's tensors (prefix such as ``bert.`` removed) and config; the heads' tensors where present."""

    folder: Path
    config: dict
    tensors: dict[str, np.ndarray]
    prefix: str
    rerank: bool
    m3_heads: tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None

    @property
    def hidden(self) -> int:
        return int(self.config["hidden_size"])

    @property
    def heads(self) -> int:
        return int(self.config["num_attention_heads"])

    @property
    def layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    @property
    def eps(self) -> float:
        return float(self.config.get("layer_norm_eps", 1e-12))

    @property
    def roberta(self) -> bool:
        return self.config["model_type"] != "bert"

    @property
    def pad_id(self) -> int:
        return int(self.config.get("pad_token_id", 1 if self.roberta else 0))

    def encoder(self, name: str) -> np.ndarray:
        """An encoder tensor, e.g. ``encoder.layer.0.attention.self.query.weight``."""
        return self.tensor(self.prefix + name)

    def tensor(self, name: str) -> np.ndarray:
        for candidate in (name, name.replace("LayerNorm.weight", "LayerNorm.gamma"),
                          name.replace("LayerNorm.bias", "LayerNorm.beta")):
            if candidate in self.tensors:
                return np.asarray(self.tensors[candidate], dtype=np.float32)
        files = ", ".join(p.name for p in weight_files(self.folder))
        raise ExportError(f"{self.folder} ({files}) has no tensor {name!r}, which a {self.config['model_type']} "
                          f"{'reranker' if self.rerank else 'encoder'} needs")

    def classifier(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """The classification head as (weight, bias) pairs, tanh between them: BERT's pooler and classifier,
        RoBERTa's classifier.dense and classifier.out_proj."""
        if self.roberta:
            names = ("classifier.dense", "classifier.out_proj")
        else:
            names = (self.prefix + "pooler.dense", "classifier")
        return [(self.tensor(f"{n}.weight"), self.tensor(f"{n}.bias")) for n in names]


def read(folder: Path, *, rerank: bool, heads: tuple[Path, Path] | None = None) -> Checkpoint:
    """The checkpoint in ``folder``; ``heads``: bge-m3's (colbert_linear.pt, sparse_linear.pt)."""
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    tensors = read_checkpoint(folder)
    prefix = next((p for p in _PREFIXES if p + "embeddings.word_embeddings.weight" in tensors), None)
    if prefix is None:
        raise ExportError(f"{folder}'s weights have no embeddings.word_embeddings.weight (under any of the prefixes "
                          f"{[p for p in _PREFIXES if p]}): not a BERT or XLM-RoBERTa checkpoint")
    checkpoint = Checkpoint(folder, config, tensors, prefix, rerank)
    if heads is not None:
        hidden = checkpoint.hidden
        checkpoint.m3_heads = (read_linear(heads[0], hidden, None), read_linear(heads[1], hidden, 1))
    return checkpoint
