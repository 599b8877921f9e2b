"""A model folder's manifest for people: the model card of a pushed repo (its README.md) and `bge-onnx info`'s
summary. Every figure is the manifest's."""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import registry
from .hub import looks_like_repo_id
from .spec import ModelSpec, Precision, Task, Variant

CARD = "README.md"
_PRECISION_ORDER = [p.value for p in Precision]
# parity keys shown in their own columns or sections rather than among a variant's figures
_CONTEXT_KEYS = {"reference", "recipe", "gate", "passed", "texts", "pairs", "device", "cpu", "note", "worst_index",
                 "fused_ops", "last_layer_first_token_only", "graph_from"}
_RECIPE_KEYS = {"quantized_matmuls": "MatMuls int8", "fp32_matmuls": "MatMuls kept fp32",
                "quantized_attention": "attention int8", "weight_bits": "weight bits",
                "quantized_embeddings": "embedding tables int8", "static_matmuls": "MatMuls with static scales"}
# recipe settings, shown as "name value"
_RECIPE_SETTINGS = {"activations": "activations", "activation_zero_point": "activation zero point",
                    "smooth_alpha": "SmoothQuant alpha", "gptq": "GPTQ", "attention": "attention",
                    "static_roles": "static scales for"}
# what a variant's row does not list among its figures
_NOT_FIGURES = (_CONTEXT_KEYS | set(_RECIPE_KEYS) | set(_RECIPE_SETTINGS)
                | {"unfused_attention", "smoothed_matmuls", "rows_in_place"})


def model_card(spec: ModelSpec, repo_id: str, *, revision: str | None = None) -> str:
    """The README.md of a pushed repo: hub metadata (YAML front matter), then what the model is, each variant's
    parity and gate figures, the fusions, the export command, the versions and how to use it. Every figure is
    the manifest's.

    >>> print(model_card(read_spec("bge-small-onnx"), "me/bge-small-onnx").splitlines()[1])  # doctest: +SKIP
    library_name: "bge-onnx"
    """
    name = repo_id.split("/")[-1]
    sections = [
        ["---", *_yaml(_metadata(spec)), "---"],
        _summary(spec, name),
        _variants(spec),
        _optimisations(spec),
        ["## How it was made", "", *_export_command(spec, name)],
        _usage(spec, repo_id, revision),
    ]
    return "\n\n".join("\n".join(section) for section in sections) + "\n"


def _base_model(spec: ModelSpec) -> str | None:
    source_id = spec.source.get("id")
    return source_id if isinstance(source_id, str) and looks_like_repo_id(source_id) else None


def _metadata(spec: ModelSpec) -> dict[str, Any]:
    """The front matter the hub indexes: library, tags, base model, pipeline (no license: the manifest has none)."""
    embed = spec.task is Task.EMBED
    tags = ["bge-onnx", "onnx", *(["sentence-embeddings", "feature-extraction"] if embed else ["reranker"])]
    meta: dict[str, Any] = {"library_name": "bge-onnx", "tags": tags + [v for v in variant_names(spec) if v != "fp32"]}
    if _base_model(spec):
        meta["base_model"] = _base_model(spec)
    meta["pipeline_tag"] = "feature-extraction" if embed else "text-classification"
    return meta


def _summary(spec: ModelSpec, name: str) -> list[str]:
    embed = spec.task is Task.EMBED
    base = _base_model(spec)
    origin = f"[`{base}`](https://huggingface.co/{base})" if base else f"`{spec.source.get('id') or 'a checkpoint'}`"
    what = "a sentence embedding model" if embed else "a reranker (a cross-encoder that scores query-passage pairs)"
    facts = [("Task", spec.task.value), ("Architecture", spec.architecture)]
    if embed:
        normalised = "L2-normalised" if spec.normalize else "not normalised"
        facts += [("Dimension", str(spec.dim)), ("Pooling", f"{spec.pooling.value}, {normalised}")]
    facts.append(("Max length", f"{spec.max_length} tokens (the model takes up to {spec.max_positions})"))
    if embed:
        facts.append(("Query instruction", f"`{spec.query_instruction}`" if spec.query_instruction else "none"))
    facts.append(("Source", _describe_source(spec.source)))
    return [
        f"# {name}",
        "",
        (f"An ONNX export of {origin}, {what}, for [bge-onnx](https://pypi.org/project/bge-onnx/): onnxruntime "
         "and tokenizers, without torch."),
        "",
        "| | |",
        "|---|---|",
        *(f"| {key} | {_cell(value)} |" for key, value in facts),
    ]


def _variants(spec: ModelSpec) -> list[str]:
    return [
        "## Variants",
        "",
        ("Measured at export: fp32 against the PyTorch model, int8 and fp16 against fp32, each held to the gate "
         'shown. `precision="auto"` runs int8 on CPU and fp16 on CUDA only when they passed their gate, else fp32.'),
        "",
        "| Variant | Files | Compared with | Figures | Gate | Passed | Recipe | Measured on |",
        "|---|---|---|---|---|---|---|---|",
        *(_variant_row(name, spec.variants[name]) for name in variant_names(spec)),
    ]


