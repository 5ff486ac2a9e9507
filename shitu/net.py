"""Fetching images from URLs, with a guard against server-side request forgery.

Every hop (the URL and each redirect) has its host read by this module's own rule and by
urllib3's parser, the one that decides where a connection goes; URLs whose authority could be
read differently (backslashes, ``user@``, control characters, percent-encoding, numeric hosts
other than a dotted IPv4, or any disagreement between the two readings) are refused. The host is resolved exactly once,
every address it resolves to is checked, and the socket is opened to the checked address
itself: nothing resolves the name a second time, so DNS rebinding cannot swap the target.
The request still carries the original ``Host`` header and, for https, the original name for
SNI and certificate checks. A whole fetch has a total deadline, and at most
``MAX_CONCURRENT_FETCHES`` run at once in the process.
"""

from __future__ import annotations

import http.client
import ipaddress
import logging
import os
import re
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin

import idna
import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, LocationParseError, NewConnectionError
from urllib3.util import parse_url

from shitu.errors import FetchTimeout, Forbidden, ShiTuError, TooLarge, Unavailable

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0  # seconds for one connect or one read
DEFAULT_DEADLINE = 15.0  # seconds for the whole fetch, redirects included
DEFAULT_MAX_BYTES = 20 * 1024 * 1024
MAX_REDIRECTS = 3
MAX_CONCURRENT_FETCHES = 8
SLOT_WAIT = 1.0  # seconds a fetch waits for a free download slot before answering 503
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
USER_AGENT = "shitu-studio (image fetcher)"

_fetch_slots = threading.BoundedSemaphore(MAX_CONCURRENT_FETCHES)

# A DNS name after IDNA encoding (underscores occur in real names), optionally fully qualified.
_HOSTNAME_RE = re.compile(r"^[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*\.?$")
# IPv6 ranges that carry an IPv4 address which the packet may end up at.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def set_max_concurrent_fetches(limit: int) -> None:
    """Change how many URL fetches may run at once in this process (fetches already running
    keep their slot in the old limit)."""
    global _fetch_slots
    if limit < 1:
        raise ValueError("the fetch limit must be at least 1")
    _fetch_slots = threading.BoundedSemaphore(limit)


@dataclass(frozen=True)
class _Target:
    """One hop's URL, as the connection will see it."""

    url: str
    scheme: str
    host: str  # as urllib3 normalised it (lower case, IDNA); IPv6 without brackets
    port: int
    request_uri: str

    @property
    def shown(self) -> str:
        return _shown(self.url)


def _shown(url: str) -> str:
    """The URL for a message: bounded, so a huge URL cannot flood logs and toasts."""
    return url if len(url) <= 200 else url[:197] + "..."


def _parse(url: str) -> _Target:
    """Parse one hop's URL, refusing anything whose host could be read two ways.

    The host and port are read from the raw text by this module's own rule (the parts between
    ``//`` and the first ``/``, ``?`` or ``#``; no percent-encoding, no user info, a canonical
    dotted IPv4, a bracketed IPv6 or a DNS name, IDNA-encoded strictly), and urllib3 — which
    makes the connection — must read the very same host and port, or the URL is refused. So the
    guard does not depend on how a given urllib3 version decodes or normalises a host."""
    if any(ord(ch) < 0x21 or ord(ch) == 0x7F or ch.isspace() for ch in url):
        raise ShiTuError("the URL contains spaces or control characters; percent-encode them")
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in ("http", "https"):
        shown = url.split(":", 1)[0][:20].lower() if ":" in url else ""
        raise ShiTuError(f"only http(s) URLs are accepted, not {shown or 'a bare path'!r}")
    if "\\" in url:
        # urllib.parse keeps a backslash in the authority, urllib3 ends the authority at it
        raise ShiTuError("the URL contains a backslash; percent-encode it as %5C")
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    if "@" in authority:
        raise ShiTuError("URLs with a user name or password (user@host) are not accepted")
    if "%" in authority:
        raise ShiTuError("percent-encoded characters are not accepted in a URL's host; write the host plainly")
    host, port = _split_authority(authority, url)
    try:
        parsed = parse_url(url)
    except LocationParseError:
        raise ShiTuError(f"not a valid URL: {_shown(url)}") from None
    theirs = (parsed.host or "").lower()
    theirs = theirs[1:-1] if theirs.startswith("[") and theirs.endswith("]") else theirs
    if theirs.rstrip(".") != host.rstrip(".") or (parsed.port or _DEFAULT_PORTS[scheme]) != port:
        raise ShiTuError(f"the URL's host can be read in more than one way: {_shown(url)}")
    return _Target(url=url, scheme=scheme, host=host, port=port, request_uri=parsed.request_uri or "/")


