"""Galleries as directories in PaddleX's layout (:mod:`shitu.stores.layout`), one per name.

Readers get the current :class:`GalleryIndex`; several processes may share the directory (the
server and a CLI run beside it): every change takes the gallery's lock and first catches up with
what another process committed (a full save is identified by its vector file, the commits since
by the change log's length), so no acknowledged write is ever lost or overwritten. Readers
notice a newer version with one ``stat`` and catch up under the same lock, so a save in progress
is never read half-done.

A commit made of typed changes appends one record to ``shitu_changes.log`` (O(change)); any
other is a full save. Once the log holds 2% of the index (at least 1,000 entries changed), a
background compaction writes a new full save while commits go on.

Every commit is a *version*: a full save carries ``shitu_version.json`` (its number, time,
action, counts), each log record its own header. The copy a full save replaces is renamed, not
deleted (O(1), by the journalled swap of :func:`shitu.fsutil.replace_dir`), to
``.history/<name>/<number>/``; at most ``keep_versions`` earlier versions are kept. A directory
without a version file (PaddleX's layout, or saved by other code) counts as one version after
the newest kept one. An index that cannot be read is moved to ``.quarantine/`` once, reported
clearly, and leaves every other index working.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import yaml

from shitu import changelog, changes
from shitu.changelog import LOG_FILE
from shitu.entrymeta import ENTRIES_FILE, EntryMeta
from shitu.errors import Conflict, DamagedIndex, NotFound, ShiTuError
from shitu.fsutil import discard_dir, planned_swap, recover_dir, replace_dir
from shitu.index import GalleryIndex
from shitu.stores.base import KEEP_VERSIONS, Catalog, GalleryStore, check_name, version_record
from shitu.stores.layout import (
    ALT_ID_MAP_FILE,
    ID_MAP_FILE,
    META_FILE,
    VECTOR_FILE,
    VERSION_FILE,
    Loaded,
    load_index,
    log_record,
    read_index_dir,
    replay_log,
    save_index,
    write_files,
)

log = logging.getLogger(__name__)

HISTORY_DIR = ".history"  # <root>/.history/<name>/<number>/: earlier copies of each index
COMPACT_DIR = ".compact"  # <root>/.compact/<name>.<random>/: a compaction's new copy while it is written
COMPACT_MIN_CHANGES = 1000
COMPACT_MAX_CHANGES = 20000
COMPACT_SHARE = 0.02
COMPACT_MAX_LOG_BYTES = 256 << 20
_NUMBER_RE = re.compile(r"[1-9][0-9]{0,8}")
DirVersion = tuple[int, int, int]  # (inode, mtime_ns, size) of vector.index: one full save


def dir_version(path: Path) -> DirVersion | None:
    """The identity of the last full save (every one writes a new vector file); the change
    log's length says how much was committed since."""
    try:
        st = os.stat(path / VECTOR_FILE)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def compaction_due(index: GalleryIndex, log_end: int) -> bool:
    """Fold the logged changes into a new full save once they reach 2% of the index (at least
    :data:`COMPACT_MIN_CHANGES`, at most :data:`COMPACT_MAX_CHANGES`): searching the added
    vectors exactly, skipping removed ones and replaying relabels stays cheap below that."""
    due = min(COMPACT_MAX_CHANGES, max(COMPACT_MIN_CHANGES, int(COMPACT_SHARE * len(index))))
    return index.pending_changes >= due or log_end >= COMPACT_MAX_LOG_BYTES


@dataclass(frozen=True)
class _Held:
    """A gallery as this process last read or wrote it."""

    version: DirVersion | None
    loaded: Loaded

    @property
    def index(self) -> GalleryIndex:
        return self.loaded.index


