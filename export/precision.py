"""int8 (CPU) and fp16 (CUDA) variants of an exported fp32 graph, each held to a quality gate against fp32."""

from __future__ import annotations

import dataclasses
import platform
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx

import bge_onnx
from bge_onnx.errors import ExportError, ParityError
from bge_onnx.spec import ModelSpec, Precision, Task, Variant, read_spec, sha256_file, write_spec
from bge_onnx.tokenize import TextTokenizer, pad_batch

from . import pertoken, probes
from .staging import save_graph

# Quality gates against the fp32 graph on probes.GATE_TEXTS / GATE_PAIRS. For embeddings: cosine of each text's
# vector to its fp32 vector, and the Spearman correlation of all pairwise similarities (what a similarity
# benchmark such as STS-B ranks). For rerankers: Spearman of the scores, and their largest difference.
GATES: dict[tuple[Task, Precision], dict[str, float]] = {
    (Task.EMBED, Precision.INT8): {"min_cosine": 0.995, "mean_cosine": 0.999, "similarity_spearman": 0.995},
    (Task.EMBED, Precision.FP16): {"min_cosine": 0.999, "mean_cosine": 0.9999, "similarity_spearman": 0.999},
    (Task.RERANK, Precision.INT8): {"score_spearman": 0.99},
    (Task.RERANK, Precision.FP16): {"score_spearman": 0.999},
}

# bge-m3 with its heads, besides the dense gate: Spearman of the lexical and of the ColBERT scores of every pair of
# gate texts against fp32's. int8 is held to fp16's gate (issue 20).
M3_GATES: dict[Precision, dict[str, float]] = {
    Precision.INT8: {"lexical_spearman": 0.999, "colbert_spearman": 0.999},
    Precision.FP16: {"lexical_spearman": 0.999, "colbert_spearman": 0.999},
}

FILES = {Precision.INT8: "model_int8.onnx", Precision.FP16: "model_fp16.onnx"}

# int8 recipes, fastest first; the export keeps the first that passes the gate. Every one scales activations per
# token row (a text's vector depends on the text alone), with 8-bit weights that AVX2 runs exactly, SmoothQuant and
# GPTQ calibrated on probes.CALIBRATION_TEXTS; they differ in what stays fp32. The first quantises every weight
# MatMul, attention's QKV projection included, and the embedding tables. all-MiniLM-L6-v2's gate texts against
# fp32: min cosine 0.996, mean 0.9991, 1.1-1.2x fp32 on AVX2 (docs/decisions.md section 12). Tiny random models,
# whose attention and embeddings carry more of the error, pass at the later ones.
INT8_RECIPES: tuple[tuple[str, pertoken.Recipe], ...] = (
    ("per-token", pertoken.Recipe()),
    ("per-token, embeddings fp32", pertoken.Recipe(embeddings=False)),
    ("per-token, attention and embeddings fp32", pertoken.Recipe(attention="fp32", embeddings=False)),
    ("per-token, attention, embeddings and ffn fp32",
     pertoken.Recipe(attention="fp32", embeddings=False, keep=frozenset({"ffn_in", "ffn_out"}))),
)

# Static activation scales for the FFN-in and attention-output MatMuls, the fused fp32 Attention kept: 1.27x fp32 on
# AVX2 within the gate (docs/decisions.md section 17), but not in INT8_RECIPES: its fp32 QKV projection rounds
# differently with and without prepacked weights (BGE_ONNX_SHARE_WEIGHTS: workers, Ray), and int8 rounding turns
# that into vectors that differ by up to 5e-3 between such processes. Kept for benchmarks/int8.py and the tests.
STATIC = pertoken.Recipe(attention="fp32", static_roles=frozenset({"square", "ffn_in"}), smooth=0.7,
                         smooth_roles=frozenset({"ffn_in"}))


