"""Every gallery entry's id and label, as arrays: what search results are named with, what the
id map in PaddleX's ``id_map.yaml`` holds, and what a change log's relabel changes; and the one
rule a new label keeps (:func:`clean_label`)."""

from __future__ import annotations

import unicodedata
from collections import Counter
from collections.abc import Sequence

import numpy as np

from shitu.errors import ShiTuError

MAX_LABEL_CHARS = 256


def clean_label(label: object) -> str:
    """A label as it is stored: trimmed, 1 to :data:`MAX_LABEL_CHARS` characters of valid
    Unicode (no lone surrogates, which no file or database can store) and no control characters
    (a line break would split a PaddleX label file line). :class:`ShiTuError` says what is wrong."""
    text = str(label).strip()
    if not text:
        raise ShiTuError("a label cannot be empty")
    shown = text[:40].encode("utf-8", "backslashreplace").decode("utf-8")
    if len(text) > MAX_LABEL_CHARS:
        raise ShiTuError(f"the label {shown!r}... is longer than {MAX_LABEL_CHARS} characters")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ShiTuError(f"the label {shown!r} is not valid text (it holds a lone surrogate)") from None
    if any(unicodedata.category(ch) == "Cc" for ch in text):
        raise ShiTuError(f"the label {shown!r} contains a control character (a tab, a line break ...)")
    return text


class LabelTable:
    """Every entry's id and label as arrays (immutable): ``ids`` sorted, ``codes`` indexing
    ``names``. ~12 bytes an entry, where a dict of objects took ~250; a change makes a new
    table with one array copy (a few ms at 1M entries)."""

    __slots__ = ("ids", "codes", "names", "code_of")

    def __init__(self, ids: np.ndarray, codes: np.ndarray, names: list[str], code_of: dict[str, int]):
        self.ids, self.codes, self.names, self.code_of = ids, codes, names, code_of

    @classmethod
    def of(cls, ids: Sequence[int] | np.ndarray, labels: Sequence[str]) -> "LabelTable":
        ids = np.asarray(ids, dtype=np.int64)
        order = np.argsort(ids, kind="stable")
        code_of: dict[str, int] = {}
        codes = np.fromiter((code_of.setdefault(str(lb), len(code_of)) for lb in labels), np.int32, len(ids))
        names = list(code_of)
        return cls(ids[order], codes[order], names, code_of)

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, id_: int) -> bool:
        pos = int(np.searchsorted(self.ids, id_))
        return pos < len(self.ids) and int(self.ids[pos]) == int(id_)

    def positions(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Where ``ids`` sit (``-1`` for ids not here)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        pos = np.searchsorted(self.ids, ids)
        found = pos < len(self.ids)
        found[found] = self.ids[pos[found]] == ids[found]
        return np.where(found, pos, -1)

    def get(self, id_: int) -> str | None:
        pos = self.positions([id_])[0]
        return self.names[self.codes[pos]] if pos >= 0 else None

    def labels_of(self, ids: Sequence[int] | np.ndarray) -> list[str | None]:
        return [self.names[self.codes[p]] if p >= 0 else None for p in self.positions(ids)]

    def _codes_for(self, labels: Sequence[str]) -> tuple[np.ndarray, list[str], dict[str, int]]:
        names, code_of = self.names, self.code_of
        if any(lb not in code_of for lb in labels):
            names, code_of = list(names), dict(code_of)
            for lb in labels:
                if lb not in code_of:
                    code_of[lb] = len(names)
                    names.append(lb)
        return np.asarray([code_of[lb] for lb in labels], dtype=np.int32), names, code_of

    def added(self, ids: np.ndarray, labels: Sequence[str]) -> "LabelTable":
        """With new ids (all above the current ones: ids only grow)."""
        codes, names, code_of = self._codes_for(list(labels))
        return LabelTable(np.concatenate([self.ids, ids]), np.concatenate([self.codes, codes]), names, code_of)

    def removed(self, ids: Sequence[int]) -> "LabelTable":
        pos = self.positions(ids)
        return LabelTable(np.delete(self.ids, pos), np.delete(self.codes, pos), self.names, self.code_of)

    def relabelled(self, ids: Sequence[int], label: str) -> "LabelTable":
        codes, names, code_of = self._codes_for([label])
        new = self.codes.copy()
        new[self.positions(ids)] = codes[0]
        return LabelTable(self.ids, new, names, code_of)

    def counts(self) -> Counter:
        counts = np.bincount(self.codes, minlength=len(self.names))
        return Counter({self.names[c]: int(n) for c, n in enumerate(counts.tolist()) if n})

    def distinct(self) -> int:
        """How many labels have an entry (O(entries) in numpy: no per-label objects)."""
        return int(np.count_nonzero(np.bincount(self.codes, minlength=len(self.names))))

    def to_dict(self) -> dict[int, str]:
        names = self.names
        return dict(zip(self.ids.tolist(), [names[c] for c in self.codes.tolist()], strict=True))
