"""`bge-onnx push`, for real: the CLI in a subprocess against the stand-in hub's write API, then loads by name."""

from __future__ import annotations

import json
import re
import shlex
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import yaml
from hubserver import Hub, hub_env

from bge_onnx.hub import looks_like_repo_id
from bge_onnx.card import _NOT_FIGURES, model_card
from bge_onnx.push import push
from bge_onnx.spec import MANIFEST, read_spec, sha256_file

TOKEN = "hf_test_write_token"
TEXTS = ["pushed text", "another one"]
PASSAGES = ["a passage about cats", "one about the stock market"]


@pytest.fixture()
def hub():
    server = Hub({}, token=TOKEN, read_only=("someone-else",))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def _endpoint(server: Hub) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


def _env(endpoint: str, home: Path, token: str | None = TOKEN) -> dict[str, str]:
    env = hub_env(endpoint, home)  # HF_HOME in tmp: no token saved by `hf auth login` on this machine is seen
    if token is not None:
        env["HF_TOKEN"] = token
    return env


def _push(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "bge_onnx", "push", *args]
    return subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=300)


_LOAD = """
import json, sys, numpy as np, bge_onnx
kind, model, out, options = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
try:
    if kind == "embed":
        result = bge_onnx.Embedder(model, device="cpu", **options).encode(json.loads(sys.argv[5]))
    else:
        result = bge_onnx.Reranker(model, device="cpu", **options).compute_score(json.loads(sys.argv[5]))
except bge_onnx.BgeOnnxError as err:
    print(type(err).__name__ + ": " + str(err)); sys.exit(1)
np.save(out, result)
"""


def _load(kind: str, model: str, out: Path, env: dict[str, str], inputs: list, **options):
    args = [sys.executable, "-c", _LOAD, kind, model, str(out), json.dumps(options), json.dumps(inputs)]
    return subprocess.run(args, check=False, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("kind", ["bert-cls", "bert-rerank"])
def test_push_then_load_by_name_gives_the_local_outputs(kind, hub, model_copy, tmp_path):
    from bge_onnx import Embedder, Reranker

    folder = model_copy(kind)
    # what lies in a folder beside the export is not published
    (folder / ".cache").mkdir()
    (folder / ".cache" / "stray.bin").write_bytes(b"not part of the model")
    (folder / "notes.txt").write_text("private notes")
    (folder / "README.md").write_text("the user's own readme, not the card")
    endpoint = _endpoint(hub)

    result = _push(str(folder), "acme/pushed", env=_env(endpoint, tmp_path / "hf"))
    assert result.returncode == 0, result.stderr
    commit, tree = hub.tree("acme/pushed")
    assert result.stdout.strip() == f"{endpoint}/acme/pushed/commit/{commit}"
    assert (folder / "README.md").read_text() == "the user's own readme, not the card"  # the card went only up

    spec = read_spec(folder)
    uploaded = {p.relative_to(tree).as_posix() for p in tree.rglob("*") if p.is_file()}
    assert uploaded == {*spec.files, MANIFEST, "tokenizer.json", "README.md"}
    assert {v.file for v in spec.variants.values()} <= uploaded
    for name in spec.files:
        assert sha256_file(tree / name) == spec.files[name], name
    assert (tree / MANIFEST).read_bytes() == (folder / MANIFEST).read_bytes()
    assert (tree / "README.md").read_text(encoding="utf-8") == model_card(spec, "acme/pushed")
    assert [p["repo"] for p in hub.pushes] == ["acme/pushed"] and hub.pushes[0]["branch"] == "main"

    # a load by name from the same hub, in a fresh process (no token needed: the repo is public)
    if spec.task.value == "embed":
        inputs, expected = TEXTS, Embedder(folder, device="cpu").encode(TEXTS)
    else:
        inputs = [[TEXTS[0], p] for p in PASSAGES]
        expected = Reranker(folder, device="cpu").compute_score([tuple(pair) for pair in inputs])
    loaded = _load(spec.task.value, "acme/pushed", tmp_path / "out.npy", _env(endpoint, tmp_path / "hf2", None), inputs)
    assert loaded.returncode == 0, loaded.stdout + loaded.stderr
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, atol=1e-6)


