"""int8 recipes: accuracy against fp32, batch drift and speed of per-token int8 variants, and the kernels under them.

The measurement behind the export's INT8_RECIPES (issue 20, docs/decisions.md section 12). MODEL is a folder with
the fp32 graph (`bge-onnx export ... --precision fp32`); each variant is written from it into a scratch folder by
bge_onnx_export.pertoken with one recipe changed, calibrated on the shipped texts, and measured through Embedder:
min / mean cosine and similarity Spearman against fp32 on the export's gate texts and on the mixed corpus, drift (a
text alone against the same text in the corpus's batches, max abs difference), speed against fp32 on the mixed corpus
(interleaved rounds, ratio per round, median). `--old` adds a folder holding the per-batch int8 of earlier exports as
a contestant. The kernel table times one MatMul of each BERT shape: fp32, onnxruntime's u8 x s8 integer product (the
per-token graphs' kernel) with 7-bit, fitted 8-bit and plain 8-bit weights, and MatMulNBits (8-bit, accuracy level 4).
"""

from __future__ import annotations

import argparse
import functools
import shutil
import statistics
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
from bge_onnx_export import pertoken, precision, probes

from bge_onnx import Embedder
from bge_onnx.spec import Precision, Task, Variant, read_spec

from .corpora import corpora
from .harness import Report, interleave, log

STATIC = precision.STATIC
RECIPES = {
    "static (not shipped: fused fp32 attention, static FFN-in and attention-output scales, FFN-out zero point per "
    "row, SmoothQuant 0.7 on FFN-in, GPTQ, 8-bit fitted weights)": STATIC,
    "  QKV int8 too, static and smoothed (attention unfused)": replace(
        STATIC, attention="int8", static_roles=frozenset({"qkv", "square", "ffn_in"}),
        smooth_roles=frozenset({"qkv", "ffn_in"})),
    "  FFN-out one zero point per MatMul": replace(STATIC, zero_point="fixed"),
    "  FFN-out smoothed (alpha 0.7)": replace(STATIC, smooth_roles=frozenset({"qkv", "ffn_in", "ffn_out"})),
    "  SmoothQuant alpha 0.5": replace(STATIC, smooth=0.5),
    "  FFN-in and attention output dynamic (zero point per row)": replace(STATIC, static_roles=frozenset()),
    "  FFN-in and attention output dynamic, one zero point per MatMul": replace(STATIC, static_roles=frozenset(),
                                                                                zero_point="fixed"),
    "zero point per row (shipped: QKV int8, SmoothQuant 0.5 on QKV, FFN in and out)":
        pertoken.Recipe(),
    "  attention fp32 (fused Attention, QKV in fp32)": pertoken.Recipe(attention="fp32"),
    "  embeddings fp32": pertoken.Recipe(embeddings=False),
    "  one zero point per MatMul (chosen on the calibration rows)": pertoken.Recipe(zero_point="fixed"),
    "  7-bit weights": pertoken.Recipe(weight_bits=7),
    "  no SmoothQuant": pertoken.Recipe(smooth=0),
    "  no GPTQ": pertoken.Recipe(gptq=False),
    "plain per-token (7-bit, one zero point per MatMul, no SmoothQuant, no GPTQ)": pertoken.Recipe(
        weight_bits=7, zero_point="fixed", smooth=0, gptq=False),
}


# timed again on their own with more rounds (with many contestants a round spans minutes, and this host's speed
# drifts within one): the shipped recipe, its two dynamic alternatives and the previous first recipe
FOCUS = [label for label in RECIPES if not label.startswith("  ") or "dynamic" in label][:4]


def variant_folder(model: Path, root: Path, name: str, recipe: pertoken.Recipe) -> Path:
    folder = root / f"v{len(list(root.iterdir()))}"
    shutil.copytree(model, folder, ignore=shutil.ignore_patterns("model_int8.onnx*", "model_fp16.onnx*"))
    spec = read_spec(folder)
    for dropped in (Precision.INT8, Precision.FP16):
        spec = precision.record_variant(folder, spec, dropped, None)
    made = precision.quantize_int8(folder, folder / "model.onnx", folder / "model_int8.onnx", recipe)
    precision.record_variant(folder, spec, Precision.INT8,
                             Variant("model_int8.onnx", (), {"recipe": name, **made, "passed": True}))
    return folder


KERNEL_CALLS = 10


def calls(session, a: np.ndarray) -> None:
    """KERNEL_CALLS runs of a one-MatMul session: one takes milliseconds, within this host's jitter."""
    for _ in range(KERNEL_CALLS):
        session.run(None, {"a": a})