_DEFAULT_PORTS = {"http": 80, "https": 443}
_NUMERIC_LABEL_RE = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$")


def _split_authority(authority: str, url: str) -> tuple[str, int]:
    """``(host, port)`` of a raw authority (no user info, no percent signs): the host lower
    case and ASCII (IDNA), an IPv6 address without brackets; refuses every ambiguous form."""
    scheme = url.partition("://")[0].lower()
    if authority.startswith("["):
        inside, bracket, after = authority[1:].partition("]")
        if not bracket or (after and not after.startswith(":")):
            raise ShiTuError(f"URL host {authority!r} is not a valid IPv6 address")
        if "%" in inside:
            raise ShiTuError("IPv6 zone ids (%...) are not accepted in URLs")
        try:
            ipaddress.IPv6Address(inside)
        except ValueError:
            raise ShiTuError(f"URL host [{inside}] is not a valid IPv6 address") from None
        host, port_text = inside.lower(), after[1:] if after else None
    else:
        host, colon, port_text = authority.partition(":")
        if not colon:
            port_text = None
        host = _ascii_host(host.lower(), url)
    if port_text is None or port_text == "":
        return host, _DEFAULT_PORTS[scheme]
    if not port_text.isascii() or not port_text.isdigit() or len(port_text) > 5 or not 0 < int(port_text) < 65536:
        raise ShiTuError(f"URL port {port_text[:8]!r} is out of range or not a number")
    return host, int(port_text)


def _ascii_host(host: str, url: str) -> str:
    """A DNS name or a canonical dotted IPv4 address, as the connection will see it."""
    if not host:
        raise ShiTuError(f"URL has no host: {_shown(url)}")
    if not host.isascii():
        try:
            encoded = idna.encode(host, uts46=False).decode("ascii")
        except (idna.IDNAError, UnicodeError, ValueError):
            raise ShiTuError(f"URL host {host!r} is not a valid international domain name") from None
        if not any(label.startswith("xn--") for label in encoded.split(".")):
            # non-ASCII characters that only stand in for ASCII ones (e.g. an ideographic full stop)
            raise ShiTuError(f"URL host {host!r} is written with look-alike characters; write it in ASCII")
        host = encoded
    labels = host.rstrip(".").split(".")
    if _NUMERIC_LABEL_RE.match(labels[-1]):
        # a host ending in a number is an IPv4 address to URL parsers and to inet_aton alike; only
        # the one spelling everyone reads the same way is accepted (not 127.1, 0x7f.0.0.1, 017.0.0.1)
        try:
            canonical = str(ipaddress.IPv4Address(host))
        except ValueError:
            canonical = None
        if canonical != host:
            raise ShiTuError(f"URL host {host!r} is not a dotted IPv4 address like 192.0.2.10")
        return host
    if not _HOSTNAME_RE.match(host):
        raise ShiTuError(f"URL host {host!r} is not a valid host name")
    return host


