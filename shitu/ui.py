"""The Gradio studio: Recognize / Build index / Manage index / Models & about.

Every handler is a module-level function whose first argument is the :class:`Engine`;
:func:`build_demo` binds them to one engine and wires them to components, so tests call the
same functions directly. User mistakes (:class:`ShiTuError`) become ``gr.Error`` toasts and
change nothing; all index state lives in the engine, the UI only keeps what is on screen.

Static text is translated in the browser with ``gr.I18n`` (:data:`I18N`, passed to
``gr.mount_gradio_app``); text that handlers produce follows the request's
``Accept-Language`` header.
"""

from __future__ import annotations

import functools
import html
import inspect
import io
import itertools
import json
import shutil
import tempfile
import threading
import time
import uuid
import zipfile
from collections import Counter
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd
from PIL import Image

from shitu.access import AccessPolicy
from shitu.config import INDEX_TYPES, METRIC_TYPES, REC_MODELS, WHOLE_IMAGE_MODES
from shitu.engine import SAMPLE_INDEX, ChangeReport, Engine, GalleryIndex
from shitu.errors import ShiTuError
from shitu.gallery import GalleryBatch, SkippedLine, pairs_from_uploads, read_zip_gallery
from shitu.i18n import STARTER_MODELS, TEXT
from shitu.i18n import text as i18n_text
from shitu.ids import parse_ids
from shitu.report import GalleryReport, curve_svg, map_svg
from shitu.results import Recognition, RecognizedObject

MAX_TABLE_ROWS = 500  # rows of one page of the entries table (read from the index a page at a time)
MAX_LABEL_CHOICES = 5000  # labels offered by the filter (more can be typed)
MAX_PREVIEWS = 48  # thumbnails in the preview gallery

I18N = gr.I18n(**TEXT)
CSS = """
#result-table td, #entries-table td { white-space: normal; }
/* the indices table scrolls sideways on a phone instead of wrapping letter by letter */
#models-info table { display: block; overflow-x: auto; width: fit-content; max-width: 100%; border: none;
  padding: 0; }
#models-info th, #models-info td { white-space: nowrap; }
#title h1 { margin-bottom: 0.2em; }
.shitu-banner { padding: 8px 12px; border-radius: 8px; font-size: 0.95em; line-height: 1.4; }
.shitu-banner.banner_starter { background: #fff7e0; border: 1px solid #f0c36d; color: #5c4400; }
.shitu-banner.banner_official { background: #e9f7ef; border: 1px solid #7cc496; color: #1d4d2e; }
.shitu-banner.banner_local { background: #eef2ff; border: 1px solid #a5b4fc; color: #2e3a78; }
#examples .grid-wrap, #evidence .grid-wrap { height: auto !important; max-height: none !important;
  min-height: 0 !important; }
#evidence .caption-label, #examples .caption-label { white-space: normal; overflow: visible;
  text-overflow: clip; line-height: 1.25; max-width: 100%; }
.shitu-progress { margin: 6px 0; }
.shitu-progress .bar { height: 10px; border-radius: 5px; background: #e5e7eb; overflow: hidden; }
.shitu-progress .fill { height: 100%; background: #ea580c; transition: width 0.3s ease; }
.shitu-progress .fill.indeterminate { width: 35%; animation: shitu-slide 1.2s ease-in-out infinite; }
.shitu-progress .text { font-size: 0.95em; margin-top: 4px; }
.shitu-progress.done { color: #15803d; }
@keyframes shitu-slide { from { margin-left: -35%; } to { margin-left: 100%; } }
.shitu-inline-error { color: #b91c1c; background: #fef2f2; border: 1px solid #fecaca; border-radius: 6px;
  padding: 6px 10px; }
@media (max-width: 640px) {
  #query-image, #query-image .image-container { height: 240px !important; max-height: 240px; }
  #result-image, #result-image .image-container { height: auto !important; max-height: 60vh; }
  /* five tabs on a 390 px phone: tight padding so none moves into an overflow menu */
  .tab-container button, [role="tab"] { padding-left: 5px !important; padding-right: 5px !important;
    font-size: 0.92em !important; }
  #title p { font-size: 0.9em; }
}
"""


def lang_of(request: gr.Request | None) -> str:
    """``"zh"`` when the browser prefers Chinese, else ``"en"``."""
    if request is None:
        return "en"
    header = (request.headers.get("accept-language") or "").split(",")[0].strip().lower()
    return "zh" if header.startswith("zh") else "en"


def _t(lang: str, key: str, **values: Any) -> str:
    return i18n_text(lang, key, **values)


def _md(text: Any) -> str:
    """User text (labels, file names) made safe for Markdown. Index names need no escaping
    (letters, digits, ``_.-`` only) and are shown in code spans, where escapes would show."""
    out = str(text)
    for ch in "\\`*_[]<>|#":
        out = out.replace(ch, "\\" + ch)
    return out


def user_errors(fn: Callable) -> Callable:
    """Show :class:`ShiTuError` as a toast (no stack trace); the engine has changed nothing."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ShiTuError as exc:
            raise gr.Error(exc.message, print_exception=False) from None

    return wrapper


def _bind(fn: Callable, engine: Engine) -> Callable:
    """``fn`` with the engine filled in, keeping the signature and type hints Gradio reads
    (``gr.Request``, ``gr.SelectData``, ``gr.Progress``); ``functools.partial`` would lose them."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def bound(*args: Any, **kwargs: Any) -> Any:
        return fn(engine, *args, **kwargs)

    bound.__signature__ = signature.replace(parameters=list(signature.parameters.values())[1:])  # type: ignore[attr-defined]
    return bound


def _progress_callback(progress: Any) -> Callable[[int, int, str], None] | None:
    """The engine's ``progress(done, total, what)`` fed to a ``gr.Progress`` or a :class:`LiveProgress`."""
    if progress is None:
        return None

    def report(done: int, total: int, what: str) -> None:
        progress((done, total), desc=what)

    return report


def _request_of(signature: inspect.Signature, args: tuple, kwargs: dict) -> Any:
    try:
        return signature.bind_partial(*args, **kwargs).arguments.get("request")
    except TypeError:
        return None


def error_text(lang: str, message: str) -> str:
    """A user error as the toast says it: UI messages are translated; the engine's own details
    are kept as they are, after a translated lead-in."""
    for key, text in TEXT["en"].items():
        if key.startswith("err_") and text == message:
            return _t(lang, key)
    return message if lang == "en" else f"{_t(lang, 'could_not')}{message}"


def _inline_error(lang: str, message: str) -> str:
    return f'<div class="shitu-inline-error" role="alert">⚠️ {html.escape(error_text(lang, message))}</div>'


def soft_errors(fn: Callable, n_outputs: int, *, status: int | None = None, on_error: Callable | None = None):
    """Wire ``fn`` so that a user error is a toast (plus an inline message at output ``status``)
    and every other output keeps its last good state: no red "Error" badges over the tab.

    ``on_error(outputs, request)`` may replace some of the outputs (e.g. put a dropdown back).
    Works for plain and generator handlers; Gradio sees ``fn``'s own signature."""
    signature = inspect.signature(fn)

    def fallback(exc: gr.Error, args: tuple, kwargs: dict) -> Any:
        request = _request_of(signature, args, kwargs)
        lang = lang_of(request)
        gr.Warning(error_text(lang, str(exc.message)), title=_t(lang, "toast_title"))
        outputs: list[Any] = [gr.skip()] * n_outputs
        if status is not None:
            outputs[status] = _inline_error(lang, str(exc.message))
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


class LiveProgress:
    """How far a long job has got, as a bar a person can see from the first second on.

    Callable like ``gr.Progress`` (``progress((done, total), desc=...)``), so the handlers are
    the same for tests and for the browser; :meth:`html` draws it."""

    def __init__(self, lang: str, stage: str = "starting"):
        self.lang = lang
        self.stage = stage
        self.done = 0
        self.total = 0
        self.started = time.monotonic()

    def __call__(self, value: Any = None, desc: str | None = None, **_: Any) -> None:
        if isinstance(value, tuple) and len(value) == 2:
            self.done, self.total = int(value[0]), int(value[1])
        if desc:
            self.stage = desc

    def html(self, finished: bool = False) -> str:
        elapsed = time.monotonic() - self.started
        lang = self.lang
        if finished:
            return f'<div class="shitu-progress done">✓ {_t(lang, "progress_done", seconds=f"{elapsed:.1f}")}</div>'
        stage = self.stage
        if stage == "embedding" and self.total and self.done >= self.total:
            stage = "saving"
        label = TEXT[lang].get(f"progress_{stage}") or TEXT["en"].get(f"progress_{stage}") or stage
        if self.total:
            fraction = min(1.0, self.done / self.total)
            text = f"{label}: {self.done} / {self.total} · {elapsed:.0f} s"
            if 0 < self.done < self.total:
                left = elapsed / self.done * (self.total - self.done) if stage == "embedding" else None
                if left is not None:
                    text += " · " + _t(lang, "progress_eta", seconds=f"{left:.0f}")
            bar = f'<div class="fill" style="width:{fraction * 100:.1f}%"></div>'
            aria = f'aria-valuemin="0" aria-valuemax="{self.total}" aria-valuenow="{self.done}"'
        else:
            text = f"{label} · {elapsed:.0f} s"
            bar = '<div class="fill indeterminate"></div>'
            aria = ""
        return (
            f'<div class="shitu-progress" role="progressbar" {aria} aria-label="{html.escape(label)}">'
            f'<div class="bar">{bar}</div><div class="text">{html.escape(text)}</div></div>'
        )


def live_progress(fn: Callable, n_outputs: int, position: int, *, every: float = 0.3) -> Callable:
    """Run ``fn`` (a handler with a ``progress`` parameter, returning its ``n_outputs - 1``
    outputs) in a thread and stream a :class:`LiveProgress` bar to output ``position`` while it
    works; the other outputs keep their state until the result arrives."""
    signature = inspect.signature(fn)
    params = [p for name, p in signature.parameters.items() if name != "progress"]

    @functools.wraps(fn)
    def streaming(*args: Any, **kwargs: Any) -> Any:
        tracker = LiveProgress(lang_of(_request_of(signature, args, kwargs)))
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


_SCRATCH: Path | None = None


def _scratch_file(filename: str) -> Path:
    """A fresh path for a file handed to the browser (Gradio copies it into its cache);
    files older than an hour are cleared away."""
    global _SCRATCH
    if _SCRATCH is None:
        _SCRATCH = Path(tempfile.mkdtemp(prefix="shitu-ui-"))
    cutoff = time.time() - 3600
    for old in _SCRATCH.iterdir():
        if old.stat().st_mtime < cutoff:
            shutil.rmtree(old, ignore_errors=True)
    folder = _SCRATCH / uuid.uuid4().hex
    folder.mkdir()
    return folder / filename


def _index_dropdown(engine: Engine, value: str | None = None) -> dict[str, Any]:
    names = engine.index_names()
    wanted = value or engine.settings.default_index
    return gr.update(choices=names, value=wanted if wanted in names else (names[0] if names else None))


# --- Recognize ------------------------------------------------------------------------------
MAX_EVIDENCE_PER_BOX = 3  # gallery photos shown next to each box's own crop
EVIDENCE_SIDE = 256
HIGHLIGHT_ROW = "background-color: #fde68a; font-weight: 600"
UNKNOWN_ROW = "color: #6b7280"