def kernels(rounds: int, threads: int) -> list[list]:
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    def session(nodes, inputs, inits):
        graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                                  inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                        helper.make_opsetid("com.microsoft", 1)])
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        # sleeping threads: with onnxruntime's default spinning, an idle session's threads keep spinning while the
        # next contestant runs, and on 2 CPUs each kernel took about twice as long
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])

    rng = np.random.default_rng(0)
    rows = []
    for k, n in ((384, 1152), (384, 1536), (1536, 384)):
        w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
        x = rng.standard_normal((512, k)).astype(np.float32)
        xq = rng.integers(0, 256, (512, k)).astype(np.uint8)
        fin = [helper.make_tensor_value_info("a", TensorProto.FLOAT, [None, k])]
        qin = [helper.make_tensor_value_info("a", TensorProto.UINT8, [None, k])]
        runs = {"fp32 MatMul": (session([helper.make_node("MatMul", ["a", "w"], ["y"])], fin,
                                        [numpy_helper.from_array(w, "w")]), x)}
        plain = np.clip(np.rint(w / (np.abs(w).max(0) / 127)), -127, 127).astype(np.int8)
        exact = {}
        for label, q in (("u8 x s8, 7-bit weights", pertoken.quantize_weight(w, 7)[0]),
                         ("u8 x s8, fitted 8-bit weights", pertoken.quantize_weight(w, 8)[0]),
                         ("u8 x s8, plain 8-bit weights", plain)):
            integer = session(
                [helper.make_node("MatMulIntegerToFloat", ["a", "w", "one", "ws", "zp"], ["y"],
                                  domain="com.microsoft")],
                qin, [numpy_helper.from_array(q, "w"), numpy_helper.from_array(np.array(1, np.float32), "one"),
                      numpy_helper.from_array(np.ones(n, np.float32), "ws"),
                      numpy_helper.from_array(np.array(128, np.uint8), "zp")])
            runs[label] = (integer, xq)
            reference = (xq.astype(np.int64) - 128) @ q.astype(np.int64)
            exact[label] = float(np.abs(integer.run(None, {"a": xq})[0] - reference).max())
        for block in (32, 128):
            blocks = (k + block - 1) // block
            padded = np.zeros((blocks * block, n), np.float32)
            padded[:k] = w
            per_block = padded.reshape(blocks, block, n)
            scale = np.maximum(np.abs(per_block).max(axis=1) / 127, 1e-12).astype(np.float32)
            b = (np.clip(np.rint(per_block / scale[:, None]), -127, 127) + 128).astype(np.uint8).transpose(2, 0, 1)
            runs[f"MatMulNBits 8-bit, block {block}, accuracy 4"] = (session(
                [helper.make_node("MatMulNBits", ["a", "b", "s"], ["y"], domain="com.microsoft", K=k, N=n, bits=8,
                                  block_size=block, accuracy_level=4)],
                fin, [numpy_helper.from_array(np.ascontiguousarray(b), "b"),
                      numpy_helper.from_array(scale.T.reshape(-1).copy(), "s")]), x)
        seconds = interleave({label: functools.partial(calls, s, a) for label, (s, a) in runs.items()}, rounds=rounds)
        base = seconds["fp32 MatMul"]
        for label in runs:
            ratio = statistics.median(b / s for b, s in zip(base, seconds[label]))
            product = "" if label not in exact else "exact" if exact[label] == 0 else f"off by {exact[label]:.0f}"
            rows.append([f"512 x {k} x {n}", label, f"{ratio:.2f}x", product])
    return rows