def special_token_texts(folder: Path) -> list[str]:
    """Texts made of the tokenizer's own special tokens ("[PAD] [PAD] ...", all of them mixed with words): a user's
    text may hold them literally, and their activations lie far outside ordinary text's, which static scales must
    cover (all-MiniLM-L6-v2's "[PAD]" x 30 fell to cosine 0.92 against fp32 without them)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    specials = sorted({t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special})[:16]
    return [" ".join([token] * 24) for token in specials] + [" word ".join(specials * 4)]


def calibration_batches(folder: Path, spec: ModelSpec, input_names: list[str], batch: int = 16, *,
                        specials: bool = False) -> list[dict]:
    """The fp32 graph's inputs for probes.CALIBRATION_TEXTS (pairs of them for a reranker), in padded batches;
    with ``specials`` also special_token_texts (static scales must cover them; scales per row need not)."""
    tokenizer = TextTokenizer(folder, max_length=spec.max_length)
    texts = list(probes.CALIBRATION_TEXTS)
    extra = special_token_texts(folder) if specials else []
    if spec.task is Task.RERANK:
        pairs = list(zip(texts[:20], texts[20:])) + list(zip(texts[20:], texts[:20]))
        pairs += [(text, special) for text, special in zip(texts, extra)]
        encodings, _ = tokenizer.encode_pairs(pairs, query_max_length=spec.max_length * 3 // 4)
    else:
        encodings, _ = tokenizer.encode_texts(texts + extra)
    return [pad_batch(encodings[i:i + batch], pad_id=spec.pad_token_id, input_names=input_names)
            for i in range(0, len(encodings), batch)]


def quantize_int8(folder: Path, src: Path, dst: Path, recipe: pertoken.Recipe) -> dict[str, Any]:
    """Per-token int8 of the graph ``src`` (in ``folder``) by ``recipe``, calibrated on the shipped texts."""
    spec = read_spec(folder)
    model = onnx.load(str(src))
    inputs = [i.name for i in model.graph.input]
    made = pertoken.quantize(model, recipe, calibration_batches(folder, spec, inputs,
                                                                specials=bool(recipe.static_roles)))
    save_graph(model, dst)
    return made


def convert_fp16(src: Path, dst: Path) -> dict[str, Any]:
    """fp16 weights and activations; int64 inputs and float32 output stay as they are (keep_io_types)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it warns for every constant it clamps into fp16 range (mask values)
        half = convert_float_to_float16(model, keep_io_types=True, op_block_list=FP16_KEEP_FP32)
    save_graph(half, dst)
    # Only those present: in the fused graph softmax lives inside Attention, which runs in fp16 like the rest.
    present = {node.op_type for node in model.graph.node}
    return {"fp32_ops": sorted(op for op in FP16_KEEP_FP32 if op in present)}


# Ops that stay in fp32 in the fp16 graph where they stand alone: normalisation statistics and softmax overflow or
# lose their small differences in fp16 (the converter's own list of unsupported ops is added to these). The fused
# Attention and SkipLayerNormalization are onnxruntime's own fp16 kernels; the gate measures the result.
FP16_KEEP_FP32 = ["LayerNormalization", "Softmax"]


# CPU features that decide which kernels onnxruntime runs (x86: AVX2, AVX-512, VNNI, AMX; Arm: dot product,
# int8 matrix multiply). The gate's figures hold for the CPU that measured them; other kernels round differently.
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")


