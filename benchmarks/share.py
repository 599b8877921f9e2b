"""Weights shared between processes: the memory of 1, 2 and 4 processes holding one model, per folder layout.

Each process loads the model (Embedder, 1 thread, as a worker or a Ray actor does), encodes a warm-up batch, and
reports its PSS (proportional set size: a page shared by k processes counts 1/k in each) and RSS from
/proc/self/smaps_rollup, all processes alive at once. 'Extra process' is (PSS of N processes - PSS of 1) / (N - 1):
what each process beyond the first costs; the goal (issue 23) is at most 20% of the first's on bge-m3's shape.
Layouts: the weights inside the .onnx file (parsed into each process's own memory), the weights in a side file that
onnxruntime maps from disk with its prepacking on (the default), and the same with $BGE_ONNX_SHARE_WEIGHTS=1
(prepacking off: the kernels read the mapped pages). Their speed is in benchmarks/results/workers.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from .harness import TRYOUTS, Report, log

CHILD = r"""
import json, sys, warnings
warnings.simplefilter("ignore")
import bge_onnx
model = bge_onnx.Embedder(sys.argv[1], device="cpu", precision=sys.argv[2], threads=1)
model.encode([("word " * n).strip() for n in (8, 60, 200, 500)] * 4)
print("ready", flush=True)
sys.stdin.readline()
fields = {}
for line in open("/proc/self/smaps_rollup"):
    parts = line.split()
    if len(parts) == 3 and parts[2] == "kB":
        fields[parts[0].rstrip(":")] = int(parts[1]) / 1024
print(json.dumps({"pss": fields["Pss"], "rss": fields["Rss"], "anonymous": fields.get("Anonymous", 0.0)}), flush=True)
sys.stdin.readline()
"""


def measure(folder: Path, precision: str, processes: int, share: bool) -> list[dict[str, float]]:
    """PSS, RSS and anonymous MB of each of ``processes`` processes holding ``folder`` at once."""
    env = {**os.environ, "BGE_ONNX_SHARE_WEIGHTS": "1" if share else "0"}
    children = [subprocess.Popen([sys.executable, "-c", CHILD, str(folder), precision], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True, env=env) for _ in range(processes)]
    try:
        for child in children:
            if child.stdout.readline().strip() != "ready":
                raise SystemExit(f"benchmarks: a process failed to load {folder}")
        out = []
        for child in children:
            child.stdin.write("measure\n")
            child.stdin.flush()
            out.append(json.loads(child.stdout.readline()))
        return out
    finally:
        for child in children:
            child.stdin.close()
            child.wait()


def main(argv: list[str], *, name: str = "share") -> None:
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks {name}", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, action="append", required=True, metavar="LABEL=FOLDER",
                        help="a model folder to measure, as label=folder (repeat: e.g. one per layout)")
    parser.add_argument("--precision", nargs="+", default=["fp32", "int8"])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--try-out", action="store_true", help="write to benchmarks/out/ instead of results/")
    args = parser.parse_args(argv)

    models = {}
    for entry in args.model:
        label, _, folder = str(entry).partition("=")
        models[label] = Path(folder)
    report = Report(name, "Weights shared between processes: PSS of 1, 2 and 4 processes", argv, models=models)
    report.text(__doc__.split("\n\n", 1)[1].replace("\n", " "))
    rows = []
    for label, folder in models.items():
        spec = json.loads((folder / "bge_onnx.json").read_text(encoding="utf-8"))
        for precision in args.precision:
            if precision not in spec["variants"]:
                continue
            variant = spec["variants"][precision]
            layout = "side file" if variant.get("data_files") else "inside the .onnx"
            for share in ([False, True] if variant.get("data_files") else [False]):
                setting = f"{layout}, " + ("prepacking off (BGE_ONNX_SHARE_WEIGHTS=1)" if share else "prepacking on")
                first = None
                for n in args.processes:
                    log(f"{label} {precision}: {setting}, {n} processes")
                    each = measure(folder, precision, n, share)
                    pss = sum(e["pss"] for e in each)
                    first = pss if n == 1 else first
                    extra = (pss - first) / (n - 1) if n > 1 and first else None
                    rows.append([label, precision, setting, n, f"{pss:.0f}", f"{max(e['rss'] for e in each):.0f}",
                                 "" if extra is None else f"{extra:.0f} ({100 * extra / first:.0f}%)"])
                    report.data.setdefault(label, {}).setdefault(precision, {}).setdefault(setting, {})[n] = each
    report.table(["model", "precision", "layout and setting", "processes", "PSS MB, all", "RSS MB, largest",
                  "extra process MB (% of the first)"], rows)
    if args.try_out:
        report.write(TRYOUTS)
    else:
        report.write()
