"""Gallery indices kept in a directory: loaded once, changed one writer at a time, saved atomically.

Readers get the current :class:`GalleryIndex` object; a change builds a new object, saves it
and only then swaps it in, so a query always sees one complete version.

Several processes may share a directory (the server and a CLI run beside it): every change
takes an exclusive file lock on that index and first reloads it if another process committed
since it was loaded (the version is the identity of the files on disk), so no acknowledged
write is ever lost or overwritten. Readers notice a newer version with one ``stat`` and reload
it under the same lock, so a save in progress is never read half-done.

An index that cannot be read is moved to ``.quarantine/`` once, reported clearly, and leaves
every other index working.

Every committed change is a *version* of the index: the index dir holds a small
``shitu_version.json`` (its number, UTC time, what was done — ``build``, ``add 3``,
``remove 2``, ``relabel 1``, ``import``, ``restore v4`` —, entry and label counts, feature
model), written into the new copy before the swap, so it commits with it. The copy a save
replaces is not deleted but renamed (O(1), by the journalled swap of
:func:`shitu.fsutil.replace_dir`, under the index's lock) to ``.history/<name>/<number>/``;
at most ``keep_versions`` earlier versions are kept, the oldest are deleted beyond that. A
restore makes an earlier version current again *as a new version*, so it can be undone too.
A directory without a version file (PaddleX's layout, or one saved by other code) counts as
one version after the newest kept one.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import numpy as np
import yaml

from shitu import changelog, changes
from shitu.changelog import LOG_FILE
from shitu.entrymeta import ENTRIES_FILE, EntryMeta
from shitu.errors import Conflict, DamagedIndex, NotFound, ShiTuError, TooLarge
from shitu.fsutil import discard_dir, planned_swap, recover_dir, replace_dir
from shitu.index import (
    ALT_ID_MAP_FILE,
    EXPORTED_FILES,
    ID_MAP_FILE,
    META_FILE,
    VECTOR_FILE,
    VERSION_FILE,
    GalleryIndex,
)

try:  # POSIX; elsewhere only threads in one process are serialised
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[\w][\w.\-]*$")
MAX_NAME_CHARS = 64
MAX_NAME_BYTES = 180  # file names are limited to 255 bytes; leave room for ".<name>.old-xxxxxxxx"
MAX_IMPORT_BYTES = 4 << 30
HISTORY_DIR = ".history"  # <root>/.history/<name>/<number>/: earlier copies of each index
COMPACT_DIR = ".compact"  # <root>/.compact/<name>.<random>/: a compaction's new copy while it is written
KEEP_VERSIONS = 10  # earlier versions kept per index (Settings.history_versions)
CHANGES_SHOWN = 100  # entries listed per kind (added, removed, relabelled) by IndexStore.changes
Version = tuple[int, int, int]
COMPACT_MIN_CHANGES = 1000
COMPACT_MAX_CHANGES = 20000
COMPACT_SHARE = 0.02
COMPACT_MAX_LOG_BYTES = 256 << 20
_NUMBER_RE = re.compile(r"[1-9][0-9]{0,8}")


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


def _version(path: Path) -> Version | None:
    """The identity of the last full save (every one writes a new vector file); the change
    log's length says how much was committed since."""
    try:
        st = os.stat(path / VECTOR_FILE)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def compaction_due(index: GalleryIndex) -> bool:
    """Fold the logged changes into a new full save once they reach 2% of the index (at least
    :data:`COMPACT_MIN_CHANGES`, at most :data:`COMPACT_MAX_CHANGES`): searching the added
    vectors exactly and skipping removed ones stays cheap below that."""
    due = min(COMPACT_MAX_CHANGES, max(COMPACT_MIN_CHANGES, int(COMPACT_SHARE * len(index))))
    return index.pending_changes >= due or index.log_end >= COMPACT_MAX_LOG_BYTES