def cpu_description(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The machine, CPU model and kernel-relevant flags the gate ran on, e.g. 'x86_64 AMD EPYC (avx2)'."""
    try:
        info = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:  # not Linux
        return platform.machine() or "unknown"
    model = re.search(r"^model name[ \t]*:[ \t]*(.+)$", info, re.MULTILINE)
    flags = re.search(r"^(?:flags|Features)[ \t]*:(.*)$", info, re.MULTILINE)  # x86 / Arm
    present = set(flags.group(1).split()) if flags else set()
    named = " ".join(flag for flag in CPU_FLAGS if flag in present)
    parts = [platform.machine(), model.group(1).strip() if model else "", f"({named})" if named else ""]
    return " ".join(part for part in parts if part)


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks from 0, ties sharing their mean rank (as scipy.stats.rankdata's "average", minus 1)."""
    values = np.asarray(values).ravel()
    order = np.argsort(values, kind="stable")
    _, first, counts = np.unique(values[order], return_index=True, return_counts=True)
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.repeat(first + (counts - 1) / 2, counts)
    return ranks


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation, ties ranked by their mean (lexical scores of texts sharing no token tie at 0)."""
    if np.isnan(a).any() or np.isnan(b).any():
        return float("nan")  # fails the gate (failures: not >= limit)
    ra, rb = _ranks(a), _ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return 1.0 if np.array_equal(ra, rb) else 0.0
    return float(np.corrcoef(ra, rb)[0, 1])


def _outputs(folder: Path, task: Task, precision: Precision, heads: bool = False) -> tuple[Any, str]:
    """The variant's outputs on the gate set, and where they ran: fp16 on CUDA when onnxruntime offers it. With
    bge-m3's heads: its dense vectors and the lexical and ColBERT scores of every pair of gate texts."""
    device = "auto" if precision is Precision.FP16 else "cpu"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # long gate texts are truncated on purpose; fp16 may run on CPU here
        if heads:
            model = bge_onnx.M3Embedder(folder, device=device, precision=precision.value)
            out = model.encode(list(probes.GATE_TEXTS), return_sparse=True, return_colbert_vecs=True)
            lexical = model.compute_lexical_matching_score(out["lexical_weights"], out["lexical_weights"])
            colbert = np.array([[model.colbert_score(q, p) for p in out["colbert_vecs"]] for q in out["colbert_vecs"]])
            outputs = {"dense": out["dense_vecs"], "lexical": lexical, "colbert": colbert}
        elif task is Task.EMBED:
            model = bge_onnx.Embedder(folder, device=device, precision=precision.value)
            outputs = model.encode(list(probes.GATE_TEXTS))
        else:
            model = bge_onnx.Reranker(folder, device=device, precision=precision.value)
            outputs = model.compute_score(list(probes.GATE_PAIRS))
    return outputs, "cuda" if "CUDAExecutionProvider" in model.providers else "cpu"


def compare(task: Task, reference: Any, ours: Any) -> dict[str, float]:
    """The gate's figures for a variant's outputs against fp32's on the gate set."""
    if isinstance(reference, dict):  # bge-m3 with its heads
        off = ~np.eye(len(reference["lexical"]), dtype=bool)
        return {**compare(task, reference["dense"], ours["dense"]),
                "lexical_spearman": _spearman(reference["lexical"][off], ours["lexical"][off]),
                "colbert_spearman": _spearman(reference["colbert"][off], ours["colbert"][off])}
    if task is Task.EMBED:
        cosines = (reference * ours).sum(axis=1)
        upper = np.triu_indices(len(reference), k=1)
        return {
            "min_cosine": float(cosines.min()),
            "mean_cosine": float(cosines.mean()),
            "similarity_spearman": _spearman((reference @ reference.T)[upper], (ours @ ours.T)[upper]),
            "worst_index": int(cosines.argmin()),
        }
    return {"score_spearman": _spearman(reference, ours), "max_abs_diff": float(np.abs(reference - ours).max())}


def failures(figures: dict[str, float], gate: dict[str, float]) -> list[str]:
    return [f"{name} {figures[name]:.5f} < {limit}" for name, limit in gate.items() if not figures[name] >= limit]


def add_variant(
    folder: Path,
    precision: Precision,
    *,
    allow_below_gate: bool = False,
    gate: dict[str, float] | None = None,
    log: Callable[[str], None] = lambda message: None,
) -> ModelSpec:
    """Write an int8 or fp16 graph beside the folder's fp32 graph, measure it, and record it in the manifest.

    For int8 the recipes are tried fastest first and the first within the gate is kept.

    Raises:
        ParityError: no graph is within the gate and not ``allow_below_gate`` (nothing is added).
    """
    spec = read_spec(folder)
    if precision is Precision.FP32:
        raise ExportError("fp32 is the exported graph itself, not a variant to add")
    heads = bool(spec.heads)
    gate = dict(GATES[(spec.task, precision)] | (M3_GATES[precision] if heads else {}) if gate is None else gate)
    fp32 = spec.variants["fp32"]
    reference, _ = _outputs(folder, spec.task, Precision.FP32, heads)
    target = folder / FILES[precision]
    recipes = INT8_RECIPES if precision is Precision.INT8 else (("fp16", None),)
    best = None
    for recipe, recipe_spec in recipes:
        made = quantize_int8(folder, folder / fp32.file, target, recipe_spec) if precision is Precision.INT8 \
            else convert_fp16(folder / fp32.file, target)
        data_files = tuple(p.name for p in [target.with_name(target.name + ".data")] if p.is_file())
        trial = {"reference": "fp32", "recipe": recipe, **made, "gate": gate, "passed": False}
        spec = record_variant(folder, spec, precision, Variant(target.name, data_files, trial))
        outputs, device = _outputs(folder, spec.task, precision, heads)
        figures = compare(spec.task, reference, outputs)
        missed = failures(figures, gate)
        log(f"{precision.value} {recipe} (on {device}): " + ", ".join(f"{k} {v:.5f}" for k, v in figures.items() if k in gate)
            + (f" — below the gate ({'; '.join(missed)})" if missed else " — within the gate")
            + ("; rows flattened to 2-D (an op in the graph changes meaning by opset 21, so it keeps its own opset)"
               if made.get("rows_in_place") is False else ""))
        trial = {**trial, **figures, "passed": not missed, "texts": len(probes.GATE_TEXTS if heads else reference),
                 "device": device}
        if device == "cpu":
            trial["cpu"] = cpu_description()
        if precision is Precision.FP16 and device == "cpu":
            trial["note"] = "measured on CPU (onnxruntime's fp16 path there); not verified on a CUDA device at export"
        best = (missed, trial, data_files)
        if not missed:
            break
    missed, trial, data_files = best
    if missed and not allow_below_gate:
        for name in (target.name, *data_files):
            (folder / name).unlink(missing_ok=True)
        record_variant(folder, spec, precision, None)
        raise ParityError(
            f"the {precision.value} graph falls below its quality gate against fp32 ({'; '.join(missed)}, "
            f"recipe {trial['recipe']}). Nothing was written. Export without {precision.value}, or pass "
            "allow_below_gate=True (--allow-below-gate) to keep it; precision='auto' will then not pick it."
        )
    return record_variant(folder, spec, precision, Variant(target.name, data_files, trial))


def record_variant(folder: Path, spec: ModelSpec, precision: Precision, variant: Variant | None) -> ModelSpec:
    """Write the manifest with this variant (its files' sha256 included) in place of the old one; None removes it."""
    variants = {k: v for k, v in spec.variants.items() if k != precision.value}
    files = {k: v for k, v in spec.files.items() if k not in (spec.variants.get(precision.value) or Variant("")).all_files}
    if variant is not None:
        variants[precision.value] = variant
        files.update({name: sha256_file(folder / name) for name in variant.all_files})
    spec = dataclasses.replace(spec, variants=variants, files=dict(sorted(files.items())))
    write_spec(folder, spec)
    return spec


def record_calibration(folder: Path) -> ModelSpec:
    """Measure an embedding folder's per-dimension ranges on the shipped calibration texts (the fp32 graph's
    normalised vectors, what output_dtype int8/uint8 steps through) and write them into its manifest."""
    from bge_onnx.storage import ranges_of

    spec = read_spec(folder)
    if spec.task is not Task.EMBED:
        return spec
    texts = list(probes.CALIBRATION_TEXTS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a text cut at a short max_length is measured as the runtime embeds it
        ranges = ranges_of(bge_onnx.Embedder(folder, device="cpu", precision="fp32").encode(texts))
    spec = dataclasses.replace(spec, calibration={"ranges": ranges.tolist(), "texts": len(texts)})
    write_spec(folder, spec)
    return spec
