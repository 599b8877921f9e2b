"""What onnxruntime's transformer fusions buy: the traced graph as is, with LayerNorm/GELU fusions only, and with
attention fused too (the export's graph), in fp32 and int8 (the export's int8 recipe on each); and torch's dynamo
exporter's graph, which the export wrote before (onnxruntime's optimiser finds no attention in it).

Each graph gets its own session swapped into one Embedder (so tokenising and batching are bge-onnx's own); the
graphs take turns on each corpus (A B C ... A B C, medians). Ratios are to the unfused graph of the same precision;
cosines are to the unfused fp32 graph's vectors.

Usage: python benchmarks/fusion.py MODEL [--reps 5] > benchmarks/results/fusion-minilm.md
MODEL: a folder exported by bge-onnx; its PyTorch source (the manifest's source path) is traced again.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import onnxruntime as ort
import torch
from onnxruntime.transformers.fusion_options import FusionOptions
from onnxruntime.transformers.optimizer import optimize_model
from transformers import AutoModel

from bge_onnx import Embedder
from bge_onnx.spec import Task, read_spec
from bge_onnx_export.graph import _fuse, _trace, _WithoutTokenTypes, _WithTokenTypes
from bge_onnx_export.precision import INT8_RECIPES, quantize_int8
from corpora import corpora
from session_options import session, time_sessions

def graphs(model_folder: Path, work: Path) -> dict[str, Path]:
    spec = read_spec(model_folder)
    model = AutoModel.from_pretrained(spec.source["path"], attn_implementation="eager", add_pooling_layer=False).eval()
    traced = work / "traced.onnx"
    _trace(model, traced, task=Task.EMBED, with_token_types="token_type_ids" in spec.inputs)
    options = FusionOptions("bert")
    options.enable_embed_layer_norm = False
    options.enable_attention = False
    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    norms = optimize_model(str(traced), model_type="bert", num_heads=model.config.num_attention_heads,
                           hidden_size=model.config.hidden_size, optimization_options=options, opt_level=0)
    norms.save_model_to_file(str(work / "norms.onnx"))
    _fuse(traced, work / "fused.onnx", model.config, external_data=False)
    dynamo(model, work / "dynamo.onnx", list(spec.inputs))
    made = {"fp32 unfused": traced, "fp32 LayerNorm + GELU fused": work / "norms.onnx",
            "fp32 all fused (export)": work / "fused.onnx", "fp32 dynamo exporter": work / "dynamo.onnx"}
    keep_fp32 = dict(INT8_RECIPES)[model_folder_recipe(spec)]
    for name, path in (("unfused", traced), ("all fused (export)", work / "fused.onnx"),
                       ("dynamo exporter", work / "dynamo.onnx")):
        quantize_int8(path, work / f"int8-{path.name}", keep_fp32)
        made[f"int8 {name}"] = work / f"int8-{path.name}"
    return made


def dynamo(model, path: Path, names: list[str]) -> None:
    wrapper = (_WithTokenTypes if "token_type_ids" in names else _WithoutTokenTypes)(model, Task.EMBED).eval()
    ids = torch.randint(5, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 10:] = 0
    examples = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence", max=512)
    with torch.no_grad(), contextlib.redirect_stdout(sys.stderr):
        program = torch.onnx.export(wrapper, tuple(examples[n] for n in names), dynamo=True, input_names=names,
                                    output_names=["last_hidden_state"], opset_version=18,
                                    dynamic_shapes=tuple({0: batch, 1: sequence} for _ in names))
    program.save(str(path))


def model_folder_recipe(spec) -> str:
    int8 = spec.variants.get("int8")
    return int8.parity["recipe"] if int8 else INT8_RECIPES[-1][0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # passages are truncated at max length on purpose
    embedder = Embedder(args.model, device="cpu", precision="fp32")
    loaded = embedder._model.session  # the runtime's Session; its onnxruntime session is swapped per graph
    with tempfile.TemporaryDirectory(prefix="bge-onnx-fusion-") as work:
        paths = graphs(args.model, Path(work))
        sessions = {name: session(str(path), loaded.threads)[0] for name, path in paths.items()}
    texts = {k: v for k, v in corpora(200).items() if k in ("short queries", "passages", "mixed")}
    print(f"# onnxruntime fusions: {args.model.name}\n")
    print(f"Command: `python benchmarks/fusion.py {args.model.name} --reps {args.reps}`; {time.strftime('%Y-%m-%d')}; "
          f"onnxruntime {ort.__version__}, {loaded.threads} threads, int8 recipe {model_folder_recipe(read_spec(args.model))}. "
          f"Speed: encode() time of the unfused graph of the same precision over this graph's, medians of {args.reps} "
          "interleaved; above 1 is faster. Cosine: min / mean to the unfused fp32 graph's vectors, mixed corpus.\n")
    print("| graph | " + " | ".join(texts) + " | cosine to unfused fp32 |")
    print("|---|" + "---|" * len(texts) + "---|")
    ratios = {name: [] for name in sessions}
    cosines = {}
    for corpus, items in texts.items():
        outputs = {}
        for name in sessions:  # warm-up
            loaded._session = sessions[name]
            outputs[name] = embedder.encode(items)
        if corpus == "mixed":
            reference = outputs["fp32 unfused"]
            cosines = {name: (reference * out).sum(axis=1) for name, out in outputs.items()}
        times = time_sessions(embedder, sessions, items, args.reps)
        for name in sessions:
            base = statistics.median(times[f"{name.split()[0]} unfused"])
            ratios[name].append(base / statistics.median(times[name]))
    for name in sessions:
        figures = " | ".join(f"{r:.2f}x" for r in ratios[name])
        print(f"| {name} | {figures} | {cosines[name].min():.5f} / {cosines[name].mean():.6f} |")


if __name__ == "__main__":
    main()