def _optimisations(spec: ModelSpec) -> list[str]:
    parity = spec.variants["fp32"].parity
    fused = parity.get("fused_ops") or {}
    ops = ", ".join(f"{op} ×{count}" for op, count in fused.items()) or "none recorded"
    lines = ["## Graph optimisations", "", f"onnxruntime's transformer fusions in the fp32 graph: {ops}."]
    if parity.get("last_layer_first_token_only"):
        lines.append("The last layer computes only the first token after its attention (the only one the output uses).")
    return lines


def _usage(spec: ModelSpec, repo_id: str, revision: str | None) -> list[str]:
    option = f", revision={json.dumps(revision)}" if revision else ""
    flag = f" --revision {shlex.quote(revision)}" if revision else ""
    if spec.task is Task.EMBED:
        code = [
            "from bge_onnx import Embedder",
            "",
            f'model = Embedder("{repo_id}"{option})',
            f'vectors = model.encode(["The quick brown fox.", "A lazy dog."])  # float32, shape (2, {spec.dim})',
        ]
        if spec.query_instruction:
            code.append('queries = model.encode_queries(["fast animals"])  # prepends the query instruction')
        command = f'echo "The quick brown fox." | bge-onnx embed {repo_id}{flag}'
    else:
        code = [
            "from bge_onnx import Reranker",
            "",
            f'model = Reranker("{repo_id}"{option})',
            'for result in model.rerank("fast animals", ["The quick brown fox.", "A lazy dog."]):',
            "    print(result.score, result.text)",
        ]
        passages = 'printf "The quick brown fox.\\nA lazy dog.\\n"'
        command = f'{passages} | bge-onnx rerank {repo_id}{flag} --query "fast animals"'
    lines = ["## Usage", "", "```bash", "pip install bge-onnx", "```", "", "```python", *code, "```", ""]
    pull = "From the command line; `pull` fills the cache (a container build step), after which loads need no network:"
    lines += [pull, "", "```bash", f"bge-onnx pull {repo_id}{flag}", command, "```"]
    if spec.versions:
        lines += ["", "Versions at export: " + ", ".join(f"{k} {v}" for k, v in spec.versions.items()) + "."]
    return lines


def variant_names(spec: ModelSpec) -> list[str]:
    return sorted(spec.variants, key=_PRECISION_ORDER.index)


def _yaml(meta: Mapping[str, Any]) -> list[str]:
    """YAML lines for flat metadata; strings as JSON, which YAML reads as double-quoted scalars."""
    lines = []
    for key, value in meta.items():
        if isinstance(value, list):
            lines += [f"{key}:", *(f"- {json.dumps(item)}" for item in value)]
        else:
            lines.append(f"{key}: {json.dumps(value)}")
    return lines


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _figure(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.7g}"  # float32 precision: the figures compare float32 outputs
    return str(value)


def _describe_source(source: Mapping[str, Any]) -> str:
    source_id = source.get("id") or "unknown"
    if source.get("revision"):
        return f"`{source_id}` at revision `{source['revision']}`"
    return f"`{source_id}`, from local files (no hub revision recorded)"


def _variant_row(precision: str, variant: Variant) -> str:
    parity = variant.parity
    gate = parity.get("gate") or {}
    shown = {k: v for k, v in parity.items() if k not in _NOT_FIGURES}
    figures = ", ".join(f"{k} {_figure(v)}" for k, v in shown.items())
    count = parity.get("texts") or parity.get("pairs")
    unit = "texts" if "texts" in parity else "pairs"
    if figures and count:
        figures += f" ({count} {unit})"
    if precision == "fp32":
        reference = parity.get("reference", "PyTorch") if figures else "not checked (exported with --no-parity)"
        passed = "—"
    else:
        reference = parity.get("reference", "fp32")
        passed = "yes" if parity.get("passed") else "**no**: `auto` does not pick it"
    gate_text = ", ".join(f"{k} ≥ {limit}" for k, limit in gate.items()) or "—"
    recipe = parity.get("recipe") or "—"
    details = [f"{label} {_figure(parity[k])}" for k, label in _RECIPE_SETTINGS.items() if k in parity]
    details += [f"{_figure(parity[k])} {label}" for k, label in _RECIPE_KEYS.items() if k in parity]
    if details:
        recipe += " (" + ", ".join(details) + ")"
    measured = ", ".join(str(parity[k]) for k in ("device", "cpu") if parity.get(k))
    if parity.get("note"):
        measured = f"{measured}; {parity['note']}" if measured else parity["note"]
    cells = [precision, ", ".join(f"`{f}`" for f in variant.all_files), reference, figures or "—", gate_text, passed,
             recipe, measured or "—"]
    return "| " + " | ".join(_cell(str(c)) for c in cells) + " |"


