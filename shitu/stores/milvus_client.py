"""One connection to a Milvus per URI and process, shared by every store and engine in it.

A URI is either a **Milvus Lite** data directory (a local path ending in ``.db``): pymilvus starts
milvus-lite's pure-Python engine in this process (milvus-lite 3.x: a gRPC server on 127.0.0.1 in a
background thread). Only **one process** may open a given ``.db`` at a time (it holds an ``flock`` on
``<db>/LOCK`` until it exits); a second process gets :class:`~shitu.errors.Unavailable` telling it to
share the data through ``milvus-lite server`` instead. Or a **Milvus server** (``http(s)://host:port``):
Milvus Standalone/Cluster/Zilliz, or ``milvus-lite server --data-dir DIR --port 19530``, which several
app replicas can share.

:func:`connect` hands out one :class:`MilvusConnection` per (URI, token) and counts its users; the last
:meth:`MilvusConnection.close` closes it (and stops the in-process Milvus Lite server this process
started, releasing the file for other processes). Library errors become one-line
:class:`~shitu.errors.ShiTuError` s (:meth:`MilvusConnection.calling`); pymilvus's and milvus-lite's
log records about failed calls are cut to one line. pymilvus is imported lazily: the rest of the
project works without it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from shitu.errors import Conflict, NotFound, ShiTuError, Unavailable

if TYPE_CHECKING:  # pragma: no cover - typing only
    from pymilvus import MilvusClient

log = logging.getLogger(__name__)

_GUARD = threading.Lock()
_OPEN: dict[tuple[str, str], MilvusConnection] = {}  # (uri or lite path, token) -> the shared connection
_LITE_UNFLUSHED: dict[tuple[str, str], int] = {}  # (file, collection) -> rows written since the last flush


def quote(value: str) -> str:
    """A string literal for a Milvus filter expression."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return '"' + escaped.replace("\t", "\\t") + '"'


class _OneLineLogs(logging.Filter):
    """Cuts pymilvus's / milvus-lite's records about failed calls to one line, drops known noise."""

    # pymilvus's query iterator asks for a timestamp that milvus-lite does not implement, then warns
    NOISE = ("failed to get mvccTs", "failed to set up mvccTs", "Method not implemented")

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken record is still logged, as is
            return True
        error = record.exc_info[1] if record.exc_info else None
        if any(n in message or n in str(error or "") for n in self.NOISE):
            return False
        changed = message.split("\nTraceback", 1)[0]
        if record.exc_info and record.exc_info[1] is not None:
            changed += f" ({first_line(record.exc_info[1])})"
        if changed != message or record.exc_info:
            record.msg, record.args, record.exc_info, record.exc_text = changed, None, None, None
        return True


_LOG_FILTER = _OneLineLogs()
_NOISY_LOGGERS = (
    "pymilvus.decorators",
    "pymilvus.client.iterator.query_iterator",
    "milvus_lite.adapter.grpc.servicer",
    "milvus_lite.server_manager",
    "grpc._server",  # milvus-lite's in-process gRPC server
)


def _quiet_library_logs() -> None:
    for name in _NOISY_LOGGERS:
        logger = logging.getLogger(name)
        if _LOG_FILTER not in logger.filters:
            logger.addFilter(_LOG_FILTER)


def first_line(error: BaseException) -> str:
    text = getattr(error, "message", None) or str(error) or type(error).__name__
    text = str(text).strip().splitlines()[0] if str(text).strip() else type(error).__name__
    return text[:300]


def translate(error: Exception, what: str) -> ShiTuError:
    """A pymilvus / gRPC / milvus-lite error as one of ours, with a one-line message."""
    if isinstance(error, ShiTuError):
        return error
    text = first_line(error)
    low = text.lower()
    message = f"Milvus could not {what}: {text}"
    if "not exist" in low or "not found" in low or "can't find" in low:
        return NotFound(message)
    if "already exist" in low:
        return Conflict(message)
    kind = type(error).__name__
    if (
        kind in ("MilvusUnavailableException", "RpcError", "_InactiveRpcError", "FutureTimeoutError")
        or "unavailable" in low
        or "connect" in low
        or "deadline" in low
        or "timeout" in low
    ):
        return Unavailable(message)
    return ShiTuError(message)


def pymilvus_module():
    try:
        import pymilvus
    except ImportError:
        raise Unavailable(
            "the Milvus backend needs pymilvus (and milvus-lite for a local .db): pip install pymilvus milvus-lite"
        ) from None
    _quiet_library_logs()
    return pymilvus


def _is_remote(uri: str) -> bool:
    return uri.lower().startswith(("http://", "https://", "tcp://"))


def connect(uri: str, token: str | None = None, *, timeout: float = 30.0) -> MilvusConnection:
    """The process's connection to ``uri`` (made on first use); :meth:`MilvusConnection.close` it."""
    if not isinstance(uri, str) or not uri.strip():
        raise ShiTuError("no Milvus URI given: use a local path ending in .db or http(s)://host:port")
    uri = uri.strip()
    lite_path = None
    if not _is_remote(uri):
        path = Path(uri).expanduser().resolve()
        if path.suffix != ".db":
            raise ShiTuError(f"a Milvus Lite path must end in .db (got {uri[:200]!r})")
        if path.is_file():
            raise ShiTuError(
                f"{path} is a file, not a Milvus Lite 3 data directory (milvus-lite 2.x files cannot be "
                "read by milvus-lite 3.x: export it with the old version and import it here)"
            )
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ShiTuError(f"cannot create the folder for the Milvus Lite file {path}: {e.strerror}") from None
        uri = lite_path = str(path)
    key = (uri, token or "")
    with _GUARD:
        conn = _OPEN.get(key)
        if conn is not None:
            conn.users += 1
            return conn
        conn = MilvusConnection(uri, token, lite_path, timeout)  # raises before it is shared, if it cannot open
        _OPEN[key] = conn
        return conn


