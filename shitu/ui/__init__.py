"""The Gradio studio: Recognize / Build / Manage / Evaluate / Models, one module per tab.

Each tab module holds its handlers (module-level functions whose first argument is the
:class:`~shitu.engine.Engine`, so tests call the same functions directly), its layout and its
wiring; :mod:`shitu.ui.events` holds what they share (user errors as toasts, progress bars,
sign-in, scratch files) and :mod:`shitu.ui.studio` composes the page. User mistakes
(:class:`~shitu.errors.ShiTuError`) become toasts and change nothing; all index state lives in
the engine, the UI only keeps what is on screen.

Static text is translated in the browser with ``gr.I18n`` (:data:`I18N`, passed to
``gr.mount_gradio_app`` with the page's ``CSS`` and ``JS``); text that handlers produce follows the
request's ``Accept-Language``.
"""

from shitu.ui.events import I18N
from shitu.ui.studio import CSS, JS, build_demo

__all__ = ["CSS", "I18N", "JS", "build_demo"]
