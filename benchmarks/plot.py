"""Plot throughput by text length from compare.py --by-length --json FILE (needs matplotlib).

Usage: python benchmarks/plot.py FILE.json OUT.png
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("figures", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise SystemExit("plot.py needs matplotlib: pip install matplotlib") from error

    rows = json.loads(args.figures.read_text(encoding="utf-8"))
    series: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
    torch = {r["corpus"]: r["seconds"] for r in rows if r["contestant"] == "sentence-transformers, torch"}
    for r in rows:
        series[r["contestant"]].append((r["tokens"] / r["texts"], r["tokens"] / r["seconds"], torch[r["corpus"]] / r["seconds"]))
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    for name, points in series.items():
        points.sort()
        style = "-" if name.startswith("bge-onnx") else "--"
        width = 2.5 if name.startswith("bge-onnx") else 1.2
        length, rate, ratio = zip(*points)
        left.plot(length, rate, style, marker="o", linewidth=width, label=name)
        right.plot(length, ratio, style, marker="o", linewidth=width, label=name)
    for axis, title in ((left, "tokens/s"), (right, "speed vs sentence-transformers on torch (x)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("tokens per text")
        axis.set_title(title)
        axis.grid(True, alpha=0.3)
    right.legend(fontsize=8)
    fig.suptitle("all-MiniLM-L6-v2 on CPU, by text length (benchmarks/compare.py --by-length; medians, interleaved)")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)


if __name__ == "__main__":
    main()
