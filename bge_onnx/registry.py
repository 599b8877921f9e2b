"""Known checkpoints of the BGE family: task, pooling, dimension, max length, query instruction (data only)."""

from __future__ import annotations

import dataclasses

from .spec import Pooling, Task

EN_INSTRUCTION = "Represent this sentence for searching relevant passages: "
ZH_INSTRUCTION = "为这个句子生成表示以用于检索相关文章："


@dataclasses.dataclass(frozen=True)
class KnownModel:
    task: Task
    dim: int
    max_length: int
    pooling: Pooling | None = None
    query_instruction: str = ""
    # the ONNX files the official repo publishes (from its file list; informative: a load reads the graph's own
    # files, and takes onnx/model.onnx with its weights whatever this says)
    onnx_files: tuple[str, ...] = ()


def _embed(
    dim: int, pooling: Pooling, instruction: str = "", max_length: int = 512, onnx_files: tuple[str, ...] = ()
) -> KnownModel:
    return KnownModel(Task.EMBED, dim, max_length, pooling, instruction, onnx_files)


ONNX = ("onnx/model.onnx",)


KNOWN_MODELS: dict[str, KnownModel] = {
    "BAAI/bge-small-en-v1.5": _embed(384, Pooling.CLS, EN_INSTRUCTION, onnx_files=ONNX),
    "BAAI/bge-base-en-v1.5": _embed(768, Pooling.CLS, EN_INSTRUCTION, onnx_files=ONNX),
    "BAAI/bge-large-en-v1.5": _embed(1024, Pooling.CLS, EN_INSTRUCTION, onnx_files=ONNX),
    "BAAI/bge-small-zh-v1.5": _embed(512, Pooling.CLS, ZH_INSTRUCTION),
    "BAAI/bge-base-zh-v1.5": _embed(768, Pooling.CLS, ZH_INSTRUCTION),
    "BAAI/bge-large-zh-v1.5": _embed(1024, Pooling.CLS, ZH_INSTRUCTION),
    "BAAI/bge-small-en": _embed(384, Pooling.CLS, EN_INSTRUCTION),
    "BAAI/bge-base-en": _embed(768, Pooling.CLS, EN_INSTRUCTION),
    "BAAI/bge-large-en": _embed(1024, Pooling.CLS, EN_INSTRUCTION),
    "BAAI/bge-small-zh": _embed(512, Pooling.CLS, ZH_INSTRUCTION),
    "BAAI/bge-base-zh": _embed(768, Pooling.CLS, ZH_INSTRUCTION),
    "BAAI/bge-large-zh": _embed(1024, Pooling.CLS, ZH_INSTRUCTION),
    # bge-m3's dense vector is its CLS state; it takes no instruction.
    "BAAI/bge-m3": _embed(1024, Pooling.CLS, max_length=8192, onnx_files=(*ONNX, "onnx/model.onnx_data")),
    # A distillation of bge-small trained with mean pooling; no instruction.
    "TaylorAI/bge-micro-v2": _embed(384, Pooling.MEAN, onnx_files=(*ONNX, "onnx/model_quantized.onnx")),
    "sentence-transformers/all-MiniLM-L6-v2": _embed(384, Pooling.MEAN, max_length=256, onnx_files=ONNX),
    # Rerankers score a (query, passage) pair with one logit; FlagReranker's default max_length is 512.
    "BAAI/bge-reranker-base": KnownModel(Task.RERANK, 1, 512, onnx_files=ONNX),
    "BAAI/bge-reranker-large": KnownModel(Task.RERANK, 1, 512, onnx_files=(*ONNX, "onnx/model.onnx_data")),
    "BAAI/bge-reranker-v2-m3": KnownModel(Task.RERANK, 1, 512),
}


def lookup(name: str | None) -> tuple[str, KnownModel] | None:
    """Find a known model by hub id (``BAAI/bge-small-en-v1.5``) or by its last part (``bge-small-en-v1.5``).

    >>> lookup("bge-micro-v2")[1].pooling
    <Pooling.MEAN: 'mean'>
    """
    if not name:
        return None
    name = name.rstrip("/")
    if name in KNOWN_MODELS:
        return name, KNOWN_MODELS[name]
    tail = name.rsplit("/", 1)[-1].lower()
    for model_id, known in KNOWN_MODELS.items():
        if model_id.rsplit("/", 1)[-1].lower() == tail:
            return model_id, known
    return None
