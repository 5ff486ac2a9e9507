"""What a Milvus gallery keeps besides its rows and its head: one record per version (what changed,
as typed changes without vectors, and the index's state: next id, calibration, adaptation,
projection key) and the projection matrices of adapted galleries.

Milvus has no place for bytes without a vector (every collection needs a vector field), so they live
in a **sidecar**: one SQLite database (WAL mode), by default beside a Milvus Lite file
(``<file>.shitu-state.sqlite``) or, for a Milvus server, ``<data_dir>/milvus_state.sqlite``
(``SHITU_MILVUS_STATE`` names another). Replicas sharing a server must share this file (one machine,
or a volume all of them mount): a replica that cannot read a version's record says where it looked.
Each gallery's *head* (version, epoch, next id, ...) is a property of its own collection, kept by
Milvus's metadata store (:meth:`~shitu.stores.milvus_collections.MilvusCollections.get_meta`).

Data written by earlier versions (records and projections as base64 parts in a ``<prefix>blob``
collection with a placeholder vector) is moved here the first time a store opens it, and that
collection is dropped (:meth:`MilvusState.migrate`).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import logging
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from shitu.adapt import Projection
from shitu.errors import ShiTuError
from shitu.index import Whitening
from shitu.stores.milvus_collections import MilvusCollections

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    prefix TEXT NOT NULL, gallery TEXT NOT NULL, version INTEGER NOT NULL, body TEXT NOT NULL,
    PRIMARY KEY (prefix, gallery, version));
CREATE TABLE IF NOT EXISTS projections (
    prefix TEXT NOT NULL, key TEXT NOT NULL, gallery TEXT NOT NULL, data BLOB NOT NULL,
    PRIMARY KEY (prefix, key));
"""
_LEGACY_BLOBS = "blob"  # <prefix>blob: where versions before the sidecar kept records and projections


def default_path(rows: MilvusCollections, data_dir: Path | None) -> Path:
    """Beside a Milvus Lite file; for a server, in the data dir (a server without one needs a path)."""
    lite = rows.connection.lite_path
    if lite is not None:
        return Path(f"{lite}.shitu-state.sqlite")
    if data_dir is None:
        raise ShiTuError(f"Milvus at {rows.uri}: say where its state file lives (SHITU_MILVUS_STATE)")
    return data_dir / "milvus_state.sqlite"