class IndexStore:
    """Named indices under ``root``. ``strict_names=False`` is for a user's own directory
    (PaddleX layout) whose name we did not choose; its lock files then go to ``lock_dir``.

    ``keep_versions``: earlier versions kept per index (0: none; every change still gets a
    number). A user's own directory (``strict_names=False``) keeps no history and gets no
    version file: nothing is ever written into the user's folder beside the index itself, and
    keeping its versions under the data dir instead would mean copying whole indices across
    file systems on every change instead of one rename. Its :meth:`versions` is the current one.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        strict_names: bool = True,
        lock_dir: str | Path | None = None,
        keep_versions: int = KEEP_VERSIONS,
        compact_in_background: bool = True,
        log_changes: bool = True,
    ):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.strict_names = strict_names
        self.versioned = strict_names  # version files and history: only for indices we name
        self.keep_versions = max(0, int(keep_versions)) if strict_names else 0
        self._lock_dir = Path(lock_dir) if lock_dir else self.root / ".locks"
        self._cache: dict[str, tuple[Version | None, GalleryIndex]] = {}
        self._locks: dict[str, threading.RLock] = {}
        self._guard = threading.Lock()
        self._held = threading.local()  # names this thread holds the file lock of (re-entrant)
        self.compact_in_background = compact_in_background
        self.log_changes = log_changes  # False: every change is a full save (as before the change log)
        self._compacting: set[str] = set()
        self._threads: list[threading.Thread] = []

    # --- names and locks --------------------------------------------------------------------
    def check(self, name: str | None) -> str:
        if self.strict_names:
            return check_name(name)
        if not name or "/" in name or "\\" in name or name in (".", ".."):
            raise ShiTuError(f"invalid index directory name {name!r}")
        return name

    def path(self, name: str) -> Path:
        return self.root / self.check(name)

    def _thread_lock(self, name: str) -> threading.RLock:
        with self._guard:
            return self._locks.setdefault(name, threading.RLock())

    @contextlib.contextmanager
    def locked(self, name: str) -> Iterator[None]:
        """Exclusive access to one index, across threads and processes."""
        held: set[str] = self._held.__dict__.setdefault("names", set())
        with self._thread_lock(name):
            if fcntl is None or name in held:
                yield
                return
            self._lock_dir.mkdir(parents=True, exist_ok=True)
            key = name if self.strict_names else hashlib.sha1(str(self.path(name).resolve()).encode()).hexdigest()
            with open(self._lock_dir / f"{key}.lock", "a+b") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX)
                held.add(name)
                try:
                    recover_dir(self.path(name))  # safe: no other writer is mid-save
                    yield
                finally:
                    held.discard(name)
                    fcntl.flock(fh, fcntl.LOCK_UN)

    # --- reading ------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Indices that exist (complete and not quarantined), sorted."""
        out = set()
        for p in self.root.iterdir():
            if p.name.startswith(".") and p.name.endswith(".swap") and len(p.name) > 6:
                # a save cut short between its two renames: the index exists once the swap is finished
                with contextlib.suppress(ShiTuError):
                    if self.exists(p.name[1:-5]):
                        out.add(p.name[1:-5])
            elif not p.name.startswith(".") and p.is_dir():
                if (p / VECTOR_FILE).exists() or (self.root / f".{p.name}.swap").exists():
                    out.add(p.name)
        return sorted(out)

    def exists(self, name: str) -> bool:
        path = self.path(name)
        if (path / VECTOR_FILE).exists():
            return True
        if (self.root / f".{path.name}.swap").exists():  # a save was interrupted: finish it
            with self.locked(name):
                pass
        return (path / VECTOR_FILE).exists()

    def get(self, name: str) -> GalleryIndex:
        """The latest committed version (reloaded, or brought up to date from the change log,
        if another process committed since)."""
        name = self.check(name)
        cached = self._cache.get(name)
        if cached is not None and cached[0] is not None and cached[0] == _version(self.path(name)):
            if cached[1].log_end == changelog.size(self.path(name) / LOG_FILE):
                return cached[1]
        # under the file lock: another process may be mid-save, and a directory read during its
        # swap (or half from one version, half from the next) is not a damaged index
        with self.locked(name):
            return self._load(name)

    def _load(self, name: str) -> GalleryIndex:
        path = self.path(name)
        version = _version(path)
        cached = self._cache.get(name)
        if cached is not None and cached[0] == version and version is not None:
            log_size = changelog.size(path / LOG_FILE)
            if cached[1].log_end == log_size:
                return cached[1]
            if cached[1].log_end < log_size:  # changes committed by another process: apply only those
                try:
                    index = cached[1].replay_log(path / LOG_FILE, cached[1].log_end)
                except Exception as exc:  # noqa: BLE001 - a record that cannot be applied
                    raise self._quarantine(name, exc) from None
                self._cache[name] = (version, index)
                return index
        if not self.exists(name):
            self._cache.pop(name, None)
            raise NotFound(f"no index named {name!r}")
        version = _version(path)
        try:
            index = GalleryIndex.load(path)
        except NotFound:
            raise
        except Exception as exc:  # noqa: BLE001 - any unreadable file means the same to the user
            raise self._quarantine(name, exc) from None
        self._cache[name] = (version, index)
        return index

    def _quarantine(self, name: str, exc: Exception) -> DamagedIndex:
        """Move a damaged index aside (kept for inspection) and say so once."""
        reason = exc.message if isinstance(exc, ShiTuError) else type(exc).__name__
        reason = reason.replace(str(self.root), "<data>")
        self._cache.pop(name, None)
        if not self.strict_names:  # the user's own directory: never move it
            return DamagedIndex(f"index {name!r} cannot be read: {reason}")
        target = self.root / ".quarantine" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        target.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            self.path(name).rename(target)
        log.error("index %r is damaged (%s); moved to %s", name, reason, target)
        return DamagedIndex(f"index {name!r} is damaged ({reason}); it was set aside, rebuild or import it again")

    # --- writing ------------------------------------------------------------------------------
    def put(self, name: str, index: GalleryIndex, *, overwrite: bool = True, action: str = "build") -> GalleryIndex:
        """Store ``index`` under ``name`` as a new version (``action`` says what made it)."""
        name = self.check(name)
        with self.locked(name):
            if not overwrite and self.exists(name):
                raise Conflict(f"an index named {name!r} already exists")
            self._commit(name, index, action)
        return index

    def mutate(
        self, name: str, change: Callable[[GalleryIndex], GalleryIndex], *, action: str | None = None
    ) -> GalleryIndex:
        """Apply ``change`` to the latest committed version under the index's lock; commit, then
        swap in. If ``change`` raises, nothing on disk or in memory changes. The new version's
        ``action`` is, unless given, what changed: ``add 3``, ``remove 2, relabel 1``, ...

        A change made by :meth:`GalleryIndex.add` / ``remove`` / ``relabel`` /
        ``with_threshold`` is appended to the index's change log (O(change)); any other is
        saved in full."""
        name = self.check(name)
        with self.locked(name):
            old = self._load(name)
            new = change(old)
            if new is old:
                return old
            chain = new.changes_since(old) if self.versioned and self.log_changes else None
            if chain:
                self._append(name, old, new, chain, action or changes.describe(chain))
            else:
                self._commit(name, new, action or describe_change(old, new))
            return new

    def _append(self, name: str, old: GalleryIndex, new: GalleryIndex, chain: list, action: str) -> None:
        """Commit ``new`` (``old`` plus ``chain``) as one record of the change log."""
        path = self.path(name)
        log_path = path / LOG_FILE
        number = self._current_number(name, old) + 1
        if new._meta.pending:  # rows first: an entry's row without its record is harmless, the reverse is not
            new._meta.flush(path / ENTRIES_FILE)
        if changelog.size(log_path) != old.log_end:
            changelog.truncate_torn_tail(log_path)  # what a killed writer left
        header = {**_version_record(new, number, action), "format": 1}
        end = changelog.append(log_path, [new.log_record(chain, old, header)])
        new._meta = EntryMeta(path / ENTRIES_FILE)
        new.forget_lineage()
        new.log_end, new.log_version = end, number
        self._cache[name] = (_version(path), new)
        self._prune(name)  # also what a process killed mid-prune left (a few directory listings)
        if self.compact_in_background and compaction_due(new):
            self._compact_later(name)

    def _current_number(self, name: str, index: GalleryIndex) -> int:
        if index.log_version:
            return index.log_version
        record = _read_record(self.path(name)) if self.versioned else None
        if record:
            return record["version"]
        return max(self._kept(name), default=0) + 1 if self.versioned else 1

    # --- compaction ---------------------------------------------------------------------------
    def compact(self, name: str) -> bool:
        """Fold the change log of ``name`` into a new full save (PaddleX's layout again). The
        slow part — writing every vector — runs without the lock, so commits go on meanwhile;
        those are carried over into the new copy's log before the swap. The replaced copy is
        kept as the earlier versions it holds. ``False`` if there was nothing to fold."""
        name = self.check(name)
        with self.locked(name):
            snapshot = self._load(name)
            if not snapshot.log_end or not self.versioned:
                return False
            for stale in _listing(self.root / COMPACT_DIR):  # what a killed compaction left (older than a day)
                if stale.name.startswith(f"{name}.") and time.time() - stale.stat().st_mtime > 86400:
                    shutil.rmtree(stale, ignore_errors=True)
            number = self._current_number(name, snapshot)
            record = next((r for r in self._dir_versions(self.path(name)) if r.get("version") == number), None)
            base_version = _version(self.path(name))
        # not recover_dir's ".<name>.tmp-*": a writer taking the lock meanwhile would clean it away
        stage = self.root / COMPACT_DIR / f"{name}.{uuid.uuid4().hex[:8]}"
        stage.mkdir(parents=True)
        try:
            folded = snapshot.compacted()
            folded.write_files(stage)
            record = {**(record or _version_record(folded, number, None)), "version": number, "compacted": True}
            with self.locked(name):
                latest = self._load(name)
                path = self.path(name)
                if _version(path) != base_version or latest.log_end < snapshot.log_end:
                    return False  # saved in full meanwhile: nothing left to fold
                if latest.log_end > snapshot.log_end:  # commits made while writing: carry them over
                    with open(path / LOG_FILE, "rb") as src, open(stage / LOG_FILE, "wb") as dst:
                        src.seek(snapshot.log_end)
                        shutil.copyfileobj(src, dst, 1 << 20)
                        dst.flush()
                        os.fsync(dst.fileno())
                current = self._current_number(name, latest)
                keep = self._history_root(name) / str(current) if self.keep_versions else None
                self._tidy_history(name)
                replace_dir(stage, path, keep_old=keep, add_files={VERSION_FILE: _json_bytes(record)})
                folded._meta = EntryMeta(path / ENTRIES_FILE)
                folded.log_end, folded.log_version = 0, None
                fresh = folded.replay_log(path / LOG_FILE) if latest.log_end > snapshot.log_end else folded
                self._cache[name] = (_version(path), fresh)
                self._prune(name)
            return True
        finally:
            if stage.exists():
                shutil.rmtree(stage, ignore_errors=True)

    def _compact_later(self, name: str) -> None:
        with self._guard:
            if name in self._compacting:
                return
            self._compacting.add(name)

        def run() -> None:
            try:
                self.compact(name)
            except Exception:  # noqa: BLE001 - the log stays and is folded next time
                log.exception("compacting index %r failed; its change log is kept", name)
            finally:
                with self._guard:
                    self._compacting.discard(name)

        thread = threading.Thread(target=run, name=f"compact-{name}", daemon=True)
        self._threads.append(thread)
        thread.start()

    def wait_for_compactions(self, timeout: float | None = None) -> None:
        """Wait until background compactions started so far have finished (tests, shutdown)."""
        for thread in list(self._threads):
            thread.join(timeout)
        self._threads = [t for t in self._threads if t.is_alive()]

    def delete(self, name: str) -> None:
        """Delete an index and its history (the history first: a crash in between leaves the
        index without its history, never a history without its index)."""
        name = self.check(name)
        with self.locked(name):
            if not self.exists(name):
                raise NotFound(f"no index named {name!r}")
            if self.versioned:
                discard_dir(self._history_root(name))
                self._tidy_history(name)
            trash = self.root / f".{name}.old-deleted"
            shutil.rmtree(trash, ignore_errors=True)
            self.path(name).rename(trash)
            self._cache.pop(name, None)
            shutil.rmtree(trash, ignore_errors=True)

    def rename(self, old: str, new: str) -> None:
        old, new = self.check(old), self.check(new)
        if old == new:
            return
        first, second = sorted([old, new])  # fixed order: no deadlock between two renames
        with self.locked(first), self.locked(second):
            if not self.exists(old):
                raise NotFound(f"no index named {old!r}")
            if self.exists(new):
                raise Conflict(f"an index named {new!r} already exists")
            self.path(old).rename(self.path(new))
            if self.versioned:  # the history goes with the index (a stale one under the new name first goes)
                discard_dir(self._history_root(new))
                if self._history_root(old).exists():
                    os.rename(self._history_root(old), self._history_root(new))
                self._tidy_history(old)
                self._tidy_history(new)
            cached = self._cache.pop(old, None)
            if cached is not None:
                self._cache[new] = cached

    # --- versions -----------------------------------------------------------------------------
    def _history_root(self, name: str) -> Path:
        return self.root / HISTORY_DIR / name

    def _kept(self, name: str) -> dict[int, Path]:
        """Every earlier version on disk: number → directory (leftovers and trash excluded)."""
        try:
            found = list(self._history_root(name).iterdir())
        except OSError:
            return {}
        return {int(p.name): p for p in found if _NUMBER_RE.fullmatch(p.name) and p.is_dir()}

    def _history(self, name: str) -> tuple[int, dict[int, Path]]:
        """(the current version's number, the earlier copies kept: number of the last version
        each holds → dir, newest first)."""
        if not self.versioned:
            return 1, {}
        kept = self._kept(name)
        path = self.path(name)
        cached = self._cache.get(name)
        index = cached[1] if cached is not None and cached[0] == _version(path) else None
        if index is not None and index.log_end == changelog.size(path / LOG_FILE):
            current = self._current_number(name, index)
        else:
            versions = self._dir_versions(path)
            current = versions[-1]["version"] if versions else max(kept, default=0) + 1
        lowest = current - self.keep_versions
        older = sorted((n for n in kept if lowest <= n <= current), reverse=True)
        return current, {n: kept[n] for n in older}

    def _dir_versions(self, index_dir: Path) -> list[dict[str, Any]]:
        """The versions one copy holds, oldest first: its full save's, then one per logged change."""
        out = []
        record = _read_record(index_dir)
        if record is not None:
            out.append(record)
        for entry in changelog.read(index_dir / LOG_FILE, arrays=False):
            if isinstance(entry.header.get("version"), int):
                out.append(entry.header)
        if record is None and out and out[0]["version"] > 1:  # a full save without a version file, then logged changes
            out.insert(0, _describe_dir(index_dir, out[0]["version"] - 1))
        return out

    def _catalog(self, name: str) -> tuple[int, dict[int, tuple[Path, dict[str, Any]]]]:
        """(current number, every version kept: number → (the copy holding it, its record)),
        the current version included; a version in several copies is read from the newest."""
        current, older = self._history(name)
        found: dict[int, tuple[Path, dict[str, Any]]] = {}
        lowest = current - self.keep_versions if self.versioned else current
        for number, index_dir in [(current, self.path(name)), *older.items()]:
            records = self._dir_versions(index_dir) if self.versioned else []
            if not records and index_dir != self.path(name):
                records = [_describe_dir(index_dir, number)]
            for record in records:
                v = record["version"]
                if lowest <= v <= current and v not in found:
                    found[v] = (index_dir, record)
        if current not in found:  # a directory without a version file (PaddleX's layout, or saved by other code)
            found[current] = (self.path(name), {**_version_record(self._load(name), current, None),
                                                 "time": _mtime(self.path(name))})  # fmt: skip
        return current, dict(sorted(found.items(), reverse=True))

    def _tidy_history(self, name: str) -> None:
        """Remove what an interrupted history move, prune or delete of ``name`` left (under its lock)."""
        root = self._history_root(name)
        trash = re.compile(rf"\.{re.escape(name)}\.trash-\w+")
        candidates = [p for p in _listing(root) if p.name.startswith(".")]
        candidates += [p for p in _listing(root.parent) if trash.fullmatch(p.name)]
        for p in candidates:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    p.unlink(missing_ok=True)

    def _prune(self, name: str) -> None:
        """Delete the earlier copies that hold no version within the last ``keep_versions``
        (and any newer than the current). Runs after a commit, so it never raises: what it
        cannot delete now, it deletes after the next change."""
        _, wanted = self._history(name)
        for number, path in self._kept(name).items():
            if number not in wanted:
                try:
                    discard_dir(path)
                except OSError as exc:
                    log.warning("could not delete version %s of index %r: %s", number, name, exc)
        self._tidy_history(name)
        with contextlib.suppress(OSError):
            self._history_root(name).rmdir()  # only when empty

    def _commit(self, name: str, index: GalleryIndex, action: str, **extra: Any) -> dict[str, Any]:
        """Save ``index`` in full as the next version of ``name`` (under its lock); the replaced
        copy is kept for the earlier versions it holds. Returns the new version's record."""
        path = self.path(name)
        if not self.versioned:
            index.save(path)
            record = _version_record(index, 1, action)
        else:
            self._tidy_history(name)
            if (path / VECTOR_FILE).exists():
                current, _ = self._history(name)
                keep = self._history_root(name) / str(current) if self.keep_versions else None
            else:  # a new index: whatever history is left under this name is not its own
                discard_dir(self._history_root(name))
                current, keep = 0, None
            record = {**_version_record(index, current + 1, action), **extra}
            with planned_swap(path, keep_old=keep, add_files={VERSION_FILE: _json_bytes(record)}):
                index.save(path)
            self._prune(name)
        index.forget_lineage()
        index.log_end, index.log_version = 0, None
        self._cache[name] = (_version(path), index)
        return record

    def versions(self, name: str) -> list[dict[str, Any]]:
        """The current version and the earlier ones kept, newest first: ``version``,
        ``current``, ``time`` (UTC, ISO 8601), ``action``, ``entries``, ``labels``,
        ``feature_model``, ``index_type``, ``metric_type``."""
        name = self.check(name)
        with self.locked(name):
            if not self.exists(name):
                raise NotFound(f"no index named {name!r}")
            current, catalog = self._catalog(name)
            return [{"version": v, "current": v == current, **_public(rec)} for v, (_, rec) in catalog.items()]

    def changes(
        self, name: str, version: int, against: int | None = None, *, limit: int = CHANGES_SHOWN
    ) -> dict[str, Any]:
        """What changed from version ``against`` (default: the one just before) to ``version``,
        from their id maps (no vector is read): ids ``added`` and ``removed`` with their
        labels, ids ``relabelled`` (``from`` → ``to``); each kind's ``..._count`` and its first
        ``limit`` entries in id order. ``against=0`` compares with an empty index. Either
        version may be the newer one: ``changes(name, 3, against=current)`` is what restoring
        version 3 would change."""
        name = self.check(name)
        version = _number(version, "version")
        against = version - 1 if against is None else _number(against, "against", zero=True)
        with self.locked(name):
            if not self.exists(name):
                raise NotFound(f"no index named {name!r}")
            current, catalog = self._catalog(name)
            self._require(name, version, catalog, current)
            if against:
                self._require(name, against, catalog, current)
            # read under the lock: a later prune or save cannot take the files from under the read
            after = _id_map_at(catalog[version][0], version)
            before = _id_map_at(catalog[against][0], against) if against else {}
            record = catalog[version][1] if self.versioned else {}
        return {
            "index": name,
            "version": version,
            "against": against,
            "action": record.get("action"),
            "time": record.get("time"),
            **diff_id_maps(before, after, limit=max(0, int(limit))),
        }

    def _require(self, name: str, number: int, catalog: dict, current: int) -> None:
        if number in catalog:
            return
        if not self.versioned:
            raise NotFound(f"{name!r} is a directory of your own: only indices in the data dir keep earlier versions")
        kept = sorted(catalog)
        if number > current:
            raise NotFound(f"index {name!r} has no version {number}: the current one is {current}")
        shown = f"versions {kept[0]}–{kept[-1]}" if len(kept) > 1 else f"version {kept[0]}"
        raise NotFound(
            f"version {number} of index {name!r} is no longer kept: it keeps {shown} "
            f"(at most {self.keep_versions} earlier ones)"
        )

    def restore(self, name: str, version: int) -> tuple[GalleryIndex, dict[str, Any]]:
        """Make an earlier version current again, as a new version (``restore vN``): the
        restored copy is checked before anything is replaced, the current one becomes an
        earlier version (so the restore can be undone), and readers in every process see it at
        once. Ids handed out since stay retired (its ``next_id`` never goes back).
        Returns ``(index, its version record)``."""
        name = self.check(name)
        version = _number(version, "version")
        with self.locked(name):
            latest = self._load(name)  # NotFound / DamagedIndex as for any change
            current, catalog = self._catalog(name)
            if version == current:
                raise ShiTuError(f"version {version} is already the current version of index {name!r}")
            self._require(name, version, catalog, current)
            try:
                index = GalleryIndex.load(catalog[version][0], until_version=version)
            except ShiTuError as exc:
                reason = exc.message.replace(str(self.root), "<data>")
                raise DamagedIndex(f"version {version} of index {name!r} cannot be read: {reason}") from None
            except Exception as exc:  # noqa: BLE001 - a damaged file, whatever the library says
                reason = type(exc).__name__
                raise DamagedIndex(f"version {version} of index {name!r} cannot be read ({reason})") from None
            index.retire_ids_below(latest.next_id)
            record = self._commit(name, index, f"restore v{version}", restored_from=version)
        return index, record

    # --- moving indices in and out -----------------------------------------------------------
    def export_zip(self, name: str) -> bytes:
        """The index in PaddleX's layout (plus our metadata), every change folded in, as a .zip."""
        name = self.check(name)
        with self.locked(name):
            index = self._load(name)
        return zipped(index, name, self.root)

    def import_zip(self, name: str, data: bytes, *, overwrite: bool = False) -> GalleryIndex:
        """Import an index .zip (ours, or a zipped PaddleX ``IndexData.save`` dir)."""
        name = self.check(name)
        try:
            archive = zipfile.ZipFile(io.BytesIO(data))
        except (zipfile.BadZipFile, ValueError) as exc:
            raise ShiTuError("not a readable .zip file") from exc
        with archive, tempfile.TemporaryDirectory(dir=self.root) as tmp:
            members = {Path(m.filename).name: m for m in archive.infolist() if not m.is_dir()}
            if VECTOR_FILE not in members:
                raise ShiTuError(f"the .zip has no {VECTOR_FILE}: not an index export")
            if ID_MAP_FILE not in members and ALT_ID_MAP_FILE not in members:
                raise ShiTuError(f"the .zip has no {ID_MAP_FILE}: not an index export")
            budget = MAX_IMPORT_BYTES
            for fname in (*EXPORTED_FILES, LOG_FILE, ALT_ID_MAP_FILE):
                if fname in members:
                    budget -= _extract_capped(archive, members[fname], Path(tmp) / fname, budget)
            try:
                index = GalleryIndex.load(tmp)  # validates before anything is replaced
            except NotFound as exc:
                raise ShiTuError(f"the .zip does not hold a usable index: {exc.message}") from None
            except ShiTuError as exc:
                raise ShiTuError(exc.message.replace(tmp, "the .zip")) from None
            except Exception as exc:  # noqa: BLE001 - a damaged member, whatever the library says
                raise ShiTuError(f"the .zip does not hold a usable index ({type(exc).__name__})") from None
            return self.put(name, index, overwrite=overwrite, action="import")


