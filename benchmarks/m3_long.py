"""bge-m3 on long inputs: peak memory and time per text at 512, 2048 and 8192 tokens, all three outputs.

The model is bge-m3's shape (XLM-RoBERTa, 24 layers, 1024 hidden, 16 heads, 4096 FFN, 250,002-token vocabulary,
8192 positions, both heads) with random weights, seeded: memory and speed do not depend on the weights' values. It is
exported by bge-onnx's own export (no parity check: there is no reference model to match). Each length runs in a
fresh process: load M3Embedder, encode one warm-up text of 16 tokens, then one text of exactly N tokens with dense,
lexical and ColBERT outputs; peak RSS is the process's high-water mark (VmHWM), load RSS is after the warm-up.

Then an experiment, not what the runtime does: the same graph with each fused Attention (packed QKV, padding mask)
rewritten as MatMul + Split + MultiHeadAttention without a mask, which onnxruntime runs with its CPU flash attention
(contrib_ops/cpu/bert/multihead_attention.cc takes that path only when there is no key_padding_mask: so only for
batches without padding, such as one long text). Both graphs run bare in onnxruntime, one fresh process each.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from .harness import TRYOUTS, Report, log

LENGTHS = (512, 2048, 8192)
WORDS = [f"w{i}" for i in range(1000)]

CHILD = r"""
import json, resource, sys, time
from bge_onnx import M3Embedder
folder, length, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
m3 = M3Embedder(folder, device="cpu", max_length=length, threads=threads, precision="fp32")
m3.encode(["w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 w11 w12 w13 w14"], return_sparse=True, return_colbert_vecs=True)
loaded = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() / 2**20
words = " ".join(f"w{i % 1000}" for i in range(length - 2))  # one token per word, plus <s> and </s>
start = time.perf_counter()
out = m3.encode([words], return_sparse=True, return_colbert_vecs=True)
seconds = time.perf_counter() - start
assert out["colbert_vecs"][0].shape == (length - 1, 1024), out["colbert_vecs"][0].shape
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent's memory at fork and across exec
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")) / 1024
print(json.dumps({"tokens": length, "seconds": seconds, "load_rss_mb": loaded, "peak_rss_mb": peak}))
"""


BARE = r"""
import json, sys, time, numpy as np, onnxruntime as ort
path, length, threads, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
options = ort.SessionOptions(); options.intra_op_num_threads = threads; options.log_severity_level = 3
session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
ids = np.array([[0] + [5 + i % 1000 for i in range(length - 2)] + [2]], dtype=np.int64)
start = time.perf_counter()
outputs = session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
seconds = time.perf_counter() - start
np.save(out, outputs[0])
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")) / 1024
print(json.dumps({"seconds": seconds, "peak_rss_mb": peak}))
"""


def unmasked(src: Path, dst: Path) -> int:
    """The graph with each fused Attention as MatMul (packed QKV weight) + Split + MultiHeadAttention without a
    mask, the same weights; returns how many were rewritten."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    graph, nodes, count = model.graph, [], 0
    for node in graph.node:
        if node.op_type != "Attention":
            nodes.append(node)
            continue
        count += 1
        x, weight, bias = node.input[:3]
        heads = next(a.i for a in node.attribute if a.name == "num_heads")
        p = node.name
        sizes = p + "/sizes"
        width = [t for t in graph.initializer if t.name == bias][0].dims[0] // 3
        graph.initializer.append(numpy_helper.from_array(np.array([width] * 3, dtype=np.int64), sizes))
        nodes += [helper.make_node("MatMul", [x, weight], [p + "/qkv"], name=p + "/qkv"),
                  helper.make_node("Split", [p + "/qkv", sizes], [p + "/q", p + "/k", p + "/v"], name=p + "/split",
                                   axis=2),
                  helper.make_node("MultiHeadAttention", [p + "/q", p + "/k", p + "/v", bias], [node.output[0]],
                                   name=p + "/mha", domain="com.microsoft", num_heads=heads)]
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save(model, str(dst), save_as_external_data=True, location=dst.name + ".data")
    return count


