"""What every benchmark shares: interleaved rounds and medians, the machine record, the data folder, results files.

This host's speed drifts by several times from minute to minute, so a benchmark never reports a lone timing:
contestants run in turns (A B C ... A B C), each figure is a median over rounds, and what counts is the ratio
between contestants of one run. Every results file says which command wrote it, on which CPU (model and the
instruction-set flags that change onnxruntime's kernels), with which packages and which graphs.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TRYOUTS = ROOT / "benchmarks" / "out"  # try-out runs (e.g. a GPU benchmark on the CPU); not committed
# The CPU flags that select different onnxruntime / BLAS kernels (x86 and Arm).
KERNEL_FLAGS = (
    "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx_vnni",
    "amx_tile", "amx_int8", "amx_bf16", "asimd", "asimddp", "i8mm", "sve", "bf16",
)
OPENBLAS_ENV = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
PACKAGES = ("bge-onnx", "onnxruntime", "onnxruntime-gpu", "numpy", "tokenizers", "torch", "transformers",
            "sentence-transformers")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def data_dir() -> Path:
    """The evaluation data (STS-B test, SciFact, published MTEB scores): $BGE_ONNX_DATA, else ../shared/data."""
    folder = Path(os.environ.get("BGE_ONNX_DATA") or ROOT.parent / "shared" / "data")
    if not (folder / "stsb").is_dir() or not (folder / "scifact").is_dir():
        raise SystemExit(
            f"benchmarks: no evaluation data at {folder}. Set BGE_ONNX_DATA to a folder holding stsb/sts-test.jsonl "
            "(STS Benchmark test, from HF datasets mteb/stsbenchmark-sts), scifact/corpus.jsonl.gz, "
            "scifact/queries.jsonl and scifact/qrels/test.tsv (BEIR SciFact, mteb/scifact) and "
            "reference_scores/reference_scores.tsv; see benchmarks/README.md."
        )
    return folder


def cpu() -> dict[str, Any]:
    """CPU model, the kernel-relevant flags it reports, and the CPUs this process may use."""
    from bge_onnx.session import usable_cpus

    model, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "Model name", "CPU part") and model in ("unknown", "", platform.machine()):
                model = value.strip()
            elif key in ("flags", "Features"):
                flags |= set(value.split())
    except OSError:
        pass
    return {
        "machine": platform.machine(),
        "model": model,
        "flags": [f for f in KERNEL_FLAGS if f in flags],
        "usable_cpus": usable_cpus(),
    }


def versions(extra: Sequence[str] = ()) -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in (*PACKAGES, *extra):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def model_record(folder: Path) -> dict[str, Any]:
    """Which exported graphs a figure was measured on: the manifest's sha256 and each variant's graph hash."""
    manifest = Path(folder) / "bge_onnx.json"
    spec = json.loads(manifest.read_text(encoding="utf-8"))
    return {
        "manifest_sha256": hashlib.sha256(manifest.read_bytes()).hexdigest()[:16],
        "format_version": spec.get("format_version"),
        "source": spec.get("source", {}).get("id"),
        "graphs": {name: spec["files"].get(v["file"], "")[:16] for name, v in spec["variants"].items()},
        "last_layer_first_token_only": spec["variants"]["fp32"].get("parity", {}).get("last_layer_first_token_only"),
    }


def interleave(
    contestants: Mapping[str, Callable[[], float | None]], *, rounds: int, warm: bool = True
) -> dict[str, list[float]]:
    """Seconds per contestant per round, taken in turns (A B C ... A B C).

    A contestant is a callable that does its work once; it returns its own seconds (a worker in another process
    timing itself) or None (then the call is timed here). With ``warm``, each runs once first, untimed.
    """
    if warm:
        for run in contestants.values():
            run()
    seconds: dict[str, list[float]] = {name: [] for name in contestants}
    for _ in range(rounds):
        for name, run in contestants.items():
            start = time.perf_counter()
            own = run()
            seconds[name].append(own if own is not None else time.perf_counter() - start)
    return seconds


def medians(seconds: Mapping[str, Sequence[float]]) -> dict[str, float]:
    return {name: statistics.median(values) for name, values in seconds.items()}


_GEMM = """
import json, sys, time
import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits
m, k, n, threads = map(int, sys.argv[1:5])
rng = np.random.default_rng(0)
a, b = rng.standard_normal((m, k), dtype=np.float32), rng.standard_normal((k, n), dtype=np.float32)
with threadpool_limits(threads):
    a @ b
    rates = []
    for line in sys.stdin:
        start = time.perf_counter()
        for _ in range(10):
            a @ b
        print(10 * 2 * m * k * n / (time.perf_counter() - start), flush=True)
