"""The README's main command (install, then embed one line with the default model) in a fresh venv: the time of each
step, the venv's size, whether torch came with it, and what it printed; with --before REV, the same for the README
of another revision (its own command, in its own checkout), for a before/after.

Each command is split at its `&&`s and run step by step in the checkout (a copy of this one, or `git archive` of REV),
with the fresh venv first on PATH and an empty BGE_ONNX_CACHE (so the first `bge-onnx embed` exports the default
model); the embed step is then run once more (the model cached). pip's own download cache is the machine's, warm
for both: the install times are pip resolving, unpacking and installing, not downloading.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from .harness import ROOT, Report, log

PROBE = """
import importlib.util, json
print(json.dumps({name: importlib.util.find_spec(name) is not None
                  for name in ("torch", "transformers", "sentence_transformers", "onnx", "onnxruntime")}))
"""


def main_command(readme: Path) -> str:
    """The first command of the README's Set up section."""
    text = readme.read_text(encoding="utf-8")
    section = text[text.index("## Set up"):]
    match = re.search(r"```\n(.+?)\n```", section, re.DOTALL)
    if not match:
        raise SystemExit(f"benchmarks: no command block in {readme}'s Set up section")
    return match.group(1).strip()


def checkout_of(revision: str | None, dest: Path) -> Path:
    """This checkout's files (tracked and untracked, not ignored), or REV's tree from git archive."""
    dest.mkdir(parents=True)
    if revision is None:
        files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                               check=True).stdout.decode().split("\0")
        for name in filter(None, files):
            if (ROOT / name).is_file():
                (dest / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / name, dest / name)
        return dest
    archive = subprocess.run(["git", "archive", "--format=tar", revision], cwd=ROOT, capture_output=True, check=True)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def tree_mb(folder: Path) -> float:
    return sum(p.lstat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink()) / 1e6


def run_command(label: str, checkout: Path, work: Path) -> dict:
    command = main_command(checkout / "README.md")
    venv = work / f"venv-{label}"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {**os.environ, "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}", "VIRTUAL_ENV": str(venv),
           "BGE_ONNX_CACHE": str(work / f"cache-{label}"), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PYTHONPATH", None)
    steps = []
    parts = [part.strip() for part in command.split("&&")]
    for part in parts + [parts[-1]]:  # the embed step twice: exporting the default model, then cached
        log(f"{label}: {part}")
        start = time.perf_counter()
        result = subprocess.run(["bash", "-c", part], cwd=checkout, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if result.returncode != 0:
            raise SystemExit(f"benchmarks: `{part}` failed ({result.returncode}):\n{result.stderr[-3000:]}")
        steps.append({"step": part, "seconds": seconds, "stdout": result.stdout})
    present = json.loads(subprocess.run([str(venv / "bin" / "python"), "-c", PROBE], capture_output=True, text=True,
                                        check=True).stdout)
    vector = json.loads(steps[-1]["stdout"].strip().splitlines()[-1])
    vector = vector.get("embedding", vector) if isinstance(vector, dict) else vector
    return {"command": command, "steps": steps, "venv_mb": tree_mb(venv), "present": present,
            "dims": len(vector), "printed": steps[-1]["stdout"].strip()[:100]}


def main(argv: list[str], *, name: str = "main-command") -> None:
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks {name}", description=__doc__.splitlines()[0])
    parser.add_argument("--before", metavar="REV", help="also run the README's main command of this git revision")
    args = parser.parse_args(argv)
    report = Report(name, "The README's main command in a fresh venv", argv)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        runs = {"this tree": None, **({f"before ({args.before})": args.before} if args.before else {})}
        for label, revision in runs.items():
            checkout = checkout_of(revision, tmp / f"checkout-{len(results)}")
            results[label] = run_command(f"{len(results)}", checkout, tmp)
    rows = []
    for label, result in results.items():
        steps = result["steps"]
        install = sum(s["seconds"] for s in steps[:-2])
        present = result["present"]
        command = "`" + result["command"].replace("|", "\\|") + "`"  # a pipe inside a table cell is escaped
        rows.append([label, command, f"{install:.0f} s", f"{steps[-2]['seconds']:.1f} s",
                     f"{steps[-1]['seconds']:.1f} s", f"{result['venv_mb']:.0f} MB",
                     "yes" if present["torch"] else "no", "yes" if present["transformers"] else "no",
                     f"{result['dims']} numbers"])
    report.text("Each command runs in a fresh venv in its own checkout, step by step; pip's download cache is warm "
                "for both (the torch wheel is a local CPU build), so the install times are resolving and installing. "
                "First embed: the default model exported into an empty cache, then the line embedded; second: cached.")
    report.table(["README of", "main command", "install", "first embed", "second embed", "venv size", "torch",
                  "transformers", "printed"], rows)
    report.data = {label: {k: v for k, v in result.items()} for label, result in results.items()}
    report.write()
