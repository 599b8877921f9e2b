"""optimize_model: an existing ONNX export (official onnx/ folder, optimum or sentence-transformers export) -> a
bge-onnx folder with fusions, pooling, the first-token cut, gated int8/fp16 and a manifest; torch-free (onnx and
onnxruntime only), checked against the source graph itself."""

from __future__ import annotations

import dataclasses
import os
import shlex
import shutil
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import onnx

import bge_onnx
from bge_onnx import adopt, hub
from bge_onnx.errors import ExportError, ModelFilesError
from bge_onnx.folder import describe_export
from bge_onnx.spec import (
    MANIFEST,
    POOLED_OUTPUT,
    ModelSpec,
    Pooling,
    Precision,
    Task,
    Variant,
    sha256_file,
    write_spec,
)
from bge_onnx.tokenize import TOKENIZER_FILE

from . import parity, probes
from .precision import add_variant, record_calibration
from .rewrite import fuse
from .staging import (
    MODEL_FILE,
    check_out,
    extra_precisions,
    make_staging,
    place,
    stderr,
    versions,
)


def optimize_command(name: str, out: Path, *, revision: str | None, graph: str | None, pooling: str | None,
                     max_length: int | None, query_instruction: str | None, precisions: list[str],
                     allow_below_gate: bool) -> str:
    """The `bge-onnx optimize` command that makes this folder again: every option given, shell-quoted (the model
    card shows it)."""
    args = ["bge-onnx", "optimize", name, "--out", os.fspath(out)]
    for flag, value in (("--revision", revision), ("--file", graph), ("--pooling", pooling),
                        ("--max-length", max_length), ("--query-instruction", query_instruction)):
        if value is not None:
            args += [flag, str(value)]
    args += ["--precision", *precisions]
    if allow_below_gate:
        args.append("--allow-below-gate")
    return shlex.join(args)


