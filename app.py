"""Serve the studio: ``python app.py`` (Hugging Face Spaces runs the same file).

One process, one port, one engine: the Gradio UI is mounted at ``/`` on the FastAPI app
that also carries the HTTP API (``shitu.api``). Settings come from ``SHITU_*`` environment
variables (see ``shitu/config.py``); the port from ``$PORT`` (else ``$GRADIO_SERVER_PORT``,
else 7860, the port Spaces expects); the address from ``$HOST`` (default: this machine only,
``127.0.0.1``; on a Hugging Face Space ``0.0.0.0``).

PaddleX runs in a supervised worker process (``SHITU_ISOLATE_MODELS``, on by default): a native
crash on one uploaded image costs that request a clear error, never the server.

``main`` listens at once: while :func:`build_app` prepares the models and the sample gallery (on
a thread), every page shows "ShiTu Studio is starting" with the current step and reloads itself,
and ``/health`` and the API answer 503 with ``Retry-After``; then the same server hands every
request to the real app (see :class:`StartingApp`). The log keeps to lines a person can act on;
``SHITU_ACCESS_LOG=1`` adds one line per request.
"""

from __future__ import annotations

import asyncio
import html
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import FastAPI

    from shitu.engine import Engine

log = logging.getLogger("shitu.app")
DEFAULT_PORT = 7860
GRACEFUL_SHUTDOWN_S = 5  # after a SIGTERM, open connections get this long before they are closed
RETRY_AFTER_S = 2  # the starting page reloads, and API clients are asked to retry, this often


def default_host() -> str:
    return os.environ.get("HOST") or ("0.0.0.0" if os.environ.get("SPACE_ID") else "127.0.0.1")


