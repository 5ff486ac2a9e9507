"""What a Milvus gallery keeps besides its rows: one record per version (what changed, as typed
changes without vectors, and the index's state: next id, calibration, adaptation, projection key)
and the projection matrices of adapted galleries.

Every replica sharing the Milvus must see them, and Milvus is the one store they share, so they
live there too: as bytes in parts, in one side collection (``<prefix>blob``) per prefix. Milvus
requires a vector field in every collection; this one's is a 2-d placeholder (see
:meth:`~shitu.stores.milvus_client.MilvusConnection.create_side_collection`). This module is the
seam if the state should move elsewhere (a SQL database shared by the replicas, say): the store
asks only for the methods of :class:`MilvusState`.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
from collections.abc import Sequence

import numpy as np

from shitu.adapt import Projection
from shitu.errors import ShiTuError
from shitu.index import Whitening
from shitu.stores.milvus_client import pymilvus_module, quote
from shitu.stores.milvus_collections import MAX_THUMB_BYTES, MAX_THUMB_CHARS, MilvusCollections, check_text


class MilvusState:
    """Version records and projections of the galleries of one :class:`MilvusCollections`."""

    def __init__(self, rows: MilvusCollections):
        self._conn = rows.connection
        self._prefix = rows.prefix
        self._blob_ready = False

    # --- version records ---------------------------------------------------------------------
    def record(self, name: str, version: int) -> dict | None:
        data = self._get_blob(f"log/{name}/{version:010d}")
        return json.loads(data) if data is not None else None

    def put_record(self, name: str, record: dict) -> None:
        data = json.dumps(record, ensure_ascii=False).encode("utf-8")
        self._put_blob(f"log/{name}/{record['version']:010d}", data, group=f"log/{name}")

    def record_numbers(self, name: str) -> list[int]:
        """The versions of ``name`` that have a record, ascending."""
        return sorted(int(k.rsplit("/", 1)[1]) for k in self._blob_keys_of(f"log/{name}"))

    def drop_records(self, name: str, numbers: list[int]) -> None:
        self._delete_blobs([f"log/{name}/{n:010d}" for n in numbers])

    # --- projections -------------------------------------------------------------------------
    def projection(self, key: str | None) -> Projection | None:
        if not key:
            return None
        data = self._get_blob(key)
        if data is None:
            raise ShiTuError("the projection of this index is missing in Milvus: rebuild or import it again")
        with np.load(io.BytesIO(data)) as w:
            kind = str(w["kind"])
            return (Whitening if kind == "pca-whitening" else Projection)(w["mean"], w["projection"], kind)

    def put_projection(self, name: str, projection: Projection) -> str:
        """Store ``projection`` for gallery ``name``; the key its records refer to it by."""
        buf = io.BytesIO()
        np.savez(buf, mean=projection.mean, projection=projection.matrix, kind=projection.kind)
        data = buf.getvalue()
        key = f"projection/{name}/{hashlib.sha256(data).hexdigest()[:16]}"
        self._put_blob(key, data, group=f"projection/{name}")
        return key

    def drop(self, name: str) -> None:
        """Every record and projection of gallery ``name``."""
        self._delete_blobs(self._blob_keys_of(f"log/{name}") + self._blob_keys_of(f"projection/{name}"))

    # --- bytes of any size under a key -------------------------------------------------------
    def _put_blob(self, key: str, data: bytes, *, group: str = "") -> None:
        """Stores ``data`` under ``key`` (replacing what was there), split into rows of 49149 bytes;
        :meth:`_blob_keys_of` lists the keys of one ``group``. A reader never sees a mix of two writes:
        parts carry the write's token and count."""
        key = check_text(key, "blob key", 512, empty_ok=False)
        group = check_text(group, "blob group", 512)
        token = os.urandom(8).hex()
        parts = [bytes(data[i : i + MAX_THUMB_BYTES]) for i in range(0, len(data), MAX_THUMB_BYTES)] or [b""]
        rows = [
            {"key": f"{key}#{token}#{n}", "name": key, "grp": group, "part": n, "total": len(parts),
             "data": base64.b64encode(chunk).decode("ascii"), "vec": [1.0, 0.0]}
            for n, chunk in enumerate(parts)
        ]  # fmt: skip
        with self._conn.write_lock:
            self._ensure_blob_collection(create=True)
            old = self._blob_keys(key)
            with self._conn.calling("store a blob"):
                for k in range(0, len(rows), 256):
                    self._conn.client.insert(self._blob_collection, rows[k : k + 256], timeout=self._conn.timeout)
                if old:
                    self._conn.client.delete(self._blob_collection, ids=old, timeout=self._conn.timeout)

    def _get_blob(self, key: str) -> bytes | None:
        """The bytes stored under ``key``, or ``None`` (also for a write that did not finish)."""
        key = check_text(key, "blob key", 512, empty_ok=False)
        if not self._ensure_blob_collection(create=False):
            return None
        with self._conn.calling("read a blob"):
            rows = self._conn.client.query(
                self._blob_collection, filter=f"name == {quote(key)}",
                output_fields=["key", "part", "total", "data"], timeout=self._conn.timeout,
            )  # fmt: skip
        writes: dict[str, list[dict]] = {}
        for row in rows:
            writes.setdefault(row["key"].rsplit("#", 2)[1], []).append(row)
        for parts in writes.values():  # a complete write (the newest one wins if two are complete)
            parts.sort(key=lambda r: int(r["part"]))
            if len(parts) == int(parts[0]["total"]) and [int(r["part"]) for r in parts] == list(range(len(parts))):
                return b"".join(base64.b64decode(r["data"]) for r in parts)
        return None

    def _delete_blobs(self, keys: Sequence[str]) -> None:
        """Removes the blobs under these keys (missing ones are ignored)."""
        if not keys or not self._ensure_blob_collection(create=False):
            return
        names = [check_text(k, "blob key", 512, empty_ok=False) for k in keys]
        with self._conn.write_lock, self._conn.calling("delete blobs"):
            for k in range(0, len(names), 256):
                listed = ", ".join(quote(n) for n in names[k : k + 256])
                self._conn.client.delete(
                    self._blob_collection, filter=f"name in [{listed}]", timeout=self._conn.timeout
                )

    def _blob_keys_of(self, group: str) -> list[str]:
        """The keys of the blobs stored with this ``group``, sorted."""
        if not self._ensure_blob_collection(create=False):
            return []
        with self._conn.calling("list blobs"):
            rows = self._conn.client.query(
                self._blob_collection, filter=f"grp == {quote(check_text(group, 'blob group', 512))}",
                output_fields=["name"], timeout=self._conn.timeout,
            )  # fmt: skip
        return sorted({r["name"] for r in rows})

    def _blob_keys(self, key: str) -> list[str]:
        with self._conn.calling("look up a blob"):
            rows = self._conn.client.query(
                self._blob_collection, filter=f"name == {quote(key)}", output_fields=["key"], timeout=self._conn.timeout
            )
        return [r["key"] for r in rows]

    @property
    def _blob_collection(self) -> str:
        return f"{self._prefix}blob"

    def _ensure_blob_collection(self, *, create: bool) -> bool:
        if getattr(self, "_blob_ready", False):
            return True
        coll = self._blob_collection
        with self._conn.calling("open the blob collection"):
            if not self._conn.client.has_collection(coll, timeout=self._conn.timeout):
                if not create:
                    return False
                dtype = pymilvus_module().DataType
                schema = self._conn.client.create_schema(
                    auto_id=False, enable_dynamic_field=False, description="shitu blobs (bytes in parts)"
                )
                schema.add_field("key", dtype.VARCHAR, is_primary=True, max_length=600)
                schema.add_field("name", dtype.VARCHAR, max_length=520)
                schema.add_field("grp", dtype.VARCHAR, max_length=520)
                schema.add_field("part", dtype.INT64)
                schema.add_field("total", dtype.INT64)
                schema.add_field("data", dtype.VARCHAR, max_length=MAX_THUMB_CHARS)
                self._conn.create_side_collection(coll, schema)
            self._conn.ensure_loaded(coll)
        self._blob_ready = True
        return True
