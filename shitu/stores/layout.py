"""An index on disk in PaddleX's layout: ``vector.index`` (faiss ``IndexIDMap2``) and
``id_map.yaml`` — so an index built by PaddleX's ``IndexData.save`` loads here and ours loads in
PaddleX — plus our files beside them: ``shitu_meta.json`` (next id, feature model, search
parameters, calibration, adaptation), ``shitu_entries.sqlite`` (sources and thumbnails),
``shitu_labels.npz`` (the id map as arrays, checked against ``id_map.yaml``'s hash: a 1M-entry
index loads in ~2 s instead of ~18 s of YAML), for an adapted index ``shitu_whitening.npz``
(the projection) and ``shitu_raw.npz`` (the unprojected features, so it can be refitted), and
``shitu_changes.log`` (the changes since that full save, :mod:`shitu.changelog`).

:func:`save_index` writes every change folded in, atomically (a complete copy, then a rename);
:func:`load_index` reads a directory and replays its change log.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import re
import shutil
import struct
import tempfile
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import yaml

from shitu import changelog
from shitu import changes as ch
from shitu.adapt import Adaptation, Projection
from shitu.calibrate import Calibration
from shitu.changelog import LOG_FILE
from shitu.config import INDEX_TYPES, METRIC_TYPES
from shitu.entrymeta import ENTRIES_FILE, EntryMeta
from shitu.errors import NotFound, ShiTuError, TooLarge
from shitu.fsutil import replace_dir
from shitu.index import Fit, GalleryIndex, Whitening
from shitu.labels import LabelTable, clean_label
from shitu.vectors import FaissBase

VECTOR_FILE = "vector.index"
ID_MAP_FILE = "id_map.yaml"
ALT_ID_MAP_FILE = "index_info.yaml"  # the name PaddleX's docs use
META_FILE = "shitu_meta.json"
WHITENING_FILE = "shitu_whitening.npz"
LABELS_FILE = "shitu_labels.npz"  # the id map as arrays, checked against id_map.yaml's hash
RAW_FILE = "shitu_raw.npz"  # the unprojected features of an adapted index, so it can be refitted
VIEWS_FILE = "shitu_views.npz"  # query-like views of the photos (raw features), so it can be recalibrated
VERSION_FILE = "shitu_version.json"  # written by shitu.store (which version this is); a plain save drops it
# what makes up an index dir (a full save writes all but the log; the version file is the store's)
OUR_FILES = (VECTOR_FILE, ID_MAP_FILE, META_FILE, WHITENING_FILE, RAW_FILE, VERSION_FILE, ENTRIES_FILE, LOG_FILE,
             LABELS_FILE, VIEWS_FILE)  # fmt: skip
EXPORTED_FILES = (VECTOR_FILE, ID_MAP_FILE, LABELS_FILE, META_FILE, WHITENING_FILE, RAW_FILE, ENTRIES_FILE,
                  VIEWS_FILE)  # fmt: skip
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
MAX_IMPORT_BYTES = 4 << 30
MAX_NEXT_ID = 1 << 62  # an imported index may hand out ids up to here (faiss ids are int64)
MAX_RATIO = 100  # a member may expand at most this many times (faiss vectors ~1.1x, YAML id maps ~10x)
RATIO_FROM = 1 << 20  # ... once it is past this size (tiny files compress arbitrarily well)


@dataclass(frozen=True)
class Loaded:
    """An index read from a directory, and how far into its change log it got."""

    index: GalleryIndex
    log_end: int = 0  # bytes of the change log applied
    log_version: int | None = None  # the version of the last log record applied


def save_index(index: GalleryIndex, save_dir: str | Path, *, extra_files: dict[str, bytes] | None = None) -> Path:
    """Write ``index`` to ``save_dir`` atomically, every change folded in (PaddleX's layout): a
    complete copy in a temporary dir, then a rename. Files of others in ``save_dir`` stay."""
    save_dir = Path(save_dir)
    save_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = save_dir.parent / f".{save_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write_files(index, tmp)
        for fname, data in (extra_files or {}).items():
            (tmp / fname).write_bytes(data)
        replace_index_dir(tmp, save_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    index.rows = EntryMeta(save_dir / ENTRIES_FILE)  # the rows are in the file now, not in memory
    return save_dir


def write_files(index: GalleryIndex, target: Path) -> None:
    """Write the complete index into the (new, empty) directory ``target``."""
    full = index.compacted()
    base = full.faiss_base
    labels = index.labels
    faiss.write_index(base.index, str(target / VECTOR_FILE))
    text = id_map_yaml(labels, index.index_type, index.metric_type)
    (target / ID_MAP_FILE).write_bytes(text)
    names = json.dumps(labels.names, ensure_ascii=False).encode("utf-8")
    with open(target / LABELS_FILE, "wb") as fh:  # the same id map as arrays, for a fast load
        np.savez(fh, ids=labels.ids, codes=labels.codes, names=np.frombuffer(names, np.uint8),
                 id_map_sha256=np.frombuffer(hashlib.sha256(text).digest(), np.uint8))  # fmt: skip
    meta = {
        "format": 2,
        "next_id": index.next_id,
        "feature_model": index.feature_model,
        "trained_size": base.trained_size,
        "search_params": base.search_params,
        "calibrated_size": base.calibrated_size,
        "suggested_rec_threshold": index.suggested_rec_threshold,
        "calibration": index.calibration.to_dict() if index.calibration is not None else None,
        "adaptation": index.adaptation.to_dict() if index.adaptation is not None else None,
        "changes_since_calibration": index.changes_since_calibration,
        "entries_file": ENTRIES_FILE,
    }
    (target / META_FILE).write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
    index.rows.save_to(target / ENTRIES_FILE, labels.ids)
    if index.whitening is not None:
        with open(target / WHITENING_FILE, "wb") as fh:
            np.savez(fh, mean=index.whitening.mean, projection=index.whitening.matrix, kind=index.whitening.kind)
        if full.raw_chunks:
            (raw_ids, raw), *_ = full.raw_chunks
            with open(target / RAW_FILE, "wb") as fh:
                np.savez(fh, ids=raw_ids, features=raw)
    if index.fit.views is not None:
        view_ids, view_feats = index.fit.views
        live = np.isin(view_ids, labels.ids)  # views of removed photos go with them
        with open(target / VIEWS_FILE, "wb") as fh:
            np.savez(fh, ids=view_ids[live], features=view_feats[live])


def load_index(index_dir: str | Path, *, until_version: int | None = None) -> GalleryIndex:
    """Ours or PaddleX's (``IndexData.save``) layout, with the changes logged since the last full
    save (up to version ``until_version``, if given)."""
    return read_index_dir(index_dir, until_version=until_version).index


def read_index_dir(index_dir: str | Path, *, until_version: int | None = None) -> Loaded:
    index = load_base(index_dir)
    return replay_log(index, Path(index_dir) / LOG_FILE, until_version=until_version)


def replay_log(
    index: GalleryIndex, log_path: Path, start: int = 0, *, until_version: int | None = None, log_version=None
) -> Loaded:
    """``index`` with the log's records from byte ``start`` applied (each record's changes, then
    the state it recorded); says how far it got."""
    end, version = start, log_version
    for record in changelog.read(log_path, start):
        head = record.header
        if until_version is not None and int(head.get("version", 0)) > until_version:
            break
        for item in head.get("changes", []):
            index = ch.decode(item, record.arrays).apply(index)
        state = head.get("state", {})
        calibration = Calibration.from_dict(state["calibration"]) if "calibration" in state else index.calibration
        index = index.with_state(
            calibration=calibration, changes_since_calibration=int(state.get("changes_since_calibration", 0)),
            next_id=int(state.get("next_id", 0)),
        )  # fmt: skip
        end, version = record.end, int(head.get("version", 0))
    index.forget_lineage()
    return Loaded(index, end, version)


def log_record(index: GalleryIndex, chain: list[ch.Change], parent: GalleryIndex, header: dict[str, Any]) -> bytes:
    """One change-log record for ``chain`` (from :meth:`GalleryIndex.changes_since`) with the
    state it leaves ``index`` in, plus ``header`` (version number, time, action, ...)."""
    arrays: list[np.ndarray] = []
    encoded = [ch.encode(change, arrays) for change in chain]
    state: dict[str, Any] = {"next_id": index.next_id, "changes_since_calibration": index.changes_since_calibration}
    if index.calibration is not parent.calibration:
        state["calibration"] = index.calibration.to_dict() if index.calibration is not None else None
    return changelog.encode({**header, "changes": encoded, "state": state}, arrays)


_FAISS_HEADER = struct.Struct("<iqqqBi")  # d, ntotal, two unused int64, is_trained, metric type
_ID_MAPS = (b"IxM2", b"IxMp")
_FLAT = (b"IxFI", b"IxF2", b"IxFl")
MAX_DIM = 65536


def check_faiss_header(path: Path) -> None:
    """Refuse a ``vector.index`` whose header declares more than the file holds, before faiss
    reads it (faiss allocates what a header declares: a patched size field in a 1 MB file asked
    for gigabytes). Checks the id map's dimensions and count, and a flat inner index's vector
    size; other inner layouts are left to faiss, whose reads stop at the end of the file."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(4 + _FAISS_HEADER.size + 4 + 4 + _FAISS_HEADER.size + 4 + 8)
    damaged = ShiTuError(f"{path.name} is damaged: its header does not match its {size:,} bytes")
    if len(head) < 4 + _FAISS_HEADER.size or head[:4] not in _ID_MAPS:
        raise ShiTuError(f"{path.name} is not an id-mapped faiss index (PaddleX's IndexIDMap2)")
    d, ntotal, _, _, _, metric = _FAISS_HEADER.unpack_from(head, 4)
    if not 0 < d <= MAX_DIM or not 0 <= ntotal or ntotal * d * 4 > size:
        raise damaged
    pos = 4 + _FAISS_HEADER.size + (4 if metric > 1 else 0)
    inner = head[pos : pos + 4]
    if inner in _FLAT and len(head) >= pos + 4 + _FAISS_HEADER.size + 8:
        d_in, n_in, _, _, _, metric_in = _FAISS_HEADER.unpack_from(head, pos + 4)
        at = pos + 4 + _FAISS_HEADER.size + (4 if metric_in > 1 else 0)
        if at + 8 > len(head):
            raise damaged
        (words,) = struct.unpack_from("<Q", head, at)
        if d_in != d or n_in != ntotal or words * 4 > size or words != n_in * d_in:
            raise damaged


