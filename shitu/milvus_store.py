"""Galleries served from Milvus (``SHITU_VECTOR_STORE=milvus``): the same store interface as
:class:`shitu.store.IndexStore`, so the engine, UI, HTTP API, CLI and Python API work unchanged.

Where things live (all in Milvus, so several app replicas can serve one gallery):

* **rows** — the gallery collection of :class:`~shitu.milvus_backend.MilvusCollections`: every
  entry's id, *unprojected* unit feature vector, label, source and thumbnail. This is the layout
  ``shitu milvus-export`` writes, so an exported gallery can be served as it is, and any Milvus
  client can search it with the feature model's own vectors.
* **searched vectors** of an adapted index — a second collection (prefix ``<prefix>p_``) with each
  entry's projected vector; a raw-feature index is searched in its rows directly.
* **removed rows** — a third collection (prefix ``<prefix>t_``) keeps what a change removed for as
  long as a version before it is kept, so a restore can bring them back.
* **state** — the metadata row holds the version number (checked by replicas); blobs hold the
  index's state (calibration, adaptation, next id, ...), its projection matrix and one record per
  version (what changed: ids, labels; never vectors).

In each process a :class:`MilvusGallery` holds what search needs beside Milvus: the labels as
arrays (12 bytes an entry), the projection and the calibration. A replica checks the version at
most every :data:`SYNC_SECONDS` and applies the records it missed.

Milvus has no transactions across rows: a change writes its record first, then the rows, then the
version. A process killed half-way leaves the rows it wrote (an add's first batches, say): the next
load reads the labels from the rows themselves, so what is searched and what is listed agree, and
ids are never reused (the next id is at least one past the largest id ever seen). Writers on one
machine are serialised by a file lock; writers on several machines should be one at a time (the
version is checked before each write, but Milvus offers no compare-and-set).

Versions work as with files — list, compare, restore, ids never reused — back to the last build or
import under that name: those replace every row, and what was there before is gone.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from shitu import changes
from shitu.adapt import Adaptation, Projection
from shitu.calibrate import Calibration
from shitu.entrymeta import EntryMeta
from shitu.errors import Conflict, NotFound, ShiTuError
from shitu.index import GalleryIndex, Whitening, _faiss_index, _Labels, _merged_raw
from shitu.milvus_backend import MAX_K, MilvusCollections
from shitu.store import (
    CHANGES_SHOWN,
    KEEP_VERSIONS,
    _number,
    _public,
    _version_record,
    check_name,
    describe_change,
    diff_id_maps,
    zipped,
)

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

FORMAT = 2  # of the state we keep; the transfer format (shitu.transfer) is 1 and is adopted on first use
SYNC_SECONDS = 1.0  # how stale a replica's view of another replica's change may be
BATCH = 2000  # rows per insert while (re)writing a whole gallery


class _Remote:
    """One gallery's collections, and the vectors read from them (cached: the report and a
    recalibration read every vector, which is slow through Milvus)."""

    def __init__(self, rows: MilvusCollections, searched: MilvusCollections | None, name: str, dim: int):
        self.rows, self.searched, self.name, self.dim = rows, searched, name, dim
        self._vectors: tuple[np.ndarray, np.ndarray] | None = None
        self._raw: tuple[np.ndarray, np.ndarray] | None = None
        self._lock = threading.Lock()

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return (self.searched or self.rows).search(self.name, queries, k)

    def stored(self) -> tuple[np.ndarray, np.ndarray]:
        """Every searched vector, id order."""
        with self._lock:
            if self._vectors is None:
                self._vectors = (self.searched or self.rows).vectors(self.name)
            return self._vectors

    def raw(self) -> tuple[np.ndarray, np.ndarray]:
        """Every unprojected vector, id order."""
        if self.searched is None:
            return self.stored()
        with self._lock:
            if self._raw is None:
                self._raw = self.rows.vectors(self.name)
            return self._raw


class _RowMeta(EntryMeta):
    """Sources and thumbnails read from the gallery's rows (plus rows not written yet)."""

    def __init__(self, remote: _Remote | None, pending: Mapping[int, tuple[str, bytes | None]] | None = None):
        super().__init__(None, pending)
        self.remote = remote

    def with_rows(self, rows: Mapping[int, tuple[str, bytes | None]]) -> "_RowMeta":
        return _RowMeta(self.remote, {**self.pending, **rows})

    def get(self, ids: Iterable[int], *, thumbnails: bool = True) -> dict[int, tuple[str, bytes | None]]:
        wanted = [int(i) for i in ids]
        out = {i: self.pending[i] for i in wanted if i in self.pending}
        rest = [i for i in wanted if i not in out and i >= 0]
        if rest and self.remote is not None:
            for row in self.remote.rows.get(self.remote.name, rest):
                out[row["id"]] = (row["source"], row["thumbnail"] if thumbnails else None)
        if not thumbnails:
            out = {i: (row[0], None) for i, row in out.items()}
        return out


