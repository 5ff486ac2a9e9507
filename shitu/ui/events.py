"""What every tab's handlers share: how a plain function over the engine becomes a Gradio event.

A handler is a module-level function whose first argument is the :class:`Engine`. :class:`Wiring`
binds it to one engine (keeping the signature Gradio reads, so the request, the select event and
the progress tracker are still injected), guards the ones that change an index behind the sign-in
(:class:`SessionAccess`), and wires it to the page: a user error (:class:`ShiTuError`) is a toast
plus an inline line and every other output keeps its state (:func:`soft_errors`); a long job
streams a progress bar from its first frame (:func:`live_progress`). Named endpoints for
programmatic callers (``/gradio_api/...``) get the plain handler, so an error stays an error there.

Text that handlers produce follows the request's ``Accept-Language`` (:func:`lang_of`).
"""

from __future__ import annotations

import functools
import html
import inspect
import io
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr
from PIL import Image

from shitu.access import AccessPolicy
from shitu.errors import ShiTuError
from shitu.i18n import TEXT, translated
from shitu.i18n import text as tr

if TYPE_CHECKING:
    from shitu.engine import Engine

I18N = gr.I18n(**TEXT)  # static text, translated in the browser (mount the UI with ``i18n=I18N``)
HIGHLIGHT_ROW = "background-color: #fde68a; font-weight: 600"  # a highlighted row of a table


def lang_of(request: gr.Request | None) -> str:
    """``"zh"`` when the browser prefers Chinese, else ``"en"``."""
    if request is None:
        return "en"
    header = (request.headers.get("accept-language") or "").split(",")[0].strip().lower()
    return "zh" if header.startswith("zh") else "en"


def md_safe(value: Any) -> str:
    """User text (labels, file names) made safe for Markdown. Index names need no escaping
    (letters, digits, ``_.-`` only) and are shown in code spans, where escapes would show."""
    out = str(value)
    for ch in "\\`*_[]<>|#":
        out = out.replace(ch, "\\" + ch)
    return out


def thumbnail_image(data: bytes) -> Image.Image:
    """An entry's stored JPEG thumbnail as an image for a gallery component."""
    return Image.open(io.BytesIO(data))


def index_dropdown(engine: Engine, value: str | None = None, fallback: str | None = None) -> dict[str, Any]:
    """An index picker's choices now, on ``value`` if it exists (else ``fallback``, else the default
    index, else the first)."""
    names = engine.index_names()
    chosen = next((n for n in (value, fallback, engine.settings.default_index) if n and n in names), None)
    return gr.update(choices=names, value=chosen or (names[0] if names else None))


# The index a visitor picked last, kept in their browser (localStorage) across reloads; the value is
# an index name, not a secret: the fixed key lets every server (and a restarted one) read it back.
REMEMBERED_INDEX = {"storage_key": "shitu-studio-index", "secret": "shitu-studio-index"}


def picture_grid(label: str, elem_id: str, *, columns: int = 4, height: int | str = "auto", preview: bool = False,
                 rows: int | None = None) -> gr.Gallery:  # fmt: skip
    """A grid of pictures (thumbnails, examples, evidence) laid out the one way the studio shows them."""
    return gr.Gallery(label=I18N(label), columns=columns, rows=rows, height=height, object_fit="contain",
                      allow_preview=preview, elem_id=elem_id)  # fmt: skip


def remembered_index() -> gr.BrowserState:
    """The component that keeps the picked index in the browser (see :data:`REMEMBERED_INDEX`)."""
    return gr.BrowserState(None, **REMEMBERED_INDEX)


def remember(name: str | None) -> Any:
    """The picked (or just built, imported, renamed) index, to keep in the browser."""
    return name or gr.skip()


