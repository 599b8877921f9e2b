"""bge-m3 without torch: M3Embedder against FlagEmbedding's BGEM3FlagModel, run in the same test run in its own
environment (FlagEmbedding 1.4.2 needs transformers < 5), on a tiny seeded bge-m3 with random heads."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import shutil
import subprocess
import sys
import sysconfig
import warnings
from pathlib import Path

import numpy as np
import pytest

from bge_onnx import Embedder, M3Embedder
from bge_onnx.errors import ExportError, InputError, InputTypeError, ModelFilesError
from bge_onnx_export import export_model
from bge_onnx_export.probes import PROBE_TEXTS
from tiny_models import VARIED_TEXTS, build_m3

HERE = Path(__file__).parent
# FlagEmbedding's environment: beside this run's packages (torch among them), with its own transformers < 5
FLAG_REQUIREMENTS = ["FlagEmbedding==1.4.2", "transformers<5", "sentence-transformers<6", "datasets<4.5", "peft<0.18"]

SHORT_LIMIT = 64  # the server's --max-length in test_server_sparse_and_colbert
LONG = "The history of natural language processing started in the 1950s. " * 60  # past 512 tokens: truncated
TEXTS = [*VARIED_TEXTS, *PROBE_TEXTS[:20], LONG,
         "BM25 is a bag-of-words retrieval function; ColBERT is late interaction."]
PAIRS = [(TEXTS[i], TEXTS[j]) for i, j in [(3, 4), (4, 3), (5, 6), (0, 1), (1, 0), (9, 10), (11, 12), (30, 31),
                                           (31, 30), (2, 2), (13, 27)]]
WEIGHTS = [0.4, 0.2, 0.4]


def _flag_python() -> Path:
    """A venv (cached by its requirements) that sees this run's packages after its own, so that it reuses this run's
    torch and keeps its own transformers < 5."""
    key = hashlib.sha256(json.dumps([sys.version, sys.prefix, *FLAG_REQUIREMENTS]).encode()).hexdigest()[:12]
    root = Path(os.environ.get("BGE_ONNX_TEST_ENVS", Path.home() / ".cache" / "bge-onnx-tests"))
    venv = root / f"flagembedding-{key}"
    python = venv / "bin" / "python"
    if not python.is_file():
        building = root / f".building-{key}-{os.getpid()}"
        shutil.rmtree(building, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(building)], check=True)
        purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
        site = subprocess.run([str(building / "bin" / "python"), "-c", purelib], capture_output=True, text=True,
                              check=True).stdout.strip()
        # a .pth line appends this run's site-packages (even when it is itself a venv) after the new venv's own
        ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
        (Path(site) / "bge_onnx_test_parent.pth").write_text("\n".join(sorted(ours)) + "\n")
        import torch

        subprocess.run([str(building / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        f"torch=={torch.__version__.split('+')[0]}", *FLAG_REQUIREMENTS], check=True)
        building.rename(venv)
        for old in root.glob("flagembedding-*"):  # built for other requirements: one venv is kept, not one a change
            if old != venv:
                shutil.rmtree(old, ignore_errors=True)
    return python


@pytest.fixture(scope="module")
def m3(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("m3")
    checkpoint = build_m3(root / "bge-m3")
    export_model(checkpoint, root / "export", log=None)
    return {"checkpoint": checkpoint, "export": root / "export"}


@pytest.fixture(scope="module")
def flag(m3, tmp_path_factory) -> dict:
    """BGEM3FlagModel's outputs for TEXTS and PAIRS (tests/flag_reference.py in FlagEmbedding's environment)."""
    out = tmp_path_factory.mktemp("flag") / "reference.npz"
    request = json.dumps({"texts": TEXTS, "pairs": PAIRS, "weights": WEIGHTS, "configured": CONFIGURED})
    subprocess.run([str(_flag_python()), str(HERE / "flag_reference.py"), str(m3["checkpoint"]), str(out)],
                   input=request.encode(), check=True, capture_output=True)
    arrays = np.load(out)
    return {**json.loads(str(arrays["json"])), **{name: arrays[name] for name in arrays.files if name != "json"}}


@pytest.fixture(scope="module")
def ours(m3) -> tuple[M3Embedder, dict]:
    model = M3Embedder(m3["export"], device="cpu")
    with pytest.warns(UserWarning, match="2 of 36 sentences exceeded max_length=512"):
        return model, model.encode(TEXTS, return_sparse=True, return_colbert_vecs=True)


# BGEM3FlagModel's constructor arguments that change what encode_queries / encode_corpus do by default
CONFIGURED = {"query_instruction_for_retrieval": "Represent this query: ", "query_max_length": 8,
              "passage_max_length": 16, "return_sparse": True}


def test_flag_constructor_arguments(flag, m3):
    """M3Embedder takes BGEM3FlagModel's constructor arguments and does with them what it does (run in the same test
    run in FlagEmbedding's environment): the instruction and limits of queries and passages, what to return."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the limits cut most texts, on purpose
        model = M3Embedder(m3["export"], use_fp16=True, devices="cpu", **CONFIGURED)
        assert model.precision.value == "fp32"  # BGEM3FlagModel runs float32 on a CPU whatever use_fp16 says
        for kind, encode in (("queries", model.encode_queries), ("corpus", model.encode_corpus)):
            out = encode(TEXTS[:8])
            assert np.sum(out["dense_vecs"] * flag[f"configured_{kind}_dense"], axis=1).min() >= 0.99999
            assert out["colbert_vecs"] is None and flag[f"configured_{kind}_colbert"] is False
            for ours_, theirs in zip(out["lexical_weights"], flag[f"configured_{kind}_lexical"]):
                assert _clear(ours_).keys() == _clear(theirs).keys()
                assert max((abs(ours_.get(t, 0.0) - theirs.get(t, 0.0)) for t in theirs), default=0.0) <= 1e-5
    # what bge-onnx cannot do is refused by name, not ignored
    for keywords, message in (({"devices": ["cuda:0", "cuda:1"]}, r"runs on one device"),
                              ({"pooling_method": "mean"}, r"pooling_method='mean': bge-m3 pools the first token"),
                              ({"normalize_embeddings": False}, r"ColBERT vectors are L2-normalised in its graph"),
                              ({"colbert_dim": 7}, r"colbert_dim=7: the export's ColBERT head gives 32 dimensions"),
                              ({"query_max_length": 9000}, r"query_max_length=9000 exceeds what the model can take"),
                              ({"query_instruction_for_retrieval": "q", "query_instruction_format": "{}"},
                               r"must place both the instruction and the query"),
                              ({"truncate_dim": 16}, r"truncate_dim=16 is not supported"),
                              ({"max_length": 64, "passage_max_length": 32}, r"are the same option")):
        with pytest.raises(InputError, match=message):
            M3Embedder(m3["export"], **keywords)
    limited = M3Embedder(m3["export"], query_max_length=4, passage_max_length=6)  # compute_score's limits too
    with pytest.warns(UserWarning, match="exceeded max_length"):
        cut = M3Embedder(m3["export"]).compute_score(PAIRS[:3], max_query_length=4, max_passage_length=6)
    with pytest.warns(UserWarning, match="exceeded max_length"):
        by_default = limited.compute_score(PAIRS[:3])
    for mode in ("dense", "sparse", "colbert"):
        np.testing.assert_allclose(by_default[mode], cut[mode], atol=1e-6)
    with pytest.warns(UserWarning, match="ignores use_fp16=True: precision='fp32' was given"):
        assert M3Embedder(m3["export"], use_fp16=True, precision="fp32").precision.value == "fp32"
    with pytest.warns(UserWarning, match="ignores cache_dir='/somewhere': set HF_HUB_CACHE instead"):
        M3Embedder(m3["export"], cache_dir="/somewhere")
    with pytest.raises(InputTypeError, match=r"M3Embedder\(\) got an unexpected keyword argument 'use_fp61'"):
        M3Embedder(m3["export"], use_fp61=True)


