"""Static int8 (QDQ, activation scales calibrated on a text sample) against the export's dynamic int8, on the CPU.

The issue asks for dynamic against static quantisation with a calibration sample, chosen by measurement. Static
graphs: onnxruntime's quantize_static, QDQ format, MatMuls with constant weights (per output channel, 7-bit signed
weights, uint8 activations, as the dynamic recipe), MinMax calibration on 100 mixed texts that are not among the
600 measured; all MatMuls, or with the FFN MatMuls kept in fp32 (the shipped dynamic recipe's choice). Cosine to
fp32 on 600 mixed texts; speed on 300 of them, interleaved (A B C D D C B A ...), medians.

Usage: python benchmarks/int8_static.py MODEL [--reps 3] > results/int8-static-minilm.md
MODEL: an exported folder with an int8 variant (bge-onnx export ... --precision fp32 int8).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import onnx
from corpora import corpora

from bge_onnx import Embedder
from bge_onnx.spec import read_spec, sha256_file, write_spec
from bge_onnx.tokenize import pad_batch
from bge_onnx_export.precision import weight_roles


def static_copy(model: Path, out: Path, calibration: list[list[dict]], keep_fp32: set[str]) -> Path:
    """A copy of the folder whose fp32 graph is replaced by a static QDQ int8 one."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static

    class Feeds(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(calibration)

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    shutil.copytree(model, out)
    spec = read_spec(out)
    source = model / spec.variants["fp32"].file
    roles = weight_roles(onnx.load(str(source), load_external_data=False))
    quantize_static(
        str(source), str(out / spec.variants["fp32"].file), Feeds(), quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["MatMul"], per_channel=True, reduce_range=True, activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8, nodes_to_exclude=[n for n, r in roles.items() if r in keep_fp32],
        calibrate_method=CalibrationMethod.MinMax,
        extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT},
    )
    fp32 = spec.variants["fp32"]
    write_spec(out, dataclasses.replace(spec, variants={"fp32": fp32},
                                        files={**spec.files, fp32.file: sha256_file(out / fp32.file)}))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # truncation of long passages, on purpose
    logging.disable(logging.WARNING)  # the quantiser's advice to pre-process
    texts = corpora(1000)["mixed"]
    measured, sample = texts[:600], texts[600:700]
    fp32 = Embedder(args.model, device="cpu", precision="fp32")
    encodings, _ = fp32._model.tokenizer.encode_texts(sample)
    names = fp32._model.session.input_names
    calibration = [pad_batch(encodings[i : i + 4], pad_id=fp32.spec.pad_token_id, input_names=names)
                   for i in range(0, len(encodings), 4)]
    work = Path(tempfile.mkdtemp())
    runs = {"fp32": fp32, "dynamic int8 (the export's)": Embedder(args.model, device="cpu", precision="int8")}
    for name, keep in (("static int8, all MatMuls", set()), ("static int8, FFN in fp32", {"ffn_in", "ffn_out"})):
        folder = static_copy(args.model, work / name.replace(" ", "_").replace(",", ""), calibration, keep)
        runs[name] = Embedder(folder, device="cpu", precision="fp32")
    reference = fp32.encode(measured)
    cosines = {name: (model.encode(measured) * reference).sum(axis=1) for name, model in runs.items()}
    subset = measured[:300]
    seconds = {name: [] for name in runs}
    for round_ in range(args.reps):
        for name, model in list(runs.items())[:: -1 if round_ % 2 else 1]:
            start = time.perf_counter()
            model.encode(subset)
            seconds[name].append(time.perf_counter() - start)
    print("# Static against dynamic int8, on the CPU\n")
    print(f"Command: `python benchmarks/int8_static.py {' '.join(sys.argv[1:])}`; {len(measured)} mixed texts for "
          f"the cosines, {len(subset)} for speed, median of {args.reps}; {len(sample)} other mixed texts calibrate.\n")
    print("| graph | min cosine to fp32 | mean cosine to fp32 | speed vs fp32 |")
    print("|---|---|---|---|")
    base = statistics.median(seconds["fp32"])
    for name in runs:
        print(f"| {name} | {cosines[name].min():.5f} | {cosines[name].mean():.5f} | "
              f"{base / statistics.median(seconds[name]):.2f}x |")
    print()


if __name__ == "__main__":
    main()