# --- errors ------------------------------------------------------------------------------------------
def user_errors(fn: Callable) -> Callable:
    """Show :class:`ShiTuError` as a toast (no stack trace); the engine has changed nothing."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ShiTuError as exc:
            raise gr.Error(exc.message, print_exception=False) from None

    return wrapper


def request_of(signature: inspect.Signature, args: tuple, kwargs: dict) -> Any:
    """The ``request`` argument of a call to a function with ``signature``, if it was given."""
    try:
        return signature.bind_partial(*args, **kwargs).arguments.get("request")
    except TypeError:
        return None


def error_text(lang: str, message: str) -> str:
    """A user error as the toast says it: UI messages are translated; the engine's own details
    are kept as they are, after a translated lead-in."""
    for key, words in TEXT["en"].items():
        if key.startswith("err_") and words == message:
            return tr(lang, key)
    if lang == "en":
        return message
    return translated(lang, message) or f"{tr(lang, 'could_not')}{message}"


def inline_error(lang: str, message: str) -> str:
    """A user error as a red line next to the button that caused it."""
    return f'<div class="shitu-inline-error" role="alert">⚠️ {html.escape(error_text(lang, message))}</div>'


def soft_errors(fn: Callable, n_outputs: int, *, status: int | None = None, on_error: Callable | None = None):
    """Wire ``fn`` so that a user error is a toast (plus an inline message at output ``status``)
    and every other output keeps its last good state: no red "Error" badges over the tab.

    ``on_error(outputs, request)`` may replace some of the outputs (e.g. put a dropdown back).
    Works for plain and generator handlers; Gradio sees ``fn``'s own signature."""
    signature = inspect.signature(fn)

    def fallback(exc: gr.Error, args: tuple, kwargs: dict) -> Any:
        request = request_of(signature, args, kwargs)
        lang = lang_of(request)
        gr.Warning(error_text(lang, str(exc.message)), title=tr(lang, "toast_title"))
        outputs: list[Any] = [gr.skip()] * n_outputs
        if status is not None:
            outputs[status] = inline_error(lang, str(exc.message))
        if on_error is not None:
            outputs = list(on_error(outputs, request))
        return outputs[0] if n_outputs == 1 else tuple(outputs)

    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def streaming(*args: Any, **kwargs: Any) -> Any:
            try:
                yield from fn(*args, **kwargs)
            except gr.Error as exc:
                yield fallback(exc, args, kwargs)

        wrapped = streaming
    else:

        @functools.wraps(fn)
        def plain(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except gr.Error as exc:
                return fallback(exc, args, kwargs)

        wrapped = plain
    wrapped.__signature__ = signature  # type: ignore[attr-defined]
    return wrapped


# --- progress -----------------------------------------------------------------------------------------
def progress_callback(progress: Any) -> Callable[[int, int, str], None] | None:
    """The engine's ``progress(done, total, what)`` fed to a ``gr.Progress`` or a :class:`LiveProgress`."""
    if progress is None:
        return None

    def report(done: int, total: int, what: str) -> None:
        progress((done, total), desc=what)

    return report


class LiveProgress:
    """How far a long job has got, as a bar a person can see from the first second on.

    Callable like ``gr.Progress`` (``progress((done, total), desc=...)``), so the handlers are
    the same for tests and for the browser; :meth:`html` draws it. The time left is only said
    once it means something (see :meth:`seconds_left`). ``clock``: seconds, monotonic (tests
    pass a fake one)."""

    ETA_MIN_SECONDS = 5.0  # embedding must have run this long ...
    ETA_MIN_FRACTION = 0.05  # ... and got this far (and past ETA_MIN_ITEMS images) before an estimate is said
    ETA_MIN_ITEMS = 8
    ETA_WINDOW_S = 30.0  # the rate is measured over this last stretch (the pace changes: warm-up, extra workers)

    def __init__(self, lang: str, stage: str = "starting", clock: Callable[[], float] = time.monotonic):
        self.lang = lang
        self.stage = stage
        self.done = 0
        self.total = 0
        self.clock = clock
        self.started = clock()
        self._marks: list[tuple[float, int]] = []  # (time, done) while embedding, from the first image done

    def __call__(self, value: Any = None, desc: str | None = None, **_: Any) -> None:
        if desc and desc != self.stage:
            self._marks = []
            self.stage = desc
        if isinstance(value, tuple) and len(value) == 2:
            self.done, self.total = int(value[0]), int(value[1])
            if self.stage == "embedding" and self.done > 0:
                now = self.clock()
                self._marks.append((now, self.done))
                while len(self._marks) > 2 and self._marks[1][0] < now - self.ETA_WINDOW_S:
                    self._marks.pop(0)

    def seconds_left(self) -> float | None:
        """The time the embedding still needs, from its recent pace; ``None`` until that means
        something: not before the first images are done (model loading and warm-up would make the
        first estimate many times too long), nor before :data:`ETA_MIN_SECONDS` of embedding, nor
        before :data:`ETA_MIN_FRACTION` of the images, and not once they are all done."""
        if self.stage != "embedding" or not self.total or self.done >= self.total or len(self._marks) < 2:
            return None
        (t0, d0), (t1, d1) = self._marks[0], self._marks[-1]
        first = self._marks[0][1]
        if t1 - t0 < self.ETA_MIN_SECONDS or d1 - first < max(self.ETA_MIN_ITEMS, self.ETA_MIN_FRACTION * self.total):
            return None
        if self.clock() - t0 <= 0 or d1 <= d0:
            return None
        rate = (d1 - d0) / (t1 - t0)
        return max(0.0, (self.total - self.done) / rate - (self.clock() - t1))

    def html(self, finished: bool = False) -> str:
        elapsed = self.clock() - self.started
        lang = self.lang
        if finished:
            return f'<div class="shitu-progress done">✓ {tr(lang, "progress_done", seconds=f"{elapsed:.1f}")}</div>'
        stage = self.stage
        if stage == "embedding" and self.total and self.done >= self.total:
            stage = "saving"
        label = TEXT[lang].get(f"progress_{stage}") or TEXT["en"].get(f"progress_{stage}") or stage
        if self.total:
            fraction = min(1.0, self.done / self.total)
            words = f"{label}: {self.done} / {self.total} · {elapsed:.0f} s"
            left = self.seconds_left()
            if left is not None:
                words += " · " + tr(lang, "progress_eta", seconds=f"{max(1, round(left)):.0f}")
            bar = f'<div class="fill" style="width:{fraction * 100:.1f}%"></div>'
            aria = f'aria-valuemin="0" aria-valuemax="{self.total}" aria-valuenow="{self.done}"'
        else:
            words = f"{label} · {elapsed:.0f} s"
            bar = '<div class="fill indeterminate"></div>'
            aria = ""
        return (
            f'<div class="shitu-progress" role="progressbar" {aria} aria-label="{html.escape(label)}">'
            f'<div class="bar">{bar}</div><div class="text">{html.escape(words)}</div></div>'
        )


def live_progress(fn: Callable, n_outputs: int, position: int, *, every: float = 0.3) -> Callable:
    """Run ``fn`` (a handler with a ``progress`` parameter, returning its ``n_outputs - 1``
    outputs) in a thread and stream a :class:`LiveProgress` bar to output ``position`` while it
    works; the other outputs keep their state until the result arrives."""
    signature = inspect.signature(fn)
    params = [p for name, p in signature.parameters.items() if name != "progress"]

    @functools.wraps(fn)
    def streaming(*args: Any, **kwargs: Any) -> Any:
        tracker = LiveProgress(lang_of(request_of(signature, args, kwargs)))
        box: dict[str, Any] = {}

        def work() -> None:
            try:
                box["result"] = fn(*args, progress=tracker, **kwargs)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the handler's thread
                box["error"] = exc

        def frame(progress_html: str, result: Any = None) -> tuple:
            outputs = list(result) if result is not None else [gr.skip()] * (n_outputs - 1)
            outputs.insert(position, progress_html)
            return tuple(outputs)

        worker = threading.Thread(target=work, name="shitu-ui-job", daemon=True)
        worker.start()
        shown = tracker.html()
        yield frame(shown)
        while worker.is_alive():
            worker.join(every)
            current = tracker.html()
            if current != shown and worker.is_alive():
                shown = current
                yield frame(current)
        if "error" in box:
            raise box["error"]
        result = box["result"]
        yield frame(tracker.html(finished=True), result if isinstance(result, tuple) else (result,))

    streaming.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
    return streaming


def first_outputs(fn: Callable, n: int) -> Callable:
    """``fn`` answering only its first ``n`` outputs (type hints kept for Gradio)."""

    @functools.wraps(fn)
    def first(*args: Any, **kwargs: Any) -> tuple:
        return tuple(fn(*args, **kwargs)[:n])

    return first


# --- files handed to the browser ----------------------------------------------------------------------
class Scratch:
    """Files handed to the browser (a result's JSON, an export, a report): Gradio copies each into
    its own cache as the handler returns, so ours are needed only for a moment.

    They live in one folder of this process under the system temp dir (where Gradio accepts files
    from a handler), one subfolder per file so names never collide; anything older than an hour
    goes whenever a new one is made, and :meth:`clear` removes the folder (the app does at shutdown).
    """

    MAX_AGE_S = 3600

    def __init__(self) -> None:
        self._root: Path | None = None
        self._lock = threading.Lock()

    def file(self, filename: str) -> Path:
        """A fresh path named ``filename`` (the folder it is in exists; the file does not)."""
        with self._lock:
            if self._root is None or not self._root.is_dir():
                self._root = Path(tempfile.mkdtemp(prefix="shitu-ui-"))
            root = self._root
        cutoff = time.time() - self.MAX_AGE_S
        for old in root.iterdir():
            try:
                if old.stat().st_mtime < cutoff:
                    shutil.rmtree(old, ignore_errors=True)
            except FileNotFoundError:  # another request cleared it first
                continue
        folder = root / uuid.uuid4().hex
        folder.mkdir()
        return folder / filename

    @property
    def root(self) -> Path | None:
        """The folder, while it exists."""
        return self._root

    def clear(self) -> None:
        """Remove every scratch file (and the folder)."""
        with self._lock:
            root, self._root = self._root, None
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)