def test_dense_vectors(flag, ours):
    dense = ours[1]["dense_vecs"]
    assert dense.dtype == np.float32 and dense.shape == flag["dense"].shape
    assert np.sum(dense * flag["dense"], axis=1).min() >= 0.99999


def _clear(weights: dict) -> dict:
    """Without the weights within rounding of 0, which float32 may put on either side of it (relu(x) for x ~ 1e-7)."""
    return {k: w for k, w in weights.items() if w > NEAR_ZERO}


NEAR_ZERO = 1e-5


def test_lexical_weights(flag, ours):
    positive, distinct, near_zero = 0, 0, 0
    for i, (expected, got) in enumerate(zip(flag["lexical_weights"], ours[1]["lexical_weights"])):
        assert list(_clear(got)) == list(_clear(expected)), f"text {i}: token ids or their order differ"
        np.testing.assert_allclose(list(_clear(got).values()), list(_clear(expected).values()), atol=1e-4,
                                   err_msg=f"text {i}")
        assert all(isinstance(w, float) and w > 0 for w in got.values())
        near_zero += len(set(got) ^ set(expected))
        positive += len(got)
    for encoding in ours[0]._tokenizer(None).encode_texts(TEXTS)[0]:
        distinct += len(set(encoding.ids) - {0, 1, 2, 3})
    assert 0.2 < positive / distinct < 0.8  # the head weighs some of each text's tokens, not all or none
    assert near_zero <= positive // 100  # keys only one side has: rare, and each within rounding of 0