def _embedded_ipv4(addr: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 address may deliver packets to (mapped, 6to4, Teredo, NAT64)."""
    found: list[ipaddress.IPv4Address] = []
    if addr.ipv4_mapped is not None:
        found.append(addr.ipv4_mapped)
    if addr.sixtofour is not None:
        found.append(addr.sixtofour)
    if addr.teredo is not None:
        found.extend(addr.teredo)
    if addr in _NAT64:
        found.append(ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF))
    return found


def is_public_address(address: str) -> bool:
    """Whether a resolved address is one that any host on the internet could also reach."""
    try:
        addr = ipaddress.ip_address(address)
    except ValueError:
        return False
    candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [addr]
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.scope_id:
            return False
        candidates.extend(_embedded_ipv4(addr))
    return all(
        a.is_global and not (a.is_multicast or a.is_unspecified or a.is_reserved or a.is_loopback or a.is_link_local)
        for a in candidates
    )


def _lookup(target: _Target, clock: _Deadline) -> list[tuple[Any, ...]]:
    """``getaddrinfo`` bounded by the fetch's deadline: the system resolver has no timeout of
    its own to pass, so it runs in a daemon thread that is abandoned if it takes too long."""
    outcome: list[Any] = []
    done = threading.Event()

    def work() -> None:
        try:
            outcome.append(
                socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
            )
        except (OSError, UnicodeError) as exc:
            outcome.append(exc)
        finally:
            done.set()

    threading.Thread(target=work, name="shitu-dns", daemon=True).start()
    if not done.wait(max(0.0, clock.remaining())):
        raise _timed_out(target, clock.seconds)
    if isinstance(outcome[0], BaseException):
        raise ShiTuError(f"cannot resolve host {target.host!r}")
    return outcome[0]


def _resolve(target: _Target, check: bool, clock: _Deadline) -> list[tuple[int, tuple[Any, ...]]]:
    """Resolve the host once: ``(family, sockaddr)`` pairs, all checked when ``check``."""
    infos = _lookup(target, clock)
    addrs: list[tuple[int, tuple[Any, ...]]] = []
    for family, _type, _proto, _name, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        if check and not is_public_address(sockaddr[0]):
            # the address itself is only logged: answering it would map internal DNS for a caller
            log.info("URL host %r refused: it resolves to %s", target.host, sockaddr[0])
            raise Forbidden(
                f"URL host {target.host!r} resolves to a non-public address; add it to SHITU_URL_ALLOWLIST to allow it"
            )
        if (family, sockaddr) not in addrs:
            addrs.append((family, sockaddr))
    if not addrs:
        raise ShiTuError(f"cannot resolve host {target.host!r}")
    return addrs


class _Deadline:
    """A whole fetch's time budget. Per-read timeouts cannot bound a server that drips one
    byte at a time, so when the budget is spent every socket of the fetch is shut down, which
    wakes any read blocked on it."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.end = time.monotonic() + seconds
        self.expired = False
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._timer = threading.Timer(max(0.0, seconds), self._expire)
        self._timer.daemon = True
        self._timer.start()

    def remaining(self) -> float:
        return self.end - time.monotonic()

    def watch(self, sock: socket.socket) -> None:
        # a duplicate descriptor: TLS wrapping detaches the original socket object, but
        # shutting down any descriptor of a socket stops reads on all of them
        with self._lock:
            dup = sock.dup()
            self._socks.append(dup)
            if self.expired:
                _shutdown(dup)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._socks:
                _shutdown(sock)

    def close(self) -> None:
        self._timer.cancel()
        with self._lock:
            for sock in self._socks:
                sock.close()
            self._socks.clear()


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed by the peer or by us


def _connect_socket(family: int, sockaddr: tuple[Any, ...], timeout: float | None) -> socket.socket:
    """Open a TCP connection to exactly ``sockaddr`` (no name lookup). Tests replace this to
    see which address a fetch connects to."""
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.settimeout(timeout)
        sock.connect(sockaddr)
    except BaseException:
        sock.close()
        raise
    return sock


class _PinnedMixin:
    """urllib3 connection that connects to a pre-checked address instead of resolving
    ``host``; ``host`` still names the server in the Host header, SNI and certificate check."""

    host: str
    port: int
    timeout: float | None

    def __init__(self, *args: Any, pinned: tuple[int, tuple[Any, ...]], state: _HopState, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._pinned = pinned
        self._state = state

    def _new_conn(self) -> socket.socket:
        family, sockaddr = self._pinned
        try:
            sock = _connect_socket(family, sockaddr, self.timeout)
        except TimeoutError as exc:
            raise ConnectTimeoutError(self, f"connecting to {self.host} timed out") from exc
        except OSError as exc:
            raise NewConnectionError(self, f"could not connect to {self.host}: {exc}") from exc
        self._state.connected = True
        self._state.deadline.watch(sock)
        return sock


class _PinnedHTTPConnection(_PinnedMixin, HTTPConnection):
    pass


class _PinnedHTTPSConnection(_PinnedMixin, HTTPSConnection):
    pass


class _PinnedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _PinnedHTTPConnection


class _PinnedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _PinnedHTTPSConnection


@dataclass
class _HopState:
    deadline: _Deadline
    connected: bool = False


def _ca_bundle() -> str | None:
    """The CA bundle requests would use (its environment override, else certifi's)."""
    env = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
    if env:
        return env
    try:
        import certifi
    except ImportError:
        return None  # urllib3 falls back to the system store
    return certifi.where()


def _timed_out(target: _Target, seconds: float) -> ShiTuError:
    return FetchTimeout(f"fetching {target.shown} timed out after {seconds:g}s")


def _too_big(target: _Target, max_bytes: int) -> ShiTuError:
    limit = f"{max_bytes // (1024 * 1024)} MiB" if max_bytes >= 1024 * 1024 else f"{max_bytes:,} bytes"
    return TooLarge(f"{target.shown} is larger than {limit}")


def _get(
    target: _Target,
    addrs: list[tuple[int, tuple[Any, ...]]],
    timeout: float,
    max_bytes: int,
    deadline: _Deadline,
) -> tuple[int, str | None, bytes]:
    """One GET to the checked addresses, in order until one accepts the connection:
    ``(status, redirect location, body)``."""
    headers = {"User-Agent": USER_AGENT, "Accept": "image/*,*/*;q=0.8", "Accept-Encoding": "identity"}
    last_error: Exception | None = None
    for pinned in addrs:
        left = deadline.remaining()
        if left <= 0 or deadline.expired:
            raise _timed_out(target, deadline.seconds)
        state = _HopState(deadline)
        per_op = urllib3.Timeout(connect=min(timeout, left), read=min(timeout, left))
        kwargs: dict[str, Any] = {"pinned": pinned, "state": state}
        if target.scheme == "https":
            pool: HTTPConnectionPool = _PinnedHTTPSPool(
                target.host, target.port, timeout=per_op, maxsize=1, retries=False,
                cert_reqs="CERT_REQUIRED", ca_certs=_ca_bundle(), **kwargs,
            )  # fmt: skip
        else:
            pool = _PinnedHTTPPool(target.host, target.port, timeout=per_op, maxsize=1, retries=False, **kwargs)
        try:
            resp = pool.urlopen(
                "GET", target.request_uri, headers=headers, retries=False, redirect=False,
                assert_same_host=False, preload_content=False, decode_content=True,
            )  # fmt: skip
            try:
                if resp.status in REDIRECT_STATUSES:
                    return resp.status, resp.headers.get("location", ""), b""
                if resp.status != 200:
                    return resp.status, None, b""
                try:
                    declared = int(resp.headers.get("content-length") or 0)
                except ValueError:
                    declared = 0
                if declared > max_bytes:
                    raise _too_big(target, max_bytes)
                body = bytearray()
                while chunk := resp.read(65536):
                    body.extend(chunk)
                    if len(body) > max_bytes:
                        raise _too_big(target, max_bytes)
                if deadline.expired:  # a shut-down socket reads as a (short) end of body
                    raise _timed_out(target, deadline.seconds)
                return resp.status, None, bytes(body)
            finally:
                resp.release_conn()
                resp.close()
        except ShiTuError:
            raise
        except (urllib3.exceptions.HTTPError, http.client.HTTPException, OSError) as exc:
            if deadline.expired:
                raise _timed_out(target, deadline.seconds) from None
            if not state.connected:
                last_error = exc  # nothing was sent: try the next checked address
                continue
            if isinstance(exc, (TimeoutError, urllib3.exceptions.TimeoutError)):
                raise _timed_out(target, min(timeout, deadline.seconds)) from None
            if isinstance(exc, (urllib3.exceptions.SSLError, ssl.SSLError)):
                raise ShiTuError(f"fetching {target.shown} failed: the TLS connection could not be verified") from None
            raise ShiTuError(f"fetching {target.shown} failed: the connection broke off") from None
        finally:
            pool.close()
    if deadline.expired:
        raise _timed_out(target, deadline.seconds)
    if isinstance(last_error, ConnectTimeoutError) and not isinstance(last_error, NewConnectionError):
        raise _timed_out(target, min(timeout, deadline.seconds))
    raise ShiTuError(f"fetching {target.shown} failed: could not connect to {target.host!r}")


def fetch_url(
    url: str,
    *,
    guard: bool = False,
    allowlist: tuple[str, ...] = (),
    timeout: float = DEFAULT_TIMEOUT,
    max_bytes: int = DEFAULT_MAX_BYTES,
    deadline: float = DEFAULT_DEADLINE,
) -> bytes:
    """Download a URL's body within ``deadline`` seconds in all (``timeout`` bounds each
    connect and read). With ``guard``, every hop (redirects included) must resolve only to
    public addresses unless its host is allow-listed; the connection goes to the address
    that was checked."""
    _parse(url)  # a malformed URL is a 400 whatever the load
    slots = _fetch_slots
    if not slots.acquire(timeout=SLOT_WAIT):
        raise Unavailable("too many image downloads in progress, try again")
    clock = _Deadline(deadline)
    try:
        allowed = {h.strip().lower().strip("[]") for h in allowlist}
        current = url
        for _ in range(MAX_REDIRECTS + 1):
            target = _parse(current)
            addrs = _resolve(target, guard and target.host not in allowed, clock)
            if clock.expired:
                raise _timed_out(target, clock.seconds)
            status, location, body = _get(target, addrs, timeout, max_bytes, clock)
            if location is not None:
                if not location:
                    raise ShiTuError(f"fetching {target.shown} failed: a redirect without a Location")
                current = urljoin(current, location)
                continue
            if status != 200:
                raise ShiTuError(f"fetching {target.shown} failed: HTTP {status}")
            return body
        raise ShiTuError(f"too many redirects fetching {_shown(url)}")
    finally:
        clock.close()
        slots.release()