def test_private_push_to_a_branch(hub, exported, tmp_path):
    from bge_onnx import Embedder

    endpoint = _endpoint(hub)
    result = _push(str(exported["bert-cls"]), "acme/private-bge", "--private", "--revision", "v1", "--message",
                   "first upload", env=_env(endpoint, tmp_path / "hf"))
    assert result.returncode == 0, result.stderr
    assert "acme/private-bge" in hub.private
    assert [(p["branch"], p["summary"]) for p in hub.pushes] == [("v1", "first upload")]
    assert not any(hub.tree("acme/private-bge", "main")[1].iterdir())  # the branch only: main stays as created
    card = (hub.tree("acme/private-bge", "v1")[1] / "README.md").read_text(encoding="utf-8")
    assert 'Embedder("acme/private-bge", revision="v1")' in card
    assert "bge-onnx pull acme/private-bge --revision v1" in card

    out = tmp_path / "v.npy"
    denied = _load("embed", "acme/private-bge", out, _env(endpoint, tmp_path / "hf2", None), TEXTS, revision="v1")
    assert denied.returncode == 1 and "does not exist, or is private" in denied.stdout, denied.stdout + denied.stderr
    loaded = _load("embed", "acme/private-bge", out, _env(endpoint, tmp_path / "hf2"), TEXTS, revision="v1")
    assert loaded.returncode == 0, loaded.stdout + loaded.stderr
    np.testing.assert_allclose(np.load(out), Embedder(exported["bert-cls"], device="cpu").encode(TEXTS), atol=1e-6)


def test_a_corrupt_or_foreign_folder_is_refused_before_any_request(hub, model_copy, checkpoints, tmp_path):
    env = _env(_endpoint(hub), tmp_path / "hf")
    folder = model_copy("bert-cls")
    graph = folder / read_spec(folder).variants["fp32"].file
    original = graph.read_bytes()
    data = bytearray(original)
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    result = _push(str(folder), "acme/corrupt", env=env)
    assert result.returncode == 1, result.stdout
    assert f"{graph} does not match the sha256 in bge_onnx.json" in result.stderr
    assert "Traceback" not in result.stderr

    graph.write_bytes(original)
    (folder / "tokenizer.json").unlink()
    result = _push(str(folder), "acme/corrupt", env=env)
    assert result.returncode == 1 and f"{folder / 'tokenizer.json'} is missing" in result.stderr

    result = _push(str(checkpoints["bert-cls"]), "acme/raw", env=env)
    assert result.returncode == 1
    assert "is not a bge-onnx model folder. Create one with `bge-onnx export SRC --out DIR`" in result.stderr

    result = _push(str(tmp_path / "nowhere"), "acme/raw", env=env)
    assert result.returncode == 1 and "does not exist or is not a folder" in result.stderr
    assert hub.requests == []


def test_a_manifest_naming_files_outside_the_folder_is_refused(model_copy):
    folder = model_copy("bert-cls")
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["files"]["../outside.txt"] = "0" * 64
    (folder / MANIFEST).write_text(json.dumps(manifest))
    from bge_onnx import ModelIntegrityError

    # refused before huggingface_hub is even asked (no HF_ENDPOINT here: nothing may go out)
    with pytest.raises(ModelIntegrityError, match=r"lists '\.\./outside\.txt', which is not a file inside the folder"):
        push(folder, "acme/escape", token="unused")


def test_no_token_a_refused_token_and_no_write_access_name_the_fix(hub, exported, tmp_path):
    endpoint, folder = _endpoint(hub), str(exported["bert-cls"])
    result = _push(folder, "acme/tiny", env=_env(endpoint, tmp_path / "hf", token=None))
    assert result.returncode == 1, result.stdout
    assert "cannot push to 'acme/tiny': no hub token was found (401). Set HF_TOKEN" in result.stderr
    assert "`hf auth login`" in result.stderr and "Traceback" not in result.stderr

    result = _push(folder, "acme/tiny", env=_env(endpoint, tmp_path / "hf", token="hf_expired"))
    assert result.returncode == 1
    assert "cannot push to 'acme/tiny': the hub refused the token (401). Set HF_TOKEN" in result.stderr

    result = _push(folder, "someone-else/tiny", env=_env(endpoint, tmp_path / "hf"))
    assert result.returncode == 1
    assert "cannot push to 'someone-else/tiny': the token has no write access to it (403)" in result.stderr
    assert hub.pushes == [] and "acme/tiny" not in hub.refs


def test_an_unreachable_hub_and_a_bad_repo_id(exported, tmp_path):
    with socket.socket() as probe:  # a port with nothing listening: the connection is refused at once
        probe.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{probe.getsockname()[1]}"
    result = _push(str(exported["bert-cls"]), "acme/tiny", env=_env(endpoint, tmp_path / "hf"))
    assert result.returncode == 1, result.stdout
    assert f"cannot push to 'acme/tiny': the hub at {endpoint} cannot be reached" in result.stderr
    assert "HF_ENDPOINT" in result.stderr and "Traceback" not in result.stderr

    result = _push(str(exported["bert-cls"]), "no-owner", env=_env(endpoint, tmp_path / "hf"))
    assert result.returncode == 1 and "repo_id must be a hub repo id 'owner/name', got 'no-owner'" in result.stderr


