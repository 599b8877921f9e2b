"""export_model: checkpoint -> ONNX graph + tokenizer + manifest, checked against a reference before it is kept.

The graph is built from the checkpoint's tensors (build.py, no torch) wherever the builder covers the architecture,
and traced with torch (trace.py) otherwise. The reference is PyTorch where torch and transformers are installed, and
a numpy forward pass of the checkpoint (reference.py) where they are not.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import bge_onnx
from bge_onnx.errors import ExportError, MissingExtraError, install_hint
from bge_onnx.spec import POOLED_OUTPUT, ModelSpec, Task, Variant, sha256_file, write_spec

from . import checkpoint, parity, probes, reference
from .build import COLBERT_OUTPUT, LEXICAL_OUTPUT, input_names, write_graph
from .precision import add_variant, record_calibration
from .staging import MODEL_FILE, check_out, extra_precisions, make_staging, place, stderr, versions
from .source import COLBERT_FILE, SPARSE_FILE, Source, describe_source
from .weights import unreadable

GRAPH_FROM = ("auto", "weights", "torch")
# what a checkpoint's tokenizer needs beside the graph (the runtime reads tokenizer.json)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def torch_installed() -> bool:
    """Whether torch and transformers can be imported (without importing them)."""
    try:
        return all(importlib.util.find_spec(name) is not None for name in ("torch", "transformers"))
    except (ImportError, ValueError):  # ValueError: a module set to None in sys.modules
        return False


def choose_graph_from(source: Source, graph_from: str) -> tuple[str, str | None]:
    """"weights" or "torch", and why the builder does not cover the checkpoint (None where it does)."""
    if graph_from not in GRAPH_FROM:
        raise ExportError(f"graph_from must be one of {list(GRAPH_FROM)}, got {graph_from!r}")
    config = json.loads((source.folder / "config.json").read_text(encoding="utf-8"))
    why = checkpoint.unbuildable(config, source.architecture) or unreadable(source.folder)
    if why is None and not (source.folder / "tokenizer.json").is_file():
        why = "no tokenizer.json (transformers converts the slow tokenizer)"
    if graph_from == "weights" and why:
        raise ExportError(f"{source.folder} cannot be built from its weights: {why}; export it with "
                          "graph_from='torch' (--graph-from torch)")
    chosen = graph_from if graph_from != "auto" else ("torch" if why else "weights")
    if chosen == "torch" and not torch_installed():
        reason = f" ({why})" if why else ""
        raise MissingExtraError(f"{source.source_id} needs torch to export{reason}: python -m pip install "
                                f"torch==2.13.0 && {install_hint('export-torch')}")
    return chosen, why


def special_ids(folder: Path) -> dict[str, int]:
    """The cls, eos, pad and unk tokens' ids, from tokenizer_config.json / special_tokens_map.json and
    tokenizer.json (as transformers resolves them)."""
    from tokenizers import Tokenizer

    named: dict[str, object] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the second wins, as in transformers
        path = folder / name
        if path.is_file():
            settings = json.loads(path.read_text(encoding="utf-8"))
            named.update({k: v for k, v in settings.items() if k.endswith("_token") and v})
    vocabulary = Tokenizer.from_file(str(folder / "tokenizer.json"))
    ids = {}
    for role in ("cls", "eos", "pad", "unk"):
        token = named.get(f"{role}_token")
        token = token.get("content") if isinstance(token, dict) else token
        token_id = vocabulary.token_to_id(token) if isinstance(token, str) else None
        if token_id is not None:
            ids[role] = token_id
    return ids


def _load_torch(source: Source):
    """(model, tokenizer, bge-m3's heads or None) in PyTorch."""
    from transformers import (
        AutoModel,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )
    from transformers.utils import logging as transformers_logging

    from .heads import load_heads

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
    heads = load_heads(source.folder, model.config.hidden_size) if source.heads else None
    return model.eval(), tokenizer, heads


def skip_ids(ids: dict[str, int]) -> list[int]:
    """The token ids FlagEmbedding gives no lexical weight: the cls, eos, pad and unk tokens."""
    return sorted(set(ids.values()))


def _reference(source: Source, folder: Path, spec: ModelSpec, torch_side, weights, log: Callable[[str], None]):
    """The probe set's reference outputs: PyTorch's (``torch_side`` = model, tokenizer, heads) or the numpy
    forward pass of ``weights`` (a checkpoint.Checkpoint)."""
    heads = bool(spec.heads)
    texts, pairs = list(probes.PROBE_TEXTS), list(probes.PROBE_PAIRS)
    skip = spec.heads.get("skip_ids", [])
    if torch_side is not None:
        model, tokenizer, torch_heads = torch_side
        if heads:
            return parity.torch_m3(model, torch_heads, tokenizer, texts, pooling=source.pooling,
                                   max_length=source.max_length, skip_ids=skip)
        if source.task is Task.EMBED:
            return parity.torch_embeddings(model, tokenizer, texts, pooling=source.pooling,
                                           max_length=source.max_length)
        return parity.torch_scores(model, tokenizer, pairs, max_length=source.max_length)
    encoder = reference.NumpyEncoder(weights)
    common = {"max_length": source.max_length, "pad_id": spec.pad_token_id}
    if heads:
        return reference.numpy_m3(encoder, folder, texts, pooling=source.pooling, skip_ids=skip, **common)
    if source.task is Task.EMBED:
        return reference.numpy_embeddings(encoder, folder, texts, pooling=source.pooling, inputs=spec.inputs, **common)
    return reference.numpy_scores(encoder, folder, pairs, inputs=spec.inputs, **common)


def _check_parity(source: Source, folder: Path, spec: ModelSpec, torch_side, weights,
                  log: Callable[[str], None]) -> dict:
    """Run the probe set through the reference and through the bge_onnx runtime on the new folder; gate the result."""
    against = "PyTorch" if torch_side is not None else "a numpy forward pass of the checkpoint"
    what = ("dense, lexical and ColBERT parity" if spec.heads else "parity")
    count = f"{len(probes.PROBE_PAIRS)} probe pairs" if source.task is Task.RERANK else f"{len(probes.PROBE_TEXTS)} probe texts"
    log(f"checking {what} with {against} on {count}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the probe set truncates long texts on purpose
        expected = _reference(source, folder, spec, torch_side, weights, log)
        against = "PyTorch" if torch_side is not None else "numpy"
        if spec.heads:
            m3 = bge_onnx.M3Embedder(folder, device="cpu", max_length=source.max_length)
            ours = m3.encode(list(probes.PROBE_TEXTS), return_sparse=True, return_colbert_vecs=True)
            figures = parity.gate_m3(expected, ours, list(probes.PROBE_TEXTS), graph="exported graph",
                                     against=against, log=log)
        elif source.task is Task.EMBED:
            ours = bge_onnx.Embedder(folder, device="cpu").encode(list(probes.PROBE_TEXTS), normalize=False)
            figures = parity.gate_embeddings(expected, ours, list(probes.PROBE_TEXTS), graph="exported graph",
                                             against=against, log=log)
        else:
            ours = bge_onnx.Reranker(folder, device="cpu").compute_score(list(probes.PROBE_PAIRS))
            figures = parity.gate_scores(expected, ours, graph="exported graph", against=against, log=log)
    return {**figures, "reference": against}


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
    graph_from: str = "auto",
    log: Callable[[str], None] | None = stderr,
) -> ModelSpec:
    """Convert a Hugging Face checkpoint to a bge-onnx model folder.

    Args:
        src: a local checkpoint folder (transformers or sentence-transformers layout) or a hub repo id.
        out: the folder to create; it must not exist or be empty unless ``overwrite``.
        pooling: "cls" or "mean", needed only when neither the checkpoint nor the registry says.
        max_length: token limit; default the checkpoint's (sentence-transformers max_seq_length) or registry's.
        query_instruction: overrides the instruction prepended by ``encode_queries``.
        check_parity: compare with the reference on the probe set and refuse a graph below the gate: PyTorch where
            torch and transformers are installed, else a float64 numpy forward pass of the checkpoint.
        precisions: graphs to write besides fp32: "int8" (CPU, dynamic quantisation) and/or "fp16" (CUDA).
            Each is measured against fp32 on the gate set and refused below its gate (see precision.GATES).
        allow_below_gate: keep an int8/fp16 graph below its gate (marked so; precision="auto" skips it).
        external_data: weights in a side file (model.onnx.data) that onnxruntime maps from disk: a faster load,
            and the pages are shared between processes. False writes one self-contained graph (below 2 GB).
        flash_attention: bge-m3 with its heads: batches without padding (a long text alone) run onnxruntime's
            flash attention (rewrite.flash_attention); False keeps the fused Attention for every batch.
        graph_from: "weights" builds the graph from the checkpoint's tensors without torch (BERT and XLM-RoBERTa
            encoders with GELU, their rerankers, bge-m3's heads); "torch" traces the transformers model; "auto" (the
            default) builds where the builder covers the checkpoint and traces otherwise. The manifest says which.
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
    chosen, why = choose_graph_from(source, graph_from)
    head_files = (source.folder / COLBERT_FILE, source.folder / SPARSE_FILE) if source.heads else None
    with_token_types = source.with_token_types and not source.heads
    how = "from its weights" if chosen == "weights" else f"by tracing it with torch{f' ({why})' if why else ''}"
    log(f"loading {source.source_id} ({source.architecture}, {source.task.value}) from {source.folder}; the graph is "
        f"built {how}")
    # the tensors as numpy: for the builder, and for the numpy reference where torch is not installed
    weights = checkpoint.read(source.folder, rerank=source.task is Task.RERANK, heads=head_files) \
        if chosen == "weights" else None
    torch_side = _load_torch(source) if chosen == "torch" or (check_parity and torch_installed()) else None
    colbert_dim = None
    if source.heads:
        colbert_dim = weights.m3_heads[0][0].shape[0] if weights else torch_side[2][0].out_features
        log(f"with bge-m3's heads: lexical weights and ColBERT vectors ({colbert_dim} dims) in the graph")
    staging = make_staging(out)
    try:
        log("writing the ONNX graph")
        options = {"task": source.task, "with_token_types": with_token_types, "external_data": external_data,
                   "flash": source.heads and flash_attention}
        if chosen == "weights":
            graph_files, fused, first_token = write_graph(weights, staging / MODEL_FILE, pooling=source.pooling,
                                                          **options)
            if torch_side is not None:  # the tokenizer as transformers loads it (its settings can rewrite the file's)
                torch_side[1].save_pretrained(staging)
                torch_side[0].config.save_pretrained(staging)
            else:
                for name in TOKENIZER_FILES + ("config.json",):
                    if (source.folder / name).is_file():
                        shutil.copyfile(source.folder / name, staging / name)
        else:
            from .trace import export_graph

            model, tokenizer, heads = torch_side
            graph_files, fused, first_token = export_graph(model, staging / MODEL_FILE, pooling=source.pooling,
                                                           heads=heads, **options)
            tokenizer.save_pretrained(staging)
            model.config.save_pretrained(staging)
        log("fused " + (", ".join(f"{count} {op}" for op, count in fused.items()) or "nothing")
            + ("; the last layer computes only the first token after its attention" if first_token else ""))
        graph = {"fused_ops": fused, "last_layer_first_token_only": first_token,
                 "graph_from": "weights" if chosen == "weights" else "torch trace"}
        if not (staging / "tokenizer.json").is_file():
            raise ExportError(f"{source.folder} has no fast tokenizer (tokenizer.json); bge-onnx needs one")
        ids = special_ids(staging)
        config = json.loads((staging / "config.json").read_text(encoding="utf-8"))
        pad_id = ids.get("pad", config.get("pad_token_id", 0))
        spec = ModelSpec(
            task=source.task,
            architecture=source.architecture,
            dim=source.dim,
            max_length=source.max_length,
            max_positions=source.max_positions,
            pad_token_id=pad_id,
            inputs=tuple(input_names(with_token_types)),
            output=POOLED_OUTPUT if source.task is Task.EMBED else "logits",
            variants={"fp32": Variant(file=graph_files[0], data_files=tuple(graph_files[1:]), parity=graph)},
            pooling=source.pooling,
            normalize=source.normalize,
            query_instruction=source.query_instruction,
            files={p.name: sha256_file(p) for p in sorted(staging.iterdir()) if p.is_file()},
            source={"id": source.source_id, "revision": source.revision, "path": str(source.folder)},
            versions=versions(),
            heads={} if colbert_dim is None else {
                "lexical": LEXICAL_OUTPUT, "colbert": COLBERT_OUTPUT, "colbert_dim": colbert_dim,
                "skip_ids": skip_ids(ids)},
        )
        write_spec(staging, spec)
        if check_parity:
            figures = _check_parity(source, staging, spec, torch_side, weights, log)
            fp32 = Variant(file=graph_files[0], data_files=tuple(graph_files[1:]), parity={**figures, **graph})
            spec = dataclasses.replace(spec, variants={"fp32": fp32})
            write_spec(staging, spec)
        del weights, torch_side
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
