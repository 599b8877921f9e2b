"""export_model: checkpoint -> ONNX graph + tokenizer + manifest, checked against PyTorch before it is kept."""

from __future__ import annotations

import dataclasses
import os
import shutil
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import bge_onnx
from bge_onnx.errors import ExportError
from bge_onnx.spec import POOLED_OUTPUT, ModelSpec, Task, Variant, sha256_file, write_spec

from . import parity, probes
from .heads import COLBERT_OUTPUT, LEXICAL_OUTPUT, load_heads
from .trace import export_graph, input_names
from .precision import add_variant, record_calibration
from .staging import MODEL_FILE, check_out, extra_precisions, make_staging, place, stderr, versions
from .source import Source, describe_source

def _load_torch(source: Source):
    from transformers import (
        AutoModel,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )
    from transformers.utils import logging as transformers_logging

    # Quiet while loading (its load report lists the pooler weights we leave out on purpose), then put the
    # caller's transformers settings back: export_model may run inside someone else's program.
    verbosity, bars = transformers_logging.get_verbosity(), transformers_logging.is_progress_bar_enabled()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        if source.task is Task.EMBED:  # the pooler layer is not part of a sentence embedding
            model = AutoModel.from_pretrained(source.folder, attn_implementation="eager", add_pooling_layer=False)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(source.folder, attn_implementation="eager")
        tokenizer = AutoTokenizer.from_pretrained(source.folder)
    finally:
        transformers_logging.set_verbosity(verbosity)
        if bars:
            transformers_logging.enable_progress_bar()
    return model.eval(), tokenizer


def skip_ids(tokenizer) -> list[int]:
    """The token ids FlagEmbedding gives no lexical weight: the cls, eos, pad and unk tokens."""
    ids = {getattr(tokenizer, f"{name}_token_id", None) for name in ("cls", "eos", "pad", "unk")}
    return sorted(i for i in ids if i is not None)


