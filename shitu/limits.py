"""One set of limits for every way into the server: the HTTP API, Gradio's own routes, the pages.

:class:`RequestLimits` is the one middleware in front of them all (Gradio is mounted on the same
app): a request body may be as large as its route needs and no larger — the HTTP API's image
payloads ``SHITU_MAX_REQUEST_BYTES`` (64 MiB), Gradio's file uploads the same, Gradio's JSON event
calls ``SHITU_MAX_EVENT_BYTES`` (1 MiB: they name files, they do not carry them), anything else
64 KiB — checked from ``Content-Length`` before anything is read, else counted as it arrives. A
Gradio queue join is checked before Gradio sees it (an empty ``session_hash`` was a 500). Every
refusal is the API's envelope with a 4xx status and the product's own words.

:func:`server_config` is how every server is started: a request whose headers do not arrive
within :data:`HEADER_TIMEOUT` seconds is dropped (1,500 half-open connections were held
indefinitely), idle keep-alive connections close after 5 s, and ``X-Forwarded-For`` is believed
only from the proxies ``SHITU_TRUSTED_PROXIES`` names (on a Hugging Face Space: its private
network), so a client cannot pick the address that sign-in lock-outs and rate limits count.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

Refusal = Callable[[int, str], ASGIApp]  # (status, message) -> the response that says it

MAX_OTHER_BODY = 64 * 1024  # a page, an asset or anything not listed below has no use for a body
HEADER_TIMEOUT = 10.0
KEEP_ALIVE_TIMEOUT = 5
MAX_CONNECTIONS = 1000  # beyond this uvicorn answers 503 at once
UPLOAD_WINDOW = 900.0  # seconds over which a client's uploads are counted (Gradio keeps them 15 min: ui.studio)
SESSION_HASH = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
EVENT_PATHS = ("/gradio_api/queue/join", "/gradio_api/call/", "/gradio_api/run/", "/gradio_api/api/")


def body_limit(path: str, settings: Any) -> tuple[int, str]:
    """The largest body ``path`` takes, and what to call the setting in a refusal."""
    if path.startswith("/shitu-") or path == "/gradio_api/upload":
        return int(settings.max_request_bytes), "SHITU_MAX_REQUEST_BYTES"
    if path.startswith(EVENT_PATHS):
        return int(settings.max_event_bytes), "SHITU_MAX_EVENT_BYTES"
    return MAX_OTHER_BODY, ""


class RequestLimits:
    """Body sizes per route and Gradio's queue joins checked, for the whole app (see the module doc)."""

    def __init__(self, app: ASGIApp, settings: Any, refuse: Refusal):
        self.app = app
        self.settings = settings
        self.refuse = refuse
        self._uploads: dict[str, deque[tuple[float, int]]] = {}  # client -> (when, bytes) of recent uploads
        self._uploads_lock = threading.Lock()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        error_response = self.refuse
        path = scope["path"]
        limit, setting = body_limit(path, self.settings)
        too_large = f"the request body is larger than {limit:,} bytes" + (f" ({setting})" if setting else "")
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                await error_response(400, "invalid Content-Length header")(scope, receive, send)
                return
            if size > limit:
                await error_response(413, too_large)(scope, receive, send)
                return
            if path == "/gradio_api/upload":
                wait = self._upload_quota(scope, size)
                if wait:
                    message = (f"this address uploaded more than {self.settings.max_upload_bytes_per_client:,} "
                               f"bytes in {UPLOAD_WINDOW / 60:.0f} minutes; try again in {wait} s")  # fmt: skip
                    await error_response(429, message, {"Retry-After": str(wait)})(scope, receive, send)
                    return
        if path == "/gradio_api/queue/join" and scope.get("method") == "POST":
            body = await _read_body(receive, limit)
            if body is None:
                await error_response(413, too_large)(scope, receive, send)
                return
            problem = _queue_join_problem(body)
            if problem:
                await error_response(400, problem)(scope, receive, send)
                return
            await self.app(scope, _replaying(body, receive), send)
            return
        await self._counted(scope, receive, send, limit, too_large)

    def _upload_quota(self, scope: Scope, size: int) -> int:
        """Seconds until the client may upload ``size`` more bytes (0: now, and it is counted)."""
        client = (scope.get("client") or ("?",))[0]
        quota = int(self.settings.max_upload_bytes_per_client)
        now = time.monotonic()
        with self._uploads_lock:
            recent = self._uploads.setdefault(client, deque())
            while recent and now - recent[0][0] > UPLOAD_WINDOW:
                recent.popleft()
            used = sum(n for _, n in recent)
            if used + size > quota and recent:
                return int(UPLOAD_WINDOW - (now - recent[0][0])) + 1
            recent.append((now, size))
            if len(self._uploads) > 10_000:  # forget clients with nothing recent
                self._uploads = {c: q for c, q in self._uploads.items() if q and now - q[-1][0] <= UPLOAD_WINDOW}
            return 0

    async def _counted(self, scope: Scope, receive: Receive, send: Send, limit: int, too_large: str) -> None:
        """Pass the request on, counting its body as it arrives: past ``limit`` the app is told
        the client went away, and the client gets 413 if no answer had started."""
        seen = 0
        over = False
        started = False

        async def counting() -> Message:
            nonlocal seen, over
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    over = True
                    return {"type": "http.disconnect"}
            return message

        async def watching(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                if over:
                    return  # the 413 below is the answer
                started = True
            if over and not started:
                return
            await send(message)

        await self.app(scope, counting, watching)
        if over and not started:
            await self.refuse(413, too_large)(scope, receive, send)


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return bytes(body)
        body.extend(message.get("body", b""))
        if len(body) > limit:
            return None
        if not message.get("more_body", False):
            return bytes(body)


def _replaying(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _queue_join_problem(body: bytes) -> str | None:
    """Why a Gradio queue join cannot be served (``None``: it can)."""
    try:
        payload = json.loads(body or b"null")
    except ValueError:
        return "the request body is not valid JSON"
    if not isinstance(payload, dict):
        return "the request body must be a JSON object"
    session = payload.get("session_hash")
    if not isinstance(session, str) or not SESSION_HASH.match(session):
        return "session_hash must be 1-128 letters, digits, '_' or '-'"
    if not isinstance(payload.get("data", []), list):
        return "data must be a list of the event's inputs"
    fn_index = payload.get("fn_index")
    if fn_index is not None and (isinstance(fn_index, bool) or not isinstance(fn_index, int)):
        return "fn_index must be a whole number"
    return None


def trusted_proxies(settings: Any, on_space: bool) -> list[str]:
    """The addresses whose ``X-Forwarded-For`` is believed: ``SHITU_TRUSTED_PROXIES``, else a Hugging
    Face Space's private network (its proxy reaches the app from there), else none."""
    if settings.trusted_proxies:
        return list(settings.trusted_proxies)
    return ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"] if on_space else []


def server_config(app: Any, settings: Any, *, on_space: bool = False, **uvicorn_options: Any) -> Any:
    """A ``uvicorn.Config`` with the server's limits: header and keep-alive timeouts, a connection
    cap, and forwarded addresses believed only from trusted proxies."""
    import uvicorn
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11(H11Protocol):
        """Drops a connection whose first request's headers have not arrived in time."""

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._header_timer = self.loop.call_later(HEADER_TIMEOUT, self._no_request)

        def _no_request(self) -> None:
            if self.cycle is None and not self.transport.is_closing():
                self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            self._header_timer.cancel()
            super().connection_lost(exc)

    proxies = trusted_proxies(settings, on_space)
    options = {
        "http": GuardedH11,
        "timeout_keep_alive": KEEP_ALIVE_TIMEOUT,
        "limit_concurrency": MAX_CONNECTIONS,
        "proxy_headers": bool(proxies),
        "forwarded_allow_ips": ",".join(proxies) if proxies else "",
        **uvicorn_options,
    }
    return uvicorn.Config(app, **options)
