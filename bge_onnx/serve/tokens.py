"""Counting tokens before the queue (limits, usage, the token budget) and the /tokenize route's tokens."""

from __future__ import annotations

import itertools
from pathlib import Path

from tokenizers import Tokenizer

from ..tokenize import TOKENIZER_FILE, clip


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

    def measure(self, texts: list[str], limit: int, *, special: bool = True) -> tuple[list[str], list[int], list[bool]]:
        """Each text cut to a prefix that keeps its first ``limit`` tokens (so a 2 MB text costs what its first
        tokens cost), the tokens each holds (special tokens included where ``special``), and which were cut: a cut
        text's count is a lower bound, above ``limit``."""
        clipped = clip(self._tokenizer, texts, limit)
        counts = [len(e) for e in self._tokenizer.encode_batch_fast(clipped, add_special_tokens=special)]
        return clipped, counts, [a is not b for a, b in zip(clipped, texts)]

    def tokens(self, texts: list[str], *, add_special_tokens: bool) -> list[list[dict]]:
        """TEI's /tokenize answer: per text, its tokens as {id, text, special, start, stop}, where start and stop
        are offsets in the text's UTF-8 bytes, as TEI gives them; a special token has no offsets and its own text."""
        out = []
        for text, encoding in zip(texts, self._tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)):
            # tokenizers' Python offsets count characters; TEI's (the Rust crate's) count bytes
            at = range(len(text) + 1) if text.isascii() else [0, *itertools.accumulate(
                len(c.encode("utf-8")) for c in text)]
            tokens = []
            for token_id, token, special, (start, stop) in zip(
                encoding.ids, encoding.tokens, encoding.special_tokens_mask, encoding.offsets
            ):
                if special:
                    tokens.append({"id": token_id, "text": token, "special": True, "start": None, "stop": None})
                else:
                    tokens.append({"id": token_id, "text": text[start:stop], "special": False, "start": at[start],
                                   "stop": at[stop]})
            out.append(tokens)
        return out

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def decode(self, sequences: list[list[int]], *, skip_special_tokens: bool) -> list[str]:
        """TEI's /decode answer: each sequence of token ids as text."""
        return self._tokenizer.decode_batch(sequences, skip_special_tokens=skip_special_tokens)
