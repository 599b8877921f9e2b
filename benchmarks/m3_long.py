"""bge-m3 on long inputs: peak memory and time per text at 512, 2048 and 8192 tokens, all three outputs.

The model is bge-m3's shape (XLM-RoBERTa, 24 layers, 1024 hidden, 16 heads, 4096 FFN, 250,002-token vocabulary,
8192 positions, both heads) with random weights, seeded: memory and speed do not depend on the weights' values. It is
exported twice by bge-onnx's own export (no parity check: there is no reference model to match): as export_model
makes it (a batch without padding, such as one long text, runs onnxruntime's CPU flash attention:
rewrite.flash_attention), and with flash_attention=False (onnxruntime's fused Attention for every batch). Each
length and graph runs in a fresh process: load M3Embedder, encode one warm-up text of 16 tokens, then one text of
exactly N tokens with dense, lexical and ColBERT outputs; peak RSS is the process's high-water mark (VmHWM), load
RSS is after the warm-up. Then both encode the same 48 texts of 10-200 tokens (padded batches) in interleaved rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


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


PADDED = r"""
import json, sys, time, numpy as np
from bge_onnx import M3Embedder
rng = np.random.default_rng(0)
texts = [" ".join(f"w{j}" for j in rng.integers(0, 1000, n)) for n in rng.integers(10, 200, 48)]
models = [M3Embedder(folder, device="cpu", threads=int(sys.argv[1]), precision="fp32") for folder in sys.argv[3:]]
options = {"return_sparse": True, "return_colbert_vecs": True}
first = [model.encode(texts, **options) for model in models]
diff = float(np.abs(first[0]["dense_vecs"] - first[1]["dense_vecs"]).max())
seconds = [[], []]
for _ in range(int(sys.argv[2])):
    for k, model in enumerate(models):
        start = time.perf_counter()
        model.encode(texts, **options)
        seconds[k].append(time.perf_counter() - start)
print(json.dumps({"seconds": seconds, "max_abs_diff": diff}))
"""


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
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the padded batches (default 5)")
    parser.add_argument("--try-out", action="store_true", help="write to benchmarks/out/ instead of results/")
    args = parser.parse_args(argv)

    from bge_onnx_export import export_model

    work = args.work or Path(tempfile.mkdtemp(prefix="bge-onnx-m3-long-"))
    exports = {"flash for unpadded batches": work / "export", "fused Attention only": work / "export-fused"}
    for (label, export), flash in zip(exports.items(), (True, False)):
        if not (export / "bge_onnx.json").is_file():
            checkpoint = work / "bge-m3"
            if not checkpoint.is_dir():
                log("building a random bge-m3-shaped checkpoint")
                build(checkpoint)
            log(f"exporting it ({label})")
            export_model(checkpoint, export, check_parity=False, max_length=8192, flash_attention=flash, log=None)
    report = Report(name, "bge-m3 on long inputs: memory and time per text", argv,
                    models={"FLASH": exports["flash for unpadded batches"], "FUSED": exports["fused Attention only"]})
    report.text(__doc__.split("\n", 2)[2].strip(), f"{args.threads} threads.")
    rows, data = [], []
    for length in args.lengths:
        runs = {}
        for label, export in exports.items():
            log(f"{length} tokens, {label}")
            done = subprocess.run([sys.executable, "-c", CHILD, str(export), str(length), str(args.threads)],
                                  capture_output=True, text=True, check=True)
            runs[label] = json.loads(done.stdout.strip().splitlines()[-1])
        flash, fused = runs.values()
        data.append({"tokens": length, "flash": flash, "fused": fused})
        rows.append([length, f"{flash['seconds']:.2f}", f"{flash['peak_rss_mb']:.0f}",
                     f"{flash['peak_rss_mb'] - flash['load_rss_mb']:.0f}", f"{fused['seconds']:.2f}",
                     f"{fused['peak_rss_mb']:.0f}", f"{fused['seconds'] / flash['seconds']:.2f}x"])
    report.table(["tokens", "seconds per text", "peak RSS, MB", "peak - load, MB", "fused only: seconds",
                  "fused only: peak RSS, MB", "speed vs fused only"], rows)
    log("padded batches, interleaved")
    done = subprocess.run([sys.executable, "-c", PADDED, str(args.threads), str(args.rounds), *map(str, exports.values())],
                          capture_output=True, text=True, check=True)
    padded = json.loads(done.stdout.strip().splitlines()[-1])
    ratios = [b / a for a, b in zip(*padded["seconds"])]
    report.text(f"48 texts of 10-200 tokens, all three outputs, {args.rounds} interleaved rounds: speed against fused "
                f"Attention only {statistics.median(ratios):.2f}x (median of the per-round ratios; each round "
                f"{', '.join(f'{r:.2f}' for r in ratios)}); dense vectors max abs diff {padded['max_abs_diff']:.1e}.")
    report.data = {"threads": args.threads, "runs": data, "padded": padded}
    if args.try_out:
        report.write(TRYOUTS)
    else:
        report.write()
