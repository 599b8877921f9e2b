"""The benchmark corpora: short queries, sentences, passages and a mixed one, from ../shared/data (seeded samples)."""

from __future__ import annotations

import gzip
import json
import os
import random
from pathlib import Path

DATA = Path(os.environ.get("BGE_ONNX_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "data"


def corpora(n: int) -> dict[str, list[str]]:
    rng = random.Random(0)
    queries = [json.loads(line)["text"] for line in (DATA / "scifact" / "queries.jsonl").open(encoding="utf-8")]
    rows = [json.loads(line) for line in (DATA / "stsb" / "sts-test.jsonl").open(encoding="utf-8")]
    sentences = [r["sentence1"] for r in rows]
    with gzip.open(DATA / "scifact" / "corpus.jsonl.gz", "rt", encoding="utf-8") as f:
        passages = [(d["title"] + " " + d["text"]) for d in map(json.loads, f)]
    picked = {
        "short queries": rng.sample(queries, n),
        "sentences": rng.sample(sentences, n),
        "passages": rng.sample(passages, n // 2),
    }
    mixed = [t for texts in picked.values() for t in texts[: n // 3]]
    rng.shuffle(mixed)
    picked["mixed"] = mixed
    return picked