class EnvelopeForUnknownRoutes:
    """The mounted UI answers unknown paths with ``{"detail": ...}``; outside the UI's own API
    (``/gradio_api/...``), answer 404/405 in the HTTP API's envelope instead."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"].startswith("/gradio_api/"):
            await self.app(scope, receive, send)
            return
        held: dict = {}

        async def capture(message):
            if message["type"] == "http.response.start" and message["status"] in (404, 405):
                headers = dict(message.get("headers") or [])
                if headers.get(b"content-type", b"").startswith(b"application/json"):
                    held["start"] = message
                    return
            if "start" in held and message["type"] == "http.response.body":
                start = held.pop("start")
                try:
                    body = json.loads(message.get("body") or b"{}") if not message.get("more_body") else None
                except ValueError:
                    body = None
                if not isinstance(body, dict) or "detail" not in body or "errorCode" in body:
                    await send(start)  # not the UI's {"detail": ...}: pass it on unchanged
                    await send(message)
                    return
                from shitu.api import error_response

                reason = body.get("detail") or ("not found" if start["status"] == 404 else "method not allowed")
                await error_response(start["status"], f"{scope['path']}: {reason}")(scope, receive, send)
                return
            await send(message)

        await self.app(scope, receive, capture)


def check_cjk_font() -> bool:
    """Look for a CJK font once, at start (not at the first drawing): ``False``, with one WARNING
    that says how to fix it, when Chinese labels would be drawn as boxes."""
    from shitu import render

    said: list[logging.LogRecord] = []

    class Seen(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.WARNING:
                said.append(record)

    seen = Seen()
    logging.getLogger(render.__name__).addHandler(seen)
    try:
        found = render.find_cjk_font()
    finally:
        logging.getLogger(render.__name__).removeHandler(seen)
    if found is None and not said:  # shitu.render did not say it itself
        log.warning(
            "no CJK font found: Chinese labels will show as boxes in drawn images. Install one "
            "(Debian: apt-get install fonts-wqy-microhei) or set SHITU_FONT to a .ttf/.ttc file."
        )
    return found is not None


def build_app(
    engine: Engine | None = None,
    *,
    prepare_sample: bool = True,
    host: str | None = None,
    on_step: Callable[[str], None] | None = None,
) -> FastAPI:
    """The FastAPI app with the HTTP API and the Gradio UI at ``/``.

    ``host`` is the address the server will listen on: on a public one, index changes need
    ``SHITU_API_TOKEN`` (see :mod:`shitu.access`). The sample index is built before anything is
    served, so Recognize works on first load. ``on_step`` hears each step, for a progress display.
    """
    step = on_step or (lambda text: None)
    step("loading the web framework")
    import gradio as gr

    from shitu.access import AccessPolicy
    from shitu.api import create_api
    from shitu.engine import Engine
    from shitu.ui import CSS, I18N, build_demo

    check_cjk_font()
    engine = engine or Engine()
    step("preparing models: official weights if a model hub answers, else the offline starter pack")
    engine.models()  # decides which weights run (and says why in the log); the first start converts the starter pack
    if prepare_sample:
        step("preparing the sample gallery")

        def progress(done: int, total: int, what: str) -> None:
            step(f"preparing the sample gallery: {what} {done}/{total}")

        if engine.ensure_sample_index(progress) is None:
            log.warning("the sample index could not be built; Recognize needs an index from the Build tab")
    step("building the web UI")
    # official weights missing (e.g. a slow hub): fetch them while the starter pack serves, then switch
    # (shitu.background says what happens, once the hub has answered or not)
    engine.prepare_official_in_background()
    policy = AccessPolicy.for_server(engine.settings.api_token, engine.settings.read_only, host)
    log.info("index changes: %s", policy.describe())
    app = create_api(engine, policy)
    demo = build_demo(engine, policy)
    app = gr.mount_gradio_app(
        app, demo, path="/", i18n=I18N, css=CSS, footer_links=["api"],
        max_file_size=engine.settings.max_request_bytes,  # the same limit as the HTTP API's bodies
    )  # fmt: skip
    # Gradio checks that files named in event payloads were uploaded (not any path on the server)
    # only once the app counts as launched, which mounting alone does not do.
    demo.has_launched = True
    app.add_middleware(EnvelopeForUnknownRoutes)
    return app


# --- serving from the first second ---------------------------------------------------------------
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


class StartingApp:
    """The ASGI app :func:`main` serves from its first second, while :func:`build_app` runs.

    Until the real app is there: a page (any ``GET`` outside the API) saying what is being
    prepared, which reloads itself every ``RETRY_AFTER_S`` seconds; ``/health``, the API and
    anything else answer 503 in the API's envelope with ``Retry-After``. :meth:`ready` hands over:
    the real app's lifespan (Gradio's start-up events) runs, and from then on every request goes
    to it, on the same server. :meth:`failed` makes the page and the API say why, with 503.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self.step = "starting"
        self.error: str | None = None
        self.app: Any = None  # the real app, once it serves
        self._built: Any = None  # the real app, before its lifespan has started
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None

    # --- called from the thread that builds the app ----------------------------------------------
    def set_step(self, step: str) -> None:
        self.step = step

    def ready(self, app: Any) -> None:
        with self._lock:
            self._built = app
        self._notify()

    def failed(self, message: str) -> None:
        with self._lock:
            self.error = message
        self._notify()

    def _notify(self) -> None:
        with self._lock:
            loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            loop.call_soon_threadsafe(wake.set)

    def call_in_loop(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the server's event loop (its main thread), once the server runs."""
        with self._lock:
            loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(fn)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._started

    # --- ASGI --------------------------------------------------------------------------------
    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        app = self.app
        if app is None and self._built is not None and self._loop is None:
            app = self.app = self._built  # served without a lifespan (e.g. a bare test client)
        if app is not None:
            await app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1013})  # try again later
            return
        if scope["type"] == "http":
            await self._not_yet(scope)(scope, receive, send)

    def _not_yet(self, scope: dict) -> Any:
        from starlette.responses import HTMLResponse

        path, error = scope.get("path", "/"), self.error
        if path.startswith(API_PATHS) or scope.get("method") not in ("GET", "HEAD"):
            from shitu.api import error_response

            if error is not None:
                return error_response(503, f"ShiTu Studio could not start: {error}", quiet=True)
            return error_response(
                503, f"ShiTu Studio is starting ({self.step}); retry in a few seconds",
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
            f'<p class="step">{html.escape(self.step)}</p>\n'
            f'<p class="muted">{self.elapsed:.0f} s so far. This page reloads by itself and shows the studio when it '
            "is ready; the first start takes longest (it converts the offline models and builds the sample "
            "gallery).</p>"
        )
        refresh = f'<meta http-equiv="refresh" content="{RETRY_AFTER_S}">\n'
        page = STARTING_PAGE.format(refresh=refresh, title="starting", body=body)
        return HTMLResponse(page, headers={**headers, "Retry-After": str(RETRY_AFTER_S)})

    async def _lifespan(self, scope: dict, receive: Callable, send: Callable) -> None:
        """Start at once; run the real app's lifespan when it is ready; stop it at shutdown."""
        await receive()  # lifespan.startup
        wake = asyncio.Event()
        with self._lock:
            self._loop, self._wake = asyncio.get_running_loop(), wake
            if self._built is not None or self.error is not None:
                wake.set()
        await send({"type": "lifespan.startup.complete"})
        shutdown = asyncio.ensure_future(receive())
        woken = asyncio.ensure_future(wake.wait())
        await asyncio.wait({shutdown, woken}, return_when=asyncio.FIRST_COMPLETED)
        inner = None
        if not shutdown.done() and self._built is not None:
            inner = _Lifespan(self._built, scope)
            problem = await inner.startup()
            if problem is None:
                self.app = self._built
            else:
                log.error("could not start: the app's start-up failed: %s", problem)
                self.failed(f"the app's start-up failed: {problem}")
        woken.cancel()
        await shutdown
        if inner is not None:
            await inner.shutdown()
        await send({"type": "lifespan.shutdown.complete"})


