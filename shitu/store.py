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
"""

from __future__ import annotations

import contextlib
import hashlib
import io
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
from pathlib import Path

from shitu.errors import Conflict, DamagedIndex, NotFound, ShiTuError, TooLarge
from shitu.fsutil import recover_dir
from shitu.index import ALT_ID_MAP_FILE, ID_MAP_FILE, OUR_FILES, VECTOR_FILE, GalleryIndex

try:  # POSIX; elsewhere only threads in one process are serialised
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[\w][\w.\-]*$")
MAX_NAME_CHARS = 64
MAX_NAME_BYTES = 180  # file names are limited to 255 bytes; leave room for ".<name>.old-xxxxxxxx"
MAX_IMPORT_BYTES = 4 << 30
Version = tuple[int, int, int]


def check_name(name: str | None) -> str:
    """A valid index name (letters, digits, ``_ - .``; at most 64 characters and 180 UTF-8 bytes)."""
    name = (name or "").strip()
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
    """Changes whenever a save commits (every save writes a new vector file)."""
    try:
        st = os.stat(path / VECTOR_FILE)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


class IndexStore:
    """Named indices under ``root``. ``strict_names=False`` is for a user's own directory
    (PaddleX layout) whose name we did not choose; its lock files then go to ``lock_dir``."""

    def __init__(self, root: str | Path, *, strict_names: bool = True, lock_dir: str | Path | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.strict_names = strict_names
        self._lock_dir = Path(lock_dir) if lock_dir else self.root / ".locks"
        self._cache: dict[str, tuple[Version | None, GalleryIndex]] = {}
        self._locks: dict[str, threading.RLock] = {}
        self._guard = threading.Lock()
        self._held = threading.local()  # names this thread holds the file lock of (re-entrant)

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
        """The latest committed version (reloaded if another process changed it)."""
        name = self.check(name)
        cached = self._cache.get(name)
        if cached is not None and cached[0] == _version(self.path(name)) and cached[0] is not None:
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
            return cached[1]
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
    def put(self, name: str, index: GalleryIndex, *, overwrite: bool = True) -> GalleryIndex:
        name = self.check(name)
        with self.locked(name):
            if not overwrite and self.exists(name):
                raise Conflict(f"an index named {name!r} already exists")
            index.save(self.path(name))
            self._cache[name] = (_version(self.path(name)), index)
        return index

    def mutate(self, name: str, change: Callable[[GalleryIndex], GalleryIndex]) -> GalleryIndex:
        """Apply ``change`` to the latest committed version under the index's lock; save, then
        swap in. If ``change`` raises, nothing on disk or in memory changes."""
        name = self.check(name)
        with self.locked(name):
            new = change(self._load(name))
            new.save(self.path(name))
            self._cache[name] = (_version(self.path(name)), new)
            return new

    def delete(self, name: str) -> None:
        name = self.check(name)
        with self.locked(name):
            if not self.exists(name):
                raise NotFound(f"no index named {name!r}")
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
            cached = self._cache.pop(old, None)
            if cached is not None:
                self._cache[new] = cached

    # --- moving indices in and out -----------------------------------------------------------
    def export_zip(self, name: str) -> bytes:
        """The index in PaddleX's layout (plus our metadata) as a .zip."""
        name = self.check(name)
        with self.locked(name):
            self._load(name)
            buf = io.BytesIO()
            with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
                for fname in OUR_FILES:
                    f = self.path(name) / fname
                    if f.exists():
                        zf.write(f, f"{name}/{fname}")
            return buf.getvalue()

    def import_zip(self, name: str, data: bytes, *, overwrite: bool = False) -> GalleryIndex:
        """Import an index .zip (ours, or a zipped PaddleX ``IndexData.save`` dir)."""
        name = self.check(name)
        try:
            archive = zipfile.ZipFile(io.BytesIO(data))
        except (zipfile.BadZipFile, ValueError) as exc:
            raise ShiTuError("not a readable .zip file") from exc
        with archive, tempfile.TemporaryDirectory() as tmp:
            members = {Path(m.filename).name: m for m in archive.infolist() if not m.is_dir()}
            if VECTOR_FILE not in members:
                raise ShiTuError(f"the .zip has no {VECTOR_FILE}: not an index export")
            if ID_MAP_FILE not in members and ALT_ID_MAP_FILE not in members:
                raise ShiTuError(f"the .zip has no {ID_MAP_FILE}: not an index export")
            budget = MAX_IMPORT_BYTES
            for fname in (*OUR_FILES, ALT_ID_MAP_FILE):
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
        return self.put(name, index, overwrite=overwrite)


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
