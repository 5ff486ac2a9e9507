"""The Recognize tab: a photo in, each box's answer, its evidence and its near miss out; teaching a
box to the gallery; examples that belong to the index searched."""

from __future__ import annotations

import base64
import binascii
import functools
import json
import time
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd
from PIL import Image

from shitu.config import WHOLE_IMAGE_MODES, PipelineConfig
from shitu.engine import SAMPLE_INDEX, Engine  # Engine: Gradio reads the handlers' type hints
from shitu.errors import ShiTuError
from shitu.i18n import TEXT
from shitu.i18n import text as tr
from shitu.results import Recognition, RecognizedObject
from shitu.ui.events import (
    HIGHLIGHT_ROW,
    I18N,
    PRIVATE,
    Wiring,
    first_outputs,
    index_dropdown,
    lang_of,
    md_safe,
    picture_grid,
    scratch_file,
    thumbnail_image,
    user_errors,
)
from shitu.ui.summaries import calibration_markdown

MAX_EVIDENCE_PER_BOX = 3  # gallery photos shown next to each box's own crop
EVIDENCE_SIDE = 256
MAX_EXAMPLES = 8
RESULT_SIDE = 1600  # the drawn result at most this many pixels across: sharp on any screen, quick to send
UNKNOWN_ROW = "color: #6b7280"
CANDIDATE_BREAK = "<br>"  # the candidates column is Markdown: one candidate a line
# widths of the result table's columns (#, answer, score, candidates): the candidates get the room
RESULT_COLUMNS = ["8%", "24%", "21%", "47%"]


def undecoded(payload: Any) -> str | bytes | None:
    """What the query image hands its handler: the uploaded file's path (or a pasted image's bytes),
    undecoded, so that the engine decodes it with its own limits (``SHITU_MAX_IMAGE_PIXELS``,
    checked from the header before anything is decoded) and says what is wrong with it in the
    product's words. Gradio's own decoding failed with its own error (and a server path) on anything
    that is not a readable image, and decoded a 13000 x 13000 PNG whatever the limit."""
    if payload is None:
        return None
    url = getattr(payload, "url", None) or ""
    if url.startswith("data:"):
        try:
            return base64.b64decode(url.partition(",")[2])
        except (binascii.Error, ValueError):
            return b""  # the engine says it is not an image
    return getattr(payload, "path", None)


def query_image(**kwargs: Any) -> gr.Image:
    """Gradio's image component (upload, paste, webcam) whose value reaches the handler
    :func:`undecoded` (a subclass would make Gradio write a ``.pyi`` stub beside this module)."""
    component = gr.Image(type="filepath", **kwargs)
    component.preprocess = undecoded  # type: ignore[method-assign]
    return component


def query_input(image: Any) -> Any:
    """What a handler got from :func:`query_image`, ready for the engine: an upload that is gone
    (the server keeps them for a while) is a user error, not a server path in a message."""
    if image is None:
        raise ShiTuError(TEXT["en"]["err_no_image"])
    if isinstance(image, str) and not Path(image).is_file():
        raise ShiTuError(TEXT["en"]["err_upload_gone"])
    return image


# --- handlers ------------------------------------------------------------------------------------------
def threshold_for_index(engine: Engine, name: str | None) -> dict[str, Any]:
    """The recognition-threshold slider follows the chosen index: its own calibrated (or picked)
    threshold, else the model's default."""
    try:
        return gr.update(value=engine.threshold(name))
    except ShiTuError:
        return gr.update()


