"""HF tokenizers: batches of texts or (query, passage) pairs, truncation (FlagReranker's rules for pairs), padding."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import Encoding, Tokenizer

from .checks import CLEAN_HINT, describe, utf8_problem
from .errors import InputError, ModelFilesError, ModelIntegrityError

TOKENIZER_FILE = "tokenizer.json"

# A text is cut to a prefix before it is tokenised in full: tokenising 2 MB of text to keep its first 512 tokens
# took a server from 250 MB to 1.1 GB. A cut can change the tokens before it: a WordPiece word over 100 characters is
# one [UNK] but its first 90 characters are many pieces, and a Unigram (SentencePiece) segmentation of an unbroken
# run is found over the whole run, so its first pieces can change with where the run ends. So a text is cut only at
# a space (U+0020: a word boundary for WordPiece, byte-level BPE and Metaspace alike), and only where a prefix about
# half as long, also ending at a space, gives the same first tokens. The shorter prefix ends within its last half of
# CLIP_CHARS characters per token wanted and must hold CLIP_MARGIN tokens beyond the limit; where it holds fewer,
# has no space there, or the two disagree, both double. A text with no spaces (a CJK paragraph for bge-m3) is then
# tokenised whole, as before.
CLIP_MARGIN = 16
CLIP_CHARS = 8


def _cut(text: str, chars: int) -> int:
    """Where to cut ``text`` near ``chars`` characters: the last space in its second half, or -1."""
    return text.rfind(" ", chars // 2, chars)


def clip(tokenizer: Tokenizer, texts: Sequence[str], limit: int) -> list[str]:
    """``texts``, each long one cut to a prefix whose first ``limit`` tokens are the whole text's first ``limit``.

    ``tokenizer`` must not truncate. A text that is not cut comes back as it is (the same object).
    """
    need = limit + CLIP_MARGIN
    chars = need * CLIP_CHARS
    out = list(texts)
    todo = [i for i, text in enumerate(texts) if len(text) > 2 * chars]
    while todo:
        cuts = {i: (_cut(texts[i], chars), _cut(texts[i], 2 * chars)) for i in todo}
        tried = [i for i in todo if min(cuts[i]) > 0]
        short = tokenizer.encode_batch_fast([texts[i][: cuts[i][0]] for i in tried], add_special_tokens=False)
        long = tokenizer.encode_batch_fast([texts[i][: cuts[i][1]] for i in tried], add_special_tokens=False)
        done = set()
        for i, a, b in zip(tried, short, long):
            if len(a) >= need and a.ids[:need] == b.ids[:need]:
                out[i] = texts[i][: cuts[i][1]]
                done.add(i)
        todo, chars = [i for i in todo if i not in done and len(texts[i]) > 4 * chars], 2 * chars
    return out


def _raise_unencodable(texts: Sequence[str], name: str, err: Exception, start: int = 0) -> None:
    """Find the text that the tokenizer refused (a lone surrogate) and name it."""
    for i, text in enumerate(texts):
        problem = utf8_problem(text)
        if problem:
            raise InputError(f"{name}[{start + i}] {problem}: {describe(text)}. Clean it first, e.g. {CLEAN_HINT}") from err
    raise err


def check_encodable(texts: Sequence[str], *, name: str = "texts", start: int = 0) -> None:
    """Raise InputError naming the first text that cannot be encoded as UTF-8 (a lone surrogate)."""
    try:
        "".join(texts).encode("utf-8")
    except UnicodeEncodeError as err:
        _raise_unencodable(texts, name, err, start)


class TextTokenizer:
    """A model's tokenizer.json with our own truncation and padding (the file's settings are ignored).

    Some checkpoints ship tokenizer.json with padding/truncation baked in (all-MiniLM-L6-v2's pads and
    cuts at 128); the reference model never uses those, so neither do we.
    """

    def __init__(self, folder: Path, *, max_length: int) -> None:
        path = Path(folder) / TOKENIZER_FILE
        if not path.is_file():
            raise ModelFilesError(f"{path} is missing; re-export or re-download the model.")
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a bare Exception on a corrupt file
            raise ModelIntegrityError(f"{path} is not a valid tokenizer file: {err}") from err
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length)
        self._truncating = tokenizer
        self._untruncated: Tokenizer | None = None  # for pairs, made on first use: copying costs ~70 ms of load
        self.max_length = max_length
        self.pair_specials = tokenizer.num_special_tokens_to_add(True)

    @property
    def _plain(self) -> Tokenizer:
        if self._untruncated is None:  # two threads may both make one; either will do
            plain = Tokenizer.from_str(self._truncating.to_str())
            plain.no_truncation()
            self._untruncated = plain
        return self._untruncated

    def encode_texts(self, texts: list[str], *, name: str = "texts", start: int = 0) -> tuple[list[Encoding], int]:
        """Tokenise with special tokens, cut at max_length; return encodings and how many were cut."""
        encodings = self._encode(self._truncating, texts, self.max_length, name=name, start=start, special=True)
        cut = sum(1 for e in encodings if e.overflowing)
        return encodings, cut

    def _encode(self, tokenizer: Tokenizer, texts: list[str], limit: int, *, name: str, start: int,
                special: bool) -> list[Encoding]:
        """``texts`` cut to what ``limit`` tokens need (clip), then tokenised; a text that is not valid Unicode is
        named, also where the cut would have dropped the bad part."""
        try:
            clipped = self.clip(texts, limit)
            if any(a is not b for a, b in zip(clipped, texts)):  # a lone surrogate past the cut is still refused
                check_encodable(texts, name=name, start=start)
            # _fast: without character offsets, which nothing here uses (docs/decisions.md)
            return tokenizer.encode_batch_fast(clipped, add_special_tokens=special)
        except TypeError as err:
            _raise_unencodable(texts, name, err, start)

    def clip(self, texts: Sequence[str], limit: int) -> list[str]:
        """``texts`` with each long one cut to a prefix that tokenises to the same first ``limit`` tokens."""
        if all(len(text) <= 2 * (limit + CLIP_MARGIN) * CLIP_CHARS for text in texts):
            return list(texts)  # the usual case: no tokenizer without truncation needed
        return clip(self._plain, texts, limit)

    def decode_id(self, token_id: int) -> str:
        """One token id as text, special tokens included (as transformers' decode([id]))."""
        return self._truncating.decode([token_id], skip_special_tokens=False)

    def encode_pairs(
        self, pairs: list[tuple[str, str]], *, query_max_length: int, start: int = 0
    ) -> tuple[list[Encoding], int]:
        """Tokenise (query, passage) pairs by FlagReranker's rules; return encodings and how many were cut.

        FlagReranker cuts the query to query_max_length tokens and the passage to max_length, then adds
        special tokens and shortens only the passage until the pair fits max_length.
        """
        queries = [q for q, _ in pairs]
        passages = [p for _, p in pairs]
        query_encodings = self._encode(self._plain, queries, query_max_length, name="queries", start=start,
                                       special=False)
        passage_encodings = self._encode(self._plain, passages, self.max_length, name="passages", start=start,
                                         special=False)
        encodings = []
        cut = 0
        for query, passage in zip(query_encodings, passage_encodings):
            was_cut = len(query) > query_max_length or len(passage) > self.max_length
            query.truncate(query_max_length)
            passage.truncate(self.max_length)
            excess = len(query) + len(passage) + self.pair_specials - self.max_length
            # Like transformers' prepare_for_model: a passage too short to absorb the excess is left alone.
            if excess > 0 and len(passage) > excess:
                passage.truncate(len(passage) - excess)
                was_cut = True
            cut += was_cut
            encodings.append(self._plain.post_process(query, passage, add_special_tokens=True))
        return encodings, cut


def pad_batch(encodings: Sequence[Encoding], *, pad_id: int, input_names: Sequence[str]) -> dict[str, np.ndarray]:
    """Pad a batch to its longest item and return only the graph inputs the model declares."""
    length = max(len(e) for e in encodings)  # len(e), not len(e.ids): .ids copies the list
    shape = (len(encodings), length)
    ids = np.full(shape, pad_id, dtype=np.int64)
    mask = np.zeros(shape, dtype=np.int64)
    types = np.zeros(shape, dtype=np.int64) if "token_type_ids" in input_names else None
    for row, encoding in enumerate(encodings):
        n = len(encoding)
        ids[row, :n] = encoding.ids
        mask[row, :n] = 1
        if types is not None:
            types[row, :n] = encoding.type_ids
    feeds = {"input_ids": ids, "attention_mask": mask}
    if types is not None:
        feeds["token_type_ids"] = types
    return {name: feeds[name] for name in input_names}
