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