class _Lifespan:
    """Runs an ASGI app's lifespan protocol from inside another app's lifespan."""

    def __init__(self, app: Any, scope: dict):
        self.app, self.scope = app, scope
        self.to_app: asyncio.Queue = asyncio.Queue()
        self.from_app: asyncio.Queue = asyncio.Queue()
        self.task: asyncio.Task | None = None

    async def _run(self) -> None:
        try:
            await self.app(self.scope, self.to_app.get, self.from_app.put)
        except BaseException as exc:  # noqa: BLE001 - reported to the waiting side
            await self.from_app.put({"type": "error", "message": f"{type(exc).__name__}: {exc}"})
        else:
            await self.from_app.put({"type": "finished"})  # an app without a lifespan

    async def startup(self) -> str | None:
        """``None`` when the app started; else why not."""
        self.task = asyncio.ensure_future(self._run())
        await self.to_app.put({"type": "lifespan.startup"})
        reply = await self.from_app.get()
        if reply["type"] in ("lifespan.startup.complete", "finished"):
            return None
        lines = [ln for ln in str(reply.get("message") or "").splitlines() if ln.strip()]
        return lines[-1].strip() if lines else "start-up failed"  # Starlette sends the whole traceback

    async def shutdown(self) -> None:
        if self.task is None or self.task.done():
            return
        await self.to_app.put({"type": "lifespan.shutdown"})
        try:
            await asyncio.wait_for(self.from_app.get(), 30)
        except TimeoutError:
            log.warning("the app did not finish its shutdown within 30 s")


def configure_logging() -> None:
    """One format; third-party libraries only when they have something to say."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("faiss.loader", "httpx", "httpcore", "urllib3", "gradio", "matplotlib", "PIL"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("uvicorn.error").addFilter(_quiet_shutdown)


def _quiet_shutdown(record: logging.LogRecord) -> bool:
    """At a SIGTERM, open event streams (a browser tab) are cut after ``GRACEFUL_SHUTDOWN_S``: that
    is the plan, not an error — one line instead of uvicorn's ERROR and a traceback per stream."""
    exc = record.exc_info[1] if record.exc_info else None
    if isinstance(exc, asyncio.CancelledError) or "timeout graceful shutdown" in str(exc or ""):
        return False
    if "timeout graceful shutdown exceeded" in record.getMessage():
        log.info("stopping: closed the connections still open after %d s", GRACEFUL_SHUTDOWN_S)
        return False
    return True