def build(folder: Path) -> Path:
    """A random bge-m3-shaped checkpoint with its heads and a word-level tokenizer (one token per word)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, XLMRobertaConfig, XLMRobertaModel

    folder.mkdir(parents=True)
    torch.manual_seed(0)
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tokenizer = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + WORDS)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                            cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
                            model_max_length=8192).save_pretrained(folder)
    config = XLMRobertaConfig(vocab_size=250002, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                              intermediate_size=4096, max_position_embeddings=8194, type_vocab_size=1,
                              layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    XLMRobertaModel(config, add_pooling_layer=False).eval().save_pretrained(folder)
    torch.save(torch.nn.Linear(1024, 1024).state_dict(), folder / "colbert_linear.pt")
    torch.save(torch.nn.Linear(1024, 1).state_dict(), folder / "sparse_linear.pt")
    return folder


def main(argv: list[str], *, name: str = "m3-long") -> None:
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks {name}", description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="folder for the checkpoint and export (default: a temporary one)")
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--try-out", action="store_true", help="write to benchmarks/out/ instead of results/")
    args = parser.parse_args(argv)

    from bge_onnx_export import export_model

    work = args.work or Path(tempfile.mkdtemp(prefix="bge-onnx-m3-long-"))
    export = work / "export"
    if not (export / "bge_onnx.json").is_file():
        log("building a random bge-m3-shaped checkpoint")
        checkpoint = build(work / "bge-m3")
        log("exporting it")
        export_model(checkpoint, export, check_parity=False, max_length=8192)
    report = Report(name, "bge-m3 on long inputs: memory and time per text", argv, models={"MODEL": export})
    report.text(__doc__.split("\n", 2)[2].strip(), f"{args.threads} threads.")
    rows, data = [], []
    for length in args.lengths:
        log(f"{length} tokens")
        done = subprocess.run([sys.executable, "-c", CHILD, str(export), str(length), str(args.threads)],
                              capture_output=True, text=True, check=True)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        data.append(result)
        rows.append([length, f"{result['seconds']:.2f}", f"{result['load_rss_mb']:.0f}", f"{result['peak_rss_mb']:.0f}",
                     f"{result['peak_rss_mb'] - result['load_rss_mb']:.0f}"])
    report.table(["tokens", "seconds per text", "RSS after load, MB", "peak RSS, MB", "peak - load, MB"], rows)

    flash = work / "unmasked" / "model.onnx"
    if not flash.is_file():
        flash.parent.mkdir(exist_ok=True)
        log(f"rewrote {unmasked(export / 'model.onnx', flash)} Attention nodes as MultiHeadAttention without a mask")
    bare_rows, bare = [], []
    for length in args.lengths:
        runs = {}
        for label, graph in (("fused Attention, masked", export / "model.onnx"), ("MultiHeadAttention, no mask", flash)):
            log(f"{length} tokens, bare onnxruntime, {label}")
            done = subprocess.run([sys.executable, "-c", BARE, str(graph), str(length), str(args.threads),
                                   str(work / f"{label[:5]}.npy")], capture_output=True, text=True, check=True)
            runs[label] = json.loads(done.stdout.strip().splitlines()[-1])
        diff = float(np.abs(np.load(work / "fused.npy") - np.load(work / "Multi.npy")).max())
        a, b = runs.values()
        bare.append({"tokens": length, **{k: v for k, v in zip(("masked", "unmasked"), (a, b))}, "max_abs_diff": diff})
        bare_rows.append([length, f"{a['seconds']:.2f}", f"{a['peak_rss_mb']:.0f}", f"{b['seconds']:.2f}",
                          f"{b['peak_rss_mb']:.0f}", f"{a['seconds'] / b['seconds']:.2f}x", f"{diff:.1e}"])
    report.text("Bare onnxruntime, one text, the dense output compared (one run per length and graph):")
    report.table(["tokens", "masked: seconds", "masked: peak RSS, MB", "no mask: seconds", "no mask: peak RSS, MB",
                  "speed, no mask vs masked", "max abs diff"], bare_rows)
    report.data = {"threads": args.threads, "runs": data, "bare": bare}
    if args.try_out:
        report.write(TRYOUTS)
    else:
        report.write()