def test_push_help():
    command = [sys.executable, "-m", "bge_onnx", "push", "--help"]
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for option in ("DIR", "REPO_ID", "--revision", "--private", "--message"):
        assert option in result.stdout


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    front, _, _ = card[4:].partition("\n---\n")
    return yaml.safe_load(front)


def _row(card: str, variant: str) -> str:
    rows = [line for line in card.splitlines() if line.startswith(f"| {variant} | ")]
    assert len(rows) == 1, rows
    return rows[0]


def _number_after(text: str, label: str) -> float:
    match = re.search(r"(?<!\w)" + re.escape(label) + r" ([-+0-9.e]+)", text)
    assert match, (label, text)
    return float(match.group(1))


def _export_command(card: str) -> list[str]:
    made = card.split("## How it was made", 1)[1]
    return shlex.split(made.split("```bash\n", 1)[1].split("\n```", 1)[0])


def test_the_card_holds_the_manifest_figures(model_copy, exported):
    from bge_onnx_export import precision

    from bge_onnx import Precision

    folder = model_copy("bert-cls")
    precision.add_variant(folder, Precision.INT8, gate={"min_cosine": 0.0})  # a gate this tiny model passes
    for spec in (read_spec(folder), read_spec(exported["bert-rerank"])):
        card = model_card(spec, "acme/card")
        meta = _front_matter(card)
        embed = spec.task.value == "embed"
        assert meta["library_name"] == "bge-onnx" and "onnx" in meta["tags"]
        assert meta["pipeline_tag"] == ("feature-extraction" if embed else "text-classification")
        assert ("sentence-embeddings" if embed else "reranker") in meta["tags"]
        if looks_like_repo_id(spec.source["id"]):  # a hub id, not a local path
            assert meta["base_model"] == spec.source["id"]
        else:
            assert "base_model" not in meta
        assert "license" not in meta  # the manifest records none

        assert f"| Max length | {spec.max_length} tokens" in card
        if embed:
            assert f"| Dimension | {spec.dim} |" in card and f"| Pooling | {spec.pooling.value}," in card
            assert f"| Query instruction | `{spec.query_instruction}` |" in card

        for name, variant in spec.variants.items():
            row, parity = _row(card, name), variant.parity
            assert f"`{variant.file}`" in row
            figures = {k: v for k, v in parity.items() if k not in _NOT_FIGURES}
            assert figures, parity
            for key, value in figures.items():
                if isinstance(value, bool):
                    assert f"{key} {'yes' if value else 'no'}" in row
                else:
                    assert _number_after(row, key) == pytest.approx(value, rel=1e-6, abs=1e-12), key
            for key, limit in (parity.get("gate") or {}).items():
                assert _number_after(row, f"{key} ≥") == pytest.approx(limit), key
            if name != "fp32":
                assert f" | {'yes' if parity['passed'] else '**no**'}" in row and parity["recipe"] in row
                assert "rows_in_place" not in row  # how the graph is laid out, not a measurement
        for op, count in spec.variants["fp32"].parity["fused_ops"].items():
            assert f"{op} ×{count}" in card
        for package, version in spec.versions.items():
            assert f"{package} {version}" in card

        usage = f'{"Embedder" if embed else "Reranker"}("acme/card")'
        assert usage in card and "bge-onnx pull acme/card" in card

        command = _export_command(card)
        assert command[:3] == ["bge-onnx", "export", spec.source["id"]]
        precisions = command[command.index("--precision") + 1:]
        assert precisions[:len(spec.variants)] == list(spec.variants)
        assert command[command.index("--max-length") + 1] == str(spec.max_length)


def test_the_rebuilt_export_command_makes_the_same_model(exported, checkpoints, tmp_path):
    spec = read_spec(exported["bert-mean"])  # mean pooling and an instruction, both of which the command must carry
    command = _export_command(model_card(spec, "acme/st-bert-mean"))
    command[2] = str(checkpoints["bert-mean"])  # recorded as a local folder: the card says to give it as the source
    command[command.index("--out") + 1] = str(tmp_path / "again")
    result = subprocess.run([sys.executable, "-m", "bge_onnx", *command[1:], "--quiet"], check=False,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    again = read_spec(tmp_path / "again")
    for field in ("task", "architecture", "dim", "max_length", "pooling", "normalize", "query_instruction", "inputs"):
        assert getattr(again, field) == getattr(spec, field), field
    assert list(again.variants) == list(spec.variants)