def initial_values(engine: Engine, remembered: str | None = None, request: gr.Request | None = None) -> tuple:
    """What the tab shows when a page opens, read then (not when the page was built): (index
    picker on the index this browser picked last, examples, recognition threshold, top-k, detection
    threshold, whole-image mode, NMS on, NMS IoU)."""
    picker = index_dropdown(engine, remembered)
    name = picker["value"]
    config = engine.config
    threshold = threshold_for_index(engine, name).get("value", engine.default_rec_threshold)
    return (picker, examples_for(engine, name), threshold, config.rec_topk, engine.default_det_threshold,
            config.whole_image, config.nms_iou is not None, config.nms_iou or 0.5)  # fmt: skip


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
    lang = lang_of(request)
    result = engine.recognize(
        query_input(image),
        index=index_name or None,
        bgr=False,
        det_threshold=None if det_threshold is None else float(det_threshold),
        rec_threshold=None if rec_threshold is None else float(rec_threshold),
        rec_topk=None if topk is None else int(topk),
        whole_image=whole_image or None,
        nms_iou=float(nms_iou) if use_nms else None,
    )
    path = scratch_file("shitu_result.json")
    path.write_text(json.dumps(result.to_dict(), ensure_ascii=False, indent=2), encoding="utf-8")
    items, owners = evidence(engine, result, lang)
    drawn = result.render(lang=lang, max_side=RESULT_SIDE)
    state = {"result": result, "owners": owners, "lang": lang, "scale": drawn.width / result.image.shape[1]}
    return (
        drawn,
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
    return tr(lang, "maybe", label=label, score=f"{score:.3f}") + below


def answer_text(obj: RecognizedObject, threshold: float | None, lang: str) -> str:
    """A box's answer: its label, or ``unknown`` with its near miss."""
    if obj.recognized:
        return str(obj.label)
    miss = near_miss(obj, threshold, lang)
    return tr(lang, "unknown") + (f" — {miss}" if miss else "")


def result_table(result: Recognition, lang: str = "en") -> pd.DataFrame:
    """One row per box: the answer (or ``unknown`` with its near miss), its score and the top-k
    candidates with those under the threshold marked (entry ids are in the evidence captions and
    the JSON). The detector's own class names stay in the JSON: they are not answers."""
    threshold = result.rec_threshold
    rows = []
    for n, obj in enumerate(result.objects, start=1):
        candidates = obj.candidates or ([obj.candidate] if obj.candidate else [])
        marked = [
            f"{md_safe(label)} {score:.3f} " + ("✓" if threshold is None or score >= threshold else "✗")
            for label, score, _ in candidates
        ]
        rows.append(
            {
                tr(lang, "col_box"): n,
                tr(lang, "col_answer"): answer_text(obj, threshold, lang),
                tr(lang, "col_score"): f"{obj.score:.3f}" if obj.recognized else "—",
                tr(lang, "col_candidates"): CANDIDATE_BREAK.join(marked) or "—",  # one a line: readable on a phone
            }
        )
    columns = [tr(lang, k) for k in ("col_box", "col_answer", "col_score", "col_candidates")]
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
    threshold = result.rec_threshold
    items: list[tuple[Image.Image, str]] = []
    owners: list[int] = []
    shown = [(obj.candidates or ([obj.candidate] if obj.candidate else []))[:MAX_EVIDENCE_PER_BOX]
             for obj in result.objects]  # fmt: skip
    # one read for all of them; entries removed since have no thumbnail here
    try:
        held = engine.lookup(result.index_name, {id_ for candidates in shown for _, _, id_ in candidates},
                             thumbnails=True)  # fmt: skip
    except ShiTuError:
        return [], []
    thumbs = {e.id: e.thumbnail for e in held if e.thumbnail}
    for n, (obj, candidates) in enumerate(zip(result.objects, shown)):
        items.append((_crop(result.image, obj.bbox), tr(lang, "ev_query", n=n + 1)))
        owners.append(n)
        for label, score, id_ in candidates:
            if id_ not in thumbs:
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
    return result.render(lang=lang, highlight=box, max_side=RESULT_SIDE), styled_result_table(result, lang, box)


def select_row(state: dict | None, evt: gr.SelectData):
    """A click on a row of the result table highlights its box on the image."""
    return highlight(state, evt.index[0] if isinstance(evt.index, (list, tuple)) else None)


def select_on_image(state: dict | None, evt: gr.SelectData):
    """A click on the result image highlights the box under it and its row."""
    if not state or not isinstance(evt.index, (list, tuple)) or len(evt.index) != 2:
        return gr.skip(), gr.skip()
    scale = state.get("scale") or 1.0  # the drawn image may be the photo scaled down
    return highlight(state, _box_at(state["result"], float(evt.index[0]) / scale, float(evt.index[1]) / scale))


def select_evidence(state: dict | None, evt: gr.SelectData):
    """A click on an evidence photo highlights the box it belongs to."""
    owners = (state or {}).get("owners") or []
    i = evt.index if isinstance(evt.index, int) else None
    return highlight(state, owners[i] if i is not None and 0 <= i < len(owners) else None)


def redraw_at_threshold(engine: Engine, state: dict | None, threshold: float | None):
    """The threshold slider moved after a query: the same result decided at the new threshold
    (:meth:`Recognition.at_threshold`: no model run, no search), drawn again — (image, table,
    summary, evidence, state)."""
    if not state or state.get("result") is None or threshold is None:
        return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
    result, lang = state["result"].at_threshold(float(threshold)), state["lang"]
    items, owners = evidence(engine, result, lang)
    drawn = result.render(lang=lang, max_side=RESULT_SIDE)
    new_state = {**state, "result": result, "owners": owners, "scale": drawn.width / result.image.shape[1]}
    return drawn, result_table(result, lang), timings_markdown(result, lang), items, new_state


def timings_markdown(result: Recognition, lang: str = "en") -> str:
    """How many boxes were found and recognised, the threshold, what a score means, and the time
    each stage took."""
    stages = " · ".join(
        f"{TEXT[lang].get('stage_' + stage, stage)} {seconds * 1000:.0f} ms"
        for stage, seconds in result.timings.items()
    )
    total = sum(result.timings.values()) * 1000
    found = tr(
        lang,
        "found",
        boxes=len(result.objects),
        recognised=sum(o.recognized for o in result.objects),
        index=result.index_name,
    )
    threshold = (
        f" · {tr(lang, 'threshold_used', threshold=f'{result.rec_threshold:.2f}')}" if result.rec_threshold else ""
    )
    return f"{found}{threshold}  \n{tr(lang, 'score_meaning')}  \n{stages} · **{tr(lang, 'total')} {total:.0f} ms**"


def examples_for(engine: Engine, name: str | None, limit: int = MAX_EXAMPLES) -> list[tuple[Any, str]]:
    """Example queries that belong to the index being searched: the sample gallery's own query
    photos, or for any other index a few of its gallery photos, one per label, spread over its
    labels."""
    if not name:
        return []
    if name == SAMPLE_INDEX:
        queries = sorted(engine.sample_queries(), key=lambda p: "two_objects" not in p.name)  # the richest first
        return [(str(p), p.stem.removeprefix("query_").replace("_", " ")) for p in queries[:limit]]
    try:
        firsts = engine.first_of_each_label(name)
        step = max(1, len(firsts) // (3 * limit))  # spread over the labels; spares for entries without a thumbnail
        found = [e for e in engine.lookup(name, firsts[::step][: 3 * limit], thumbnails=True) if e.thumbnail]
    except ShiTuError:
        return []
    picks = found[:: max(1, len(found) // limit)][:limit]
    return [(thumbnail_image(e.thumbnail), f"{e.label} · #{e.id}") for e in picks]


def follow_remembered(engine: Engine, current: str | None, remembered: str | None = None):
    """The tab opened again: (index picker on the index this browser picked last — another tab may
    have picked one, or built one —, and the threshold slider following it when it changed)."""
    picker = index_dropdown(engine, remembered, current)
    changed = picker["value"] != current
    return picker, threshold_for_index(engine, picker["value"]) if changed else gr.skip()


def show_examples(engine: Engine, name: str | None):
    """The example gallery for the chosen index."""
    return examples_for(engine, name)


def pick_example(evt: gr.SelectData):
    """The clicked example becomes the query image."""
    value = evt.value or {}
    image = value.get("image") if isinstance(value, dict) else None
    path = image.get("path") if isinstance(image, dict) else None
    return path or gr.skip()


# --- teach: a box of a result goes into the gallery ----------------------------------------------------
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
    started = time.perf_counter()
    # the query's own feature of the box: nothing is embedded again (unless the model changed since)
    report = engine.teach(result.index_name, result.image, obj.bbox, label, feature=obj.feature,
                          feature_model=result.feature_model)  # fmt: skip
    lang = lang_of(request)
    head = tr(lang, "taught", box=box, index=report.index, id=report.added_ids[0], label=md_safe(label.strip()),
              seconds=f"{time.perf_counter() - started:.1f}")  # fmt: skip
    info = engine.info(result.index_name)
    return head + "\n\n" + calibration_markdown(info, lang), threshold_for_index(engine, result.index_name)


# --- the tab ---------------------------------------------------------------------------------------------
class RecognizeTab:
    """The tab's components, made inside the page's ``gr.Tabs``; no engine is read here (the page's
    load fills in the index, its examples and every option: :func:`initial_values`). Until then the
    options show the pipeline's stock defaults."""

    def __init__(self) -> None:
        stock = PipelineConfig()
        with gr.Tab(I18N("tab_recognize"), id="recognize") as self.tab:
            with gr.Row(equal_height=False):
                with gr.Column(scale=1, min_width=300):
                    self.query = query_image(
                        label=I18N("query_image"),
                        sources=["upload", "webcam", "clipboard"],
                        height=320,
                        elem_id="query-image",
                    )
                    with gr.Row():
                        self.index = gr.Dropdown([], label=I18N("index_to_search"), elem_id="rec-index", scale=3)
                        self.button = gr.Button(
                            I18N("recognize_btn"), variant="primary", scale=2, elem_id="recognize-btn"
                        )
                    self.status = gr.HTML(elem_id="rec-status")
                    self.examples = picture_grid("examples", "examples", rows=1)
                    with gr.Accordion(I18N("options"), open=False):
                        self.threshold = gr.Slider(
                            0.0, 1.0, value=0.5, step=0.01, label=I18N("rec_threshold"),
                            info=I18N("rec_threshold_info"), elem_id="rec-threshold",
                        )  # fmt: skip
                        self.topk = gr.Slider(1, 10, value=stock.rec_topk, step=1, label=I18N("topk"))
                        self.det_threshold = gr.Slider(
                            0.05, 0.95, value=0.5, step=0.01, label=I18N("det_threshold"),
                            info=I18N("det_threshold_info"),
                        )  # fmt: skip
                        self.whole_image = gr.Radio(
                            list(WHOLE_IMAGE_MODES),
                            value=stock.whole_image,
                            label=I18N("whole_image"),
                            info=I18N("whole_image_info"),
                        )
                        self.use_nms = gr.Checkbox(value=stock.nms_iou is not None, label=I18N("use_nms"))
                        self.nms_iou = gr.Slider(
                            0.05, 0.95, value=stock.nms_iou or 0.5, step=0.05, label=I18N("nms_iou")
                        )
                with gr.Column(scale=1, min_width=300):
                    self.hint = gr.Markdown(I18N("results_hint"), elem_id="results-hint")
                    with gr.Column(visible=False, elem_id="results") as self.results_box:
                        self.image = gr.Image(
                            label=I18N("result_image"),
                            show_label=False,
                            type="pil",
                            format="jpeg",
                            interactive=False,
                            buttons=[],  # nothing over the drawn captions; the JSON and a long press remain
                            height=440,
                            elem_id="result-image",
                        )
                        self.timings = gr.Markdown(elem_id="timings")
                        self.evidence = picture_grid("evidence", "evidence")
                        self.table = gr.Dataframe(
                            label=I18N("result_table"), interactive=False, wrap=True, elem_id="result-table",
                            datatype=["number", "str", "str", "markdown"], column_widths=RESULT_COLUMNS,
                        )  # fmt: skip
                        with gr.Accordion(I18N("teach_section"), open=False, elem_id="teach"):
                            with gr.Row():
                                self.teach_pick = gr.Dropdown(
                                    [], label=I18N("teach_box"), scale=1, min_width=80, elem_id="teach-box"
                                )
                                self.teach_label = gr.Textbox(
                                    label=I18N("teach_label"), max_lines=1, scale=3, elem_id="teach-label"
                                )
                            self.teach_button = gr.Button(I18N("teach_btn"), variant="primary", elem_id="teach-btn")
                            self.teach_status = gr.Markdown(elem_id="teach-status")
                        self.json = gr.File(label=I18N("result_json"), interactive=False, height=60)
            self.state = gr.State()
            # the named endpoint's index: any name (the engine checks it), while the dropdown accepts only the
            # choices this page has loaded
            self.index_name = gr.Textbox(label=I18N("index_to_search"), visible=False)
        self.inputs = [self.query, self.index, self.det_threshold, self.threshold, self.topk, self.whole_image,
                       self.use_nms, self.nms_iou]  # fmt: skip
        self.outputs = [self.image, self.table, self.timings, self.json, self.evidence, self.state, self.results_box,
                        self.hint, self.status]  # fmt: skip

    def threshold_follows_index(self, w: Wiring) -> dict[str, Any]:
        """The event that sets the threshold slider to the chosen index's own threshold."""
        return dict(fn=w.bind(threshold_for_index), inputs=self.index, outputs=self.threshold)

    def add_endpoints(self, w: Wiring) -> None:
        """The named endpoints for programmatic callers (the plain handlers: an error stays an error)."""
        inputs = [self.index_name if c is self.index else c for c in self.inputs]
        w.endpoint("recognize", first_outputs(w.bind(recognize_image), 4), inputs, self.outputs[:4])

    def wire(self, w: Wiring) -> None:
        """The page's own events: private, user errors as toasts, long jobs with a progress bar."""
        bound = w.bind(recognize_image)

        @functools.wraps(bound)  # Gradio reads the type hints: the request is injected
        def recognize_and_show(*args: Any, **kwargs: Any) -> tuple:
            return (*bound(*args, **kwargs), gr.update(visible=True), gr.update(visible=False), "")

        recognize = w.soft(recognize_and_show, self.outputs, self.status)
        teach_setup = dict(fn=teach_choices, inputs=self.state, outputs=[self.teach_pick, self.teach_label], **PRIVATE)
        self.button.click(recognize, self.inputs, self.outputs, **PRIVATE).success(**teach_setup)
        self.examples.select(pick_example, None, self.query, **PRIVATE).then(
            recognize, self.inputs, self.outputs, **PRIVATE
        ).success(**teach_setup)
        # .select: a person picking a box (a programmatic update of the choices must not retype the label)
        self.teach_pick.select(teach_label_for, [self.state, self.teach_pick], self.teach_label, **PRIVATE)
        teach_outputs = [self.teach_status, self.threshold]
        self.teach_button.click(
            w.soft(w.change(teach_box), teach_outputs, self.teach_status),
            [self.state, self.teach_pick, self.teach_label],
            teach_outputs,
            concurrency_limit=1,
            concurrency_id="index-jobs",
            **PRIVATE,
        )
        highlighted = [self.image, self.table]
        self.table.select(select_row, self.state, highlighted, **PRIVATE)
        self.image.select(select_on_image, self.state, highlighted, **PRIVATE)
        self.evidence.select(select_evidence, self.state, highlighted, **PRIVATE)
        # a person moving the threshold after a query sees that query decided again at once (no new query);
        # .release: the slider set by the page (an index's own threshold, a teach) redraws nothing
        redrawn = [self.image, self.table, self.timings, self.evidence, self.state]
        self.threshold.release(w.bind(redraw_at_threshold), [self.state, self.threshold], redrawn, **PRIVATE)
        self.tab.select(w.bind(follow_remembered), [self.index, w.remembered], [self.index, self.threshold], **PRIVATE)
        # the threshold follows the visitor's own choice of index (and a new build), not every refresh
        # of the list, which would undo a threshold the visitor has just set
        self.index.input(**self.threshold_follows_index(w), **PRIVATE)
        w.remember_choice(self.index)
        self.index.change(w.bind(show_examples), self.index, self.examples, **PRIVATE)

    def load(self, demo: gr.Blocks, w: Wiring) -> None:
        """What the tab shows when a page opens, read then."""
        shown = [self.index, self.examples, self.threshold, self.topk, self.det_threshold, self.whole_image,
                 self.use_nms, self.nms_iou]  # fmt: skip
        demo.load(w.soft(w.bind(initial_values), shown), w.remembered, shown, **PRIVATE)
