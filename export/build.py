"""The export's graph written directly from a checkpoint's tensors, without torch: the fused form that tracing and
onnxruntime's fusions give (Attention, SkipLayerNormalization, BiasGelu), then the same last steps (rewrite.py:
pooling in the graph, the last layer cut to the first token, flash attention for bge-m3)."""

from __future__ import annotations

import contextlib
from collections import Counter
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
from onnx import TensorProto, helper

from bge_onnx.spec import Pooling, Task

from .checkpoint import Checkpoint
from .rewrite import add_pooling, flash_attention, keep_first_token

# bge-m3's per-token outputs beside the pooled vector
LEXICAL_OUTPUT = "token_weights"
COLBERT_OUTPUT = "colbert_vecs"
MICROSOFT = "com.microsoft"
# the op counts the manifest records (as onnxruntime's fusion statistics name them)
FUSED_OPS = ("Attention", "BiasGelu", "LayerNormalization", "SkipLayerNormalization")


def input_names(with_token_types: bool) -> list[str]:
    names = ["input_ids", "attention_mask"]
    return names + ["token_type_ids"] if with_token_types else names


class _Graph:
    """Writes nodes and initialisers into ``graph``, each node named after its output. With ``data`` (the side file,
    open for writing) a weight of 1 KB or more goes there as it is made, so the model is never held whole in memory
    (helper.make_graph / make_model and onnx.save's own conversion to external data each copy it)."""

    def __init__(self, graph: onnx.GraphProto, data: BinaryIO | None = None, location: str = "") -> None:
        self.graph, self.data, self.location = graph, data, location

    def const(self, name: str, value) -> str:
        array = np.asarray(value, order="C")
        tensor = self.graph.initializer.add()
        tensor.name = name
        tensor.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
        tensor.dims.extend(array.shape)
        if self.data is None or array.nbytes < 1024:
            tensor.raw_data = array.tobytes()
        else:
            offset = self.data.tell()
            self.data.write(array.data)
            tensor.data_location = TensorProto.EXTERNAL
            for key, entry in (("location", self.location), ("offset", offset), ("length", array.nbytes)):
                tensor.external_data.add(key=key, value=str(entry))
        return name

    def op(self, op_type: str, inputs: list[str], output: str, **attributes) -> str:
        domain = attributes.pop("domain", "")
        self.graph.node.append(helper.make_node(op_type, inputs, [output], name=output, domain=domain, **attributes))
        return output


def _embeddings(g: _Graph, c: Checkpoint, with_token_types: bool) -> str:
    """Word + token type + position embeddings, layer-normalised, as BertEmbeddings / XLMRobertaEmbeddings."""
    words = g.op("Gather", [g.const("embeddings.word_embeddings.weight",
                                    c.encoder("embeddings.word_embeddings.weight")), "input_ids"], "embeddings/words")
    types_table = c.encoder("embeddings.token_type_embeddings.weight")
    if with_token_types:
        types = g.op("Gather", [g.const("embeddings.token_type_embeddings.weight", types_table), "token_type_ids"],
                     "embeddings/types")
    else:  # every token has type 0 (transformers' default token_type_ids)
        types = g.const("embeddings.token_type_embeddings.row0", types_table[0])
    summed = g.op("Add", [words, types], "embeddings/words_types")
    if c.roberta:  # positions count the non-padding tokens from pad_id + 1 (create_position_ids_from_input_ids)
        pad = g.const("embeddings/pad_id", np.array(c.pad_id, np.int64))
        g.op("Equal", ["input_ids", pad], "embeddings/is_pad")
        g.op("Not", ["embeddings/is_pad"], "embeddings/not_pad")
        g.op("Cast", ["embeddings/not_pad"], "embeddings/real", to=TensorProto.INT64)
        g.op("CumSum", ["embeddings/real", g.const("embeddings/axis1", np.array(1, np.int64))], "embeddings/count")
        g.op("Mul", ["embeddings/count", "embeddings/real"], "embeddings/counted")
        positions = g.op("Add", ["embeddings/counted", pad], "embeddings/positions")
    else:  # 0 .. sequence - 1
        g.op("Shape", ["input_ids"], "embeddings/shape")
        g.op("Gather", ["embeddings/shape", g.const("embeddings/one", np.array(1, np.int64))], "embeddings/length")
        positions = g.op("Range", [g.const("embeddings/zero", np.array(0, np.int64)), "embeddings/length",
                                   "embeddings/one"], "embeddings/positions")
    g.op("Gather", [g.const("embeddings.position_embeddings.weight", c.encoder("embeddings.position_embeddings.weight")),
                    positions], "embeddings/position_vectors")
    g.op("Add", [summed, "embeddings/position_vectors"], "embeddings/sum")
    return g.op("LayerNormalization", ["embeddings/sum", g.const("embeddings.LayerNorm.weight",
                                                                c.encoder("embeddings.LayerNorm.weight")),
                                       g.const("embeddings.LayerNorm.bias", c.encoder("embeddings.LayerNorm.bias"))],
                "embeddings/output", axis=-1, epsilon=c.eps)


