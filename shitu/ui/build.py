"""The Build tab: a named index from uploaded images and a label file (or one .zip)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import gradio as gr

from shitu.config import INDEX_TYPES, METRIC_TYPES
from shitu.engine import Engine  # a runtime import: Gradio reads the handlers' type hints
from shitu.ui.events import (
    I18N,
    PRIVATE,
    QUIETLY,
    Wiring,
    index_dropdown,
    lang_of,
    progress_callback,
    user_errors,
)
from shitu.ui.summaries import change_summary
from shitu.ui.uploads import gallery_files_input, gallery_from_uploads, gallery_uploader

if TYPE_CHECKING:
    from shitu.ui.evaluate import EvaluateTab
    from shitu.ui.manage import ManageTab
    from shitu.ui.recognize import RecognizeTab


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
        progress=progress_callback(progress),
        adapt=adapt or "auto",
    )
    summary = change_summary(engine, report, lang_of(request), built=True)
    return summary, index_dropdown(engine, report.index), index_dropdown(engine, report.index)


class BuildTab:
    """The tab's components, made inside the page's ``gr.Tabs``. Nothing here depends on the data."""

    def __init__(self) -> None:
        with gr.Tab(I18N("tab_build"), id="build"):
            gr.Markdown(I18N("build_help"))
            with gr.Row():
                self.files = gallery_files_input(200, elem_id="build-files")
                self.labels = gr.File(
                    label=I18N("label_file"),
                    file_count="single",
                    file_types=[".txt"],
                    height=200,
                    elem_id="build-labels",
                )
            with gr.Row():
                self.name = gr.Textbox(label=I18N("index_name"), value="my_gallery", max_lines=1, elem_id="build-name")
                self.index_type = gr.Radio(list(INDEX_TYPES), value="Flat", label=I18N("index_type"))
                self.metric = gr.Radio(list(METRIC_TYPES), value="IP", label=I18N("metric_type"))
            with gr.Row():
                self.skip = gr.Checkbox(value=True, label=I18N("skip_invalid"))
                self.overwrite = gr.Checkbox(value=False, label=I18N("overwrite"))
                self.folder_labels = gr.Checkbox(value=False, label=I18N("folder_labels"))
            self.adapt = gr.Radio(
                ["auto", "on", "off"],
                value="auto",
                label=I18N("adapt"),
                info=I18N("adapt_info"),
                elem_id="build-adapt",
            )
            self.button = gr.Button(I18N("build_btn"), variant="primary", elem_id="build-btn")
            self.progress = gr.HTML(elem_id="build-progress")
            self.summary = gr.Markdown(elem_id="build-summary")
        self.inputs = [self.files, self.labels, self.name, self.index_type, self.metric, self.skip, self.overwrite,
                       self.adapt, self.folder_labels]  # fmt: skip

    def outputs(self, recognize: RecognizeTab, manage: ManageTab) -> list:
        """A build's outputs: its summary, and both index pickers switched to the new index."""
        return [self.summary, recognize.index, manage.index, self.progress]

    def add_endpoints(self, w: Wiring, recognize: RecognizeTab, manage: ManageTab) -> None:
        """The named endpoints for programmatic callers (the plain handlers: an error stays an error)."""
        w.endpoint("build_index", w.change(build_index), self.inputs, self.outputs(recognize, manage)[:3],
                   concurrency_limit=1, concurrency_id="index-jobs")  # fmt: skip

    def wire(self, w: Wiring, recognize: RecognizeTab, manage: ManageTab, evaluate: EvaluateTab) -> None:
        """The page's own events: private, user errors as toasts, long jobs with a progress bar."""
        # the new index everywhere (Recognize and Manage, Evaluate after it) and after a reload (the browser's)
        outputs = [*self.outputs(recognize, manage)[:3], w.remembered, self.progress]
        self.files.upload(gallery_uploader(w), self.files, None, queue=False, **PRIVATE)
        self.button.click(
            w.with_progress(w.remembering(w.change(build_index), 1), outputs, self.progress),
            self.inputs,
            outputs,
            concurrency_limit=1,
            concurrency_id="index-jobs",
            **QUIETLY,
        ).then(**recognize.threshold_follows_index(w), **PRIVATE).then(
            w.index_choices, [evaluate.index, recognize.index], evaluate.index, **PRIVATE
        )  # fmt: skip