def prepare_in_background(
    starting: StartingApp,
    engine: Engine,
    host: str,
    url: str,
    stopping: threading.Event,
    after_step: Callable[[], None] = lambda: None,
) -> threading.Thread:
    """Build the app on a thread and hand it to ``starting`` (or say why it could not be built).
    ``after_step`` runs after each step and at the end."""

    def step(text: str) -> None:
        after_step()
        starting.set_step(text)

    def run() -> None:
        from shitu.errors import ShiTuError

        try:
            app = build_app(engine, host=host, on_step=step)
        except Exception as exc:  # noqa: BLE001 - shown on the page and in the API, said once in the log
            if stopping.is_set():
                return
            if isinstance(exc, ShiTuError):
                message = exc.message
                log.error("could not start: %s", message)
            else:
                message = f"{type(exc).__name__}: {exc}"
                log.exception("could not start: %s", message)
            starting.failed(message)
            return
        finally:
            after_step()
        starting.ready(app)
        log.info("ready in %.0f s: the studio and the HTTP API at %s", starting.elapsed, url)
        try:
            engine.prepare_models()  # the first query does not wait for the models to load
        except Exception as exc:  # noqa: BLE001 - the first request will say it again, to the person asking
            if not stopping.is_set():
                log.warning("the models could not be loaded yet: %s", getattr(exc, "message", exc))
        after_step()

    thread = threading.Thread(target=run, name="shitu-prepare", daemon=True)
    thread.start()
    return thread


def main() -> None:
    import uvicorn

    from shitu.engine import Engine
    from shitu.errors import ShiTuError

    configure_logging()
    port = int(os.environ.get("PORT") or os.environ.get("GRADIO_SERVER_PORT") or DEFAULT_PORT)
    host = default_host()
    url = f"http://{host}:{port}"
    try:
        engine = Engine()  # reads the settings and the pipeline config: a bad value stops here, in one line
    except ShiTuError as exc:
        raise SystemExit(f"error: {exc.message}") from None
    starting = StartingApp()
    stopping = threading.Event()
    access_log = os.environ.get("SHITU_ACCESS_LOG", "").strip().lower() in ("1", "true", "yes", "on")

    class Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets=sockets)
            restore_signal_handlers()  # a step may have imported Paddle before the loop could be reached
            if self.started and starting.app is None:
                log.info("serving on %s (a 'starting' page until the models and the sample gallery are ready)", url)

        async def shutdown(self, sockets: Any = None) -> None:
            await super().shutdown(sockets=sockets)
            # here, not after run(): after a SIGTERM, uvicorn re-raises it once run() ends, which
            # ends the process before a `finally` could stop the model worker and free its memory
            stopping.set()
            engine.close()

    # an open browser tab (Gradio's event stream) would otherwise hold a SIGTERM off for ever, until
    # the process is killed without closing the model worker
    config = uvicorn.Config(
        starting, host=host, port=port, log_level="warning", lifespan="on",
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )  # fmt: skip
    if access_log:
        logging.getLogger("uvicorn.access").setLevel(logging.INFO)
    server = Server(config)

    def restore_signal_handlers() -> None:
        """Importing Paddle (the starter pack does, on the building thread) installs Paddle's own
        C-level SIGTERM handler over uvicorn's, which would kill the server without closing the
        model worker (and its shared memory); set uvicorn's again. Python still reports uvicorn's
        handler then, so this cannot be conditional. Main thread only."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, server.handle_exit)

    def keep_graceful_shutdown() -> None:
        starting.call_in_loop(restore_signal_handlers)  # on the loop: the main thread

    prepare_in_background(starting, engine, host, url, stopping, after_step=keep_graceful_shutdown)
    try:
        server.run()
    finally:
        stopping.set()
        engine.close()


if __name__ == "__main__":
    main()
