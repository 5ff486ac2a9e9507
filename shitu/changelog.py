"""An append-only, checksummed change log beside an index's PaddleX files.

A stored index is its last full save (PaddleX's ``vector.index`` + ``id_map.yaml`` and our
files) plus ``shitu_changes.log``: one record per committed change since, each the *version*
it made. Committing a change appends one record and fsyncs it: the cost follows the change
(one 512-d vector is ~2 KiB), not the index (2 GB at 1M x 512-d). Loading replays the records
on top of the full save; compaction (:meth:`shitu.store.IndexStore.compact`) folds them into
a new full save, which is again exactly PaddleX's layout.

A record on disk::

    b"SCL1" | payload length (u32 LE) | CRC-32 of the payload (u32 LE) | payload
    payload = header length (u32 LE) | header (UTF-8 JSON) | array bytes, in header order

A record is committed once all of it is on disk. A process killed while appending leaves a
torn tail: readers stop at the first record whose length or checksum does not match and
ignore the rest (nothing after it was ever acknowledged), and the next writer cuts it off
before appending (:func:`truncate_torn_tail`, under the index's lock).
"""

from __future__ import annotations

import json
import logging
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

LOG_FILE = "shitu_changes.log"
MAGIC = b"SCL1"
_HEAD = struct.Struct("<4sII")  # magic, payload length, crc32
_U32 = struct.Struct("<I")
MAX_RECORD_BYTES = 1 << 31  # a sanity bound: a longer length field means a damaged file


@dataclass
class Record:
    header: dict[str, Any]
    arrays: list[np.ndarray]
    end: int  # byte offset just past this record


def encode(header: dict[str, Any], arrays: list[np.ndarray] | tuple = ()) -> bytes:
    """One record: ``header`` (JSON-able) plus ``arrays`` (stored C-ordered, dtype and shape in
    the header under ``"arrays"``)."""
    arrays = [np.ascontiguousarray(a) for a in arrays]
    head = dict(header, arrays=[{"dtype": a.dtype.str, "shape": list(a.shape)} for a in arrays])
    head_bytes = json.dumps(head, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    payload = b"".join([_U32.pack(len(head_bytes)), head_bytes, *(a.tobytes() for a in arrays)])
    return _HEAD.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload


def append(path: str | Path, records: list[bytes]) -> int:
    """Append ``records`` durably (written and fsynced before returning); the log's new size."""
    with open(path, "ab") as fh:
        fh.write(b"".join(records))
        fh.flush()
        os.fsync(fh.fileno())
        return fh.tell()


def size(path: str | Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def read(path: str | Path, start: int = 0, *, arrays: bool = True) -> Iterator[Record]:
    """The complete records from byte ``start`` on, in order; stops at a torn or damaged one.
    ``arrays=False`` skips decoding the array bytes (headers only; the checksum is still
    verified)."""
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        return
    with fh:
        fh.seek(start)
        offset = start
        while True:
            head = fh.read(_HEAD.size)
            if len(head) < _HEAD.size:
                if head:
                    log.warning("%s: a torn record at byte %d is ignored", Path(path).name, offset)
                return
            magic, length, crc = _HEAD.unpack(head)
            if magic != MAGIC or length > MAX_RECORD_BYTES:
                log.warning("%s: damaged record at byte %d; later records are ignored", Path(path).name, offset)
                return
            payload = fh.read(length)
            if len(payload) < length or zlib.crc32(payload) != crc:
                log.warning("%s: torn or damaged record at byte %d is ignored", Path(path).name, offset)
                return
            offset += _HEAD.size + length
            (head_len,) = _U32.unpack_from(payload, 0)
            header = json.loads(payload[4 : 4 + head_len].decode("utf-8"))
            out: list[np.ndarray] = []
            if arrays:
                pos = 4 + head_len
                for spec in header.get("arrays", []):
                    dtype = np.dtype(spec["dtype"])
                    count = int(np.prod(spec["shape"], dtype=np.int64))
                    out.append(np.frombuffer(payload, dtype, count, pos).reshape(spec["shape"]).copy())
                    pos += count * dtype.itemsize
            yield Record(header, out, offset)


def valid_length(path: str | Path) -> int:
    """Bytes of the log that hold complete records."""
    end = 0
    for record in read(path, arrays=False):
        end = record.end
    return end


def truncate_torn_tail(path: str | Path) -> int:
    """Cut a torn tail off (call under the index's lock, before appending); the valid length."""
    end = valid_length(path)
    if size(path) > end:
        with open(path, "r+b") as fh:
            fh.truncate(end)
            fh.flush()
            os.fsync(fh.fileno())
    return end
