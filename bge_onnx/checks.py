"""Checking what callers pass: positive ints, texts and pairs; an error names the bad value and its index."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence

from .errors import BgeOnnxError, ConfigError, InputError, InputTypeError


def describe(value: object) -> str:
    """``repr(value)``, cut to 80 characters for error messages."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def json_loads(text: str | bytes | bytearray) -> object:
    """``json.loads``, with nesting too deep for Python's parser (a RecursionError: 100,000 ``[`` fit in a
    200 KB body) raised as the ValueError that every other malformed JSON raises, so that it is refused as bad
    input, not taken for an internal error.

    >>> json_loads("[" * 100000 + "]" * 100000)
    Traceback (most recent call last):
    ...
    ValueError: JSON nested too deeply for this parser
    """
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply for this parser") from None


def positive_int(name: str, value: object, *, error: type[BgeOnnxError] = InputError) -> int:
    """Return ``value`` if it is an int >= 1 (not a bool), else raise ``error`` (InputError; ConfigError for a
    setting) naming ``name``.

    >>> positive_int("batch_size", 8)
    8
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise error(f"{name} must be a positive int, got {describe(value)}")
    return value


# what every refusal of an unencodable text says to do
CLEAN_HINT = "text.encode('utf-8', 'replace').decode('utf-8')"


def utf8_problem(text: str) -> str | None:
    """Why ``text`` cannot be encoded as UTF-8 (a lone surrogate, from a JSON escape such as "\\ud800"), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return f"cannot be encoded as UTF-8 ({err.reason} at position {err.start})"
    return None


def env_flag(name: str, *, default: bool = False) -> bool:
    """A yes/no setting from the environment: 1/true/yes/on or 0/false/no/off (any case); ``default`` when unset
    or empty.

    Raises:
        ConfigError: any other value.
    """
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"${name} must be 1/true/yes/on or 0/false/no/off, got {value!r}")


def check_texts(texts: object, *, name: str = "texts", start: int = 0) -> list[str]:
    """Return ``texts`` as a list of str, or raise an error naming the first bad item (its index counts from ``start``).

    Raises:
        InputTypeError: ``texts`` is not a list/iterable of str, or an item is not a str.
    """
    if isinstance(texts, (str, bytes, bytearray)) or not isinstance(texts, Iterable):
        raise InputTypeError(
            f"{name} must be a list of str, got {type(texts).__name__} {describe(texts)}"
        )
    items = list(texts)
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise InputTypeError(
                f"{name}[{start + i}] is {type(item).__name__} {describe(item)}, expected str"
            )
    return items


def check_pairs(pairs: object) -> list[tuple[str, str]]:
    """Return ``pairs`` as a list of (query, passage) tuples, or raise naming the first bad pair.

    Raises:
        InputTypeError: not a list of 2-item (str, str) pairs.
    """
    if isinstance(pairs, (str, bytes, bytearray)) or not isinstance(pairs, Iterable):
        raise InputTypeError(
            f"pairs must be a list of (query, passage) pairs, got {type(pairs).__name__} "
            f"{describe(pairs)}"
        )
    items = []
    for i, pair in enumerate(pairs):
        if isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise InputTypeError(
                f"pairs[{i}] is {type(pair).__name__} {describe(pair)}, expected a (query, passage) "
                "pair of two str"
            )
        for j, part in enumerate(pair):
            if not isinstance(part, str):
                which = "query" if j == 0 else "passage"
                raise InputTypeError(
                    f"pairs[{i}][{j}] (the {which}) is {type(part).__name__} {describe(part)}, "
                    "expected str"
                )
        items.append((pair[0], pair[1]))
    return items