def zipped(index: GalleryIndex, name: str, scratch: Path | None = None) -> bytes:
    """``index`` as a .zip of ``name/<file>`` in PaddleX's layout (plus our metadata), every change
    folded in; written through a temporary directory under ``scratch``."""
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        index.write_files(Path(tmp))
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for fname in EXPORTED_FILES:
                if (Path(tmp) / fname).exists():
                    zf.write(Path(tmp) / fname, f"{name}/{fname}")
        return buf.getvalue()


def describe_change(before: GalleryIndex, after: GalleryIndex) -> str:
    """A version's action from two indices: ``add 3``, ``remove 2, relabel 1``, ``no change``."""
    old, new = before.ids, after.ids
    common = np.intersect1d(old, new)
    relabelled = sum(a != b for a, b in zip(before.labels_of(common), after.labels_of(common), strict=True))
    counts = (("add", len(np.setdiff1d(new, old))), ("remove", len(np.setdiff1d(old, new))), ("relabel", relabelled))
    return ", ".join(f"{word} {n}" for word, n in counts if n) or "no change"


def _id_map_at(index_dir: Path, version: int) -> dict[int, str]:
    """The id map of the version ``version`` that ``index_dir`` holds (its full save's id map,
    then the logged changes up to that version; no vector is read into an index)."""
    with _open_id_map(index_dir) as fh:
        id_map = _read_id_map(fh, version)
    for entry in changelog.read(index_dir / LOG_FILE):
        if int(entry.header.get("version", 0)) > version:
            break
        for item in entry.header.get("changes", []):
            changes.decode(item, entry.arrays).forward(id_map)
    return id_map


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