def test_colbert_vectors(flag, ours):
    for i, got in enumerate(ours[1]["colbert_vecs"]):
        expected = flag[f"colbert_{i}"]
        assert got.dtype == np.float32 and got.shape == expected.shape, f"text {i}"
        assert np.sum(got * expected, axis=1).min() >= 0.99999, f"text {i}"


def test_scores_between_texts(flag, ours):
    model, out = ours
    lexical = model.compute_lexical_matching_score(out["lexical_weights"], out["lexical_weights"])
    np.testing.assert_allclose(lexical, flag["lexical_scores"], atol=1e-4)
    colbert = [[model.colbert_score(q, p) for p in out["colbert_vecs"]] for q in out["colbert_vecs"]]
    np.testing.assert_allclose(colbert, flag["colbert_scores"], atol=1e-5)
    assert model.compute_lexical_matching_score(out["lexical_weights"][3], out["lexical_weights"][3]) == \
        pytest.approx(flag["lexical_scores"][3][3], abs=1e-4)


def test_convert_id_to_token(flag, ours):
    model, out = ours
    assert model.convert_id_to_token(out["lexical_weights"])[0].keys() == flag["lexical_tokens"][0].keys()
    for i, (expected, got) in enumerate(zip(flag["lexical_tokens"], model.convert_id_to_token(out["lexical_weights"]))):
        got, expected = _clear(got), _clear(expected)
        assert got.keys() == expected.keys(), f"text {i}"
        np.testing.assert_allclose(list(got.values()), [expected[k] for k in got], atol=1e-4)


def test_compute_score(flag, ours, capsys):
    model = ours[0]
    with pytest.warns(UserWarning, match="truncated"):
        scores = model.compute_score(PAIRS)
        weighted = model.compute_score(PAIRS, weights_for_different_modes=WEIGHTS, show_progress=True)
    assert capsys.readouterr().err.count(f"embedded: {len(PAIRS)}/{len(PAIRS)}") == 2  # queries, then passages
    assert list(scores) == list(flag["scores"])
    for mode in ("dense", "sparse", "sparse+dense"):
        np.testing.assert_allclose(scores[mode], flag["scores"][mode], atol=1e-4, err_msg=mode)
        np.testing.assert_allclose(weighted[mode], flag["weighted_scores"][mode], atol=1e-4, err_msg=mode)
    # ColBERT: compute_score takes, per pair, what colbert_score gives for the two texts' vectors
    index = {text: i for i, text in enumerate(TEXTS)}
    expected = [flag["colbert_scores"][index[q]][index[p]] for q, p in PAIRS]
    np.testing.assert_allclose(scores["colbert"], expected, atol=1e-5)
    # BGEM3FlagModel.compute_score pads passages in its batch with zero vectors that count in the max: a query
    # token whose best real match is negative scores 0 there. Where that did not happen, the two agree.
    same = np.isclose(flag["scores"]["colbert"], expected, atol=1e-5)
    assert same.sum() >= len(PAIRS) // 2
    np.testing.assert_allclose(np.array(scores["colbert+sparse+dense"])[same],
                               np.array(flag["scores"]["colbert+sparse+dense"])[same], atol=1e-4)
    np.testing.assert_allclose(np.array(weighted["colbert+sparse+dense"])[same],
                               np.array(flag["weighted_scores"]["colbert+sparse+dense"])[same], atol=1e-4)
    one = model.compute_score(PAIRS[0])
    assert one["dense"] == pytest.approx(scores["dense"][0], abs=1e-6) and isinstance(one["colbert"], float)


