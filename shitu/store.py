"""Named gallery indices in the data dir: loaded once, mutated one at a time, saved atomically.

Readers get the current :class:`GalleryIndex` object; a mutation builds a new object under
that index's lock, saves it, and only then swaps it in. So a query always sees one complete
version, and two writers to the same index never lose each other's changes.
"""

from __future__ import annotations

import io
import re
import shutil
import tempfile
import threading
import zipfile
from collections.abc import Callable
from pathlib import Path

from shitu.errors import NotFound, ShiTuError
from shitu.index import OUR_FILES, VECTOR_FILE, GalleryIndex, recover_dir

NAME_RE = re.compile(r"^[\w][\w.\-]{0,63}$")


def check_name(name: str) -> str:
    name = (name or "").strip()
    if not NAME_RE.match(name) or name.endswith("."):
        raise ShiTuError(
            f"invalid index name {name!r}: use 1–64 letters, digits, '_', '-' or '.', starting with a letter or digit"
        )
    return name


class IndexStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._cache: dict[str, GalleryIndex] = {}
        self._locks: dict[str, threading.RLock] = {}
        self._guard = threading.Lock()

    def lock(self, name: str) -> threading.RLock:
        with self._guard:
            return self._locks.setdefault(name, threading.RLock())

    def path(self, name: str) -> Path:
        return self.root / check_name(name)

    def names(self) -> list[str]:
        for old in self.root.glob(".*.old-*"):
            recover_dir(self.root / old.name[1:].rsplit(".old-", 1)[0])
        return sorted(p.name for p in self.root.iterdir() if not p.name.startswith(".") and (p / VECTOR_FILE).exists())

    def exists(self, name: str) -> bool:
        path = self.path(name)
        recover_dir(path)
        return (path / VECTOR_FILE).exists()

    def get(self, name: str) -> GalleryIndex:
        name = check_name(name)
        cached = self._cache.get(name)
        if cached is not None:
            return cached
        with self.lock(name):
            if name not in self._cache:
                if not self.exists(name):
                    raise NotFound(f"no index named {name!r}")
                self._cache[name] = GalleryIndex.load(self.path(name))
            return self._cache[name]

    def put(self, name: str, index: GalleryIndex, *, overwrite: bool = True) -> GalleryIndex:
        name = check_name(name)
        with self.lock(name):
            if not overwrite and self.exists(name):
                raise ShiTuError(f"an index named {name!r} already exists", status=409)
            index.save(self.path(name))
            self._cache[name] = index
        return index

    def mutate(self, name: str, change: Callable[[GalleryIndex], GalleryIndex]) -> GalleryIndex:
        """Apply ``change`` to the latest version under the index's lock; save, then swap in.
        If ``change`` raises, nothing on disk or in memory changes."""
        name = check_name(name)
        with self.lock(name):
            new = change(self.get(name))
            new.save(self.path(name))
            self._cache[name] = new
            return new

    def delete(self, name: str) -> None:
        name = check_name(name)
        with self.lock(name):
            if not self.exists(name):
                raise NotFound(f"no index named {name!r}")
            trash = self.root / f".{name}.deleted"
            shutil.rmtree(trash, ignore_errors=True)
            self.path(name).rename(trash)
            self._cache.pop(name, None)
            shutil.rmtree(trash, ignore_errors=True)

    def rename(self, old: str, new: str) -> None:
        old, new = check_name(old), check_name(new)
        if old == new:
            return
        first, second = sorted([old, new])  # fixed order: no deadlock between two renames
        with self.lock(first), self.lock(second):
            if not self.exists(old):
                raise NotFound(f"no index named {old!r}")
            if self.exists(new):
                raise ShiTuError(f"an index named {new!r} already exists", status=409)
            self.path(old).rename(self.path(new))
            index = self._cache.pop(old, None)
            if index is not None:
                self._cache[new] = index

    def export_zip(self, name: str) -> bytes:
        """The index in PaddleX's layout (plus our metadata) as a .zip."""
        name = check_name(name)
        with self.lock(name):
            self.get(name)
            buf = io.BytesIO()
            with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
                for fname in OUR_FILES:
                    f = self.path(name) / fname
                    if f.exists():
                        zf.write(f, f"{name}/{fname}")
            return buf.getvalue()

    def import_zip(self, name: str, data: bytes, *, overwrite: bool = False) -> GalleryIndex:
        """Import an index .zip (ours, or a zipped PaddleX ``IndexData.save`` dir)."""
        name = check_name(name)
        try:
            archive = zipfile.ZipFile(io.BytesIO(data))
        except zipfile.BadZipFile as exc:
            raise ShiTuError("not a readable .zip file") from exc
        with archive, tempfile.TemporaryDirectory() as tmp:
            members = {Path(m.filename).name: m for m in archive.infolist() if not m.is_dir()}
            if VECTOR_FILE not in members:
                raise ShiTuError(f"the .zip has no {VECTOR_FILE}: not an index export")
            for fname in (*OUR_FILES, "index_info.yaml"):
                if fname in members:
                    if members[fname].file_size > 4 << 30:
                        raise ShiTuError(f"{fname} in the .zip is too large")
                    (Path(tmp) / fname).write_bytes(archive.read(members[fname]))
            index = GalleryIndex.load(tmp)  # validates before anything is replaced
        return self.put(name, index, overwrite=overwrite)
