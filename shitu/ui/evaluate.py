"""The Evaluate tab: the gallery report of an index (recall, mislabels, duplicates, a map), its
threshold curve, and choosing or remeasuring the index's threshold."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import gradio as gr
import pandas as pd
from PIL import Image

from shitu.engine import Engine  # a runtime import: Gradio reads the handlers' type hints
from shitu.errors import ShiTuError
from shitu.i18n import TEXT
from shitu.i18n import text as tr
from shitu.report import GalleryReport, curve_svg, map_svg
from shitu.ui.events import (
    I18N,
    PRIVATE,
    QUIETLY,
    Wiring,
    index_dropdown,
    lang_of,
    md_safe,
    picture_grid,
    progress_callback,
    scratch_file,
    thumbnail_image,
    user_errors,
)
from shitu.ui.summaries import calibration_markdown

if TYPE_CHECKING:
    from shitu.ui.recognize import RecognizeTab
    from shitu.views import CalibrationView

MAX_REPORT_ROWS = 200  # rows of each report table shown on the page (the CSVs have them all)
MAX_LABEL_ROWS = 500
# the page's curve: compact, so its 12-unit text is ~12 px beside the slider and, with the phone's
# minimum width (studio.CSS), ~10 px on a phone
CURVE_SIZE = {"width": 560, "height": 300}


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.1%}"


def _threshold_slider(c: CalibrationView | None, value: float | None = None) -> dict[str, Any]:
    if c is None:
        return gr.update(interactive=False)
    lo, hi = c.points[0].threshold, c.points[-1].threshold
    chosen = c.threshold if value is None else float(value)
    # cosine similarity: the whole 0..1 range (and below 0 where the curve goes there)
    return gr.update(minimum=round(min(0.0, lo, chosen), 3), maximum=round(max(1.0, hi, chosen), 3),
                     value=round(chosen, 4), step=0.001, interactive=True)  # fmt: skip


def initial_index(engine: Engine, remembered: str | None = None) -> dict[str, Any]:
    """The index picker when a page opens: the indices there are now, on the one this browser picked
    last (else the default one)."""
    return index_dropdown(engine, remembered)


def index_view(engine: Engine, name: str | None, request: gr.Request | None = None):
    """What an index shows before any report is run (its calibration is stored with it): (calibration
    markdown, curve, threshold slider on the index's own threshold, what that threshold does)."""
    if not name:
        return "", "", gr.update(interactive=False), ""
    lang = lang_of(request)
    info = engine.info(name)
    c = info.calibration
    curve, point = operating_point(engine, name, c.threshold if c else None, request)
    return calibration_markdown(info, lang), curve, _threshold_slider(c), point


def operating_point(engine: Engine, name: str | None, threshold: float | None, request: gr.Request | None = None):
    """The curve with ``threshold`` marked, and what that threshold would do: (curve html, markdown)."""
    lang = lang_of(request)
    if not name:
        return gr.skip(), ""
    c = engine.calibration(name)
    if c is None or threshold is None:
        return curve_svg(c, lang=lang, **CURVE_SIZE), tr(lang, "no_calibration")
    p = c.at(float(threshold))
    line = tr(lang, "point_line", threshold=float(threshold), accepted=p.correct_accepted, wrong=p.wrong_accepted,
              rejected=p.unknown_rejected)  # fmt: skip
    return curve_svg(c, float(threshold), lang=lang, **CURVE_SIZE), line


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
        [(r.label, r.images, _pct(r.recall_at_1), _pct(r.recall_at_5), r.confused_with or "")
         for r in worst[:MAX_LABEL_ROWS]],
        columns=[tr(lang, k) for k in ("col_label", "col_images", "col_recall1", "col_recall5", "col_confused")],
    )  # fmt: skip
    pairs = pd.DataFrame(
        [(p.label_a, p.label_b, p.errors, " ".join(f"#{e.id}" for e in p.examples_a + p.examples_b))
         for p in report.confused_pairs[:MAX_REPORT_ROWS]],
        columns=[tr(lang, k) for k in ("col_pair_a", "col_pair_b", "col_errors", "col_id")],
    )  # fmt: skip
    rows = [(s.id, s.label, tr(lang, "issue_mislabelled"), s.suggested_label, round(s.similarity, 3))
            for s in report.mislabelled[:MAX_REPORT_ROWS]]  # fmt: skip
    for d in report.duplicates[:MAX_REPORT_ROWS]:
        issue = tr(lang, "issue_conflicting" if d.conflicting else "issue_redundant")
        rows.append((d.id_a, d.label_a, issue, f"#{d.id_b} {d.label_b}", round(d.similarity, 3)))
    for f in report.few_images[:MAX_REPORT_ROWS]:
        rows.append((f.ids[0] if f.ids else "", f.label, tr(lang, "issue_few"), "", ""))
    flagged = pd.DataFrame(
        rows,
        columns=[tr(lang, k) for k in ("col_id", "col_label", "col_issue", "col_suggested", "col_similarity")],
    )
    return labels, pairs, flagged


