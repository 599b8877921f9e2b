"""One benchmark contestant in its own process: load it, then embed (or score) corpora on command (stdin -> stdout).

Run by `python -m benchmarks compare | by-length | rerank`, possibly with another Python (the anchors need transformers 4 / optimum, which
bge-onnx's export extra does not). Protocol, one line each way, fields split by tabs: "run CORPUS" -> seconds;
"save CORPUS PATH" -> "ok" after writing the vectors (or scores) as .npy; "quit". Imports only what the contestant needs, so each process
holds one library.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

BATCH = 32  # the anchors' own default batch size (sentence-transformers, optimum users); bge-onnx uses its own


def sentence_transformers(folder: str, backend: str, file_name: str | None, threads: int):
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(threads)
    kwargs = {"model_kwargs": {"file_name": file_name, "provider": "CPUExecutionProvider"}} if file_name else {}
    model = SentenceTransformer(folder, device="cpu", backend=backend, **kwargs)
    return lambda texts: model.encode(texts, batch_size=BATCH, convert_to_numpy=True, normalize_embeddings=True)


def fastembed(folder: str, model_file: str, max_length: int, threads: int):
    from fastembed import TextEmbedding
    from fastembed.common.model_description import ModelSource, PoolingType

    # bge-onnx's graphs end in their pooling (output sentence_embedding): fastembed then pools nothing
    with open(os.path.join(folder, "bge_onnx.json"), encoding="utf-8") as f:
        pooled = json.load(f)["output"] == "sentence_embedding"
    name = f"local/{os.path.basename(folder)}-{model_file}"
    TextEmbedding.add_custom_model(
        model=name, pooling=PoolingType.DISABLED if pooled else PoolingType.MEAN, normalization=True,
        sources=ModelSource(hf="local/none"), dim=384, model_file=model_file,
    )
    model = TextEmbedding(name, specific_model_path=folder, threads=threads, providers=["CPUExecutionProvider"])
    model.model.tokenizer.enable_truncation(max_length=max_length)  # fastembed's default would cut at 128
    return lambda texts: np.stack(list(model.embed(texts, batch_size=BATCH)))


def optimum(folder: str, file_name: str, max_length: int, threads: int):
    import onnxruntime as ort
    from optimum.onnxruntime import ORTModelForFeatureExtraction
    from transformers import AutoTokenizer

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    subfolder, _, name = file_name.rpartition("/")
    model = ORTModelForFeatureExtraction.from_pretrained(
        folder, subfolder=subfolder, file_name=name, session_options=options, provider="CPUExecutionProvider"
    )
    tokenizer = AutoTokenizer.from_pretrained(folder)

    def encode(texts):  # the loop its documentation shows: batches in input order, mean pooling, normalise
        out = []
        for start in range(0, len(texts), BATCH):
            batch = tokenizer(texts[start : start + BATCH], padding=True, truncation=True, max_length=max_length, return_tensors="np")
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"][..., None]
            pooled = (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)
            out.append(pooled / np.linalg.norm(pooled, axis=1, keepdims=True))
        return np.concatenate(out)

    return encode


def bge_onnx(folder: str, precision: str, threads: int):
    from bge_onnx import Embedder

    model = Embedder(folder, device="cpu", threads=threads, precision=precision)
    return lambda texts: model.encode(texts)


def cross_encoder(folder: str, backend: str, max_length: int, threads: int):
    """sentence-transformers' CrossEncoder; raw logits (no sigmoid), as bge-onnx's compute_score returns them."""
    import torch
    from sentence_transformers import CrossEncoder

    torch.set_num_threads(threads)
    kwargs = {"model_kwargs": {"provider": "CPUExecutionProvider"}} if backend == "onnx" else {}
    model = CrossEncoder(folder, device="cpu", backend=backend, max_length=max_length, **kwargs)  # onnx: exported on load by optimum
    identity = torch.nn.Identity()
    return lambda pairs: model.predict([tuple(p) for p in pairs], batch_size=BATCH, activation_fn=identity)


def bge_onnx_rerank(folder: str, precision: str, threads: int):
    from bge_onnx import Reranker

    model = Reranker(folder, device="cpu", threads=threads, precision=precision)
    return lambda pairs: model.compute_score([tuple(p) for p in pairs])


def main() -> None:
    spec = json.loads(sys.argv[1])
    corpora = json.loads(open(spec.pop("corpora"), encoding="utf-8").read())
    kind = spec.pop("kind")
    import warnings

    warnings.simplefilter("ignore")
    encode = globals()[kind](**spec)
    print("ready", flush=True)
    for line in sys.stdin:
        command, *args = line.rstrip("\n").split("\t")
        if command == "quit":
            break
        texts = corpora[args[0]]
        if command == "run":
            start = time.perf_counter()
            encode(texts)
            print(time.perf_counter() - start, flush=True)
        elif command == "save":
            np.save(args[1], np.asarray(encode(texts), dtype=np.float32))
            print("ok", flush=True)


if __name__ == "__main__":
    main()
