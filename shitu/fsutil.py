"""File-system helpers used everywhere: checksums and never-half-written files and dirs."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
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


def replace_dir(new: Path, target: Path) -> None:
    """Swap the complete directory ``new`` into ``target``'s place, crash-safely.

    A journal beside ``target`` names the two directories for the two renames, so
    :func:`recover_dir` can finish an interrupted swap (the new copy is complete before the
    journal is written) and nothing else is ever taken for a committed state.
    """
    new, target = Path(new), Path(target)
    if not target.exists():
        os.replace(new, target)
        return
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    journal = _journal(target)
    write_bytes_atomic(journal, json.dumps({"new": new.name, "old": old.name}).encode())
    os.replace(target, old)
    os.replace(new, target)
    journal.unlink(missing_ok=True)
    shutil.rmtree(old, ignore_errors=True)


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
        except (OSError, ValueError, KeyError, TypeError):
            new = old = None
        if new is not None and old is not None:
            if not target.exists() and new.is_dir():
                os.replace(new, target)  # the new copy was complete: roll forward
            elif not target.exists() and old.is_dir():
                os.replace(old, target)
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
