"""Fetching images from URLs, with a guard against server-side request forgery."""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urljoin, urlparse

import requests

from shitu.errors import ShiTuError

DEFAULT_TIMEOUT = 10.0
DEFAULT_MAX_BYTES = 20 * 1024 * 1024
MAX_REDIRECTS = 3


def _check_host(url: str, allowlist: tuple[str, ...]) -> None:
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https"):
        raise ShiTuError(f"only http(s) URLs are accepted, not {parsed.scheme or 'a bare path'!r}")
    host = parsed.hostname
    if not host:
        raise ShiTuError(f"URL has no host: {url}")
    if host in allowlist:
        return
    try:
        infos = socket.getaddrinfo(host, parsed.port or (443 if parsed.scheme == "https" else 80))
    except socket.gaierror as exc:
        raise ShiTuError(f"cannot resolve host {host!r}") from exc
    for info in infos:
        addr = ipaddress.ip_address(info[4][0].split("%")[0])
        if not addr.is_global or addr.is_multicast:
            raise ShiTuError(
                f"URL host {host!r} resolves to a non-public address ({addr}); "
                "add it to SHITU_URL_ALLOWLIST to allow it",
                status=403,
            )


def fetch_url(
    url: str,
    *,
    guard: bool = False,
    allowlist: tuple[str, ...] = (),
    timeout: float = DEFAULT_TIMEOUT,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> bytes:
    """Download a URL's body. With ``guard``, every hop (redirects included) must resolve to
    public addresses unless its host is allow-listed."""
    current = url
    for _ in range(MAX_REDIRECTS + 1):
        if guard:
            _check_host(current, allowlist)
        elif urlparse(current).scheme not in ("http", "https"):
            raise ShiTuError(f"only http(s) URLs are accepted: {current}")
        try:
            with requests.get(current, timeout=timeout, stream=True, allow_redirects=False) as resp:
                if resp.is_redirect:
                    current = urljoin(current, resp.headers.get("location", ""))
                    continue
                if resp.status_code != 200:
                    raise ShiTuError(f"fetching {current} failed: HTTP {resp.status_code}")
                declared = int(resp.headers.get("content-length") or 0)
                if declared > max_bytes:
                    raise ShiTuError(f"{current} is larger than {max_bytes // (1024 * 1024)} MiB", status=413)
                body = bytearray()
                for chunk in resp.iter_content(65536):
                    body.extend(chunk)
                    if len(body) > max_bytes:
                        raise ShiTuError(f"{current} is larger than {max_bytes // (1024 * 1024)} MiB", status=413)
                return bytes(body)
        except requests.Timeout as exc:
            raise ShiTuError(f"fetching {current} timed out after {timeout:.0f}s", status=408) from exc
        except requests.RequestException as exc:
            raise ShiTuError(f"fetching {current} failed: {type(exc).__name__}") from exc
    raise ShiTuError(f"too many redirects fetching {url}")
