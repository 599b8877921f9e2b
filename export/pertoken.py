"""int8 whose activations are scaled per token: a torch-free graph rewrite, so a text's vector depends on the text
alone, never on its batch neighbours."""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .rewrite import FLASH_PREFIX

# Prefix of every node and constant the rewrite adds.
PREFIX = "bge_onnx_int8/"


@dataclass(frozen=True)
class Recipe:
    """How the rewrite quantises (the export's choice is precision.INT8_RECIPES; docs/decisions.md sections 12, 17).

    weight_bits: 8 or 7. Weights are signed and symmetric with one scale per output channel; 8-bit ones are fitted so
        that AVX2's u8 x s8 kernel cannot saturate (fit_pairs); 7-bit ones never can.
    zero_point: "per-token" scales each token row by its own min and max, with a zero point per row corrected after
        the integer product (two elementwise passes); "fixed" gives each MatMul one zero point, chosen on the
        calibration rows (128 without calibration), that the integer kernel applies itself, each row scaled so its
        min and max fit around it (one pass after). No shipped recipe uses "fixed" (docs/decisions.md section 17).
    static_roles: MatMuls (by role) whose activations take one scale calibrated at export instead of one per row:
        no per-row reductions and no pass after the integer product. A smoothed one is also centred per channel
        (the calibrated midpoint, subtracted in the same per-channel op as SmoothQuant's division; its product with
        the weights goes into the bias that follows). Still a text's own: no row's scale depends on another row.
    smooth: SmoothQuant's alpha (0 = off) for the MatMuls whose role is in smooth_roles: per input channel,
        max|x|^alpha / max|w|^(1-alpha) moved from the activations into the weights, calibrated on texts the export
        ships (for a static MatMul |x| is measured from the channel's midpoint).
    gptq: weights rounded by GPTQ on the calibration inputs, with damp (relative to the Gram matrix's mean diagonal).
    attention: "int8" unfuses the fused Attention into its QKV MatMul (int8) and MultiHeadAttention; "fp32" keeps
        the fused Attention, or a QKV MatMul that is already unfused, in fp32.
    embeddings: the embedding tables (Gather) stored as int8 per row (weight-only: a token's row is its own).
    keep: MatMuls left in fp32, by role ("ffn_out") or role and layer ("ffn_out:0"); roles are qkv, square
        (attention output and other K x K), ffn_in and ffn_out.
    """

    weight_bits: int = 8
    zero_point: str = "per-token"
    static_roles: frozenset[str] = frozenset()
    smooth: float = 0.5
    smooth_roles: frozenset[str] = frozenset({"qkv", "ffn_in", "ffn_out"})
    gptq: bool = True
    damp: float = 1.0
    attention: str = "int8"
    embeddings: bool = True
    keep: frozenset[str] = frozenset()

    def describe(self) -> dict:
        """What the manifest records of the recipe."""
        return {"activations": "per-token", "weight_bits": self.weight_bits,
                "activation_zero_point": self.zero_point,
                **({"static_roles": ", ".join(sorted(self.static_roles))} if self.static_roles else {}),
                "smooth_alpha": self.smooth, "gptq": self.gptq, "attention": self.attention}


def _const(graph: onnx.GraphProto, name: str, value: np.ndarray) -> str:
    graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    return name


def role(weight_shape: tuple[int, ...]) -> str:
    """A weight MatMul's place in a transformer layer, from its shape (K, N)."""
    k, n = weight_shape
    return "qkv" if n == 3 * k else "ffn_in" if n > k else "ffn_out" if k > n else "square"


def roles(model: onnx.ModelProto, matmuls: list[onnx.NodeProto]) -> dict[str, str]:
    """Each weight MatMul's name -> "role:index", index counting that role's MatMuls in graph order."""
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    seen: dict[str, int] = {}
    out = {}
    for m in matmuls:
        r = role(shapes[m.input[1]])
        out[m.name] = f"{r}:{seen.get(r, 0)}"
        seen[r] = seen.get(r, 0) + 1
    return out


