"""int8 and fp16 variants: the quality gate against fp32, what the manifest records, and how the runtime picks."""

from __future__ import annotations

import platform
import warnings

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import numpy_helper

from bge_onnx import Embedder, ExportError, ModelFilesError, ParityError, Precision, Reranker
from bge_onnx.spec import read_spec, sha256_file
from bge_onnx_export import export_model, precision, probes
from bge_onnx_export.rewrite import POOLING_PREFIX

def pooling_ops(graph: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in graph.graph.node if node.name.startswith(POOLING_PREFIX)]


IMPOSSIBLE = {"min_cosine": 1.01, "mean_cosine": 1.01, "similarity_spearman": 1.01}


def _gate_outputs(folder, kind_precision: str) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Embedder(folder, device="cpu", precision=kind_precision).encode(list(probes.GATE_TEXTS))


@pytest.mark.parametrize("kind", ["bert-cls", "bert-mean", "xlmr-cls"])
def test_int8_variant_is_measured_recorded_and_loaded(model_copy, kind):
    folder = model_copy(kind)
    spec = precision.add_variant(folder, Precision.INT8, allow_below_gate=True)
    variant = spec.variants["int8"]
    assert read_spec(folder) == spec
    assert spec.files[variant.file] == sha256_file(folder / variant.file)
    figures = variant.parity
    if figures["quantized_embeddings"]:  # a tiny model's int8 graph with fp32 tables can outweigh its fp32 graph
        def size(v):
            return sum((folder / name).stat().st_size for name in v.all_files)

        assert size(variant) < size(spec.variants["fp32"])
    assert figures["recipe"] in {name for name, _ in precision.INT8_RECIPES}
    # the recorded figures are what the runtime reproduces, and "passed" agrees with the gate
    again = precision.compare(spec.task, _gate_outputs(folder, "fp32"), _gate_outputs(folder, "int8"))
    for name in ("min_cosine", "mean_cosine", "similarity_spearman"):
        assert again[name] == pytest.approx(figures[name], abs=1e-6)
    assert figures["passed"] == (not precision.failures(figures, figures["gate"]))
    assert 0.9 < figures["mean_cosine"] < 1.0  # quantised: close to fp32, yet not identical
    assert figures["activations"] == "per-token" and figures["weight_bits"] == 8
    assert figures["cpu"] == precision.cpu_description()  # the fp32 parts' rounding depends on the CPU
    graph = onnx.load(str(folder / variant.file))
    assert sum(node.op_type == "MatMulIntegerToFloat" for node in graph.graph.node) == figures["quantized_matmuls"] > 0
    # the pooling at the graph's end is not quantised (it has no weights; the quantiser drops its no-op Cast)
    fp32_graph = onnx.load(str(folder / spec.variants["fp32"].file))
    assert set(pooling_ops(graph)) - {"Cast"} == set(pooling_ops(fp32_graph)) - {"Cast"} != set()
    model = Embedder(folder, device="cpu")
    assert model.precision is (Precision.INT8 if figures["passed"] else Precision.FP32)
    assert Embedder(folder, device="cpu", precision="int8").precision is Precision.INT8



def test_spearman_is_scipys_also_with_ties():
    """The gate's rank correlation against scipy's: lexical scores of texts sharing no token tie at 0."""
    from scipy.stats import spearmanr

    rng = np.random.default_rng(3)
    a = rng.normal(size=300)
    tied = np.where(rng.random(300) < 0.4, 0.0, a)
    cases = [(a, a + rng.normal(scale=0.5, size=300)), (tied, np.round(tied + rng.normal(scale=0.1, size=300), 1)),
             (rng.integers(0, 4, 300).astype(float), rng.integers(0, 4, 300).astype(float))]
    for x, y in cases:
        assert precision._spearman(x, y) == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)
    # a variant that gives NaN fails its gate (NaN < limit is False: it passed before)
    broken = np.where(np.arange(300) == 7, np.nan, a)
    figures = {"score_spearman": precision._spearman(a, broken)}
    assert precision.failures(figures, {"score_spearman": 0.99}) == ["score_spearman nan < 0.99"]

