"""Rewrites of a traced graph, torch-free: onnxruntime's fusions, the pooling as the graph's last step, and the
last layer cut to the first token where nothing else is read."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bge_onnx.spec import POOLED_OUTPUT, Pooling

def fuse(
    traced: Path,
    path: Path,
    *,
    num_heads: int,
    hidden_size: int,
    external_data: bool,
    pooling: Pooling | None = None,
    flash: bool = False,
) -> tuple[dict[str, int], bool]:
    """Apply onnxruntime's BERT fusions (attention, skip layer norm, bias GELU; hardware-independent) to the
    traced graph, end an embedding graph in its ``pooling``, cut the last layer to the first token where
    possible (keep_first_token), and save to ``path``.

    The embedding layer norm is not fused: that fusion hides the embedding tables from int8 quantisation. ``flash``:
    attention as flash_attention makes it, for batches without padding.
    Returns the count of each fused op and whether the last layer was cut to the first token.
    """
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    options.enable_embed_layer_norm = False
    fusion_logger = logging.getLogger("onnxruntime.transformers")
    level = fusion_logger.level
    fusion_logger.setLevel(logging.ERROR)
    try:
        optimized = optimize_model(
            str(traced),
            model_type="bert",
            num_heads=num_heads,
            hidden_size=hidden_size,
            optimization_options=options,
            opt_level=0,  # fusions only: no onnxruntime optimisation specific to this machine is saved
        )
        if pooling is not None:
            add_pooling(optimized.model, pooling)
        first_token = keep_first_token(optimized.model)  # only where nothing reads the other tokens
        if flash:
            flash_attention(optimized.model)
        optimized.save_model_to_file(str(path), use_external_data_format=external_data)
    finally:
        fusion_logger.setLevel(level)
    return {op: count for op, count in optimized.get_fused_operator_statistics().items() if count}, first_token


# Prefix of the pooling nodes' names.
POOLING_PREFIX = "bge_onnx_pooling/"


def add_pooling(model: onnx.ModelProto, pooling: Pooling) -> None:
    """Replace the graph's token-states output with their pooled vector per text (``sentence_embedding``).

    In the graph, not in numpy, so that on CUDA only (batch, dim) floats are copied to the host instead of
    (batch, sequence, dim): half of the graph's time there (docs/decisions.md). CLS takes token 0;
    mean averages the real tokens (mask 1), as sentence-transformers does. The fp16 variant runs these nodes in fp16
    (the converter turns their casts into fp16 ones), so the mean is taken with weights mask / count that sum to 1:
    a sum of the states first could overflow fp16 (65504) over thousands of tokens.
    """
    graph = model.graph
    (output,) = graph.output
    hidden = output.name
    dim = output.type.tensor_type.shape.dim[2]
    width = dim.dim_value or dim.dim_param or None
    p = POOLING_PREFIX
    # The casts to float are no-ops in the fp32 graph, which onnxruntime drops.
    if Pooling(pooling) is Pooling.CLS:
        nodes = [
            helper.make_node("Gather", [hidden, p + "zero"], [p + "first"], name=p + "cls", axis=1),
            helper.make_node("Cast", [p + "first"], [POOLED_OUTPUT], name=p + "float", to=TensorProto.FLOAT),
        ]
        constants = [helper.make_tensor(p + "zero", TensorProto.INT64, [], [0])]
    else:
        nodes = [
            helper.make_node("Cast", [hidden], [p + "states"], name=p + "states", to=TensorProto.FLOAT),
            helper.make_node("Cast", ["attention_mask"], [p + "mask"], name=p + "mask", to=TensorProto.FLOAT),
            helper.make_node("ReduceSum", [p + "mask", p + "axis"], [p + "count"], name=p + "count", keepdims=1),
            helper.make_node("Max", [p + "count", p + "eps"], [p + "count_safe"], name=p + "count_safe"),
            helper.make_node("Div", [p + "mask", p + "count_safe"], [p + "weights"], name=p + "weights"),
            helper.make_node("Unsqueeze", [p + "weights", p + "axis"], [p + "weights_row"], name=p + "weights_row"),
            # weights (batch, 1, seq) @ states (batch, seq, dim): the masked mean over tokens as one batched product
            helper.make_node("MatMul", [p + "weights_row", p + "states"], [p + "mean_row"], name=p + "mean"),
            helper.make_node("Squeeze", [p + "mean_row", p + "axis"], [POOLED_OUTPUT], name=p + "squeeze"),
        ]
        constants = [
            helper.make_tensor(p + "axis", TensorProto.INT64, [1], [1]),
            helper.make_tensor(p + "eps", TensorProto.FLOAT, [], [1e-9]),
        ]
    graph.initializer.extend(constants)
    graph.node.extend(nodes)
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(POOLED_OUTPUT, TensorProto.FLOAT, ["batch", width]))


# Prefix of the nodes that keep only the first token in the last layer.
FIRST_TOKEN_PREFIX = "bge_onnx_first_token/"


def keep_first_token(model: onnx.ModelProto) -> bool:
    """Run the last layer past its attention for the first token only, when nothing else is read downstream.

    CLS pooling and the rerankers' classification heads read only token 0 of the last layer, but the graph computes
    the attention output projection and the feed-forward block for every token. The attention itself still runs
    for all tokens (token 0 attends to them all); after it, two Gathers keep token 0 of its output and of the
    residual, so everything after works on (batch, 1, dim). Returns False, changing nothing, when the end of the
    graph is not the fused pattern Attention -> MatMul -> SkipLayerNormalization (residual = the attention's input),
    or when anything reads the last layer's output other than at token 0.
    """
    graph = model.graph
    nodes = list(graph.node)
    attentions = [n for n in nodes if n.op_type == "Attention"]
    if not attentions:
        return False
    attention = attentions[-1]

    def readers(name: str) -> list[onnx.NodeProto]:
        return [n for n in nodes if name in n.input]

    projection = readers(attention.output[0])
    if len(projection) != 1 or projection[0].op_type != "MatMul":
        return False
    norm = readers(projection[0].output[0])
    if len(norm) != 1 or norm[0].op_type != "SkipLayerNormalization" or norm[0].input[1] != attention.input[0]:
        return False
    last = [n for n in nodes if n.op_type == "SkipLayerNormalization"][-1]  # the last layer's output
    # the small ones only (indices, axes): converting every weight would copy the whole model once more
    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer if int(np.prod(t.dims)) <= 16}
    constants.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in nodes
                      if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"})
    if last.output[0] in {o.name for o in graph.output}:  # the token states leave the graph whole
        return False
    if not all(_reads_first_token(n, constants) for n in readers(last.output[0])):
        return False
    p = FIRST_TOKEN_PREFIX
    first = helper.make_tensor(p + "first", TensorProto.INT64, [1], [0])  # [0], not 0: keeps the token axis
    gathers = [
        helper.make_node("Gather", [attention.output[0], first.name], [p + "attention"], name=p + "attention", axis=1),
        helper.make_node("Gather", [attention.input[0], first.name], [p + "residual"], name=p + "residual", axis=1),
    ]
    projection[0].input[0] = p + "attention"
    norm[0].input[1] = p + "residual"
    graph.initializer.append(first)
    position = nodes.index(projection[0])  # keep the nodes in topological order
    for node in reversed(gathers):
        graph.node.insert(position, node)
    return True


def _reads_first_token(node: onnx.NodeProto, constants: dict[str, np.ndarray]) -> bool:
    """Whether ``node`` reads only token 0 of its (batch, sequence, dim) input: Gather of index 0 on axis 1, or
    Slice 0:1 of axis 1."""
    def const(i: int) -> np.ndarray | None:
        return constants.get(node.input[i]) if len(node.input) > i else None

    if node.op_type == "Gather":
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        index = const(1)
        return axis == 1 and index is not None and index.size == 1 and int(index.reshape(-1)[0]) == 0
    if node.op_type == "Slice":
        starts, ends, axes = const(1), const(2), const(3)
        return (starts is not None and ends is not None and axes is not None and list(axes.reshape(-1)) == [1]
                and list(starts.reshape(-1)) == [0] and list(ends.reshape(-1)) == [1])
    return False


# Prefix of the nodes that choose flash attention for batches without padding.
FLASH_PREFIX = "bge_onnx_flash/"


def flash_attention(model: onnx.ModelProto) -> int:
    """Let onnxruntime run its CPU flash attention where a batch has no padding (one long text, or texts of one
    length): each fused Attention becomes its QKV MatMul and an If on "every mask entry is 1", whose branches run
    MultiHeadAttention without a mask (flash: memory linear in the length) or with the padding mask (as Attention
    did). The weights stay outside the branches: one copy. Returns how many attentions were rewritten.

    Measured on bge-m3's shape, one 8192-token text: peak RSS 1.8 GB instead of 5.7 GB, 1.44x faster, the same output
    (benchmarks/results/m3-long.md); onnxruntime takes the flash path only when MultiHeadAttention has no
    key_padding_mask (contrib_ops/cpu/bert/multihead_attention.cc).
    """
    graph = model.graph
    p = FLASH_PREFIX
    attentions = [n for n in graph.node if n.op_type == "Attention" and n.domain == "com.microsoft"]
    if not attentions:
        return 0
    biases = {t.name: t.dims[0] for t in graph.initializer if len(t.dims) == 1}
    graph.initializer.append(helper.make_tensor(p + "one", TensorProto.INT32, [], [1]))
    first = list(graph.node).index(attentions[0])
    prelude = [
        helper.make_node("Cast", ["attention_mask"], [p + "mask"], name=p + "mask", to=TensorProto.INT32),
        helper.make_node("ReduceMin", [p + "mask"], [p + "mask_min"], name=p + "mask_min", keepdims=0),
        helper.make_node("Equal", [p + "mask_min", p + "one"], [p + "unpadded"], name=p + "unpadded"),
    ]
    for node in reversed(prelude):
        graph.node.insert(first, node)
    for i, attention in enumerate(attentions):
        x, weight, bias = attention.input[:3]
        heads = next(a.i for a in attention.attribute if a.name == "num_heads")
        q = f"{p}{i}/"
        width = biases[bias] // 3
        graph.initializer.append(helper.make_tensor(q + "sizes", TensorProto.INT64, [3], [width] * 3))

        def branch(name: str, mask: list[str]) -> onnx.GraphProto:
            parts = [f"{q}{name}/{part}" for part in "qkv"]
            return helper.make_graph(
                [helper.make_node("Split", [q + "qkv", q + "sizes"], parts, name=f"{q}{name}/split", axis=2),
                 helper.make_node("MultiHeadAttention", [*parts, bias, *mask], [f"{q}{name}/out"],
                                  name=f"{q}{name}/attention", domain="com.microsoft", num_heads=heads)],
                f"{q}{name}", [], [helper.make_tensor_value_info(f"{q}{name}/out", TensorProto.FLOAT, None)])

        position = list(graph.node).index(attention)
        graph.node.remove(attention)
        graph.node.insert(position, helper.make_node("MatMul", [x, weight], [q + "qkv"], name=q + "qkv"))
        graph.node.insert(position + 1, helper.make_node(
            "If", [p + "unpadded"], [attention.output[0]], name=q + "if",
            then_branch=branch("flash", []), else_branch=branch("masked", [p + "mask"])))
    return len(attentions)
