"""Serve the studio: ``python app.py`` (Hugging Face Spaces runs the same file).

One process, one port, one engine: the Gradio UI is mounted at ``/`` on the FastAPI app
that also carries the HTTP API (``shitu.api``). Settings come from
``SHITU_*`` environment variables (see ``shitu/config.py``); the port from ``$PORT``
(else ``$GRADIO_SERVER_PORT``, else 7860, the port Spaces expects).
"""

from __future__ import annotations

import hmac
import logging
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastapi import FastAPI

    from shitu.engine import Engine

log = logging.getLogger("shitu.app")
DEFAULT_PORT = 7860


def _ui_login(token: str | None) -> dict:
    """With ``SHITU_API_TOKEN`` set, the UI (which can change indices too) asks for it as the password."""
    if not token:
        return {}

    def check(_user: str, password: str) -> bool:
        return hmac.compare_digest(password.encode(), token.encode())

    return {"auth": check, "auth_message": "Sign in with any user name and the SHITU_API_TOKEN as the password."}


def build_app(engine: Engine | None = None, *, prepare_sample: bool = True) -> FastAPI:
    """The FastAPI app with the HTTP API and the Gradio UI at ``/``.

    The sample index is built before anything is served, so Recognize works on first load.
    """
    import gradio as gr

    from shitu.api import create_api
    from shitu.engine import Engine
    from shitu.ui import CSS, I18N, build_demo

    engine = engine or Engine()
    if prepare_sample and engine.ensure_sample_index() is None:
        log.warning("the sample index could not be built; Recognize needs an index from the Build tab")
    app = create_api(engine)
    demo = build_demo(engine)
    login = _ui_login(engine.settings.api_token)
    return gr.mount_gradio_app(app, demo, path="/", i18n=I18N, css=CSS, footer_links=["api"], **login)


def main() -> None:
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    port = int(os.environ.get("PORT") or os.environ.get("GRADIO_SERVER_PORT") or DEFAULT_PORT)
    host = os.environ.get("HOST", "0.0.0.0")
    app = build_app()
    log.info("serving on http://%s:%d", host, port)
    uvicorn.run(app, host=host, port=port)


if __name__ == "__main__":
    main()
