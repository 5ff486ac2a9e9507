"""The Manage tab: the entries of an index a page at a time (filter, select, preview), removing,
relabelling and adding entries, renaming, deleting, exporting and importing an index, and its
versions (what each change did; restoring one)."""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any

import gradio as gr
import pandas as pd
from PIL import Image

from shitu.engine import Engine  # a runtime import: Gradio reads the handlers' type hints
from shitu.errors import ShiTuError
from shitu.i18n import TEXT
from shitu.i18n import text as tr
from shitu.ids import parse_ids
from shitu.ui.events import (
    HIGHLIGHT_ROW,
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
from shitu.ui.summaries import change_summary
from shitu.ui.uploads import (
    gallery_files_input,
    gallery_from_uploads,
    gallery_uploader,
    read_upload,
    upload_paths,
)

if TYPE_CHECKING:
    from shitu.ui.evaluate import EvaluateTab
    from shitu.ui.recognize import RecognizeTab

MAX_TABLE_ROWS = 500  # rows of one page of the entries table (read from the index a page at a time)
MAX_LABEL_CHOICES = 5000  # labels offered by the filter (more can be typed)
MAX_PREVIEWS = 48  # thumbnails in the preview gallery


def entries_table(
    engine: Engine, name: str | None, labels: list[str] | None = None, lang: str = "en", page: Any = 1
) -> pd.DataFrame:
    """One page (:data:`MAX_TABLE_ROWS` rows, in id order) of an index's entries, optionally only
    some labels; only that page is read. ``table.attrs["matching"]``: rows matching in all."""
    start = (_page_number(page) - 1) * MAX_TABLE_ROWS
    shown = engine.entries(name, start, MAX_TABLE_ROWS, labels=labels or None)
    if not shown.entries and start and shown.matching:  # past the end (the index shrank): the last page
        start = (shown.matching - 1) // MAX_TABLE_ROWS * MAX_TABLE_ROWS
        shown = engine.entries(name, start, MAX_TABLE_ROWS, labels=labels or None)
    matching, rows = shown.matching, shown.entries
    columns = [tr(lang, "col_id"), tr(lang, "col_label"), tr(lang, "col_source")]
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


def previews(engine: Engine, name: str | None, ids: list[int]) -> list[tuple[Image.Image, str]]:
    """Thumbnails with ``#id label`` captions (entries without a stored thumbnail are left out)."""
    found = engine.lookup(name, ids[: 4 * MAX_PREVIEWS], thumbnails=True)  # one read for the page
    return [(thumbnail_image(e.thumbnail), f"#{e.id} {e.label}") for e in found if e.thumbnail][:MAX_PREVIEWS]


def index_info(engine: Engine, name: str | None, lang: str = "en", table: pd.DataFrame | None = None) -> str:
    """The line above the entries table: the index's size, type and model, which rows the table
    shows, and whether the index must be rebuilt for the model that runs."""
    info = engine.info(name)
    text = tr(lang, "info", name=name or engine.settings.default_index, entries=info.entries, labels=info.labels,
              index_type=info.index_type, metric_type=info.metric_type, dim=info.dim,
              model=info.feature_model or "?")  # fmt: skip
    matching = table.attrs.get("matching", 0) if table is not None else 0
    if matching > len(table):
        first = table.attrs["first"]
        text += "  \n" + tr(lang, "page_rows", first=first, last=first + len(table) - 1, shown=matching,
                            page=table.attrs["page"], pages=-(-matching // MAX_TABLE_ROWS))  # fmt: skip
    elif table is not None and len(table) < info.entries:
        text += "  \n" + tr(lang, "showing", shown=len(table), total=info.entries)
    if not info.compatible:
        text += "  \n" + tr(lang, "incompatible")
    return text


def _label_choices(engine: Engine, name: str | None) -> dict[str, Any]:
    counts = engine.label_counts(name)
    shown = sorted(counts.items())[:MAX_LABEL_CHOICES]
    return gr.update(choices=[(f"{label} ({n})", label) for label, n in shown], value=[])


def _view(engine: Engine, name: str | None, labels: list[str] | None, selected: str | None, lang: str, page: Any = 1):
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
        empty = pd.DataFrame(columns=[tr(lang, "col_id"), tr(lang, "col_label"), tr(lang, "col_source")])
        return tr(lang, "no_indices"), empty, gr.update(choices=[], value=[]), [], ""
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
    status = tr(lang, "removed", n=len(ids), name=name, ids=", ".join(map(str, ids)))
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
    report = engine.add(name, batch, skip_invalid=bool(skip_invalid), progress=progress_callback(progress))
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
    status = tr(lang, "relabelled", n=len(ids), label=md_safe(label), ids=format_ids(ids))
    return status, info, table, _label_choices(engine, name), thumbs, selected


@user_errors
def rename_index(engine: Engine, name: str | None, new_name: str, request: gr.Request | None = None):
    """Rename an index: (status, Manage dropdown, Recognize dropdown)."""
    if not name:
        raise ShiTuError("no index is selected")
    new = (new_name or "").strip()
    engine.rename(name, new)
    status = tr(lang_of(request), "renamed", old=name, new=new)
    return status, index_dropdown(engine, new), index_dropdown(engine, new)


@user_errors
def delete_index(engine: Engine, name: str | None, confirm: bool, request: gr.Request | None = None):
    """Delete an index once confirmed: (status, Manage dropdown, Recognize dropdown, confirm box reset)."""
    if not name:
        raise ShiTuError("no index is selected")
    if not confirm:
        raise ShiTuError(TEXT["en"]["err_confirm_delete"])
    engine.delete(name)
    status = tr(lang_of(request), "deleted", name=name)
    return status, index_dropdown(engine), index_dropdown(engine), False


@user_errors
def export_index(engine: Engine, name: str | None, request: gr.Request | None = None):
    """Write the index as a .zip: (status, download button with the file)."""
    if not name:
        raise ShiTuError("no index is selected")
    data = engine.export_zip(name)
    path = scratch_file(f"{name}.zip")
    path.write_bytes(data)
    return tr(lang_of(request), "exported", name=name), gr.update(value=str(path), visible=True)


@user_errors
def import_index(engine: Engine, file: Any, name: str, overwrite: bool = False, request: gr.Request | None = None):
    """Import an index .zip under ``name`` (default: the file's name): (status, dropdowns)."""
    paths = upload_paths(file)
    if not paths:
        raise ShiTuError("no .zip was uploaded")
    name = (name or "").strip() or paths[0].stem
    stats = engine.import_zip(name, read_upload(paths[0]), overwrite=bool(overwrite)).summary
    status = tr(lang_of(request), "imported", name=name, entries=stats["entries"], labels=stats["labels"])
    return status, index_dropdown(engine, name), index_dropdown(engine, name)


def versions_table(engine: Engine, name: str | None, request: gr.Request | None = None) -> pd.DataFrame:
    """Every kept version of the index, newest first."""
    lang = lang_of(request)
    columns = [tr(lang, k) for k in ("col_version", "col_time", "col_action", "col_entries", "col_labels",
                                     "col_current")]  # fmt: skip
    if not name:
        return pd.DataFrame(columns=columns)
    rows = [
        (v.version, (v.time or "")[:19].replace("T", " "), v.action or "", v.entries, v.labels,
         "✓" if v.current else "")
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
        tr(lang, "changes_head", version=c.version, action=md_safe(c.action or "?"),
           time=(c.time or "")[:19].replace("T", " "), against=c.against, added=c.added_count,
           removed=c.removed_count, relabelled=c.relabelled_count)
    ]  # fmt: skip
    lines += [f"- \\+ #{e.id} {md_safe(e.label)}" for e in c.added[:20]]
    lines += [f"- − #{e.id} {md_safe(e.label)}" for e in c.removed[:20]]
    lines += [f"- ~ #{e.id} {md_safe(e.old_label)} → {md_safe(e.new_label)}" for e in c.relabelled[:20]]
    return "\n".join(lines)


@user_errors
def restore_version(engine: Engine, name: str | None, version: Any, request: gr.Request | None = None):
    """Make an earlier version current (as a new version): (status, versions table)."""
    report = engine.restore(name, _version_number(version))
    s = report.summary
    status = tr(lang_of(request), "restored", old=s["restored_from"], new=s["version"], entries=s["entries"],
                labels=s["labels"])  # fmt: skip
    return status, versions_table(engine, name, request)


def initial_view(engine: Engine, remembered: str | None = None, request: gr.Request | None = None):
    """What the tab shows when a page opens, read then: (index picker on the index this browser
    picked last, else the default one, then that index opened as :func:`open_index` shows it)."""
    picker = index_dropdown(engine, remembered)
    return (picker, *open_index(engine, picker["value"], request))


def first_page() -> int:
    """A new view (another index, another label filter) starts on page 1."""
    return 1


# --- the tab ---------------------------------------------------------------------------------------------
class ManageTab:
    """The tab's components, made inside the page's ``gr.Tabs``; the page's load chooses the index
    and opens it (:func:`initial_view`)."""

    def __init__(self) -> None:
        with gr.Tab(I18N("tab_manage"), id="manage") as self.tab:
            with gr.Row():
                self.index = gr.Dropdown([], label=I18N("active_index"), scale=3, elem_id="manage-index")
                self.label_filter = gr.Dropdown([], multiselect=True, label=I18N("filter_labels"), scale=3,
                                                allow_custom_value=True, elem_id="label-filter")  # fmt: skip
                self.refresh_button = gr.Button(I18N("refresh"), scale=1)
            self.info = gr.Markdown(elem_id="manage-info")
            with gr.Row():
                with gr.Column(scale=3):
                    self.entries = gr.Dataframe(
                        label=I18N("entries"), interactive=False, max_height=420, elem_id="entries-table"
                    )
                    with gr.Row(elem_id="entries-pager"):  # three across, a phone's width too
                        pager = {"scale": 1, "min_width": 90}
                        self.prev_button = gr.Button(I18N("prev_page"), size="sm", elem_id="prev-page", **pager)
                        self.page = gr.Number(1, precision=0, minimum=1, label=I18N("page"), elem_id="page-no",
                                              **pager)  # fmt: skip
                        self.next_button = gr.Button(I18N("next_page"), size="sm", elem_id="next-page", **pager)
                with gr.Column(scale=2):
                    self.previews = picture_grid("previews", "previews", height=420, preview=True)
            with gr.Row():
                self.selected = gr.Textbox(label=I18N("selected_ids"), max_lines=1, scale=4, elem_id="selected-ids")
                self.remove_button = gr.Button(I18N("remove_btn"), variant="stop", scale=1, elem_id="remove-btn")
                self.clear_button = gr.Button(I18N("clear_btn"), scale=1)
            with gr.Row():
                self.new_label = gr.Textbox(label=I18N("new_label"), max_lines=1, scale=4, elem_id="new-label")
                self.relabel_button = gr.Button(I18N("relabel_btn"), scale=2, elem_id="relabel-btn")
            self.status = gr.Markdown(elem_id="manage-status")
            with gr.Accordion(I18N("add_section"), open=False):
                with gr.Row():
                    self.add_files = gallery_files_input(160)
                    self.add_labels = gr.File(label=I18N("label_file"), file_types=[".txt"], height=160)
                with gr.Row():
                    self.add_skip = gr.Checkbox(value=True, label=I18N("skip_invalid"))
                    self.add_folders = gr.Checkbox(value=False, label=I18N("folder_labels"))
                self.add_button = gr.Button(I18N("add_btn"), variant="primary", elem_id="add-btn")
                self.progress = gr.HTML(elem_id="add-progress")  # next to the button that started it
            with gr.Accordion(I18N("rename_section"), open=False):
                with gr.Row():
                    self.new_name = gr.Textbox(label=I18N("new_name"), max_lines=1)
                    self.rename_button = gr.Button(I18N("rename_btn"))
                with gr.Row():
                    self.confirm_delete = gr.Checkbox(
                        value=False, label=I18N("confirm_delete"), elem_id="confirm-delete"
                    )
                    self.delete_button = gr.Button(I18N("delete_btn"), variant="stop", elem_id="delete-btn")
            with gr.Accordion(I18N("versions_section"), open=False, elem_id="versions") as self.versions_box:
                self.versions = gr.Dataframe(
                    label=I18N("versions_table"), interactive=False, max_height=300, elem_id="versions-table"
                )
                with gr.Row():
                    self.version = gr.Number(label=I18N("version"), precision=0, scale=2, elem_id="version-pick")
                    self.changes_button = gr.Button(I18N("show_changes"), scale=1, elem_id="changes-btn")
                    self.restore_button = gr.Button(I18N("restore_btn"), variant="stop", scale=1, elem_id="restore-btn")
                self.version_changes = gr.Markdown(elem_id="version-changes")
            with gr.Accordion(I18N("transfer_section"), open=False):
                with gr.Row():
                    self.export_button = gr.Button(I18N("export_btn"))
                    self.download_button = gr.DownloadButton(I18N("download_btn"), visible=False)
                with gr.Row():
                    self.import_file = gr.File(label=I18N("import_file"), file_types=[".zip"], height=120)
                    with gr.Column():
                        self.import_name = gr.Textbox(label=I18N("import_name"), max_lines=1)
                        self.import_overwrite = gr.Checkbox(value=False, label=I18N("overwrite"))
                        self.import_button = gr.Button(I18N("import_btn"), elem_id="import-btn")
                        self.import_progress = gr.HTML(elem_id="import-progress")
            # the named endpoints' index: any name (the engine checks it), while the dropdown accepts only the
            # choices this page has loaded
            self.index_name = gr.Textbox(label=I18N("active_index"), visible=False)
        # what each event shows (its outputs) and reads (its inputs)
        self.view = [self.info, self.entries, self.label_filter, self.previews, self.selected]
        self.filtered = [self.info, self.entries, self.previews]
        self.paged = [self.info, self.entries, self.previews, self.page]
        self.page_inputs = [self.index, self.label_filter, self.selected, self.page]
        self.cleared = [self.selected, self.info, self.entries, self.previews]
        self.removed = [self.status, self.info, self.entries, self.previews, self.selected]
        self.relabelled = [self.status, self.info, self.entries, self.label_filter, self.previews, self.selected]
        self.add_inputs = [self.index, self.add_files, self.add_labels, self.add_skip, self.add_folders]
        self.added = [self.status, self.info, self.entries, self.label_filter, self.previews, self.progress]
        self.exported = [self.status, self.download_button]
        self.import_inputs = [self.import_file, self.import_name, self.import_overwrite]

    def renamed(self, recognize: RecognizeTab) -> list:
        """A rename's outputs: its status, and both index pickers switched to the new name."""
        return [self.status, self.index, recognize.index]

    def deleted(self, recognize: RecognizeTab) -> list:
        """A deletion's outputs: its status, both index pickers without it, the confirmation unticked."""
        return [self.status, self.index, recognize.index, self.confirm_delete]

    def imported(self, recognize: RecognizeTab) -> list:
        """An import's outputs: its status, both index pickers on the imported index, the progress bar."""
        return [self.status, self.index, recognize.index, self.import_progress]

    def add_endpoints(self, w: Wiring, recognize: RecognizeTab) -> None:
        """The named endpoints for programmatic callers (the plain handlers: an error stays an error)."""
        index, selected = self.index_name, self.selected
        w.endpoint("open_index", w.bind(open_index), index, self.view)
        w.endpoint("filter_entries", w.bind(filter_entries), [index, self.label_filter, selected], self.filtered)
        w.endpoint("show_page", w.bind(show_page), [index, *self.page_inputs[1:]], self.paged)
        w.endpoint("clear_selection", w.bind(clear_selection), [index, self.label_filter], self.cleared)
        w.endpoint("remove_entries", w.change(remove_entries), [index, selected, self.label_filter], self.removed)
        w.endpoint("relabel_entries", w.change(relabel_entries), [index, selected, self.new_label, self.label_filter],
                   self.relabelled)  # fmt: skip
        w.endpoint("add_entries", w.change(add_entries), [index, *self.add_inputs[1:]], self.added[:-1],
                   concurrency_limit=1, concurrency_id="index-jobs")  # fmt: skip
        w.endpoint("rename_index", w.change(rename_index), [index, self.new_name], self.renamed(recognize))
        w.endpoint("delete_index", w.change(delete_index), [index, self.confirm_delete], self.deleted(recognize))
        w.endpoint("export_index", w.change(export_index), index, self.exported)
        w.endpoint("import_index", w.change(import_index), self.import_inputs, self.imported(recognize)[:-1])
        w.endpoint("versions", w.bind(versions_table), index, self.versions)
        w.endpoint("version_changes", w.bind(show_version_changes), [index, self.version], self.version_changes)
        w.endpoint("restore_version", w.change(restore_version), [index, self.version],
                   [self.version_changes, self.versions])  # fmt: skip

    def open_event(self, w: Wiring) -> dict[str, Any]:
        """The event that opens the chosen index (table page 1, label filter, previews)."""
        return dict(fn=w.soft(w.bind(open_index), self.view), inputs=self.index, outputs=self.view, **PRIVATE)

    def wire(self, w: Wiring, recognize: RecognizeTab, evaluate: EvaluateTab) -> None:
        """The page's own events: private, user errors as toasts, long jobs with a progress bar."""
        index, selected, label_filter = self.index, self.selected, self.label_filter
        open_event = self.open_event(w)
        # every change is a new version: the versions list follows (hidden: it only shows when opened)
        show_versions = dict(fn=w.soft(w.bind(versions_table), [self.versions]), inputs=index, outputs=self.versions)
        index.input(**open_event).success(**show_versions, **QUIETLY)
        w.remember_choice(index)
        choices = dict(fn=w.index_choices, inputs=[index, w.remembered], outputs=index, **PRIVATE)
        self.refresh_button.click(**choices).then(**open_event)
        self.tab.select(**choices).then(**open_event)
        label_filter.select(  # (not .input: a label typed rather than picked from the list comes only as .select)
            w.soft(w.bind(pick_label), self.filtered), [index, label_filter, selected], self.filtered, **PRIVATE
        )
        for trigger, handler in ((self.prev_button.click, page_before), (self.next_button.click, page_after),
                                 (self.page.submit, show_page)):  # fmt: skip
            trigger(w.soft(w.bind(handler), self.paged), self.page_inputs, self.paged, **QUIETLY)
        for view_change in (label_filter.select, index.change):  # a new view starts on page 1
            view_change(first_page, None, self.page, **QUIETLY)
        toggled = [selected, self.previews, self.entries]
        self.entries.select(
            w.soft(w.bind(toggle_selection), toggled), [index, selected, label_filter, self.page], toggled, **QUIETLY
        )
        selected.submit(
            w.soft(w.bind(show_selection), self.filtered), [index, selected, label_filter], self.filtered, **PRIVATE
        )
        self.clear_button.click(
            w.soft(w.bind(clear_selection), self.cleared), [index, label_filter], self.cleared, **PRIVATE
        )
        self.remove_button.click(
            w.soft(w.change(remove_entries), self.removed, self.status),
            [index, selected, label_filter],
            self.removed,
            **PRIVATE,
        ).success(**show_versions, **QUIETLY)
        self.relabel_button.click(
            w.soft(w.change(relabel_entries), self.relabelled, self.status),
            [index, selected, self.new_label, label_filter],
            self.relabelled,
            **PRIVATE,
        ).success(**show_versions, **QUIETLY)
        self.add_files.upload(gallery_uploader(w), self.add_files, None, queue=False, **PRIVATE)
        self.add_button.click(
            w.with_progress(w.change(add_entries), self.added, self.progress),
            self.add_inputs,
            self.added,
            concurrency_limit=1,
            concurrency_id="index-jobs",
            **QUIETLY,
        ).success(**show_versions, **QUIETLY)
        renamed, deleted, imported = self.renamed(recognize), self.deleted(recognize), self.imported(recognize)
        self.rename_button.click(
            w.soft(w.change(rename_index), renamed, self.status), [index, self.new_name], renamed, **PRIVATE
        ).success(**open_event).success(**w.remembered_after(index))
        self.delete_button.click(
            w.soft(w.change(delete_index), deleted, self.status), [index, self.confirm_delete], deleted, **PRIVATE
        ).success(**open_event).success(**w.remembered_after(index))
        self.export_button.click(
            w.soft(w.change(export_index), self.exported, self.status), index, self.exported, **PRIVATE
        )
        imported = [*imported[:3], w.remembered, imported[3]]  # selected everywhere, and after a reload
        self.import_button.click(
            w.with_progress(w.remembering(w.change(import_index), 1), imported, self.import_progress),
            self.import_inputs, imported, concurrency_limit=1, concurrency_id="index-jobs", **QUIETLY,
        ).success(**open_event).success(**recognize.threshold_follows_index(w), **PRIVATE).success(
            w.index_choices, [evaluate.index, index], evaluate.index, **PRIVATE
        )  # fmt: skip
        self.versions_box.expand(**show_versions, **PRIVATE)
        version_changes_event = dict(
            fn=w.soft(w.bind(show_version_changes), [self.version_changes], self.version_changes),
            inputs=[index, self.version],
            outputs=self.version_changes,
            **PRIVATE,
        )
        self.versions.select(pick_version, self.versions, self.version, **PRIVATE).success(**version_changes_event)
        self.changes_button.click(**version_changes_event)
        restored = [self.version_changes, self.versions]
        self.restore_button.click(
            w.soft(w.change(restore_version), restored, self.version_changes),
            [index, self.version],
            restored,
            **PRIVATE,
        ).success(**open_event)

    def load(self, demo: gr.Blocks, w: Wiring) -> None:
        """What the tab shows when a page opens, read then."""
        shown = [self.index, *self.view]
        demo.load(w.soft(w.bind(initial_view), shown), w.remembered, shown, **PRIVATE)