def _layer(g: _Graph, c: Checkpoint, i: int, x: str, mask_index: str, output: str) -> str:
    p = f"encoder.layer.{i}."

    def weight(name: str) -> str:  # a Linear's weight as MatMul's right operand (in, out)
        return g.const(p + name + ".weight.T", np.ascontiguousarray(c.encoder(p + name + ".weight").T))

    def vector(name: str) -> str:
        return g.const(p + name, c.encoder(p + name))

    projections = ("attention.self.query", "attention.self.key", "attention.self.value")
    qkv_weight = np.concatenate([c.encoder(f"{p}{n}.weight").T for n in projections], axis=1)
    qkv_bias = np.concatenate([c.encoder(f"{p}{n}.bias") for n in projections])
    attention = g.op("Attention", [x, g.const(p + "attention.qkv.weight", np.ascontiguousarray(qkv_weight)),
                                   g.const(p + "attention.qkv.bias", qkv_bias), mask_index],
                     f"layer.{i}/attention", domain=MICROSOFT, num_heads=c.heads)
    g.op("MatMul", [attention, weight("attention.output.dense")], f"layer.{i}/attention_output")
    normed = g.op("SkipLayerNormalization", [f"layer.{i}/attention_output", x,
                                             vector("attention.output.LayerNorm.weight"),
                                             vector("attention.output.LayerNorm.bias"),
                                             vector("attention.output.dense.bias")],
                  f"layer.{i}/attention_norm", domain=MICROSOFT, epsilon=c.eps)
    g.op("MatMul", [normed, weight("intermediate.dense")], f"layer.{i}/intermediate")
    g.op("BiasGelu", [f"layer.{i}/intermediate", vector("intermediate.dense.bias")], f"layer.{i}/gelu",
         domain=MICROSOFT)
    g.op("MatMul", [f"layer.{i}/gelu", weight("output.dense")], f"layer.{i}/output")
    return g.op("SkipLayerNormalization", [f"layer.{i}/output", normed, vector("output.LayerNorm.weight"),
                                           vector("output.LayerNorm.bias"), vector("output.dense.bias")],
                output, domain=MICROSOFT, epsilon=c.eps)


def _classifier(g: _Graph, c: Checkpoint, hidden: str) -> str:
    """Token 0 -> dense -> tanh -> one logit, as BERT's pooler + classifier and RoBERTa's classification head."""
    (dense, dense_bias), (out, out_bias) = c.classifier()
    first = g.op("Gather", [hidden, g.const("head/zero", np.array(0, np.int64))], "head/first", axis=1)
    g.op("Gemm", [first, g.const("head.dense.weight", dense), g.const("head.dense.bias", dense_bias)], "head/dense",
         transB=1)
    g.op("Tanh", ["head/dense"], "head/tanh")
    return g.op("Gemm", ["head/tanh", g.const("head.out.weight", out), g.const("head.out.bias", out_bias)], "logits",
                transB=1)