def weight_matmuls(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The MatMuls whose second input is a constant 2-D float weight (K, N), N > 1."""
    shapes = {t.name: (tuple(t.dims), t.data_type) for t in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            continue
        shape, dtype = shapes.get(node.input[1], ((), None))
        if len(shape) == 2 and shape[1] > 1 and dtype == TensorProto.FLOAT:
            out.append(node)
    return out


def unfuse_attention(model: onnx.ModelProto) -> int:
    """Each fused com.microsoft Attention becomes its QKV MatMul, a Split and MultiHeadAttention with the padding
    mask: the same arithmetic, with the projection now a plain MatMul that the rewrite can quantise per token."""
    graph = model.graph
    attentions = [n for n in graph.node if n.op_type == "Attention" and n.domain == "com.microsoft"]
    if not attentions:
        return 0
    biases = {t.name: t.dims[0] for t in graph.initializer if len(t.dims) == 1}
    p = PREFIX + "attention/"
    mask = p + "mask"
    first = list(graph.node).index(attentions[0])
    graph.node.insert(first, helper.make_node("Cast", ["attention_mask"], [mask], name=mask, to=TensorProto.INT32))
    for i, attention in enumerate(attentions):
        x, weight, bias = attention.input[:3]
        heads = next(a.i for a in attention.attribute if a.name == "num_heads")
        width = biases[bias] // 3
        q = f"{p}{i}/"
        sizes = _const(graph, q + "sizes", np.array([width] * 3, dtype=np.int64))
        parts = [q + part for part in "qkv"]
        position = list(graph.node).index(attention)
        graph.node.remove(attention)
        for offset, node in enumerate([
            helper.make_node("MatMul", [x, weight], [q + "qkv"], name=q + "qkv"),
            helper.make_node("Split", [q + "qkv", sizes], parts, name=q + "split", axis=2),
            helper.make_node("MultiHeadAttention", [*parts, bias, mask], [attention.output[0]], name=q + "mha",
                             domain="com.microsoft", num_heads=heads),
        ]):
            graph.node.insert(position + offset, node)
    return len(attentions)


def masked_attention_only(model: onnx.ModelProto) -> int:
    """Each flash-attention If (rewrite.flash_attention: bge-m3) becomes its masked branch. The two branches round
    differently in fp32, and the If takes flash for a text alone (no padding) but the masked branch for the same text
    in a padded batch; int8's per-token rounding can turn that last-bit difference into a quantisation step, so the
    int8 graph runs one path for every batch. Returns how many were replaced."""
    graph = model.graph
    ifs = [n for n in graph.node if n.op_type == "If" and n.name.startswith(FLASH_PREFIX)]
    for node in ifs:
        masked = next(a.g for a in node.attribute if a.name == "else_branch")
        inlined = list(masked.node)
        renamed = {masked.output[0].name: node.output[0]}
        for inner in inlined:
            inner.output[:] = [renamed.get(name, name) for name in inner.output]
        position = list(graph.node).index(node)
        graph.node.remove(node)
        for offset, inner in enumerate(inlined):
            graph.node.insert(position + offset, inner)
    if ifs:  # the "no padding" test that chose the branch is read by nothing now
        for node in [n for n in graph.node if n.name in (FLASH_PREFIX + "mask_min", FLASH_PREFIX + "unpadded")]:
            graph.node.remove(node)
    return len(ifs)


def fit_pairs(q: np.ndarray) -> np.ndarray:
    """8-bit weights that cannot saturate AVX2's u8 x s8 kernel: vpmaddubsw adds the products of input channels
    2i and 2i+1 in int16, so with activations up to 255 each pair's positive weights may sum to at most 128 and its
    negative ones to at least -128. The few pairs beyond are pulled in, the larger weight first; 7-bit weights
    always fit."""
    k = len(q)
    q = np.concatenate([q, np.zeros((k % 2, q.shape[1]), q.dtype)]).astype(np.int16)
    a, b = q[0::2], q[1::2]
    for sign in (1, -1):
        pa, pb = np.maximum(sign * a, 0), np.maximum(sign * b, 0)
        excess = np.maximum(pa + pb - 128, 0)
        first = np.minimum(excess, np.abs(pa - pb))  # from the larger, down to the smaller
        rest = excess - first
        larger = first + rest - rest // 2
        take_a = np.where(pa >= pb, larger, rest // 2)
        a, b = a - sign * take_a, b - sign * (excess - take_a)
    out = np.empty_like(q)
    out[0::2], out[1::2] = a, b
    return out[:k].astype(np.int8)


def pair_sums(weight: np.ndarray) -> np.ndarray:
    """Per column, the largest same-sign magnitude sum of input channels 2i and 2i+1 (AVX2 adds those products)."""
    w = np.concatenate([weight, np.zeros((len(weight) % 2, weight.shape[1]), weight.dtype)])
    a, b = w[0::2], w[1::2]
    pos = np.maximum(a, 0) + np.maximum(b, 0)
    neg = np.maximum(-a, 0) + np.maximum(-b, 0)
    return np.maximum(pos, neg).max(axis=0)


def quantize_weight(weight: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Signed symmetric int8 per output channel (column): (int8 (K, N), float32 scales (N,)).

    8-bit: the scale also keeps each column's pair sums within 128 (fit_pairs), so that 8-bit weights run exactly on
    AVX2 too; a column whose largest weight has a small neighbour keeps (nearly) the full 8-bit step."""
    top = 2 ** (bits - 1) - 1
    scale = np.abs(weight).max(axis=0) / top
    if bits == 8:
        scale = np.maximum(scale, pair_sums(weight) / 128)
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint(weight / scale), -top, top).astype(np.int8)
    return (fit_pairs(q) if bits == 8 else q), scale


