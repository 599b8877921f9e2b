"""Cold start, peak memory and install size: bge-onnx vs fastembed (same graph files) vs sentence-transformers.

Each start is a fresh process that imports the library, loads the model and embeds one short text; it reports
import, load and first-encode seconds and its peak RSS. Contestants alternate (A B C ... A B C), medians of
--rounds. Install size: the files of the package and everything it requires, as installed (recursive closure of
its requirements, extras not included).

--model, --st-folder and --anchors-python as for compare (benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from .harness import Report, interleave, log

SNIPPETS = {
    "bge_onnx": """
from bge_onnx import Embedder
t_import = time.perf_counter()
model = Embedder({folder!r}, device="cpu", precision={precision!r})
t_load = time.perf_counter()
model.encode(["how do I reset my password"])
""",
    # PoolingType.DISABLED: bge-onnx's graphs end in their pooling (sentence_embedding)
    "fastembed": """
from fastembed import TextEmbedding
from fastembed.common.model_description import ModelSource, PoolingType
t_import = time.perf_counter()
TextEmbedding.add_custom_model(model="local/m", pooling=PoolingType.DISABLED, normalization=True,
                               sources=ModelSource(hf="local/none"), dim=384, model_file={model_file!r})
model = TextEmbedding("local/m", specific_model_path={folder!r}, providers=["CPUExecutionProvider"])
model.model.tokenizer.enable_truncation(max_length=256)
t_load = time.perf_counter()
list(model.embed(["how do I reset my password"]))
""",
    "sentence_transformers": """
from sentence_transformers import SentenceTransformer
t_import = time.perf_counter()
model = SentenceTransformer({folder!r}, device="cpu", backend={backend!r}, **{kwargs!r})
t_load = time.perf_counter()
model.encode(["how do I reset my password"])
""",
}

TEMPLATE = """
import time, resource, json, warnings
t0 = time.perf_counter()
warnings.simplefilter("ignore")
{body}
t_encode = time.perf_counter()
print(json.dumps({{"import": t_import - t0, "load": t_load - t_import, "first encode": t_encode - t_load,
                  "peak RSS MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""

SIZE = """
import importlib.metadata as md, json, re, sys
def closure(name, seen):
    key = re.sub(r"[-_.]+", "-", name).lower()
    if key in seen:
        return
    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError:
        return
    seen[key] = sum(f.locate().stat().st_size for f in dist.files or [] if f.locate().is_file())
    for req in dist.requires or []:
        if "extra ==" in req:
            continue
        if ";" in req:
            from packaging.markers import Marker
            if not Marker(req.split(";", 1)[1]).evaluate():
                continue
        closure(re.split(r"[ ;<>=!~\\[(]", req, maxsplit=1)[0], seen)
seen = {}
for name in sys.argv[1:]:
    closure(name, seen)
print(json.dumps(seen))
"""


def contestants(args) -> dict[str, tuple[str, str]]:
    own, anchors, model, st = sys.executable, args.anchors_python, str(args.model), str(args.st_folder)
    return {
        "bge-onnx fp32": (own, SNIPPETS["bge_onnx"].format(folder=model, precision="fp32")),
        "bge-onnx int8": (own, SNIPPETS["bge_onnx"].format(folder=model, precision="int8")),
        "fastembed fp32 (same graph)": (anchors, SNIPPETS["fastembed"].format(folder=model, model_file="model.onnx")),
        "fastembed int8 (same graph)": (anchors, SNIPPETS["fastembed"].format(folder=model, model_file="model_int8.onnx")),
        "sentence-transformers, torch": (anchors, SNIPPETS["sentence_transformers"].format(folder=st, backend="torch", kwargs={})),
        "sentence-transformers, onnx int8": (anchors, SNIPPETS["sentence_transformers"].format(
            folder=st, backend="onnx", kwargs={"model_kwargs": {"file_name": "onnx/model_qint8_avx512_vnni.onnx"}})),
    }


def start(python: str, body: str, runs: list[dict]) -> None:
    """One fresh process: import, load, first text; its figures go to ``runs``."""
    out = subprocess.run([python, "-c", TEMPLATE.format(body=body)], capture_output=True, text=True, check=True)
    runs.append(json.loads(out.stdout.strip().splitlines()[-1]))


def main(argv: list[str], *, name: str = "coldstart") -> None:
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks {name}", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="bge-onnx folder with fp32 and int8 variants")
    parser.add_argument("--st-folder", type=Path, required=True, help="sentence-transformers folder with onnx/ graphs")
    parser.add_argument("--anchors-python", required=True, help="the Python of the anchors' environment")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; figures are medians (default 5)")
    args = parser.parse_args(argv)
    report = Report(name, "Cold start, peak RSS and install size: all-MiniLM-L6-v2 on CPU", argv,
                    models={"MODEL": args.model})
    table = contestants(args)
    runs: dict[str, list[dict]] = {c: [] for c in table}
    log(f"{args.rounds} rounds of {len(table)} fresh processes")
    wall = interleave({c: (lambda p=p, b=b, r=runs[c]: start(p, b, r)) for c, (p, b) in table.items()},
                      rounds=args.rounds, warm=False)
    report.text(f"Fresh process each time, contestants alternating, medians of {args.rounds}; page cache warm (the "
                "files were read by earlier rounds). 'total' = import + load + first encode of one short text.")
    keys = ["import", "load", "first encode", "peak RSS MB"]
    med = {c: {k: statistics.median(r[k] for r in rs) for k in keys} for c, rs in runs.items()}
    rows = []
    for c, m in med.items():
        m["total"] = m["import"] + m["load"] + m["first encode"]
        m["process wall"] = statistics.median(wall[c])
    for c, m in med.items():
        base = med["fastembed int8 (same graph)" if "int8" in c else "fastembed fp32 (same graph)"]["total"]
        rows.append([c, f"{m['import']:.2f} s", f"{m['load']:.2f} s", f"{m['first encode']:.3f} s",
                     f"{m['total']:.2f} s", f"{m['total'] / base:.2f}x", f"{m['process wall']:.2f} s",
                     f"{m['peak RSS MB']:.0f}"])
    report.table(["contestant", "import", "load", "first encode", "total", "vs fastembed, same precision",
                  "process wall", "peak RSS MB"], rows)
    report.text("## Installed size (package + its required dependencies, as installed)")
    sizes_rows, sizes_data = [], {}
    for label, python, names in (
        ("bge-onnx (runtime)", sys.executable, ["bge-onnx"]),
        ("fastembed", args.anchors_python, ["fastembed"]),
        ("sentence-transformers (+ torch)", args.anchors_python, ["sentence-transformers"]),
    ):
        sizes = json.loads(subprocess.run([python, "-c", SIZE, *names], capture_output=True, text=True, check=True).stdout)
        top = sorted(sizes.items(), key=lambda kv: -kv[1])[:4]
        sizes_data[label] = sizes
        sizes_rows.append([label, f"{sum(sizes.values()) / 1e6:.0f}", ", ".join(f"{k} {v / 1e6:.0f}" for k, v in top)])
    report.table(["package", "size MB", "largest parts"], sizes_rows)
    report.data = {"medians": med, "runs": runs, "installed_bytes": sizes_data}
    report.write()
