"""The built-in probe set the export's parity check runs: short and long texts, many scripts, odd input."""

from __future__ import annotations

_LONG = (
    "The history of natural language processing generally started in the 1950s, although work can be "
    "found from earlier periods. In 1950, Alan Turing published an article titled Computing Machinery "
    "and Intelligence which proposed what is now called the Turing test as a criterion of intelligence. "
)

PROBE_TEXTS: tuple[str, ...] = (
    "",
    " ",
    "a",
    "Hello world!",
    "What is the capital of France?",
    "Paris is the capital and most populous city of France.",
    "The quick brown fox jumps over the lazy dog.",
    "how do i reset my password",
    "BGE models map text to dense vectors for retrieval, clustering and semantic search.",
    "北京是中华人民共和国的首都。",
    "为这个句子生成表示以用于检索相关文章：熊猫吃什么？",
    "東京は日本の首都です。",
    "서울은 대한민국의 수도이다.",
    "Москва — столица России.",
    "القاهرة هي عاصمة مصر.",
    "नई दिल्ली भारत की राजधानी है।",
    "Ελληνικά: η Αθήνα είναι η πρωτεύουσα.",
    "Ça coûte 12,50 € — naïve façade, résumé.",
    "emoji 🙂🚀🔥 and symbols ∑∫√ ≠ ≤",
    "def add(a, b):\n    return a + b  # code",
    "https://example.com/path?query=1&x=y#frag",
    "3.14159 2.71828 1.41421 42 1e-9 -7",
    "tabs\tand\nnewlines\r\nmixed   spaces",
    "UPPER lower MiXeD CaSe",
    "a " * 300,
    _LONG * 2,
    _LONG * 12,
    "词" * 700,
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "\u200b zero width \u00a0 nbsp \ufeff bom",
)

PROBE_PAIRS: tuple[tuple[str, str], ...] = (
    ("what is a panda?", "The giant panda is a bear species endemic to China."),
    ("what is a panda?", "hi"),
    ("what is a panda?", ""),
    ("", "An empty query still scores."),
    ("capital of France", "Paris is the capital and most populous city of France."),
    ("capital of France", "Berlin is the capital of Germany."),
    ("熊猫吃什么？", "大熊猫主要以竹子为食。"),
    ("Москва", "Москва — столица России."),
    ("long passage", _LONG * 12),
    (_LONG * 10, "a very long query is cut to three quarters of max_length"),
    (_LONG * 10, _LONG * 10),
    ("emoji 🙂", "symbols ∑∫√ and code def f(): pass"),
)