def _check_parity(source: Source, folder: Path, model, tokenizer, log: Callable[[str], None], heads=None) -> dict:
    """Run the probe set through PyTorch and through the bge_onnx runtime on the new folder; gate the result."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the probe set truncates long texts on purpose
        return _compare(source, folder, model, tokenizer, log, heads)


def _compare(source: Source, folder: Path, model, tokenizer, log: Callable[[str], None], heads) -> dict:
    if heads is not None:
        texts = list(probes.PROBE_TEXTS)
        log(f"checking dense, lexical and ColBERT parity with PyTorch on {len(texts)} probe texts")
        reference = parity.torch_m3(model, heads, tokenizer, texts, pooling=source.pooling,
                                    max_length=source.max_length, skip_ids=skip_ids(tokenizer))
        m3 = bge_onnx.M3Embedder(folder, device="cpu", max_length=source.max_length)
        ours = m3.encode(texts, return_sparse=True, return_colbert_vecs=True)
        return parity.gate_m3(reference, ours, texts, graph="exported graph", against="PyTorch", log=log)
    if source.task is Task.EMBED:
        texts = list(probes.PROBE_TEXTS)
        log(f"checking parity with PyTorch on {len(texts)} probe texts")
        reference = parity.torch_embeddings(
            model, tokenizer, texts, pooling=source.pooling, max_length=source.max_length
        )
        ours = bge_onnx.Embedder(folder, device="cpu").encode(texts, normalize=False)
        figures = parity.gate_embeddings(reference, ours, texts, graph="exported graph", against="PyTorch", log=log)
    else:
        pairs = list(probes.PROBE_PAIRS)
        log(f"checking parity with PyTorch on {len(pairs)} probe pairs")
        reference = parity.torch_scores(model, tokenizer, pairs, max_length=source.max_length)
        ours = bge_onnx.Reranker(folder, device="cpu").compute_score(pairs)
        figures = parity.gate_scores(reference, ours, graph="exported graph", against="PyTorch", log=log)
    return figures


def export_model(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    revision: str | None = None,
    pooling: str | None = None,
    max_length: int | None = None,
    query_instruction: str | None = None,
    check_parity: bool = True,
    precisions: Sequence[str] = ("fp32",),
    allow_below_gate: bool = False,
    overwrite: bool = False,
    external_data: bool = True,
    flash_attention: bool = True,
    log: Callable[[str], None] | None = stderr,
) -> ModelSpec:
    """Convert a Hugging Face checkpoint to a bge-onnx model folder.

    Args:
        src: a local checkpoint folder (transformers or sentence-transformers layout) or a hub repo id.
        out: the folder to create; it must not exist or be empty unless ``overwrite``.
        pooling: "cls" or "mean", needed only when neither the checkpoint nor the registry says.
        max_length: token limit; default the checkpoint's (sentence-transformers max_seq_length) or registry's.
        query_instruction: overrides the instruction prepended by ``encode_queries``.
        check_parity: compare with PyTorch on the probe set and refuse a graph below the gate.
        precisions: graphs to write besides fp32: "int8" (CPU, dynamic quantisation) and/or "fp16" (CUDA).
            Each is measured against fp32 on the gate set and refused below its gate (see precision.GATES).
        allow_below_gate: keep an int8/fp16 graph below its gate (marked so; precision="auto" skips it).
        external_data: weights in a side file (model.onnx.data) that onnxruntime maps from disk: a faster load,
            and the pages are shared between processes. False writes one self-contained graph (below 2 GB).
        flash_attention: bge-m3 with its heads: batches without padding (a long text alone) run onnxruntime's
            flash attention (rewrite.flash_attention); False keeps the fused Attention for every batch.
        log: where progress lines go (stderr by default; None for silence).

    Returns:
        the ModelSpec written to ``out/bge_onnx.json``.

    Raises:
        ModelFilesError, ExportError, ParityError.

    >>> export_model("BAAI/bge-small-en-v1.5", "bge-small-onnx")  # doctest: +SKIP
    """
    log = log or (lambda message: None)
    extra = extra_precisions(precisions)
    out = Path(out)
    check_out(out, overwrite)
    source = describe_source(
        os.fspath(src), revision=revision, pooling=pooling, max_length=max_length, query_instruction=query_instruction
    )
    log(f"loading {source.source_id} ({source.architecture}, {source.task.value}) from {source.folder}")
    model, tokenizer = _load_torch(source)
    heads = load_heads(source.folder, model.config.hidden_size) if source.heads else None
    if heads is not None:
        log(f"with bge-m3's heads: lexical weights and ColBERT vectors ({heads[0].out_features} dims) in the graph")
    with_token_types = source.with_token_types and heads is None
    staging = make_staging(out)
    try:
        log("exporting the ONNX graph")
        graph_files, fused, first_token = export_graph(
            model,
            staging / MODEL_FILE,
            task=source.task,
            with_token_types=with_token_types,
            pooling=source.pooling,
            external_data=external_data,
            heads=heads,
            flash=heads is not None and flash_attention,
        )
        log("fused " + (", ".join(f"{count} {op}" for op, count in fused.items()) or "nothing")
            + ("; the last layer computes only the first token after its attention" if first_token else ""))
        graph = {"fused_ops": fused, "last_layer_first_token_only": first_token}
        tokenizer.save_pretrained(staging)
        model.config.save_pretrained(staging)
        if not (staging / "tokenizer.json").is_file():
            raise ExportError(f"{source.folder} has no fast tokenizer (tokenizer.json); bge-onnx needs one")
        spec = ModelSpec(
            task=source.task,
            architecture=source.architecture,
            dim=source.dim,
            max_length=source.max_length,
            max_positions=source.max_positions,
            pad_token_id=tokenizer.pad_token_id,
            inputs=tuple(input_names(with_token_types)),
            output=POOLED_OUTPUT if source.task is Task.EMBED else "logits",
            variants={"fp32": Variant(file=graph_files[0], data_files=tuple(graph_files[1:]), parity=graph)},
            pooling=source.pooling,
            normalize=source.normalize,
            query_instruction=source.query_instruction,
            files={p.name: sha256_file(p) for p in sorted(staging.iterdir()) if p.is_file()},
            source={"id": source.source_id, "revision": source.revision, "path": str(source.folder)},
            versions=versions(),
            heads={} if heads is None else {"lexical": LEXICAL_OUTPUT, "colbert": COLBERT_OUTPUT,
                                            "colbert_dim": heads[0].out_features, "skip_ids": skip_ids(tokenizer)},
        )
        write_spec(staging, spec)
        if check_parity:
            figures = _check_parity(source, staging, model, tokenizer, log, heads)
            fp32 = Variant(file=graph_files[0], data_files=tuple(graph_files[1:]), parity={**figures, **graph})
            spec = dataclasses.replace(spec, variants={"fp32": fp32})
            write_spec(staging, spec)
        spec = record_calibration(staging)
        for precision in extra:
            gate_set = f"{len(probes.GATE_PAIRS)} pairs" if source.task is Task.RERANK else f"{len(probes.GATE_TEXTS)} texts"
            log(f"writing the {precision.value} graph and checking it against fp32 on {gate_set}")
            spec = add_variant(staging, precision, allow_below_gate=allow_below_gate, log=log)
        place(staging, out, overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(f"wrote {out}")
    return spec