class FileStore(GalleryStore):
    """Named indices under ``root``. ``strict_names=False`` is for a user's own directory
    (PaddleX layout) whose name we did not choose; its lock files then go to ``lock_dir``.

    ``keep_versions``: earlier versions kept per index (0: none; every change still gets a
    number). A user's own directory (``strict_names=False``) keeps no history and gets no
    version file: nothing is ever written into the user's folder beside the index itself. Its
    :meth:`versions` is the current one.
    """

    kind = "faiss"

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
        super().__init__(lock_dir=lock_dir or self.root / ".locks", keep_versions=keep_versions if strict_names else 0)
        self.strict_names = strict_names
        self.versioned = strict_names  # version files and history: only for indices we name
        self.compact_in_background = compact_in_background
        self.log_changes = log_changes  # False: every change is a full save (as before the change log)
        self._held_versions: dict[str, _Held] = {}
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

    def _lock_key(self, name: str) -> str:
        return name if self.strict_names else self.hashed_key(str(self.path(name).resolve()))

    def _while_locked(self, name: str) -> None:
        recover_dir(self.path(name))  # safe: no other writer is mid-save

    def _scratch(self) -> Path:
        return self.root

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

    def _forget_all(self) -> None:
        self._held_versions.clear()

    def _cached(self, name: str) -> GalleryIndex | None:
        held = self._held_versions.get(name)
        if held is not None and held.version is not None and held.version == dir_version(self.path(name)):
            if held.loaded.log_end == changelog.size(self.path(name) / LOG_FILE):
                return held.index
        return None

    def _load(self, name: str) -> GalleryIndex:
        return self._load_held(name).index

    def _load_held(self, name: str) -> _Held:
        path = self.path(name)
        version = dir_version(path)
        held = self._held_versions.get(name)
        if held is not None and held.version == version and version is not None:
            log_size = changelog.size(path / LOG_FILE)
            if held.loaded.log_end == log_size:
                return held
            if held.loaded.log_end < log_size:  # changes committed by another process: apply only those
                try:
                    loaded = replay_log(held.index, path / LOG_FILE, held.loaded.log_end,
                                        log_version=held.loaded.log_version)  # fmt: skip
                except Exception as exc:  # noqa: BLE001 - a record that cannot be applied
                    raise self._quarantine(name, exc) from None
                return self._hold(name, version, loaded)
        if not self.exists(name):
            self._held_versions.pop(name, None)
            raise NotFound(f"no index named {name!r}")
        version = dir_version(path)
        try:
            loaded = read_index_dir(path)
        except NotFound:
            raise
        except Exception as exc:  # noqa: BLE001 - any unreadable file means the same to the user
            raise self._quarantine(name, exc) from None
        return self._hold(name, version, loaded)

    def _hold(self, name: str, version: DirVersion | None, loaded: Loaded) -> _Held:
        held = _Held(version, loaded)
        self._held_versions[name] = held
        return held

    def _quarantine(self, name: str, exc: Exception) -> DamagedIndex:
        """Move a damaged index aside (kept for inspection) and say so once."""
        reason = exc.message if isinstance(exc, ShiTuError) else type(exc).__name__
        reason = reason.replace(str(self.root), "<data>")
        self._held_versions.pop(name, None)
        if not self.strict_names:  # the user's own directory: never move it
            return DamagedIndex(f"index {name!r} cannot be read: {reason}")
        target = self.root / ".quarantine" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        target.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            self.path(name).rename(target)
        log.error("index %r is damaged (%s); moved to %s", name, reason, target)
        return DamagedIndex(f"index {name!r} is damaged ({reason}); it was set aside, rebuild or import it again")

    # --- writing ------------------------------------------------------------------------------
    def _logs_changes(self, name: str) -> bool:
        return self.versioned and self.log_changes

    def _write_changes(
        self, name: str, old: GalleryIndex, new: GalleryIndex, chain: list[changes.Change], action: str
    ) -> GalleryIndex:
        """Commit ``new`` (``old`` plus ``chain``) as one record of the change log."""
        path = self.path(name)
        log_path = path / LOG_FILE
        held = self._held_versions[name]
        number = self._current_number(name, held) + 1
        if new.rows.pending:  # rows first: an entry's row without its record is harmless, the reverse is not
            new.rows.flush(path / ENTRIES_FILE)
        if changelog.size(log_path) != held.loaded.log_end:
            changelog.truncate_torn_tail(log_path)  # what a killed writer left
        header = {**version_record(new, number, action), "format": 1}
        end = changelog.append(log_path, [log_record(new, chain, old, header)])
        new.rows = EntryMeta(path / ENTRIES_FILE)
        new.forget_lineage()
        self._hold(name, dir_version(path), Loaded(new, end, number))
        self._prune(name)  # also what a process killed mid-prune left (a few directory listings)
        if self.compact_in_background and compaction_due(new, end):
            self._compact_later(name)
        return new

    def _write_full(self, name: str, index: GalleryIndex, action: str, **extra: Any) -> GalleryIndex:
        """Save ``index`` in full as the next version of ``name`` (under its lock); the replaced
        copy is kept for the earlier versions it holds."""
        path = self.path(name)
        if not self.versioned:
            save_index(index, path)
        else:
            self._tidy_history(name)
            if (path / VECTOR_FILE).exists():
                current, _ = self._history(name)
                keep = self._history_root(name) / str(current) if self.keep_versions else None
            else:  # a new index: whatever history is left under this name is not its own
                discard_dir(self._history_root(name))
                current, keep = 0, None
            record = {**version_record(index, current + 1, action), **extra}
            with planned_swap(path, keep_old=keep, add_files={VERSION_FILE: _json_bytes(record)}):
                save_index(index, path)
            self._prune(name)
        index.forget_lineage()
        self._hold(name, dir_version(path), Loaded(index))
        return index

    def _current_number(self, name: str, held: _Held) -> int:
        if held.loaded.log_version:
            return held.loaded.log_version
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
            snapshot = self._load_held(name)
            if not snapshot.loaded.log_end or not self.versioned:
                return False
            for stale in _listing(self.root / COMPACT_DIR):  # what a killed compaction left (older than a day)
                if stale.name.startswith(f"{name}.") and time.time() - stale.stat().st_mtime > 86400:
                    shutil.rmtree(stale, ignore_errors=True)
            number = self._current_number(name, snapshot)
            record = next((r for r in self._dir_versions(self.path(name)) if r.get("version") == number), None)
            base_version = dir_version(self.path(name))
        # not recover_dir's ".<name>.tmp-*": a writer taking the lock meanwhile would clean it away
        stage = self.root / COMPACT_DIR / f"{name}.{uuid.uuid4().hex[:8]}"
        stage.mkdir(parents=True)
        try:
            folded = snapshot.index.compacted()
            write_files(folded, stage)
            record = {**(record or version_record(folded, number, None)), "version": number, "compacted": True}
            with self.locked(name):
                latest = self._load_held(name)
                path = self.path(name)
                if dir_version(path) != base_version or latest.loaded.log_end < snapshot.loaded.log_end:
                    return False  # saved in full meanwhile: nothing left to fold
                carried = latest.loaded.log_end > snapshot.loaded.log_end
                if carried:  # commits made while writing: carry them over
                    with open(path / LOG_FILE, "rb") as src, open(stage / LOG_FILE, "wb") as dst:
                        src.seek(snapshot.loaded.log_end)
                        shutil.copyfileobj(src, dst, 1 << 20)
                        dst.flush()
                        os.fsync(dst.fileno())
                current = self._current_number(name, latest)
                keep = self._history_root(name) / str(current) if self.keep_versions else None
                self._tidy_history(name)
                replace_dir(stage, path, keep_old=keep, add_files={VERSION_FILE: _json_bytes(record)})
                folded.rows = EntryMeta(path / ENTRIES_FILE)
                fresh = replay_log(folded, path / LOG_FILE) if carried else Loaded(folded)
                self._hold(name, dir_version(path), fresh)
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
            self._held_versions.pop(name, None)
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
            held = self._held_versions.pop(old, None)
            if held is not None:
                self._held_versions[new] = held

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
        held = self._held_versions.get(name)
        if held is not None and held.version == dir_version(path) and held.loaded.log_end == changelog.size(
                path / LOG_FILE):  # fmt: skip
            current = self._current_number(name, held)
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

    def _catalog(self, name: str) -> Catalog:
        """Every version kept, the current one included, with the copy holding it (a version in
        several copies is read from the newest)."""
        current, older = self._history(name)
        records: dict[int, dict[str, Any]] = {}
        where: dict[int, Path] = {}
        lowest = current - self.keep_versions if self.versioned else current
        for number, index_dir in [(current, self.path(name)), *older.items()]:
            found = self._dir_versions(index_dir) if self.versioned else []
            if not found and index_dir != self.path(name):
                found = [_describe_dir(index_dir, number)]
            for record in found:
                v = record["version"]
                if lowest <= v <= current and v not in records:
                    records[v], where[v] = record, index_dir
        if current not in records:  # a directory without a version file (PaddleX's layout, or saved by other code)
            records[current] = {**version_record(self._load(name), current, None), "time": _mtime(self.path(name))}
            where[current] = self.path(name)
        return Catalog(current, dict(sorted(records.items(), reverse=True)), where)

    def _id_map_at(self, name: str, catalog: Catalog, number: int) -> dict[int, str]:
        """The id map of version ``number``: its copy's full save, then its logged changes up to it."""
        index_dir = catalog.where[number]
        with _open_id_map(index_dir) as fh:
            id_map = _read_id_map(fh, number)
        for entry in changelog.read(index_dir / LOG_FILE):
            if int(entry.header.get("version", 0)) > number:
                break
            for item in entry.header.get("changes", []):
                changes.decode(item, entry.arrays).forward(id_map)
        return id_map

    def _restore(self, name: str, number: int, latest: GalleryIndex, catalog: Catalog) -> tuple[GalleryIndex, int]:
        """The copy holding version ``number``, checked before anything is replaced, saved in full
        as the next version; the current one becomes an earlier version."""
        try:
            index = load_index(catalog.where[number], until_version=number)
        except ShiTuError as exc:
            reason = exc.message.replace(str(self.root), "<data>")
            raise DamagedIndex(f"version {number} of index {name!r} cannot be read: {reason}") from None
        except Exception as exc:  # noqa: BLE001 - a damaged file, whatever the library says
            raise DamagedIndex(f"version {number} of index {name!r} cannot be read ({type(exc).__name__})") from None
        index.retire_ids_below(latest.next_id)
        self._write_full(name, index, f"restore v{number}", restored_from=number)
        return index, catalog.current + 1

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


def open_store(settings: Any) -> FileStore:
    """The named indices of the data dir (``SHITU_VECTOR_STORE=faiss``, the default)."""
    return FileStore(
        settings.indices_dir, lock_dir=settings.data_dir / "locks", keep_versions=settings.history_versions
    )


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
