"""Typed changes to a gallery: the one vocabulary of the change log, Milvus's version records,
version diffs and replay.

A committed change is a short chain of these records. Each knows how to apply itself to an
index (:meth:`Change.apply`, used to replay a log), to an ``id → label`` map in either
direction (:meth:`Change.forward` / :meth:`Change.backward`, used to show and restore
versions without reading a vector) and how it is written down (:func:`encode` /
:func:`decode`: a JSON item, with its arrays either inline or as numbered arrays beside it,
which is how the change log stores vectors).

>>> add = Add(np.array([7]), ("cola",))
>>> id_map = {3: "tea"}
>>> add.forward(id_map); id_map
{3: 'tea', 7: 'cola'}
>>> add.backward(id_map); id_map
{3: 'tea'}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from shitu.errors import ShiTuError

if TYPE_CHECKING:
    from shitu.index import GalleryIndex


def _ids(values: Any) -> np.ndarray:
    return np.asarray(values, dtype=np.int64).reshape(-1)


@dataclass(frozen=True, eq=False)
class Change:
    """One step of a committed change."""

    op: ClassVar[str] = ""

    @property
    def count(self) -> int:
        """Entries it touches (0 for changes of state only)."""
        return 0

    def apply(self, index: GalleryIndex) -> GalleryIndex:
        """``index`` with this change replayed (nothing is recalibrated: the calibration a
        commit made travels with its record)."""
        return index

    def forward(self, id_map: dict[int, str]) -> None:
        """Make ``id_map`` (``id → label``) the one after this change."""

    def backward(self, id_map: dict[int, str]) -> None:
        """Make ``id_map`` the one before this change (needs the labels it replaced)."""

    def removed_ids(self) -> list[int]:
        """Ids whose rows this change takes away (a restore brings them back)."""
        return []


@dataclass(frozen=True, eq=False)
class Add(Change):
    """Entries appended. ``vectors``: the stored (projected) vectors; ``raw``: the unprojected
    float16 features of an adapted index. Records that keep the vectors elsewhere (Milvus
    rows) carry neither."""

    ids: np.ndarray
    labels: tuple[str, ...]
    vectors: np.ndarray | None = None
    raw: np.ndarray | None = None
    op: ClassVar[str] = "add"

    @property
    def count(self) -> int:
        return len(self.ids)

    def apply(self, index: GalleryIndex) -> GalleryIndex:
        if self.vectors is None:
            raise ShiTuError("this change record keeps no vectors, so it cannot be replayed")
        return index.with_added(self.ids, self.labels, self.vectors, raw=self.raw)

    def forward(self, id_map: dict[int, str]) -> None:
        id_map.update(zip(self.ids.tolist(), self.labels, strict=True))

    def backward(self, id_map: dict[int, str]) -> None:
        for i in self.ids.tolist():
            id_map.pop(i, None)


@dataclass(frozen=True, eq=False)
class Remove(Change):
    """Entries removed. ``labels``: what they were (``None`` in records written before the
    labels were kept; such a record cannot be undone on an id map)."""

    ids: np.ndarray
    labels: tuple[str, ...] | None = None
    op: ClassVar[str] = "remove"

    @property
    def count(self) -> int:
        return len(self.ids)

    def apply(self, index: GalleryIndex) -> GalleryIndex:
        return index.remove(self.ids, calibrate=False)

    def forward(self, id_map: dict[int, str]) -> None:
        for i in self.ids.tolist():
            id_map.pop(i, None)

    def backward(self, id_map: dict[int, str]) -> None:
        if self.labels is None:
            raise ShiTuError("this change record does not say which labels it removed")
        id_map.update(zip(self.ids.tolist(), self.labels, strict=True))

    def removed_ids(self) -> list[int]:
        return self.ids.tolist()


@dataclass(frozen=True, eq=False)
class Relabel(Change):
    """Entries given ``label``; ``previous``: each one's label before (``None`` in older records)."""

    ids: np.ndarray
    label: str
    previous: tuple[str, ...] | None = None
    op: ClassVar[str] = "relabel"

    @property
    def count(self) -> int:
        return len(self.ids)

    def apply(self, index: GalleryIndex) -> GalleryIndex:
        return index.relabel(self.ids.tolist(), self.label, calibrate=False, replayed=True)

    def forward(self, id_map: dict[int, str]) -> None:
        id_map.update(dict.fromkeys(self.ids.tolist(), self.label))

    def backward(self, id_map: dict[int, str]) -> None:
        if self.previous is None:
            raise ShiTuError("this change record does not say which labels it replaced")
        id_map.update(zip(self.ids.tolist(), self.previous, strict=True))