def _m3_heads(g: _Graph, c: Checkpoint, hidden: str) -> list[onnx.ValueInfoProto]:
    """bge-m3's lexical weights relu(sparse_linear(h)) per token, and ColBERT vectors colbert_linear(h) of every token
    after the first, masked and L2-normalised (as FlagEmbedding's BGEM3 model and heads.M3Body)."""
    (colbert, colbert_bias), (sparse, sparse_bias) = c.m3_heads
    g.op("MatMul", [hidden, g.const("sparse.weight.T", np.ascontiguousarray(sparse.T))], "sparse/matmul")
    g.op("Add", ["sparse/matmul", g.const("sparse.bias", sparse_bias)], "sparse/add")
    g.op("Relu", ["sparse/add"], "sparse/relu")
    g.op("Squeeze", ["sparse/relu", g.const("sparse/last", np.array([-1], np.int64))], LEXICAL_OUTPUT)
    after_first = [g.const("colbert/start", np.array([1], np.int64)),
                   g.const("colbert/end", np.array([np.iinfo(np.int64).max], np.int64)),
                   g.const("colbert/axis", np.array([1], np.int64))]
    g.op("Slice", [hidden, *after_first], "colbert/tokens")
    g.op("MatMul", ["colbert/tokens", g.const("colbert.weight.T", np.ascontiguousarray(colbert.T))], "colbert/matmul")
    g.op("Add", ["colbert/matmul", g.const("colbert.bias", colbert_bias)], "colbert/add")
    g.op("Slice", ["attention_mask", *after_first], "colbert/mask")
    g.op("Cast", ["colbert/mask"], "colbert/mask_float", to=TensorProto.FLOAT)
    g.op("Unsqueeze", ["colbert/mask_float", "sparse/last"], "colbert/mask_column")
    g.op("Mul", ["colbert/add", "colbert/mask_column"], "colbert/masked")
    g.op("ReduceL2", ["colbert/masked"], "colbert/norm", axes=[-1], keepdims=1)
    g.op("Max", ["colbert/norm", g.const("colbert/eps", np.array(1e-12, np.float32))], "colbert/norm_safe")
    g.op("Div", ["colbert/masked", "colbert/norm_safe"], COLBERT_OUTPUT)
    return [helper.make_tensor_value_info(LEXICAL_OUTPUT, TensorProto.FLOAT, ["batch", "sequence"]),
            helper.make_tensor_value_info(COLBERT_OUTPUT, TensorProto.FLOAT,
                                          ["batch", "sequence_after_first", colbert.shape[0]])]


def build_graph(g: _Graph, c: Checkpoint, *, task: Task, with_token_types: bool) -> None:
    """The fused graph before its last steps, into ``g``'s graph: token states out (``last_hidden_state``), or a
    reranker's ``logits``."""
    g.graph.name = "bge_onnx"
    g.graph.input.extend(helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"])
                         for n in input_names(with_token_types))
    x = _embeddings(g, c, with_token_types)
    # the fused Attention's mask: each row's length (right padding), as onnxruntime's fusion writes it
    g.op("Cast", ["attention_mask"], "mask/int32", to=TensorProto.INT32)
    mask_index = g.op("ReduceSum", ["mask/int32", g.const("mask/axis", np.array([1], np.int64))], "mask/lengths",
                      keepdims=0)
    for i in range(c.layers):
        last = i == c.layers - 1 and task is Task.EMBED  # named as transformers' output, like the traced graph's
        x = _layer(g, c, i, x, mask_index, "last_hidden_state" if last else f"layer.{i}/output_norm")
    if task is Task.RERANK:
        logits = _classifier(g, c, x)
        g.graph.output.append(helper.make_tensor_value_info(logits, TensorProto.FLOAT, ["batch", 1]))
    else:
        g.graph.output.append(helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT,
                                                            ["batch", "sequence", c.hidden]))


def write_graph(
    c: Checkpoint,
    path: Path,
    *,
    task: Task,
    with_token_types: bool,
    pooling: Pooling | None = None,
    external_data: bool = True,
    flash: bool = False,
) -> tuple[list[str], dict[str, int], bool]:
    """As trace.export_graph, from the checkpoint's tensors: writes ``path`` (and with ``external_data`` its weights
    in ``path.name + ".data"``); returns the file names, the count of each fused op, and whether the last layer was
    cut to the first token."""
    data_path = path.with_name(path.name + ".data")
    model = onnx.ModelProto(ir_version=8, producer_name="bge_onnx_export.build")  # ir 8: torch's, for opset 17
    model.opset_import.extend([helper.make_opsetid("", 17), helper.make_opsetid(MICROSOFT, 1)])
    with open(data_path, "wb") if external_data else contextlib.nullcontext() as data:
        g = _Graph(model.graph, data, data_path.name)
        build_graph(g, c, task=task, with_token_types=with_token_types)
        if task is Task.EMBED:
            add_pooling(model, pooling)  # replaces the token-states output by the pooled vector
        if c.m3_heads is not None:  # bge-m3: lexical weights and ColBERT vectors beside the pooled vector
            model.graph.output.extend(_m3_heads(g, c, "last_hidden_state"))
        first_token = keep_first_token(model)
        if flash:
            flash_attention(model)
    onnx.save(model, str(path))
    counts = Counter(n.op_type for n in model.graph.node)
    if flash:  # attention inside the If branches, as in the traced path
        counts["Attention"] = len([n for n in model.graph.node if n.op_type == "If"])
    written = [path.name, data_path.name] if external_data else [path.name]
    return written, {op: counts[op] for op in FUSED_OPS if counts[op]}, first_token