def _number(value: Any, what: str, *, zero: bool = False) -> int:
    """A version number: ``4``, ``"4"`` or ``"v4"`` (``0`` = an empty index, where allowed)."""
    text = str(value).strip().lower().removeprefix("v") if not isinstance(value, bool) else ""
    if text.isascii() and text.isdigit() and (int(text) >= 1 or (zero and int(text) == 0)):
        return int(text)
    raise ShiTuError(f"{what} must be a version number such as 3 or v3, not {str(value)[:40]!r}")


def _version_record(index: GalleryIndex, number: int, action: str | None) -> dict[str, Any]:
    return {
        "format": 1,
        "version": number,
        "time": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "action": action,
        "entries": len(index),
        "labels": index.label_count,
        "feature_model": index.feature_model,
        "index_type": index.index_type,
        "metric_type": index.metric_type,
    }


_PUBLIC_KEYS = ("time", "action", "entries", "labels", "feature_model", "index_type", "metric_type")


def _public(record: dict[str, Any]) -> dict[str, Any]:
    return {k: record.get(k) for k in _PUBLIC_KEYS}


def _json_bytes(data: Any) -> bytes:
    return json.dumps(data, ensure_ascii=False, indent=1).encode("utf-8")


def _read_record(index_dir: Path) -> dict[str, Any] | None:
    """The version file of an index dir, or ``None`` if it has none (or an unusable one)."""
    try:
        record = json.loads((index_dir / VERSION_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    number = record.get("version") if isinstance(record, dict) else None
    if not isinstance(number, int) or isinstance(number, bool) or number < 1:
        return None
    return record


def _mtime(index_dir: Path) -> str | None:
    try:
        stamp = os.stat(index_dir / VECTOR_FILE).st_mtime
    except OSError:
        return None
    return datetime.fromtimestamp(stamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _describe_dir(index_dir: Path, number: int) -> dict[str, Any]:
    """A record for an earlier version saved without one (read from its id map and metadata)."""
    record: dict[str, Any] = {"version": number, "time": _mtime(index_dir), "action": None}
    with contextlib.suppress(ShiTuError, OSError):
        with _open_id_map(index_dir) as fh:
            info = _load_yaml(fh, number)
        id_map = info.get("id_map") or {}
        record.update(entries=len(id_map), labels=len(set(map(str, id_map.values()))),
                      index_type=info.get("index_type"), metric_type=info.get("metric_type"))  # fmt: skip
    with contextlib.suppress(OSError, ValueError, AttributeError):
        record["feature_model"] = json.loads((index_dir / META_FILE).read_text(encoding="utf-8")).get("feature_model")
    return record


def _open_id_map(index_dir: Path) -> IO[bytes]:
    for fname in (ID_MAP_FILE, ALT_ID_MAP_FILE):
        with contextlib.suppress(FileNotFoundError):
            return open(index_dir / fname, "rb")
    raise DamagedIndex(f"{index_dir.name} has no {ID_MAP_FILE}")


def _load_yaml(fh: IO[bytes], number: int) -> dict[str, Any]:
    try:
        info = yaml.load(fh, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # noqa: S506 - a safe loader
    except yaml.YAMLError:
        raise DamagedIndex(f"the id map of version {number} cannot be read") from None
    if not isinstance(info, dict):
        raise DamagedIndex(f"the id map of version {number} cannot be read")
    return info


def _read_id_map(fh: IO[bytes], number: int) -> dict[int, str]:
    id_map = _load_yaml(fh, number).get("id_map") or {}
    try:
        return {int(k): str(v) for k, v in id_map.items()}
    except (AttributeError, TypeError, ValueError):
        raise DamagedIndex(f"the id map of version {number} cannot be read") from None


def _listing(path: Path) -> list[Path]:
    try:
        return list(path.iterdir())
    except OSError:
        return []


def _extract_capped(archive: zipfile.ZipFile, member: zipfile.ZipInfo, target: Path, budget: int) -> int:
    """Stream one member to ``target`` (never more than ``budget`` bytes); returns its size."""
    written = 0
    try:
        with archive.open(member) as src, open(target, "wb") as dst:
            while chunk := src.read(1 << 20):
                written += len(chunk)
                if written > budget:
                    raise TooLarge(f"{member.filename} in the .zip is larger than {MAX_IMPORT_BYTES >> 30} GiB")
                dst.write(chunk)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, NotImplementedError, RuntimeError, OSError) as exc:
        reason = "encrypted" if "encrypt" in str(exc).lower() or "password" in str(exc).lower() else str(exc)
        raise ShiTuError(f"the .zip is damaged or unsupported ({member.filename}: {reason})") from None
    return written
