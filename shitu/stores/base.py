"""The contract every gallery store keeps, written once: names, locks, changes, versions, restores.

A store keeps named galleries and hands out :class:`~shitu.index.GalleryIndex` objects, the latest
committed version of each. Every commit is a *version*, listed with what it did (``build``,
``add 3``, ``remove 2, relabel 1``, ``restore v4`` ...) and restorable; ids are never reused.

:class:`GalleryStore` holds what is the same whatever keeps the vectors — the index's lock
(threads and processes on this machine), the mutate skeleton (load the latest, apply the caller's
change, write down what changed: the typed changes of :mod:`shitu.changes` when the change was
made by ``add``/``remove``/``relabel``/``with_threshold``, else a full write), the version
catalogue's questions (list, compare, restore) and their messages. A backend implements the
primitives: read a gallery, write one in full, append a commit's changes, describe its kept
versions, rebuild an id map of one of them, restore one, delete, rename.

Backends register by name (:func:`register`, :func:`open_store`); :mod:`shitu.stores.files` and
:mod:`shitu.stores.milvus` are the two.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from shitu import changes
from shitu.errors import Conflict, NotFound, ShiTuError
from shitu.index import GalleryIndex
from shitu.stores.layout import unzipped_index, zipped

try:  # POSIX; elsewhere only threads in one process are serialised
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

NAME_RE = re.compile(r"^[\w][\w.\-]*$")
MAX_NAME_CHARS = 64
MAX_NAME_BYTES = 180  # file names are limited to 255 bytes; leave room for ".<name>.old-xxxxxxxx"
KEEP_VERSIONS = 10  # earlier versions kept per index (Settings.history_versions)
CHANGES_SHOWN = 100  # entries listed per kind (added, removed, relabelled) by GalleryStore.changes
PUBLIC_KEYS = ("time", "action", "entries", "labels", "feature_model", "index_type", "metric_type")


def check_name(name: str | None) -> str:
    """A valid index name (letters, digits, ``_ - .``; at most 64 characters and 180 UTF-8 bytes)."""
    name = name.strip() if isinstance(name, str) else ""
    if (
        not NAME_RE.match(name)
        or name.endswith(".")
        or len(name) > MAX_NAME_CHARS
        or len(name.encode("utf-8")) > MAX_NAME_BYTES
    ):
        raise ShiTuError(
            f"invalid index name {name[:80]!r}: use 1–64 letters, digits, '_', '-' or '.' (at most "
            f"{MAX_NAME_BYTES} bytes in UTF-8), starting with a letter or digit"
        )
    return name


def version_number(value: Any, what: str, *, zero: bool = False) -> int:
    """A version number: ``4``, ``"4"`` or ``"v4"`` (``0`` = an empty index, where allowed)."""
    text = str(value).strip().lower().removeprefix("v") if not isinstance(value, bool) else ""
    if text.isascii() and text.isdigit() and len(text) <= 9 and (int(text) >= 1 or (zero and int(text) == 0)):
        return int(text)
    raise ShiTuError(f"{what} must be a version number such as 3 or v3, not {str(value)[:40]!r}")


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def version_record(index: GalleryIndex, number: int, action: str | None) -> dict[str, Any]:
    """What a version says about itself (written with it, listed by :meth:`GalleryStore.versions`)."""
    return {
        "format": 1,
        "version": number,
        "time": now(),
        "action": action,
        "entries": len(index),
        "labels": index.label_count,
        "feature_model": index.feature_model,
        "index_type": index.index_type,
        "metric_type": index.metric_type,
    }


def public_record(record: dict[str, Any]) -> dict[str, Any]:
    return {k: record.get(k) for k in PUBLIC_KEYS}


def describe_change(before: GalleryIndex, after: GalleryIndex) -> str:
    """A version's action from two indices: ``add 3``, ``remove 2, relabel 1``, ``no change``."""
    old, new = before.ids, after.ids
    common = np.intersect1d(old, new)
    relabelled = sum(a != b for a, b in zip(before.labels_of(common), after.labels_of(common), strict=True))
    counts = (("add", len(np.setdiff1d(new, old))), ("remove", len(np.setdiff1d(old, new))), ("relabel", relabelled))
    return ", ".join(f"{word} {n}" for word, n in counts if n) or "no change"


