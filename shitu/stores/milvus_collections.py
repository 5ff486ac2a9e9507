"""Galleries kept in Milvus: one collection per gallery, its metadata among the collection's properties.

:class:`MilvusCollections` talks to either

* **Milvus Lite** (``uri`` is a local path ending in ``.db``): pymilvus starts milvus-lite's pure-Python
  engine in this process (milvus-lite 3.x: a gRPC server on 127.0.0.1 in a background thread; the
  ``.db`` path is a *directory*). Only **one process** may open a given ``.db`` at a time (it holds an
  ``flock`` on ``<db>/LOCK`` until it exits); a second process gets :class:`~shitu.errors.Unavailable`
  telling it to share the data through ``milvus-lite server`` instead; or
* a **Milvus server** (``uri`` is ``http(s)://host:port``): Milvus Standalone/Cluster/Zilliz, or
  ``milvus-lite server --data-dir DIR --port 19530``, which several app replicas can share.

Layout (``prefix`` defaults to ``shitu_``)::

    <prefix>g_<escaped name>   one gallery: id INT64 (primary key, chosen by the caller), vec FLOAT_VECTOR,
                               label VARCHAR(1024 B), source VARCHAR(4096 B), thumb VARCHAR(65535)
    <prefix>x_<hash>           a gallery whose escaped name would pass Milvus's 255-character limit

Index names follow the project's rule (letters, digits, ``_ - .``, ≤ 64 characters and 180 UTF-8 bytes);
Milvus allows only ``[A-Za-z0-9_]``, so names are escaped reversibly: ASCII letters and digits stay,
``_`` → ``__``, ``-`` → ``_h``, ``.`` → ``_d``, any other character → ``_u`` + 6 hex digits of its code
point. Each gallery records its name, index type and metric as JSON in the collection property
``shitu.gallery`` (and in its description, which milvus-lite 3.2.2 does not keep); its metadata (next
id, version, ...: :meth:`MilvusCollections.get_meta`) is the property ``shitu.head``, so Milvus's own
metadata store keeps it, replicas sharing one Milvus see the same, and it goes with the collection.

Thumbnails are stored **in the gallery row** as base64 text in ``thumb`` (empty when none): a separate
thumbnail collection would need its own dummy vector field (Milvus requires one in every collection)
and a second write that could fail half-way; a VARCHAR that search never asks for costs nothing at
search time. 65535 is the largest VARCHAR that every Milvus accepts by default, so a thumbnail may be
at most 49149 bytes (its base64 fills 65532 characters).

Scores. Vectors are float32 and unit-normalised by the caller. What Milvus returns as ``distance``:
``IP`` the inner product (higher is better); ``COSINE`` the cosine similarity; ``L2`` the **squared**
Euclidean distance d² (lower is better; milvus-lite 3.2.2 computes sqrt internally and squares it back
to match Milvus Standalone). :meth:`MilvusCollections.search` always returns cosine similarities,
higher is better: the IP/COSINE value as is, and ``1 - d²/2`` for L2 (exact for unit vectors).

Errors surface as :class:`~shitu.errors.ShiTuError` subclasses with a one-line message (``NotFound``,
``Conflict``, ``TooLarge``, ``Unavailable``); pymilvus's and milvus-lite's log records about failed calls
are cut to one line (no tracebacks). pymilvus is imported lazily: the rest of the project works without it.

Concurrency: writes from one process to one Milvus Lite file are serialised by a lock (milvus-lite's
engine is single-writer per collection). Against a server, replicas do not lock each other: two
replicas inserting the same ids, or doing read-modify-write on the same metadata, race (last writer
wins; :meth:`MilvusCollections.insert` checks for taken ids but not atomically).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from shitu.errors import Conflict, NotFound, ShiTuError, TooLarge
from shitu.stores.base import check_name  # the project's one rule for index names
from shitu.stores.milvus_client import MilvusConnection, connect, pymilvus_module, quote

if TYPE_CHECKING:  # pragma: no cover - typing only
    pass

log = logging.getLogger(__name__)

INDEX_TYPES = ("Flat", "HNSW32", "IVF")
METRIC_TYPES = ("IP", "L2", "COSINE")
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 128  # at least k
IVF_NLIST = 128  # milvus-lite clamps it to each segment's size
IVF_NPROBE = 16
MAX_LABEL_BYTES = 1024
MAX_SOURCE_BYTES = 4096
MAX_THUMB_CHARS = 65535
MAX_THUMB_BYTES = MAX_THUMB_CHARS // 4 * 3  # 49149: its base64 (4 chars per 3 bytes) still fits
MAX_META_CHARS = 65535
MAX_DIM = 32768  # Milvus's limit for FLOAT_VECTOR
MAX_K = 16384  # Milvus's limit for top-k and for one query's offset + limit
MAX_COLLECTION_NAME = 255
PREFIX_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,31}$")
_IDS_PER_CALL = 8192  # ids per get/delete/"id in [...]" request
_INSERT_BYTES = 16 << 20  # rows per insert request are bounded by this many bytes (gRPC limits are 64 MB+)
_INSERT_ROWS = 8192
_ITER_BATCH = 4096
_SEARCH_QUERIES = 256  # queries per search request
_INFO_PROPERTY = "shitu.gallery"
_HEAD_PROPERTY = "shitu.head"  # the gallery's metadata (get_meta)
_GALLERY_PART, _HASHED_PART, _META_PART = "g_", "x_", "meta"

# ---------------------------------------------------------------------------------------------
# names
# ---------------------------------------------------------------------------------------------


def escape_name(name: str) -> str:
    """``name`` in Milvus's alphabet ``[A-Za-z0-9_]``, reversibly (see the module doc)."""
    out = []
    for ch in name:
        if ch.isascii() and ch.isalnum():
            out.append(ch)
        elif ch == "_":
            out.append("__")
        elif ch == "-":
            out.append("_h")
        elif ch == ".":
            out.append("_d")
        else:
            out.append(f"_u{ord(ch):06x}")
    return "".join(out)


