"""Official PaddleX weights from a mirror or PaddleX's own host: bounded, verified, atomic.

PaddleX 3.x serves each official model as ``<base>/<model>_infer.tar`` — one folder inside
holding ``inference.yml``, ``inference.json`` (or ``.pdmodel``) and ``inference.pdiparams`` — and
caches it as ``$PADDLE_PDX_CACHE_HOME/official_models/<model>``. :func:`fetch_official` fills
that same cache from any such base (an internal mirror, a local directory of tars, or PaddleX's
BOS host), so PaddleX itself finds the files later, with what PaddleX's downloader lacks:

* one **total deadline** for the whole fetch (not per read: a server that drips bytes is cut
  off), enforced twice — socket timeouts shrink to the time left, and the caller stops waiting
  for the worker thread at the deadline even if a name lookup hangs;
* a much shorter wait for the host to **answer at all** (``answer_within``: name lookup, connect
  and the first response headers), so a start-up without network (a firewall that drops packets,
  a name server that never replies, a proxy that accepts and stays silent) costs ~2 s, not the
  whole download deadline;
* a size cap, an optional ``<model>_infer.tar.sha256`` beside the tar, and a tar check (no
  absolute paths, no ``..``, no links leading out, the model files present and named for the
  model PaddleX will be asked for);
* extraction into a temporary sibling that is renamed into place (:func:`shitu.fsutil.replace_dir`),
  so a half-downloaded or half-extracted model is never taken for a cached one.

Every failure is a :class:`DownloadFailed` whose message is one line for people, naming the
host but never a server path.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import logging
import os
import posixpath
import shutil
import socket
import ssl
import tarfile
import threading
import time
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urljoin, urlsplit

import yaml

from shitu.fsutil import recover_dir, replace_dir
from shitu.starter import MARKER

log = logging.getLogger(__name__)

# PaddleX 3.7.2's BOS host for official inference models (paddlex/inference/utils/official_models.py).
PADDLEX_BASE_URL = "https://paddle-model-ecology.bj.bcebos.com/paddlex/official_inference_model/paddle3.0.0"
DEFAULT_DEADLINE = 10.0  # seconds start-up waits for one model
DEFAULT_MAX_BYTES = 4 * 1024**3  # the largest official recogniser (CLIP ViT-L) is well below
CHUNK = 256 * 1024
MAX_REDIRECTS = 3
UNREACHABLE_TTL = 60.0  # seconds an unreachable host is not asked again (detection + recognition)
# Seconds a host has to answer at all (name lookup + connect + response headers) before it counts
# as unreachable: at start-up (a reachable hub answers in well under a second, even from far away:
# about four round trips), and in the background, where the download itself may take minutes.
ANSWER_TIMEOUT = 2.0
BACKGROUND_ANSWER_TIMEOUT = 30.0
USER_AGENT = "shitu-studio (model download)"

Progress = Callable[[int, "int | None"], None]  # (bytes done, bytes in all or None)


class DownloadFailed(Exception):
    """Why an official model could not be fetched, in one line for people."""

    def __init__(self, reason: str, *, unreachable: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.unreachable = unreachable  # the host did not answer at all (remembered a while)


@dataclass(frozen=True)
class Source:
    """Where ``<model>_infer.tar`` files come from: an http(s) base URL or a local directory."""

    base: str  # URL without a trailing slash, or a directory path
    label: str  # for people: "mirror mirror.corp:8080", "local mirror", "PaddleX's host ..."
    local: bool

    @classmethod
    def parse(cls, spec: str, what: str = "mirror") -> Source:
        """``http(s)://host/path``, ``file:///dir`` or a plain directory path."""
        spec = spec.strip()
        parts = urlsplit(spec)
        if parts.scheme in ("http", "https"):
            if not parts.hostname:
                raise ValueError(f"{spec!r} has no host")
            host = parts.hostname + (f":{parts.port}" if parts.port else "")  # never user:password@
            return cls(spec.rstrip("/"), f"{what} {host}", local=False)
        if parts.scheme == "file":
            return cls(unquote(parts.path), f"local {what}", local=True)
        if parts.scheme and len(parts.scheme) > 1:  # one letter: a Windows drive
            raise ValueError(f"{spec!r}: use an http(s):// URL, file:// or a directory")
        return cls(str(Path(spec).expanduser()), f"local {what}", local=True)