def _export_command(spec: ModelSpec, name: str) -> list[str]:
    """The `bge-onnx export` command that makes this folder, rebuilt from what the manifest records."""
    recorded = spec.source.get("command")
    if isinstance(recorded, str):  # a manifest that records its command: shown as is
        return ["Exported with:", "", "```bash", recorded, "```"]
    source_id = spec.source.get("id") or "SOURCE"
    revision = spec.source.get("revision")
    args = ["bge-onnx", "export", source_id]
    if revision:
        args += ["--revision", revision]
    args += ["--out", name, "--precision", *variant_names(spec)]
    if spec.task is Task.EMBED:
        args += ["--pooling", spec.pooling.value]
    args += ["--max-length", str(spec.max_length)]
    known = registry.lookup(source_id)
    if spec.task is Task.EMBED and (spec.query_instruction or (known and known[1].query_instruction)):
        args += ["--query-instruction", spec.query_instruction]
    fp32 = spec.variants["fp32"].parity
    if not any(k not in _CONTEXT_KEYS for k in fp32):
        args.append("--no-parity")
    if any(not v.parity.get("passed") for k, v in spec.variants.items() if k != "fp32"):
        args.append("--allow-below-gate")
    where = ("from the hub at the revision recorded" if revision else
             f"from a local checkpoint folder recorded as `{source_id}`: give that folder as the source")
    rebuilt = (
        "The manifest does not record the command; this one is rebuilt from what it records (source, precisions, "
        f"pooling, max length, instruction, gates), {where}:"
    )
    return [rebuilt, "", "```bash", shlex.join(args), "```"]


# bge-onnx info

INT8_KINDS = {"per-token": "a text's vector depends on the text alone",
              "per-batch": "older export: a vector moves slightly with its batch; re-export for per-token int8"}


def describe_parity(parity: dict) -> str:
    """A variant's parity figures in one line: against PyTorch (fp32) or against fp32 with its gate."""
    gate = parity.get("gate")
    if not gate:  # fp32: against its reference (PyTorch, or a numpy forward pass where torch was not installed)
        fused = parity.get("fused_ops") or {}
        reference = parity.get("reference", "PyTorch")
        figures = ", ".join(f"{k} {v:.7g}" if isinstance(v, float) else f"{k} {v}" for k, v in parity.items()
                            if k not in ("fused_ops", "reference", "graph_from"))
        ops = ", ".join(f"{count} {op}" for op, count in fused.items()) or "none"
        graph = f"; graph {parity['graph_from']}" if parity.get("graph_from") else ""
        checked = f"parity with {reference}: {figures}" if figures else f"parity not checked ({reference})"
        return f"{checked}; fused ops: {ops}{graph}"
    figures = ", ".join(f"{k} {parity[k]:.5f} (gate {limit})" for k, limit in gate.items() if k in parity)
    verdict = "within its gate" if parity.get("passed") else "BELOW its gate (auto skips it)"
    where = parity.get("note") or (f"measured on {parity['device']}" if parity.get("device") else "")
    if parity.get("cpu"):  # the kernels, and so the rounding, depend on the CPU (VNNI or not, for int8)
        where += f"; CPU {parity['cpu']}"
    note = f"; {where}" if where else ""
    return f"vs fp32 on {parity.get('texts', '?')} texts: {figures}; {verdict}; recipe {parity.get('recipe')}{note}"


def summary(folder: Path, spec: ModelSpec) -> list[str]:
    """`bge-onnx info`'s lines: what the folder holds, each variant's file, size, kind and parity figures."""
    lines = [
        f"folder:            {folder}",
        f"task:              {spec.task.value} ({spec.architecture})",
    ]
    if spec.pooling:
        lines.append(f"pooling:           {spec.pooling.value}, normalise {'yes' if spec.normalize else 'no'}")
        lines.append(f"dimension:         {spec.dim}")
        lines.append(f"query instruction: {spec.query_instruction!r}" if spec.query_instruction else "query instruction: none")
    if spec.heads:
        lines.append(f"bge-m3 outputs:    dense, lexical weights, ColBERT vectors ({spec.heads.get('colbert_dim')} dims): "
                     "bge_onnx.M3Embedder")
    lines.append(f"max length:        {spec.max_length} tokens (the model takes up to {spec.max_positions})")
    lines.append(f"source:            {spec.source.get('id')} @ {spec.source.get('revision') or 'local files'}")
    for name, variant in spec.variants.items():
        size = sum((folder / f).stat().st_size for f in variant.all_files if (folder / f).is_file())
        meaning = INT8_KINDS.get(variant.activations, "not known to this version of bge-onnx")
        kind = f"activations {variant.activations} ({meaning}); " if name == "int8" else ""
        lines.append(f"variant {name}:      {variant.file} ({size / 1e6:.1f} MB); {kind}{describe_parity(variant.parity)}")
    lines.append("versions:          " + ", ".join(f"{k} {v}" for k, v in spec.versions.items()))
    return lines
