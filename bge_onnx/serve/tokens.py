"""Counting tokens before the queue (limits, usage, the token budget) and the /tokenize route's tokens."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from ..tokenize import TOKENIZER_FILE


class TokenCounter:
    """A model's tokenizer.json without truncation or padding: how long each text really is.

    The runtime tokenises again when it encodes (its own truncation); counting here first is what lets the server
    refuse an over-long text instead of cutting it silently, and report usage.
    """

    def __init__(self, folder: Path) -> None:
        tokenizer = Tokenizer.from_file(str(Path(folder) / TOKENIZER_FILE))
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self._tokenizer = tokenizer
        self.pair_specials = tokenizer.num_special_tokens_to_add(True)

    def count(self, texts: list[str]) -> list[int]:
        """Tokens per text, special tokens included."""
        return [len(e) for e in self._tokenizer.encode_batch_fast(texts, add_special_tokens=True)]

    def count_parts(self, texts: list[str]) -> list[int]:
        """Tokens per text without special tokens (the parts of a reranker's pair)."""
        return [len(e) for e in self._tokenizer.encode_batch_fast(texts, add_special_tokens=False)]

    def tokens(self, texts: list[str], *, add_special_tokens: bool) -> list[list[dict]]:
        """TEI's /tokenize answer: per text, its tokens as {id, text, special, start, stop} (character offsets;
        a special token has no offsets and its own text)."""
        out = []
        for text, encoding in zip(texts, self._tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)):
            tokens = []
            for token_id, token, special, (start, stop) in zip(
                encoding.ids, encoding.tokens, encoding.special_tokens_mask, encoding.offsets
            ):
                if special:
                    tokens.append({"id": token_id, "text": token, "special": True, "start": None, "stop": None})
                else:
                    tokens.append({"id": token_id, "text": text[start:stop], "special": False, "start": start,
                                   "stop": stop})
            out.append(tokens)
        return out