class MilvusGallery(GalleryIndex):
    """A gallery whose vectors Milvus holds and searches; labels, projection and calibration
    are here. Changes work as on any :class:`GalleryIndex` (a new object; added vectors wait
    beside the collection) until :class:`MilvusIndexStore` writes them."""

    _remote: _Remote
    milvus_version = 0
    milvus_epoch = ""
    checked_at = 0.0

    def __init__(self, remote: _Remote, labels: _Labels, *, metric_type: str, **kwargs: Any):
        self._remote = remote
        metric = faiss.METRIC_INNER_PRODUCT if metric_type == "IP" else faiss.METRIC_L2
        empty = faiss.IndexIDMap2(faiss.IndexFlat(remote.dim, metric))  # nothing in faiss: Milvus has it all
        kwargs.setdefault("search_params", {})
        super().__init__(empty, labels, metric_type=metric_type, keep=empty.index, **kwargs)

    def _adopt(self, other: GalleryIndex) -> None:
        self._remote = other._remote  # type: ignore[attr-defined]
        self._projection_key = getattr(other, "_projection_key", None)

    def _search_base(self, features: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        wanted = min(MAX_K, k + len(self._dead))
        scores, ids = self._remote.search(features, wanted)
        # rows this version does not list: removed since it was loaded, written by a newer
        # version (another replica), or added by this object and not yet committed
        known = (ids >= 0) & (self._labels.positions(ids.reshape(-1)).reshape(ids.shape) >= 0)
        if len(self._dead):
            known &= ~np.isin(ids, self._dead)
        if len(self._delta[0]):
            known &= ~np.isin(ids, self._delta[0])
        scores = np.where(known, scores, -np.inf).astype(np.float32)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        scores, ids = np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)
        return scores, np.where(np.isfinite(scores), ids, -1)

    def _base_rows(self) -> tuple[np.ndarray, np.ndarray]:
        ids, vecs = self._remote.stored()
        keep = self._labels.positions(ids) >= 0
        if len(self._delta[0]):
            keep &= ~np.isin(ids, self._delta[0])
        return ids[keep], vecs[keep]

    def _raw_features(self, ids: np.ndarray) -> np.ndarray:
        chunks = (self._remote.raw(), *(self._raw or ())[1:])
        merged = _merged_raw(chunks, np.asarray(ids, np.int64))
        if merged is None:
            raise ShiTuError("the unprojected features of some entries are missing in Milvus: rebuild the index")
        return merged[0][1].astype(np.float32)

    def compacted(self) -> GalleryIndex:
        """The whole gallery as an ordinary faiss index (for an export, or PaddleX's ``.index``)."""
        ids, vecs = self.vectors()
        order = np.argsort(ids)
        ids, vecs = ids[order], vecs[order]
        index, inner = _faiss_index(vecs, ids, self.index_type, self.metric_type)
        raw = None
        if self.whitening is not None:
            raw = ((ids.copy(), self._raw_features(ids).astype(np.float16)),)
        rows = self._meta.get(ids.tolist())
        return GalleryIndex(
            index, self._labels, metric_type=self.metric_type, index_type=self.index_type,
            next_id=self._next_id, feature_model=self.feature_model, whitening=self.whitening,
            suggested_rec_threshold=self._suggested, calibration=self.calibration, adaptation=self.adaptation,
            raw=raw, changes_since_calibration=self.changes_since_calibration, meta=EntryMeta(pending=rows),
            keep=inner,
        )  # fmt: skip

    def write_files(self, target: Path) -> None:
        self.compacted().write_files(target)

    def summary(self) -> dict:
        return {**super().summary(), "vector_store": "milvus"}


