"""Serve the studio: ``python app.py`` (Hugging Face Spaces runs the same file).

One process, one port, one engine: the Gradio UI is mounted at ``/`` on the FastAPI app
that also carries the HTTP API (``shitu.api``). Settings come from ``SHITU_*`` environment
variables (see ``shitu/config.py``); the port from ``$PORT`` (else ``$GRADIO_SERVER_PORT``,
else 7860, the port Spaces expects); the address from ``$HOST`` (default: this machine only,
``127.0.0.1``; on a Hugging Face Space ``0.0.0.0``).

PaddleX runs in a supervised worker process (``SHITU_ISOLATE_MODELS``, on by default): a native
crash on one uploaded image costs that request a clear error, never the server.
"""

from __future__ import annotations

import json
import logging
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastapi import FastAPI

    from shitu.engine import Engine

log = logging.getLogger("shitu.app")
DEFAULT_PORT = 7860


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


def build_app(engine: Engine | None = None, *, prepare_sample: bool = True, host: str | None = None) -> FastAPI:
    """The FastAPI app with the HTTP API and the Gradio UI at ``/``.

    ``host`` is the address the server will listen on: on a public one, index changes need
    ``SHITU_API_TOKEN`` (see :mod:`shitu.access`). The sample index is built before anything is
    served, so Recognize works on first load.
    """
    import gradio as gr

    from shitu.access import AccessPolicy
    from shitu.api import create_api
    from shitu.engine import Engine
    from shitu.ui import CSS, I18N, build_demo

    engine = engine or Engine()
    if prepare_sample and engine.ensure_sample_index() is None:
        log.warning("the sample index could not be built; Recognize needs an index from the Build tab")
    # official weights missing (e.g. a slow hub): fetch them while the starter pack serves, then switch
    if engine.prepare_official_in_background():
        log.info("downloading official weights in the background; the Models tab shows progress")
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


def main() -> None:
    import uvicorn

    from shitu.errors import ShiTuError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    port = int(os.environ.get("PORT") or os.environ.get("GRADIO_SERVER_PORT") or DEFAULT_PORT)
    host = default_host()
    try:
        app = build_app(host=host)
    except ShiTuError as exc:  # a bad setting or config: one line, not a traceback
        raise SystemExit(f"error: {exc.message}") from None
    log.info("serving on http://%s:%d", host, port)
    try:
        uvicorn.run(app, host=host, port=port)
    finally:
        app.state.engine.close()


if __name__ == "__main__":
    main()