def archive_name(model_name: str) -> str:
    return f"{model_name}_infer.tar"


def cache_root() -> Path:
    """PaddleX's official-model cache (``$PADDLE_PDX_CACHE_HOME/official_models``), read now."""
    home = Path(os.environ.get("PADDLE_PDX_CACHE_HOME", Path.home() / ".paddlex"))
    return home / "official_models"


def is_model_dir(path: Path) -> bool:
    """A PaddleX inference model dir: ``inference.yml`` and a graph or parameters file."""
    return (path / "inference.yml").is_file() and any(
        (path / f).is_file() for f in ("inference.pdiparams", "inference.json", "inference.pdmodel")
    )


def not_official(path: Path, model_name: str) -> str | None:
    """Why the model dir at ``path`` (in PaddleX's cache) is not the official ``model_name``,
    or ``None`` when nothing says otherwise: a starter-pack copy carries its marker, and
    PaddleX's own ``inference.yml`` names the model it was exported as."""
    if (path / MARKER).is_file():
        return f"a copy of the offline starter pack (it has {MARKER})"
    try:
        with open(path / "inference.yml", "rb") as fh:
            spec = yaml.safe_load(fh.read(1 << 20))
    except (OSError, yaml.YAMLError):
        return "a model dir whose inference.yml cannot be read"
    named = spec.get("Global", {}).get("model_name") if isinstance(spec, dict) and isinstance(
        spec.get("Global"), dict) else None  # fmt: skip
    if named is not None and named != model_name:
        return f"the model {str(named)[:80]!r}, not {model_name}"
    return None