class MilvusConnection:
    """A pymilvus client for one URI (see :func:`connect`), with what every caller needs beside it:
    one-line errors, collections loaded once, Milvus Lite's writes serialised and flushed."""

    lite_flush_rows = 1000  # Milvus Lite: flush after this many inserted / relabelled rows (see written)

    def __init__(self, uri: str, token: str | None, lite_path: str | None, timeout: float):
        self.uri, self.lite_path, self.timeout = uri, lite_path, timeout
        self.users = 1
        self.write_lock = threading.RLock()  # milvus-lite's engine is single-writer per collection
        self._key = (uri, token or "")
        self._loaded: set[str] = set()
        self._closed = False
        pymilvus = pymilvus_module()
        started_before = lite_path is not None and _lite_server_running(lite_path)
        try:
            self.client: MilvusClient = pymilvus.MilvusClient(uri=uri, token=token or "", timeout=timeout)
        except Exception as e:  # noqa: BLE001 - connection problems become one clear message
            raise self._open_error(e) from None
        self._started_lite = lite_path is not None and not started_before and _lite_server_running(lite_path)

    def _open_error(self, error: Exception) -> ShiTuError:
        if self.lite_path is not None:
            if _lite_lock_held(self.lite_path):
                return Unavailable(
                    f"the Milvus Lite file {self.lite_path} is open in another process: Milvus Lite allows one "
                    f"process per file. To share it, run `milvus-lite server --data-dir {self.lite_path} "
                    "--port 19530` and give every process http://127.0.0.1:19530"
                )
            return Unavailable(f"cannot open the Milvus Lite file {self.lite_path}: {first_line(error)}")
        return Unavailable(f"cannot connect to Milvus at {self.uri}: {first_line(error)}")

    def close(self) -> None:
        """One user fewer; the last closes the client and stops the Milvus Lite server we started."""
        with _GUARD:
            if self._closed:
                return
            self.users -= 1
            if self.users > 0:
                return
            self._closed = True
            _OPEN.pop(self._key, None)
        with contextlib.suppress(Exception):
            self.client.close()
        if self._started_lite and self.lite_path is not None:
            with contextlib.suppress(Exception):
                from milvus_lite.server_manager import server_manager_instance

                server_manager_instance.release_server(self.lite_path)

    @contextlib.contextmanager
    def calling(self, what: str) -> Iterator[None]:
        """Run a Milvus call: any library error becomes one of ours, with a one-line message."""
        if self._closed:
            raise ShiTuError("this Milvus connection is closed")
        try:
            yield
        except ShiTuError:
            raise
        except Exception as e:  # noqa: BLE001 - every library error becomes one of ours
            log.debug("Milvus call failed: %s", what, exc_info=True)
            raise translate(e, what) from None

    def ensure_loaded(self, coll: str) -> None:
        """A server may hold a collection released (not searchable); load it once. On Milvus Lite,
        also seal rows replayed from its write-ahead log (see :meth:`written`)."""
        if coll in self._loaded:
            return
        with self.calling("load a collection"):
            state = str(self.client.get_load_state(coll, timeout=self.timeout).get("state", ""))
            if "NotLoad" in state:
                self.client.load_collection(coll, timeout=self.timeout)
            if self.lite_path is not None:
                with self.write_lock:
                    self.client.flush(coll, timeout=self.timeout)  # a no-op when nothing is buffered
        self._loaded.add(coll)

    def forget(self, coll: str) -> None:
        """``coll`` was dropped or replaced: load it again when it is next used."""
        self._loaded.discard(coll)
        _LITE_UNFLUSHED.pop((self.lite_path or "", coll), None)

    def flushed(self, coll: str) -> None:
        """``coll`` was just flushed: nothing of it is buffered."""
        if self.lite_path is not None:
            _LITE_UNFLUSHED[(self.lite_path, coll)] = 0

    def written(self, coll: str, rows: int) -> None:
        """Milvus Lite searches rows it has not flushed yet by a slow scan (about 50 µs per row and
        query at 512 dimensions: 1.7 s per query for 30k rows, 45 ms once flushed), so it is flushed
        once :attr:`lite_flush_rows` rows have been written. Servers manage this themselves."""
        if self.lite_path is None:
            return
        key = (self.lite_path, coll)
        pending = _LITE_UNFLUSHED.get(key, 0) + rows
        if pending >= self.lite_flush_rows:
            with self.calling("flush a collection"):
                self.client.flush(coll, timeout=self.timeout)
            pending = 0
        _LITE_UNFLUSHED[key] = pending


def _lite_server_running(path: str) -> bool:
    try:
        from milvus_lite.server_manager import server_manager_instance
    except ImportError:
        return False
    return os.path.abspath(path) in getattr(server_manager_instance, "_servers", {})


def _lite_lock_held(path: str) -> bool:
    """Whether another process holds milvus-lite's ``flock`` on ``<path>/LOCK``."""
    lock = os.path.join(path, "LOCK")
    if not os.path.exists(lock):
        return False
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return False
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)