class MilvusState:
    """Version records and projections of the galleries of one :class:`MilvusCollections` (its
    prefix), in the SQLite file ``path``."""

    def __init__(self, rows: MilvusCollections, path: str | Path):
        self._rows = rows
        self._prefix = rows.prefix
        self.path = Path(path)
        self._migrated = False
        self._guard = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._db() as db:
            db.executescript(_SCHEMA)

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        """One short connection per call (threads and processes share the file; SQLite locks it)."""
        try:
            db = sqlite3.connect(self.path, timeout=30.0)
        except sqlite3.Error as e:
            raise ShiTuError(f"cannot open the Milvus state file {self.path}: {e}") from None
        try:
            db.execute("PRAGMA journal_mode=WAL")
            with db:  # one transaction
                yield db
        except sqlite3.Error as e:
            raise ShiTuError(f"the Milvus state file {self.path} failed: {e}") from None
        finally:
            db.close()

    # --- version records ---------------------------------------------------------------------
    def record(self, name: str, version: int) -> dict | None:
        self.migrate()
        with self._db() as db:
            row = db.execute(
                "SELECT body FROM records WHERE prefix = ? AND gallery = ? AND version = ?",
                (self._prefix, name, int(version)),
            ).fetchone()
        return json.loads(row[0]) if row is not None else None

    def put_record(self, name: str, record: dict) -> None:
        self.migrate()
        body = json.dumps(record, ensure_ascii=False)
        with self._db() as db:
            db.execute(
                "INSERT OR REPLACE INTO records (prefix, gallery, version, body) VALUES (?, ?, ?, ?)",
                (self._prefix, name, int(record["version"]), body),
            )

    def record_numbers(self, name: str) -> list[int]:
        """The versions of ``name`` that have a record, ascending."""
        self.migrate()
        with self._db() as db:
            rows = db.execute(
                "SELECT version FROM records WHERE prefix = ? AND gallery = ? ORDER BY version", (self._prefix, name)
            ).fetchall()
        return [int(r[0]) for r in rows]

    def drop_records(self, name: str, numbers: list[int]) -> None:
        if not numbers:
            return
        with self._db() as db:
            db.executemany(
                "DELETE FROM records WHERE prefix = ? AND gallery = ? AND version = ?",
                [(self._prefix, name, int(n)) for n in numbers],
            )

    # --- projections -------------------------------------------------------------------------
    def projection(self, key: str | None) -> Projection | None:
        if not key:
            return None
        self.migrate()
        with self._db() as db:
            row = db.execute(
                "SELECT data FROM projections WHERE prefix = ? AND key = ?", (self._prefix, key)
            ).fetchone()
        if row is None:
            raise ShiTuError(
                f"the projection of this index is missing from {self.path} (SHITU_MILVUS_STATE): "
                "rebuild or import it again"
            )
        with np.load(io.BytesIO(row[0])) as w:
            kind = str(w["kind"])
            return (Whitening if kind == "pca-whitening" else Projection)(w["mean"], w["projection"], kind)

    def put_projection(self, name: str, projection: Projection) -> str:
        """Store ``projection`` for gallery ``name``; the key its records refer to it by."""
        self.migrate()
        buf = io.BytesIO()
        np.savez(buf, mean=projection.mean, projection=projection.matrix, kind=projection.kind)
        data = buf.getvalue()
        key = f"projection/{name}/{hashlib.sha256(data).hexdigest()[:16]}"
        with self._db() as db:
            db.execute(
                "INSERT OR REPLACE INTO projections (prefix, key, gallery, data) VALUES (?, ?, ?, ?)",
                (self._prefix, key, name, data),
            )
        return key

    def drop(self, name: str) -> None:
        """Every record and projection of gallery ``name``."""
        self.migrate()
        with self._db() as db:
            db.execute("DELETE FROM records WHERE prefix = ? AND gallery = ?", (self._prefix, name))
            db.execute("DELETE FROM projections WHERE prefix = ? AND gallery = ?", (self._prefix, name))

    # --- from the collection earlier versions used -------------------------------------------
    def migrate(self) -> int:
        """Move the records and projections of a ``<prefix>blob`` collection (what versions before
        the sidecar wrote) into the sidecar, then drop that collection; the items moved (0 when
        there is none). Runs once per store; safe to repeat and to race (rows already here win)."""
        if self._migrated:
            return 0
        with self._guard:
            if self._migrated:
                return 0
            moved = self._migrate_blobs()
            self._migrated = True
            return moved

    def _migrate_blobs(self) -> int:
        conn = self._rows.connection
        coll = f"{self._prefix}{_LEGACY_BLOBS}"
        with conn.calling("look for earlier Milvus state"):
            if not conn.client.has_collection(coll, timeout=conn.timeout):
                return 0
        conn.ensure_loaded(coll)
        parts: dict[tuple[str, str], list[dict]] = {}  # (name, write token) -> rows
        with conn.calling("read earlier Milvus state"):
            it = conn.client.query_iterator(
                coll, batch_size=1024, filter="part >= 0", output_fields=["key", "name", "part", "total", "data"],
                timeout=conn.timeout,
            )  # fmt: skip
            try:
                while rows := it.next():
                    for row in rows:
                        parts.setdefault((row["name"], row["key"].rsplit("#", 2)[1]), []).append(row)
            finally:
                with contextlib.suppress(Exception):
                    it.close()
        blobs: dict[str, bytes] = {}
        for (name, _token), rows in parts.items():  # a complete write; a half-written one is dropped
            rows.sort(key=lambda r: int(r["part"]))
            if len(rows) == int(rows[0]["total"]) and [int(r["part"]) for r in rows] == list(range(len(rows))):
                blobs[name] = b"".join(base64.b64decode(r["data"]) for r in rows)
        records, projections = [], []
        for key, data in blobs.items():
            kind, _, rest = key.partition("/")
            gallery, _, last = rest.rpartition("/")
            if kind == "log" and last.isdigit():
                records.append((self._prefix, gallery, int(last), data.decode("utf-8")))
            elif kind == "projection":
                projections.append((self._prefix, key, gallery, data))
        with self._db() as db:
            db.executemany(
                "INSERT OR IGNORE INTO records (prefix, gallery, version, body) VALUES (?, ?, ?, ?)", records
            )
            db.executemany(
                "INSERT OR IGNORE INTO projections (prefix, key, gallery, data) VALUES (?, ?, ?, ?)", projections
            )
        with conn.write_lock, conn.calling("drop the earlier state collection"):
            with contextlib.suppress(Exception):  # another replica dropped it first
                conn.client.drop_collection(coll, timeout=conn.timeout)
        conn.forget(coll)
        log.info(
            "moved %d version records and %d projections of Milvus galleries (prefix %s) from %s into %s",
            len(records), len(projections), self._prefix, coll, self.path,
        )  # fmt: skip
        return len(records) + len(projections)