# --- the public entry point ---------------------------------------------------------------------
_unreachable: dict[str, tuple[float, str]] = {}  # base → (when, reason)
_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def fetch_official(
    model_name: str,
    source: Source,
    *,
    deadline: float = DEFAULT_DEADLINE,
    max_bytes: int = DEFAULT_MAX_BYTES,
    progress: Progress | None = None,
    remember_unreachable: bool = True,
    answer_within: float | None = None,
) -> tuple[Path, float]:
    """Download, verify and cache ``<model>_infer.tar`` from ``source``: ``(model dir, seconds)``.

    Returns at the latest ``deadline`` seconds after the call (plus a moment to clean up), and
    after ``answer_within`` seconds when the host has not answered at all by then (``None``: the
    deadline only); raises :class:`DownloadFailed` with a one-line reason, leaving nothing
    half-made in the cache.
    """
    start = time.monotonic()
    if remember_unreachable:
        seen = _unreachable.get(source.base)
        if seen and time.monotonic() - seen[0] < UNREACHABLE_TTL:
            raise DownloadFailed(seen[1], unreachable=True)
    cancel = threading.Event()
    answered = threading.Event()  # set by the worker once the host has sent response headers
    outcome: list[Path | BaseException] = []
    received = [0]

    def unreachable(waited: float) -> DownloadFailed:
        cancel.set()  # the worker cleans up its temporary dir and never commits
        reason = f"{source.label} unreachable (no answer within {waited:g} s)"
        if remember_unreachable:
            _unreachable[source.base] = (time.monotonic(), reason)
        return DownloadFailed(reason, unreachable=True)

    def track(done: int, total: int | None) -> None:
        received[0] = done
        if progress:
            progress(done, total)

    def work() -> None:
        try:
            outcome.append(_fetch_locked(model_name, source, start + deadline, max_bytes, track, cancel, answered))
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting caller
            outcome.append(exc)

    worker = threading.Thread(target=work, name=f"shitu-fetch-{model_name}", daemon=True)
    worker.start()
    if answer_within is not None and answer_within < deadline:
        worker.join(answer_within)
        if not outcome and not answered.is_set() and not received[0]:
            raise unreachable(answer_within)
    # the worker's sockets time out by the deadline; this bounds what they cannot (a name lookup)
    worker.join(max(0.0, start + deadline + 2.0 - time.monotonic()))
    if not outcome:
        if not received[0] and not answered.is_set():
            raise unreachable(deadline)
        cancel.set()
        raise DownloadFailed(f"{source.label} did not deliver {model_name} within {deadline:g} s")
    result = outcome[0]
    if isinstance(result, DownloadFailed):
        if result.unreachable and remember_unreachable:
            _unreachable[source.base] = (time.monotonic(), result.reason)
        raise result
    if isinstance(result, BaseException):
        raise DownloadFailed(f"{model_name} from {source.label} failed: {_first_line(result)}") from result
    return result, time.monotonic() - start


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _model_lock(key: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(key, threading.Lock())


def _fetch_locked(
    model_name: str, source: Source, until: float, max_bytes: int, progress: Progress | None,
    cancel: threading.Event, answered: threading.Event | None = None,
) -> Path:  # fmt: skip
    """One fetch per model at a time, in this process (a lock) and across processes (a file lock)."""
    import filelock

    root = cache_root()
    target = root / model_name
    lock = _model_lock(str(target))
    if not lock.acquire(timeout=max(0.0, until - time.monotonic())):
        raise DownloadFailed(f"another download of {model_name} is still running")
    try:
        root.mkdir(parents=True, exist_ok=True)
        try:
            with filelock.FileLock(str(root / f".{model_name}.lock"), timeout=max(0.0, until - time.monotonic())):
                if is_model_dir(target):  # another process finished it meanwhile (or someone put a model there)
                    foreign = not_official(target, model_name)
                    if foreign:
                        raise DownloadFailed(
                            f"PaddleX's cache already holds {foreign} under {model_name}; move it away to download"
                        )
                    return target
                recover_dir(target)  # a crashed earlier download's temporary dirs
                return _fetch(model_name, source, root, until, max_bytes, progress, cancel, answered)
        except filelock.Timeout:
            raise DownloadFailed(f"another process is still downloading {model_name}") from None
    except OSError as exc:
        raise DownloadFailed(f"cannot store {model_name} in PaddleX's model cache ({_os_reason(exc)})") from exc
    finally:
        lock.release()


def _os_reason(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return "no space left on the disk"
    return exc.strerror or _first_line(exc)


def _fetch(
    model_name: str, source: Source, root: Path, until: float, max_bytes: int, progress: Progress | None,
    cancel: threading.Event, answered: threading.Event | None = None,
) -> Path:  # fmt: skip
    name = archive_name(model_name)
    if source.local and answered is not None:
        answered.set()  # a directory has nothing to wait for
    work = root / f".{model_name}.tmp-{uuid.uuid4().hex[:12]}"  # recover_dir's pattern: cleaned after a crash
    work.mkdir()
    try:
        expected = _read_checksum(source, name, until, answered)
        archive = work / name
        digest = _download(source, name, archive, until, max_bytes, progress, cancel, answered)
        if expected is not None and digest != expected:
            raise DownloadFailed(f"{name} from {source.label} does not match its .sha256 file")
        model_dir = _unpack(archive, work / "x", model_name, source, max_bytes)
        if cancel.is_set() or time.monotonic() > until:
            raise DownloadFailed(f"{source.label} did not deliver {model_name} in time")
        staged = root / f".{model_name}.tmp-{uuid.uuid4().hex[:12]}"
        os.replace(model_dir, staged)
        replace_dir(staged, root / model_name)  # complete, or not there at all
        return root / model_name
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --- transport ---------------------------------------------------------------------------------
def _left(until: float) -> float:
    left = until - time.monotonic()
    if left <= 0:
        raise TimeoutError("deadline")
    return left


def _open(
    url: str, until: float, label: str, name: str, answered: threading.Event | None = None
) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """GET ``url`` (following a few redirects): the connection and a 200 response. ``answered``
    is set as soon as the host sends response headers (whatever their status)."""
    for _ in range(MAX_REDIRECTS + 1):
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        if parts.scheme == "https":
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                parts.hostname, port, timeout=_left(until), context=_tls_context()
            )
        elif parts.scheme == "http":
            conn = http.client.HTTPConnection(parts.hostname, port, timeout=_left(until))
        else:
            raise DownloadFailed(f"{label} redirected {name} to an unsupported URL scheme")
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        try:
            conn.request("GET", path, headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"})
            resp = conn.getresponse()
        except BaseException:
            conn.close()
            raise
        if answered is not None:
            answered.set()
        if resp.status in (301, 302, 303, 307, 308) and resp.getheader("Location"):
            url = urljoin(url, resp.getheader("Location") or "")
            conn.close()
            continue
        if resp.status != 200:
            conn.close()
            if resp.status == 404:
                raise DownloadFailed(f"{label} has no {name} (HTTP 404)")
            raise DownloadFailed(f"{label} answered HTTP {resp.status} for {name}")
        return conn, resp
    raise DownloadFailed(f"{label} redirected {name} more than {MAX_REDIRECTS} times")


def _tls_context() -> ssl.SSLContext:
    try:
        import certifi

        return ssl.create_default_context(cafile=certifi.where())
    except ImportError:  # pragma: no cover - certifi comes with requests
        return ssl.create_default_context()


def _net_failure(exc: BaseException, label: str, name: str, done: int, total: int | None) -> DownloadFailed:
    """A transport error as one line: did the host not answer, stall, or cut the transfer off?"""
    got = f"{_mb(done)} of {_mb(total)}" if total else _mb(done)
    if isinstance(exc, (TimeoutError, socket.timeout)):
        if not done and total is None:  # not even an answer: the host is as good as unreachable
            return DownloadFailed(f"{label} unreachable (no answer by the deadline)", unreachable=True)
        return DownloadFailed(f"{label} stalled: {name} not complete by the deadline ({got} received)")
    if isinstance(exc, http.client.IncompleteRead) or (done and isinstance(exc, (ConnectionError, EOFError))):
        return DownloadFailed(f"download of {name} from {label} was interrupted after {got}")
    if isinstance(exc, socket.gaierror):
        return DownloadFailed(f"{label} unreachable (host name not resolved)", unreachable=True)
    if isinstance(exc, ConnectionRefusedError):
        return DownloadFailed(f"{label} unreachable (connection refused)", unreachable=True)
    if isinstance(exc, ssl.SSLError):
        return DownloadFailed(f"{label}: TLS failed ({exc.reason or type(exc).__name__})", unreachable=True)
    if isinstance(exc, (http.client.HTTPException, ConnectionError)):
        return DownloadFailed(f"{label} broke off the transfer of {name} ({type(exc).__name__})")
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
    return DownloadFailed(f"{label} unreachable ({reason})", unreachable=not done)


def _mb(n: int | None) -> str:
    return f"{(n or 0) / 1e6:.1f} MB"


def _write(fh, data: bytes) -> None:  # noqa: ANN001 - a binary file
    """Every downloaded byte goes through here (tests make it fail like a full disk)."""
    fh.write(data)


def _download(
    source: Source, name: str, dest: Path, until: float, max_bytes: int, progress: Progress | None,
    cancel: threading.Event, answered: threading.Event | None = None,
) -> str:  # fmt: skip
    """Copy the tar to ``dest`` within the deadline and the size cap; its sha256 hex digest."""
    digest = hashlib.sha256()
    done, total = 0, None
    conn = None
    try:
        if source.local:
            path = Path(source.base) / name
            if not path.is_file():
                raise DownloadFailed(f"{source.label} has no {name}")
            total = path.stat().st_size
            reader = open(path, "rb")  # noqa: SIM115 - closed below

            def read() -> bytes:
                return reader.read(CHUNK)
        else:
            try:
                conn, resp = _open(f"{source.base}/{name}", until, source.label, name, answered)
            except (OSError, http.client.HTTPException) as exc:
                raise _net_failure(exc, source.label, name, 0, None) from exc
            length = resp.getheader("Content-Length")
            total = int(length) if length and length.isdigit() else None
            reader = resp

            def read() -> bytes:
                if conn is not None and conn.sock is not None:
                    conn.sock.settimeout(_left(until))  # each read gets only the time left in all
                return resp.read1(CHUNK)

        if total is not None and total > max_bytes:
            raise DownloadFailed(f"{name} is {_mb(total)}, over the {_mb(max_bytes)} limit (SHITU_MODEL_MAX_BYTES)")
        if progress:
            progress(0, total)
        try:
            with open(dest, "wb") as fh:
                while True:
                    if cancel.is_set():
                        raise TimeoutError("cancelled")
                    _left(until)
                    chunk = read()
                    if not chunk:
                        break
                    done += len(chunk)
                    if done > max_bytes:
                        raise DownloadFailed(f"{name} exceeds the {_mb(max_bytes)} limit (SHITU_MODEL_MAX_BYTES)")
                    digest.update(chunk)
                    try:
                        _write(fh, chunk)
                    except OSError as exc:
                        raise DownloadFailed(
                            f"cannot store {name} in PaddleX's model cache ({_os_reason(exc)})"
                        ) from exc
                    if progress:
                        progress(done, total)
        except DownloadFailed:
            raise
        except (OSError, http.client.HTTPException, EOFError) as exc:
            if source.local and not isinstance(exc, TimeoutError):
                raise DownloadFailed(f"cannot read {name} from the {source.label} ({_os_reason(exc)})") from exc
            raise _net_failure(exc, source.label, name, done, total) from exc
        finally:
            reader.close()
        if total is not None and done < total:
            raise DownloadFailed(
                f"download of {name} from {source.label} was interrupted after {_mb(done)} of {_mb(total)}"
            )
        return digest.hexdigest()
    finally:
        if conn is not None:
            conn.close()


def _read_checksum(source: Source, name: str, until: float, answered: threading.Event | None = None) -> str | None:
    """The hex digest in ``<name>.sha256`` beside the tar, or ``None`` when there is none."""
    if source.local:
        path = Path(source.base) / f"{name}.sha256"
        if not path.is_file():
            return None
        text = path.read_text(encoding="utf-8", errors="replace")
    else:
        conn = None
        try:
            conn, resp = _open(f"{source.base}/{name}.sha256", until, source.label, f"{name}.sha256", answered)
            if conn.sock is not None:
                conn.sock.settimeout(_left(until))
            text = resp.read(4096).decode("utf-8", "replace")
        except DownloadFailed as exc:
            if "HTTP 404" in exc.reason:
                return None  # checksums are optional on a mirror
            raise
        except (OSError, http.client.HTTPException) as exc:
            raise _net_failure(exc, source.label, f"{name}.sha256", 0, None) from exc
        finally:
            if conn is not None:
                conn.close()
    words = text.split()
    value = words[0].lower() if words else ""
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise DownloadFailed(f"{name}.sha256 on the {source.label} is not a sha256 checksum")
    return value


# --- verification and extraction -----------------------------------------------------------------
def _unsafe_member(member: tarfile.TarInfo) -> str | None:
    """Why a member must not be extracted, or ``None``."""
    path = PurePosixPath(member.name)
    if path.is_absolute() or member.name.startswith(("/", "\\")) or ".." in path.parts or ":" in path.parts[0]:
        return f"unsafe path {member.name!r}"
    if member.issym() or member.islnk():
        base = posixpath.dirname(member.name) if member.issym() else ""
        link = posixpath.normpath(posixpath.join(base, member.linkname))
        if member.linkname.startswith("/") or link == ".." or link.startswith("../"):
            return f"link {member.name!r} leads outside the model"
        return None
    if not (member.isfile() or member.isdir()):
        return f"special file {member.name!r}"
    return None


def _unpack(archive: Path, into: Path, model_name: str, source: Source, max_bytes: int) -> Path:
    """Check the tar and extract it into ``into``: the model dir inside (PaddleX's tars hold one folder)."""
    name = archive.name
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for member in members:
                why = _unsafe_member(member)
                if why:
                    raise DownloadFailed(f"{name} from {source.label} was refused: {why}")
            if sum(m.size for m in members if m.isfile()) > max_bytes:
                raise DownloadFailed(f"{name} unpacks to more than {_mb(max_bytes)} (SHITU_MODEL_MAX_BYTES)")
            tar.extractall(into, members=members, filter="data")  # the stdlib's own guard as well
    except DownloadFailed:
        raise
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise DownloadFailed(f"{name} from {source.label} is not a readable tar ({_first_line(exc)})") from exc
    entries = [p for p in into.iterdir()] if into.is_dir() else []
    model_dir = entries[0] if len(entries) == 1 and entries[0].is_dir() else into
    missing = [
        f for f, ok in (
            ("inference.yml", (model_dir / "inference.yml").is_file()),
            ("inference.pdiparams", (model_dir / "inference.pdiparams").is_file()),
            ("inference.json", any((model_dir / g).is_file() for g in ("inference.json", "inference.pdmodel"))),
        ) if not ok
    ]  # fmt: skip
    if missing:
        raise DownloadFailed(f"{name} from {source.label} is not a PaddleX model (no {', '.join(missing)})")
    try:
        meta = yaml.safe_load((model_dir / "inference.yml").read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise DownloadFailed(f"{name} from {source.label} has an unreadable inference.yml") from exc
    declared = (meta.get("Global") or {}).get("model_name") if isinstance(meta, dict) else None
    if declared and declared != model_name:
        # PaddleX refuses a model whose yml names another model than the one asked for
        raise DownloadFailed(f"{name} from {source.label} holds {declared}, not {model_name}")
    return model_dir