def main(argv: list[str], *, name: str = "int8") -> None:
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks {name}", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="bge-onnx folder with the fp32 graph")
    parser.add_argument("--old", type=Path, help="a folder whose int8 is the per-batch int8 of earlier exports")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; figures are medians (default 5)")
    parser.add_argument("--texts", type=int, default=200, help="texts per corpus (default 200)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--focus-rounds", type=int, default=21,
                        help="rounds of the second timing, of fp32 and the FOCUS recipes only (default 21)")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    report = Report(name, "int8 recipes: per-token variants against fp32 (all-MiniLM-L6-v2)", argv,
                    models={"MODEL": args.model, **({"OLD": args.old} if args.old else {})})
    mixed = corpora(args.texts)["mixed"]
    gate = list(probes.GATE_TEXTS)
    fp32 = Embedder(args.model, device="cpu", precision="fp32", threads=args.threads)
    reference = {"gate": fp32.encode(gate), "mixed": fp32.encode(mixed)}
    contestants = {"fp32": fp32}
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        folders = {label: variant_folder(args.model, root, label.strip(), recipe) for label, recipe in RECIPES.items()}
        if args.old:
            folders["per-batch int8 of earlier exports (onnxruntime dynamic, FFN fp32)"] = args.old
        for label, folder in folders.items():
            log(f"measuring {label.strip()}")
            model = Embedder(folder, device="cpu", precision="int8", threads=args.threads)
            contestants[label] = model
            figures = {part: precision.compare(Task.EMBED, reference[part], model.encode(texts))
                       for part, texts in (("gate", gate), ("mixed", mixed))}
            batch = model.encode(mixed)
            alone = np.stack([model.encode([t])[0] for t in mixed[::5]])
            drift = float(np.abs(alone - batch[::5]).max())
            gate_ok = not precision.failures(figures["gate"], precision.GATES[(Task.EMBED, Precision.INT8)])
            rows.append([label, *(f"{figures[p]['min_cosine']:.5f} / {figures[p]['mean_cosine']:.5f} / "
                                  f"{figures[p]['similarity_spearman']:.5f}" for p in ("gate", "mixed")),
                         "pass" if gate_ok else "fail", f"{drift:.1e}"])
            report.data[label.strip()] = {"gate": figures["gate"], "mixed": figures["mixed"], "drift": drift,
                                          "passes_gate": gate_ok}
        log(f"timing {len(contestants)} contestants, {args.rounds} rounds")
        seconds = interleave({label: (lambda m=m: (m.encode(mixed), None)[1]) for label, m in contestants.items()},
                             rounds=args.rounds)
        log(f"timing fp32 and {len(FOCUS)} recipes, {args.focus_rounds} rounds")
        focused = interleave({label: (lambda m=contestants[label]: (m.encode(mixed), None)[1])
                              for label in ["fp32", *FOCUS]}, rounds=args.focus_rounds)
    speed = {label: statistics.median(b / s for b, s in zip(seconds["fp32"], seconds[label])) for label in seconds}
    for row in rows:
        row.append(f"{speed[row[0]]:.2f}x")
        report.data[row[0].strip()]["speed_vs_fp32"] = speed[row[0]]
    report.text(f"{len(gate)} gate texts (the export's), {len(mixed)} mixed texts (SciFact queries and abstracts, "
                f"STS-B sentences), {args.threads} threads, {args.rounds} interleaved rounds (fp32 median "
                f"{statistics.median(seconds['fp32']):.2f} s per pass over the mixed corpus). Cosines and Spearman "
                "against fp32; the gate is min cosine 0.995, mean 0.999, Spearman 0.995 on the gate texts. Drift: max "
                "abs difference between a text alone and the same text in the corpus's batches. Indented rows are "
                "variants of the unindented row above them, as their labels say.")
    report.table(["variant", "gate texts: min / mean / Spearman", "mixed: min / mean / Spearman", "gate",
                  "drift", "speed vs fp32"], rows)
    focus_speed = {label: statistics.median(b / s for b, s in zip(focused["fp32"], focused[label])) for label in FOCUS}
    report.data["focused_speed_vs_fp32"] = {label.strip(): focus_speed[label] for label in FOCUS}
    report.text(f"The same speed measured again for fp32 and {len(FOCUS)} recipes only, {args.focus_rounds} interleaved "
                f"rounds (fp32 median {statistics.median(focused['fp32']):.2f} s): with {len(contestants)} contestants a "
                "round above spans minutes, over which this host's speed drifts.")
    report.table(["variant", "speed vs fp32"], [[label.strip(), f"{focus_speed[label]:.2f}x"] for label in FOCUS])
    log("timing the kernels")
    start = time.perf_counter()
    kernel_rounds = max(args.rounds, 5) * 3
    kernel_rows = kernels(kernel_rounds, args.threads)
    report.text(f"Kernels: one MatMul of each BERT shape (512 token rows), {KERNEL_CALLS} calls per timing, threads "
                f"sleeping between calls (spinning, each idle session's threads slowed the next), medians of "
                f"{kernel_rounds} interleaved rounds, speed vs the "
                "fp32 MatMul; 'exact' when the integer product equals numpy's at random uint8 activations (plain 8-bit "
                f"weights saturate AVX2's kernel without VNNI). {time.perf_counter() - start:.0f} s.")
    report.table(["shape", "kernel", "speed vs fp32", "integer product"], kernel_rows)
    report.data["kernels"] = kernel_rows
    report.write()