def load_base(index_dir: str | Path) -> GalleryIndex:
    """The last full save alone (no logged changes)."""
    index_dir = Path(index_dir)
    vector_path = index_dir / VECTOR_FILE
    info_path = next((index_dir / n for n in (ID_MAP_FILE, ALT_ID_MAP_FILE) if (index_dir / n).exists()), None)
    if not vector_path.exists() or info_path is None:
        raise NotFound(f"{index_dir} is not an index directory (needs {VECTOR_FILE} and {ID_MAP_FILE})")
    check_faiss_header(vector_path)
    try:
        info, labels = read_id_map(info_path)
        index = faiss.read_index(str(vector_path))
    except ShiTuError:
        raise
    except Exception as exc:  # noqa: BLE001 - faiss raises RuntimeError, yaml its own
        # faiss's message quotes its C++ source and our paths: keep only what it is
        raise ShiTuError(
            f"{vector_path.name if 'index' in str(exc).lower() else info_path.name} "
            f"cannot be read ({type(exc).__name__})"
        ) from None
    metric_type = info.get("metric_type")
    index_type = info.get("index_type")
    if metric_type not in METRIC_TYPES:
        raise ShiTuError(f"{index_dir}: metric {metric_type!r} is not supported (only IP and L2)")
    if not isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        raise ShiTuError(f"{index_dir}: expected an id-mapped faiss index, got {type(index).__name__}")
    if index.ntotal != len(labels):
        raise ShiTuError(f"{index_dir}: {index.ntotal} vectors but {len(labels)} labels in {info_path.name}")
    meta_path = index_dir / META_FILE
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.exists() else {}
        if not isinstance(meta, dict) or not isinstance(meta.get("entries", {}), dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        raise ShiTuError(f"{META_FILE} is damaged ({type(exc).__name__})") from None
    db = index_dir / ENTRIES_FILE
    pending: dict[int, tuple[str, bytes | None]] = {}
    if not db.exists():  # metadata of format 1: one JSON document
        for key, m in meta.get("entries", {}).items():
            thumb = m.get("thumbnail")
            pending[int(key)] = (m.get("source", ""), base64.b64decode(thumb) if thumb else None)
    next_id = max(int(meta.get("next_id", 0)), int(labels.ids[-1]) + 1 if len(labels) else 0)
    whitening = raw = None
    try:
        if (index_dir / WHITENING_FILE).exists():
            with np.load(index_dir / WHITENING_FILE) as w:
                kind = str(w["kind"]) if "kind" in w.files else "pca-whitening"
                whitening = (Whitening if kind == "pca-whitening" else Projection)(w["mean"], w["projection"], kind)
        if whitening is not None and (index_dir / RAW_FILE).exists():
            with np.load(index_dir / RAW_FILE) as r:
                raw = ((r["ids"].astype(np.int64), r["features"]),)
            if len(raw[0][0]) != index.ntotal or raw[0][1].shape[1] != whitening.input_dim:
                raw = None  # out of step with the vectors: the index works, it just cannot be refitted
    except (OSError, ValueError, KeyError) as exc:
        raise ShiTuError(f"{WHITENING_FILE} or {RAW_FILE} is damaged ({type(exc).__name__})") from None
    views = None
    with contextlib.suppress(OSError, ValueError, KeyError):  # unreadable views: calibrated without them
        if (index_dir / VIEWS_FILE).exists():
            with np.load(index_dir / VIEWS_FILE) as v:
                views = (v["ids"].astype(np.int64), v["features"])
            dim = whitening.input_dim if whitening is not None else index.d
            if views[1].ndim != 2 or views[1].shape[1] != dim or len(views[0]) != len(views[1]):
                views = None
    base = FaissBase(index, metric_type, trained_size=meta.get("trained_size"),
                     search_params=meta.get("search_params"), calibrated_size=meta.get("calibrated_size"))  # fmt: skip
    fit = Fit(
        whitening, Calibration.from_dict(meta.get("calibration")), Adaptation.from_dict(meta.get("adaptation")),
        meta.get("suggested_rec_threshold"), int(meta.get("changes_since_calibration") or 0), views,
    )  # fmt: skip
    return GalleryIndex(
        base, labels, index_type=index_type if index_type in INDEX_TYPES else "Flat", metric_type=metric_type,
        next_id=next_id, feature_model=meta.get("feature_model"), fit=fit, raw=raw,
        rows=EntryMeta(db if db.exists() else None, pending),
    )  # fmt: skip


_PLAIN_LABEL = re.compile(r"[^\W\d_][\w\-.()/+]*(?: [\w\-.()/+]+)*")  # a letter first, no ": ", " #", edge spaces
_YAML_UNSAFE = {0x2028, 0x2029, 0xFEFF}  # line and paragraph separators, byte order mark
_YAML_WORDS = {"yes", "no", "true", "false", "on", "off", "null", "y", "n"}  # plain scalars YAML reads as non-text


def id_map_yaml(labels: "LabelTable", index_type: str, metric_type: str) -> bytes:
    """PaddleX's ``id_map.yaml`` (what ``yaml.safe_dump`` of ``{id_map, index_type,
    metric_type}`` means), written directly: ~10x faster than PyYAML at 1M entries. A label is
    written plain when it is certainly read back as the same text, else as an escaped
    double-quoted scalar."""
    names = [
        name if _PLAIN_LABEL.fullmatch(name) and name.lower() not in _YAML_WORDS else _yaml_quoted(name)
        for name in labels.names
    ]
    lines = [f"  {i}: {names[c]}\n" for i, c in zip(labels.ids.tolist(), labels.codes.tolist(), strict=True)]
    head = "id_map:\n" if lines else "id_map: {}\n"
    return (head + "".join(lines) + f"index_type: {index_type}\nmetric_type: {metric_type}\n").encode("utf-8")


def _yaml_quoted(text: str) -> str:
    """``text`` as a YAML double-quoted scalar: printable characters as they are, the rest
    (line breaks included, which YAML would fold) as escapes."""
    out = []
    for char in text:
        o = ord(char)
        if char in '"\\':
            out.append("\\" + char)
        elif 0x20 <= o <= 0x7E or (0xA0 <= o <= 0xFFFD and o not in _YAML_UNSAFE and not 0xD800 <= o <= 0xDFFF) \
                or o >= 0x10000:  # fmt: skip
            out.append(char)
        else:
            out.append(f"\\x{o:02x}" if o <= 0xFF else f"\\u{o:04x}" if o <= 0xFFFF else f"\\U{o:08x}")
    return '"' + "".join(out) + '"'


def read_id_map(info_path: Path) -> tuple[dict[str, Any], LabelTable]:
    """``(info, labels)`` of an id map file: from the arrays beside it when they were written
    with exactly this file (milliseconds where YAML takes ~15 s at 1M entries), else from the
    YAML itself (PaddleX's own saves, or a file edited since)."""
    text = info_path.read_bytes()
    cached = info_path.parent / LABELS_FILE
    if cached.exists():
        try:
            with np.load(cached) as z:
                if z["id_map_sha256"].tobytes() == hashlib.sha256(text).digest():
                    names = json.loads(z["names"].tobytes().decode("utf-8"))
                    head = text[: text.find(b"id_map:")] + text[text.rfind(b"\nindex_type:") :]
                    info = yaml.load(head, Loader=_YAML_LOADER) or {}  # noqa: S506 - a safe loader
                    labels = LabelTable(z["ids"], z["codes"], names, {n: c for c, n in enumerate(names)})
                    if isinstance(info, dict) and "metric_type" in info:
                        return info, labels
        except (OSError, ValueError, KeyError, yaml.YAMLError):
            pass  # damaged or foreign: the YAML decides
    _refuse_aliases(text, info_path.name)
    info = yaml.load(text, Loader=_YAML_LOADER) or {}  # noqa: S506 - a safe loader
    if not isinstance(info, dict):
        raise ShiTuError(f"{info_path.name} cannot be read (not a mapping)")
    try:
        id_map = {int(k): str(v) for k, v in (info.get("id_map") or {}).items()}
    except (AttributeError, TypeError, ValueError):
        raise ShiTuError(f"{info_path.name} cannot be read (its id map is not id: label pairs)") from None
    return info, LabelTable.of(list(id_map), list(id_map.values()))


def _refuse_aliases(text: bytes, name: str) -> None:
    """An id map has no use for YAML anchors and aliases, and a few hundred bytes of nested
    aliases expand to gigabytes ("billion laughs"): refuse any, before anything is built."""
    if b"&" not in text and b"*" not in text:
        return  # no anchor or alias can be written without these
    try:
        for event in yaml.parse(text, Loader=_YAML_LOADER):
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                raise ShiTuError(f"{name} uses YAML anchors or aliases, which an id map never needs")
    except yaml.YAMLError:
        raise ShiTuError(f"{name} cannot be read (not valid YAML)") from None


def replace_index_dir(new: Path, target: Path) -> None:
    """Swap ``new`` into ``target``'s place, keeping files in ``target`` that are not ours."""
    if target.exists():
        for f in target.iterdir():
            if f.name not in OUR_FILES and not f.name.startswith(ENTRIES_FILE) and not (new / f.name).exists():
                (shutil.copytree if f.is_dir() else shutil.copy2)(f, new / f.name)
    replace_dir(new, target)


# --- an index as a .zip ---------------------------------------------------------------------------
def zipped(index: GalleryIndex, name: str, scratch: Path | None = None) -> bytes:
    """``index`` as a .zip of ``name/<file>`` in PaddleX's layout (plus our metadata), every change
    folded in; written through a temporary directory under ``scratch``."""
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        write_files(index, Path(tmp))
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for fname in EXPORTED_FILES:
                if (Path(tmp) / fname).exists():
                    zf.write(Path(tmp) / fname, f"{name}/{fname}")
        return buf.getvalue()


@contextlib.contextmanager
def unzipped_index(data: bytes, scratch: Path | None = None) -> Iterator[GalleryIndex]:
    """The index in a .zip (ours, or a zipped PaddleX ``IndexData.save`` dir), checked whole
    before anything is stored; usable inside the block (its files are in a temporary dir)."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, ValueError) as exc:
        raise ShiTuError("not a readable .zip file") from exc
    with archive, tempfile.TemporaryDirectory(dir=scratch) as tmp:
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
            index = load_index(tmp)
        except NotFound as exc:
            raise ShiTuError(f"the .zip does not hold a usable index: {exc.message}") from None
        except ShiTuError as exc:
            raise ShiTuError(exc.message.replace(tmp, "the .zip")) from None
        except Exception as exc:  # noqa: BLE001 - a damaged member, whatever the library says
            raise ShiTuError(f"the .zip does not hold a usable index ({type(exc).__name__})") from None
        _check_imported(index)
        yield index


def _check_imported(index: GalleryIndex) -> None:
    """What an import must not bring: ids that would overflow on the next add, labels that no file
    or database can store again (lone surrogates, control characters, over-long)."""
    if index.next_id > MAX_NEXT_ID:
        raise ShiTuError(f"the .zip's index hands out ids from {index.next_id}, past {MAX_NEXT_ID}: refused")
    for name in index.labels.names:
        try:
            clean_label(name)
        except ShiTuError as exc:
            raise ShiTuError(f"the .zip's id map holds a label that cannot be kept: {exc.message}") from None


def _extract_capped(archive: zipfile.ZipFile, member: zipfile.ZipInfo, target: Path, budget: int) -> int:
    """Stream one member to ``target`` (never more than ``budget`` bytes, nor more than
    :data:`MAX_RATIO` times its compressed size once past :data:`RATIO_FROM`); returns its size."""
    written = 0
    limit = min(budget, max(RATIO_FROM, MAX_RATIO * member.compress_size))
    try:
        with archive.open(member) as src, open(target, "wb") as dst:
            while chunk := src.read(1 << 20):
                written += len(chunk)
                if written > limit:
                    if written > budget:
                        raise TooLarge(f"{member.filename} in the .zip is larger than {MAX_IMPORT_BYTES >> 30} GiB")
                    raise TooLarge(f"{member.filename} in the .zip expands more than {MAX_RATIO} times: refused")
                dst.write(chunk)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, NotImplementedError, RuntimeError, OSError) as exc:
        reason = "encrypted" if "encrypt" in str(exc).lower() or "password" in str(exc).lower() else str(exc)
        raise ShiTuError(f"the .zip is damaged or unsupported ({member.filename}: {reason})") from None
    return written
