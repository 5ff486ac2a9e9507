"""Entry ids as people and files write them: ``3, 7 12 192-197``, lists, id files.

Ranges stay ranges until they are merged: ``"0-100000 " * 300`` is one range of 100,001 ids, not
30 million list items. Whatever is asked for, at most :data:`MAX_IDS` distinct ids come out, each a
whole number from 0 to 2⁶³-1 (faiss's and SQLite's id type).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from shitu.errors import NotFound, ShiTuError, TooLarge

MAX_ID = (1 << 63) - 1
MAX_IDS = 200_000  # distinct ids one request may name (a 1M gallery is changed a few requests at a time)
MAX_ID_TEXT = 1 << 20  # characters of id text read at most


def parse_ids(value: Any, *, allow_empty: bool = False) -> list[int]:
    """Entry ids from a list, one id, or a text like ``"3, 7 12 192-197"`` (ranges included), in
    the order first given, each once. Booleans and fractions are refused, not taken for 1/0.
    Nothing given is an error unless ``allow_empty`` (then ``[]``)."""
    if isinstance(value, str):
        if len(value) > MAX_ID_TEXT:
            raise TooLarge(f"the id text is longer than {MAX_ID_TEXT:,} characters")
        parts: list[Any] = value.replace(",", " ").split()
    elif isinstance(value, (int, np.integer, float)):
        parts = [value]
    elif isinstance(value, Iterable) and not isinstance(value, (bytes, dict)):
        parts = list(value)
    else:
        raise ShiTuError(f"{value!r} is not a list of entry ids")
    spans = [_span(part) for part in parts]
    total = _distinct(spans)
    if total > MAX_IDS:
        raise TooLarge(f"{total:,} entry ids were given; at most {MAX_IDS:,} can be changed at once")
    seen: set[int] = set()
    ids: list[int] = []
    for first, last in spans:
        for i in range(first, last + 1):
            if i not in seen:
                seen.add(i)
                ids.append(i)
    if not ids and not allow_empty:
        raise ShiTuError("no ids were given")
    return ids


def read_id_file(path: str | Path) -> list[int]:
    """Ids from a text file: one id or range per line (first column); ``#`` starts a comment."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError):
        raise NotFound(f"cannot read the id file {path.name}") from None
    return parse_ids([ln.split()[0] for ln in lines if ln.strip() and not ln.lstrip().startswith("#")])


def _span(part: Any) -> tuple[int, int]:
    """``(first, last)`` of one id or range, checked."""
    bad = ShiTuError(f"{str(part)[:40]!r} is not an entry id (ids are whole numbers, or ranges like 192-197)")
    if isinstance(part, (bool, np.bool_)) or isinstance(part, float) and not part.is_integer():
        raise bad
    if isinstance(part, (int, np.integer, float)):
        return _bounded(int(part), part), _bounded(int(part), part)
    text = str(part).strip()
    lo, sep, hi = text.partition("-")
    if sep and lo.strip().isascii() and lo.strip().isdigit() and hi.strip().isascii() and hi.strip().isdigit():
        first, last = _bounded(int(lo), text), _bounded(int(hi), text)
        if last < first:
            raise ShiTuError(f"{text[:40]!r} is not a usable id range (it runs backwards)")
        return first, last
    if text.isascii() and text.isdigit():
        value = _bounded(int(text), text)
        return value, value
    raise bad


def _bounded(value: int, shown: Any) -> int:
    if not 0 <= value <= MAX_ID:
        raise ShiTuError(f"{str(shown)[:40]!r} is not an entry id: ids are whole numbers from 0 to 2^63-1")
    return value


def _distinct(spans: list[tuple[int, int]]) -> int:
    """How many distinct ids the spans cover (merged, never listed)."""
    total, end = 0, -1
    for first, last in sorted(spans):
        if last <= end:
            continue
        total += last - max(first, end + 1) + 1
        end = last
    return total