def unescape_name(text: str) -> str:
    """The inverse of :func:`escape_name`; ``ValueError`` for text it cannot have produced."""
    out, i = [], 0
    while i < len(text):
        ch = text[i]
        if ch != "_":
            out.append(ch)
            i += 1
            continue
        code = text[i + 1 : i + 2]
        if code in ("_", "h", "d"):
            out.append({"_": "_", "h": "-", "d": "."}[code])
            i += 2
        elif code == "u" and re.fullmatch(r"[0-9a-f]{6}", text[i + 2 : i + 8]):
            out.append(chr(int(text[i + 2 : i + 8], 16)))
            i += 8
        else:
            raise ValueError(f"not an escaped name: {text!r}")
    return "".join(out)


# ---------------------------------------------------------------------------------------------
# the backend
# ---------------------------------------------------------------------------------------------


class MilvusCollections:
    """Galleries in Milvus, one collection each (see the module doc for layout, scores and limits).

    ``uri``: a local ``something.db`` path (Milvus Lite; created if missing, its parent too) or
    ``http(s)://host:port`` (a Milvus server; ``token`` is ``"user:password"`` or an API key).
    ``prefix`` namespaces our collections (``[A-Za-z_][A-Za-z0-9_]*``, ≤ 32 characters).
    Use as a context manager or call :meth:`close`.
    """

    def __init__(self, uri: str, token: str | None = None, prefix: str = "shitu_", *, timeout: float = 30.0):
        if not isinstance(prefix, str) or not PREFIX_RE.fullmatch(prefix):
            raise ShiTuError(f"invalid Milvus collection prefix {str(prefix)[:40]!r}: use letters, digits and '_'")
        self.prefix = prefix
        self._specs: dict[str, dict[str, Any]] = {}  # collection -> info(), cached
        self._meta_migrated = False
        self._conn = connect(uri, token, timeout=timeout)  # shared by every user of this Milvus in the process
        self._client = self._conn.client
        self._calling = self._conn.calling
        self._write_lock = self._conn.write_lock
        self.uri, self.timeout = self._conn.uri, timeout
        self._closed = False

    @property
    def connection(self) -> MilvusConnection:
        return self._conn

    def close(self) -> None:
        """Lets go of the shared connection (the last user closes it)."""
        if not self._closed:
            self._closed = True
            self._conn.close()

    def __enter__(self) -> MilvusCollections:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing -------------------------------------------------------------------------------

    def _collection(self, name: str) -> str:
        """The collection that holds gallery ``name`` (escaped, or hashed when that is too long)."""
        name = check_name(name)
        plain = f"{self.prefix}{_GALLERY_PART}{escape_name(name)}"
        if len(plain) <= MAX_COLLECTION_NAME:
            return plain
        return f"{self.prefix}{_HASHED_PART}{hashlib.sha1(name.encode('utf-8')).hexdigest()}"

    def _existing(self, name: str) -> str:
        coll = self._collection(name)
        with self._calling(f"look up index {name!r}"):
            found = self._client.has_collection(coll, timeout=self.timeout)
        if not found:
            self._specs.pop(coll, None)
            raise NotFound(f"no index named {name!r} in Milvus")
        return coll

    def _ensure_loaded(self, coll: str) -> None:
        self._conn.ensure_loaded(coll)

    def _written(self, coll: str, rows: int) -> None:
        self._conn.written(coll, rows)

    def _spec(self, name: str) -> tuple[str, dict[str, Any]]:
        coll = self._existing(name)
        if coll not in self._specs:
            with self._calling(f"describe index {name!r}"):
                desc = self._client.describe_collection(coll, timeout=self.timeout)
                index = self._client.describe_index(coll, "vec", timeout=self.timeout)
            dim = next(int(f["params"]["dim"]) for f in desc["fields"] if f["name"] == "vec")
            extra = _gallery_info(desc)
            metric = str((index or {}).get("metric_type") or extra.get("metric_type") or "IP").upper()
            self._specs[coll] = {
                "name": extra.get("name", name),
                "dim": dim,
                "metric_type": metric,
                "index_type": extra.get("index_type") or str((index or {}).get("index_type", "")),
            }
        self._ensure_loaded(coll)
        return coll, self._specs[coll]

    def _ids_in(self, ids: Sequence[int]) -> list[list[int]]:
        return [list(ids[i : i + _IDS_PER_CALL]) for i in range(0, len(ids), _IDS_PER_CALL)]

    def _get_rows(self, coll: str, ids: Sequence[int], fields: list[str], what: str) -> dict[int, dict]:
        rows: dict[int, dict] = {}
        with self._calling(what):
            for chunk in self._ids_in(ids):
                for row in self._client.get(coll, ids=chunk, output_fields=fields, timeout=self.timeout):
                    rows[int(row["id"])] = dict(row)
        return rows

    def _iterate(self, coll: str, fields: list[str], expr: str = "", *, batch: int = _ITER_BATCH, limit: int = -1):
        """Rows in id order (pymilvus's query iterator pages by ``id > last``)."""
        batch = max(1, min(int(batch), MAX_K))
        with self._calling("read a collection"):
            it = self._client.query_iterator(
                coll, batch_size=batch, limit=limit, filter=expr, output_fields=fields, timeout=self.timeout
            )
        try:
            while True:
                with self._calling("read a collection"):
                    rows = it.next()
                if not rows:
                    return
                yield from rows
        finally:
            with contextlib.suppress(Exception):
                it.close()

    # -- collections ----------------------------------------------------------------------------

    def names(self) -> list[str]:
        """The galleries under our prefix, sorted."""
        with self._calling("list collections"):
            colls = self._client.list_collections()
        found = []
        for coll in colls:
            if not coll.startswith(self.prefix):
                continue
            rest = coll[len(self.prefix) :]
            if rest.startswith(_GALLERY_PART):
                with contextlib.suppress(ValueError):
                    found.append(unescape_name(rest[len(_GALLERY_PART) :]))
            elif rest.startswith(_HASHED_PART):
                with self._calling("describe a collection"), contextlib.suppress(ValueError, KeyError, TypeError):
                    desc = self._client.describe_collection(coll, timeout=self.timeout)
                    found.append(_gallery_info(desc)["name"])
        return sorted(found)

    def exists(self, name: str) -> bool:
        coll = self._collection(name)
        with self._calling(f"look up index {name!r}"):
            return bool(self._client.has_collection(coll, timeout=self.timeout))

    def info(self, name: str) -> dict[str, Any]:
        """``{name, dim, metric_type, index_type}`` of a gallery."""
        return dict(self._spec(name)[1])

    def create(
        self,
        name: str,
        dim: int,
        *,
        metric_type: str = "IP",
        index_type: str = "HNSW32",
        meta: dict | None = None,
    ) -> None:
        """A new, empty gallery (:class:`Conflict` if the name is taken). ``index_type``: ``Flat``
        (exact), ``HNSW32`` (M=32, efConstruction=80, ef=max(128, k)) or ``IVF`` (IVF_FLAT, nlist=128,
        nprobe=16); ``metric_type``: ``IP``, ``L2`` or ``COSINE``."""
        name = check_name(name)
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or not 1 <= int(dim) <= MAX_DIM:
            raise ShiTuError(f"invalid vector dimension {dim!r}: use 1–{MAX_DIM}")
        metric = str(metric_type).upper()
        if metric not in METRIC_TYPES:
            raise ShiTuError(f"unknown metric {metric_type!r}: use one of {', '.join(METRIC_TYPES)}")
        if index_type not in INDEX_TYPES:
            raise ShiTuError(f"unknown index type {index_type!r}: use one of {', '.join(INDEX_TYPES)}")
        meta_text = self._meta_text(meta or {})
        coll = self._collection(name)
        dtype = pymilvus_module().DataType
        with self._write_lock, self._calling(f"create index {name!r}"):
            if self._client.has_collection(coll, timeout=self.timeout):
                raise Conflict(f"an index named {name!r} already exists in Milvus")
            description = json.dumps(
                {"name": name, "index_type": index_type, "metric_type": metric},
                ensure_ascii=False,
            )
            schema = self._client.create_schema(auto_id=False, enable_dynamic_field=False, description=description)
            schema.add_field("id", dtype.INT64, is_primary=True)
            schema.add_field("vec", dtype.FLOAT_VECTOR, dim=int(dim))
            schema.add_field("label", dtype.VARCHAR, max_length=MAX_LABEL_BYTES)
            schema.add_field("source", dtype.VARCHAR, max_length=MAX_SOURCE_BYTES)
            schema.add_field("thumb", dtype.VARCHAR, max_length=MAX_THUMB_CHARS)
            params = self._client.prepare_index_params()
            kind, build = {
                "Flat": ("FLAT", {}),
                "HNSW32": ("HNSW", {"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION}),
                "IVF": ("IVF_FLAT", {"nlist": IVF_NLIST}),
            }[index_type]
            params.add_index(field_name="vec", index_type=kind, metric_type=metric, params=build)
            self._client.create_collection(
                coll,
                schema=schema,
                index_params=params,
                consistency_level="Strong",
                properties={_INFO_PROPERTY: description, _HEAD_PROPERTY: meta_text},
                timeout=self.timeout,
            )
            self._specs.pop(coll, None)
            self._conn.forget(coll)

    def move(self, name: str, to: "MilvusCollections", new_name: str) -> None:
        """Renames gallery ``name`` to ``new_name`` under ``to``'s prefix (same server), with its
        metadata. :class:`Conflict` if the new name is taken."""
        src = self._existing(name)
        dst = to._collection(new_name)
        with self._write_lock, self._calling(f"rename index {name!r}"):
            if self._client.has_collection(dst, timeout=self.timeout):
                raise Conflict(f"an index named {new_name!r} already exists in Milvus")
            meta = self.get_meta(name)
            self._client.rename_collection(src, dst, timeout=self.timeout)
            for part in (self, to):
                part._specs.pop(src, None), part._specs.pop(dst, None)
                part.connection.forget(src), part.connection.forget(dst)
            to._write_meta(dst, to._meta_text(meta))

    def drop(self, name: str) -> None:
        """Deletes a gallery and its metadata (:class:`NotFound` if there is none)."""
        with self._write_lock:
            coll = self._existing(name)
            with self._calling(f"drop index {name!r}"):
                self._client.drop_collection(coll, timeout=self.timeout)
            self._specs.pop(coll, None)
            self._conn.forget(coll)

    def flush(self, name: str) -> None:
        """Seals buffered rows into a segment. Not needed for correctness: rows are searchable and
        durable (a write-ahead log) as soon as a call returns; on Milvus Lite it makes them fast to
        search (:meth:`insert` flushes every :attr:`lite_flush_rows` rows anyway). Milvus Lite builds
        the segment's HNSW/IVF index in a background thread (100k x 512 HNSW32: about 1.5 min on one
        core); until then the segment is scanned."""
        coll = self._existing(name)
        with self._write_lock, self._calling(f"flush index {name!r}"):
            self._client.flush(coll, timeout=self.timeout)
            self._conn.flushed(coll)

    # -- rows -----------------------------------------------------------------------------------

    def insert(
        self,
        name: str,
        ids: Sequence[int] | np.ndarray,
        vectors: np.ndarray,
        labels: Sequence[str],
        sources: Sequence[str],
        thumbnails: Sequence[bytes | None] | None = None,
    ) -> int:
        """Adds rows; returns how many. ``ids`` are new non-negative int64s (:class:`Conflict` if one is
        taken), ``vectors`` (n, dim) float32. All rows are checked first; if a request fails half-way,
        the rows already written are deleted again."""
        coll, spec = self._spec(name)
        id_list = _check_ids(ids)
        n = len(id_list)
        vecs = _check_vectors(vectors, spec["dim"], "vectors")
        thumbs = list(thumbnails) if thumbnails is not None else [None] * n
        if not (len(vecs) == len(labels) == len(sources) == len(thumbs) == n):
            raise ShiTuError(
                f"insert needs one vector, label, source and thumbnail per id: got {n} ids, {len(vecs)} vectors, "
                f"{len(labels)} labels, {len(sources)} sources, {len(thumbs)} thumbnails"
            )
        if len(set(id_list)) != n:
            raise ShiTuError("insert got the same id twice")
        rows = []
        for i in range(n):
            rows.append(
                {
                    "id": id_list[i],
                    "vec": vecs[i].tolist(),
                    "label": check_text(labels[i], "label", MAX_LABEL_BYTES, empty_ok=False),
                    "source": check_text(sources[i], "source", MAX_SOURCE_BYTES),
                    "thumb": _encode_thumb(thumbs[i]),
                }
            )
        if not rows:
            return 0
        with self._write_lock:
            taken = sorted(self._get_rows(coll, id_list, ["id"], f"check ids in {name!r}"))
            if taken:
                more = f" (and {len(taken) - 5} more)" if len(taken) > 5 else ""
                raise Conflict(f"ids already in index {name!r}: {', '.join(map(str, taken[:5]))}{more}")
            done: list[int] = []
            try:
                with self._calling(f"insert into index {name!r}"):
                    for chunk in _chunks(rows, spec["dim"]):
                        self._client.insert(coll, chunk, timeout=self.timeout)
                        done += [r["id"] for r in chunk]
            except ShiTuError:
                if done:
                    with contextlib.suppress(Exception):
                        for part in self._ids_in(done):
                            self._client.delete(coll, ids=part, timeout=self.timeout)
                raise
            self._written(coll, n)
        return n

    def delete(self, name: str, ids: Sequence[int] | np.ndarray) -> int:
        """Removes the rows with these ids; returns how many existed (missing ids are ignored)."""
        coll = self._existing(name)
        id_list = sorted(set(_check_ids(ids)))
        with self._write_lock:
            present = sorted(self._get_rows(coll, id_list, ["id"], f"check ids in {name!r}"))
            with self._calling(f"delete from index {name!r}"):
                for part in self._ids_in(present):
                    self._client.delete(coll, ids=part, timeout=self.timeout)
        return len(present)

    def relabel(self, name: str, ids: Sequence[int] | np.ndarray, label: str) -> int:
        """Gives rows a new label, keeping vector, source and thumbnail (read back, then upserted);
        returns how many rows there were (missing ids are ignored)."""
        coll, spec = self._spec(name)
        label = check_text(label, "label", MAX_LABEL_BYTES, empty_ok=False)
        id_list = sorted(set(_check_ids(ids)))
        with self._write_lock:
            rows = self._get_rows(coll, id_list, ["vec", "label", "source", "thumb"], f"read index {name!r}")
            new = [
                {"id": i, "vec": list(r["vec"]), "label": label, "source": r["source"], "thumb": r["thumb"]}
                for i, r in sorted(rows.items())
            ]
            with self._calling(f"relabel in index {name!r}"):
                for chunk in _chunks(new, spec["dim"]):
                    self._client.upsert(coll, chunk, timeout=self.timeout)
            self._written(coll, len(new))
        return len(new)

    # -- reads ----------------------------------------------------------------------------------

    def search(
        self, name: str, queries: np.ndarray, k: int, *, params: dict | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest rows of each query: ``(scores (n, k) float32, ids (n, k) int64)``, scores
        as cosine similarities (higher is better), padded with ``-inf`` / ``-1`` when there are fewer
        rows. ``params`` overrides the search parameters (``{"ef": ...}``, ``{"nprobe": ...}``)."""
        coll, spec = self._spec(name)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= int(k) <= MAX_K:
            raise ShiTuError(f"invalid k {k!r}: use 1–{MAX_K}")
        k = int(k)
        q = _check_vectors(queries, spec["dim"], "queries")
        scores = np.full((len(q), k), -np.inf, dtype=np.float32)
        ids = np.full((len(q), k), -1, dtype=np.int64)
        metric = spec["metric_type"]
        search_params: dict[str, Any] = {"metric_type": metric}
        if spec["index_type"] == "HNSW32":
            search_params["params"] = {"ef": max(HNSW_EF_SEARCH, k)}
        elif spec["index_type"] == "IVF":
            search_params["params"] = {"nprobe": IVF_NPROBE}
        if params:
            search_params["params"] = {**search_params.get("params", {}), **params}
        with self._calling(f"search index {name!r}"):
            for start in range(0, len(q), _SEARCH_QUERIES):
                part = q[start : start + _SEARCH_QUERIES]
                found = self._client.search(
                    coll,
                    data=part.tolist(),
                    limit=k,
                    output_fields=[],
                    search_params=search_params,
                    timeout=self.timeout,
                )
                for row, hits in enumerate(found):
                    for col, hit in enumerate(list(hits)[:k]):
                        ids[start + row, col] = int(hit["id"])
                        scores[start + row, col] = float(hit["distance"])
        if metric == "L2":  # Milvus reports the squared distance d²; for unit vectors cos = 1 - d²/2
            found_mask = ids >= 0
            scores[found_mask] = 1.0 - scores[found_mask] / 2.0
        return scores, ids

    def labels(self, name: str, ids: Sequence[int] | np.ndarray) -> dict[int, str]:
        """``{id: label}`` for the ids that exist (``-1`` padding and missing ids are left out)."""
        coll = self._existing(name)
        id_list = sorted({i for i in _check_ids(ids, allow_padding=True) if i >= 0})
        rows = self._get_rows(coll, id_list, ["label"], f"read index {name!r}")
        return {i: r["label"] for i, r in sorted(rows.items())}

    def get(self, name: str, ids: Sequence[int] | np.ndarray) -> list[dict[str, Any]]:
        """``[{id, label, source, thumbnail}]`` in the order asked, missing ids left out;
        ``thumbnail`` is the JPEG bytes or None."""
        coll = self._existing(name)
        id_list = _check_ids(ids)
        rows = self._get_rows(coll, sorted(set(id_list)), ["label", "source", "thumb"], f"read index {name!r}")
        out, seen = [], set()
        for i in id_list:
            if i in rows and i not in seen:
                seen.add(i)
                r = rows[i]
                out.append(
                    {"id": i, "label": r["label"], "source": r["source"], "thumbnail": _decode_thumb(r["thumb"])}
                )
        return out

    def count(self, name: str) -> int:
        coll = self._existing(name)
        self._ensure_loaded(coll)
        with self._calling(f"count index {name!r}"):
            res = self._client.query(coll, filter="", output_fields=["count(*)"], timeout=self.timeout)
        return int(res[0]["count(*)"]) if res else 0

    def page(self, name: str, offset: int, limit: int, label: str | None = None) -> list[dict[str, Any]]:
        """``[{id, label, source}]`` in id order: rows ``offset`` … ``offset + limit - 1``, of those with
        ``label`` if given. Reads ``offset + limit`` rows' ids and labels (Milvus has no id-ordered offset)."""
        coll = self._existing(name)
        self._ensure_loaded(coll)
        for value, what in ((offset, "offset"), (limit, "limit")):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise ShiTuError(f"invalid {what} {value!r}: use a whole number ≥ 0")
        if limit == 0:
            return []
        expr = "" if label is None else f"label == {quote(check_text(label, 'label', MAX_LABEL_BYTES))}"
        out: list[dict[str, Any]] = []
        rows = self._iterate(
            coll, ["label", "source"], expr, batch=min(offset + limit, _ITER_BATCH), limit=offset + limit
        )
        with contextlib.closing(rows):
            for i, row in enumerate(rows):
                if i >= offset:
                    out.append({"id": int(row["id"]), "label": row["label"], "source": row["source"]})
                if len(out) >= limit:
                    break
        return out

    def label_counts(self, name: str) -> dict[str, int]:
        """``{label: number of rows}``, sorted by label."""
        coll = self._existing(name)
        self._ensure_loaded(coll)
        counts = Counter(row["label"] for row in self._iterate(coll, ["label"]))
        return dict(sorted(counts.items()))

    def vectors(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """All ``(ids (n,) int64, vectors (n, dim) float32)`` in id order."""
        coll, spec = self._spec(name)
        ids, vecs = [], []
        for row in self._iterate(coll, ["vec"]):
            ids.append(int(row["id"]))
            vecs.append(row["vec"])
        if not ids:
            return np.zeros(0, np.int64), np.zeros((0, spec["dim"]), np.float32)
        return np.asarray(ids, np.int64), np.asarray(vecs, np.float32).reshape(len(ids), spec["dim"])

    def iter_all(self, name: str, batch: int = 1000) -> Iterator[dict[str, Any]]:
        """Every row as ``{id, label, source, thumbnail, vector}`` in id order, read ``batch`` at a time."""
        coll, _ = self._spec(name)
        for row in self._iterate(coll, ["vec", "label", "source", "thumb"], batch=batch):
            yield {
                "id": int(row["id"]),
                "label": row["label"],
                "source": row["source"],
                "thumbnail": _decode_thumb(row["thumb"]),
                "vector": np.asarray(row["vec"], np.float32),
            }

    def rows(self, name: str, ids: Sequence[int] | np.ndarray) -> list[dict[str, Any]]:
        """Like :meth:`get`, with each row's ``vector`` too (id order; missing ids left out)."""
        coll, spec = self._spec(name)
        id_list = sorted(set(_check_ids(ids)))
        rows = self._get_rows(coll, id_list, ["vec", "label", "source", "thumb"], f"read index {name!r}")
        return [
            {"id": i, "label": r["label"], "source": r["source"], "thumbnail": _decode_thumb(r["thumb"]),
             "vector": np.asarray(r["vec"], np.float32).reshape(spec["dim"])}
            for i, r in sorted(rows.items())
        ]  # fmt: skip

    def id_labels(self, name: str) -> tuple[np.ndarray, list[str]]:
        """Every row's ``(ids ascending, labels)`` — what a replica needs in memory, read without the
        vectors."""
        coll = self._existing(name)
        self._ensure_loaded(coll)
        ids: list[int] = []
        labels: list[str] = []
        for row in self._iterate(coll, ["label"], batch=MAX_K):
            ids.append(int(row["id"]))
            labels.append(row["label"])
        return np.asarray(ids, np.int64), labels

    # -- index-level metadata -------------------------------------------------------------------

    def get_meta(self, name: str) -> dict:
        """The gallery's metadata dict (``{}`` if none was stored): the collection property
        ``shitu.head``, which Milvus keeps in its metadata store with the collection itself."""
        coll = self._existing(name)
        self._migrate_meta()
        with self._calling(f"read the metadata of {name!r}"):
            desc = self._client.describe_collection(coll, timeout=self.timeout)
        text = (desc.get("properties") or {}).get(_HEAD_PROPERTY)
        if not text:
            return {}
        try:
            value = json.loads(text)
        except ValueError:
            raise ShiTuError(f"the metadata of index {name!r} in Milvus is not valid JSON") from None
        return value if isinstance(value, dict) else {}

    def put_meta(self, name: str, meta: dict) -> None:
        """Replaces the gallery's metadata (a JSON-serialisable dict, ≤ 65535 characters as JSON)."""
        text = self._meta_text(meta)
        with self._write_lock:
            coll = self._existing(name)
            self._migrate_meta()
            self._write_meta(coll, text)

    def _meta_text(self, meta: dict) -> str:
        if not isinstance(meta, dict):
            raise ShiTuError("index metadata must be a dict")
        try:
            text = json.dumps(meta, ensure_ascii=False, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ShiTuError(f"index metadata is not JSON: {e}") from None
        if len(text) > MAX_META_CHARS or len(text.encode("utf-8")) > MAX_META_CHARS:
            raise TooLarge(
                f"index metadata is {len(text.encode('utf-8'))} bytes as JSON; the limit is {MAX_META_CHARS}"
            )
        return text

    def _write_meta(self, coll: str, text: str) -> None:
        with self._calling("store index metadata"):
            self._client.alter_collection_properties(coll, properties={_HEAD_PROPERTY: text}, timeout=self.timeout)

    def _migrate_meta(self) -> None:
        """Versions before the head became a collection property kept it in a ``<prefix>meta``
        collection (with a placeholder vector): copy each gallery's head that has none yet onto its
        collection, then drop that collection. Once per process and prefix; safe to race."""
        if self._meta_migrated:
            return
        legacy = f"{self.prefix}{_META_PART}"
        with self._write_lock, self._calling("look for earlier index metadata"):
            if self._client.has_collection(legacy, timeout=self.timeout):
                self._ensure_loaded(legacy)
                rows = self._client.query(
                    legacy, filter='key != ""', output_fields=["key", "value"], timeout=self.timeout
                )
                for row in rows:
                    coll = str(row["key"])
                    if not self._client.has_collection(coll, timeout=self.timeout):
                        continue
                    desc = self._client.describe_collection(coll, timeout=self.timeout)
                    if not (desc.get("properties") or {}).get(_HEAD_PROPERTY):
                        self._write_meta(coll, str(row["value"]))
                with contextlib.suppress(Exception):  # another replica dropped it first
                    self._client.drop_collection(legacy, timeout=self.timeout)
                self._conn.forget(legacy)
                log.info("moved the metadata of %d Milvus galleries from %s into collection properties",
                         len(rows), legacy)  # fmt: skip
        self._meta_migrated = True


# ---------------------------------------------------------------------------------------------
# checks and encodings
# ---------------------------------------------------------------------------------------------


def _gallery_info(desc: dict) -> dict:
    """What :meth:`MilvusCollections.create` recorded about a gallery (``{}`` if nothing readable)."""
    for text in ((desc.get("properties") or {}).get(_INFO_PROPERTY), desc.get("description")):
        try:
            info = json.loads(text or "")
        except ValueError:
            continue
        if isinstance(info, dict) and isinstance(info.get("name"), str):
            return info
    return {}


def _check_ids(ids: Sequence[int] | np.ndarray, *, allow_padding: bool = False) -> list[int]:
    arr = np.asarray(ids)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise ShiTuError("ids must be a flat list of whole numbers")
    out = [int(i) for i in arr.tolist()]
    low = -1 if allow_padding else 0
    if out and (min(out) < low or max(out) > np.iinfo(np.int64).max):
        raise ShiTuError("ids must be whole numbers from 0 to 2**63-1")
    return out


def _check_vectors(vectors: np.ndarray, dim: int, what: str) -> np.ndarray:
    try:
        arr = np.asarray(vectors, dtype=np.float32)
    except (TypeError, ValueError):
        raise ShiTuError(f"{what} must be numbers") from None
    if arr.ndim == 1 and arr.size == dim:
        arr = arr.reshape(1, dim)
    if arr.ndim != 2 or (arr.shape[1] != dim and arr.shape[0] != 0):
        raise ShiTuError(f"{what} must have shape (n, {dim}), got {tuple(arr.shape)}")
    if not np.isfinite(arr).all():
        raise ShiTuError(f"{what} contain NaN or infinity")
    return arr.reshape(len(arr), dim)


def check_text(value: Any, what: str, max_bytes: int, *, empty_ok: bool = True) -> str:
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise ShiTuError(f"{what} must be text, got {type(value).__name__}")
    if not empty_ok and not value.strip():
        raise ShiTuError(f"{what} must not be empty")
    if any(ord(c) < 32 and c not in "\t\n\r" for c in value):
        raise ShiTuError(f"{what} {value[:40]!r} contains control characters")
    if len(value.encode("utf-8")) > max_bytes:
        raise TooLarge(f"{what} {value[:40]!r}… is longer than {max_bytes} bytes in UTF-8")
    return value


def _encode_thumb(data: bytes | None) -> str:
    if data is None or len(data) == 0:
        return ""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ShiTuError(f"a thumbnail must be bytes or None, got {type(data).__name__}")
    if len(data) > MAX_THUMB_BYTES:
        raise TooLarge(f"a thumbnail of {len(data)} bytes is over the {MAX_THUMB_BYTES}-byte limit")
    return base64.b64encode(bytes(data)).decode("ascii")


def _decode_thumb(text: str | None) -> bytes | None:
    if not text:
        return None
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        return None


def _chunks(rows: list[dict], dim: int) -> Iterator[list[dict]]:
    """Rows split into requests of at most ``_INSERT_ROWS`` rows and about ``_INSERT_BYTES`` bytes."""
    part: list[dict] = []
    size = 0
    for row in rows:
        row_size = 4 * dim + len(row["label"]) + len(row["source"]) + len(row["thumb"]) + 64
        if part and (len(part) >= _INSERT_ROWS or size + row_size > _INSERT_BYTES):
            yield part
            part, size = [], 0
        part.append(row)
        size += row_size
    if part:
        yield part