def _reduce(graph: onnx.GraphProto, op: str, x: str, out: str, opset: int, blocked: bool = False) -> onnx.NodeProto:
    """ReduceMax/ReduceMin of each row: of a 2-D tensor to one value a row, or (blocked) over the last axis of any
    rank, keeping it (the shape blocked QuantizeLinear wants its scale in). axes: an attribute before opset 18, an
    input from it."""
    axes, keepdims = ([-1], 1) if blocked else ([1], 0)
    if opset < 18:
        return helper.make_node(op, [x], [out], name=out, axes=axes, keepdims=keepdims)
    return helper.make_node(op, [x, _const(graph, out + "_axes", np.array(axes, np.int64))], [out], name=out,
                            keepdims=keepdims)


BLOCKED_OPSET = 21  # QuantizeLinear's blocked form: one scale per row of any rank, without Reshapes


# Standard ops whose every schema change from the version given to opset 21 only added types (float8, int4, bfloat16)
# or optional inputs and attributes whose defaults keep the old meaning (Shape's start/end, Reshape's allowzero, Cast's
# saturate, which applies to float8 alone, Pad's axes and wrap mode, ScatterND's reductions, blocked
# (De)QuantizeLinear). Before 13, Squeeze, Unsqueeze and Split took their axes or sizes as attributes.
TYPES_ONLY = {"Cast": 13, "CastLike": 15, "Shape": 13, "Size": 13, "Reshape": 13, "Squeeze": 13, "Unsqueeze": 13,
              "Flatten": 13, "Transpose": 13, "Identity": 13, "Constant": 13, "ConstantOfShape": 9, "Equal": 13,
              "Where": 9, "Pow": 13, "ScatterND": 13, "Pad": 13, "QuantizeLinear": 13, "DequantizeLinear": 13}


