"""FlagEmbedding's BGEM3FlagModel on a folder, run in its own environment (tests/test_m3.py makes it): the reference
for bge_onnx.M3Embedder. Reads a JSON request on stdin, writes results to the .npz path given.

    python flag_reference.py MODEL_DIR OUT.npz < {"texts": [...], "pairs": [[q, p], ...], "weights": [w0, w1, w2],
                                                  "configured": {BGEM3FlagModel keyword: value, ...}}

"configured" builds a second model with those constructor arguments; its encode_queries and encode_corpus of the
first texts (their defaults: what to return, limits, instruction) are the reference for M3Embedder's same arguments.
"""

import json
import sys

import numpy as np
import torch
from FlagEmbedding import BGEM3FlagModel


def main(model_dir: str, out: str) -> None:
    request = json.load(sys.stdin)
    torch.set_num_threads(1)
    model = BGEM3FlagModel(model_dir, use_fp16=False, devices="cpu")  # use_fp16=True would round the weights
    texts, pairs = request["texts"], [tuple(p) for p in request["pairs"]]
    encoded = model.encode(texts, return_dense=True, return_sparse=True, return_colbert_vecs=True)
    lexical, colbert = encoded["lexical_weights"], encoded["colbert_vecs"]
    arrays = {
        "dense": encoded["dense_vecs"],
        "lexical_scores": np.array([[float(model.compute_lexical_matching_score(a, b)) for b in lexical]
                                    for a in lexical]),
        "colbert_scores": np.array([[float(model.colbert_score(a, b)) for b in colbert] for a in colbert]),
        **{f"colbert_{i}": vectors for i, vectors in enumerate(colbert)},
    }
    result = {
        "lexical_weights": [{k: float(v) for k, v in d.items()} for d in lexical],
        "lexical_tokens": [{k: float(v) for k, v in model.convert_id_to_token([d]).items()} for d in lexical],
        "scores": model.compute_score(pairs),
        "weighted_scores": model.compute_score(pairs, weights_for_different_modes=request["weights"]),
    }
    configured = BGEM3FlagModel(model_dir, use_fp16=False, devices="cpu", **request["configured"])
    for kind, encode in (("queries", configured.encode_queries), ("corpus", configured.encode_corpus)):
        encoded = encode(texts[:8])
        arrays[f"configured_{kind}_dense"] = encoded["dense_vecs"]
        result[f"configured_{kind}_lexical"] = [{k: float(v) for k, v in d.items()} for d in encoded["lexical_weights"]]
        result[f"configured_{kind}_colbert"] = encoded["colbert_vecs"] is not None
    np.savez(out, json=np.array(json.dumps(result)), **arrays)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