def test_cpu_description_names_the_int8_flags(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Some Xeon\nflags\t\t: fpu sse avx2 avx512f avx512_vnni\n")
    assert precision.cpu_description(cpuinfo) == f"{platform.machine()} Some Xeon (avx2 avx512f avx512_vnni)"
    assert precision.cpu_description(tmp_path / "missing") == platform.machine()
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd asimddp i8mm\nmodel name\t:\nCPU part\t: 0xd0c\n")
    assert precision.cpu_description(arm) == f"{platform.machine()} (asimddp i8mm)"


def test_a_graph_below_the_gate_is_refused_and_nothing_changes(model_copy):
    folder = model_copy("bert-mean")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(ParityError, match=r"int8 graph falls below its quality gate .*min_cosine 0\.\d+ < 1\.01"):
        precision.add_variant(folder, Precision.INT8, gate=IMPOSSIBLE)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert Embedder(folder, device="cpu").precision is Precision.FP32


def test_auto_skips_a_variant_kept_below_its_gate(model_copy):
    folder = model_copy("bert-cls")
    spec = precision.add_variant(folder, Precision.INT8, gate=IMPOSSIBLE, allow_below_gate=True)
    assert spec.variants["int8"].parity["passed"] is False
    assert spec.variants["int8"].parity["recipe"] == precision.INT8_RECIPES[-1][0]  # tried every recipe
    assert Embedder(folder, device="cpu").precision is Precision.FP32
    assert Embedder(folder, device="cpu", precision="int8").precision is Precision.INT8


def test_a_missing_variant_is_a_clear_error(exported):
    with pytest.raises(ModelFilesError, match=r"has no int8 variant \(it has fp32\).*--precision fp32 int8"):
        Embedder(exported["bert-cls"], device="cpu", precision="int8")
    with pytest.raises(ValueError, match="precision must be 'auto', 'fp32', 'int8' or 'fp16', got 'int4'"):
        Embedder(exported["bert-cls"], device="cpu", precision="int4")


def test_fp16_graph_keeps_int64_inputs_and_float32_output(model_copy):
    folder = model_copy("bert-cls")
    spec = precision.add_variant(folder, Precision.FP16)
    variant = spec.variants["fp16"]
    graph = onnx.load(str(folder / variant.file))
    assert {i.type.tensor_type.elem_type for i in graph.graph.input} == {onnx.TensorProto.INT64}
    assert [o.type.tensor_type.elem_type for o in graph.graph.output] == [onnx.TensorProto.FLOAT]
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.graph.initializer)
    assert set(variant.parity["fp32_ops"]) <= {node.op_type for node in graph.graph.node}  # only ops it has
    on_cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()  # the gate runs fp16 there
    assert variant.parity["passed"] and variant.parity["device"] == ("cuda" if on_cuda else "cpu")
    assert on_cuda or "not verified on a CUDA device" in variant.parity["note"]
    with pytest.warns(UserWarning, match="fp16' on CPU"):
        vectors = Embedder(folder, device="cpu", precision="fp16").encode(["fp16 on the CPU"])
    assert vectors.dtype == np.float32
    assert Embedder(folder, device="cpu").precision is Precision.FP32  # auto: fp16 is for CUDA


def test_reranker_int8_is_gated_on_its_scores(model_copy):
    folder = model_copy("bert-rerank")
    spec = precision.add_variant(folder, Precision.INT8, allow_below_gate=True)
    figures = spec.variants["int8"].parity
    assert set(figures["gate"]) == {"score_spearman"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the gate pairs include over-long ones on purpose
        fp32 = Reranker(folder, device="cpu", precision="fp32").compute_score(list(probes.GATE_PAIRS))
        int8 = Reranker(folder, device="cpu", precision="int8").compute_score(list(probes.GATE_PAIRS))
    assert figures["max_abs_diff"] == pytest.approx(float(np.abs(fp32 - int8).max()), abs=1e-6)
    assert not np.array_equal(fp32, int8)


def test_export_writes_the_variants_it_is_asked_for(checkpoints, tmp_path):
    out = tmp_path / "out"
    spec = export_model(checkpoints["bert-mean"], out, precisions=["int8", "fp16"], allow_below_gate=True, log=None)
    assert sorted(spec.variants) == ["fp16", "fp32", "int8"]
    assert sorted(p.name for p in out.glob("*.onnx")) == ["model.onnx", "model_fp16.onnx", "model_int8.onnx"]
    assert read_spec(out) == spec
    with pytest.raises(ExportError, match="precisions must be among 'fp32', 'int8', 'fp16', got \\['int4'\\]"):
        export_model(checkpoints["bert-mean"], tmp_path / "other", precisions=["int4"], log=None)


def test_int8_keeps_the_named_matmuls_in_fp32(exported, tmp_path):
    from bge_onnx_export import pertoken

    source = onnx.load(str(exported["bert-cls"] / "model.onnx"))
    pertoken.unfuse_attention(source)
    roles = pertoken.roles(source, pertoken.weight_matmuls(source))
    assert sorted({role.split(":")[0] for role in roles.values()}) == ["ffn_in", "ffn_out", "qkv", "square"]

    def float_matmuls(keep: frozenset[str]) -> set[str]:
        model = onnx.load(str(exported["bert-cls"] / "model.onnx"))
        made = pertoken.quantize(model, pertoken.Recipe(smooth=0, gptq=False, keep=keep))
        left = {roles[node.name] for node in model.graph.node if node.name in roles and node.op_type == "MatMul"}
        assert made["fp32_matmuls"] == len(left) and made["quantized_matmuls"] == len(roles) - len(left)
        return left

    assert float_matmuls(frozenset()) == set()
    assert float_matmuls(frozenset({"ffn_in", "ffn_out"})) == {r for r in roles.values() if r.startswith("ffn")}
    assert float_matmuls(frozenset({"ffn_out:1"})) == {"ffn_out:1"}