@dataclass(frozen=True, eq=False)
class SetThreshold(Change):
    """The user picked another operating point (the calibration travels in the record's state)."""

    op: ClassVar[str] = "threshold"


@dataclass(frozen=True, eq=False)
class Refit(Change):
    """Same entries, a new projection or calibration (Milvus records; files save in full)."""

    op: ClassVar[str] = "refit"


@dataclass(frozen=True, eq=False)
class Rewrite(Change):
    """Every row written anew: a build, an import, a restore of an earlier build (Milvus records)."""

    op: ClassVar[str] = "all"


KINDS: dict[str, type[Change]] = {kind.op: kind for kind in (Add, Remove, Relabel, SetThreshold, Refit, Rewrite)}


def describe(chain: list[Change]) -> str:
    """A version's action from its changes: ``add 1``, ``remove 2, relabel 3``, ``threshold``."""
    counts: dict[str, int] = {}
    for change in chain:
        counts[change.op] = counts.get(change.op, 0) + change.count
    return ", ".join(f"{op} {n}" if n else op for op, n in counts.items())


# --- writing them down -------------------------------------------------------------------------
def encode(change: Change, arrays: list[np.ndarray] | None = None) -> dict[str, Any]:
    """``change`` as a JSON item. With ``arrays``, its arrays are appended there and the item
    names their positions (the change log); without, ids go inline and vectors are left out
    (Milvus's version records, whose rows hold the vectors)."""
    item: dict[str, Any] = {"op": change.op}
    fields: dict[str, np.ndarray] = {}
    if isinstance(change, Add):
        item["labels"] = list(change.labels)
        fields = {"ids": change.ids, "vectors": change.vectors, "raw": change.raw}
    elif isinstance(change, Remove):
        if change.labels is not None:
            item["labels"] = list(change.labels)
        fields = {"ids": change.ids}
    elif isinstance(change, Relabel):
        item["label"] = change.label
        if change.previous is not None:
            item["previous"] = list(change.previous)
        fields = {"ids": change.ids}
    if arrays is None:
        if "ids" in fields:
            item["ids"] = fields["ids"].tolist()
        return item
    item["arrays"] = {}
    for name, value in fields.items():
        if value is not None:
            item["arrays"][name] = len(arrays)
            arrays.append(value)
    return item


def decode(item: dict[str, Any], arrays: list[np.ndarray] | None = None) -> Change:
    """The change an :func:`encode` item describes (``arrays``: the record's arrays, when the
    item refers to them by position). Items of older records decode too."""
    kind = KINDS.get(item.get("op"))  # type: ignore[arg-type]
    if kind is None:
        raise ShiTuError(f"unknown change {item.get('op')!r} in a change record")
    named = {name: arrays[pos] for name, pos in item.get("arrays", {}).items()} if arrays is not None else {}
    ids = _ids(named["ids"]) if "ids" in named else _ids(item.get("ids", []))
    if kind is Add:
        return Add(ids, tuple(item["labels"]), named.get("vectors"), named.get("raw"))
    if kind is Remove:
        labels = item.get("labels")
        return Remove(ids, tuple(labels) if labels is not None else None)
    if kind is Relabel:
        previous = item.get("previous", item.get("old"))  # "old": Milvus records before the typed changes
        return Relabel(ids, item["label"], tuple(previous) if previous is not None else None)
    return kind()