def test_workers_give_the_same_three_outputs(m3, ours):
    """workers=2: the texts split over two processes (each an M3Embedder), the three outputs back in input order."""
    model = M3Embedder(m3["export"], device="cpu")
    try:
        with pytest.warns(UserWarning, match="exceeded max_length"):  # a worker's warning comes back here
            shared = model.encode(TEXTS, return_sparse=True, return_colbert_vecs=True, workers=2)
        with pytest.warns(UserWarning, match="exceeded max_length"):
            scores = model.compute_score(PAIRS, workers=2)
        with pytest.warns(UserWarning, match="exceeded max_length"):
            expected_scores = model.compute_score(PAIRS)
    finally:
        model.close()
    expected = ours[1]
    np.testing.assert_allclose(shared["dense_vecs"], expected["dense_vecs"], atol=1e-6)
    for got, want in zip(shared["lexical_weights"], expected["lexical_weights"]):
        assert _clear(got).keys() == _clear(want).keys()
        assert max((abs(got.get(t, 0.0) - w) for t, w in want.items()), default=0.0) <= 1e-5
    for got, want in zip(shared["colbert_vecs"], expected["colbert_vecs"], strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)
    for mode in expected_scores:
        np.testing.assert_allclose(scores[mode], expected_scores[mode], atol=1e-5)


def test_same_dense_as_embedder_and_one_text(m3, ours):
    model, out = ours
    np.testing.assert_allclose(Embedder(m3["export"], device="cpu", max_length=512).encode(TEXTS[:30]),
                               out["dense_vecs"][:30], atol=1e-6)
    single = model.encode(TEXTS[3], return_sparse=True, return_colbert_vecs=True)
    assert single["dense_vecs"].shape == (32,) and isinstance(single["lexical_weights"], dict)
    np.testing.assert_allclose(single["colbert_vecs"], out["colbert_vecs"][3], atol=1e-6)
    assert model.encode(TEXTS[:3]) == {"dense_vecs": pytest.approx(out["dense_vecs"][:3], abs=1e-6),
                                       "lexical_weights": None, "colbert_vecs": None}


def test_an_input_larger_than_a_tokenizing_chunk(ours):
    # tokenised 2048 texts at a time, as Embedder: every text keeps its own outputs, in the caller's order
    model, _ = ours
    texts = [TEXTS[i % len(TEXTS)] for i in range(2100)]
    with pytest.warns(UserWarning, match=r"exceeded max_length=512"):
        whole = model.encode(texts, return_sparse=True, return_colbert_vecs=True)
    with pytest.warns(UserWarning, match=r"exceeded max_length=512"):
        alone = model.encode(TEXTS, return_sparse=True, return_colbert_vecs=True)
    for i in (0, 5, 2047, 2048, 2099):
        j = i % len(TEXTS)
        np.testing.assert_allclose(whole["dense_vecs"][i], alone["dense_vecs"][j], atol=1e-6)
        assert whole["lexical_weights"][i].keys() == alone["lexical_weights"][j].keys()
        np.testing.assert_allclose(whole["colbert_vecs"][i], alone["colbert_vecs"][j], atol=1e-5)


