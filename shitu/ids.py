"""Entry ids as people and files write them: ``3, 7 12 192-197``, lists, id files."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from shitu.errors import NotFound, ShiTuError


def parse_ids(value: Any, *, allow_empty: bool = False) -> list[int]:
    """Entry ids from a list, one id, or a text like ``"3, 7 12 192-197"`` (ranges included).
    Booleans and fractions are refused, not taken for 1/0. Nothing given is an error unless
    ``allow_empty`` (then ``[]``)."""
    if isinstance(value, str):
        parts: list[Any] = value.replace(",", " ").split()
    elif isinstance(value, (int, np.integer, float)):
        parts = [value]
    elif isinstance(value, Iterable) and not isinstance(value, (bytes, dict)):
        parts = list(value)
    else:
        raise ShiTuError(f"{value!r} is not a list of entry ids")
    ids: list[int] = []
    for part in parts:
        ids.extend(_one_id(part))
    if not ids and not allow_empty:
        raise ShiTuError("no ids were given")
    return list(dict.fromkeys(ids))


def read_id_file(path: str | Path) -> list[int]:
    """Ids from a text file: one id or range per line (first column); ``#`` starts a comment."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError):
        raise NotFound(f"cannot read the id file {path.name}") from None
    return parse_ids([ln.split()[0] for ln in lines if ln.strip() and not ln.lstrip().startswith("#")])


def _one_id(part: Any) -> list[int]:
    bad = ShiTuError(f"{part!r} is not an entry id (ids are whole numbers, or ranges like 192-197)")
    if isinstance(part, (bool, np.bool_)) or isinstance(part, float) and not part.is_integer():
        raise bad
    if isinstance(part, (int, np.integer, float)):
        return [int(part)]
    text = str(part).strip()
    lo, sep, hi = text.partition("-")
    if sep and lo.strip().isdigit() and hi.strip().isdigit():
        first, last = int(lo), int(hi)
        if last < first or last - first > 100_000:
            raise ShiTuError(f"{text!r} is not a usable id range")
        return list(range(first, last + 1))
    if text.lstrip("-").isdigit():
        return [int(text)]
    raise bad
