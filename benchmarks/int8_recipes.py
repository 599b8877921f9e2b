"""How each int8 recipe trades accuracy for speed, and how much each FFN layer costs: the measurements behind the
export's recipe list (export/precision.py INT8_RECIPES).

For each recipe: cosine of each text's int8 vector to its fp32 vector, on the export's gate texts and on the mixed
benchmark corpus, and the speed on the mixed corpus as a ratio to fp32 (fp32 and int8 sessions interleaved,
medians). Then, for every FFN MatMul, the figures when only that one stays fp32 and every other weight is int8.

Usage: python benchmarks/int8_recipes.py MODEL [--reps 5] > benchmarks/results/int8-recipes-minilm.md
MODEL: a folder exported by bge-onnx (its fp32 graph is used; the folder is copied, not changed).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import onnx

from bge_onnx import Embedder
from bge_onnx.spec import Precision, Task, Variant, read_spec
from bge_onnx_export import probes
from bge_onnx_export.precision import GATES, INT8_RECIPES, compare, failures, quantize_int8, record_variant, weight_roles
from corpora import corpora


def fp32_copy(model: Path) -> Path:
    """A scratch copy of an exported folder with only its fp32 graph (its manifest lists no other variant)."""
    work = Path(tempfile.mkdtemp(prefix="bge-onnx-int8-")) / "model"
    shutil.copytree(model, work, ignore=shutil.ignore_patterns("model_*.onnx*"))
    for precision in (Precision.INT8, Precision.FP16):
        record_variant(work, read_spec(work), precision, None)
    return work


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # long gate texts are truncated on purpose
    spec = read_spec(args.model)
    work = fp32_copy(args.model)
    roles = weight_roles(onnx.load(str(work / spec.variants["fp32"].file), load_external_data=False))
    ffn = [name for name, role in roles.items() if role != "other"]
    gate_texts, mixed = list(probes.GATE_TEXTS), corpora(200)["mixed"]
    fp32 = Embedder(work, device="cpu", precision="fp32")
    reference = {"gate": fp32.encode(gate_texts), "mixed": fp32.encode(mixed)}
    gate = GATES[(Task.EMBED, Precision.INT8)]

    def measure(keep_fp32: frozenset[str], timed: bool) -> str:
        quantize_int8(work / "model.onnx", work / "model_int8.onnx", keep_fp32)
        record_variant(work, read_spec(work), Precision.INT8, Variant("model_int8.onnx", (), {"passed": True}))
        int8 = Embedder(work, device="cpu", precision="int8")
        on_gate = compare(Task.EMBED, reference["gate"], int8.encode(gate_texts))
        on_mixed = compare(Task.EMBED, reference["mixed"], int8.encode(mixed))
        speed = ""
        if timed:
            times = {"fp32": [], "int8": []}
            for _ in range(args.reps):
                for name, model in (("fp32", fp32), ("int8", int8)):
                    start = time.perf_counter()
                    model.encode(mixed)
                    times[name].append(time.perf_counter() - start)
            speed = f"{statistics.median(times['fp32']) / statistics.median(times['int8']):.2f}x | "
        missed = failures(on_gate, gate)
        cells = [f"{f['min_cosine']:.5f} / {f['mean_cosine']:.5f} / {f['similarity_spearman']:.4f}" for f in (on_gate, on_mixed)]
        return f"{cells[0]} | {'pass' if not missed else 'fail'} | {cells[1]} | {speed}"

    print(f"# int8 recipes: {args.model.name} ({spec.architecture}, {spec.max_length} tokens)\n")
    print(f"Command: `python benchmarks/int8_recipes.py {args.model.name} --reps {args.reps}`; {time.strftime('%Y-%m-%d')}. "
          f"Figures vs the fp32 graph: min / mean cosine / Spearman of all pairwise similarities, on the "
          f"{len(gate_texts)} gate texts (gate {gate}) and on the {len(mixed)}-text mixed benchmark corpus. "
          "Weights 7-bit signed per output channel, activations uint8 with one scale per batch, attention products fp32, "
          f"embedding tables uint8 per tensor. Speed: encode() of the mixed corpus, int8 over fp32, medians of {args.reps} interleaved.\n")
    print("| recipe | fp32 MatMuls | gate texts | gate | mixed corpus | speed vs fp32 |")
    print("|---|---|---|---|---|---|")
    for recipe, keep in INT8_RECIPES:
        kept = sum(role in keep for role in roles.values())
        print(f"| {recipe} | {kept} of {len(roles)} | {measure(keep, timed=True)}", flush=True)
    print("\n## One FFN MatMul in fp32, every other weight int8\n")
    print("| kept in fp32 | gate texts | gate | mixed corpus |")
    print("|---|---|---|---|")
    for index, name in enumerate(ffn):
        print(f"| layer {index // 2} {roles[name]} | {measure(frozenset({name}), timed=False)}", flush=True)


if __name__ == "__main__":
    main()
