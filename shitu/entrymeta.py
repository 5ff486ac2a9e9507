"""Per-entry metadata — where each gallery image came from and its thumbnail — in SQLite.

One JSON document stops scaling long before a million entries (every change rewrote all of
it, and every thumbnail sat in memory). Rows live in ``shitu_entries.sqlite`` in the index
dir and are read a page at a time. A row is written once, when its entry is added, and never
changed (a relabel changes the label, which lives with the vectors in PaddleX's id map), and
ids are never reused; so every version of an index can read the same file. A full save
therefore hard-links it into the new copy instead of copying it (copying where a link is not
possible), and rows of removed entries stay for the earlier versions that still list them.

Rows not yet in a file (an index built in memory, or loaded from the older JSON metadata) are
held in ``pending`` until the index is saved.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

ENTRIES_FILE = "shitu_entries.sqlite"
Row = tuple[str, bytes | None]  # (source, thumbnail JPEG)
_SCHEMA = "CREATE TABLE IF NOT EXISTS entries (id INTEGER PRIMARY KEY, source TEXT NOT NULL, thumbnail BLOB)"
_CHUNK = 900  # SQLite's default limit of host parameters per statement is 999


class EntryMeta:
    """Read access to the rows of one index (``db``, possibly not there yet) plus unsaved ones."""

    def __init__(self, db: str | Path | None = None, pending: Mapping[int, Row] | None = None):
        self.db = Path(db) if db else None
        self.pending: dict[int, Row] = dict(pending or {})

    def with_rows(self, rows: Mapping[int, Row]) -> "EntryMeta":
        return EntryMeta(self.db, {**self.pending, **rows})

    def get(self, ids: Iterable[int], *, thumbnails: bool = True) -> dict[int, Row]:
        """``id → (source, thumbnail)`` for the ids that have a row (thumbnail ``None`` when
        not asked for or not stored)."""
        wanted = [int(i) for i in ids]
        out = {i: self.pending[i] for i in wanted if i in self.pending}
        rest = [i for i in wanted if i not in out]
        if rest and self.db is not None:
            with _connect(self.db, readonly=True) as con:
                if con is not None:
                    column = "thumbnail" if thumbnails else "NULL"
                    for k in range(0, len(rest), _CHUNK):
                        part = rest[k : k + _CHUNK]
                        marks = ",".join("?" * len(part))
                        query = f"SELECT id, source, {column} FROM entries WHERE id IN ({marks})"  # noqa: S608 - only '?'s
                        for id_, source, thumb in con.execute(query, part):
                            out[int(id_)] = (source, thumb)
        if not thumbnails:
            out = {i: (row[0], None) for i, row in out.items()}
        return out

    def in_memory(self, ids: Iterable[int]) -> "EntryMeta":
        """These ids' rows held in memory, independent of any file."""
        return EntryMeta(None, self.get(ids))

    def flush(self, db: str | Path) -> "EntryMeta":
        """Write the pending rows into ``db``; the saved view."""
        write_rows(db, self.pending)
        return EntryMeta(db)

    def save_to(self, target: str | Path, live_ids: Iterable[int]) -> "EntryMeta":
        """A complete file at ``target`` for a new copy of the index: the current file linked
        (or copied), plus the pending rows of ``live_ids``."""
        target = Path(target)
        if self.db is not None and self.db.exists() and self.db.resolve() != target.resolve():
            if target.exists():
                target.unlink()
            try:
                os.link(self.db, target)
            except OSError:
                shutil.copyfile(self.db, target)
        live = set(int(i) for i in live_ids) if self.pending else set()
        return EntryMeta(target, {i: r for i, r in self.pending.items() if i in live}).flush(target)


def write_rows(db: str | Path, rows: Mapping[int, Row]) -> None:
    """Insert (or replace) rows in one transaction; creates the file if needed."""
    with _connect(Path(db), readonly=False) as con:
        assert con is not None
        con.executemany(
            "INSERT OR REPLACE INTO entries (id, source, thumbnail) VALUES (?, ?, ?)",
            ((int(i), str(s or ""), t) for i, (s, t) in rows.items()),
        )


@contextlib.contextmanager
def _connect(db: Path, *, readonly: bool) -> Iterator[sqlite3.Connection | None]:
    if readonly and not db.exists():
        yield None
        return
    # readers open read-write too where they may: a writer killed mid-transaction leaves a hot
    # journal that the next connection must roll back, which a read-only one cannot do
    uri = db.resolve().as_uri()
    writable = not readonly or os.access(db, os.W_OK) and os.access(db.parent, os.W_OK)
    con = sqlite3.connect(uri + ("?mode=rwc" if not readonly else "?mode=rw" if writable else "?mode=ro"),
                          uri=True, timeout=60)  # fmt: skip
    try:
        if not readonly:
            con.execute(_SCHEMA)
            with con:
                yield con
        else:
            try:
                yield con
            except sqlite3.OperationalError as exc:
                if "no such table" not in str(exc):
                    raise
    finally:
        con.close()