def optimize_model(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    revision: str | None = None,
    pooling: str | None = None,
    max_length: int | None = None,
    query_instruction: str | None = None,
    precisions: Sequence[str] = ("fp32",),
    allow_below_gate: bool = False,
    overwrite: bool = False,
    graph: str | None = None,
    log: Callable[[str], None] | None = stderr,
) -> ModelSpec:
    """Convert an existing ONNX export to a bge-onnx model folder, without torch.

    Args:
        src: a folder holding onnx/model.onnx (or model.onnx) with its tokenizer.json and config.json, or a hub
            repo id of one (only the graph, its weights, tokenizer and configs are downloaded), or a .onnx file
            in such a folder (the graph to start from).
        graph: the graph to start from, relative to the folder (e.g. onnx/model_O1.onnx, one of the several a
            sentence-transformers export writes); default onnx/model.onnx, else model.onnx. It must be fp32: an
            already quantised graph is refused (optimize writes and gates its own int8).
        out: the folder to create; it must not exist or be empty unless ``overwrite``.
        pooling, max_length, query_instruction: override what the source's sentence-transformers files or the
            registry say.
        precisions: graphs to write besides fp32: "int8" (CPU) and/or "fp16" (CUDA), each gated against fp32.
        allow_below_gate: keep an int8/fp16 graph below its gate (marked so; precision="auto" skips it).
        log: where progress lines go (stderr by default; None for silence).

    The fp32 graph is checked against the source graph run as it is by onnxruntime on the probe set (the manifest
    says so): an optimisation that changed the vectors is refused and nothing is written.

    Raises:
        ModelFilesError, ExportError, ParityError.

    >>> optimize_model("BAAI/bge-small-en-v1.5", "bge-small-onnx", precisions=["fp32", "int8"])  # doctest: +SKIP
    """
    log = log or (lambda message: None)
    extra = extra_precisions(precisions)
    out = Path(out)
    check_out(out, overwrite)
    name = os.fspath(src)
    if name.endswith(".onnx") and Path(name).is_file():
        name, graph = graph_in_folder(Path(name))
    picked = graph is not None  # the command records --file only where a graph was picked
    folder = hub.resolve(name, revision=revision, graph=graph)
    if (folder / MANIFEST).is_file():
        raise ExportError(f"{folder} is a bge-onnx folder already ({MANIFEST}); load it as it is")
    found = adopt.find_graph(folder, graph)
    if found is None:
        graphs = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.onnx"))
        raise ModelFilesError(
            f"{folder} has no ONNX graph {graph or ' or '.join(adopt.GRAPH_FILES)}"
            + (f" (it has {', '.join(graphs)}: pick one with --file)" if graphs else "")
            + "; convert a checkpoint with `bge-onnx export SRC --out DIR` (needs torch)"
        )
    refuse_quantised(folder / found[0])  # so the graph is fp32
    source = describe_export(folder, name, graph=found[0], precision=Precision.FP32,
                             pooling=Pooling(pooling) if pooling else None, max_length=max_length,
                             query_instruction=query_instruction)
    if source.task is Task.EMBED and source.output not in adopt.TOKEN_OUTPUTS:
        raise ExportError(f"{folder / found[0]} outputs pooled vectors ({source.output}); bge-onnx optimises a "
                          "graph that outputs token states (last_hidden_state)")
    config = adopt.read_json(folder / adopt.CONFIG_FILE)
    log(f"optimising {name} ({source.architecture}, {source.task.value}; graph {found[0]})")

    staging = make_staging(out)
    try:
        with tempfile.TemporaryDirectory(prefix=".source.", dir=staging.parent) as work:
            graph = _only_output(folder / found[0], Path(work) / "source.onnx", source.output)
            fused, first_token = fuse(
                graph, staging / MODEL_FILE, num_heads=config["num_attention_heads"], hidden_size=config["hidden_size"],
                external_data=True, pooling=source.pooling if source.task is Task.EMBED else None,
            )
        log("fused " + (", ".join(f"{count} {op}" for op, count in fused.items()) or "nothing")
            + ("; the last layer computes only the first token after its attention" if first_token else ""))
        for kept in (TOKENIZER_FILE, adopt.CONFIG_FILE):
            shutil.copyfile(folder / kept, staging / kept)
        graph_files = [MODEL_FILE, *sorted(p.name for p in staging.iterdir() if p.name.startswith(MODEL_FILE + "."))]
        command = optimize_command(name, out, revision=revision, graph=found[0] if picked else None,
                                   pooling=Pooling(pooling).value if pooling else None,
                                   max_length=max_length, query_instruction=query_instruction,
                                   precisions=["fp32", *(p.value for p in extra)], allow_below_gate=allow_below_gate)
        spec = ModelSpec(
            task=source.task,
            architecture=source.architecture,
            dim=source.dim,
            max_length=source.max_length,
            max_positions=source.max_positions,
            pad_token_id=source.pad_token_id,
            inputs=source.inputs,
            output=POOLED_OUTPUT if source.task is Task.EMBED else "logits",
            variants={"fp32": Variant(file=graph_files[0], data_files=tuple(graph_files[1:]))},
            pooling=source.pooling,
            normalize=source.normalize,
            query_instruction=source.query_instruction,
            files={p.name: sha256_file(p) for p in sorted(staging.iterdir()) if p.is_file()},
            source={"id": source.source["id"], "revision": source.source.get("revision"), "path": str(folder),
                    "graph": found[0], "graph_sha256": sha256_file(folder / found[0]),
                    "reference": "the source ONNX graph, run as it is by onnxruntime", "command": command},
            versions=versions(),
        )
        write_spec(staging, spec)
        figures = _check(source, folder, staging, log)
        graph_facts = {"fused_ops": fused, "last_layer_first_token_only": first_token}
        fp32 = Variant(graph_files[0], tuple(graph_files[1:]),
                       {"reference": "source ONNX graph (onnxruntime)", **figures, **graph_facts})
        spec = dataclasses.replace(spec, variants={"fp32": fp32})
        write_spec(staging, spec)
        spec = record_calibration(staging)
        for precision in extra:
            log(f"writing the {precision.value} graph and checking it against fp32")
            spec = add_variant(staging, precision, allow_below_gate=allow_below_gate, log=log)
        place(staging, out, overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(f"wrote {out}")
    return spec


def graph_in_folder(path: Path) -> tuple[str, str]:
    """A .onnx file given as the source: its export folder (where config.json is: the file's own, or the one
    above for onnx/NAME.onnx) and the graph's path in it."""
    path = path.resolve()
    for folder in (path.parent, path.parent.parent):
        if (folder / adopt.CONFIG_FILE).is_file():
            return str(folder), path.relative_to(folder).as_posix()
    raise ModelFilesError(f"{path} is not in an export folder: neither {path.parent} nor {path.parent.parent} has "
                          f"{adopt.CONFIG_FILE} (and the tokenizer) beside it")


# the ops of onnxruntime's quantisation (dynamic, QDQ, QOperator) and of per-token int8 graphs

def refuse_quantised(path: Path) -> None:
    """optimize starts from fp32: refuse a graph that is already quantised, with the way out."""
    ops = adopt.quantised_ops(path)
    if ops:
        raise ExportError(
            f"{path} is already quantised ({', '.join(sorted(ops))}): optimize starts from an fp32 graph and writes "
            "and gates its own int8. Point it at the export's fp32 graph (--file onnx/model.onnx), or load this "
            "graph as it is."
        )


def _only_output(path: Path, target: Path, output: str) -> Path:
    """The graph with ``output`` as its only output (an export may also output BERT's pooler), saved to
    ``target`` when that changes anything; the optimiser then drops what no output reads."""
    model = onnx.load(str(path), load_external_data=False)
    if [o.name for o in model.graph.output] == [output]:
        return path
    kept = [o for o in model.graph.output if o.name == output]
    del model.graph.output[:]
    model.graph.output.extend(kept)
    onnx.load_external_data_for_model(model, str(path.parent))
    onnx.save(model, str(target))
    return target


def _reference(folder: Path, source: ModelSpec, work: Path) -> Path:
    """A folder that runs the source graph as it is with the source's description: links to its files and a
    manifest (token states pooled in numpy), so that the runtime itself computes the reference."""
    variant = source.variants["fp32"]
    names = [TOKENIZER_FILE, *variant.all_files]
    for name in names:
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).symlink_to((folder / name).resolve())
    spec = ModelSpec.from_dict({**source.to_dict(), "format_version": 1,
                                "files": {name: sha256_file(folder / name) for name in names}})
    write_spec(work, spec)
    return work


def _check(source: ModelSpec, folder: Path, staging: Path, log: Callable[[str], None]) -> dict:
    """The new graph against the source graph, both run by the runtime on the probe set; gated as an export is."""
    with warnings.catch_warnings(), tempfile.TemporaryDirectory(prefix=".reference.", dir=staging.parent) as work:
        warnings.simplefilter("ignore")  # the probe set truncates long texts on purpose
        reference_folder = _reference(folder, source, Path(work))
        if source.task is Task.EMBED:
            texts = list(probes.PROBE_TEXTS)
            reference = bge_onnx.Embedder(reference_folder, device="cpu").encode(texts, normalize=False)
            ours = bge_onnx.Embedder(staging, device="cpu").encode(texts, normalize=False)
            figures = parity.gate_embeddings(reference, ours, texts, graph="optimised graph",
                                             against="the source graph", log=log)
        else:
            pairs = list(probes.PROBE_PAIRS)
            reference = bge_onnx.Reranker(reference_folder, device="cpu").compute_score(pairs)
            ours = bge_onnx.Reranker(staging, device="cpu").compute_score(pairs)
            figures = parity.gate_scores(reference, ours, graph="optimised graph", against="the source graph",
                                         log=log)
    return figures