def _report_files(report: GalleryReport, name: str, lang: str) -> list[str]:
    html_path = scratch_file(f"{name}_report.html")
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
    report = engine.report(name, progress=progress_callback(progress))
    info = engine.info(name)
    summary = tr(
        lang, "eval_summary", name=md_safe(name), entries=report.entries, labels=report.labels,
        r1=_pct(report.recall_at_1), r5=_pct(report.recall_at_5), evaluated=report.evaluated,
        sampled=tr(lang, "eval_sampled") if report.sampled else "", mislabelled=report.mislabelled_count,
        conflicting=report.duplicate_counts.get("conflicting", 0),
        redundant=report.duplicate_counts.get("redundant", 0), few=len(report.few_images), seconds=report.seconds,
    )  # fmt: skip
    a = info.adaptation
    if a and a.get("applied") and a.get("adapted_recall") is not None:  # leave-one-out flatters a fitted space
        summary += "\n\n" + tr(lang, "eval_fitted", heldout=a["adapted_recall"], raw=a["raw_recall"])
    c = info.calibration
    curve, point = operating_point(engine, name, c.threshold if c else None, request)
    labels, pairs, flagged = _report_tables(report, lang)
    return (summary, calibration_markdown(info, lang), curve, _threshold_slider(c), point,
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
    engine.set_threshold(name, float(threshold))
    info, lang = engine.info(name), lang_of(request)
    return (tr(lang, "threshold_set", threshold=float(threshold)), calibration_markdown(info, lang),
            # the Recognize tab's slider follows when it searches this index
            gr.update(value=info.threshold) if searched == name else gr.skip(),
            curve_svg(info.calibration, lang=lang, **CURVE_SIZE))  # fmt: skip


@user_errors
def recalibrate_index(engine: Engine, name: str | None, adapt: str | None = None,
                      request: gr.Request | None = None, progress: gr.Progress = gr.Progress()):  # fmt: skip
    """Refit the projection and remeasure the curve: (calibration markdown, curve, slider, point)."""
    if not name:
        raise ShiTuError(TEXT["en"]["err_pick_index"])
    engine.calibrate(name, adapt=adapt or None, progress=progress_callback(progress))
    info = engine.info(name)
    c = info.calibration
    curve, point = operating_point(engine, name, c.threshold if c else None, request)
    return calibration_markdown(info, lang_of(request)), curve, _threshold_slider(c), point


class EvaluateTab:
    """The tab's components, made inside the page's ``gr.Tabs``; the page's load fills in the index
    picker (:func:`initial_index`)."""

    def __init__(self) -> None:
        with gr.Tab(I18N("tab_evaluate"), id="evaluate") as self.tab:
            gr.Markdown(I18N("eval_help"))
            with gr.Row():
                self.index = gr.Dropdown([], label=I18N("eval_index"), scale=3, elem_id="eval-index")
                self.button = gr.Button(I18N("evaluate_btn"), variant="primary", scale=1, elem_id="evaluate-btn")
            self.progress = gr.HTML(elem_id="eval-progress")
            self.summary = gr.Markdown(elem_id="eval-summary")
            self.calibration = gr.Markdown(elem_id="eval-calibration")
            with gr.Row(equal_height=False):
                with gr.Column(scale=3):
                    self.curve = gr.HTML(label=I18N("eval_curve"), elem_id="eval-curve")
                with gr.Column(scale=2):
                    self.threshold = gr.Slider(
                        0.0,
                        1.0,
                        value=0.5,
                        step=0.001,
                        label=I18N("eval_threshold"),
                        interactive=False,
                        elem_id="eval-threshold",
                    )
                    self.point = gr.Markdown(elem_id="eval-point")
                    self.use_button = gr.Button(I18N("use_threshold_btn"), elem_id="use-threshold-btn")
                    self.adapt = gr.Radio(["auto", "on", "off"], value="auto", label=I18N("recalibrate_adapt"))
                    self.recalibrate_button = gr.Button(I18N("recalibrate_btn"), elem_id="recalibrate-btn")
                    self.status = gr.Markdown(elem_id="eval-status")
            with gr.Column(visible=False, elem_id="eval-report") as self.report_box:  # shown once a report is run
                gr.Markdown(I18N("eval_map"))
                self.map = gr.HTML(elem_id="eval-map")
                with gr.Row(equal_height=False):
                    self.labels = gr.Dataframe(
                        label=I18N("eval_labels"), interactive=False, max_height=360, elem_id="eval-labels"
                    )
                    self.pairs = gr.Dataframe(
                        label=I18N("eval_pairs"), interactive=False, max_height=360, elem_id="eval-pairs"
                    )
                self.flagged = gr.Dataframe(
                    label=I18N("eval_flagged"), interactive=False, max_height=360, elem_id="eval-flagged"
                )
                self.examples = picture_grid("eval_examples", "eval-examples", columns=6, preview=True)
                self.files = gr.File(
                    label=I18N("eval_downloads"), file_count="multiple", interactive=False, elem_id="eval-files"
                )
            self.index_name = gr.Textbox(label=I18N("eval_index"), visible=False)  # the endpoint's: any name
        self.outputs = [self.summary, self.calibration, self.curve, self.threshold, self.point, self.map, self.labels,
                        self.pairs, self.flagged, self.examples, self.files, self.progress]  # fmt: skip

    def add_endpoints(self, w: Wiring) -> None:
        """The named endpoints for programmatic callers (the plain handlers: an error stays an error)."""
        w.endpoint("evaluate", w.bind(evaluate_index), self.index_name, self.outputs[:-1],
                   concurrency_limit=1, concurrency_id="evaluate")  # fmt: skip

    def wire(self, w: Wiring, recognize: RecognizeTab) -> None:
        """The page's own events: private, user errors as toasts, long jobs with a progress bar."""
        bound = w.bind(evaluate_index)

        @functools.wraps(bound)  # Gradio reads the type hints: the request and the progress are injected
        def evaluate_and_show(*args: Any, **kwargs: Any) -> tuple:
            return (*bound(*args, **kwargs), gr.update(visible=True))

        shown = [*self.outputs[:-1], self.report_box, self.progress]
        self.button.click(
            w.with_progress(evaluate_and_show, shown, self.progress),
            self.index,
            shown,
            concurrency_limit=1,
            concurrency_id="evaluate",
            **QUIETLY,
        )
        self.tab.select(w.index_choices, [self.index, w.remembered], self.index, **PRIVATE)
        w.remember_choice(self.index)
        # the index's own curve and threshold as soon as it is chosen; the report's tables once it is run
        viewed = [self.calibration, self.curve, self.threshold, self.point]
        self.index.change(w.soft(w.bind(index_view), viewed), self.index, viewed, **QUIETLY).then(
            lambda: gr.update(visible=False), None, self.report_box, **QUIETLY
        )
        point_event = dict(
            fn=w.soft(w.bind(operating_point), [self.curve, self.point]),
            inputs=[self.index, self.threshold],
            outputs=[self.curve, self.point],
            **QUIETLY,
        )
        self.threshold.release(**point_event)  # a drag: once, when the handle is let go
        self.threshold.input(**point_event, trigger_mode="always_last")  # typed numbers and keys
        use_outputs = [self.status, self.calibration, recognize.threshold, self.curve]
        self.use_button.click(
            w.soft(w.change(use_threshold), use_outputs, self.status),
            [self.index, self.threshold, recognize.index],
            use_outputs,
            **PRIVATE,
        )
        recalibrate_outputs = [self.calibration, self.curve, self.threshold, self.point, self.status]
        self.recalibrate_button.click(
            w.with_progress(w.change(recalibrate_index), recalibrate_outputs, self.status),
            [self.index, self.adapt],
            recalibrate_outputs,
            concurrency_limit=1,
            concurrency_id="index-jobs",
            **QUIETLY,
        )

    def load(self, demo: gr.Blocks, w: Wiring) -> None:
        """What the tab shows when a page opens, read then."""
        demo.load(w.soft(w.bind(initial_index), [self.index]), w.remembered, self.index, **PRIVATE)