class MilvusIndexStore:
    """Named galleries in Milvus, with :class:`~shitu.store.IndexStore`'s interface.

    ``uri``: a Milvus Lite path (``…/milvus.db``, one process) or ``http(s)://host:port``;
    ``prefix`` namespaces our collections; ``lock_dir``: where writers on this machine take
    their file locks; ``keep_versions``: earlier versions kept per gallery.
    """

    versioned = True
    strict_names = True
    log_changes = True

    def __init__(
        self,
        uri: str,
        token: str | None = None,
        *,
        prefix: str = "shitu_",
        lock_dir: str | Path | None = None,
        keep_versions: int = KEEP_VERSIONS,
    ):
        self.uri = uri
        self.rows = MilvusCollections(uri, token, prefix)
        self.searched = MilvusCollections(uri, token, f"{prefix}p_")
        self.removed = MilvusCollections(uri, token, f"{prefix}t_")
        self.archive = MilvusCollections(uri, token, f"{prefix}h_")  # the collections of earlier builds
        self.keep_versions = max(0, int(keep_versions))
        self._lock_dir = Path(lock_dir) if lock_dir else None
        self._cache: dict[str, MilvusGallery] = {}
        self._pruned: dict[str, tuple[int, int]] = {}  # name -> (oldest kept version, archived generations) seen
        self._locks: dict[str, threading.RLock] = {}
        self._guard = threading.Lock()
        self._held = threading.local()

    def close(self) -> None:
        for part in (self.rows, self.searched, self.removed, self.archive):
            part.close()

    # --- names and locks --------------------------------------------------------------------
    def check(self, name: str | None) -> str:
        return check_name(name)

    def path(self, name: str) -> Path:
        return Path(f"milvus:{self.check(name)}")

    @contextlib.contextmanager
    def locked(self, name: str) -> Iterator[None]:
        """Exclusive access to one gallery among this machine's threads and processes."""
        held: set[str] = self._held.__dict__.setdefault("names", set())
        with self._guard:
            lock = self._locks.setdefault(name, threading.RLock())
        with lock:
            if fcntl is None or self._lock_dir is None or name in held:
                yield
                return
            self._lock_dir.mkdir(parents=True, exist_ok=True)
            key = hashlib.sha1(f"{self.uri}\0{name}".encode()).hexdigest()
            with open(self._lock_dir / f"milvus-{key}.lock", "a+b") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX)
                held.add(name)
                try:
                    yield
                finally:
                    held.discard(name)
                    fcntl.flock(fh, fcntl.LOCK_UN)

    # --- reading ------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return self.rows.names()

    def exists(self, name: str) -> bool:
        return self.rows.exists(self.check(name))

    def get(self, name: str) -> MilvusGallery:
        """The latest version (a replica's change is seen within :data:`SYNC_SECONDS`)."""
        name = self.check(name)
        cached = self._cache.get(name)
        if cached is not None and time.monotonic() - cached.checked_at < SYNC_SECONDS:
            return cached
        with self.locked(name):
            return self._load(name)

    def _head(self, name: str) -> dict[str, Any]:
        if not self.rows.exists(name):
            self._cache.pop(name, None)
            raise NotFound(f"no index named {name!r}")
        return self.rows.get_meta(name)

    def _load(self, name: str) -> MilvusGallery:
        head = self._head(name)
        cached = self._cache.get(name)
        if head.get("serving") != FORMAT:  # a gallery written by `shitu milvus-export`: adopt it
            from shitu.transfer import from_milvus

            log.info("serving the exported Milvus gallery %r: fitting its projection and calibration once", name)
            return self._write_all(name, from_milvus(self.rows, name), "adopt (milvus-export)", keep_rows=True)
        version, epoch = int(head["version"]), str(head["epoch"])
        if cached is not None and cached.milvus_epoch == epoch:
            if cached.milvus_version == version:
                cached.checked_at = time.monotonic()
                return cached
            if cached.milvus_version < version:
                records = [self._record(name, v) for v in range(cached.milvus_version + 1, version + 1)]
                if all(r is not None for r in records):
                    index = cached
                    for record in records:
                        index = self._replayed(name, index, record)
                    return self._cached(name, index, version, epoch)
        state = self._state(name, version)
        ids, labels = self.rows.id_labels(name)
        return self._cached(name, self._gallery(name, ids, labels, state), version, epoch)

    def _cached(self, name: str, index: MilvusGallery, version: int, epoch: str) -> MilvusGallery:
        index.milvus_version, index.milvus_epoch, index.checked_at = version, epoch, time.monotonic()
        index.forget_lineage()
        self._cache[name] = index
        return index

    def _state(self, name: str, version: int) -> dict[str, Any]:
        record = self._record(name, version)
        if record is None:
            raise ShiTuError(f"index {name!r} in Milvus has lost the record of its version {version}: import it again")
        return record["state"]

    def _record(self, name: str, version: int) -> dict[str, Any] | None:
        data = self.rows.get_blob(f"log/{name}/{version:010d}")
        return json.loads(data) if data is not None else None

    def _projection(self, key: str | None) -> Projection | None:
        if not key:
            return None
        data = self.rows.get_blob(key)
        if data is None:
            raise ShiTuError("the projection of this index is missing in Milvus: rebuild or import it again")
        with np.load(io.BytesIO(data)) as w:
            kind = str(w["kind"])
            return (Whitening if kind == "pca-whitening" else Projection)(w["mean"], w["projection"], kind)

    def _gallery(self, name: str, ids: np.ndarray, labels: list[str], state: dict[str, Any]) -> MilvusGallery:
        projection = self._projection(state.get("projection"))
        dim = projection.output_dim if projection is not None else int(state["dim"])
        remote = _Remote(self.rows, self.searched if projection is not None else None, name, dim)
        next_id = max(int(state["next_id"]), int(ids.max()) + 1 if len(ids) else 0)
        placeholder = ((np.zeros(0, np.int64), np.zeros((0, int(state["dim"])), np.float16)),)
        gallery = MilvusGallery(
            remote, _Labels.of(ids, labels), metric_type=state["metric_type"], index_type=state["index_type"],
            next_id=next_id, feature_model=state.get("feature_model"), trained_size=len(ids),
            whitening=projection, suggested_rec_threshold=state.get("suggested_rec_threshold"),
            calibration=Calibration.from_dict(state.get("calibration")),
            adaptation=Adaptation.from_dict(state.get("adaptation")),
            raw=placeholder if projection is not None else None,
            changes_since_calibration=int(state.get("changes_since_calibration") or 0),
            meta=_RowMeta(remote),
        )  # fmt: skip
        gallery._projection_key = state.get("projection")
        return gallery

    def _replayed(self, name: str, index: MilvusGallery, record: dict[str, Any]) -> MilvusGallery:
        """``index`` with one version's record applied (labels and state only: Milvus has the rows)."""
        state = record["state"]
        if record.get("full") or state.get("projection") != _projection_key(index):
            ids, labels = self.rows.id_labels(name)
            return self._gallery(name, ids, labels, state)
        table = index._labels
        for change in map(changes.decode, record["changes"]):
            if isinstance(change, changes.Add):
                table = table.added(change.ids, change.labels)
            elif isinstance(change, changes.Remove):
                table = table.removed(change.ids)
            elif isinstance(change, changes.Relabel):
                table = table.relabelled(change.ids, change.label)
        result = index._derive(labels=table, calibrate=False)
        _set_state(result, state)
        result._remote = _Remote(self.rows, index._remote.searched, name, index._remote.dim)
        result._meta = _RowMeta(result._remote)
        return result

    # --- writing ------------------------------------------------------------------------------
    def put(self, name: str, index: GalleryIndex, *, overwrite: bool = True, action: str = "build") -> GalleryIndex:
        """Store ``index`` under ``name``, replacing every row (a new line of versions)."""
        name = self.check(name)
        with self.locked(name):
            if not overwrite and self.rows.exists(name):
                raise Conflict(f"an index named {name!r} already exists")
            return self._write_all(name, index, action)

    def mutate(
        self, name: str, change: Callable[[GalleryIndex], GalleryIndex], *, action: str | None = None
    ) -> GalleryIndex:
        """Apply ``change`` to the latest version and write what it changed: the rows added,
        removed or relabelled (O(change)); a refit rewrites the searched vectors. If ``change``
        raises, nothing changes."""
        name = self.check(name)
        with self.locked(name):
            old = self._load(name)
            new = change(old)
            if new is old:
                return old
            chain = new.changes_since(old)
            if chain is not None:
                return self._write_changes(name, old, new, chain, action or changes.describe(chain))
            if np.array_equal(new.ids, old.ids) and isinstance(new, GalleryIndex):
                return self._write_refit(name, old, new, action or describe_change(old, new))
            return self._write_all(name, new, action or describe_change(old, new))

    def _write_changes(
        self, name: str, old: MilvusGallery, new: GalleryIndex, chain: list[changes.Change], action: str
    ) -> MilvusGallery:
        version = old.milvus_version + 1
        items = [changes.encode(change) for change in chain]
        record = {**_version_record(new, version, action), "changes": items, "state": _state_of(new, old)}
        self._write_record(name, record)
        searched = old._remote.searched
        for change in chain:
            if isinstance(change, changes.Add):
                ids = change.ids
                raw = change.raw if new.whitening is not None else change.vectors
                rows = new._meta.get(ids.tolist())
                self.rows.insert(
                    name, ids, np.asarray(raw, np.float32), list(change.labels),
                    [rows.get(i, ("", None))[0] for i in ids.tolist()],
                    [rows.get(i, ("", None))[1] for i in ids.tolist()],
                )  # fmt: skip
                if searched is not None:
                    searched.insert(name, ids, change.vectors, ["-"] * len(ids), [""] * len(ids))
            elif isinstance(change, changes.Remove):
                self._set_aside(name, change.ids)
                self.rows.delete(name, change.ids)
                if searched is not None:
                    searched.delete(name, change.ids)
            elif isinstance(change, changes.Relabel):
                self.rows.relabel(name, change.ids, change.label)
        return self._committed(name, new, record, old)

    def _set_aside(self, name: str, ids: np.ndarray) -> None:
        """Copy rows about to be removed into the removed-rows collection (for a restore)."""
        if not self.keep_versions:
            return
        rows = self.rows.rows(name, ids)
        if not self.removed.exists(name):
            self.removed.create(name, self.rows.info(name)["dim"], metric_type="IP", index_type="Flat")
        self.removed.delete(name, [r["id"] for r in rows])  # an id removed, restored and removed again
        self.removed.insert(
            name, [r["id"] for r in rows], np.stack([r["vector"] for r in rows]) if rows else np.zeros((0, 1)),
            [r["label"] for r in rows], [r["source"] for r in rows], [r["thumbnail"] for r in rows],
        )  # fmt: skip

    def _write_refit(self, name: str, old: MilvusGallery, new: GalleryIndex, action: str) -> MilvusGallery:
        """Same rows, new projection or calibration: rewrite only the searched vectors."""
        version = old.milvus_version + 1
        state = _state_of(new, old)
        if new.whitening is not None and new.whitening is not old.whitening:
            state["projection"] = self._store_projection(name, new.whitening)
        record = {**_version_record(new, version, action), "changes": [changes.encode(changes.Refit())],
                  "state": state}  # fmt: skip
        self._write_record(name, record)
        self._write_searched(name, new)
        return self._committed(name, new, record, old)

    def _archived_index(self, name: str, generation: int, id_map: dict[int, str], state: dict) -> GalleryIndex:
        """A version of an archived generation as an in-memory index: its rows (kept, or set
        aside by a later change of that generation), labels and state."""
        ids = np.asarray(sorted(id_map), np.int64)
        rows = {r["id"]: r for r in self.archive.rows(_archived("r", generation, name), ids)}
        missing = [i for i in ids.tolist() if i not in rows]
        with contextlib.suppress(NotFound):
            rows.update({r["id"]: r for r in self.archive.rows(_archived("t", generation, name), missing)})
        if len(rows) != len(ids):
            raise ShiTuError(f"index {name!r}: rows of that version are missing in Milvus, it cannot be restored")
        raw = np.stack([rows[i]["vector"] for i in ids.tolist()])
        projection = self._projection(state.get("projection"))
        stored = projection.apply(raw) if projection is not None else raw
        built, inner = _faiss_index(stored, ids, "Flat", state["metric_type"])
        index = GalleryIndex(
            built, _Labels.of(ids, [id_map[i] for i in ids.tolist()]), metric_type=state["metric_type"],
            index_type=state["index_type"], next_id=int(state["next_id"]), feature_model=state.get("feature_model"),
            search_params={}, whitening=projection, suggested_rec_threshold=state.get("suggested_rec_threshold"),
            calibration=Calibration.from_dict(state.get("calibration")),
            adaptation=Adaptation.from_dict(state.get("adaptation")),
            raw=((ids.copy(), raw.astype(np.float16)),) if projection is not None else None,
            changes_since_calibration=int(state.get("changes_since_calibration") or 0),
            meta=EntryMeta(pending={i: (rows[i]["source"], rows[i]["thumbnail"]) for i in ids.tolist()}), keep=inner,
        )  # fmt: skip
        return index

    def _write_all(
        self, name: str, index: GalleryIndex, action: str, *, keep_rows: bool = False, **extra: Any
    ) -> MilvusGallery:
        """Every row of ``index``, as the first version of a new *generation*: the collections of
        the one before are renamed into the archive (O(1)) while a version of it is kept."""
        if index.whitening is not None and index._raw is None and not isinstance(index, MilvusGallery):
            raise ShiTuError(
                "a PCA-whitened index (whiten=True) keeps no unprojected features, which Milvus stores: "
                "build it with adapt instead of whiten"
            )
        head = self.rows.get_meta(name) if self.rows.exists(name) else {}
        serving = head.get("serving") == FORMAT
        version = int(head.get("version", 0)) + 1 if serving else 1
        generations = list(head.get("generations", [])) if serving else []
        generation = int(head.get("generation", 0)) + 1 if serving else 1
        ids, stored = index.vectors()
        order = np.argsort(ids)
        ids, stored = ids[order], stored[order]
        raw = index._raw_features(ids) if index.whitening is not None else stored
        if not keep_rows:
            if serving and self.keep_versions:
                self._archive_generation(name, head)
                generations.append({"generation": generation - 1, "first": int(head["start"]), "last": version - 1})
            else:
                self._drop_collections(name)
                if not serving:
                    self._drop_blobs(name)
            self.rows.create(name, raw.shape[1], metric_type=index.metric_type, index_type=index.index_type)
            for start in range(0, len(ids), BATCH):
                part_ids = ids[start : start + BATCH]
                rows = index._meta.get(part_ids.tolist())
                self.rows.insert(
                    name, part_ids, raw[start : start + BATCH], index.labels_of(part_ids),
                    [rows.get(i, ("", None))[0] for i in part_ids.tolist()],
                    [rows.get(i, ("", None))[1] for i in part_ids.tolist()],
                )  # fmt: skip
            self.rows.flush(name)
        state = _state_of(index, None)
        state["dim"] = int(raw.shape[1])
        if index.whitening is not None:
            state["projection"] = self._store_projection(name, index.whitening)
        record = {**_version_record(index, version, action), **extra, "changes": [changes.encode(changes.Rewrite())],
                  "state": state, "full": True}  # fmt: skip
        self._write_record(name, record)
        self._write_searched(name, index, stored=(ids, stored))
        head = {"serving": FORMAT, "version": version, "epoch": os.urandom(6).hex(), "start": version,
                "generation": generation, "generations": generations}  # fmt: skip
        self.rows.put_meta(name, {**head, **_transfer_keys(index)})
        self._prune(name)
        return self._cached(name, self._gallery(name, ids, index.labels_of(ids), state), version, head["epoch"])

    def _write_searched(
        self, name: str, index: GalleryIndex, *, stored: tuple[np.ndarray, np.ndarray] | None = None
    ) -> None:
        """The projected vectors of an adapted index, in their own collection (none otherwise)."""
        if self.searched.exists(name):
            self.searched.drop(name)
        if index.whitening is None:
            return
        ids, vecs = stored if stored is not None else index.vectors()
        self.searched.create(name, vecs.shape[1], metric_type=index.metric_type, index_type=index.index_type)
        for start in range(0, len(ids), BATCH):
            part = ids[start : start + BATCH]
            self.searched.insert(name, part, vecs[start : start + BATCH], ["-"] * len(part), [""] * len(part))
        self.searched.flush(name)

    def _store_projection(self, name: str, projection: Projection) -> str:
        buf = io.BytesIO()
        np.savez(buf, mean=projection.mean, projection=projection.matrix, kind=projection.kind)
        data = buf.getvalue()
        key = f"projection/{name}/{hashlib.sha256(data).hexdigest()[:16]}"
        self.rows.put_blob(key, data, group=f"projection/{name}")
        return key

    def _write_record(self, name: str, record: dict[str, Any]) -> None:
        data = json.dumps(record, ensure_ascii=False).encode("utf-8")
        self.rows.put_blob(f"log/{name}/{record['version']:010d}", data, group=f"log/{name}")

    def _committed(self, name: str, new: GalleryIndex, record: dict[str, Any], old: MilvusGallery) -> MilvusGallery:
        head = self.rows.get_meta(name)
        version = int(record["version"])
        self.rows.put_meta(name, {**head, "version": version, **_transfer_keys(new)})
        if isinstance(new, MilvusGallery) and record["state"].get("projection") == _projection_key(old):
            result = new._derive(calibrate=False)
            _set_state(result, record["state"])
            fresh = _Remote(self.rows, old._remote.searched, name, old._remote.dim)
            if old._remote._vectors is not None and len(new) <= 200_000:  # keep what was read, updated
                fresh._vectors = _sorted(new.vectors())
            result._remote, result._meta = fresh, _RowMeta(fresh)
            result._delta = (np.zeros(0, np.int64), np.zeros((0, fresh.dim), np.float32))
            result._dead = np.zeros(0, np.int64)
            result._raw = ((np.zeros(0, np.int64), np.zeros((0, new.dim), np.float16)),) if new.whitening else None
        else:
            ids, labels = self.rows.id_labels(name)
            result = self._gallery(name, ids, labels, record["state"])
        self._prune(name, {**head, "version": version})
        return self._cached(name, result, version, str(head["epoch"]))

    def _prune(self, name: str, head: dict[str, Any] | None = None) -> None:
        """Forget what no kept version needs: older records, the rows they set aside, archived
        generations. Usually one record falls out of the window per commit: a few calls."""
        head = head if head is not None else self.rows.get_meta(name)
        current, start = int(head["version"]), int(head.get("start", 1))
        oldest = max(1, current - self.keep_versions)
        generations = head.get("generations", [])
        seen = self._pruned.get(name)
        if seen == (oldest, len(generations)):
            return  # nothing fell out of the kept window since the last look
        self._pruned[name] = (oldest, len(generations))
        kept = [g for g in generations if g["last"] >= oldest]
        for g in generations:
            if g["last"] < oldest:
                for kind in "rpt":
                    with contextlib.suppress(NotFound):
                        self.archive.drop(_archived(kind, g["generation"], name))
        if len(kept) != len(generations):
            self.rows.put_meta(name, {**head, "generations": kept})
        if seen is not None and seen[0] <= oldest:  # this process pruned up to seen[0] already
            gone = list(range(seen[0], oldest))
        else:
            logged = (int(k.rsplit("/", 1)[1]) for k in self.rows.blob_keys(f"log/{name}"))
            gone = sorted(n for n in logged if n < oldest)
        if not gone:
            return
        # rows set aside by the records that go, unless a kept record set them aside again
        dropped = set()
        for number in gone:
            if number >= start:
                dropped |= set(self._removed_by(name, number))
        if dropped and self.removed.exists(name):
            for number in range(oldest, current + 1):
                dropped -= set(self._removed_by(name, number))
            if dropped:
                self.removed.delete(name, sorted(dropped))
        self.rows.delete_blobs([f"log/{name}/{n:010d}" for n in gone])

    def _removed_by(self, name: str, number: int) -> list[int]:
        """The ids whose rows version ``number`` set aside."""
        record = self._record(name, number) or {}
        return [i for item in record.get("changes", []) for i in changes.decode(item).removed_ids()]

    def _archive_generation(self, name: str, head: dict[str, Any]) -> None:
        generation = int(head.get("generation", 1))
        for kind, part in (("r", self.rows), ("p", self.searched), ("t", self.removed)):
            target = _archived(kind, generation, name)
            with contextlib.suppress(NotFound):
                self.archive.drop(target)  # what a process killed half-way through an earlier archive left
            if part.exists(name):
                part.move(name, self.archive, target)

    def _drop_collections(self, name: str) -> None:
        for part in (self.rows, self.searched, self.removed):
            if part.exists(name):
                part.drop(name)

    def _drop_blobs(self, name: str) -> None:
        self.rows.delete_blobs(self.rows.blob_keys(f"log/{name}") + self.rows.blob_keys(f"projection/{name}"))

    def delete(self, name: str) -> None:
        name = self.check(name)
        with self.locked(name):
            if not self.rows.exists(name):
                raise NotFound(f"no index named {name!r}")
            for g in self.rows.get_meta(name).get("generations", []):
                for kind in "rpt":
                    with contextlib.suppress(NotFound):
                        self.archive.drop(_archived(kind, g["generation"], name))
            self._drop_collections(name)
            self._drop_blobs(name)
            self._cache.pop(name, None)

    def rename(self, old: str, new: str) -> None:
        """Milvus cannot rename a collection on every server: the gallery is copied, then the
        old name dropped."""
        old, new = self.check(old), self.check(new)
        if old == new:
            return
        with self.locked(old), self.locked(new):
            if self.rows.exists(new):
                raise Conflict(f"an index named {new!r} already exists")
            index = self._load(old)
            self._write_all(new, index, f"rename from {old}")
            self.delete(old)

    def wait_for_compactions(self, timeout: float | None = None) -> None:
        """Nothing to wait for: Milvus compacts by itself."""

    # --- versions -----------------------------------------------------------------------------
    def _catalog(self, name: str) -> tuple[int, dict[int, dict[str, Any]], dict[str, Any]]:
        """The current version, the records of the versions kept (newest first: the current
        generation's, and those of archived generations still held) and the metadata row."""
        head = self._head(name)
        current = int(head["version"])
        spans = [(int(head.get("start", 1)), current)]
        spans += [(g["first"], g["last"]) for g in head.get("generations", [])]
        catalog = {}
        for key in self.rows.blob_keys(f"log/{name}"):
            number = int(key.rsplit("/", 1)[1])
            if current - self.keep_versions <= number <= current and any(a <= number <= b for a, b in spans):
                record = self._record(name, number)
                if record is not None:
                    catalog[number] = record
        return current, dict(sorted(catalog.items(), reverse=True)), head

    def versions(self, name: str) -> list[dict[str, Any]]:
        name = self.check(name)
        with self.locked(name):
            self._load(name)
            current, catalog, _ = self._catalog(name)
            return [{"version": v, "current": v == current, **_public(rec)} for v, rec in catalog.items()]

    def _require(self, name: str, number: int, catalog: dict, current: int) -> None:
        if number in catalog:
            return
        if number > current:
            raise NotFound(f"index {name!r} has no version {number}: the current one is {current}")
        kept = sorted(catalog)
        shown = f"versions {kept[0]}–{kept[-1]}" if len(kept) > 1 else f"version {kept[0]}"
        raise NotFound(
            f"version {number} of index {name!r} is no longer kept: it keeps {shown} "
            f"(at most {self.keep_versions} earlier ones)"
        )

    @staticmethod
    def _generation_of(head: dict[str, Any], number: int) -> dict[str, Any] | None:
        """The archived generation holding version ``number`` (``None``: the current one)."""
        if number >= int(head.get("start", 1)):
            return None
        return next(g for g in head.get("generations", []) if g["first"] <= number <= g["last"])

    def _id_map_at(self, name: str, number: int, current: int, catalog: dict, head: dict) -> dict[int, str]:
        """The id map of version ``number``: its generation's last, with the records since undone."""
        generation = self._generation_of(head, number)
        if generation is None:
            id_map, last = self._cache[name].id_map, current
        else:
            ids, labels = self.archive.id_labels(_archived("r", generation["generation"], name))
            id_map, last = dict(zip(ids.tolist(), labels, strict=True)), generation["last"]
        for v in range(last, number, -1):
            for item in reversed(catalog[v]["changes"]):
                changes.decode(item).backward(id_map)
        return id_map

    def changes(
        self, name: str, version: int, against: int | None = None, *, limit: int = CHANGES_SHOWN
    ) -> dict[str, Any]:
        name = self.check(name)
        version = _number(version, "version")
        against = version - 1 if against is None else _number(against, "against", zero=True)
        with self.locked(name):
            self._load(name)
            current, catalog, head = self._catalog(name)
            self._require(name, version, catalog, current)
            if against:
                self._require(name, against, catalog, current)
            after = self._id_map_at(name, version, current, catalog, head)
            before = self._id_map_at(name, against, current, catalog, head) if against else {}
            record = catalog[version]
        return {
            "index": name, "version": version, "against": against, "action": record.get("action"),
            "time": record.get("time"), **diff_id_maps(before, after, limit=max(0, int(limit))),
        }  # fmt: skip

    def restore(self, name: str, version: int) -> tuple[GalleryIndex, dict[str, Any]]:
        """Make version ``version`` current again as a new version (``restore vN``): rows added
        since are removed, rows removed since come back from the set-aside collection, labels and
        state (calibration, projection) are those of that version; ids handed out since stay retired."""
        name = self.check(name)
        version = _number(version, "version")
        with self.locked(name):
            latest = self._load(name)
            current, catalog, head = self._catalog(name)
            if version == current:
                raise ShiTuError(f"version {version} is already the current version of index {name!r}")
            self._require(name, version, catalog, current)
            target = self._id_map_at(name, version, current, catalog, head)
            generation = self._generation_of(head, version)
            if generation is not None:  # an earlier build: written anew from its archived rows
                index = self._archived_index(name, generation["generation"], target, catalog[version]["state"])
                index.retire_ids_below(latest.next_id)
                written = self._write_all(name, index, f"restore v{version}", restored_from=version)
                record = self._record(name, written.milvus_version) or {}
                return written, {**_public(record), "version": written.milvus_version, "restored_from": version}
            now = latest.id_map
            back = sorted(target.keys() - now.keys())
            gone = sorted(now.keys() - target.keys())
            relabel: dict[str, list[int]] = {}
            for i in target.keys() & now.keys():
                if target[i] != now[i]:
                    relabel.setdefault(target[i], []).append(i)
            rows = self.removed.rows(name, back) if back and self.removed.exists(name) else []
            if len(rows) != len(back):
                raise ShiTuError(f"version {version} of index {name!r} cannot be restored: removed rows are missing")
            state = dict(catalog[version]["state"])
            state["next_id"] = max(int(state["next_id"]), latest.next_id)
            steps: list[changes.Change] = []
            if back:
                steps.append(changes.Add(np.asarray(back, np.int64), tuple(target[i] for i in back)))
            if gone:
                steps.append(changes.Remove(np.asarray(gone, np.int64), tuple(now[i] for i in gone)))
            for label, ids in sorted(relabel.items()):
                steps.append(changes.Relabel(np.asarray(sorted(ids), np.int64), label,
                                             tuple(now[i] for i in sorted(ids))))  # fmt: skip
            new_version = current + 1
            labels = _Labels.of(list(target), list(target.values()))
            record = {
                "format": 1, "version": new_version, "time": _now(), "action": f"restore v{version}",
                "entries": len(target), "labels": labels.distinct(), "feature_model": state.get("feature_model"),
                "index_type": state["index_type"], "metric_type": state["metric_type"], "restored_from": version,
                "changes": [changes.encode(step) for step in steps], "state": state,
            }  # fmt: skip
            self._write_record(name, record)
            if gone:
                self._set_aside(name, np.asarray(gone, np.int64))
                self.rows.delete(name, gone)
                if latest._remote.searched is not None:
                    self.searched.delete(name, gone)
            if rows:
                self.rows.insert(
                    name, back, np.stack([r["vector"] for r in rows]), [target[i] for i in back],
                    [r["source"] for r in rows], [r["thumbnail"] for r in rows],
                )  # fmt: skip
                self.removed.delete(name, back)
            for label, ids in relabel.items():
                self.rows.relabel(name, ids, label)
            ids, labels_now = self.rows.id_labels(name)
            index = self._gallery(name, ids, labels_now, state)
            if index.whitening is not None:
                self._write_searched(name, _with_raw_vectors(index))
            head = self.rows.get_meta(name)
            self.rows.put_meta(name, {**head, "version": new_version, **_transfer_keys(index)})
            self._prune(name)
            index = self._cached(name, self._gallery(name, ids, labels_now, state), new_version, str(head["epoch"]))
        return index, {**_public(record), "version": new_version, "restored_from": version}

    # --- moving indices in and out -----------------------------------------------------------
    def export_zip(self, name: str) -> bytes:
        name = self.check(name)
        return zipped(self.get(name), name)

    def import_zip(self, name: str, data: bytes, *, overwrite: bool = False) -> GalleryIndex:
        from shitu.store import IndexStore

        with tempfile.TemporaryDirectory() as tmp:
            unpacked = IndexStore(tmp, keep_versions=0, compact_in_background=False).import_zip(name, data)
            return self.put(name, unpacked, overwrite=overwrite, action="import")


