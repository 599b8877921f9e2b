"""Cutting long texts before they are tokenised: the tokens kept are the ones the whole text gives, on every
tokenizer family (WordPiece, Unigram, the real model's), for ordinary and hostile texts."""

from __future__ import annotations

import random

import numpy as np
import pytest
from tokenizers import Tokenizer

from bge_onnx import Embedder, Reranker
from bge_onnx.tokenize import CLIP_CHARS, CLIP_MARGIN, TOKENIZER_FILE, clip

PIECES = ["the", "panda", "Paris", "naïve", "e\u0301", "机器学习是人工智能", "Машинное", "🙂", "∑", "x=f(y)+1",
          "\n", "\t", " ", "   ", "supercalifragilistic" * 8, "a" * 150, "ﬁ", "\u200b", "'", "-", "."]


def hostile_texts(seed: int, n: int, *, words: int) -> list[str]:
    """Long texts mixing words, words longer than WordPiece's 100-character limit, runs of spaces, CJK without
    spaces, combining accents, emoji; seeded."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        pieces = rng.choices(PIECES, k=words)
        texts.append("".join(p + (" " if rng.random() < 0.6 else "") for p in pieces))
    texts += [
        "word " * 20_000,
        "机器学习是人工智能的一个分支" * 3000,
        " " * 50_000 + "late words arrive here " * 200,
        "a" * 200_000 + " then words " * 300,
        "x" * 300_000,
        "e\u0301" * 40_000,
    ]
    return texts


def plain(folder) -> Tokenizer:
    tokenizer = Tokenizer.from_file(str(folder / TOKENIZER_FILE))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


@pytest.fixture(scope="module")
def tokenizers(exported, minilm_onnx) -> dict[str, Tokenizer]:
    return {"wordpiece": plain(exported["bert-cls"]), "unigram": plain(exported["xlmr-cls"]),
            "all-MiniLM-L6-v2": plain(minilm_onnx)}


@pytest.mark.parametrize("family", ["wordpiece", "unigram", "all-MiniLM-L6-v2"])
def test_a_clipped_text_keeps_the_whole_texts_first_tokens(tokenizers, family):
    tokenizer = tokenizers[family]
    texts = hostile_texts(7, 60, words=900)
    for limit in (8, 128, 512):
        clipped = clip(tokenizer, texts, limit)
        whole = tokenizer.encode_batch_fast(texts, add_special_tokens=True)
        cut = tokenizer.encode_batch_fast(clipped, add_special_tokens=True)
        for i, (text, short, a, b) in enumerate(zip(texts, clipped, whole, cut)):
            assert a.ids[:limit] == b.ids[:limit], (family, limit, i, text[:80])
            if short is not text:
                assert text.startswith(short) and len(b) >= limit + CLIP_MARGIN, (family, limit, i)
        # ordinary words: the first prefix tried is enough, whatever the text's size
        assert (limit + CLIP_MARGIN) * CLIP_CHARS < len(clipped[-6]) <= 2 * (limit + CLIP_MARGIN) * CLIP_CHARS
        assert clipped[-5] is texts[-5] and clipped[-2] is texts[-2]  # no space to cut at: tokenised whole


def test_a_unigram_run_is_never_cut_inside():
    """A Unigram segmentation of an unbroken run is found over the whole run: cut inside it, its first pieces can
    change (here "a" x 961: the whole run starts [a][aa][aa]..., a prefix of it [aa][aa]...)."""
    from tokenizers import models, pre_tokenizers

    tokenizer = Tokenizer(models.Unigram([("<unk>", 0.0), ("\u2581", -1.0), ("a", -2.0), ("aa", -3.0),
                                          ("\u2581a", -1.5)], unk_id=0, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    texts = ["a" * 961, "a" * 961 + " b" * 500, " ".join("a" * n for n in range(1, 400)), "a " * 3000 + "a" * 961]
    for limit in (4, 8, 64):
        for text, short in zip(texts, clip(tokenizer, texts, limit)):
            assert tokenizer.encode(short).ids[:limit] == tokenizer.encode(text).ids[:limit], (limit, text[:20])


def test_short_texts_come_back_as_they_are(tokenizers):
    texts = ["a short one", "", "word " * 100]
    clipped = clip(tokenizers["wordpiece"], texts, 128)
    assert all(a is b for a, b in zip(clipped, texts))


def test_embedder_and_reranker_on_huge_texts_equal_the_text_cut_by_hand(exported):
    """2 MB texts give what their first words give, where the cut is made by hand far beyond the limit."""
    embedder = Embedder(exported["bert-cls"], device="cpu", precision="fp32")
    huge = ["The giant panda is a bear. " * 80_000, "机器学习" * 500_000]
    by_hand = [text[:20_000] for text in huge]
    with pytest.warns(UserWarning, match="truncated"):
        got = embedder.encode(huge)
    with pytest.warns(UserWarning, match="truncated"):
        np.testing.assert_array_equal(got, embedder.encode(by_hand))
    reranker = Reranker(exported["bert-rerank"], device="cpu", precision="fp32")
    pairs = [("what is a panda? " * 20_000, huge[0]), ("a bear", huge[1])]
    with pytest.warns(UserWarning, match="truncated"):
        scores = reranker.compute_score(pairs)
    with pytest.warns(UserWarning, match="truncated"):
        np.testing.assert_array_equal(scores, reranker.compute_score([(q[:20_000], p[:20_000]) for q, p in pairs]))