def raise_opset(model: onnx.ModelProto) -> bool:
    """Raise the graph to opset 21 (blocked QuantizeLinear) where every standard op in it means the same there as at
    the graph's own opset; return whether the graph is now at 21 or later. Split with its sizes as an input keeps
    its meaning (opset 18 only added num_outputs for the form without them). A graph with subgraphs keeps its
    opset."""
    entry = next((o for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if entry is None:
        return False
    if entry.version >= BLOCKED_OPSET:
        return True
    for node in model.graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            return False  # its subgraphs' ops are not checked here
        if node.domain not in ("", "ai.onnx"):
            continue
        try:
            old = onnx.defs.get_schema(node.op_type, entry.version).since_version
            new = onnx.defs.get_schema(node.op_type, BLOCKED_OPSET).since_version
        except onnx.defs.SchemaError:
            return False
        types_only = node.op_type in TYPES_ONLY and old >= TYPES_ONLY[node.op_type]
        split_sizes = node.op_type == "Split" and old >= 13 and len(node.input) > 1 and node.input[1] != ""
        same = old == new or types_only or split_sizes
        if not same:
            return False
    entry.version = BLOCKED_OPSET
    model.ir_version = max(model.ir_version, 10)  # opset 21's IR version
    return True


def choose_zero_point(low: np.ndarray, high: np.ndarray) -> int:
    """The one uint8 zero point for rows with these minima and maxima that wastes the least of 8 bits: each row's
    step is the larger of max/(255 - z) and -min/z, and the mean of its square relative to the per-row step
    (max - min)/255 is least. Kept within 1..254, so that a later row below (or above) every calibration row still
    gets a scale that fits it rather than being clipped."""
    low, high = np.minimum(low, 0).astype(np.float64), np.maximum(high, 0).astype(np.float64)
    span = high - low
    low, high, span = low[span > 0], high[span > 0], span[span > 0]
    if not len(span):
        return 128
    z = np.arange(1, 255, dtype=np.float64)[:, None]
    step = np.maximum(high / (255 - z), -low / z)
    return int(np.argmin(((step * 255 / span) ** 2).mean(axis=1))) + 1


def _quantize_matmul(graph: onnx.GraphProto, node: onnx.NodeProto, weight: np.ndarray, recipe: Recipe,
                     smooth: np.ndarray | None, centre: np.ndarray | None, zero_point: int | None, tag: str,
                     gram: np.ndarray | None, opset: int, static: float | None = None, blocked: bool = False
                     ) -> tuple[list[onnx.NodeProto], np.ndarray | None]:
    """Nodes computing node's output from its input quantised row by row (each row on its own: with its own scale,
    or the static one) and its int8 weight, and what must be added to that output (centre @ weight) when the input
    is centred.

    smooth, centre: per input channel, the input becomes (x - centre) / smooth and the weight smooth * weight.
    zero_point: one for every row (the kernel applies it), or None for one per row. static: the one activation scale
    (calibrated) instead of one per row. gram: the Gram matrix of the transformed input, for GPTQ."""
    p = f"{PREFIX}{tag}/"
    x, y = node.input[0], node.output[0]
    k, n = weight.shape
    offset = None if centre is None else (centre.astype(np.float64) @ weight).astype(np.float32)
    if smooth is not None:
        weight = weight * smooth[:, None]
    wq, wscale = quantize_weight(weight, recipe.weight_bits)
    if recipe.gptq:
        wq = gptq(weight, gram, wscale, recipe.weight_bits, damp=recipe.damp)
    w_name = _const(graph, p + "w", wq)
    # rows flattened to 2-D (x2, y2) where QuantizeLinear's per-axis form needs them, and on the static path (its
    # BatchNormalization takes channels on axis 1); blocked, the rows are quantised where they are
    blocked = blocked and static is None
    x2 = x if blocked else p + "x2"
    nodes = [] if blocked else [
        helper.make_node("Shape", [x], [p + "shape"], name=p + "shape"),
        helper.make_node("Slice", [p + "shape", _const(graph, p + "zero1", np.array([0], np.int64)),
                                   _const(graph, p + "minus1", np.array([-1], np.int64))], [p + "lead"],
                         name=p + "lead"),
        helper.make_node("Concat", [p + "lead", _const(graph, p + "n", np.array([n], np.int64))], [p + "out_shape"],
                         name=p + "out_shape", axis=0),
        helper.make_node("Reshape", [x, _const(graph, p + "rows_k", np.array([-1, k], np.int64))], [x2], name=x2),
    ]
    inverse = (1 / smooth if smooth is not None else np.ones(k)).astype(np.float32)
    if centre is not None:  # (x - centre) / smooth in one per-channel pass
        nodes.append(helper.make_node(
            "BatchNormalization", [x2, _const(graph, p + "inv_smooth", inverse),
                                   _const(graph, p + "shift", (-centre * inverse).astype(np.float32)),
                                   _const(graph, p + "mean0", np.zeros(k, np.float32)),
                                   _const(graph, p + "var1", np.ones(k, np.float32))],
            [p + "smoothed"], name=p + "smooth", epsilon=0.0))
        x2 = p + "smoothed"
    elif smooth is not None:
        nodes.append(helper.make_node("Mul", [x2, _const(graph, p + "inv_smooth", inverse)], [p + "smoothed"],
                                      name=p + "smooth"))
        x2 = p + "smoothed"
    if static is not None:  # one scale for every row, calibrated: the transformed range is [-127, 127] static
        # The zero point 128 is taken off after the product as a constant (128 x the weights' column sums), folded
        # into the bias like the centre, so the kernel runs without a zero point, as for the per-row recipes.
        correction = -128.0 * static * wq.astype(np.float64).sum(axis=0) * wscale
        offset = (correction if offset is None else offset + correction).astype(np.float32)
        nodes += [
            helper.make_node("QuantizeLinear", [x2, _const(graph, p + "static_scale", np.array(static, np.float32)),
                                                _const(graph, p + "a_zp", np.array(128, np.uint8))],
                             [p + "q"], name=p + "q"),
            helper.make_node("MatMulIntegerToFloat", [p + "q", w_name, p + "static_scale",
                                                      _const(graph, p + "wscale", wscale)],
                             [p + "y2"], name=p + "matmul", domain="com.microsoft"),
            helper.make_node("Reshape", [p + "y2", p + "out_shape"], [y], name=p + "y"),
        ]
        return nodes, offset
    nodes += [_reduce(graph, op, x2, f"{p}{out}", opset, blocked)
              for op, out in (("ReduceMax", "max"), ("ReduceMin", "min"))]
    tiny = _const(graph, p + "tiny", np.array(1e-12, np.float32))
    # per-row values: 1-D for QuantizeLinear on axis 0 of 2-D rows, turned into a column for the product's output;
    # blocked, they keep the reduced axis (one block a row on the last axis) and broadcast as they are
    per_row = {"axis": -1, "block_size": k} if blocked else {"axis": 0}  # x's rows, each on its own scale
    per_value = {"axis": -1, "block_size": 1} if blocked else {"axis": 0}  # a value a row, on its row's scale
    y2 = y if blocked else p + "y2"
    axis1 = None if blocked else _const(graph, p + "axis1", np.array([1], np.int64))

    def column(name: str) -> tuple[list[onnx.NodeProto], str]:
        if blocked:
            return [], name
        return [helper.make_node("Unsqueeze", [name, axis1], [name + "_col"], name=name + "_col")], name + "_col"

    if zero_point is not None:
        # every row around one zero point z: its scale fits the row's max in 255 - z steps and its min in z
        z = zero_point
        nodes += [
            helper.make_node("Mul", [p + "max", _const(graph, p + "inv_top", np.array(1 / (255 - z), np.float32))],
                             [p + "from_max"], name=p + "from_max"),
            helper.make_node("Mul", [p + "min", _const(graph, p + "inv_bottom", np.array(-1 / z, np.float32))],
                             [p + "from_min"], name=p + "from_min"),
            helper.make_node("Max", [p + "from_max", p + "from_min", tiny], [p + "scale"], name=p + "scale"),
            # the zero point as a tensor of the scale's shape, as QuantizeLinear on axis 0 wants
            helper.make_node("Mul", [p + "scale", _const(graph, p + "zero_f", np.array(0, np.float32))],
                             [p + "zeros"], name=p + "zeros"),
            helper.make_node("Add", [p + "zeros", _const(graph, p + "z_f", np.array(z, np.float32))],
                             [p + "zp_f"], name=p + "zp_f"),
            helper.make_node("Cast", [p + "zp_f"], [p + "zp"], name=p + "zp", to=TensorProto.UINT8),
            helper.make_node("QuantizeLinear", [x2, p + "scale", p + "zp"], [p + "q"], name=p + "q", **per_row),
            helper.make_node("MatMulIntegerToFloat",
                             [p + "q", w_name, _const(graph, p + "one", np.array(1, np.float32)),
                              _const(graph, p + "wscale", wscale), _const(graph, p + "a_zp", np.array(z, np.uint8))],
                             [p + "acc"], name=p + "matmul", domain="com.microsoft"),
        ]
        scale_nodes, scale_col = column(p + "scale")
        nodes += scale_nodes + [helper.make_node("Mul", [p + "acc", scale_col], [y2], name=p + "rescale")]
    else:
        colsum = (wq.astype(np.int64).sum(axis=0) * wscale.astype(np.float64)).astype(np.float32)
        nodes += [
            # the row's range with zero in it (hi >= tiny, so the range is never 0), and the zero point
            # round(-lo / scale) as uint8 by QuantizeLinear itself: 7 small nodes, each a few microseconds a call
            helper.make_node("Min", [p + "min", _const(graph, p + "zero_f", np.array(0, np.float32))], [p + "lo"],
                             name=p + "lo"),
            helper.make_node("Max", [p + "max", tiny], [p + "hi"], name=p + "hi"),
            helper.make_node("Sub", [p + "hi", p + "lo"], [p + "range"], name=p + "range"),
            helper.make_node("Mul", [p + "range", _const(graph, p + "inv255", np.array(1 / 255, np.float32))],
                             [p + "scale"], name=p + "scale"),
            helper.make_node("Neg", [p + "lo"], [p + "minus_lo"], name=p + "minus_lo"),
            helper.make_node("QuantizeLinear", [p + "minus_lo", p + "scale"], [p + "zp"], name=p + "zp", **per_value),
            helper.make_node("Cast", [p + "zp"], [p + "zp_f"], name=p + "zp_f", to=TensorProto.FLOAT),
            helper.make_node("QuantizeLinear", [x2, p + "scale", p + "zp"], [p + "q"], name=p + "q", **per_row),
            helper.make_node("MatMulIntegerToFloat",
                             [p + "q", w_name, _const(graph, p + "one", np.array(1, np.float32)),
                              _const(graph, p + "wscale", wscale)],
                             [p + "acc"], name=p + "matmul", domain="com.microsoft"),
        ]
        zp_nodes, zp_col = column(p + "zp_f")
        scale_nodes, scale_col = column(p + "scale")
        nodes += zp_nodes + [
            helper.make_node("Mul", [zp_col, _const(graph, p + "colsum", colsum)], [p + "correction"],
                             name=p + "correction"),
            helper.make_node("Sub", [p + "acc", p + "correction"], [p + "centred"], name=p + "centred"),
        ] + scale_nodes + [helper.make_node("Mul", [p + "centred", scale_col], [y2], name=p + "rescale")]
    if not blocked:
        nodes.append(helper.make_node("Reshape", [y2, p + "out_shape"], [y], name=p + "y"))
    return nodes, offset


def _add_to_bias(graph: onnx.GraphProto, name: str, offset: np.ndarray, p: str) -> str | None:
    """Add ``offset`` (one value per channel) to the tensor ``name``: folded into the bias its one consumer adds
    (Add, BiasGelu, SkipLayerNormalization, or MultiHeadAttention after the QKV Split), else by a new Add. Returns
    the name of the bias replaced, if one was."""
    consumers = [c for c in graph.node if name in c.input]
    inits = {t.name: t for t in graph.initializer}
    target, slot = None, None
    if len(consumers) == 1 and name not in {o.name for o in graph.output}:
        c = consumers[0]
        if c.op_type == "Add" and c.domain in ("", "ai.onnx"):
            target, slot = c, 1 - list(c.input).index(name)
        elif c.op_type == "BiasGelu" and c.input[0] == name:
            target, slot = c, 1
        elif c.op_type == "SkipLayerNormalization" and len(c.input) > 4 and c.input[4]:
            target, slot = c, 4
        elif c.op_type == "Split" and next((a.i for a in c.attribute if a.name == "axis"), 0) in (2, -1):
            after = [m for m in graph.node if set(c.output) & set(m.input)]
            if (len(after) == 1 and after[0].op_type == "MultiHeadAttention" and len(after[0].input) > 3
                    and list(after[0].input[:3]) == list(c.output)):
                target, slot = after[0], 3
    bias = inits.get(target.input[slot]) if target is not None else None
    if bias is not None and tuple(bias.dims) == offset.shape:
        total = numpy_helper.to_array(bias).astype(np.float32) + offset
        target.input[slot] = _const(graph, p + "bias", total)
        return bias.name
    producer = next(n for n in graph.node if name in n.output)
    producer.output[list(producer.output).index(name)] = p + "uncentred"
    graph.node.insert(list(graph.node).index(producer) + 1, helper.make_node(
        "Add", [p + "uncentred", _const(graph, p + "offset", offset)], [name], name=p + "uncentre"))
    return None


def _quantize_gather(graph: onnx.GraphProto, node: onnx.NodeProto, table: np.ndarray, tag: str) -> list:
    """An embedding table as int8 rows with one scale per row (weight-only: each token's row is its own)."""
    p = f"{PREFIX}{tag}/"
    scale = np.abs(table).max(axis=1) / 127
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint(table / scale[:, None]), -127, 127).astype(np.int8)
    ids = node.input[1]
    return [
        helper.make_node("Gather", [_const(graph, p + "table", q), ids], [p + "rows"], name=p + "rows", axis=0),
        helper.make_node("Gather", [_const(graph, p + "scales", scale[:, None]), ids], [p + "row_scales"],
                         name=p + "row_scales", axis=0),
        helper.make_node("Cast", [p + "rows"], [p + "rows_f"], name=p + "rows_f", to=TensorProto.FLOAT),
        helper.make_node("Mul", [p + "rows_f", p + "row_scales"], [node.output[0]], name=p + "dequantize"),
    ]


@dataclass
class Channels:
    """Calibration statistics of one tensor's real token rows, per channel: min, max, sum, row count and the Gram
    matrix x^T x (float64)."""

    low: np.ndarray
    high: np.ndarray
    total: np.ndarray
    count: int
    gram: np.ndarray

    def add(self, rows: np.ndarray) -> None:
        self.low = np.minimum(self.low, rows.min(axis=0))
        self.high = np.maximum(self.high, rows.max(axis=0))
        rows = rows.astype(np.float64)
        self.total = self.total + rows.sum(axis=0)
        self.count += len(rows)
        self.gram = self.gram + rows.T @ rows

    def transformed_gram(self, centre: np.ndarray | None, smooth: np.ndarray | None) -> np.ndarray:
        """The Gram matrix of (x - centre) / smooth."""
        gram = self.gram
        if centre is not None:
            c = centre.astype(np.float64)
            gram = gram - np.outer(c, self.total) - np.outer(self.total, c) + self.count * np.outer(c, c)
        return gram / np.outer(smooth, smooth) if smooth is not None else gram


def _calibration_rows(model: onnx.ModelProto, names: Sequence[str], feeds: Iterable[dict[str, np.ndarray]]
                      ) -> Iterator[dict[str, np.ndarray]]:
    """Per calibration batch, each named tensor of the fp32 graph as its real token rows (2-D)."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in names)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    with tempfile.TemporaryDirectory() as scratch:
        if probe.ByteSize() < 2**31 - 2**26:
            graph: str | bytes = probe.SerializeToString()
        else:  # past protobuf's 2 GB (bge-m3): the weights go beside the graph, as in the export
            graph = str(Path(scratch) / "probe.onnx")
            onnx.save(probe, graph, save_as_external_data=True, location="probe.onnx.data")
        session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        for feed in feeds:
            mask = feed["attention_mask"].astype(bool)
            yield {name: value[mask[:, : value.shape[1]]] if value.ndim == 3 else value.reshape(-1, value.shape[-1])
                   for name, value in zip(names, session.run(list(names), feed))}


def input_statistics(model: onnx.ModelProto, names: Sequence[str], feeds: Iterable[dict[str, np.ndarray]]
                     ) -> dict[str, Channels]:
    """Per-channel statistics of each named tensor's real token rows over the calibration batches."""
    stats: dict[str, Channels] = {}
    for batch in _calibration_rows(model, names, feeds):
        for name, rows in batch.items():
            if name not in stats:
                k = rows.shape[1]
                stats[name] = Channels(np.full(k, np.inf, np.float32), np.full(k, -np.inf, np.float32),
                                       np.zeros(k), 0, np.zeros((k, k)))
            stats[name].add(rows)
    return stats


def row_ranges(model: onnx.ModelProto, inputs: dict[str, tuple[str, np.ndarray | None]],
               feeds: Iterable[dict[str, np.ndarray]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """For each key's (input tensor, smooth): the min and max of every calibration row of x / smooth."""
    if not inputs:
        return {}
    low: dict[str, list] = {key: [] for key in inputs}
    high: dict[str, list] = {key: [] for key in inputs}
    for batch in _calibration_rows(model, sorted({name for name, _ in inputs.values()}), feeds):
        for key, (name, smooth) in inputs.items():
            rows = batch[name] / smooth if smooth is not None else batch[name]
            low[key].append(rows.min(axis=1))
            high[key].append(rows.max(axis=1))
    return {key: (np.concatenate(low[key]), np.concatenate(high[key])) for key in inputs}


def gptq(weight: np.ndarray, gram: np.ndarray, scale: np.ndarray, bits: int, *, damp: float = 0.01,
         block: int = 128) -> np.ndarray:
    """GPTQ (Frantar et al., 2022) for y = x @ weight: round the input channels (rows) one at a time, largest
    activation energy first, and feed each row's rounding error forward into the rows not yet rounded, weighted by
    the calibration inputs' inverse Gram matrix. Returns int8 (K, N) on the given per-column scales."""
    top = 2 ** (bits - 1) - 1
    w = weight.astype(np.float64).copy()
    h = gram.astype(np.float64).copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1
    w[dead, :] = 0
    order = np.argsort(-np.diag(h), kind="stable")
    w, h = w[order], h[np.ix_(order, order)]
    h += damp * np.mean(np.diag(h)) * np.eye(len(h))
    hinv = np.linalg.cholesky(np.linalg.inv(h)).T  # upper
    k = len(w)
    q = np.zeros_like(w)
    for start in range(0, k, block):
        end = min(start + block, k)
        wb = w[start:end].copy()
        errors = np.zeros_like(wb)
        for i in range(end - start):
            row = wb[i]
            qi = np.clip(np.rint(row / scale), -top, top)
            q[start + i] = qi
            err = (row - qi * scale) / hinv[start + i, start + i]
            wb[i + 1:] -= np.outer(hinv[start + i, start + i + 1:end], err)
            errors[i] = err
        w[end:] -= hinv[start:end, end:].T @ errors
    out = np.empty_like(q)
    out[order] = q
    out = out.astype(np.int8)
    return fit_pairs(out) if bits == 8 else out


def quantize(model: onnx.ModelProto, recipe: Recipe, calibration: Iterable[dict[str, np.ndarray]] = ()) -> dict:
    """Rewrite ``model`` in place to per-token int8 by ``recipe``; return what was done, for the manifest.

    ``calibration``: fp32 graph inputs (padded batches) for SmoothQuant's per-channel ranges, GPTQ's Gram matrices,
    static scales and fixed zero points; needed when the recipe smooths, uses GPTQ or static scales.
    """
    graph = model.graph
    if not any(o.domain == "com.microsoft" for o in model.opset_import):  # MatMulIntegerToFloat's domain
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    masked_attention_only(model)
    attention = unfuse_attention(model) if recipe.attention == "int8" else 0
    blocked = raise_opset(model)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
    matmuls = weight_matmuls(model)
    named = roles(model, matmuls)
    # attention in fp32 also keeps a QKV projection that is already a plain MatMul (bge-m3's flash-attention graph)
    keep = recipe.keep | ({"qkv"} if recipe.attention == "fp32" else set())
    kept = [m for m in matmuls if named[m.name] in keep or named[m.name].split(":")[0] in keep]
    matmuls = [m for m in matmuls if m not in kept]
    weights = {t.name: t for t in graph.initializer}
    calibration = list(calibration)
    calibrates = bool(recipe.smooth or recipe.gptq or recipe.static_roles)
    if matmuls and calibrates and not calibration:
        raise ValueError("this int8 recipe calibrates (SmoothQuant, GPTQ or static scales): pass calibration batches")
    inputs = sorted({m.input[0] for m in matmuls})
    stats = input_statistics(model, inputs, calibration) if matmuls and calibrates else {}
    smooth: dict[str, np.ndarray] = {}
    centres: dict[str, np.ndarray] = {}
    static: dict[str, float] = {m.name: 1.0 for m in matmuls if named[m.name].split(":")[0] in recipe.static_roles}
    for m in matmuls:
        channels = stats.get(m.input[0])
        smoothed = bool(recipe.smooth) and named[m.name].split(":")[0] in recipe.smooth_roles
        if smoothed:  # each input channel's largest weight (the weights are read again when quantised)
            wmax = np.maximum(np.abs(numpy_helper.to_array(weights[m.input[1]])).max(axis=1), 1e-5)
        if m.name in static:  # centred when smoothed (the same per-channel op), then one scale for [-127, 127]
            centre = (channels.low + channels.high) / 2 if smoothed else np.zeros_like(channels.low)
            half = np.maximum(np.maximum(channels.high - centre, centre - channels.low), 1e-6)
            factor = half ** recipe.smooth / wmax ** (1 - recipe.smooth) if smoothed else np.ones_like(half)
            if smoothed:
                smooth[m.name] = factor.astype(np.float32)
                centres[m.name] = centre.astype(np.float32)
            static[m.name] = float((half / factor).max() / 127)
        elif smoothed:
            act = np.maximum(np.maximum(-channels.low, channels.high), 1e-5)
            smooth[m.name] = (act ** recipe.smooth / wmax ** (1 - recipe.smooth)).astype(np.float32)
    zero_points: dict[str, int] = {}
    if recipe.zero_point == "fixed":
        ranges = row_ranges(model, {m.name: (m.input[0], smooth.get(m.name)) for m in matmuls if m.name not in static},
                            calibration) if calibration else {}
        zero_points = {m.name: choose_zero_point(*ranges[m.name]) if m.name in ranges else 128
                       for m in matmuls if m.name not in static}
    replaced = set()
    for i, m in enumerate(matmuls):
        w = numpy_helper.to_array(weights[m.input[1]]).astype(np.float32)
        gram = stats[m.input[0]].transformed_gram(centres.get(m.name), smooth.get(m.name)) if recipe.gptq else None
        new, offset = _quantize_matmul(graph, m, w, recipe, smooth.get(m.name), centres.get(m.name),
                                       zero_points.get(m.name), f"mm{i}", gram, opset, static.get(m.name),
                                       blocked)
        position = list(graph.node).index(m)
        graph.node.remove(m)
        for offset_i, node in enumerate(new):
            graph.node.insert(position + offset_i, node)
        if offset is not None:
            replaced.add(_add_to_bias(graph, m.output[0], offset, f"{PREFIX}mm{i}/"))
        replaced.add(m.input[1])
    gathers = 0
    if recipe.embeddings:
        for i, g in enumerate([n for n in graph.node if n.op_type == "Gather" and n.input[0] in weights]):
            table = numpy_helper.to_array(weights[g.input[0]])
            if table.ndim != 2 or table.dtype != np.float32 or table.shape[0] < 16:
                continue
            new = _quantize_gather(graph, g, table, f"gather{i}")
            position = list(graph.node).index(g)
            graph.node.remove(g)
            for offset, node in enumerate(new):
                graph.node.insert(position + offset, node)
            replaced.add(g.input[0])
            gathers += 1
    still_read = {name for node in graph.node for name in node.input}
    for init in [t for t in graph.initializer if t.name in replaced and t.name not in still_read]:
        graph.initializer.remove(init)
    # the int8 ops' outputs are typed by onnxruntime at load; stale value_info would only mislead
    del graph.value_info[:]
    return {**recipe.describe(), "quantized_matmuls": len(matmuls), "fp32_matmuls": len(kept),
            "unfused_attention": attention, "quantized_embeddings": gathers, "smoothed_matmuls": len(smooth),
            "static_matmuls": len(static), "rows_in_place": blocked}