# --- helpers -------------------------------------------------------------------------------------
def _archived(kind: str, generation: int, name: str) -> str:
    """The archive name of one collection (``r`` rows, ``p`` searched, ``t`` removed) of an
    earlier generation of gallery ``name``."""
    return f"{kind}{generation}-{hashlib.sha1(name.encode('utf-8')).hexdigest()[:24]}"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _sorted(rows: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(rows[0])
    return rows[0][order], rows[1][order]


def _projection_key(index: GalleryIndex) -> str | None:
    return getattr(index, "_projection_key", None) if index.whitening is not None else None


def _state_of(index: GalleryIndex, before: MilvusGallery | None) -> dict[str, Any]:
    """What a version's record keeps of the index besides its rows."""
    state = {
        "next_id": int(index.next_id),
        "feature_model": index.feature_model,
        "index_type": index.index_type,
        "metric_type": index.metric_type,
        "dim": int(index.dim),
        "suggested_rec_threshold": index._suggested,
        "calibration": index.calibration.to_dict() if index.calibration is not None else None,
        "adaptation": index.adaptation.to_dict() if index.adaptation is not None else None,
        "changes_since_calibration": int(index.changes_since_calibration),
        "projection": _projection_key(index),
    }
    if before is not None and index.whitening is before.whitening:
        state["projection"] = _projection_key(before)
    return state


def _set_state(index: GalleryIndex, state: dict[str, Any]) -> None:
    index.calibration = Calibration.from_dict(state.get("calibration"))
    index.adaptation = Adaptation.from_dict(state.get("adaptation"))
    index.changes_since_calibration = int(state.get("changes_since_calibration") or 0)
    index._next_id = max(index._next_id, int(state["next_id"]))
    index._projection_key = state.get("projection")  # type: ignore[attr-defined]


def _transfer_keys(index: GalleryIndex) -> dict[str, Any]:
    """What ``shitu milvus-import`` reads (shitu.transfer's format 1), kept up to date."""
    calibration = index.calibration
    picked = calibration is not None and calibration.chosen_by == "user"
    return {
        "format": 1, "next_id": int(index.next_id), "feature_model": index.feature_model,
        "adapt": index.adaptation.mode if index.adaptation is not None else "off",
        "user_threshold": calibration.threshold if picked else None, "entries": len(index),
    }  # fmt: skip


def _with_raw_vectors(index: MilvusGallery) -> GalleryIndex:
    """``index`` with its searched vectors recomputed from its rows (after a restore)."""
    ids, raw = index._remote.raw()
    stored = index.whitening.apply(raw)
    built, inner = _faiss_index(stored, ids, "Flat", index.metric_type)
    return GalleryIndex(built, _Labels.of(ids, index.labels_of(ids)), metric_type=index.metric_type,
                        index_type=index.index_type, next_id=index.next_id, whitening=index.whitening,
                        search_params={}, keep=inner)  # fmt: skip