SCRATCH = Scratch()


def scratch_file(filename: str) -> Path:
    """A fresh path for a file handed to the browser (see :class:`Scratch`)."""
    return SCRATCH.file(filename)


# --- who may change indices ---------------------------------------------------------------------------
class SessionAccess:
    """Which browser sessions have signed in (kept on the server, keyed by Gradio's session)."""

    def __init__(self, policy: AccessPolicy):
        self.policy = policy
        self._signed_in: set[str] = set()

    def allowed(self, request: gr.Request | None) -> bool:
        return self.policy.open or (request is not None and request.session_hash in self._signed_in)

    def guard(self, fn: Callable) -> Callable:
        """``fn`` (a bound handler with a ``request`` parameter) refused unless changes are allowed."""
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            request = request_of(signature, args, kwargs)
            if not self.allowed(request):
                try:
                    self.policy.check(None)
                except ShiTuError as exc:
                    raise gr.Error(exc.message, print_exception=False) from None
            return fn(*args, **kwargs)

        guarded.__signature__ = signature  # type: ignore[attr-defined]
        return guarded

    def sign_in(self, password: str, request: gr.Request | None = None) -> str:
        client = request.client.host if request is not None and request.client else "?"
        try:
            self.policy.sign_in(password or "", client)
        except ShiTuError as exc:
            raise gr.Error(exc.message, print_exception=False) from None
        if request is not None:
            self._signed_in.add(request.session_hash)
        return tr(lang_of(request), "signed_in")

    def sign_out(self, request: gr.Request | None = None) -> str:
        if request is not None:
            self._signed_in.discard(request.session_hash)
        return tr(lang_of(request), "signed_out")