def test_bad_input(ours, official):
    model = ours[0]
    empty = model.encode([], return_sparse=True, return_colbert_vecs=True)
    assert empty["dense_vecs"].shape == (0, 32) and empty["lexical_weights"] == [] and empty["colbert_vecs"] == []
    with pytest.raises(InputTypeError, match=r"sentences\[1\] is int 3, expected str"):
        model.encode(["a", 3])
    with pytest.raises(InputTypeError, match="return_sparse must be a bool, got str 'yes'"):
        model.encode(["a"], return_sparse="yes")
    with pytest.raises(InputError, match="max_length=9000 exceeds what the model can take"):
        model.encode(["a"], max_length=9000)
    with pytest.raises(InputError, match=r"weights_for_different_modes must be 3 numbers \[dense, sparse, colbert\]"):
        model.compute_score([("a", "b")], weights_for_different_modes=[1, 1])
    with pytest.raises(InputError, match=r"same width, got shapes \(2, 32\) and \(3, 16\)"):
        model.colbert_score(np.zeros((2, 32)), np.zeros((3, 16)))
    # the official repo's dense-only onnx/ gives dense vectors, and says what lexical and ColBERT need
    dense_only = M3Embedder(official["xlmr-cls"], device="cpu")
    assert dense_only.encode(["a text"])["dense_vecs"].shape == (1, 32)
    with pytest.raises(ModelFilesError, match="no lexical weights: it is a dense-only export .* colbert_linear.pt"):
        dense_only.encode(["a text"], return_sparse=True)


def test_export_heads_safely(m3, tmp_path):
    exported = {p.name for p in m3["export"].iterdir()}
    assert not any(name.endswith(".pt") for name in exported)  # the runtime never loads a pickle
    spec = json.loads((m3["export"] / "bge_onnx.json").read_text())
    assert spec["heads"]["skip_ids"] == [0, 1, 2, 3]  # (its outputs against FlagEmbedding's: the tests above)
    # a checkpoint with bge-m3's heads, under a name no registry knows and without sentence-transformers files,
    # pools CLS as BGEM3FlagModel always does (before: "cannot tell how it pools: pass --pooling")
    unknown = Path(shutil.copytree(m3["checkpoint"], tmp_path / "renamed" / "my-multilingual-retriever"))
    assert not (unknown / "modules.json").exists()
    export_model(unknown, tmp_path / "out-cls", log=None)
    assert json.loads((tmp_path / "out-cls" / "bge_onnx.json").read_text())["pooling"] == "cls"
    import onnx

    graph = onnx.load(str(m3["export"] / "model.onnx")).graph
    branches = [n for n in graph.node if n.op_type == "If"]  # unpadded batches: flash attention, no mask
    assert len(branches) == 2
    for branch in branches:
        then, other = (next(a.g for a in branch.attribute if a.name == name) for name in ("then_branch", "else_branch"))
        assert [n.op_type for n in then.node] == ["Split", "MultiHeadAttention"] and len(then.node[1].input) == 4
        assert len(other.node[1].input) == 5  # with the padding mask
    info = subprocess.run([sys.executable, "-m", "bge_onnx", "info", str(m3["export"])], capture_output=True,
                          text=True, check=True).stdout
    assert "bge-m3 outputs:    dense, lexical weights, ColBERT vectors (32 dims)" in info
    assert "lexical_max_abs_diff" in info

    def damaged(name: str, content: object) -> Path:
        folder = Path(shutil.copytree(m3["checkpoint"], tmp_path / name / "bge-m3"))
        if content is None:
            (folder / "sparse_linear.pt").unlink()
        else:
            (folder / "sparse_linear.pt").write_bytes(content if isinstance(content, bytes) else pickle.dumps(content))
        return folder

    with pytest.raises(ModelFilesError, match="has colbert_linear.pt but not sparse_linear.pt"):
        export_model(damaged("one-head", None), tmp_path / "out1", log=None)

    class RunsCode:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "ran"),))

    with pytest.raises(ExportError, match="sparse_linear.pt could not be read as a weights-only state dict"):
        export_model(damaged("code", RunsCode()), tmp_path / "out2", log=None)
    assert not (tmp_path / "ran").exists()
    import torch

    folder = damaged("shape", {})
    torch.save({"weight": torch.zeros(1, 16), "bias": torch.zeros(1)}, folder / "sparse_linear.pt")
    with pytest.raises(ExportError, match=r"holds weight \(1, 16\) .* hidden size is 32, so a weight \(1, 32\)"):
        export_model(folder, tmp_path / "out3", log=None)


