"""The benchmark corpora: short queries, sentences, passages and a mixed one, seeded samples of the evaluation data."""

from __future__ import annotations

import gzip
import json
import random

from .harness import data_dir


def scifact_passages() -> list[str]:
    with gzip.open(data_dir() / "scifact" / "corpus.jsonl.gz", "rt", encoding="utf-8") as f:
        return [(d["title"] + " " + d["text"]) for d in map(json.loads, f)]


def corpora(n: int) -> dict[str, list[str]]:
    """n SciFact queries, n STS-B sentences, n/2 SciFact abstracts (title + text), and a shuffled third of each."""
    data = data_dir()
    rng = random.Random(0)
    queries = [json.loads(line)["text"] for line in (data / "scifact" / "queries.jsonl").open(encoding="utf-8")]
    rows = [json.loads(line) for line in (data / "stsb" / "sts-test.jsonl").open(encoding="utf-8")]
    sentences = [r["sentence1"] for r in rows]
    picked = {
        "short queries": rng.sample(queries, n),
        "sentences": rng.sample(sentences, n),
        "passages": rng.sample(scifact_passages(), n // 2),
    }
    mixed = [t for texts in picked.values() for t in texts[: n // 3]]
    rng.shuffle(mixed)
    picked["mixed"] = mixed
    return picked