# --- wiring ------------------------------------------------------------------------------------------
def bind(fn: Callable, engine: Engine) -> Callable:
    """``fn`` with the engine filled in, keeping the signature and type hints Gradio reads
    (``gr.Request``, ``gr.SelectData``, ``gr.Progress``); ``functools.partial`` would lose them."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def bound(*args: Any, **kwargs: Any) -> Any:
        return fn(engine, *args, **kwargs)

    bound.__signature__ = signature.replace(parameters=list(signature.parameters.values())[1:])  # type: ignore[attr-defined]
    return bound


QUIETLY = {"api_visibility": "private", "show_progress": "hidden"}  # a page event that shows no spinner
PRIVATE = {"api_visibility": "private"}  # a page event: not offered to programmatic callers


class Wiring:
    """How the tabs wire their handlers for one engine and one access policy.

    Nothing here calls the engine: handlers are bound to it and run when their event fires.
    """

    def __init__(self, engine: Engine, access: SessionAccess, remembered: Any = None):
        self.engine = engine
        self.access = access
        self.remembered = remembered  # the browser's picked index (remembered_index()), made inside the page

    def bind(self, fn: Callable) -> Callable:
        """A handler that reads: the engine filled in."""
        return bind(fn, self.engine)

    def change(self, fn: Callable) -> Callable:
        """A handler that changes an index: the engine filled in, and a sign-in may be needed."""
        return self.access.guard(bind(fn, self.engine))

    def soft(self, fn: Callable, outputs: list, status: Any = None, on_error: Callable | None = None) -> Callable:
        """``fn`` for the page: a user error is a toast (and a red line at the ``status`` output)."""
        at = outputs.index(status) if status is not None else None
        return soft_errors(fn, len(outputs), status=at, on_error=on_error)

    def with_progress(self, fn: Callable, outputs: list, bar: Any) -> Callable:
        """A long job: its progress streams to ``bar``, a user error lands there and in a toast."""
        return self.soft(live_progress(fn, len(outputs), outputs.index(bar)), outputs, bar)

    def endpoint(self, name: str, fn: Callable, inputs: Any, outputs: Any, **kwargs: Any) -> None:
        """A named endpoint for programmatic callers (gradio_client, ``/gradio_api/...``): the plain
        handler, so a refusal is an error there, not a toast. The page's own events are private
        and soft; a hidden trigger carries the endpoint."""
        gr.Button(visible=False, elem_classes=["api-only"]).click(fn, inputs, outputs, api_name=name, **kwargs)

    def index_choices(self, current: str | None, remembered: str | None = None) -> dict[str, Any]:
        """An index picker refreshed: on the index this browser picked last (``remembered``), else the
        one it shows (index choices are per visitor)."""
        return index_dropdown(self.engine, remembered, current)

    def remember_choice(self, picker: Any) -> None:
        """Whatever the visitor picks in ``picker`` is remembered by the browser (every tab opens on it)."""
        picker.input(remember, picker, self.remembered, **QUIETLY)

    def remembering(self, fn: Callable, picker: int) -> Callable:
        """``fn`` (whose output ``picker`` is an index picker's update: a build, an import) with one
        more output, that index, for the browser to remember with the rest of the answer (a reload
        right after it has the new index too)."""

        @functools.wraps(fn)
        def remembered(*args: Any, **kwargs: Any) -> tuple:
            out = tuple(fn(*args, **kwargs))
            update = out[picker]
            name = update.get("value") if isinstance(update, dict) else None
            return (*out, name or gr.skip())

        remembered.__signature__ = inspect.signature(fn)  # type: ignore[attr-defined]
        return remembered

    def remembered_after(self, picker: Any) -> dict[str, Any]:
        """The event that remembers ``picker``'s value: after a build, an import, a rename..."""
        return dict(fn=remember, inputs=picker, outputs=self.remembered, **QUIETLY)
