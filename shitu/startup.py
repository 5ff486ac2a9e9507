"""The studio while it starts: one :class:`Readiness`, and a gate in front of every route.

The app (HTTP API + Gradio UI) is built and served at once; the engine prepares its models and the
sample gallery on a thread meanwhile (see ``app.py``). Until :class:`Readiness` says it is ready,
:class:`ReadinessGate` answers for the app: a page (any ``GET`` outside the API) saying what is
being prepared, which reloads itself every ``RETRY_AFTER_S`` seconds; ``/health``, the API, Gradio's
own endpoints and anything else 503 in the API's envelope with ``Retry-After``; websockets are asked
to come back later. A start that failed is said the same way, without the reloads and the
``Retry-After``: there is nothing to wait for.
"""

from __future__ import annotations

import contextlib
import html
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.responses import HTMLResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from shitu.api import error_response

log = logging.getLogger("shitu.app")
RETRY_AFTER_S = 2  # the starting page reloads, and API clients are asked to retry, this often
API_PATHS = ("/shitu-", "/health", "/docs", "/redoc", "/openapi.json", "/gradio_api/")

STARTING_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
{refresh}<title>ShiTu Studio: {title}</title>
<style>
body {{font-family: system-ui, -apple-system, "Segoe UI", "Noto Sans", sans-serif; margin: 0; min-height: 100vh;
  display: flex; align-items: center; justify-content: center; background: #f7f7f8; color: #1f2328}}
main {{max-width: 36rem; padding: 2rem; text-align: center}}
h1 {{font-size: 1.4rem; margin: 0 0 .5rem}}
p {{margin: .4rem 0; line-height: 1.5}}
.step {{font-weight: 600}}
.muted {{color: #59636e; font-size: .9rem}}
.error {{color: #b42318; font-weight: 600; overflow-wrap: anywhere}}
.spinner {{width: 2rem; height: 2rem; margin: 0 auto 1rem; border: .25rem solid #d0d7de; border-top-color: #0969da;
  border-radius: 50%; animation: spin 1s linear infinite}}
@keyframes spin {{to {{transform: rotate(360deg)}}}}
@media (prefers-reduced-motion: reduce) {{.spinner {{animation: none}}}}
@media (prefers-color-scheme: dark) {{body {{background: #0d1117; color: #e6edf3}} .muted {{color: #9198a1}}
  .error {{color: #ff7b72}}}}
</style></head>
<body><main role="status" aria-live="polite">
{body}
</main></body></html>
"""


class Readiness:
    """Whether the studio can serve: the step being prepared until then, or why it could not start.

    Written by the thread that prepares the engine, read by every request. A failure is final: a
    start that failed is not made good by a later step.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self.step = "starting"
        self.error: str | None = None
        self._ready = False

    @property
    def ready(self) -> bool:
        """``True`` once everything is prepared and nothing failed."""
        return self._ready and self.error is None

    @property
    def elapsed(self) -> float:
        """Seconds since the start."""
        return time.monotonic() - self._started

    def set_step(self, step: str) -> None:
        self.step = step

    def set_ready(self) -> None:
        with self._lock:
            self._ready = True

    def fail(self, message: str) -> None:
        with self._lock:
            if self.error is None:
                self.error = message


class ReadinessGate:
    """The app's outermost middleware: every request goes through once :class:`Readiness` is ready,
    and gets a "starting" (or "could not start") answer until then."""

    def __init__(self, app: ASGIApp, readiness: Readiness):
        self.app = app
        self.readiness = readiness

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or self.readiness.ready:
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1013})  # try again later
            return
        await self.answer(scope)(scope, receive, send)

    def answer(self, scope: Scope) -> Response:
        """What a request gets while the studio is starting (or could not start)."""
        readiness = self.readiness
        path, error = scope.get("path", "/"), readiness.error
        if path.startswith(API_PATHS) or scope.get("method") not in ("GET", "HEAD"):
            if error is not None:
                return error_response(503, f"ShiTu Studio could not start: {error}", quiet=True)
            return error_response(
                503, f"ShiTu Studio is starting ({readiness.step}); retry in a few seconds",
                {"Retry-After": str(RETRY_AFTER_S)}, quiet=True,
            )  # fmt: skip
        headers = {"Cache-Control": "no-store"}
        if error is not None:
            body = (
                "<h1>ShiTu Studio could not start</h1>\n"
                f'<p class="error">{html.escape(error)}</p>\n'
                '<p class="muted">The server log says the same. Fix the cause and restart the app.</p>'
            )
            page = STARTING_PAGE.format(refresh="", title="could not start", body=body)
            return HTMLResponse(page, status_code=503, headers=headers)
        body = (
            '<div class="spinner" aria-hidden="true"></div>\n'
            "<h1>ShiTu Studio is starting</h1>\n"
            "<p>Preparing models / sample gallery… 正在准备模型和示例图库…</p>\n"
            f'<p class="step">{html.escape(readiness.step)}</p>\n'
            f'<p class="muted">{readiness.elapsed:.0f} s so far. This page reloads by itself and shows the studio '
            "when it is ready; the first start takes longest (it converts the offline models and builds the sample "
            "gallery).</p>"
        )
        refresh = f'<meta http-equiv="refresh" content="{RETRY_AFTER_S}">\n'
        page = STARTING_PAGE.format(refresh=refresh, title="starting", body=body)
        return HTMLResponse(page, headers={**headers, "Retry-After": str(RETRY_AFTER_S)})


def guard_lifespan(app: Any, readiness: Readiness, *, at_shutdown: Callable[[], None] | None = None) -> None:
    """Wrap ``app``'s lifespan (a Starlette app's; the mounted Gradio UI starts its queue there):
    a start-up that raises becomes a failed start, said on the page, in the API and once in the
    log, instead of a server that exits without a word to the browser. ``at_shutdown`` runs when
    the server stops."""
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[Any]:
        async with contextlib.AsyncExitStack() as stack:
            if at_shutdown is not None:
                stack.callback(at_shutdown)
            try:
                state = await stack.enter_async_context(inner(app))
            except Exception as exc:  # noqa: BLE001 - shown on the page and in the API, said once in the log
                message = f"the app's start-up failed: {type(exc).__name__}: {exc}"
                log.error("could not start: %s", message)
                readiness.fail(message)
                state = None
            yield state

    app.router.lifespan_context = lifespan
