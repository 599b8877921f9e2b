"""Why int8 on this model cannot be both fast and within the gate here: where the error comes from, and what the
recipes that remove it cost. The research behind the int8 target in benchmarks/results/int8-outliers-minilm.md.

1. Attribution: the fp32 graph with only the weights, or only the activations, of one MatMul role rounded to int8
   (fake quantisation in fp32: no int8 kernel, no saturation).
2. Outliers: per FFN input, the largest |x| and where it sits (token position, channel), on the gate texts.
3. Real onnxruntime int8 graphs: recipe x weight format, their gate figures, the mixed corpus and speed vs fp32.
   - formats: s8 (signed 8-bit weights), u8 (unsigned weights: onnxruntime's u8u8 kernel),
     s8-7bit (reduce_range: 7-bit signed weights, which keeps AVX2's u8s8 kernel from saturating; what the export
     ships since this measurement).
   - recipes: all-weights; first-token-fp32 (every weight MatMul split: token 0 in fp32, the rest int8);
     smooth-outliers (input channels whose calibration |max| is over 3x the median are scaled down, their weight
     rows up, SmoothQuant-style but only for those channels; calibrated on the gate texts themselves, so its gate
     figures flatter it); ffn-fp32 (shipped). first-token-fp32 leaves the fused attention's QKV projection int8.

Usage: python benchmarks/int8_outliers.py MODEL [--reps 5] > benchmarks/results/int8-outliers-minilm.md
MODEL: a folder exported by bge-onnx (its fp32 graph is used; the folder is copied, not changed).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic

from bge_onnx import Embedder
from bge_onnx.spec import Precision, Task, Variant, read_spec
from bge_onnx.tokenize import TextTokenizer, pad_batch
from bge_onnx_export import probes
from bge_onnx_export.precision import GATES, compare, failures, record_variant, weight_roles
from corpora import corpora
from int8_recipes import fp32_copy

INT64_MAX = 2**63 - 1


def with_nodes(model: onnx.ModelProto, rewrite) -> onnx.ModelProto:
    """A copy of model whose nodes are rewrite(node) (a list of nodes for each)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    nodes = [new for node in model.graph.node for new in rewrite(model, node)]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def initializer(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(i for i in model.graph.initializer if i.name == name)


def fake_quant(model: onnx.ModelProto, names: set[str], *, weights: bool, activations: bool) -> onnx.ModelProto:
    def rewrite(m, node):
        if node.name not in names:
            return [node]
        out = []
        if weights:  # symmetric 8-bit per output channel (the export now ships 7-bit: twice this step)
            w = numpy_helper.to_array(initializer(m, node.input[1]))
            scale = np.maximum(np.abs(w).max(axis=0, keepdims=True), 1e-12) / 127
            initializer(m, node.input[1]).CopyFrom(numpy_helper.from_array((np.round(w / scale) * scale).astype(np.float32), node.input[1]))
        if activations:  # uint8 with one scale and zero point per batch, as onnxruntime's dynamic quantisation
            q = [node.name + suffix for suffix in ("/q", "/scale", "/zero", "/dq")]
            out += [helper.make_node("DynamicQuantizeLinear", [node.input[0]], q[:3]), helper.make_node("DequantizeLinear", q[:3], [q[3]])]
            node.input[0] = q[3]
        return out + [node]

    return with_nodes(model, rewrite)


def split_first_token(model: onnx.ModelProto, names: set[str]) -> tuple[onnx.ModelProto, set[str]]:
    """Each named MatMul becomes token 0's MatMul (returned names, to keep in fp32) and the other tokens' MatMul."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for name, value in (("ft/0", 0), ("ft/1", 1), ("ft/end", INT64_MAX)):
        model.graph.initializer.append(numpy_helper.from_array(np.array([value], np.int64), name))
    firsts = set()

    def rewrite(m, node):
        if node.name not in names:
            return [node]
        x, w, y, p = node.input[0], node.input[1], node.output[0], node.name + "/first_token"
        firsts.add(p)
        return [
            helper.make_node("Slice", [x, "ft/0", "ft/1", "ft/1"], [p + "/x0"]),
            helper.make_node("Slice", [x, "ft/1", "ft/end", "ft/1"], [p + "/xr"]),
            helper.make_node("MatMul", [p + "/x0", w], [p + "/y0"], name=p),
            helper.make_node("MatMul", [p + "/xr", w], [p + "/yr"], name=node.name),
            helper.make_node("Concat", [p + "/y0", p + "/yr"], [y], axis=1),
        ]

    return with_nodes(model, rewrite), firsts


def input_absmax(
    model: onnx.ModelProto, folder: Path, texts: list[str], tensors: set[str]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per tensor, per channel: the largest |x| over the real tokens, and the token position where it was."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    names = sorted(tensors)
    model.graph.output.extend(helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    spec = read_spec(folder)
    tokenizer = TextTokenizer(folder, max_length=spec.max_length)
    declared = [i.name for i in session.get_inputs()]
    absmax: dict[str, np.ndarray] = {}
    position: dict[str, np.ndarray] = {}
    for start in range(0, len(texts), 16):
        encodings, _ = tokenizer.encode_texts(texts[start:start + 16])
        feeds = pad_batch(encodings, pad_id=spec.pad_token_id, input_names=declared)
        mask = feeds["attention_mask"].astype(bool)
        for name, x in zip(names, session.run(names, feeds)):
            x = np.where(mask[..., None], np.abs(x), 0).max(axis=0)  # (position, channel), over the batch's texts
            peak = x.max(axis=0)
            previous = absmax.get(name, np.zeros_like(peak))
            position[name] = np.where(peak >= previous, x.argmax(axis=0), position.get(name, 0))
            absmax[name] = np.maximum(previous, peak)
    return absmax, position


def smooth_outliers(model: onnx.ModelProto, absmax: dict[str, np.ndarray], names: set[str], cap: float) -> onnx.ModelProto:
    def rewrite(m, node):
        if node.name not in names:
            return [node]
        a = absmax[node.input[0]]
        s = np.maximum(a / (cap * np.median(a)), 1.0).astype(np.float32)
        w = numpy_helper.to_array(initializer(m, node.input[1]))
        initializer(m, node.input[1]).CopyFrom(numpy_helper.from_array((w * s[:, None]).astype(np.float32), node.input[1]))
        m.graph.initializer.append(numpy_helper.from_array(1 / s, node.name + "/smooth"))
        mul = helper.make_node("Mul", [node.input[0], node.name + "/smooth"], [node.name + "/smoothed"])
        node.input[0] = node.name + "/smoothed"
        return [mul, node]

    return with_nodes(model, rewrite)


FORMATS = {"s8": (QuantType.QInt8, False), "u8": (QuantType.QUInt8, False), "s8-7bit": (QuantType.QInt8, True)}


def quantize(model: onnx.ModelProto, dst: Path, fmt: str, exclude: set[str]) -> None:
    src = dst.with_name("source.onnx")
    onnx.save(model, str(src))
    weight_type, reduce_range = FORMATS[fmt]
    logging.disable(logging.WARNING)  # its advice to pre-process, for every graph
    try:
        quantize_dynamic(str(src), str(dst), op_types_to_quantize=["MatMul", "Gather", "Attention"], per_channel=True,
                         weight_type=weight_type, reduce_range=reduce_range, nodes_to_exclude=sorted(exclude),
                         extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT})
    finally:
        logging.disable(logging.NOTSET)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # long gate texts are truncated on purpose
    work = fp32_copy(args.model)
    fp32_graph = onnx.load(str(work / "model.onnx"))
    roles = weight_roles(fp32_graph)
    by_role = {role: {n for n, r in roles.items() if r == role} for role in ("other", "ffn_in", "ffn_out")}
    every_weight = set(roles)
    attention = {n.name for n in fp32_graph.graph.node if n.op_type == "Attention"}
    gate_texts, mixed = list(probes.GATE_TEXTS), corpora(200)["mixed"]
    fp32 = Embedder(work, device="cpu", precision="fp32")
    reference = {"gate": fp32.encode(gate_texts), "mixed": fp32.encode(mixed)}
    gate = GATES[(Task.EMBED, Precision.INT8)]

    def evaluate(model: onnx.ModelProto | None = None) -> tuple[Embedder, str]:
        if model is not None:
            onnx.save(model, str(work / "model_int8.onnx"))
        record_variant(work, read_spec(work), Precision.INT8, Variant("model_int8.onnx", (), {"passed": True}))
        embedder = Embedder(work, device="cpu", precision="int8")
        on_gate = compare(Task.EMBED, reference["gate"], embedder.encode(gate_texts))
        on_mixed = compare(Task.EMBED, reference["mixed"], embedder.encode(mixed))
        cells = [f"{f['min_cosine']:.5f} / {f['mean_cosine']:.5f}" for f in (on_gate, on_mixed)]
        return embedder, f"{cells[0]} | {'pass' if not failures(on_gate, gate) else 'fail'} | {cells[1]}"

    print(f"# Where int8's error comes from, and what removing it costs: {args.model.name}\n")
    print(f"Command: `python benchmarks/int8_outliers.py {args.model.name} --reps {args.reps}`; {time.strftime('%Y-%m-%d')}; "
          f"onnxruntime {ort.__version__}. Cosine of each text's vector to the fp32 graph's, min / mean, on the "
          f"{len(gate_texts)} gate texts (gate {gate}) and the {len(mixed)}-text mixed benchmark corpus.\n")
    print("## 1. Attribution (fake quantisation in fp32)\n")
    print("| rounded to int8 | weights only: gate | mixed | activations only: gate | mixed |")
    print("|---|---|---|---|---|")
    for label, names in (*by_role.items(), ("every weight MatMul", every_weight)):
        row = []
        for weights, activations in ((True, False), (False, True)):
            _, cells = evaluate(model=fake_quant(fp32_graph, names, weights=weights, activations=activations))
            gate_cell, _, mixed_cell = cells.split(" | ")
            row += [gate_cell, mixed_cell]
        print(f"| {label} | " + " | ".join(row) + " |", flush=True)

    print("\n## 2. The largest FFN inputs (gate texts)\n")
    inputs = {n.input[0]: n.name for n in fp32_graph.graph.node if n.name in roles or n.name in attention}
    absmax, position = input_absmax(fp32_graph, work, gate_texts, set(inputs))
    print("| input of MatMul | largest abs | its channel | its token position | median channel max | channels over 3x median |")
    print("|---|---|---|---|---|---|")
    for tensor, node in inputs.items():
        if roles.get(node) in ("ffn_in", "ffn_out"):
            a = absmax[tensor]
            c = int(a.argmax())
            print(f"| {node} | {a.max():.1f} | {c} | {int(position[tensor][c])} | {np.median(a):.2f} | {int((a > 3 * np.median(a)).sum())} |")

    print(f"\n## 3. onnxruntime int8 graphs (speed: encode() of the mixed corpus over fp32's, medians of {args.reps} interleaved)\n")
    split, firsts = split_first_token(fp32_graph, every_weight)
    smoothed = smooth_outliers(fp32_graph, absmax, every_weight | attention, cap=3.0)
    recipes = {
        "all-weights": (fp32_graph, set()),
        "first-token-fp32": (split, firsts),
        "smooth-outliers": (smoothed, set()),
        "ffn-fp32 (shipped)": (fp32_graph, by_role["ffn_in"] | by_role["ffn_out"]),
    }
    rows, models = [], {}
    for recipe, (graph, exclude) in recipes.items():
        for fmt in FORMATS:
            quantize(graph, work / "model_int8.onnx", fmt, exclude)
            models[(recipe, fmt)], cells = evaluate()
            rows.append(((recipe, fmt), cells))
            print(f"measured {recipe} {fmt}", file=sys.stderr, flush=True)
    times: dict[object, list[float]] = {key: [] for key in ["fp32", *models]}
    for _ in range(args.reps):
        for key, model in (("fp32", fp32), *models.items()):
            start = time.perf_counter()
            model.encode(mixed)
            times[key].append(time.perf_counter() - start)
    print("| recipe | weights | gate texts | gate | mixed corpus | speed vs fp32 |")
    print("|---|---|---|---|---|---|")
    for key, cells in rows:
        speed = statistics.median(times["fp32"]) / statistics.median(times[key])
        print(f"| {key[0]} | {key[1]} | {cells} | {speed:.2f}x |")


if __name__ == "__main__":
    main()
