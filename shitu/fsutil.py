"""File-system helpers used everywhere: checksums and never-half-written files and dirs."""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_bytes_atomic(path: str | Path, data: bytes, mode: int = 0o644) -> Path:
    """Write ``data`` to ``path`` via a temp file in the same dir: readers never see a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, mode)  # mkstemp's 0600 would hide caches from other users
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _journal(target: Path) -> Path:
    return target.parent / f".{target.name}.swap"


# what the next replace_dir() into a given target does besides the swap (see planned_swap)
_PLAN: contextvars.ContextVar[tuple[str, Path | None, Mapping[str, bytes]] | None] = contextvars.ContextVar(
    "shitu_planned_swap", default=None
)


@contextlib.contextmanager
def planned_swap(
    target: Path, *, keep_old: Path | None = None, add_files: Mapping[str, bytes] | None = None
) -> Iterator[None]:
    """Within this block (this thread or task only), a :func:`replace_dir` into ``target`` —
    e.g. the one at the end of a save that knows nothing about it — also writes ``add_files``
    into the new copy before it is committed, and keeps the replaced copy at ``keep_old``
    instead of deleting it (both as if given to :func:`replace_dir` directly)."""
    token = _PLAN.set((os.path.realpath(target), keep_old, dict(add_files or {})))
    try:
        yield
    finally:
        _PLAN.reset(token)


def replace_dir(
    new: Path, target: Path, *, keep_old: Path | None = None, add_files: Mapping[str, bytes] | None = None
) -> None:
    """Swap the complete directory ``new`` into ``target``'s place, crash-safely.

    A journal beside ``target`` names the two directories for the two renames, so
    :func:`recover_dir` can finish an interrupted swap (the new copy is complete before the
    journal is written) and nothing else is ever taken for a committed state.

    ``add_files`` (name → bytes) are written into ``new`` first, so they commit with it.
    ``keep_old``: a path on the same file system (usually below ``target.parent``) where the
    replaced copy is moved, whole, once the new one is committed, instead of being deleted; the
    journal names it too, so a crash after the swap still moves it there (a crash in the instant
    between the journal's removal and that rename loses the old copy, never the new one).
    """
    new, target = Path(new), Path(target)
    plan = _PLAN.get()
    if plan is not None and plan[0] == os.path.realpath(target):
        keep_old = keep_old or plan[1]
        add_files = {**plan[2], **(add_files or {})}
    for fname, data in (add_files or {}).items():
        (new / fname).write_bytes(data)
    if not target.exists():
        os.replace(new, target)
        return
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    journal = _journal(target)
    names = {"new": new.name, "old": old.name}
    if keep_old is not None:
        names["keep"] = os.path.relpath(keep_old, target.parent)
    write_bytes_atomic(journal, json.dumps(names).encode())
    os.replace(target, old)
    os.replace(new, target)
    journal.unlink(missing_ok=True)
    if keep_old is None or not _keep(old, Path(keep_old)):
        shutil.rmtree(old, ignore_errors=True)


def _keep(old: Path, keep: Path) -> bool:
    """Move a replaced copy to where its swap said to keep it (a stale copy there goes first).
    ``False`` if that failed: the swap itself is committed, so this never raises."""
    try:
        keep.parent.mkdir(parents=True, exist_ok=True)
        if keep.exists() or keep.is_symlink():
            discard_dir(keep)
        os.replace(old, keep)
    except OSError:
        return False
    return True


def discard_dir(path: Path) -> None:
    """Delete a directory so that no half-deleted copy is ever seen under its name: it is first
    renamed to a hidden sibling ``.<name>.trash-<random>`` (which a crash may leave behind, to be
    deleted by whoever cleans that directory), then removed."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    trash = path.parent / f".{path.name}.trash-{uuid.uuid4().hex[:8]}"
    os.rename(path, trash)
    if trash.is_dir() and not trash.is_symlink():
        shutil.rmtree(trash, ignore_errors=True)
    else:
        trash.unlink(missing_ok=True)


def recover_dir(target: Path) -> None:
    """Finish a :func:`replace_dir` that a crash interrupted, and remove its leftovers.

    Only a journalled swap is ever completed; stray ``.<name>.old-*`` / ``.tmp-*`` copies are
    deleted, never restored (a deleted or renamed directory stays gone).
    """
    target = Path(target)
    journal = _journal(target)
    if journal.exists():
        try:
            names = json.loads(journal.read_text())
            new, old = target.parent / names["new"], target.parent / names["old"]
            keep = _inside(target.parent, names["keep"]) if names.get("keep") else None
        except (OSError, ValueError, KeyError, TypeError):
            new = old = keep = None
        if new is not None and old is not None:
            if not target.exists() and new.is_dir():
                os.replace(new, target)  # the new copy was complete: roll forward
            elif not target.exists() and old.is_dir():
                os.replace(old, target)
            if keep is not None and target.exists() and old.is_dir():
                _keep(old, keep)  # the swap is done: keep the replaced copy where it was meant to go
        journal.unlink(missing_ok=True)
    # exactly this directory's own leftovers: ".a.old-*" would also match the copies of a
    # directory named "a.old-1234abcd" (".a.old-1234abcd.tmp-*"), e.g. its interrupted swap
    name = re.escape(target.name)
    own = re.compile(rf"\.{name}\.(old|tmp)-\w+|\.\.{name}\.swap\.\w+")  # the last: the journal's temp file
    try:
        siblings = list(target.parent.iterdir())
    except OSError:  # a parent we may not list (a user's own index dir): nothing to clean
        siblings = []
    for leftover in siblings:
        if own.fullmatch(leftover.name):
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


def _inside(parent: Path, rel: str) -> Path | None:
    """``parent / rel`` if it stays below ``parent`` (a journal never points elsewhere)."""
    parent = Path(os.path.normpath(parent))
    path = Path(os.path.normpath(parent / rel))
    return path if path != parent and path.is_relative_to(parent) else None