def test_built_traced_and_torch_free_exports_agree(m3, ours, tmp_path):
    """bge-m3 built from its weights (the m3 fixture), traced with torch, and built in a process without torch (gated
    against the numpy forward pass): the same three outputs within 1e-5."""
    traced = tmp_path / "traced"
    export_model(m3["checkpoint"], traced, graph_from="torch", log=None)
    script = ("import sys; sys.modules['torch'] = sys.modules['transformers'] = None; "
              "from bge_onnx_export import export_model; export_model(sys.argv[1], sys.argv[2], log=None)")
    subprocess.run([sys.executable, "-c", script, str(m3["checkpoint"]), str(tmp_path / "free")], check=True,
                   timeout=300)
    free = json.loads((tmp_path / "free" / "bge_onnx.json").read_text())["variants"]["fp32"]["parity"]
    assert (free["graph_from"], free["reference"]) == ("weights", "numpy")  # its outputs: compared below
    built = ours[1]
    for folder in (traced, tmp_path / "free"):
        with pytest.warns(UserWarning, match="exceeded max_length"):
            other = M3Embedder(folder, device="cpu").encode(TEXTS, return_sparse=True, return_colbert_vecs=True)
        assert np.abs(other["dense_vecs"] - built["dense_vecs"]).max() <= 1e-5
        for a, b in zip(other["lexical_weights"], built["lexical_weights"]):
            assert max((abs(a.get(t, 0.0) - b.get(t, 0.0)) for t in {*a, *b}), default=0.0) <= 1e-5
        assert max(np.abs(a - b).max() for a, b in zip(other["colbert_vecs"], built["colbert_vecs"])) <= 1e-5


def test_int8_variant_gated_on_all_three_outputs(m3, tmp_path):
    """int8 for bge-m3: the gate also measures the lexical and ColBERT scores against fp32's (a random tiny model
    need not pass it, so the variant is kept below its gate and the figures are checked to be there)."""
    from bge_onnx_export.precision import add_variant
    from bge_onnx.spec import Precision, read_spec

    folder = Path(shutil.copytree(m3["export"], tmp_path / "m3"))
    add_variant(folder, Precision.INT8, allow_below_gate=True)
    figures = read_spec(folder).variants["int8"].parity
    assert {"min_cosine", "lexical_spearman", "colbert_spearman"} <= set(figures["gate"]) <= set(figures)
    assert_gate_figures(folder, "int8", figures)
    model = M3Embedder(folder, device="cpu", precision="int8")
    out = model.encode(TEXTS[:6], return_sparse=True, return_colbert_vecs=True)
    fp32 = M3Embedder(folder, device="cpu", precision="fp32").encode(TEXTS[:6], return_sparse=True,
                                                                       return_colbert_vecs=True)
    assert [c.shape for c in out["colbert_vecs"]] == [c.shape for c in fp32["colbert_vecs"]]
    assert np.sum(out["dense_vecs"] * fp32["dense_vecs"], axis=1).min() > 0.9
    # per-token int8: each of the three outputs of a text alone equals the text's in a shuffled, padded batch
    assert figures["activations"] == "per-token"
    texts = TEXTS * 3
    random.Random(0).shuffle(texts)
    batch = model.encode(texts, batch_size=len(texts), return_sparse=True, return_colbert_vecs=True)
    for i in range(0, len(texts), 5):
        alone = model.encode([texts[i]], return_sparse=True, return_colbert_vecs=True)
        np.testing.assert_allclose(alone["dense_vecs"][0], batch["dense_vecs"][i], atol=1e-6)
        np.testing.assert_allclose(alone["colbert_vecs"][0], batch["colbert_vecs"][i], atol=1e-6)
        assert alone["lexical_weights"][0].keys() == batch["lexical_weights"][i].keys()
        np.testing.assert_allclose(list(alone["lexical_weights"][0].values()),
                                   list(batch["lexical_weights"][i].values()), atol=1e-6)
    add_variant(folder, Precision.FP16)  # the converter keeps the flash-attention branches working (here on CPU)
    figures = read_spec(folder).variants["fp16"].parity
    assert figures["passed"] and assert_gate_figures(folder, "fp16", figures) > 0.999