def threshold_for_index(engine: Engine, name: str | None) -> dict[str, Any]:
    """The recognition-threshold slider follows the chosen index: its own calibrated (or picked)
    threshold, else the model's default."""
    try:
        return gr.update(value=engine.rec_threshold_for(engine.index(name)))
    except ShiTuError:
        return gr.update()


@user_errors
def recognize_image(
    engine: Engine,
    image: Any,
    index_name: str | None = None,
    det_threshold: float | None = None,
    rec_threshold: float | None = None,
    topk: int | None = None,
    whole_image: str | None = None,
    use_nms: bool = True,
    nms_iou: float = 0.5,
    request: gr.Request | None = None,
) -> tuple[Image.Image, pd.DataFrame, str, str, list, dict]:
    """Recognise one image: (drawn image, table of boxes, summary markdown, JSON file path,
    evidence gallery, state for the highlight handlers)."""
    if image is None:
        raise ShiTuError(TEXT["en"]["err_no_image"])
    lang = lang_of(request)
    result = engine.recognize(
        image,
        index=index_name or None,
        bgr=False,
        det_threshold=None if det_threshold is None else float(det_threshold),
        rec_threshold=None if rec_threshold is None else float(rec_threshold),
        rec_topk=None if topk is None else int(topk),
        whole_image=whole_image or None,
        nms_iou=float(nms_iou) if use_nms else None,
    )
    path = _scratch_file("shitu_result.json")
    path.write_text(json.dumps(result.to_dict(), ensure_ascii=False, indent=2), encoding="utf-8")
    items, owners = evidence(engine, result, lang)
    state = {"result": result, "owners": owners, "lang": lang}
    return (
        result.render(lang=lang),
        result_table(result, lang),
        timings_markdown(result, lang),
        str(path),
        items,
        state,
    )


def near_miss(obj: RecognizedObject, threshold: float | None, lang: str) -> str:
    """``maybe 农夫山泉 0.840 < 0.85`` for an unknown box with a best candidate, else ``""``."""
    if obj.recognized or obj.candidate is None:
        return ""
    label, score, _ = obj.candidate
    below = f" < {threshold:.2f}" if threshold is not None else ""
    return _t(lang, "maybe", label=label, score=f"{score:.3f}") + below


def answer_text(obj: RecognizedObject, threshold: float | None, lang: str) -> str:
    if obj.recognized:
        return str(obj.label)
    miss = near_miss(obj, threshold, lang)
    return _t(lang, "unknown") + (f" — {miss}" if miss else "")


def result_table(result: Recognition, lang: str = "en") -> pd.DataFrame:
    """One row per box: the answer (or ``unknown`` with its near miss), its score and the top-k
    candidates with those under the threshold marked (entry ids are in the evidence captions and
    the JSON). The detector's own class names stay in the JSON: they are not answers."""
    threshold = result.rec_threshold
    rows = []
    for n, obj in enumerate(result.objects, start=1):
        candidates = obj.candidates or ([obj.candidate] if obj.candidate else [])
        marked = [
            f"{label} {score:.3f} " + ("✓" if threshold is None or score >= threshold else "✗")
            for label, score, _ in candidates
        ]
        rows.append(
            {
                _t(lang, "col_box"): n,
                _t(lang, "col_answer"): answer_text(obj, threshold, lang),
                _t(lang, "col_score"): f"{obj.score:.3f}" if obj.recognized else "—",
                _t(lang, "col_candidates"): "; ".join(marked) or "—",
            }
        )
    columns = [_t(lang, k) for k in ("col_box", "col_answer", "col_score", "col_candidates")]
    return pd.DataFrame(rows, columns=columns)


def styled_result_table(result: Recognition, lang: str, highlight: int | None = None):
    """:func:`result_table` with unknown rows greyed and the highlighted box's row marked."""
    table = result_table(result, lang)

    def style(row: pd.Series) -> list[str]:
        n = int(row.name)
        css = HIGHLIGHT_ROW if n == highlight else (UNKNOWN_ROW if not result.objects[n].recognized else "")
        return [css] * len(row)

    return table.style.apply(style, axis=1)


def _crop(image: Any, bbox: tuple[float, float, float, float]) -> Image.Image:
    """The box's part of an RGB array, a little wider, at most EVIDENCE_SIDE pixels."""
    picture = Image.fromarray(image) if not isinstance(image, Image.Image) else image
    x1, y1, x2, y2 = (float(v) for v in bbox)
    pad_x, pad_y = (x2 - x1) * 0.04, (y2 - y1) * 0.04
    left, top = max(0, int(x1 - pad_x)), max(0, int(y1 - pad_y))
    right, bottom = min(picture.width, int(x2 + pad_x) + 1), min(picture.height, int(y2 + pad_y) + 1)
    crop = picture.crop((left, top, max(right, left + 1), max(bottom, top + 1))).convert("RGB")
    crop.thumbnail((EVIDENCE_SIDE, EVIDENCE_SIDE), Image.Resampling.LANCZOS)
    return crop


def evidence(engine: Engine, result: Recognition, lang: str = "en") -> tuple[list[tuple[Image.Image, str]], list[int]]:
    """For every box, its own crop and the gallery photos it matched best (label, score and
    entry id in the caption; those under the threshold marked), so a person can judge the
    answer. Also returns, per item, the box it belongs to."""
    if not result.objects:
        return [], []
    try:
        index = engine.index(result.index_name)
    except ShiTuError:
        return [], []
    threshold = result.rec_threshold
    items: list[tuple[Image.Image, str]] = []
    owners: list[int] = []
    shown = [(obj.candidates or ([obj.candidate] if obj.candidate else []))[:MAX_EVIDENCE_PER_BOX]
             for obj in result.objects]  # fmt: skip
    # one read for all of them; entries removed since have no thumbnail here
    thumbs = index.thumbnails({id_ for candidates in shown for _, _, id_ in candidates})
    for n, (obj, candidates) in enumerate(zip(result.objects, shown)):
        items.append((_crop(result.image, obj.bbox), _t(lang, "ev_query", n=n + 1)))
        owners.append(n)
        for label, score, id_ in candidates:
            if not thumbs.get(id_) or index.labels_of([id_])[0] is None:
                continue
            mark = "✓" if threshold is None or score >= threshold else "✗"
            caption = f"{n + 1}: {label} {score:.3f} {mark} #{id_}"
            items.append((thumbnail_image(thumbs[id_]), caption))
            owners.append(n)
    return items, owners


def _box_at(result: Recognition, x: float, y: float) -> int | None:
    """The smallest box that contains the point (where a person clicked), if any."""
    inside = [
        ((o.bbox[2] - o.bbox[0]) * (o.bbox[3] - o.bbox[1]), n)
        for n, o in enumerate(result.objects)
        if o.bbox[0] <= x <= o.bbox[2] and o.bbox[1] <= y <= o.bbox[3]
    ]
    return min(inside)[1] if inside else None


def highlight(state: dict | None, box: int | None):
    """(drawn image, styled table) with box ``box`` (0-based) emphasised, or unchanged."""
    if not state or box is None or not (0 <= box < len(state["result"].objects)):
        return gr.skip(), gr.skip()
    result, lang = state["result"], state["lang"]
    return result.render(lang=lang, highlight=box), styled_result_table(result, lang, box)


def select_row(state: dict | None, evt: gr.SelectData):
    """A click on a row of the result table highlights its box on the image."""
    return highlight(state, evt.index[0] if isinstance(evt.index, (list, tuple)) else None)


def select_on_image(state: dict | None, evt: gr.SelectData):
    """A click on the result image highlights the box under it and its row."""
    if not state or not isinstance(evt.index, (list, tuple)) or len(evt.index) != 2:
        return gr.skip(), gr.skip()
    return highlight(state, _box_at(state["result"], float(evt.index[0]), float(evt.index[1])))


def select_evidence(state: dict | None, evt: gr.SelectData):
    """A click on an evidence photo highlights the box it belongs to."""
    owners = (state or {}).get("owners") or []
    i = evt.index if isinstance(evt.index, int) else None
    return highlight(state, owners[i] if i is not None and 0 <= i < len(owners) else None)


def timings_markdown(result: Recognition, lang: str = "en") -> str:
    stages = " · ".join(
        f"{TEXT[lang].get('stage_' + stage, stage)} {seconds * 1000:.0f} ms"
        for stage, seconds in result.timings.items()
    )
    total = sum(result.timings.values()) * 1000
    found = _t(
        lang,
        "found",
        boxes=len(result.objects),
        recognised=sum(o.recognized for o in result.objects),
        index=result.index_name,
    )
    threshold = (
        f" · {_t(lang, 'threshold_used', threshold=f'{result.rec_threshold:.2f}')}" if result.rec_threshold else ""
    )
    return f"{found}{threshold}  \n{_t(lang, 'score_meaning')}  \n{stages} · **{_t(lang, 'total')} {total:.0f} ms**"


