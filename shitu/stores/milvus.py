"""Galleries served from Milvus (``SHITU_VECTOR_STORE=milvus``): the :class:`GalleryStore`
contract over Milvus collections, so the engine, UI, HTTP API, CLI and Python API work unchanged.

Where things live (in Milvus, so several app replicas can serve one gallery, and in one sidecar file
that they share):

* **rows** — the gallery collection of :class:`~shitu.stores.milvus_collections.MilvusCollections`:
  every entry's id, *unprojected* unit feature vector, label, source and thumbnail. This is the
  layout ``shitu milvus-export`` writes, so an exported gallery can be served as it is, and any
  Milvus client can search it with the feature model's own vectors.
* **searched vectors** of an adapted index — a second collection (prefix ``<prefix>p_``) with each
  entry's projected vector; a raw-feature index is searched in its rows directly.
* **removed rows** — a third collection (prefix ``<prefix>t_``) keeps what a change removed for as
  long as a version before it is kept, so a restore can bring them back.
* **state** — the gallery collection's properties hold its head: the version number (checked by
  replicas), epoch, next id; :class:`~shitu.stores.milvus_state.MilvusState` holds one record per
  version (what changed, as typed changes without vectors; the index's calibration and adaptation)
  and the projection, in a SQLite sidecar (Milvus keeps nothing without a vector field).

In each process an index holds what search needs beside Milvus: the labels as arrays (12 bytes an
entry), the projection and the calibration; its base (:class:`MilvusBase`) searches the
collection. A replica checks the version at most every :data:`SYNC_SECONDS` and applies the
records it missed.

Milvus has no transactions across rows: a change writes its record first, then the rows, then the
version. A process killed half-way leaves the rows it wrote (an add's first batches, say): the next
load reads the labels from the rows themselves, so what is searched and what is listed agree, and
ids are never reused (the next id is at least one past the largest id ever seen). Writers on one
machine are serialised by a file lock; writers on several machines should be one at a time (the
version is checked before each write, but Milvus offers no compare-and-set).

Versions work as with files — list, compare, restore, ids never reused — back to the last build or
import under that name: those replace every row, and what was there before is gone, unless a kept
version needs it (then the collections are renamed into an archive, O(1)).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shitu import changes
from shitu.adapt import Adaptation, Projection
from shitu.calibrate import Calibration
from shitu.entrymeta import EntryMeta, Row, write_rows
from shitu.errors import NotFound, ShiTuError
from shitu.index import Fit, GalleryIndex
from shitu.labels import LabelTable
from shitu.stores.base import KEEP_VERSIONS, Catalog, GalleryStore, now, version_record
from shitu.stores.milvus_collections import MAX_K, MilvusCollections
from shitu.stores.milvus_state import MilvusState
from shitu.stores.milvus_state import default_path as default_state_path
from shitu.vectors import FaissBase, Live

log = logging.getLogger(__name__)

FORMAT = 2  # of the state we keep; the transfer format (shitu.transfer) is 1 and is adopted on first use
SYNC_SECONDS = 1.0  # how stale a replica's view of another replica's change may be
BATCH = 2000  # rows per insert while (re)writing a whole gallery


class _Remote:
    """One gallery's collections, and the vectors read from them (cached: the report and a
    recalibration read every vector, which is slow through Milvus)."""

    def __init__(self, rows: MilvusCollections, searched: MilvusCollections | None, name: str, dim: int):
        self.rows, self.searched, self.name, self.dim = rows, searched, name, dim
        self.vectors_read: tuple[np.ndarray, np.ndarray] | None = None
        self._raw: tuple[np.ndarray, np.ndarray] | None = None
        self._lock = threading.Lock()

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return (self.searched or self.rows).search(self.name, queries, k)

    def stored(self) -> tuple[np.ndarray, np.ndarray]:
        """Every searched vector, id order."""
        with self._lock:
            if self.vectors_read is None:
                self.vectors_read = (self.searched or self.rows).vectors(self.name)
            return self.vectors_read

    def raw(self) -> tuple[np.ndarray, np.ndarray]:
        """Every unprojected vector, id order."""
        if self.searched is None:
            return self.stored()
        with self._lock:
            if self._raw is None:
                self._raw = self.rows.vectors(self.name)
            return self._raw


class MilvusBase:
    """The vectors of a gallery in Milvus, searched there (:class:`~shitu.vectors.VectorBase`)."""

    local = False
    search_params: dict[str, float] = {}

    def __init__(self, remote: _Remote):
        self.remote = remote
        self.dim = remote.dim

    def search(self, features: np.ndarray, k: int, live: Live, cache: dict) -> tuple[np.ndarray, np.ndarray]:
        scores, ids = self.remote.search(features, min(MAX_K, k + len(live.dead)))
        # rows this version does not list: removed since it was loaded, written by a newer
        # version (another replica), or added by this object and not yet committed
        known = (ids >= 0) & (live.labels.positions(ids.reshape(-1)).reshape(ids.shape) >= 0)
        if len(live.dead):
            known &= ~np.isin(ids, live.dead)
        if len(live.added):
            known &= ~np.isin(ids, live.added)
        scores = np.where(known, scores, -np.inf).astype(np.float32)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        scores, ids = np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)
        return scores, np.where(np.isfinite(scores), ids, -1)

    def rows(self, live: Live) -> tuple[np.ndarray, np.ndarray]:
        ids, vecs = self.remote.stored()
        keep = live.labels.positions(ids) >= 0
        if len(live.added):
            keep &= ~np.isin(ids, live.added)
        return ids[keep], vecs[keep]

    def raw_rows(self) -> tuple[np.ndarray, np.ndarray] | None:
        return self.remote.raw() if self.remote.searched is not None else None

    def folded(self, live: Live, added: np.ndarray, index_type: str, metric_type: str) -> FaissBase:
        """The whole gallery as an ordinary faiss index (an export, or PaddleX's ``.index``)."""
        base_ids, base_vecs = self.rows(live)
        ids, vecs = np.concatenate([base_ids, live.added]), np.concatenate([base_vecs, added])
        order = np.argsort(ids)
        return FaissBase.build(vecs[order], ids[order], index_type, metric_type)


class MilvusRows(EntryMeta):
    """Sources and thumbnails read from the gallery's rows (plus rows not written yet)."""

    def __init__(self, remote: _Remote | None, pending: Mapping[int, Row] | None = None):
        super().__init__(None, pending)
        self.remote = remote

    def with_rows(self, rows: Mapping[int, Row]) -> MilvusRows:
        return MilvusRows(self.remote, {**self.pending, **rows})

    def get(self, ids: Iterable[int], *, thumbnails: bool = True) -> dict[int, Row]:
        wanted = [int(i) for i in ids]
        out = {i: self.pending[i] for i in wanted if i in self.pending}
        rest = [i for i in wanted if i not in out and i >= 0]
        if rest and self.remote is not None:
            for row in self.remote.rows.get(self.remote.name, rest):
                out[row["id"]] = (row["source"], row["thumbnail"] if thumbnails else None)
        if not thumbnails:
            out = {i: (row[0], None) for i, row in out.items()}
        return out

    def save_to(self, target: str | Path, live_ids: Iterable[int]) -> EntryMeta:
        """Every live entry's row written into the SQLite file ``target`` (an export to files)."""
        ids = [int(i) for i in live_ids]
        for start in range(0, max(len(ids), 1), BATCH):
            write_rows(target, self.get(ids[start : start + BATCH]))
        return EntryMeta(target)


@dataclass
class _Held:
    """A gallery as this process last read or wrote it."""

    index: GalleryIndex
    version: int
    epoch: str
    projection_key: str | None
    remote: _Remote
    checked_at: float = 0.0


class MilvusStore(GalleryStore):
    """Named galleries in Milvus.

    ``uri``: a Milvus Lite path (``…/milvus.db``, one process) or ``http(s)://host:port``;
    ``prefix`` namespaces our collections; ``lock_dir``: where writers on this machine take
    their file locks; ``keep_versions``: earlier versions kept per gallery; ``state_path``: the
    SQLite file of version records and projections (:mod:`shitu.stores.milvus_state`; default:
    beside a Milvus Lite file, else ``milvus_state.sqlite`` beside ``lock_dir``).
    """

    kind = "milvus"

    def __init__(
        self,
        uri: str,
        token: str | None = None,
        *,
        prefix: str = "shitu_",
        lock_dir: str | Path | None = None,
        keep_versions: int = KEEP_VERSIONS,
        state_path: str | Path | None = None,
    ):
        super().__init__(lock_dir=lock_dir, keep_versions=keep_versions)
        self.uri = uri
        self.rows = MilvusCollections(uri, token, prefix)
        self.searched = MilvusCollections(uri, token, f"{prefix}p_")
        self.removed = MilvusCollections(uri, token, f"{prefix}t_")
        self.archive = MilvusCollections(uri, token, f"{prefix}h_")  # the collections of earlier builds
        home = Path(lock_dir).parent if lock_dir is not None else None  # the data dir, as open_store passes it
        self.state = MilvusState(self.rows, state_path or default_state_path(self.rows, home))
        self._galleries: dict[str, _Held] = {}
        self._pruned: dict[str, tuple[int, int]] = {}  # name -> (oldest kept version, archived generations) seen

    def close(self) -> None:
        for part in (self.rows, self.searched, self.removed, self.archive):
            part.close()

    def path(self, name: str) -> Path:
        return Path(f"milvus:{self.check(name)}")

    def _lock_key(self, name: str) -> str:
        return "milvus-" + self.hashed_key(self.uri, name)

    # --- reading ------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return self.rows.names()

    def exists(self, name: str) -> bool:
        return self.rows.exists(self.check(name))

    def _forget_all(self) -> None:
        self._galleries.clear()

    def _cached(self, name: str) -> GalleryIndex | None:
        held = self._galleries.get(name)
        if held is not None and time.monotonic() - held.checked_at < SYNC_SECONDS:
            return held.index
        return None

    def _head(self, name: str) -> dict[str, Any]:
        if not self.rows.exists(name):
            self._galleries.pop(name, None)
            raise NotFound(f"no index named {name!r}")
        return self.rows.get_meta(name)

    def _load(self, name: str) -> GalleryIndex:
        return self._load_held(name).index

    def _load_held(self, name: str) -> _Held:
        head = self._head(name)
        held = self._galleries.get(name)
        if head.get("serving") != FORMAT:  # a gallery written by `shitu milvus-export`: adopt it
            from shitu.transfer import from_milvus

            log.info("serving the exported Milvus gallery %r: fitting its projection and calibration once", name)
            self._write_all(name, from_milvus(self.rows, name), "adopt (milvus-export)", keep_rows=True)
            return self._galleries[name]
        version, epoch = int(head["version"]), str(head["epoch"])
        if held is not None and held.epoch == epoch:
            if held.version == version:
                held.checked_at = time.monotonic()
                return held
            if held.version < version:
                records = [self.state.record(name, v) for v in range(held.version + 1, version + 1)]
                if all(r is not None for r in records):
                    for record in records:
                        held = self._replayed(name, held, record)  # type: ignore[arg-type]
                    return self._hold(name, held.index, version, epoch, held.projection_key)
        state = self._state(name, version)
        ids, labels = self.rows.id_labels(name)
        return self._hold(name, self._gallery(name, ids, labels, state), version, epoch, state.get("projection"))

    def _hold(self, name: str, index: GalleryIndex, version: int, epoch: str, projection_key: str | None) -> _Held:
        index.forget_lineage()
        remote = index.base.remote if isinstance(index.base, MilvusBase) else None
        held = _Held(index, version, epoch, projection_key, remote, time.monotonic())  # type: ignore[arg-type]
        self._galleries[name] = held
        return held

    def _state(self, name: str, version: int) -> dict[str, Any]:
        record = self.state.record(name, version)
        if record is None:
            raise ShiTuError(
                f"index {name!r} in Milvus has no record of its version {version} in {self.state.path}: every "
                "process serving this Milvus must share that file (SHITU_MILVUS_STATE); else import the index again"
            )
        return record["state"]

    def _gallery(self, name: str, ids: np.ndarray, labels: list[str], state: dict[str, Any]) -> GalleryIndex:
        projection = self.state.projection(state.get("projection"))
        dim = projection.output_dim if projection is not None else int(state["dim"])
        remote = _Remote(self.rows, self.searched if projection is not None else None, name, dim)
        next_id = max(int(state["next_id"]), int(ids.max()) + 1 if len(ids) else 0)
        placeholder = ((np.zeros(0, np.int64), np.zeros((0, int(state["dim"])), np.float16)),)
        return GalleryIndex(
            MilvusBase(remote), LabelTable.of(ids, labels), index_type=state["index_type"],
            metric_type=state["metric_type"], next_id=next_id, feature_model=state.get("feature_model"),
            fit=_fit_of(state, projection), raw=placeholder if projection is not None else None,
            rows=MilvusRows(remote),
        )  # fmt: skip

    def _replayed(self, name: str, held: _Held, record: dict[str, Any]) -> _Held:
        """``held`` with one version's record applied (labels and state only: Milvus has the rows)."""
        state = record["state"]
        if record.get("full") or state.get("projection") != held.projection_key:
            ids, labels = self.rows.id_labels(name)
            index = self._gallery(name, ids, labels, state)
            return _Held(index, held.version, held.epoch, state.get("projection"), index.base.remote)
        id_map = held.index.id_map
        for item in record["changes"]:
            changes.decode(item).forward(id_map)
        remote = _Remote(self.rows, held.remote.searched, name, held.remote.dim)
        index = held.index.rebased(MilvusBase(remote), labels=LabelTable.of(list(id_map), list(id_map.values())),
                                   rows=MilvusRows(remote))  # fmt: skip
        return _Held(_with_state(index, state), held.version, held.epoch, held.projection_key, remote)

    # --- writing ------------------------------------------------------------------------------
    def _write_full(self, name: str, index: GalleryIndex, action: str, **extra: Any) -> GalleryIndex:
        return self._write_all(name, index, action, **extra)

    def _write_changes(
        self, name: str, old: GalleryIndex, new: GalleryIndex, chain: list[changes.Change], action: str
    ) -> GalleryIndex:
        held = self._galleries[name]
        version = held.version + 1
        items = [changes.encode(change) for change in chain]
        record = {**version_record(new, version, action), "changes": items, "state": self._state_of(new, held)}
        self.state.put_record(name, record)
        searched = held.remote.searched
        for change in chain:
            if isinstance(change, changes.Add):
                ids = change.ids
                raw = change.raw if new.whitening is not None else change.vectors
                rows = new.rows.get(ids.tolist())
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
        return self._committed(name, new, record, held)

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

    def _write_refit(self, name: str, old: GalleryIndex, new: GalleryIndex, action: str) -> GalleryIndex:
        """Same rows, new projection or calibration: rewrite only the searched vectors."""
        if not np.array_equal(new.ids, old.ids):
            return self._write_all(name, new, action)
        held = self._galleries[name]
        version = held.version + 1
        state = self._state_of(new, held)
        if new.whitening is not None and new.whitening is not old.whitening:
            state["projection"] = self.state.put_projection(name, new.whitening)
        record = {**version_record(new, version, action), "changes": [changes.encode(changes.Refit())],
                  "state": state}  # fmt: skip
        self.state.put_record(name, record)
        self._write_searched(name, new)
        return self._committed(name, new, record, held)

    def _write_all(
        self, name: str, index: GalleryIndex, action: str, *, keep_rows: bool = False, **extra: Any
    ) -> GalleryIndex:
        """Every row of ``index``, as the first version of a new *generation*: the collections of
        the one before are renamed into the archive (O(1)) while a version of it is kept."""
        if index.whitening is not None and index.raw_chunks is None and index.base.local:
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
        raw = index.raw_features(ids) if index.whitening is not None else stored
        if not keep_rows:
            if serving and self.keep_versions:
                self._archive_generation(name, head)
                generations.append({"generation": generation - 1, "first": int(head["start"]), "last": version - 1})
            else:
                self._drop_collections(name)
                if not serving:
                    self.state.drop(name)
            self.rows.create(name, raw.shape[1], metric_type=index.metric_type, index_type=index.index_type)
            for start in range(0, len(ids), BATCH):
                part_ids = ids[start : start + BATCH]
                rows = index.rows.get(part_ids.tolist())
                self.rows.insert(
                    name, part_ids, raw[start : start + BATCH], index.labels_of(part_ids),
                    [rows.get(i, ("", None))[0] for i in part_ids.tolist()],
                    [rows.get(i, ("", None))[1] for i in part_ids.tolist()],
                )  # fmt: skip
            self.rows.flush(name)
        state = self._state_of(index, None)
        state["dim"] = int(raw.shape[1])
        if index.whitening is not None:
            state["projection"] = self.state.put_projection(name, index.whitening)
        record = {**version_record(index, version, action), **extra, "changes": [changes.encode(changes.Rewrite())],
                  "state": state, "full": True}  # fmt: skip
        self.state.put_record(name, record)
        self._write_searched(name, index, stored=(ids, stored))
        head = {"serving": FORMAT, "version": version, "epoch": os.urandom(6).hex(), "start": version,
                "generation": generation, "generations": generations}  # fmt: skip
        self.rows.put_meta(name, {**head, **_transfer_keys(index)})
        self._prune(name)
        gallery = self._gallery(name, ids, index.labels_of(ids), state)
        return self._hold(name, gallery, version, head["epoch"], state.get("projection")).index

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

    def _committed(self, name: str, new: GalleryIndex, record: dict[str, Any], held: _Held) -> GalleryIndex:
        head = self.rows.get_meta(name)
        version = int(record["version"])
        self.rows.put_meta(name, {**head, "version": version, **_transfer_keys(new)})
        if not new.base.local and record["state"].get("projection") == held.projection_key:
            fresh = _Remote(self.rows, held.remote.searched, name, held.remote.dim)
            if held.remote.vectors_read is not None and len(new) <= 200_000:  # keep what was read, updated
                ids, vecs = new.vectors()
                order = np.argsort(ids)
                fresh.vectors_read = (ids[order], vecs[order])
            result = _with_state(new.rebased(MilvusBase(fresh), rows=MilvusRows(fresh)), record["state"])
        else:
            ids, labels = self.rows.id_labels(name)
            result = self._gallery(name, ids, labels, record["state"])
        self._prune(name, {**head, "version": version})
        return self._hold(name, result, version, str(head["epoch"]), record["state"].get("projection")).index

    def _state_of(self, index: GalleryIndex, held: _Held | None) -> dict[str, Any]:
        """What a version's record keeps of the index besides its rows."""
        fit = index.fit
        same_projection = held is not None and index.whitening is held.index.whitening
        return {
            "next_id": int(index.next_id),
            "feature_model": index.feature_model,
            "index_type": index.index_type,
            "metric_type": index.metric_type,
            "dim": int(index.dim),
            "suggested_rec_threshold": fit.legacy_threshold,
            "calibration": fit.calibration.to_dict() if fit.calibration is not None else None,
            "adaptation": fit.adaptation.to_dict() if fit.adaptation is not None else None,
            "changes_since_calibration": int(fit.changes_since_calibration),
            "projection": held.projection_key if same_projection and index.whitening is not None else None,
        }

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
                self._drop_archived(name, g["generation"])
        if len(kept) != len(generations):
            self.rows.put_meta(name, {**head, "generations": kept})
        if seen is not None and seen[0] <= oldest:  # this process pruned up to seen[0] already
            gone = list(range(seen[0], oldest))
        else:
            gone = [n for n in self.state.record_numbers(name) if n < oldest]
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
        self.state.drop_records(name, gone)

    def _removed_by(self, name: str, number: int) -> list[int]:
        """The ids whose rows version ``number`` set aside."""
        record = self.state.record(name, number) or {}
        return [i for item in record.get("changes", []) for i in changes.decode(item).removed_ids()]

    def _archive_generation(self, name: str, head: dict[str, Any]) -> None:
        generation = int(head.get("generation", 1))
        for kind, part in (("r", self.rows), ("p", self.searched), ("t", self.removed)):
            target = _archived(kind, generation, name)
            with contextlib.suppress(NotFound):
                self.archive.drop(target)  # what a process killed half-way through an earlier archive left
            if part.exists(name):
                part.move(name, self.archive, target)

    def _drop_archived(self, name: str, generation: int) -> None:
        for kind in "rpt":
            with contextlib.suppress(NotFound):
                self.archive.drop(_archived(kind, generation, name))

    def _drop_collections(self, name: str) -> None:
        for part in (self.rows, self.searched, self.removed):
            if part.exists(name):
                part.drop(name)

    def delete(self, name: str) -> None:
        name = self.check(name)
        with self.locked(name):
            if not self.rows.exists(name):
                raise NotFound(f"no index named {name!r}")
            for g in self.rows.get_meta(name).get("generations", []):
                self._drop_archived(name, g["generation"])
            self._drop_collections(name)
            self.state.drop(name)
            self._galleries.pop(name, None)

    def rename(self, old: str, new: str) -> None:
        """Milvus cannot rename a collection on every server: the gallery is copied, then the
        old name dropped."""
        old, new = self.check(old), self.check(new)
        if old == new:
            return
        with self.locked(old), self.locked(new):
            if self.rows.exists(new):
                from shitu.errors import Conflict

                raise Conflict(f"an index named {new!r} already exists")
            index = self._load(old)
            self._write_all(new, index, f"rename from {old}")
            self.delete(old)

    # --- versions -----------------------------------------------------------------------------
    def _catalog(self, name: str) -> Catalog:
        """The current generation's records and those of archived generations still held."""
        head = self._head(name)
        current = int(head["version"])
        spans = [(int(head.get("start", 1)), current)]
        spans += [(g["first"], g["last"]) for g in head.get("generations", [])]
        records = {}
        for number in self.state.record_numbers(name):
            if current - self.keep_versions <= number <= current and any(a <= number <= b for a, b in spans):
                record = self.state.record(name, number)
                if record is not None:
                    records[number] = record
        return Catalog(current, dict(sorted(records.items(), reverse=True)), {"head": head})

    @staticmethod
    def _generation_of(head: dict[str, Any], number: int) -> dict[str, Any] | None:
        """The archived generation holding version ``number`` (``None``: the current one)."""
        if number >= int(head.get("start", 1)):
            return None
        return next(g for g in head.get("generations", []) if g["first"] <= number <= g["last"])

    def _id_map_at(self, name: str, catalog: Catalog, number: int) -> dict[int, str]:
        """The id map of version ``number``: its generation's last, with the records since undone."""
        head = catalog.where["head"]
        generation = self._generation_of(head, number)
        if generation is None:
            id_map, last = self._galleries[name].index.id_map, catalog.current
        else:
            ids, labels = self.archive.id_labels(_archived("r", generation["generation"], name))
            id_map, last = dict(zip(ids.tolist(), labels, strict=True)), generation["last"]
        for v in range(last, number, -1):
            for item in reversed(catalog.records[v]["changes"]):
                changes.decode(item).backward(id_map)
        return id_map

    def _restore(self, name: str, number: int, latest: GalleryIndex, catalog: Catalog) -> tuple[GalleryIndex, int]:
        """Rows added since are removed, rows removed since come back from the set-aside collection,
        labels and state (calibration, projection) are those of that version; an earlier build is
        written anew from its archived rows."""
        head = catalog.where["head"]
        target = self._id_map_at(name, catalog, number)
        generation = self._generation_of(head, number)
        if generation is not None:
            index = self._archived_index(name, generation["generation"], target, catalog.records[number]["state"])
            index.retire_ids_below(latest.next_id)
            written = self._write_all(name, index, f"restore v{number}", restored_from=number)
            return written, self._galleries[name].version
        now_map = latest.id_map
        back = sorted(target.keys() - now_map.keys())
        gone = sorted(now_map.keys() - target.keys())
        relabel: dict[str, list[int]] = {}
        for i in target.keys() & now_map.keys():
            if target[i] != now_map[i]:
                relabel.setdefault(target[i], []).append(i)
        rows = self.removed.rows(name, back) if back and self.removed.exists(name) else []
        if len(rows) != len(back):
            raise ShiTuError(f"version {number} of index {name!r} cannot be restored: removed rows are missing")
        state = dict(catalog.records[number]["state"])
        state["next_id"] = max(int(state["next_id"]), latest.next_id)
        steps: list[changes.Change] = []
        if back:
            steps.append(changes.Add(np.asarray(back, np.int64), tuple(target[i] for i in back)))
        if gone:
            steps.append(changes.Remove(np.asarray(gone, np.int64), tuple(now_map[i] for i in gone)))
        for label, ids in sorted(relabel.items()):
            steps.append(changes.Relabel(np.asarray(sorted(ids), np.int64), label,
                                         tuple(now_map[i] for i in sorted(ids))))  # fmt: skip
        new_version = catalog.current + 1
        labels = LabelTable.of(list(target), list(target.values()))
        record = {
            "format": 1, "version": new_version, "time": now(), "action": f"restore v{number}",
            "entries": len(target), "labels": labels.distinct(), "feature_model": state.get("feature_model"),
            "index_type": state["index_type"], "metric_type": state["metric_type"], "restored_from": number,
            "changes": [changes.encode(step) for step in steps], "state": state,
        }  # fmt: skip
        self.state.put_record(name, record)
        if gone:
            self._set_aside(name, np.asarray(gone, np.int64))
            self.rows.delete(name, gone)
            if self._galleries[name].remote.searched is not None:
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
            self._write_searched(name, _searchable(index))
        head = self.rows.get_meta(name)
        self.rows.put_meta(name, {**head, "version": new_version, **_transfer_keys(index)})
        self._prune(name)
        fresh = self._gallery(name, ids, labels_now, state)
        return self._hold(name, fresh, new_version, str(head["epoch"]), state.get("projection")).index, new_version

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
        projection = self.state.projection(state.get("projection"))
        stored = projection.apply(raw) if projection is not None else raw
        return GalleryIndex(
            FaissBase.build(stored, ids, "Flat", state["metric_type"]),
            LabelTable.of(ids, [id_map[i] for i in ids.tolist()]), index_type=state["index_type"],
            metric_type=state["metric_type"], next_id=int(state["next_id"]), feature_model=state.get("feature_model"),
            fit=_fit_of(state, projection),
            raw=((ids.copy(), raw.astype(np.float16)),) if projection is not None else None,
            rows=EntryMeta(pending={i: (rows[i]["source"], rows[i]["thumbnail"]) for i in ids.tolist()}),
        )  # fmt: skip


def open_store(settings: Any) -> MilvusStore:
    """Named galleries in Milvus (``SHITU_VECTOR_STORE=milvus``)."""
    return MilvusStore(
        settings.milvus_target, settings.milvus_token, prefix=settings.milvus_prefix,
        lock_dir=settings.data_dir / "locks", keep_versions=settings.history_versions,
        state_path=settings.milvus_state,
    )  # fmt: skip


# --- helpers -------------------------------------------------------------------------------------
def _archived(kind: str, generation: int, name: str) -> str:
    """The archive name of one collection (``r`` rows, ``p`` searched, ``t`` removed) of an
    earlier generation of gallery ``name``."""
    return f"{kind}{generation}-{GalleryStore.hashed_key(name)[:24]}"


def _fit_of(state: dict[str, Any], projection: Projection | None) -> Fit:
    return Fit(
        projection, Calibration.from_dict(state.get("calibration")), Adaptation.from_dict(state.get("adaptation")),
        state.get("suggested_rec_threshold"), int(state.get("changes_since_calibration") or 0),
    )  # fmt: skip


def _with_state(index: GalleryIndex, state: dict[str, Any]) -> GalleryIndex:
    return index.with_state(
        calibration=Calibration.from_dict(state.get("calibration")),
        changes_since_calibration=int(state.get("changes_since_calibration") or 0), next_id=int(state["next_id"]),
        adaptation=Adaptation.from_dict(state.get("adaptation")),
    )  # fmt: skip


def _transfer_keys(index: GalleryIndex) -> dict[str, Any]:
    """What ``shitu milvus-import`` reads (shitu.transfer's format 1), kept up to date."""
    calibration = index.calibration
    picked = calibration is not None and calibration.chosen_by == "user"
    return {
        "format": 1, "next_id": int(index.next_id), "feature_model": index.feature_model,
        "adapt": index.adaptation.mode if index.adaptation is not None else "off",
        "user_threshold": calibration.threshold if picked else None, "entries": len(index),
    }  # fmt: skip


def _searchable(index: GalleryIndex) -> GalleryIndex:
    """``index`` with its searched vectors recomputed from its unprojected rows (after a restore)."""
    ids, raw = index.base.raw_rows() or index.vectors()
    stored = index.whitening.apply(raw)
    return GalleryIndex(
        FaissBase.build(stored, ids, "Flat", index.metric_type), LabelTable.of(ids, index.labels_of(ids)),
        index_type=index.index_type, metric_type=index.metric_type, next_id=index.next_id,
        fit=Fit(index.whitening),
    )  # fmt: skip
