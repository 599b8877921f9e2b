"""A cold load by phase: imports, manifest, file hashes, tokenizer, onnxruntime session (parse, graph optimisation,
prepacking) and the first run, per model folder and precision, in fresh processes.

Each round starts one fresh process per folder and precision (in turns: A B A B), which times, in order: importing
numpy, onnxruntime, tokenizers and bge_onnx; reading the manifest; hashing the variant's files in full (what every
load did before verification stamps) and checking them as a load does now (stamped: a stat per file); loading the
tokenizer; one session of the graph; the first run of one short text; and, last, the whole `Embedder(...)` load in
the same warm process for reference. The session is made three ways, each in its own fresh process: optimisation and
prepacking off (parsing and the weights' copy), optimisation on and prepacking off, and as a load makes it (both
on); the session's phases are differences within a round. Medians of the rounds.
The page cache is warm (the files were read by earlier rounds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from .harness import TRYOUTS, Report, log

# optimisation-prepacking, each in a fresh process
SESSIONS = ("off-off", "on-off", "on-on")

CHILD = r"""
import json, sys, time
t = [time.perf_counter()]
import numpy as np
t.append(time.perf_counter())
import onnxruntime as ort
t.append(time.perf_counter())
import tokenizers
t.append(time.perf_counter())
import bge_onnx
from bge_onnx.spec import read_spec, sha256_file, verify_files
from bge_onnx.tokenize import TextTokenizer
t.append(time.perf_counter())
from pathlib import Path
folder, precision = Path(sys.argv[1]), sys.argv[2]
spec = read_spec(folder)
variant = spec.variants[precision]
names = ["tokenizer.json", *variant.all_files]
t.append(time.perf_counter())
for name in names:
    sha256_file(folder / name)
t.append(time.perf_counter())
verify_files(folder, spec, names)
t.append(time.perf_counter())
tokenizer = TextTokenizer(folder, max_length=spec.max_length)
t.append(time.perf_counter())
def session(optimise, prepack):
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level = 2, 1, 3
    if not optimise:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    return ort.InferenceSession(str(folder / variant.file), options, providers=["CPUExecutionProvider"])
optimise, prepack = (flag == "on" for flag in sys.argv[3].split("-"))
s = session(optimise, prepack)
t.append(time.perf_counter())
ids = np.array([tokenizer._truncating.encode("how do I reset my password").ids], dtype=np.int64)
feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
s.run(None, {i.name: feeds[i.name] for i in s.get_inputs()})
t.append(time.perf_counter())
bge_onnx.Embedder(folder, device="cpu", precision=precision, threads=2)
t.append(time.perf_counter())
d = [b - a for a, b in zip(t, t[1:])]
print(json.dumps({"import numpy": d[0], "import onnxruntime": d[1], "import tokenizers": d[2],
                  "import bge_onnx (the rest)": d[3], "manifest": d[4], "sha256 in full": d[5],
                  "check with stamps": d[6], "tokenizer": d[7], "session": d[8], "first run": d[9],
                  "Embedder load, warm process": d[10]}))
"""


def main(argv: list[str], *, name: str = "phases") -> None:
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks {name}", description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, metavar="LABEL=FOLDER",
                        help="a model folder, as label=folder (repeat: e.g. one per layout)")
    parser.add_argument("--precision", nargs="+", default=["fp32", "int8"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--try-out", action="store_true", help="write to benchmarks/out/ instead of results/")
    args = parser.parse_args(argv)

    models = {label: Path(folder) for label, _, folder in (entry.partition("=") for entry in args.model)}
    runs = [(label, precision) for label in models for precision in args.precision]
    seconds: dict[tuple[str, str], list[dict[str, float]]] = {run: [] for run in runs}
    for k in range(args.rounds):
        for label, precision in runs:
            # one fresh process per session setting (a second session in one process reuses the first's memory)
            sessions = {}
            for setting in SESSIONS:
                result = subprocess.run([sys.executable, "-c", CHILD, str(models[label]), precision, setting],
                                        capture_output=True, text=True, check=True)
                sessions[setting] = json.loads(result.stdout)
            row = dict(sessions["on-on"])
            row["session: parse + weights"] = sessions["off-off"]["session"]
            row["session: graph optimisation"] = sessions["on-off"]["session"] - sessions["off-off"]["session"]
            row["session: prepacking"] = sessions["on-on"]["session"] - sessions["on-off"]["session"]
            seconds[(label, precision)].append(row)
        log(f"round {k + 1}/{args.rounds}")

    report = Report(name, "A cold load by phase", argv, models=models)
    report.text(__doc__.split("\n\n", 1)[1].replace("\n", " "))
    phases = ["import numpy", "import onnxruntime", "import tokenizers", "import bge_onnx (the rest)", "manifest",
              "sha256 in full", "check with stamps", "tokenizer", "session: parse + weights",
              "session: graph optimisation", "session: prepacking", "session", "first run",
              "Embedder load, warm process"]
    header = ["phase", *(f"{label} {precision}" for label, precision in runs)]
    rows = [[phase, *(f"{1000 * statistics.median(r[phase] for r in seconds[run]):.1f} ms" for run in runs)]
            for phase in phases]
    report.table(header, rows)
    report.data = {f"{label} {precision}": seconds[(label, precision)] for label, precision in runs}
    if args.try_out:
        report.write(TRYOUTS)
    else:
        report.write()