def examples_for(engine: Engine, name: str | None, limit: int = 8) -> list[tuple[Any, str]]:
    """Example queries that belong to the index being searched: the sample gallery's own query
    photos, or for any other index a few of its gallery photos, one per label, spread over its
    labels."""
    if not name:
        return []
    if name == SAMPLE_INDEX:
        queries = sorted(engine.sample_queries(), key=lambda p: "two_objects" not in p.name)  # the richest first
        return [(str(p), p.stem.removeprefix("query_").replace("_", " ")) for p in queries[:limit]]
    try:
        index = engine.index(name)
    except ShiTuError:
        return []
    firsts = index.one_per_label()
    step = max(1, len(firsts) // (3 * limit))  # spread over the labels; a few spare for entries without a thumbnail
    picks = firsts[::step][: 3 * limit].tolist()
    thumbs = index.thumbnails(picks)
    picks = [i for i in picks if i in thumbs]
    picks = picks[:: max(1, len(picks) // limit)][:limit]
    return [(thumbnail_image(thumbs[i]), f"{index.label(i)} · #{i}") for i in picks]


def show_examples(engine: Engine, name: str | None):
    """The example gallery for the chosen index."""
    return examples_for(engine, name)


def pick_example(evt: gr.SelectData):
    """The clicked example becomes the query image."""
    value = evt.value or {}
    image = value.get("image") if isinstance(value, dict) else None
    path = image.get("path") if isinstance(image, dict) else None
    return path or gr.skip()


# --- Build index ----------------------------------------------------------------------------
def _paths(files: Any) -> list[Path]:
    if files is None:
        return []
    if isinstance(files, (str, Path)):
        files = [files]
    return [Path(getattr(f, "name", f)) for f in files if f]


def gallery_from_uploads(files: Any, label_file: Any = None, folder_labels: bool = False) -> GalleryBatch:
    """Uploaded images + label file, or one .zip (with or without a label file), as a batch.

    A ``.txt`` among the images is taken as the label file when none is given separately.
    Browsers upload files without their folders, so two files with one name are refused. A
    .zip without a label file takes its folder names as labels, numbered folders only when
    ``folder_labels`` confirms it.
    """
    paths = _paths(files)
    label_path = _paths(label_file)[0] if _paths(label_file) else None
    if label_path is None:
        texts = [p for p in paths if p.suffix.lower() == ".txt"]
        if len(texts) == 1:
            label_path = texts[0]
    paths = [p for p in paths if p != label_path]
    if not paths:
        raise ShiTuError(TEXT["en"]["err_no_gallery"])
    label_bytes = _read_upload(label_path) if label_path else None
    zips = [p for p in paths if p.suffix.lower() == ".zip"]
    if zips:
        if len(paths) > 1:
            raise ShiTuError("upload either one .zip or image files, not both")
        batch = read_zip_gallery(str(zips[0]), label_bytes, folder_labels=bool(folder_labels))
    else:
        if label_bytes is None:
            raise ShiTuError("the label file is missing: upload gallery.txt (one `path label` per line)")
        repeated = sorted(name for name, count in Counter(p.name for p in paths).items() if count > 1)
        if repeated:
            raise ShiTuError(
                f"{len(repeated)} file name(s) were uploaded more than once ({', '.join(repeated[:5])}); uploads lose "
                "their folders, so upload the gallery as one .zip instead"
            )
        batch = pairs_from_uploads([(p.name, p) for p in paths], label_bytes)
    if not batch.items:
        reasons = "; ".join(str(s) for s in batch.skipped[:5])
        raise ShiTuError("no image/label pairs could be used" + (f": {reasons}" if reasons else ""))
    return batch


def expect_gallery(engine: Engine, files: Any) -> None:
    """On a gallery upload: count its images (a .zip's from its directory) so the engine can start
    the gallery workers while the user fills in the rest; says nothing, changes nothing."""
    images = 0
    for path in _paths(files):
        if path.suffix.lower() == ".zip":
            try:
                with zipfile.ZipFile(path) as zf:
                    images += sum(not info.is_dir() for info in zf.infolist())
            except (OSError, zipfile.BadZipFile):
                continue  # the build says what is wrong with it
        elif path.suffix.lower() != ".txt":
            images += 1
    if images:
        engine.expect_gallery(images)


def _read_upload(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ShiTuError(f"cannot read the uploaded file {path.name}: {exc.strerror}") from exc


def change_summary(engine: Engine, report: ChangeReport, lang: str = "en", *, built: bool) -> str:
    """Markdown: what a build or add did, with every skipped line and its reason."""
    stats = report.summary
    head = _t(lang, "built" if built else "added", name=report.index, added=len(report.added_ids))
    lines = [
        head,
        _t(lang, "index_stats", **{k: stats.get(k) for k in ("entries", "labels", "index_type", "metric_type")}),
    ]
    counts = engine.index(report.index).label_counts()
    shown = ", ".join(f"{_md(label)} ({n})" for label, n in sorted(counts.items())[:40])
    lines.append(_t(lang, "labels_line", labels=shown + (" …" if len(counts) > 40 else "")))
    if report.skipped:
        lines.append(_t(lang, "skipped", n=len(report.skipped)))
        in_order = sorted(report.skipped, key=lambda s: (s.line_no is None, s.line_no or 0))
        lines.append("\n".join(_skipped_item(s) for s in in_order[:200]))
    else:
        lines.append(_t(lang, "no_skipped"))
    lines.append(calibration_markdown(engine.index(report.index), lang))
    if built:
        lines.append(_t(lang, "try_it"))
    return "\n\n".join(lines)


def calibration_markdown(index: GalleryIndex, lang: str = "en") -> str:
    """Whether the features were adapted to the gallery, what the index's threshold promises, and
    whether its approximate search can be trusted."""
    lines = []
    if index.search_shortfall:
        lines.append(_t(lang, "search_shortfall", index_type=index.index_type,
                        agreement=index.search_params["agreement"]))  # fmt: skip
    if index.adaptation is not None:
        key = "adaptation_on" if index.adaptation.applied else "adaptation_off"
        lines.append(_t(lang, key, reason=_md(index.adaptation.reason)))
    c = index.calibration_summary()
    if c is None:
        lines.append(_t(lang, "no_calibration"))
        return "\n\n".join(lines)
    chosen = _t(lang, "chosen_user" if c["chosen_by"] == "user" else "chosen_default")
    lines.append(
        _t(lang, "calibration_line", threshold=c["threshold"], chosen=chosen, accepted=c["correct_accepted"],
           top1=c["top1"], rejected=c["unknown_rejected"], queries=c["known_queries"],
           protocol=TEXT[lang].get(f"protocol_{c['protocol']}", c["protocol"]))
    )  # fmt: skip
    if c["changes_since"]:
        lines.append(_t(lang, "calibration_stale", n=c["changes_since"]))
    return "\n\n".join(lines)


def _skipped_item(skipped: SkippedLine) -> str:
    plain = skipped.source.replace("`", "'")
    source = f"`{plain}`" if plain else ""
    where = f"line {skipped.line_no} {source}" if skipped.line_no is not None else source
    return f"- {where.strip()}: {_md(skipped.reason)}"


@user_errors
def build_index(
    engine: Engine,
    files: Any,
    label_file: Any,
    name: str,
    index_type: str = "Flat",
    metric_type: str = "IP",
    skip_invalid: bool = True,
    overwrite: bool = False,
    adapt: str = "auto",
    folder_labels: bool = False,
    request: gr.Request | None = None,
    progress: gr.Progress = gr.Progress(),
) -> tuple[str, dict, dict]:
    """Build a named index from uploads and make it active; returns (summary markdown,
    Recognize index dropdown, Manage index dropdown)."""
    batch = gallery_from_uploads(files, label_file, folder_labels)
    report = engine.build(
        name,
        batch,
        index_type=index_type,
        metric_type=metric_type,
        overwrite=bool(overwrite),
        skip_invalid=bool(skip_invalid),
        progress=_progress_callback(progress),
        adapt=adapt or "auto",
    )
    summary = change_summary(engine, report, lang_of(request), built=True)
    return summary, _index_dropdown(engine, report.index), _index_dropdown(engine, report.index)


# --- Teach: a box of a result goes into the gallery --------------------------------------------
def _best_label(obj: RecognizedObject) -> str:
    if obj.labels:
        return obj.labels[0]
    return obj.candidates[0][0] if obj.candidates else ""


def _result_objects(state: dict | None) -> list[RecognizedObject]:
    result = (state or {}).get("result")
    return result.objects if result is not None else []


def teach_choices(state: dict | None):
    """After a recognition: the boxes to pick from (the first selected) and its best label."""
    objects = _result_objects(state)
    if not objects:
        return gr.update(choices=[], value=None), gr.update(value="")
    boxes = gr.update(choices=[str(n + 1) for n in range(len(objects))], value="1")
    return boxes, gr.update(value=_best_label(objects[0]))


def teach_label_for(state: dict | None, box: str | None):
    """The label field follows the picked box (its answer, or its near miss)."""
    objects = _result_objects(state)
    try:
        return gr.update(value=_best_label(objects[int(box) - 1]))
    except (TypeError, ValueError, IndexError):
        return gr.skip()


@user_errors
def teach_box(
    engine: Engine, state: dict | None, box: str | None, label: str, request: gr.Request | None = None
) -> tuple[str, Any]:
    """Add the picked box of the last result to the index it was searched in: (status markdown,
    the Recognize threshold slider, which follows the index's recalibrated threshold)."""
    if not state or not state.get("result") or not box:
        raise ShiTuError(TEXT["en"]["err_no_result"])
    result = state["result"]
    try:
        obj = result.objects[int(box) - 1]
    except (ValueError, IndexError):
        raise ShiTuError(TEXT["en"]["err_no_result"]) from None
    report = engine.teach(result.index_name, result.image, obj.bbox, label)
    lang = lang_of(request)
    head = _t(lang, "taught", box=box, index=report.index, id=report.added_ids[0], label=_md(label.strip()))
    index = engine.index(result.index_name)
    return head + "\n\n" + calibration_markdown(index, lang), threshold_for_index(engine, result.index_name)


# --- Evaluate ---------------------------------------------------------------------------------------
def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.1%}"


def _threshold_slider(index: GalleryIndex, value: float | None = None) -> dict[str, Any]:
    c = index.calibration
    if c is None:
        return gr.update(interactive=False)
    lo, hi = c.points[0].threshold, c.points[-1].threshold
    chosen = c.threshold if value is None else float(value)
    # cosine similarity: the whole 0..1 range (and below 0 where the curve goes there)
    return gr.update(minimum=round(min(0.0, lo, chosen), 3), maximum=round(max(1.0, hi, chosen), 3),
                     value=round(chosen, 4), step=0.001, interactive=True)  # fmt: skip


def operating_point(engine: Engine, name: str | None, threshold: float | None, request: gr.Request | None = None):
    """The curve with ``threshold`` marked, and what that threshold would do: (curve html, markdown)."""
    lang = lang_of(request)
    if not name:
        return gr.skip(), ""
    index = engine.index(name)
    c = index.calibration
    if c is None or threshold is None:
        return curve_svg(c, lang=lang), _t(lang, "no_calibration")
    p = c.at(float(threshold))
    line = _t(lang, "point_line", threshold=float(threshold), accepted=p.correct_accepted, wrong=p.wrong_accepted,
              rejected=p.unknown_rejected)  # fmt: skip
    return curve_svg(c, float(threshold), lang=lang), line


def _examples(report: GalleryReport) -> list[tuple[Image.Image, str]]:
    """Thumbnails of the worst confusions and suspected mislabels, each entry next to what it matched."""
    items: list[tuple[Image.Image, str]] = []

    def add(id_: int, caption: str) -> None:
        data = report.thumbnails.get(id_)
        if data:
            items.append((thumbnail_image(data), caption))

    for pair in report.confused_pairs[:4]:
        for ex in pair.examples_a[:1]:
            add(ex.id, f"#{ex.id} {pair.label_a}")
            add(ex.matched_id, f"→ #{ex.matched_id} {pair.label_b} {ex.similarity:.3f}")
    for sus in report.mislabelled[:4]:
        add(sus.id, f"#{sus.id} {sus.label} (?)")
        add(sus.nearest_id, f"→ #{sus.nearest_id} {sus.suggested_label} {sus.similarity:.3f}")
    return items


def _report_tables(report: GalleryReport, lang: str) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    worst = sorted(report.per_label, key=lambda r: (r.recall_at_1 is None, r.recall_at_1 or 0.0, -r.images))
    labels = pd.DataFrame(
        [(r.label, r.images, _pct(r.recall_at_1), _pct(r.recall_at_5), r.confused_with or "") for r in worst[:500]],
        columns=[_t(lang, k) for k in ("col_label", "col_images", "col_recall1", "col_recall5", "col_confused")],
    )
    pairs = pd.DataFrame(
        [(p.label_a, p.label_b, p.errors, " ".join(f"#{e.id}" for e in p.examples_a + p.examples_b))
         for p in report.confused_pairs[:200]],
        columns=[_t(lang, k) for k in ("col_pair_a", "col_pair_b", "col_errors", "col_id")],
    )  # fmt: skip
    rows = [(s.id, s.label, _t(lang, "issue_mislabelled"), s.suggested_label, round(s.similarity, 3))
            for s in report.mislabelled[:200]]  # fmt: skip
    for d in report.duplicates[:200]:
        issue = _t(lang, "issue_conflicting" if d.conflicting else "issue_redundant")
        rows.append((d.id_a, d.label_a, issue, f"#{d.id_b} {d.label_b}", round(d.similarity, 3)))
    for f in report.few_images[:200]:
        rows.append((f.ids[0] if f.ids else "", f.label, _t(lang, "issue_few"), "", ""))
    flagged = pd.DataFrame(
        rows,
        columns=[_t(lang, k) for k in ("col_id", "col_label", "col_issue", "col_suggested", "col_similarity")],
    )
    return labels, pairs, flagged


def _report_files(report: GalleryReport, name: str, lang: str) -> list[str]:
    html_path = _scratch_file(f"{name}_report.html")
    html_path.write_text(report.to_html(lang), encoding="utf-8")
    paths = [str(html_path)]
    for kind in ("labels", "entries", "pairs"):
        path = html_path.parent / f"{name}_{kind}.csv"
        path.write_text(report.to_csv(kind), encoding="utf-8-sig")  # the BOM lets spreadsheets read Chinese
        paths.append(str(path))
    return paths


@user_errors
def evaluate_index(engine: Engine, name: str | None, request: gr.Request | None = None,
                   progress: gr.Progress = gr.Progress()):  # fmt: skip
    """The gallery report of ``name``: (summary, calibration, curve, threshold slider, point, map,
    per-label table, confused pairs, flagged entries, examples, downloads)."""
    if not name:
        raise ShiTuError(TEXT["en"]["err_pick_index"])
    lang = lang_of(request)
    report = engine.report(name, progress=_progress_callback(progress))
    index = engine.index(name)
    summary = _t(
        lang, "eval_summary", name=_md(name), entries=report.entries, labels=report.labels,
        r1=_pct(report.recall_at_1), r5=_pct(report.recall_at_5), evaluated=report.evaluated,
        sampled=_t(lang, "eval_sampled") if report.sampled else "", mislabelled=report.mislabelled_count,
        conflicting=report.duplicate_counts.get("conflicting", 0),
        redundant=report.duplicate_counts.get("redundant", 0), few=len(report.few_images), seconds=report.seconds,
    )  # fmt: skip
    a = index.adaptation
    if a is not None and a.applied and a.adapted_recall is not None:  # leave-one-out is optimistic in a fitted space
        summary += "\n\n" + _t(lang, "eval_fitted", heldout=a.adapted_recall, raw=a.raw_recall)
    c = index.calibration
    curve, point = operating_point(engine, name, c.threshold if c else None, request)
    labels, pairs, flagged = _report_tables(report, lang)
    return (summary, calibration_markdown(index, lang), curve, _threshold_slider(index), point,
            map_svg(report, lang=lang), labels, pairs, flagged, _examples(report),
            _report_files(report, name, lang))  # fmt: skip


@user_errors
def use_threshold(
    engine: Engine, name: str | None, threshold: float | None, searched: str | None = None,
    request: gr.Request | None = None,
):  # fmt: skip
    """Make the tried threshold the index's own: (status, calibration markdown, Recognize slider, curve)."""
    if not name:
        raise ShiTuError(TEXT["en"]["err_pick_index"])
    if threshold is None:
        raise ShiTuError(TEXT["en"]["no_calibration"])
    index = engine.set_threshold(name, float(threshold))
    lang = lang_of(request)
    return (_t(lang, "threshold_set", threshold=float(threshold)), calibration_markdown(index, lang),
            # the Recognize tab's slider follows when it searches this index
            gr.update(value=index.suggested_rec_threshold) if searched == name else gr.skip(),
            curve_svg(index.calibration, lang=lang))  # fmt: skip


@user_errors
def recalibrate_index(engine: Engine, name: str | None, adapt: str | None = None,
                      request: gr.Request | None = None, progress: gr.Progress = gr.Progress()):  # fmt: skip
    """Refit the projection and remeasure the curve: (calibration markdown, curve, slider, point)."""
    if not name:
        raise ShiTuError(TEXT["en"]["err_pick_index"])
    index = engine.calibrate(name, adapt=adapt or None, progress=_progress_callback(progress))
    lang = lang_of(request)
    c = index.calibration
    curve, point = operating_point(engine, name, c.threshold if c else None, request)
    return calibration_markdown(index, lang), curve, _threshold_slider(index), point


# --- Versions ---------------------------------------------------------------------------------------
def versions_table(engine: Engine, name: str | None, request: gr.Request | None = None) -> pd.DataFrame:
    """Every kept version of the index, newest first."""
    lang = lang_of(request)
    columns = [_t(lang, k) for k in ("col_version", "col_time", "col_action", "col_entries", "col_labels",
                                     "col_current")]  # fmt: skip
    if not name:
        return pd.DataFrame(columns=columns)
    rows = [
        (v["version"], (v.get("time") or "")[:19].replace("T", " "), v.get("action") or "", v.get("entries"),
         v.get("labels"), "✓" if v.get("current") else "")
        for v in engine.versions(name)
    ]  # fmt: skip
    return pd.DataFrame(rows, columns=columns)


def pick_version(table: pd.DataFrame, evt: gr.SelectData):
    """A click on a row of the versions table picks that version."""
    row = evt.index[0] if isinstance(evt.index, (list, tuple)) else None
    if row is None or table is None or row >= len(table):
        return gr.skip()
    return int(table.iloc[row, 0])


def _version_number(version: Any) -> int:
    try:
        number = int(version)
    except (TypeError, ValueError):
        raise ShiTuError(TEXT["en"]["err_no_version"]) from None
    if number < 1:
        raise ShiTuError(TEXT["en"]["err_no_version"])
    return number


@user_errors
def show_version_changes(engine: Engine, name: str | None, version: Any, request: gr.Request | None = None) -> str:
    """What version ``version`` changed, against the one before it (markdown)."""
    c = engine.version_changes(name, _version_number(version), limit=50)
    lang = lang_of(request)
    lines = [
        _t(lang, "changes_head", version=c.get("version", version), action=_md(c.get("action") or "?"),
           time=(c.get("time") or "")[:19].replace("T", " "), against=c.get("against", "?"),
           added=c["added_count"], removed=c["removed_count"], relabelled=c["relabelled_count"])
    ]  # fmt: skip
    lines += [f"- \\+ #{e['id']} {_md(e['label'])}" for e in c["added"][:20]]
    lines += [f"- − #{e['id']} {_md(e['label'])}" for e in c["removed"][:20]]
    lines += [f"- ~ #{e['id']} {_md(e['from'])} → {_md(e['to'])}" for e in c["relabelled"][:20]]
    return "\n".join(lines)


@user_errors
def restore_version(engine: Engine, name: str | None, version: Any, request: gr.Request | None = None):
    """Make an earlier version current (as a new version): (status, versions table)."""
    report = engine.restore(name, _version_number(version))
    s = report.summary
    status = _t(lang_of(request), "restored", old=s["restored_from"], new=s["version"], entries=s["entries"],
                labels=s["labels"])  # fmt: skip
    return status, versions_table(engine, name, request)


# --- Manage index ---------------------------------------------------------------------------
def entries_table(
    engine: Engine, name: str | None, labels: list[str] | None = None, lang: str = "en", page: Any = 1
) -> pd.DataFrame:
    """One page (:data:`MAX_TABLE_ROWS` rows, in id order) of an index's entries, optionally only
    some labels; only that page is read. ``table.attrs["matching"]``: rows matching in all."""
    index = engine.index(name)
    start = (_page_number(page) - 1) * MAX_TABLE_ROWS
    matching, rows = index.page(start, MAX_TABLE_ROWS, labels=labels or None, thumbnails=False)
    if not rows and start and matching:  # past the end (the index shrank): the last page
        start = (matching - 1) // MAX_TABLE_ROWS * MAX_TABLE_ROWS
        matching, rows = index.page(start, MAX_TABLE_ROWS, labels=labels or None, thumbnails=False)
    columns = [_t(lang, "col_id"), _t(lang, "col_label"), _t(lang, "col_source")]
    table = pd.DataFrame([(e.id, e.label, e.source) for e in rows], columns=columns)
    table.attrs.update(matching=matching, first=start + 1, page=start // MAX_TABLE_ROWS + 1)
    return table


def _page_number(page: Any) -> int:
    try:
        return max(1, int(float(page or 1)))
    except (TypeError, ValueError):
        return 1


def styled_entries(table: pd.DataFrame, selected: list[int]):
    """The entries table with the selected rows highlighted (all of them, not just the last click)."""
    chosen = set(selected)

    def style(row: pd.Series) -> list[str]:
        return [HIGHLIGHT_ROW if int(row.iloc[0]) in chosen else ""] * len(row)

    return table.style.apply(style, axis=1) if chosen else table


def thumbnail_image(data: bytes) -> Image.Image:
    """An entry's stored JPEG thumbnail as an image for a gallery component."""
    return Image.open(io.BytesIO(data))


def previews(engine: Engine, name: str | None, ids: list[int]) -> list[tuple[Image.Image, str]]:
    """Thumbnails with ``#id label`` captions (entries without a stored thumbnail are left out)."""
    index = engine.index(name)
    wanted = [i for i in ids if i in index][: 4 * MAX_PREVIEWS]
    thumbs = index.thumbnails(wanted)  # one read for the page, not one per entry
    return [(thumbnail_image(thumbs[i]), f"#{i} {index.label(i)}") for i in wanted if i in thumbs][:MAX_PREVIEWS]


def index_info(engine: Engine, name: str | None, lang: str = "en", table: pd.DataFrame | None = None) -> str:
    index = engine.index(name)
    stats = index.summary()
    text = _t(
        lang,
        "info",
        name=name or engine.settings.default_index,
        entries=stats["entries"],
        labels=stats["labels"],
        index_type=stats["index_type"],
        metric_type=stats["metric_type"],
        dim=stats["dim"],
        model=stats["feature_model"] or "?",
    )
    matching = table.attrs.get("matching", 0) if table is not None else 0
    if matching > len(table):
        first = table.attrs["first"]
        text += "  \n" + _t(lang, "page_rows", first=first, last=first + len(table) - 1, shown=matching,
                            page=table.attrs["page"], pages=-(-matching // MAX_TABLE_ROWS))  # fmt: skip
    elif table is not None and len(table) < stats["entries"]:
        text += "  \n" + _t(lang, "showing", shown=len(table), total=stats["entries"])
    if not engine.compatible(index):
        text += "  \n" + _t(lang, "incompatible")
    return text


def _label_choices(engine: Engine, name: str | None) -> dict[str, Any]:
    counts = engine.index(name).label_counts()
    shown = sorted(counts.items())[:MAX_LABEL_CHOICES]
    return gr.update(choices=[(f"{label} ({n})", label) for label, n in shown], value=[])


def _view(
    engine: Engine, name: str | None, labels: list[str] | None, selected: str | None, lang: str, page: Any = 1
):
    """(info markdown, entries table (page ``page``) with the selection highlighted, previews)
    for the Manage tab."""
    table = entries_table(engine, name, labels, lang, page)
    chosen = parse_ids(selected or "", allow_empty=True)
    ids = chosen or [int(i) for i in table.iloc[:, 0].tolist()]  # the id column
    return index_info(engine, name, lang, table), styled_entries(table, chosen), previews(engine, name, ids)


@user_errors
def open_index(engine: Engine, name: str | None, request: gr.Request | None = None):
    """Make ``name`` the active index and show it: (info, table, label filter, previews, selected ids)."""
    lang = lang_of(request)
    if not name:  # e.g. the last index was just deleted
        empty = pd.DataFrame(columns=[_t(lang, "col_id"), _t(lang, "col_label"), _t(lang, "col_source")])
        return _t(lang, "no_indices"), empty, gr.update(choices=[], value=[]), [], ""
    engine.index(name)  # must exist
    info, table, thumbs = _view(engine, name, None, None, lang)
    return info, table, _label_choices(engine, name), thumbs, ""


@user_errors
def filter_entries(
    engine: Engine,
    name: str | None,
    labels: list[str] | None,
    selected: str | None = None,
    request: gr.Request | None = None,
):
    """Re-show the entries table for some labels: (info, table, previews)."""
    return _view(engine, name, labels, selected, lang_of(request))


@user_errors
def show_page(
    engine: Engine,
    name: str | None,
    labels: list[str] | None,
    selected: str | None,
    page: Any,
    step: int = 0,
    request: gr.Request | None = None,
):
    """Page ``page + step`` of the entries table (clamped to the pages there are): (info, table,
    previews, the page number shown)."""
    if not name:
        return gr.skip(), gr.skip(), gr.skip(), 1
    lang = lang_of(request)
    info, table, thumbs = _view(engine, name, labels, selected, lang, _page_number(page) + int(step))
    shown = table.data.attrs["page"] if hasattr(table, "data") else table.attrs["page"]
    return info, table, thumbs, shown


def page_before(engine: Engine, name: str | None, labels: list[str] | None, selected: str | None, page: Any,
                  request: gr.Request | None = None):  # fmt: skip
    return show_page(engine, name, labels, selected, page, -1, request)


def page_after(engine: Engine, name: str | None, labels: list[str] | None, selected: str | None, page: Any,
              request: gr.Request | None = None):  # fmt: skip
    return show_page(engine, name, labels, selected, page, 1, request)


@user_errors
def pick_label(
    engine: Engine,
    name: str | None,
    labels: list[str] | None,
    selected: str | None,
    evt: gr.SelectData,
    request: gr.Request | None = None,
):
    """A label picked from, typed into or taken out of the filter: (info, table, previews). The
    event says which (the dropdown may send its value from before the change)."""
    wanted = [lb for lb in (labels or []) if lb != evt.value]
    if evt.selected:
        wanted.append(str(evt.value))
    return _view(engine, name, wanted, selected, lang_of(request))


@user_errors
def clear_selection(engine: Engine, name: str | None, labels: list[str] | None, request: gr.Request | None = None):
    """Forget the selected rows: (selected ids, info, table, previews)."""
    return "", *_view(engine, name, labels, None, lang_of(request))


@user_errors
def toggle_selection(
    engine: Engine, name: str | None, selected: str | None, labels: list[str] | None, evt: gr.SelectData,
    page: Any = 1,
):  # fmt: skip
    """A click on a table row adds its id to the selection, or takes it out: (ids text, previews,
    table with every selected row highlighted). With nothing selected, the previews show the
    rows in the table again."""
    row = evt.row_value or []
    if not row:
        return selected or "", gr.skip(), gr.skip()
    clicked = int(row[0])
    ids = parse_ids(selected or "", allow_empty=True)
    ids = [i for i in ids if i != clicked] if clicked in ids else [*ids, clicked]
    table = entries_table(engine, name, labels, page=page)
    shown = ids or [int(i) for i in table.iloc[:, 0].tolist()]
    return format_ids(ids), previews(engine, name, shown), styled_entries(table, ids)


def format_ids(ids: list[int]) -> str:
    """``1, 2, 3, 7`` as ``1-3, 7``: runs of three or more become ranges (parse_ids reads both)."""
    parts: list[str] = []
    # consecutive ids share ``id - position``: one group per run
    for _, group in itertools.groupby(enumerate(sorted(set(ids))), key=lambda pair: pair[1] - pair[0]):
        run = [id_ for _, id_ in group]
        parts.append(f"{run[0]}-{run[-1]}" if len(run) >= 3 else ", ".join(map(str, run)))
    return ", ".join(parts)


@user_errors
def show_selection(
    engine: Engine, name: str | None, selected: str | None, labels: list[str] | None, request: gr.Request | None = None
):
    """Typed ids (lists and ranges such as ``192-197``) are selected as clicks would: (info,
    table with them highlighted, previews)."""
    if not name:
        return gr.skip(), gr.skip(), gr.skip()
    return _view(engine, name, labels, selected, lang_of(request))


@user_errors
def remove_entries(
    engine: Engine,
    name: str | None,
    selected: str | None,
    labels: list[str] | None = None,
    request: gr.Request | None = None,
):
    """Remove the selected ids: (status, info, table, previews, selected ids cleared)."""
    ids = parse_ids(selected or "", allow_empty=True)
    if not ids:
        raise ShiTuError(TEXT["en"]["err_select_first"])
    engine.remove(name, ids)
    lang = lang_of(request)
    info, table, thumbs = _view(engine, name, labels, None, lang)
    status = _t(lang, "removed", n=len(ids), name=name, ids=", ".join(map(str, ids)))
    return status, info, table, thumbs, ""


@user_errors
def add_entries(
    engine: Engine,
    name: str | None,
    files: Any,
    label_file: Any,
    skip_invalid: bool = True,
    folder_labels: bool = False,
    request: gr.Request | None = None,
    progress: gr.Progress = gr.Progress(),
):
    """Append uploads to an index: (summary, info, table, label filter, previews)."""
    batch = gallery_from_uploads(files, label_file, folder_labels)
    report = engine.add(name, batch, skip_invalid=bool(skip_invalid), progress=_progress_callback(progress))
    lang = lang_of(request)
    info, table, thumbs = _view(engine, name, None, None, lang)
    return change_summary(engine, report, lang, built=False), info, table, _label_choices(engine, name), thumbs


@user_errors
def relabel_entries(
    engine: Engine,
    name: str | None,
    selected: str | None,
    new_label: str,
    labels: list[str] | None = None,
    request: gr.Request | None = None,
):
    """Give the selected ids a new label: (status, info, table, label filter, previews, selected ids)."""
    ids = parse_ids(selected or "", allow_empty=True)
    if not ids:
        raise ShiTuError(TEXT["en"]["err_select_first"])
    label = (new_label or "").strip()
    if not label:
        raise ShiTuError(TEXT["en"]["err_no_label"])
    engine.relabel(name, ids, label)
    lang = lang_of(request)
    info, table, thumbs = _view(engine, name, None, selected, lang)
    status = _t(lang, "relabelled", n=len(ids), label=_md(label), ids=format_ids(ids))
    return status, info, table, _label_choices(engine, name), thumbs, selected


@user_errors
def rename_index(engine: Engine, name: str | None, new_name: str, request: gr.Request | None = None):
    """Rename an index: (status, Manage dropdown, Recognize dropdown)."""
    if not name:
        raise ShiTuError("no index is selected")
    new = (new_name or "").strip()
    engine.rename(name, new)
    status = _t(lang_of(request), "renamed", old=name, new=new)
    return status, _index_dropdown(engine, new), _index_dropdown(engine, new)


@user_errors
def delete_index(engine: Engine, name: str | None, confirm: bool, request: gr.Request | None = None):
    """Delete an index once confirmed: (status, Manage dropdown, Recognize dropdown, confirm box reset)."""
    if not name:
        raise ShiTuError("no index is selected")
    if not confirm:
        raise ShiTuError(TEXT["en"]["err_confirm_delete"])
    engine.delete(name)
    status = _t(lang_of(request), "deleted", name=name)
    return status, _index_dropdown(engine), _index_dropdown(engine), False


@user_errors
def export_index(engine: Engine, name: str | None, request: gr.Request | None = None):
    """Write the index as a .zip: (status, download button with the file)."""
    if not name:
        raise ShiTuError("no index is selected")
    data = engine.export_zip(name)
    path = _scratch_file(f"{name}.zip")
    path.write_bytes(data)
    return _t(lang_of(request), "exported", name=name), gr.update(value=str(path), visible=True)


@user_errors
def import_index(engine: Engine, file: Any, name: str, overwrite: bool = False, request: gr.Request | None = None):
    """Import an index .zip under ``name`` (default: the file's name): (status, dropdowns)."""
    paths = _paths(file)
    if not paths:
        raise ShiTuError("no .zip was uploaded")
    name = (name or "").strip() or paths[0].stem
    index = engine.import_zip(name, _read_upload(paths[0]), overwrite=bool(overwrite))
    stats = index.summary()
    status = _t(lang_of(request), "imported", name=name, entries=stats["entries"], labels=stats["labels"])
    return status, _index_dropdown(engine, name), _index_dropdown(engine, name)


# --- Models & about ---------------------------------------------------------------------------
def _version(*dists: str) -> str:
    for dist in dists:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "not installed"


def _device(engine: Engine, lang: str = "en") -> str:
    configured = engine.models().get("device") or "auto"
    try:
        import paddle

        return _t(lang, "device_line", device=paddle.device.get_device(), setting=configured)
    except Exception:  # noqa: BLE001 - the page must render even if paddle cannot say
        return str(configured)


def _model_line(info: dict[str, Any], lang: str) -> str:
    """What runs one stage, in words: the starter pack's converted models by what they are."""
    source = str(info.get("source"))
    known = STARTER_MODELS.get(str(info.get("model_dir") or ""), {})
    what = known.get(lang) or known.get("en")
    name = f"`{info.get('model_name')}`"
    if source == "starter" and what:
        return _t(lang, "starter_model", name=name, what=what)
    where = f" (`{info['model_dir']}`)" if info.get("model_dir") and source != "official" else ""
    return f"{name}{where}, {TEXT[lang].get('source_' + source, source)}"


def models_banner(engine: Engine, request: gr.Request | None = None) -> str:
    """One line at the top: which models answer, and what that means for accuracy."""
    lang = lang_of(request)
    models = engine.models()
    sources = {str((models.get(stage) or {}).get("source")) for stage in ("detection", "recognition")}
    if "starter" in sources:
        key = "banner_starter"
    elif sources == {"official"}:
        key = "banner_official"
    else:
        key = "banner_local"
    rec = (models.get("recognition") or {}).get("model_name")
    return f'<div class="shitu-banner {key}">{_t(lang, key, model=html.escape(str(rec)))}</div>'


@user_errors
def models_markdown(engine: Engine, request: gr.Request | None = None) -> str:
    """Which models run and why, the device, library versions and every index's statistics."""
    lang = lang_of(request)
    models = engine.models()
    lines = [_t(lang, "models_header")]
    for stage in ("detection", "recognition"):
        info = models.get(stage) or {}
        reason = _md(info.get("reason", ""))
        if lang != "en" and reason:
            reason = f"{_t(lang, 'details_en')}{reason}"
        lines.append(f"- **{_t(lang, 'stage_' + stage)}**: {_model_line(info, lang)}  \n  {reason}")
    versions = {
        "paddlex": _version("paddlex"),
        "paddlepaddle": _version("paddlepaddle", "paddlepaddle-gpu"),
        "faiss": _version("faiss-cpu", "faiss-gpu", "faiss"),
        "gradio": _version("gradio"),
    }
    lines.append(f"- **{_t(lang, 'device')}**: {_device(engine, lang)}")
    lines.append(f"- **{_t(lang, 'vector_store')}**: {_t(lang, 'store_' + engine.vector_store)}")
    lines.append(f"- **{_t(lang, 'versions')}**: " + " · ".join(f"{k} {v}" for k, v in versions.items()))
    lines.append(_t(lang, "indices_header"))
    lines.extend(_download_lines(engine.model_download_status(), lang))
    names = engine.index_names()
    if not names:
        lines.append(_t(lang, "no_indices"))
    else:
        lines.append(_t(lang, "indices_table") + "\n|---|---|---|---|---|---|---|---|")
        for name in names:
            try:
                index = engine.index(name)
            except ShiTuError as exc:
                lines.append(f"| {_md(name)} | — | — | — | — | — | {_md(exc.message)} | |")
                continue
            s = index.summary()
            ok = _t(lang, "usable") if engine.compatible(index) else "⚠️ " + _t(lang, "rebuild")
            active = " ★" if name == engine.settings.default_index else ""
            lines.append(
                f"| {_md(name)}{active} | {s['entries']} | {s['labels']} | {s['index_type']} | "
                f"{s['metric_type']} | {s['dim']} | `{s['feature_model']}` | {ok} |"
            )
    return "\n".join(lines)


def recognition_models_table(engine: Engine) -> str:
    """Size, accuracy and speed of the three official recognisers (PaddleX's published figures)."""
    rows = [
        "| model | size | AliProducts recall@1 | GPU (T4) | CPU (8 threads) |",
        "|---|---|---|---|---|",
    ]
    for m in engine.recognition_models():
        size = f"{m['size_mb'] / 1000:.2f} GB" if m["size_mb"] >= 1000 else f"{m['size_mb']:.0f} MB"
        name = f"**{m['name']}** ✓" if m["active"] else m["name"]
        rows.append(f"| {name} | {size} | {m['recall_at_1']:.1f} % | {m['gpu_ms']:.0f} ms | {m['cpu_ms']:.0f} ms |")
    return "\n".join(rows) + "\n\nPaddleX's published figures; offline, the starter pack stands in for them."


def _download_lines(status: dict[str, Any], lang: str) -> list[str]:
    """The background download of official weights, as the Models tab shows it."""
    state = status.get("state")
    if not state or state in ("idle", "nothing to do"):
        return []
    lines = [_t(lang, "downloads_header")]
    for name, model in (status.get("models") or {}).items():
        done, total = model.get("done") or 0, model.get("total") or 0
        if model.get("state") == "downloading":
            size = f"{done / 1e6:.0f} / {total / 1e6:.0f} MB" if total else f"{done / 1e6:.0f} MB"
            lines.append(f"- ⏳ `{name}`: {size} — " + _t(lang, "starter_meanwhile"))
        else:
            reason = f" — {_md(model['reason'])}" if model.get("reason") else ""
            lines.append(f"- `{name}`: {_md(model.get('state', ''))}{reason}")
    if state == "switched":
        lines.append(_t(lang, "now_official"))
        stale = [name for name, same in (status.get("indices") or {}).items() if not same]
        if stale:
            lines.append(_t(lang, "reembed", names=", ".join(f"`{n}`" for n in stale)))
    elif state == "failed":
        lines.append(_t(lang, "official_failed", reason=_md(status.get("reason") or "")))
    return lines


def refresh_models(engine: Engine, request: gr.Request | None = None):
    """Timer tick while a download runs: (models markdown, timer on/off, banner)."""
    running = bool(engine.model_download_status().get("running"))
    return models_markdown(engine, request), gr.Timer(active=running), models_banner(engine, request)


@user_errors
def switch_model(engine: Engine, model_name: str, request: gr.Request | None = None):
    """Switch the recognition model: (models markdown, recognition threshold slider, banner)."""
    if model_name not in REC_MODELS:
        raise ShiTuError(f"unknown recognition model {model_name!r}")
    engine.switch_recognition_model(model_name)
    return (
        models_markdown(engine, request),
        gr.update(value=engine.default_rec_threshold),
        models_banner(engine, request),
    )


def active_rec_model(engine: Engine) -> str:
    """The recognition model that really runs (what the model dropdown must show)."""
    return str(engine.models()["recognition"]["model_name"])


# --- layout ---------------------------------------------------------------------------------
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
            request = _request_of(signature, args, kwargs)
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
        return _t(lang_of(request), "signed_in")

    def sign_out(self, request: gr.Request | None = None) -> str:
        if request is not None:
            self._signed_in.discard(request.session_hash)
        return _t(lang_of(request), "signed_out")


def build_demo(engine: Engine, policy: AccessPolicy | None = None) -> gr.Blocks:
    """The four-tab studio over ``engine``. Mount it with ``i18n=I18N, css=CSS`` (see app.py).

    ``policy`` decides who may change indices (default: open, as on a private laptop)."""
    access = SessionAccess(policy or AccessPolicy(token=None, restricted=False))

    def bind(fn: Callable) -> Callable:
        return _bind(fn, engine)

    def change(fn: Callable) -> Callable:  # a handler that changes something: sign-in may be needed
        return access.guard(_bind(fn, engine))

    def soft(fn: Callable, outputs: list, status: Any = None, on_error: Callable | None = None) -> Callable:
        return soft_errors(fn, len(outputs), status=outputs.index(status) if status is not None else None,
                           on_error=on_error)  # fmt: skip

    def endpoint(name: str, fn: Callable, inputs: Any, outputs: Any, **kwargs: Any) -> None:
        """A named endpoint for programmatic callers (gradio_client, ``/gradio_api/...``): the plain
        handler, so a refusal is an error there, not a toast. The page's own events are private
        and soft; a hidden trigger carries the endpoint."""
        gr.Button(visible=False, elem_classes=["api-only"]).click(fn, inputs, outputs, api_name=name, **kwargs)

    def with_progress(fn: Callable, outputs: list, bar: Any) -> Callable:
        """A long job: its progress streams to ``bar``, a user error lands there and in a toast."""
        return soft(live_progress(fn, len(outputs), outputs.index(bar)), outputs, bar)

    config = engine.config
    names = engine.index_names()
    default = engine.settings.default_index
    active = default if default in names else (names[0] if names else None)

    with gr.Blocks(title="ShiTu Studio", analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        with gr.Row(elem_id="header"):
            gr.Markdown(I18N("title"), elem_id="title")
        banner = gr.HTML(elem_id="models-banner")
        if access.policy.restricted and not access.policy.token:
            gr.Markdown(I18N("read_only_notice"), elem_id="read-only-notice")
        elif access.policy.restricted:
            with gr.Accordion(I18N("sign_in_section"), open=False, elem_id="sign-in"):
                with gr.Row():
                    password = gr.Textbox(label=I18N("access_token"), type="password", max_lines=1, scale=3)
                    sign_in_btn = gr.Button(I18N("sign_in_btn"), scale=1)
                    sign_out_btn = gr.Button(I18N("sign_out_btn"), scale=1)
                sign_in_status = gr.Markdown(elem_id="sign-in-status")
            endpoint("sign_in", access.sign_in, password, sign_in_status)  # first: it keeps the plain name
            sign_in_btn.click(
                soft(access.sign_in, [sign_in_status]), password, sign_in_status, api_visibility="private"
            )
            password.submit(soft(access.sign_in, [sign_in_status]), password, sign_in_status, api_visibility="private")
            sign_out_btn.click(access.sign_out, None, sign_in_status, api_name="sign_out")
        with gr.Tabs(elem_id="tabs"):
            # ---------------------------------------------------------------- Recognize
            with gr.Tab(I18N("tab_recognize"), id="recognize") as tab_recognize:
                with gr.Row(equal_height=False):
                    with gr.Column(scale=1, min_width=300):
                        query = gr.Image(
                            label=I18N("query_image"),
                            sources=["upload", "webcam", "clipboard"],
                            type="numpy",
                            height=320,
                            elem_id="query-image",
                        )
                        with gr.Row():
                            rec_index = gr.Dropdown(
                                names, value=active, label=I18N("index_to_search"), elem_id="rec-index", scale=3
                            )
                            recognize_btn = gr.Button(
                                I18N("recognize_btn"), variant="primary", scale=2, elem_id="recognize-btn"
                            )
                        rec_status = gr.HTML(elem_id="rec-status")
                        examples = gr.Gallery(
                            examples_for(engine, active),
                            label=I18N("examples"),
                            columns=4,
                            rows=1,
                            height="auto",
                            object_fit="contain",
                            allow_preview=False,
                            elem_id="examples",
                        )
                        with gr.Accordion(I18N("options"), open=False):
                            rec_threshold = gr.Slider(
                                0.0,
                                1.0,
                                value=threshold_for_index(engine, active).get("value", engine.default_rec_threshold),
                                step=0.01,
                                label=I18N("rec_threshold"),
                                info=I18N("rec_threshold_info"),
                                elem_id="rec-threshold",
                            )
                            topk = gr.Slider(1, 10, value=config.rec_topk, step=1, label=I18N("topk"))
                            det_threshold = gr.Slider(
                                0.05,
                                0.95,
                                value=engine.default_det_threshold,
                                step=0.01,
                                label=I18N("det_threshold"),
                                info=I18N("det_threshold_info"),
                            )
                            whole_image = gr.Radio(
                                list(WHOLE_IMAGE_MODES),
                                value=config.whole_image,
                                label=I18N("whole_image"),
                                info=I18N("whole_image_info"),
                            )
                            use_nms = gr.Checkbox(value=config.nms_iou is not None, label=I18N("use_nms"))
                            nms_iou = gr.Slider(
                                0.05, 0.95, value=config.nms_iou or 0.5, step=0.05, label=I18N("nms_iou")
                            )
                    with gr.Column(scale=1, min_width=300):
                        rec_hint = gr.Markdown(I18N("results_hint"), elem_id="results-hint")
                        with gr.Column(visible=False, elem_id="results") as results_box:
                            result_image = gr.Image(
                                label=I18N("result_image"),
                                show_label=False,
                                type="pil",
                                format="jpeg",
                                interactive=False,
                                buttons=[],  # nothing over the drawn captions; the JSON and a long press remain
                                height=440,
                                elem_id="result-image",
                            )
                            timings = gr.Markdown(elem_id="timings")
                            evidence_gallery = gr.Gallery(
                                label=I18N("evidence"),
                                columns=4,
                                height="auto",
                                object_fit="contain",
                                allow_preview=False,
                                elem_id="evidence",
                            )
                            result_table_df = gr.Dataframe(
                                label=I18N("result_table"), interactive=False, wrap=True, elem_id="result-table"
                            )
                            with gr.Accordion(I18N("teach_section"), open=False, elem_id="teach"):
                                with gr.Row():
                                    teach_pick = gr.Dropdown(
                                        [], label=I18N("teach_box"), scale=1, min_width=80, elem_id="teach-box"
                                    )
                                    teach_label = gr.Textbox(
                                        label=I18N("teach_label"), max_lines=1, scale=3, elem_id="teach-label"
                                    )
                                teach_btn = gr.Button(I18N("teach_btn"), variant="primary", elem_id="teach-btn")
                                teach_status = gr.Markdown(elem_id="teach-status")
                            result_json = gr.File(label=I18N("result_json"), interactive=False, height=60)
                rec_state = gr.State()
            # ---------------------------------------------------------------- Build index
            with gr.Tab(I18N("tab_build"), id="build"):
                gr.Markdown(I18N("build_help"))
                with gr.Row():
                    build_files = gr.File(
                        label=I18N("gallery_files"),
                        file_count="multiple",
                        file_types=["image", ".zip", ".txt"],
                        height=200,
                        elem_id="build-files",
                    )
                    build_labels = gr.File(
                        label=I18N("label_file"),
                        file_count="single",
                        file_types=[".txt"],
                        height=200,
                        elem_id="build-labels",
                    )
                with gr.Row():
                    build_name = gr.Textbox(
                        label=I18N("index_name"), value="my_gallery", max_lines=1, elem_id="build-name"
                    )
                    build_type = gr.Radio(list(INDEX_TYPES), value="Flat", label=I18N("index_type"))
                    build_metric = gr.Radio(list(METRIC_TYPES), value="IP", label=I18N("metric_type"))
                with gr.Row():
                    build_skip = gr.Checkbox(value=True, label=I18N("skip_invalid"))
                    build_overwrite = gr.Checkbox(value=False, label=I18N("overwrite"))
                    build_folders = gr.Checkbox(value=False, label=I18N("folder_labels"))
                build_adapt = gr.Radio(
                    ["auto", "on", "off"], value="auto", label=I18N("adapt"), info=I18N("adapt_info"),
                    elem_id="build-adapt",
                )  # fmt: skip
                build_btn = gr.Button(I18N("build_btn"), variant="primary", elem_id="build-btn")
                build_progress = gr.HTML(elem_id="build-progress")
                build_summary = gr.Markdown(elem_id="build-summary")
            # ---------------------------------------------------------------- Manage index
            with gr.Tab(I18N("tab_manage"), id="manage") as tab_manage:
                with gr.Row():
                    manage_index = gr.Dropdown(
                        names, value=active, label=I18N("active_index"), scale=3, elem_id="manage-index"
                    )
                    label_filter = gr.Dropdown([], multiselect=True, label=I18N("filter_labels"), scale=3,
                                               allow_custom_value=True, elem_id="label-filter")  # fmt: skip
                    refresh_btn = gr.Button(I18N("refresh"), scale=1)
                info = gr.Markdown(elem_id="manage-info")
                with gr.Row():
                    with gr.Column(scale=3):
                        entries = gr.Dataframe(
                            label=I18N("entries"), interactive=False, max_height=420, elem_id="entries-table"
                        )
                        with gr.Row(elem_id="entries-pager"):  # three across, a phone's width too
                            pager = {"scale": 1, "min_width": 90}
                            prev_btn = gr.Button(I18N("prev_page"), size="sm", elem_id="prev-page", **pager)
                            page_no = gr.Number(1, precision=0, minimum=1, label=I18N("page"), elem_id="page-no",
                                                **pager)  # fmt: skip
                            next_btn = gr.Button(I18N("next_page"), size="sm", elem_id="next-page", **pager)
                    with gr.Column(scale=2):
                        thumbs = gr.Gallery(
                            label=I18N("previews"),
                            columns=4,
                            height=420,
                            object_fit="contain",
                            allow_preview=True,
                            elem_id="previews",
                        )
                with gr.Row():
                    selected = gr.Textbox(label=I18N("selected_ids"), max_lines=1, scale=4, elem_id="selected-ids")
                    remove_btn = gr.Button(I18N("remove_btn"), variant="stop", scale=1, elem_id="remove-btn")
                    clear_btn = gr.Button(I18N("clear_btn"), scale=1)
                with gr.Row():
                    new_label = gr.Textbox(label=I18N("new_label"), max_lines=1, scale=4, elem_id="new-label")
                    relabel_btn = gr.Button(I18N("relabel_btn"), scale=2, elem_id="relabel-btn")
                manage_progress = gr.HTML(elem_id="manage-progress")
                manage_status = gr.Markdown(elem_id="manage-status")
                with gr.Accordion(I18N("add_section"), open=False):
                    with gr.Row():
                        add_files = gr.File(
                            label=I18N("gallery_files"),
                            file_count="multiple",
                            file_types=["image", ".zip", ".txt"],
                            height=160,
                        )
                        add_labels = gr.File(label=I18N("label_file"), file_types=[".txt"], height=160)
                    with gr.Row():
                        add_skip = gr.Checkbox(value=True, label=I18N("skip_invalid"))
                        add_folders = gr.Checkbox(value=False, label=I18N("folder_labels"))
                    add_btn = gr.Button(I18N("add_btn"), variant="primary")
                with gr.Accordion(I18N("rename_section"), open=False):
                    with gr.Row():
                        new_name = gr.Textbox(label=I18N("new_name"), max_lines=1)
                        rename_btn = gr.Button(I18N("rename_btn"))
                    with gr.Row():
                        confirm_delete = gr.Checkbox(
                            value=False, label=I18N("confirm_delete"), elem_id="confirm-delete"
                        )
                        delete_btn = gr.Button(I18N("delete_btn"), variant="stop", elem_id="delete-btn")
                with gr.Accordion(I18N("versions_section"), open=False, elem_id="versions") as versions_box:
                    versions_df = gr.Dataframe(
                        label=I18N("versions_table"), interactive=False, max_height=300, elem_id="versions-table"
                    )
                    with gr.Row():
                        version_pick = gr.Number(label=I18N("version"), precision=0, scale=2, elem_id="version-pick")
                        changes_btn = gr.Button(I18N("show_changes"), scale=1, elem_id="changes-btn")
                        restore_btn = gr.Button(I18N("restore_btn"), variant="stop", scale=1, elem_id="restore-btn")
                    version_md = gr.Markdown(elem_id="version-changes")
                with gr.Accordion(I18N("transfer_section"), open=False):
                    with gr.Row():
                        export_btn = gr.Button(I18N("export_btn"))
                        download_btn = gr.DownloadButton(I18N("download_btn"), visible=False)
                    with gr.Row():
                        import_file = gr.File(label=I18N("import_file"), file_types=[".zip"], height=120)
                        with gr.Column():
                            import_name = gr.Textbox(label=I18N("import_name"), max_lines=1)
                            import_overwrite = gr.Checkbox(value=False, label=I18N("overwrite"))
                            import_btn = gr.Button(I18N("import_btn"))
            # ---------------------------------------------------------------- Evaluate
            with gr.Tab(I18N("tab_evaluate"), id="evaluate") as tab_evaluate:
                gr.Markdown(I18N("eval_help"))
                with gr.Row():
                    eval_index = gr.Dropdown(
                        names, value=active, label=I18N("eval_index"), scale=3, elem_id="eval-index"
                    )
                    evaluate_btn = gr.Button(I18N("evaluate_btn"), variant="primary", scale=1, elem_id="evaluate-btn")
                eval_progress = gr.HTML(elem_id="eval-progress")
                eval_summary = gr.Markdown(elem_id="eval-summary")
                eval_calibration = gr.Markdown(elem_id="eval-calibration")
                with gr.Row(equal_height=False):
                    with gr.Column(scale=3):
                        eval_curve = gr.HTML(label=I18N("eval_curve"), elem_id="eval-curve")
                    with gr.Column(scale=2):
                        eval_threshold = gr.Slider(
                            0.0, 1.0, value=0.5, step=0.001, label=I18N("eval_threshold"), interactive=False,
                            elem_id="eval-threshold",
                        )  # fmt: skip
                        eval_point = gr.Markdown(elem_id="eval-point")
                        use_threshold_btn = gr.Button(I18N("use_threshold_btn"), elem_id="use-threshold-btn")
                        recal_adapt = gr.Radio(["auto", "on", "off"], value="auto", label=I18N("recalibrate_adapt"))
                        recalibrate_btn = gr.Button(I18N("recalibrate_btn"), elem_id="recalibrate-btn")
                        eval_status = gr.Markdown(elem_id="eval-status")
                gr.Markdown(I18N("eval_map"))
                eval_map = gr.HTML(elem_id="eval-map")
                with gr.Row(equal_height=False):
                    eval_labels = gr.Dataframe(
                        label=I18N("eval_labels"), interactive=False, max_height=360, elem_id="eval-labels"
                    )
                    eval_pairs = gr.Dataframe(
                        label=I18N("eval_pairs"), interactive=False, max_height=360, elem_id="eval-pairs"
                    )
                eval_flagged = gr.Dataframe(
                    label=I18N("eval_flagged"), interactive=False, max_height=360, elem_id="eval-flagged"
                )
                eval_examples = gr.Gallery(
                    label=I18N("eval_examples"), columns=6, height="auto", object_fit="contain",
                    allow_preview=True, elem_id="eval-examples",
                )  # fmt: skip
                eval_files = gr.File(
                    label=I18N("eval_downloads"), file_count="multiple", interactive=False, elem_id="eval-files"
                )
            # ---------------------------------------------------------------- Models & about
            with gr.Tab(I18N("tab_models"), id="models") as tab_models:
                models_md = gr.Markdown(elem_id="models-info")
                with gr.Row():
                    rec_model = gr.Dropdown(
                        list(REC_MODELS),
                        value=active_rec_model(engine),
                        label=I18N("rec_model"),
                        info=I18N("switch_info"),
                        scale=3,
                        elem_id="rec-model",
                    )
                    switch_btn = gr.Button(I18N("switch_btn"), scale=1)
                gr.Markdown(recognition_models_table(engine), elem_id="rec-models-table")

        # ---------------------------------------------------------------- events
        rec_inputs = [query, rec_index, det_threshold, rec_threshold, topk, whole_image, use_nms, nms_iou]
        rec_outputs = [result_image, result_table_df, timings, result_json, evidence_gallery, rec_state,
                       results_box, rec_hint, rec_status]  # fmt: skip
        build_inputs = [build_files, build_labels, build_name, build_type, build_metric, build_skip, build_overwrite,
                        build_adapt, build_folders]  # fmt: skip
        build_outputs = [build_summary, rec_index, manage_index, build_progress]
        view_outputs = [info, entries, label_filter, thumbs, selected]
        filter_outputs = [info, entries, thumbs]
        clear_outputs = [selected, info, entries, thumbs]
        remove_outputs = [manage_status, info, entries, thumbs, selected]
        relabel_outputs = [manage_status, info, entries, label_filter, thumbs, selected]
        add_inputs = [manage_index, add_files, add_labels, add_skip, add_folders]
        add_outputs = [manage_status, info, entries, label_filter, thumbs, manage_progress]
        rename_outputs = [manage_status, manage_index, rec_index]
        delete_outputs = [manage_status, manage_index, rec_index, confirm_delete]
        export_outputs = [manage_status, download_btn]
        import_outputs = [manage_status, manage_index, rec_index, manage_progress]
        switch_outputs = [models_md, rec_threshold, banner, rec_model]

        # named endpoints first, so they keep the plain names: the same handlers, errors stay errors
        endpoint("recognize", first_outputs(bind(recognize_image), 4), rec_inputs, rec_outputs[:4])
        endpoint("build_index", change(build_index), build_inputs, build_outputs[:3],
                 concurrency_limit=1, concurrency_id="index-jobs")  # fmt: skip
        endpoint("open_index", bind(open_index), manage_index, view_outputs)
        endpoint("filter_entries", bind(filter_entries), [manage_index, label_filter, selected], filter_outputs)
        endpoint("clear_selection", bind(clear_selection), [manage_index, label_filter], clear_outputs)
        endpoint("remove_entries", change(remove_entries), [manage_index, selected, label_filter], remove_outputs)
        endpoint("relabel_entries", change(relabel_entries), [manage_index, selected, new_label, label_filter],
                 relabel_outputs)  # fmt: skip
        endpoint("add_entries", change(add_entries), add_inputs, add_outputs[:-1],
                 concurrency_limit=1, concurrency_id="index-jobs")  # fmt: skip
        endpoint("rename_index", change(rename_index), [manage_index, new_name], rename_outputs)
        endpoint("delete_index", change(delete_index), [manage_index, confirm_delete], delete_outputs)
        endpoint("export_index", change(export_index), manage_index, export_outputs)
        endpoint("import_index", change(import_index), [import_file, import_name, import_overwrite],
                 import_outputs[:-1])  # fmt: skip
        endpoint("switch_model", change(switch_model), rec_model, switch_outputs[:-1])
        endpoint("versions", bind(versions_table), manage_index, versions_df)
        endpoint("version_changes", bind(show_version_changes), [manage_index, version_pick], version_md)
        endpoint("restore_version", change(restore_version), [manage_index, version_pick], [version_md, versions_df])

        @functools.wraps(bind(recognize_image))  # Gradio reads the type hints: the request is injected
        def recognize_and_show(*args: Any, **kwargs: Any) -> tuple:
            return (*bind(recognize_image)(*args, **kwargs), gr.update(visible=True), gr.update(visible=False), "")

        recognize = soft(recognize_and_show, rec_outputs, rec_status)
        teach_setup = dict(fn=teach_choices, inputs=rec_state, outputs=[teach_pick, teach_label])
        recognize_btn.click(recognize, rec_inputs, rec_outputs, api_visibility="private").success(
            **teach_setup, api_visibility="private"
        )
        examples.select(pick_example, None, query, api_visibility="private").then(
            recognize, rec_inputs, rec_outputs, api_visibility="private"
        ).success(**teach_setup, api_visibility="private")
        # .select: a person picking a box (a programmatic update of the choices must not retype the label)
        teach_pick.select(teach_label_for, [rec_state, teach_pick], teach_label, api_visibility="private")
        teach_outputs = [teach_status, rec_threshold]
        teach_btn.click(
            soft(change(teach_box), teach_outputs, teach_status),
            [rec_state, teach_pick, teach_label],
            teach_outputs,
            api_visibility="private",
            concurrency_limit=1,
            concurrency_id="index-jobs",
        )
        result_table_df.select(select_row, rec_state, [result_image, result_table_df], api_visibility="private")
        result_image.select(select_on_image, rec_state, [result_image, result_table_df], api_visibility="private")
        evidence_gallery.select(select_evidence, rec_state, [result_image, result_table_df], api_visibility="private")
        # index choices are per visitor: refreshing the list keeps this visitor's choice
        keep = lambda current: _index_dropdown(engine, current)  # noqa: E731
        tab_recognize.select(keep, rec_index, rec_index, api_visibility="private")
        # the threshold follows the visitor's own choice of index (and a new build), not every refresh
        # of the list, which would undo a threshold the visitor has just set
        follow_threshold = dict(fn=bind(threshold_for_index), inputs=rec_index, outputs=rec_threshold)
        rec_index.input(**follow_threshold, api_visibility="private")
        rec_index.change(bind(show_examples), rec_index, examples, api_visibility="private")

        def gallery_uploaded(files: Any, request: gr.Request) -> None:
            if access.allowed(request):  # strangers on a read-only Space start nothing
                expect_gallery(engine, files)

        build_files.upload(gallery_uploaded, build_files, None, api_visibility="private", queue=False)
        add_files.upload(gallery_uploaded, add_files, None, api_visibility="private", queue=False)
        build_btn.click(
            with_progress(change(build_index), build_outputs, build_progress),
            build_inputs,
            build_outputs,
            api_visibility="private",
            show_progress="hidden",
            concurrency_limit=1,
            concurrency_id="index-jobs",
        ).then(**follow_threshold, api_visibility="private").then(  # the Evaluate tab follows a new build too
            keep, manage_index, eval_index, api_visibility="private"
        )  # fmt: skip

        open_event = dict(fn=soft(bind(open_index), view_outputs), inputs=manage_index, outputs=view_outputs)
        # every change is a new version: the versions list follows (hidden: it only shows when opened)
        show_versions = dict(fn=soft(bind(versions_table), [versions_df]), inputs=manage_index, outputs=versions_df)
        quietly = dict(api_visibility="private", show_progress="hidden")
        manage_index.input(**open_event, api_visibility="private").success(**show_versions, **quietly)
        refresh_btn.click(keep, manage_index, manage_index, api_visibility="private").then(
            **open_event, api_visibility="private"
        )
        tab_manage.select(keep, manage_index, manage_index, api_visibility="private").then(
            **open_event, api_visibility="private"
        )
        label_filter.select(  # (not .input: a label typed rather than picked from the list comes only as .select)
            soft(bind(pick_label), filter_outputs),
            [manage_index, label_filter, selected],
            filter_outputs,
            api_visibility="private",
        )
        page_outputs = [info, entries, thumbs, page_no]
        page_inputs = [manage_index, label_filter, selected, page_no]
        endpoint("show_page", bind(show_page), page_inputs, page_outputs)
        for trigger, handler in ((prev_btn.click, page_before), (next_btn.click, page_after),
                                 (page_no.submit, show_page)):  # fmt: skip
            trigger(soft(bind(handler), page_outputs), page_inputs, page_outputs, **quietly)
        for view_change in (label_filter.select, manage_index.change):  # a new view starts on page 1
            view_change(lambda: 1, None, page_no, **quietly)
        toggle_outputs = [selected, thumbs, entries]
        entries.select(
            soft(bind(toggle_selection), toggle_outputs),
            [manage_index, selected, label_filter, page_no],
            toggle_outputs,
            api_visibility="private",
            show_progress="hidden",
        )
        selection_outputs = [info, entries, thumbs]
        selected.submit(
            soft(bind(show_selection), selection_outputs),
            [manage_index, selected, label_filter],
            selection_outputs,
            api_visibility="private",
        )
        clear_btn.click(
            soft(bind(clear_selection), clear_outputs),
            [manage_index, label_filter],
            clear_outputs,
            api_visibility="private",
        )
        remove_btn.click(
            soft(change(remove_entries), remove_outputs, manage_status),
            [manage_index, selected, label_filter],
            remove_outputs,
            api_visibility="private",
        ).success(**show_versions, **quietly)
        relabel_btn.click(
            soft(change(relabel_entries), relabel_outputs, manage_status),
            [manage_index, selected, new_label, label_filter],
            relabel_outputs,
            api_visibility="private",
        ).success(**show_versions, **quietly)
        add_btn.click(
            with_progress(change(add_entries), add_outputs, manage_progress),
            add_inputs,
            add_outputs,
            api_visibility="private",
            show_progress="hidden",
            concurrency_limit=1,
            concurrency_id="index-jobs",
        ).success(**show_versions, **quietly)
        rename_btn.click(
            soft(change(rename_index), rename_outputs, manage_status),
            [manage_index, new_name],
            rename_outputs,
            api_visibility="private",
        ).success(**open_event, api_visibility="private")
        delete_btn.click(
            soft(change(delete_index), delete_outputs, manage_status),
            [manage_index, confirm_delete],
            delete_outputs,
            api_visibility="private",
        ).success(**open_event, api_visibility="private")
        export_btn.click(
            soft(change(export_index), export_outputs, manage_status),
            manage_index,
            export_outputs,
            api_visibility="private",
        )
        import_btn.click(
            with_progress(change(import_index), import_outputs, manage_progress),
            [import_file, import_name, import_overwrite],
            import_outputs,
            api_visibility="private",
            show_progress="hidden",
        ).success(**open_event, api_visibility="private")

        versions_box.expand(**show_versions, api_visibility="private")
        version_changes_event = dict(
            fn=soft(bind(show_version_changes), [version_md], version_md),
            inputs=[manage_index, version_pick],
            outputs=version_md,
        )
        versions_df.select(pick_version, versions_df, version_pick, api_visibility="private").success(
            **version_changes_event, api_visibility="private"
        )
        changes_btn.click(**version_changes_event, api_visibility="private")
        restore_outputs = [version_md, versions_df]
        restore_btn.click(
            soft(change(restore_version), restore_outputs, version_md),
            [manage_index, version_pick],
            restore_outputs,
            api_visibility="private",
        ).success(**open_event, api_visibility="private")

        eval_outputs = [eval_summary, eval_calibration, eval_curve, eval_threshold, eval_point, eval_map, eval_labels,
                        eval_pairs, eval_flagged, eval_examples, eval_files, eval_progress]  # fmt: skip
        endpoint("evaluate", bind(evaluate_index), eval_index, eval_outputs[:-1],
                 concurrency_limit=1, concurrency_id="evaluate")  # fmt: skip
        evaluate_btn.click(
            with_progress(bind(evaluate_index), eval_outputs, eval_progress),
            eval_index,
            eval_outputs,
            api_visibility="private",
            show_progress="hidden",
            concurrency_limit=1,
            concurrency_id="evaluate",
        )
        tab_evaluate.select(keep, eval_index, eval_index, api_visibility="private")
        point_event = dict(
            fn=soft(bind(operating_point), [eval_curve, eval_point]),
            inputs=[eval_index, eval_threshold],
            outputs=[eval_curve, eval_point],
            api_visibility="private",
            show_progress="hidden",
        )
        eval_threshold.release(**point_event)  # a drag: once, when the handle is let go
        eval_threshold.input(**point_event, trigger_mode="always_last")  # typed numbers and keys
        use_outputs = [eval_status, eval_calibration, rec_threshold, eval_curve]
        use_threshold_btn.click(
            soft(change(use_threshold), use_outputs, eval_status),
            [eval_index, eval_threshold, rec_index],
            use_outputs,
            api_visibility="private",
        )
        recal_outputs = [eval_calibration, eval_curve, eval_threshold, eval_point, eval_status]
        recalibrate_btn.click(
            with_progress(change(recalibrate_index), recal_outputs, eval_status),
            [eval_index, recal_adapt],
            recal_outputs,
            api_visibility="private",
            show_progress="hidden",
            concurrency_limit=1,
            concurrency_id="index-jobs",
        )

        tab_models.select(bind(models_markdown), None, models_md, api_visibility="private")
        # while official weights download in the background, the Models tab shows their progress
        download_timer = gr.Timer(2.0, active=bool(engine.model_download_status().get("running")))
        download_timer.tick(bind(refresh_models), None, [models_md, download_timer, banner], api_visibility="private")

        def put_back_model(outputs: list, _request: Any) -> list:  # a failed switch changes nothing
            outputs[-1] = gr.update(value=active_rec_model(engine))
            return outputs

        @functools.wraps(change(switch_model))
        def switch_and_show(*args: Any, **kwargs: Any) -> tuple:
            return (*change(switch_model)(*args, **kwargs), gr.skip())

        switch_btn.click(
            soft(switch_and_show, switch_outputs, on_error=put_back_model),
            rec_model,
            switch_outputs,
            api_visibility="private",
        )

        demo.load(bind(models_markdown), None, models_md, api_visibility="private")
        demo.load(bind(models_banner), None, banner, api_visibility="private")
        if active:
            demo.load(**open_event, api_visibility="private")
    return demo