"""


class Gemm:
    """numpy float32 GEMM of a transformer FFN's shape in its own process, with OPENBLAS_CORETYPE and
    OPENBLAS_L2_SIZE unset there (these machines set them, and they halve OpenBLAS's rate): the hardware's
    rate for the roofline ratio. ``rate()`` measures once more (call it in the rounds, beside the contestants)."""

    def __init__(self, *, threads: int, shape: tuple[int, int, int] = (2048, 384, 1536)) -> None:
        env = {k: v for k, v in os.environ.items() if k not in OPENBLAS_ENV}
        self.shape = shape
        self.process = subprocess.Popen(
            [sys.executable, "-c", _GEMM, *map(str, shape), str(threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
        )
        info = subprocess.run(
            [sys.executable, "-c", "import json, numpy; from threadpoolctl import threadpool_info; "
             "print(json.dumps([{k: i.get(k) for k in ('internal_api', 'version', 'architecture')} "
             "for i in threadpool_info()]))"],
            capture_output=True, text=True, env=env, check=True,
        )
        self.kernel = json.loads(info.stdout)

    def rate(self) -> float:
        self.process.stdin.write("go\n")
        self.process.stdin.flush()
        return float(self.process.stdout.readline())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


class Report:
    """A results file pair, benchmarks/results/STEM.md and STEM.json (STEM: the benchmark's name unless given),
    written by the benchmark that measured it.

    The markdown opens with the exact command and the machine record; the JSON holds the same record and the
    figures (``data``).
    """

    def __init__(
        self, benchmark: str, title: str, argv: Sequence[str], *, models: Mapping[str, Path] = {}, stem: str = ""
    ) -> None:
        self.stem = stem or benchmark
        self.command = "python -m benchmarks " + shlex.join([benchmark, *argv])
        self.record = {
            "benchmark": benchmark,
            "command": self.command,
            "date": time.strftime("%Y-%m-%d"),
            "cpu": cpu(),
            "versions": versions(),
            "openblas_env": {k: os.environ.get(k) for k in OPENBLAS_ENV},
            "models": {label: model_record(folder) for label, folder in models.items()},
        }
        c = self.record["cpu"]
        self.lines = [
            f"# {title}",
            "",
            f"Command: `{self.command}`  ",
            f"Date: {self.record['date']}. CPU: {c['machine']} {c['model']}, {c['usable_cpus']} usable CPUs, "
            f"flags {' '.join(c['flags']) or 'none of note'}.  ",
            "Packages: " + ", ".join(f"{k} {v}" for k, v in self.record["versions"].items()) + ".  ",
        ]
        for label, record in self.record["models"].items():
            graphs = ", ".join(f"{k} {v}" for k, v in record["graphs"].items())
            self.lines.append(f"Model {label}: {record['source']}, manifest sha256 {record['manifest_sha256']}, "
                              f"format_version {record['format_version']}, graphs {graphs}.  ")
        self.lines.append("")
        self.data: dict[str, Any] = {}

    def text(self, *lines: str) -> None:
        self.lines.extend(lines)
        self.lines.append("")

    def table(self, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        self.lines.append("| " + " | ".join(header) + " |")
        self.lines.append("|" + "---|" * len(header))
        self.lines.extend("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows)
        self.lines.append("")

    def write(self, folder: Path = RESULTS) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{self.stem}.md"
        path.write_text("\n".join(self.lines).rstrip() + "\n", encoding="utf-8")
        (folder / f"{self.stem}.json").write_text(
            json.dumps({**self.record, "data": self.data}, indent=1, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        log(f"wrote {path} and {path.with_suffix('.json').name}")
        return path
