"""The embedding graph's last step: CLS or mean pooling of the token states, as ONNX nodes (torch-free)."""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from bge_onnx.spec import POOLED_OUTPUT, Pooling

# Prefix of the pooling nodes' names, so that the fp16 conversion can keep them in fp32.
POOLING_PREFIX = "bge_onnx_pooling/"


def add_pooling(model: onnx.ModelProto, pooling: Pooling) -> None:
    """Replace the graph's token-states output with their pooled vector per text (``sentence_embedding``).

    In the graph, not in numpy, so that on CUDA only (batch, dim) floats are copied to the host instead of
    (batch, sequence, dim): half of the graph's time there (benchmarks/results/gpu-minilm.md). CLS takes token 0;
    mean averages the real tokens (mask 1) in float32, as sentence-transformers does.
    """
    graph = model.graph
    (output,) = graph.output
    hidden = output.name
    dim = output.type.tensor_type.shape.dim[2]
    width = dim.dim_value or dim.dim_param or None
    p = POOLING_PREFIX
    # Each branch casts the states to float32 first: a no-op here, which onnxruntime drops, but in the fp16 graph
    # (where these nodes are kept in fp32) the place where fp16 states become float32 ones.
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
            helper.make_node("Unsqueeze", [p + "mask", p + "axis"], [p + "mask_row"], name=p + "mask_row"),
            # mask (batch, 1, seq) @ states (batch, seq, dim): the masked sum over tokens as one batched product
            helper.make_node("MatMul", [p + "mask_row", p + "states"], [p + "sum_row"], name=p + "sum"),
            helper.make_node("Squeeze", [p + "sum_row", p + "axis"], [p + "sum"], name=p + "squeeze"),
            helper.make_node("ReduceSum", [p + "mask", p + "axis"], [p + "count"], name=p + "count", keepdims=1),
            helper.make_node("Max", [p + "count", p + "eps"], [p + "count_safe"], name=p + "count_safe"),
            helper.make_node("Div", [p + "sum", p + "count_safe"], [POOLED_OUTPUT], name=p + "mean"),
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
    graph is not the fused pattern Attention -> MatMul -> SkipLayerNormalization (residual = the attention's input).
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