def assert_gate_figures(folder: Path, precision: str, figures: dict) -> float:
    """The manifest's lexical and ColBERT figures are what the variant gives against fp32 on the gate texts,
    recomputed here with scipy: Spearman over every pair of distinct texts. Returns the lower of the two."""
    from scipy.stats import spearmanr

    from bge_onnx_export import probes

    scores = {}
    for name in ("fp32", precision):
        model = M3Embedder(folder, device="cpu", precision=name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the gate texts include over-long ones on purpose
            out = model.encode(list(probes.GATE_TEXTS), return_sparse=True, return_colbert_vecs=True)
        lexical = model.compute_lexical_matching_score(out["lexical_weights"], out["lexical_weights"])
        colbert = np.array([[model.colbert_score(q, p) for p in out["colbert_vecs"]] for q in out["colbert_vecs"]])
        scores[name] = (lexical, colbert)
    off = ~np.eye(len(probes.GATE_TEXTS), dtype=bool)
    recomputed = [spearmanr(np.asarray(scores["fp32"][k])[off], np.asarray(scores[precision][k])[off]).statistic
                  for k in (0, 1)]
    assert figures["lexical_spearman"] == pytest.approx(recomputed[0], abs=1e-6)
    assert figures["colbert_spearman"] == pytest.approx(recomputed[1], abs=1e-6)
    return min(recomputed)


def test_server_sparse_and_colbert(m3, tmp_path):
    """bge-onnx serve on a bge-m3 folder: TEI's /embed_sparse and /embed_colbert answer what M3Embedder gives, and
    /embed the same dense vectors, from one loaded model."""
    from test_serve import Server, call

    server = Server(str(m3["export"]), "--precision", "fp32", "--max-length", str(SHORT_LIMIT), log=tmp_path / "log")
    try:
        texts = TEXTS[1:9]
        model = M3Embedder(m3["export"], device="cpu", precision="fp32", max_length=SHORT_LIMIT)
        expected = model.encode(texts, return_sparse=True, return_colbert_vecs=True)
        status, sparse, _ = call(server.base, "POST", "/embed_sparse", {"inputs": texts})
        assert status == 200 and len(sparse) == len(texts)
        for got, weights in zip(sparse, expected["lexical_weights"]):
            assert [entry["index"] for entry in got] == sorted(int(i) for i in weights)
            np.testing.assert_allclose([entry["value"] for entry in got],
                                       [weights[str(entry["index"])] for entry in got], atol=1e-6)
        status, colbert, _ = call(server.base, "POST", "/embed_colbert", {"inputs": texts[0]})
        assert status == 200
        np.testing.assert_allclose(np.array(colbert[0]), expected["colbert_vecs"][0], atol=1e-6)
        status, dense, _ = call(server.base, "POST", "/embed", {"inputs": texts})
        np.testing.assert_allclose(np.array(dense), expected["dense_vecs"], atol=1e-6)
        status, body, _ = call(server.base, "POST", "/embed_sparse", {"inputs": [LONG]})
        assert status == 422 and f"the model's limit is {SHORT_LIMIT}" in body["error"]
        status, body, _ = call(server.base, "POST", "/embed_sparse", {"inputs": [LONG], "truncate": True})
        assert status == 200 and body[0]
    finally:
        server.stop()