def diff_id_maps(before: dict[int, str], after: dict[int, str], *, limit: int = CHANGES_SHOWN) -> dict[str, Any]:
    """Ids added / removed (with their labels) and relabelled (``from`` → ``to``) going from
    ``before`` to ``after``: each kind's count and its first ``limit`` entries in id order."""
    added = sorted(after.keys() - before.keys())
    removed = sorted(before.keys() - after.keys())
    relabelled = sorted(i for i in after.keys() & before.keys() if after[i] != before[i])
    return {
        "entries_before": len(before),
        "entries_after": len(after),
        "added_count": len(added),
        "removed_count": len(removed),
        "relabelled_count": len(relabelled),
        "added": [{"id": i, "label": after[i]} for i in added[:limit]],
        "removed": [{"id": i, "label": before[i]} for i in removed[:limit]],
        "relabelled": [{"id": i, "from": before[i], "to": after[i]} for i in relabelled[:limit]],
        "limit": limit,
    }


@dataclass
class Catalog:
    """A gallery's kept versions: the current number and each kept version's record, newest
    first. ``where`` is the backend's own note of where each version lives."""

    current: int
    records: dict[int, dict[str, Any]]
    where: dict[int, Any] = field(default_factory=dict)


class GalleryStore(ABC):
    """Named galleries with versions. Thread-safe; writers on one machine take a file lock per
    gallery under ``lock_dir``, so a CLI beside the server never loses an acknowledged write."""

    kind: ClassVar[str] = ""
    versioned: bool = True  # keeps earlier versions (a user's own PaddleX directory does not)
    strict_names: bool = True  # names are checked with check_name (not: a user's own directory name)

    def __init__(self, *, lock_dir: str | Path | None, keep_versions: int = KEEP_VERSIONS):
        self.keep_versions = max(0, int(keep_versions))
        self._lock_dir = Path(lock_dir) if lock_dir else None
        self._locks: dict[str, threading.RLock] = {}
        self._guard = threading.Lock()
        self._held = threading.local()  # names this thread holds the file lock of (re-entrant)

    # --- names and locks --------------------------------------------------------------------
    def check(self, name: str | None) -> str:
        return check_name(name)

    @abstractmethod
    def path(self, name: str) -> Path:
        """Where the gallery lives, for messages and for a directory's own lock key."""

    def _lock_key(self, name: str) -> str:
        """The lock file's name for ``name`` (unique per gallery among this machine's stores)."""
        return name

    def _while_locked(self, name: str) -> None:
        """Called once the lock is taken: finish what a writer killed mid-change left."""
        return None

    @contextlib.contextmanager
    def locked(self, name: str) -> Iterator[None]:
        """Exclusive access to one gallery, across threads and (on POSIX) processes."""
        held: set[str] = self._held.__dict__.setdefault("names", set())
        with self._guard:
            lock = self._locks.setdefault(name, threading.RLock())
        with lock:
            if fcntl is None or self._lock_dir is None or name in held:
                yield
                return
            self._lock_dir.mkdir(parents=True, exist_ok=True)
            with open(self._lock_dir / f"{self._lock_key(name)}.lock", "a+b") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX)
                held.add(name)
                try:
                    self._while_locked(name)
                    yield
                finally:
                    held.discard(name)
                    fcntl.flock(fh, fcntl.LOCK_UN)

    @staticmethod
    def hashed_key(*parts: str) -> str:
        return hashlib.sha1("\0".join(parts).encode("utf-8")).hexdigest()

    # --- reading ------------------------------------------------------------------------------
    @abstractmethod
    def names(self) -> list[str]:
        """Galleries that exist, sorted."""

    @abstractmethod
    def exists(self, name: str) -> bool: ...

    def get(self, name: str) -> GalleryIndex:
        """The latest committed version (another process's commits included)."""
        name = self.check(name)
        fresh = self._cached(name)
        if fresh is not None:
            return fresh
        with self.locked(name):
            return self._load(name)

    def drop_cache(self) -> None:
        """Forget every gallery held in memory (the next read loads it, as a new process would)."""
        self._forget_all()

    def _forget_all(self) -> None:
        return None

    def _cached(self, name: str) -> GalleryIndex | None:
        """The version held in memory, if it is still the latest (checked without the lock)."""
        return None

    @abstractmethod
    def _load(self, name: str) -> GalleryIndex:
        """The latest version, read under the lock (:class:`NotFound` if there is none)."""

    # --- writing ------------------------------------------------------------------------------
    def put(self, name: str, index: GalleryIndex, *, overwrite: bool = True, action: str = "build") -> GalleryIndex:
        """Store ``index`` under ``name`` as a new version (``action`` says what made it)."""
        name = self.check(name)
        with self.locked(name):
            if not overwrite and self.exists(name):
                raise Conflict(f"an index named {name!r} already exists")
            return self._write_full(name, index, action)

    def mutate(
        self, name: str, change: Callable[[GalleryIndex], GalleryIndex], *, action: str | None = None
    ) -> GalleryIndex:
        """Apply ``change`` to the latest version under the gallery's lock and commit the result
        as the next version. If ``change`` raises, nothing is stored or changed in memory. The
        version's ``action`` is, unless given, what changed: ``add 3``, ``remove 2, relabel 1``."""
        name = self.check(name)
        with self.locked(name):
            old = self._load(name)
            new = change(old)
            if new is old:
                return old
            chain = new.changes_since(old) if self._logs_changes(name) else None
            if chain:
                return self._write_changes(name, old, new, chain, action or changes.describe(chain))
            return self._write_refit(name, old, new, action or describe_change(old, new))

    def _logs_changes(self, name: str) -> bool:
        """Whether a commit made of typed changes is written as those changes (else in full)."""
        return True

    @abstractmethod
    def _write_full(self, name: str, index: GalleryIndex, action: str, **extra: Any) -> GalleryIndex:
        """Write every entry of ``index`` as the next version of ``name`` (under its lock)."""

    @abstractmethod
    def _write_changes(
        self, name: str, old: GalleryIndex, new: GalleryIndex, chain: list[changes.Change], action: str
    ) -> GalleryIndex:
        """Write what ``chain`` changed from ``old`` (the latest) as the next version."""

    def _write_refit(self, name: str, old: GalleryIndex, new: GalleryIndex, action: str) -> GalleryIndex:
        """Write a change that is not a chain of typed changes (a refit, a restore ...)."""
        return self._write_full(name, new, action)

    @abstractmethod
    def delete(self, name: str) -> None: ...

    @abstractmethod
    def rename(self, old: str, new: str) -> None: ...

    def wait_for_compactions(self, timeout: float | None = None) -> None:
        """Wait for background work on the stored galleries (tests, shutdown)."""
        return None

    def close(self) -> None:
        """Release connections (a backend that holds some)."""
        return None

    # --- versions -----------------------------------------------------------------------------
    @abstractmethod
    def _catalog(self, name: str) -> Catalog:
        """The kept versions of ``name`` (under its lock, after :meth:`_load`)."""

    @abstractmethod
    def _id_map_at(self, name: str, catalog: Catalog, number: int) -> dict[int, str]:
        """The id map of kept version ``number`` (no vector read)."""

    @abstractmethod
    def _restore(self, name: str, number: int, latest: GalleryIndex, catalog: Catalog) -> tuple[GalleryIndex, int]:
        """Make kept version ``number`` current as a new version; ``(index, new version number)``."""

    def versions(self, name: str) -> list[dict[str, Any]]:
        """The current version and the earlier ones kept, newest first: ``version``,
        ``current``, ``time`` (UTC, ISO 8601), ``action``, ``entries``, ``labels``,
        ``feature_model``, ``index_type``, ``metric_type``."""
        name = self.check(name)
        with self.locked(name):
            self._load(name)
            catalog = self._catalog(name)
            return [{"version": v, "current": v == catalog.current, **public_record(rec)}
                    for v, rec in catalog.records.items()]  # fmt: skip

    def changes(
        self, name: str, version: int, against: int | None = None, *, limit: int = CHANGES_SHOWN
    ) -> dict[str, Any]:
        """What changed from version ``against`` (default: the one just before) to ``version``,
        from their id maps (no vector is read): ids ``added`` and ``removed`` with their labels,
        ids ``relabelled`` (``from`` → ``to``); each kind's ``..._count`` and its first ``limit``
        entries in id order. ``against=0`` compares with an empty index. Either may be the
        newer: ``changes(name, 3, against=current)`` is what restoring version 3 would change."""
        name = self.check(name)
        version = version_number(version, "version")
        against = version - 1 if against is None else version_number(against, "against", zero=True)
        with self.locked(name):
            self._load(name)
            catalog = self._catalog(name)
            self._require(name, version, catalog)
            if against:
                self._require(name, against, catalog)
            # read under the lock: a later prune or save cannot take the versions from under the read
            after = self._id_map_at(name, catalog, version)
            before = self._id_map_at(name, catalog, against) if against else {}
            record = catalog.records[version]
        return {
            "index": name, "version": version, "against": against, "action": record.get("action"),
            "time": record.get("time"), **diff_id_maps(before, after, limit=max(0, int(limit))),
        }  # fmt: skip

    def restore(self, name: str, version: int) -> tuple[GalleryIndex, dict[str, Any]]:
        """Make an earlier version current again, as a new version (``restore vN``), so it can be
        undone the same way; readers in every process see it at once; ids handed out since stay
        retired. Returns ``(index, its version record)``."""
        name = self.check(name)
        number = version_number(version, "version")
        with self.locked(name):
            latest = self._load(name)
            catalog = self._catalog(name)
            if number == catalog.current:
                raise ShiTuError(f"version {number} is already the current version of index {name!r}")
            self._require(name, number, catalog)
            index, new_number = self._restore(name, number, latest, catalog)
            record = {**version_record(index, new_number, f"restore v{number}"), "restored_from": number}
        return index, {**public_record(record), "version": new_number, "restored_from": number}

    def _require(self, name: str, number: int, catalog: Catalog) -> None:
        """:class:`NotFound`, saying which versions are kept, unless ``number`` is one of them."""
        if number in catalog.records:
            return
        if not self.versioned:
            raise NotFound(f"{name!r} is a directory of your own: only indices in the data dir keep earlier versions")
        if number > catalog.current:
            raise NotFound(f"index {name!r} has no version {number}: the current one is {catalog.current}")
        kept = sorted(catalog.records)
        shown = f"versions {kept[0]}–{kept[-1]}" if len(kept) > 1 else f"version {kept[0]}"
        raise NotFound(
            f"version {number} of index {name!r} is no longer kept: it keeps {shown} "
            f"(at most {self.keep_versions} earlier ones)"
        )

    # --- moving galleries in and out -----------------------------------------------------------
    def export_zip(self, name: str) -> bytes:
        """The gallery in PaddleX's layout (plus our metadata), every change folded in, as a .zip."""
        name = self.check(name)
        return zipped(self.get(name), name, self._scratch())

    def import_zip(self, name: str, data: bytes, *, overwrite: bool = False) -> GalleryIndex:
        """Import an index .zip (ours, or a zipped PaddleX ``IndexData.save`` dir)."""
        name = self.check(name)
        with unzipped_index(data, self._scratch()) as index:
            return self.put(name, index, overwrite=overwrite, action="import")

    def _scratch(self) -> Path | None:
        """Where temporary files go (``None``: the system's temporary dir)."""
        return None


# --- backends by name ------------------------------------------------------------------------------
# SHITU_VECTOR_STORE=<kind> -> the module whose ``open_store(settings)`` opens it (imported on first use,
# so an optional backend's client library is only needed by those who choose it)
BACKENDS: dict[str, str] = {"faiss": "shitu.stores.files", "milvus": "shitu.stores.milvus"}


def register(kind: str, module: str) -> None:
    """Make a vector store available as ``SHITU_VECTOR_STORE=<kind>``: ``module`` is imported and
    its ``open_store(settings)`` returns the store of named galleries for those settings."""
    BACKENDS[kind] = module


def open_store(kind: str, settings: Any) -> GalleryStore:
    module = BACKENDS.get(kind)
    if module is None:
        raise ShiTuError(f"unknown vector store {kind!r}: choose one of {', '.join(sorted(BACKENDS))}")
    return importlib.import_module(module).open_store(settings)
