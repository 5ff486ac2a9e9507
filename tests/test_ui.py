"""Handler-level tests of the Gradio studio (no browser), through the real engine and models.

Handlers are called the way Gradio calls them: uploads arrive as file paths, errors must
surface as ``gr.Error`` (a toast) and leave every index as it was.
"""

from __future__ import annotations

import inspect
import json
import shutil
import zipfile
from pathlib import Path

import gradio as gr
import pytest

from shitu import ui
from shitu.sample import SAMPLE_SUBJECTS

LABELS = list(SAMPLE_SUBJECTS)  # "猫 cat", "咖啡 coffee", ... (labels with spaces and Chinese)


class FakeRequest:
    """Just what :func:`shitu.ui.lang_of` reads from a ``gr.Request``."""

    def __init__(self, language: str, session_hash: str = "test"):
        self.headers = {"accept-language": language}
        self.session_hash = session_hash
        self.client = None


def select_row(row: list) -> gr.SelectData:
    """The event Gradio sends when a Dataframe cell of ``row`` is clicked."""
    return gr.SelectData(None, {"index": [0, 1], "value": row[1], "row_value": row, "selected": True})


def highlighted_ids(table) -> list[int]:
    """Ids of the rows a styled entries table highlights (a plain DataFrame highlights none)."""
    if not hasattr(table, "export"):
        return []
    styles = table._compute().ctx  # (row, col) -> [(property, value)] as the browser gets them
    rows = sorted({r for (r, _), props in styles.items() if any("background-color" in k for k, _ in props)})
    return [int(table.data.iloc[r, 0]) for r in rows]


@pytest.fixture
def uploads(sample_gallery, tmp_path) -> tuple[list[str], Path]:
    """The sample gallery as a browser uploads it: flat files (unique names) plus a label file
    whose paths keep their folders, tab-separated, with one missing image and one line without
    a label (lines 25 and 26)."""
    root, label_file = sample_gallery
    upload_dir = tmp_path / "upload"
    upload_dir.mkdir()
    files, lines = [], []
    for line in label_file.read_text(encoding="utf-8").splitlines():
        rel, label = line.split("\t")
        flat = rel.replace("/", "_")  # 0/1.jpg -> 0_1.jpg
        shutil.copy(root / rel, upload_dir / flat)
        files.append(str(upload_dir / flat))
        lines.append(f"photos/{flat}\t{label}")
    lines += ["photos/missing.jpg\t猫 cat", "photos/0_0.jpg"]
    labels = tmp_path / "gallery.txt"
    labels.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return files, labels


@pytest.fixture
def shop(engine, uploads) -> str:
    """An index named ``shop`` (Flat, IP; 24 entries) built through the Build tab's handler."""
    files, labels = uploads
    ui.build_index(engine, files, str(labels), "shop", "Flat", "IP", True, False)
    return "shop"


def ids_of(engine, name: str) -> list[int]:
    return [e.id for e in engine.index(name).entries]


# --- Build index ---------------------------------------------------------------------------
def test_build_from_uploaded_files_reports_skipped_lines(engine, uploads):
    files, labels = uploads
    summary, rec_dropdown, manage_dropdown = ui.build_index(
        engine, files, str(labels), "shop", "HNSW32", "IP", True, False
    )
    index = engine.index("shop")
    assert len(index) == 24 and len(index.label_counts()) == 6
    assert "`shop`" in summary and "**24** images" in summary and "**6** labels" in summary
    assert "Skipped 2 line(s)" in summary
    assert "line 25" in summary and "no uploaded file has this name" in summary
    assert "line 26" in summary and "no label after the image path" in summary
    assert "猫 cat (4)" in summary  # labels with spaces and Chinese survive the round trip
    # both index pickers of this visitor show the new index (nothing process-wide changes)
    assert engine.settings.default_index == "sample"
    assert rec_dropdown["value"] == manage_dropdown["value"] == "shop"
    assert "shop" in rec_dropdown["choices"]


def test_label_file_may_come_with_the_images(engine, uploads):
    files, labels = uploads
    summary, *_ = ui.build_index(engine, [*files, str(labels)], None, "shop", "IVF", "L2", True, False)
    assert "**24** images" in summary
    assert engine.index("shop").summary()["index_type"] == "IVF"


def test_build_from_zip_with_its_own_label_file(engine, sample_gallery, tmp_path):
    root, _ = sample_gallery
    archive = tmp_path / "gallery.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                zf.write(path, f"gallery/{path.relative_to(root)}")  # wrapped in a folder, like zipping one
    summary, *_ = ui.build_index(engine, [str(archive)], None, "zipped", "HNSW32", "IP", True, False)
    assert "**24** images" in summary and "No lines were skipped" in summary
    assert engine.index("zipped").label_counts() == {label: 4 for label in LABELS}


def test_build_from_zip_and_separate_label_file(engine, sample_gallery, tmp_path):
    root, label_file = sample_gallery
    archive = tmp_path / "images.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(root.rglob("*.jpg")):
            zf.write(path, str(path.relative_to(root)))
    first_two = "\n".join(label_file.read_text(encoding="utf-8").splitlines()[:8])  # cats and coffee
    labels = tmp_path / "two.txt"
    labels.write_text(first_two, encoding="utf-8")
    ui.build_index(engine, str(archive), str(labels), "two", "Flat", "IP", True, False)
    assert engine.index("two").label_counts() == {LABELS[0]: 4, LABELS[1]: 4}


@pytest.mark.parametrize(
    "case, message",
    [
        ("no_files", "no gallery files were uploaded"),
        ("no_label_file", "label file is missing"),
        ("not_utf8", "not UTF-8"),
        ("no_pairs", "no image/label pairs could be used"),
        ("same_names", "upload the gallery as one .zip"),
        ("zip_and_images", "either one .zip or image files"),
        ("bad_name", "invalid index name"),
    ],
)
def test_bad_build_input_is_a_toast_and_changes_nothing(engine, shop, uploads, tmp_path, case, message):
    files, labels = uploads
    before = (engine.index_names(), ids_of(engine, shop))
    name, label_arg = "other", str(labels)
    if case == "no_files":
        files = []
    elif case == "no_label_file":
        label_arg = None
    elif case == "not_utf8":
        bad = tmp_path / "bad.txt"
        bad.write_bytes(b"0_0.jpg caf\xe9\n")  # Latin-1, not UTF-8
        label_arg = str(bad)
    elif case == "no_pairs":
        bad = tmp_path / "bad.txt"
        bad.write_text("nothing.jpg label\nlonely_path\n", encoding="utf-8")
        label_arg = str(bad)
    elif case == "same_names":
        twin = tmp_path / "twin"
        twin.mkdir()
        files = [*files, str(shutil.copy(files[0], twin / Path(files[0]).name))]
    elif case == "zip_and_images":
        files = [*files, str(tmp_path / "x.zip")]
    elif case == "bad_name":
        name = "../escape"
    with pytest.raises(gr.Error, match=message):
        ui.build_index(engine, files, label_arg, name, "HNSW32", "IP", True, False)
    assert (engine.index_names(), ids_of(engine, shop)) == before


def test_corrupt_image_is_skipped_or_refused(engine, shop, uploads, tmp_path):
    files, labels = uploads
    broken = Path(files[0]).with_name("broken.jpg")
    broken.write_bytes(b"\xff\xd8 this is not really a jpeg")
    text = labels.read_text(encoding="utf-8") + "photos/broken.jpg\t坏 broken\n"
    labels.write_text(text, encoding="utf-8")
    all_files = [*files, str(broken)]

    before = ids_of(engine, shop)
    # strict: the whole build is refused, and replacing the existing index does not happen
    with pytest.raises(gr.Error, match="broken.jpg"):
        ui.build_index(engine, all_files, str(labels), shop, "Flat", "IP", False, True)
    assert ids_of(engine, shop) == before

    # lenient: the build goes ahead and the summary names the line and the reason
    summary, *_ = ui.build_index(engine, all_files, str(labels), "lenient", "Flat", "IP", True, False)
    assert "line 27" in summary and "not a readable image" in summary
    assert "坏 broken" not in engine.index("lenient").label_counts()


def test_existing_name_needs_overwrite(engine, shop, uploads):
    files, labels = uploads
    with pytest.raises(gr.Error, match="already exists"):
        ui.build_index(engine, files, str(labels), shop, "Flat", "IP", True, False)
    summary, *_ = ui.build_index(engine, files[:4], str(labels), shop, "Flat", "IP", True, True)
    assert len(engine.index(shop)) == 4


# --- Manage index --------------------------------------------------------------------------
def test_manage_table_lists_entries_and_filters_by_label(engine, shop):
    info, table, label_filter, thumbs, selected = ui.open_index(engine, shop)
    assert list(table.columns) == ["id", "label", "source"]
    assert len(table) == 24 and table["id"].tolist() == ids_of(engine, shop)
    assert "photos/0_0.jpg" in table["source"].tolist()
    assert "24 entries" in info and "6 labels" in info and "Flat / IP" in info
    assert [value for _, value in label_filter["choices"]] == sorted(LABELS)
    assert len(thumbs) == 24 and thumbs[0][1] == f"#0 {LABELS[0]}" and max(thumbs[0][0].size) <= 224
    assert selected == ""

    info, table, thumbs = ui.filter_entries(engine, shop, [LABELS[1], LABELS[2]])
    assert sorted(set(table["label"])) == sorted([LABELS[1], LABELS[2]]) and len(table) == 8
    assert "Showing 8 of 24 entries" in info
    assert {caption.split(" ", 1)[1] for _, caption in thumbs} == {LABELS[1], LABELS[2]}


def test_the_entries_table_pages_through_the_index_a_page_at_a_time(engine, shop, monkeypatch):
    monkeypatch.setattr(ui, "MAX_TABLE_ROWS", 10)
    info, table, *_ = ui.open_index(engine, shop)
    assert table["id"].tolist() == list(range(10)) and "Rows 1–10 of 24 (page 1 of 3)" in info
    info, table, thumbs, page = ui.page_after(engine, shop, None, "", 1)
    assert (table["id"].tolist(), page) == (list(range(10, 20)), 2) and "Rows 11–20 of 24 (page 2 of 3)" in info
    assert [c for _, c in thumbs][0] == f"#10 {table['label'][0]}"  # the previews follow the page
    info, table, _, page = ui.show_page(engine, shop, None, "", 99)  # past the end: the last page
    assert (table["id"].tolist(), page) == ([20, 21, 22, 23], 3)
    _, table, _, page = ui.page_before(engine, shop, None, "", 1)  # before the first: the first
    assert page == 1 and table["id"].tolist()[0] == 0
    # a click on page 2 keeps page 2 on screen, and selections span pages
    _, table, _, _ = ui.show_page(engine, shop, None, "", 2)
    selected, _, styled = ui.toggle_selection(engine, shop, "3", None, select_row(table.values.tolist()[0]), 2)
    assert selected == "3, 10" and styled.data["id"].tolist() == list(range(10, 20))
    # filtered and paged: only the label's rows, counted
    label = engine.index(shop).label(0)
    info, table, _, page = ui.show_page(engine, shop, [label], "", 1)
    assert set(table["label"]) == {label} and page == 1 and "Showing 4 of 24 entries" in info
    # the filter's own event: a label picked or typed (sent before the dropdown's value follows), or taken out
    other = engine.index(shop).label(23)
    picked = gr.SelectData(None, {"index": -1, "value": other, "selected": True})
    info, table, _ = ui.pick_label(engine, shop, [label], "", picked)
    assert set(table["label"]) == {label, other} and "Showing 8 of 24 entries" in info
    dropped = gr.SelectData(None, {"index": -1, "value": label, "selected": False})
    _, table, _ = ui.pick_label(engine, shop, [label, other], "", dropped)
    assert set(table["label"]) == {other}


def test_select_rows_then_remove_them(engine, shop):
    _, table, *_ = ui.open_index(engine, shop)
    rows = table.values.tolist()
    selected, thumbs, _ = ui.toggle_selection(engine, shop, "", None, select_row(rows[3]))
    selected, thumbs, styled = ui.toggle_selection(engine, shop, selected, None, select_row(rows[5]))
    assert selected == "3, 5" and [c for _, c in thumbs] == [f"#3 {rows[3][1]}", f"#5 {rows[5][1]}"]
    assert highlighted_ids(styled) == [3, 5]  # every selected row is marked, not only the last click
    selected, thumbs, _ = ui.toggle_selection(engine, shop, selected, None, select_row(rows[5]))  # deselects
    selected, thumbs, styled = ui.toggle_selection(engine, shop, selected, None, select_row(rows[3]))
    assert selected == "" and len(thumbs) == 24  # nothing selected: previews of the whole table again
    assert highlighted_ids(styled) == []
    selected, *_ = ui.toggle_selection(engine, shop, selected, None, select_row(rows[3]))
    selected, *_ = ui.toggle_selection(engine, shop, selected, None, select_row(rows[7]))
    assert selected == "3, 7"

    status, info, table, thumbs, cleared = ui.remove_entries(engine, shop, selected, None)
    assert "Removed 2" in status and cleared == ""
    assert 3 not in table["id"].tolist() and 7 not in table["id"].tolist() and len(table) == 22
    assert ids_of(engine, shop) == [i for i in range(24) if i not in (3, 7)]
    assert "22 entries" in info


def test_relabel_selected_entries_and_select_by_typed_ranges(engine, shop):
    info, styled, thumbs = ui.show_selection(engine, shop, "2-4, 9", None)
    assert highlighted_ids(styled) == [2, 3, 4, 9] and [c.split(" ")[0] for _, c in thumbs] == ["#2", "#3", "#4", "#9"]
    status, info, table, label_filter, thumbs, selected = ui.relabel_entries(engine, shop, "2-4, 9", "  新标签 new ")
    assert "Relabelled 4 entries as **新标签 new**: ids 2-4, 9" in status and selected == "2-4, 9"
    labels = {e.id: e.label for e in engine.index(shop).entries}
    assert [labels[i] for i in (2, 3, 4, 9)] == ["新标签 new"] * 4 and labels[5] != "新标签 new"
    assert "新标签 new" in [value for _, value in label_filter["choices"]]
    with pytest.raises(gr.Error, match="type the new label"):
        ui.relabel_entries(engine, shop, "1", "  ")
    with pytest.raises(gr.Error, match="999"):
        ui.relabel_entries(engine, shop, "1, 999", "x")
    assert {e.id: e.label for e in engine.index(shop).entries} == labels  # a refused relabel changes nothing


def test_selected_ids_read_back_as_ranges():
    assert ui.format_ids([7, 1, 2, 3, 9, 10]) == "1-3, 7, 9, 10"
    assert ui.format_ids([]) == ""
    from shitu.ids import parse_ids

    for ids in ([1, 2, 3, 7, 9, 10], [5], list(range(0, 40, 3)) + [41, 42, 43, 44]):
        assert parse_ids(ui.format_ids(ids)) == sorted(ids)


def test_zip_with_numbered_folders_needs_confirmation(engine, sample_gallery, tmp_path):
    root, _ = sample_gallery
    archive = tmp_path / "numbered.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(root.rglob("*.jpg")):
            zf.write(path, path.relative_to(root).as_posix())  # 0/1.jpg ... no label file
    with pytest.raises(gr.Error, match="folders are numbered"):
        ui.build_index(engine, [str(archive)], None, "numbered", "Flat", "IP", True, False)
    assert "numbered" not in engine.index_names()
    ui.build_index(engine, [str(archive)], None, "numbered", "Flat", "IP", True, False, False, True)
    assert set(engine.index("numbered").label_counts()) == {p.name for p in root.iterdir() if p.is_dir()}


@pytest.mark.parametrize(
    "ids, message",
    [("3, 999", "not in the index: 999"), ("3 x", "'x' is not an entry id"), ("", "select rows")],
)
def test_remove_bad_ids_is_a_toast_and_changes_nothing(engine, shop, ids, message):
    before = ids_of(engine, shop)
    with pytest.raises(gr.Error, match=message):
        ui.remove_entries(engine, shop, ids, None)
    assert ids_of(engine, shop) == before


def test_add_entries_to_an_index(engine, shop, sample_gallery, tmp_path):
    root, _ = sample_gallery
    extra = tmp_path / "extra"
    extra.mkdir()
    shutil.copy(root / "0" / "0.jpg", extra / "new_cat.jpg")
    labels = tmp_path / "more.txt"
    labels.write_text("new_cat.jpg 猫 cat\n", encoding="utf-8")
    summary, info, table, label_filter, _ = ui.add_entries(engine, shop, [str(extra / "new_cat.jpg")], str(labels))
    assert "Added 1 entries to `shop`" in summary
    assert table["id"].tolist()[-1] == 24 and table["label"].tolist()[-1] == LABELS[0]
    assert "25 entries" in info

    broken = extra / "broken.png"
    broken.write_bytes(b"not a png")
    labels.write_text("broken.png 坏\n", encoding="utf-8")
    with pytest.raises(gr.Error, match="not a readable image"):
        ui.add_entries(engine, shop, [str(broken)], str(labels), False)
    assert len(engine.index(shop)) == 25


def test_rename_delete_export_import_round_trip(engine, shop, tmp_path):
    status, manage_dropdown, rec_dropdown = ui.rename_index(engine, shop, "store")
    assert "Renamed" in status and manage_dropdown["value"] == rec_dropdown["value"] == "store"
    assert engine.index_names() == ["store"]
    with pytest.raises(gr.Error, match="invalid index name"):
        ui.rename_index(engine, "store", "no spaces please")
    assert engine.index_names() == ["store"]

    status, download = ui.export_index(engine, "store")
    exported = Path(download["value"])
    assert download["visible"] and exported.name == "store.zip"
    with zipfile.ZipFile(exported) as zf:
        assert {"store/vector.index", "store/id_map.yaml"} <= set(zf.namelist())

    with pytest.raises(gr.Error, match="tick the confirmation box"):
        ui.delete_index(engine, "store", False)
    assert engine.index_names() == ["store"]
    status, manage_dropdown, _, confirm = ui.delete_index(engine, "store", True)
    assert "Deleted" in status and engine.index_names() == [] and confirm is False
    assert manage_dropdown["value"] is None
    # an empty studio still renders the Manage tab
    info, table, *_ = ui.open_index(engine, None)
    assert len(table) == 0 and "No indices yet" in info

    status, *_ = ui.import_index(engine, str(exported), "", False)
    assert "Imported `store`: 24 entries, 6 labels" in status
    assert engine.index("store").label_counts() == {label: 4 for label in LABELS}
    with pytest.raises(gr.Error, match="already exists"):
        ui.import_index(engine, str(exported), "store", False)
    not_zip = tmp_path / "index.zip"
    not_zip.write_text("hello")
    with pytest.raises(gr.Error, match="not a readable .zip"):
        ui.import_index(engine, str(not_zip), "other", False)
    assert engine.index_names() == ["store"]


# --- Recognize -----------------------------------------------------------------------------
def test_recognize_held_out_view(engine, shop, sample_queries):
    image, table, summary, json_path, evidence, state = ui.recognize_image(engine, str(sample_queries[3]), shop)
    assert image.size[0] > 0
    assert list(table.columns) == ["#", "answer", "score", "top-k candidates (✗: below the threshold)"]
    assert table["answer"].iloc[0] == LABELS[2]
    assert "None" not in table.to_string()
    for stage in ("detect", "embed", "search", "total"):
        assert stage in summary
    assert "cosine similarities" in summary and "threshold" in summary
    data = json.loads(Path(json_path).read_text(encoding="utf-8"))
    assert data["index"] == shop and data["boxes"][0]["labels"][0] == LABELS[2]
    assert data["boxes"][0]["det_label"] is not None or data["boxes"][0]["whole_image"]  # kept in the JSON ...
    assert "detector" not in table.columns  # ... and not shown as if it were an answer
    assert state["result"].index_name == shop and len(state["owners"]) == len(evidence)


def test_evidence_shows_each_box_and_the_gallery_photos_it_matched(engine, shop, sample_queries):
    _, table, _, _, evidence, state = ui.recognize_image(engine, str(sample_queries[0]), shop, None, None, 3)
    result = state["result"]
    index = engine.index(shop)
    for n, obj in enumerate(result.objects):
        captions = [caption for (_, caption), owner in zip(evidence, state["owners"]) if owner == n]
        assert captions[0] == f"box {n + 1} (query)"  # the box's own crop first
        matched = captions[1:]
        assert 1 <= len(matched) <= ui.MAX_EVIDENCE_PER_BOX
        label, score, id_ = obj.candidates[0]
        assert matched[0] == f"{n + 1}: {label} {score:.3f} {'✓' if obj.recognized else '✗'} #{id_}"
        assert index.entry(id_).label == label  # the photo shown is the entry named
    recognised = [o for o in result.objects if o.recognized]
    assert recognised and {o.label for o in recognised} <= set(LABELS)

    # an entry removed since the query is no longer shown; the others still are
    gone = result.objects[0].candidates[0][2]
    engine.remove(shop, [gone])
    items, owners = ui.evidence(engine, result)
    captions = [caption for _, caption in items]
    assert not any(c.endswith(f" #{gone}") for c in captions)
    assert len(captions) == len(evidence) - 1 and len(owners) == len(captions)


def test_unknown_boxes_show_their_near_miss(engine, shop, sample_queries):
    # a threshold nothing can reach: every box is unknown, with its best candidate and the threshold
    image, table, summary, _, evidence, state = ui.recognize_image(
        engine, str(sample_queries[1]), shop, None, 1.0, 5, "auto", False, 0.5
    )
    assert len(table) >= 1 and "None" not in table.to_string()
    for answer, obj in zip(table["answer"], state["result"].objects):
        label, score, _ = obj.candidate
        assert answer == f"unknown — maybe {label} {score:.3f} < 1.00"
    assert set(table["score"]) == {"—"}
    assert all(cell.count("✗") == len(cell.split("; ")) for cell in table.iloc[:, 3])  # all below: all marked
    assert "0 recognised" in summary
    assert all("✗" in caption for caption, owner in ((c, o) for (_, c), o in zip(evidence, state["owners"]))
               if "(query)" not in caption)  # fmt: skip


def test_recognize_in_chinese(engine, shop, sample_queries):
    _, table, summary, *_ = ui.recognize_image(
        engine, str(sample_queries[1]), shop, None, 1.0, 5, "auto", True, 0.5, FakeRequest("zh-CN,zh;q=0.9")
    )
    assert "结果" in table.columns and all(a.startswith("未知 — 可能是 ") for a in table["结果"])
    assert "合计" in summary and "余弦相似度" in summary


def test_clicks_on_a_row_the_image_or_the_evidence_highlight_the_same_box(engine, shop, sample_queries):
    plain, _, _, _, evidence, state = ui.recognize_image(
        engine, str(sample_queries[0]), shop, None, None, 3, "never", False, 0.5
    )
    objects = state["result"].objects
    assert len(objects) >= 2
    first, second = objects[0], objects[1]
    by_row, styled_row = ui.select_row(state, gr.SelectData(None, {"index": [1, 0], "value": 2}))
    x = (second.bbox[0] + second.bbox[2]) / 2
    y = (second.bbox[1] + second.bbox[3]) / 2
    if first.bbox[0] <= x <= first.bbox[2] and first.bbox[1] <= y <= first.bbox[3]:
        pytest.skip("the boxes overlap at the second one's centre")
    by_click, styled_click = ui.select_on_image(state, gr.SelectData(None, {"index": [x, y], "value": None}))
    item = state["owners"].index(1)
    by_evidence, _ = ui.select_evidence(state, gr.SelectData(None, {"index": item, "value": None}))
    import numpy as np

    assert np.array_equal(np.asarray(by_row), np.asarray(by_click))
    assert np.array_equal(np.asarray(by_row), np.asarray(by_evidence))
    assert not np.array_equal(np.asarray(by_row), np.asarray(plain))  # the drawing changed
    for styled in (styled_row, styled_click):
        marked = [r for (r, _), props in styled._compute().ctx.items() if any("#fde68a" in v for _, v in props)]
        assert set(marked) == {1}
    nowhere = ui.select_on_image(state, gr.SelectData(None, {"index": [-5, -5], "value": None}))
    assert all(isinstance(v, type(gr.skip())) for v in nowhere) or nowhere == (gr.skip(), gr.skip())


def test_examples_belong_to_the_index(engine, shop):
    examples = ui.examples_for(engine, shop)
    labels = {caption.split(" · ")[0] for _, caption in examples}
    assert 1 <= len(examples) <= 8 and labels <= set(LABELS) and len(labels) == len(examples)
    assert ui.examples_for(engine, "no-such-index") == []


def test_recognize_errors_are_toasts(engine, shop, tmp_path):
    with pytest.raises(gr.Error, match="upload, paste or take a picture"):
        ui.recognize_image(engine, None, shop)
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"garbage")
    with pytest.raises(gr.Error, match="not a readable image"):
        ui.recognize_image(engine, str(corrupt), shop)
    with pytest.raises(gr.Error, match="no index named 'nope'"):
        ui.recognize_image(engine, str(corrupt), "nope")


# --- user errors and progress, as wired into the page ---------------------------------------
def test_a_user_error_keeps_every_output_and_says_so_inline(engine, shop, monkeypatch):
    warnings = []
    monkeypatch.setattr(ui.gr, "Warning", lambda message, **kw: warnings.append(message))
    remove = ui.soft_errors(ui._bind(ui.remove_entries, engine), 5, status=0)
    status, *rest = remove(shop, "", None, request=FakeRequest("zh-CN"))
    assert warnings == ["请先在表格中选中行（或输入 id）"]  # the UI's own message, translated
    assert "shitu-inline-error" in status and "请先在表格中选中行" in status
    assert all(isinstance(v, type(gr.skip())) for v in rest)  # the table and previews stay as they were
    remove(shop, "3, 999", None)
    assert "not in the index: 999" in warnings[-1]
    assert ids_of(engine, shop) == list(range(24))


def test_a_failed_model_switch_puts_the_dropdown_back(engine, monkeypatch):
    monkeypatch.setattr(ui.gr, "Warning", lambda message, **kw: None)
    demo = ui.build_demo(engine)
    switch = next(b for b in demo.fns.values() if b.fn.__name__ == "switch_model" and len(b.outputs) == 4)
    *_, dropdown = switch.fn("PP-ShiTuV2_rec_CLIP_vit_base")
    assert dropdown["value"] == engine.models()["recognition"]["model_name"] == "PP-ShiTuV2_rec"


def test_long_jobs_stream_a_progress_bar_from_the_start(engine, uploads):
    files, labels = uploads
    build = ui.live_progress(ui._bind(ui.build_index, engine), 4, 3, every=0.05)
    frames = list(build(files, str(labels), "streamed", "Flat", "IP", True, False))
    first, last = frames[0], frames[-1]
    assert 'role="progressbar"' in first[3] and all(isinstance(v, type(gr.skip())) for v in first[:3])
    counted = [f[3] for f in frames[1:-1] if "aria-valuenow" in f[3]]
    assert counted, "the bar counts images while they are embedded"
    assert "done in" in last[3] and "streamed" in last[0] and last[1]["value"] == "streamed"
    assert "progress" not in inspect.signature(build).parameters  # Gradio must not inject its own


def test_progress_bar_text():
    bar = ui.LiveProgress("en")
    assert "Reading the upload" in bar.html() and "indeterminate" in bar.html()
    bar((40, 160), desc="embedding")
    text = bar.html()
    assert "Embedding images: 40 / 160" in text and 'aria-valuenow="40"' in text and "width:25.0%" in text
    bar((160, 160), desc="embedding")
    assert "Saving the index" in bar.html()
    zh = ui.LiveProgress("zh")
    zh((1, 2), desc="reading images")
    assert "读取图片: 1 / 2" in zh.html()


# --- Models & about ------------------------------------------------------------------------
def test_models_tab_shows_the_starter_pack(engine, shop):
    text = ui.models_markdown(engine)
    assert engine.models()["recognition"]["source"] == "starter"  # the tests run offline
    assert "`PP-ShiTuV2_rec`, offline starter pack: ImageNet MobileNetV2 features" in text
    banner = ui.models_banner(engine)
    assert "Offline starter pack running" in banner and "lower accuracy" in banner
    assert "离线入门模型包" in ui.models_banner(engine, FakeRequest("zh-CN"))
    for package in ("paddlex", "paddlepaddle", "faiss", "gradio"):
        assert package in text
    assert "| shop | 24 | 6 | Flat | IP |" in text and "usable" in text
    assert "模型" in ui.models_markdown(engine, FakeRequest("zh-CN"))


def test_switching_to_an_unavailable_model_is_a_toast(engine):
    before = engine.models()["recognition"]["model_name"]
    with pytest.raises(gr.Error, match="not available here"):
        ui.switch_model(engine, "PP-ShiTuV2_rec_CLIP_vit_base")
    with pytest.raises(gr.Error, match="unknown recognition model"):
        ui.switch_model(engine, "resnet")
    assert engine.models()["recognition"]["model_name"] == before


# --- wiring --------------------------------------------------------------------------------
def test_demo_has_five_tabs_and_named_endpoints(engine, shop):
    demo = ui.build_demo(engine)
    config = demo.get_config_file()
    tabs = [c["props"].get("label") for c in config["components"] if c.get("type") == "tabitem"]
    assert [str(t) for t in tabs] == [
        str(ui.I18N(k)) for k in ("tab_recognize", "tab_build", "tab_manage", "tab_evaluate", "tab_models")
    ]
    api_names = {fn.api_name for fn in demo.fns.values()}
    assert {"recognize", "build_index", "remove_entries", "add_entries", "rename_index", "delete_index",
            "export_index", "import_index", "switch_model", "filter_entries", "evaluate", "versions",
            "version_changes", "restore_version"} <= api_names  # fmt: skip


def test_bound_handlers_keep_what_gradio_injects(engine):
    from gradio.helpers import special_args

    _, progress_index, _, _ = special_args(ui._bind(ui.build_index, engine), [None] * 9)
    assert progress_index == 10  # after the 9 inputs and the request
    click = gr.EventData(None, {"index": [0, 0], "value": 3, "row_value": [3, "x", "y"]})
    inputs, _, event_index, _ = special_args(
        ui._bind(ui.toggle_selection, engine), ["shop", "", None], event_data=click
    )
    assert inputs[:3] == ["shop", "", None] and isinstance(inputs[3], gr.SelectData) and event_index == 3


def test_wired_handlers_still_get_the_request(engine):
    """Wrappers (user errors, progress, sign-in) must keep the type hints Gradio reads, or the
    request — the visitor's language and session — silently becomes None."""
    from gradio.helpers import special_args

    demo = ui.build_demo(engine)
    request = gr.Request()
    checked = 0
    for block in demo.fns.values():
        if "request" not in inspect.signature(block.fn).parameters:
            continue
        inputs, progress_index, *_ = special_args(block.fn, [None] * len(block.inputs), request=request)
        assert request in inputs, block.name
        if block.api_name is None or block.api_visibility == "private":
            assert progress_index is None, block.name  # the page shows our own bar, not an overlay per output
        checked += 1
    assert checked >= 20


def test_named_endpoints_keep_errors_errors_while_the_page_gets_toasts(engine, shop, monkeypatch):
    """Programmatic callers of /gradio_api/... learn that a change was refused; the page's own
    event for the same button shows a toast and keeps its outputs."""
    monkeypatch.setattr(ui.gr, "Warning", lambda message, **kw: None)
    demo = ui.build_demo(engine)
    named = {b.api_name: b for b in demo.fns.values() if b.api_visibility != "private" and b.api_name}
    with pytest.raises(gr.Error, match="tick the confirmation box"):
        named["delete_index"].fn(shop, False)
    page = [b for b in demo.fns.values() if b.api_visibility == "private" and b.fn.__name__ == "delete_index"]
    status, *rest = page[0].fn(shop, False)
    assert "tick the confirmation box" in status and shop in engine.index_names()


def test_build_app_serves_ui_and_api_on_one_port(engine, shop):
    from fastapi.testclient import TestClient

    from app import build_app

    client = TestClient(build_app(engine, prepare_sample=False))
    page = client.get("/")
    assert page.status_code == 200 and "gradio" in page.text.lower()
    config = client.get("/config").json()
    assert "i18n_translations" in config and "zh" in config["i18n_translations"]


def test_with_a_token_visitors_recognise_but_only_signed_in_sessions_change(engine, shop):
    """The UI no longer locks everyone out: recognising is open, changes need a sign-in (see
    tests/test_security.py for the same through Gradio's own endpoints)."""
    import gradio as gr

    from shitu.access import AccessPolicy
    from shitu.ui import SessionAccess

    access = SessionAccess(AccessPolicy(token="s3cret", restricted=True))
    remove = access.guard(ui._bind(ui.remove_entries, engine))
    visitor, owner = FakeRequest("en", "v"), FakeRequest("en", "o")
    with pytest.raises(gr.Error, match="access token"):
        remove(shop, "0", None, request=visitor)
    with pytest.raises(gr.Error, match="wrong access token"):
        access.sign_in("nope", request=visitor)
    assert "Signed in" in access.sign_in("s3cret", request=owner)
    remove(shop, "0", None, request=owner)
    assert 0 not in engine.index(shop).id_map
    with pytest.raises(gr.Error):
        remove(shop, "1", None, request=visitor)
    assert 1 in engine.index(shop).id_map


def test_threshold_slider_follows_the_index(engine, sample_gallery):
    from shitu.gallery import read_label_file
    from shitu.ui import threshold_for_index

    root, labels = sample_gallery
    engine.build("plain", read_label_file(labels, root), index_type="Flat")
    calibrated = engine.index("plain").calibration.threshold
    assert threshold_for_index(engine, "plain")["value"] == calibrated  # the index's own, measured on its gallery
    engine.set_threshold("plain", 0.25)  # a point the user picked on the curve
    assert threshold_for_index(engine, "plain")["value"] == 0.25
    from shitu.gallery import GalleryBatch

    two = [i for i in read_label_file(labels, root).items if i.label in {"猫 cat", "咖啡 coffee"}]
    engine.build("two", GalleryBatch(items=two))
    assert engine.index("two").calibration is None  # two labels cannot be calibrated: the model's default
    assert threshold_for_index(engine, "two")["value"] == engine.default_rec_threshold
    assert "value" not in threshold_for_index(engine, "no-such-index")


def test_models_tab_shows_background_download_progress_and_stale_indices():
    downloading = {"state": "downloading", "running": True,
                   "models": {"PP-ShiTuV2_rec": {"stage": "recognition", "state": "downloading",
                                                 "done": 3_000_000, "total": 16_000_000}}}  # fmt: skip
    text = "\n".join(ui._download_lines(downloading, "en"))
    assert "3 / 16 MB" in text and "starter pack answers meanwhile" in text
    switched = {"state": "switched", "models": {}, "indices": {"mine": False, "sample": True}}
    text = "\n".join(ui._download_lines(switched, "zh"))
    assert "官方权重" in text and "`mine`" in text and "`sample`" not in text
    assert ui._download_lines({"state": "nothing to do"}, "en") == []


# --- Evaluate, teach, versions ----------------------------------------------------------------
def test_evaluate_handler_reports_the_gallery_and_its_curve(engine, shop):
    (summary, calibration, curve, slider, point, gallery_map, labels, pairs, flagged, examples,
     files) = ui.evaluate_index(engine, shop, FakeRequest("en"))  # fmt: skip
    assert "24 entries, 6 labels" in summary and "recall@1" in summary
    assert "unknown objects rejected" in calibration and "<svg" in curve and "<svg" in gallery_map
    assert gallery_map.count("<circle") >= 24
    assert slider["interactive"] and slider["value"] == engine.index(shop).calibration.threshold
    assert list(labels.columns)[:2] == ["label", "photos"] and len(labels) == 6
    names = [Path(f).name for f in files]
    assert names == ["shop_report.html", "shop_labels.csv", "shop_entries.csv", "shop_pairs.csv"]
    assert "<html" in Path(files[0]).read_text(encoding="utf-8").lower()
    zh = ui.evaluate_index(engine, shop, FakeRequest("zh-CN"))
    assert "个条目" in zh[0] and "标签" in zh[6].columns[0]
    curve2, point2 = ui.operating_point(engine, shop, 0.3, FakeRequest("en"))
    assert "At **0.300**" in point2 and curve2 != curve
    with pytest.raises(gr.Error, match="choose an index first"):
        ui.evaluate_index(engine, None)


def test_use_threshold_follows_on_the_recognize_tab_only_for_the_same_index(engine, shop):
    status, calibration, slider, curve = ui.use_threshold(engine, shop, 0.55, shop)
    assert "0.550" in status and "picked by you" in calibration and slider["value"] == 0.55
    _, _, elsewhere, _ = ui.use_threshold(engine, shop, 0.6, "another")
    assert not isinstance(elsewhere, dict) or "value" not in elsewhere  # gr.skip(): that slider is left alone
    assert engine.index(shop).calibration.threshold == 0.6


def test_teach_needs_a_result_and_a_label(engine, shop):
    with pytest.raises(gr.Error, match="recognize an image first"):
        ui.teach_box(engine, None, "1", "x")
    box, label = ui.teach_choices(None)
    assert box["choices"] == [] and label["value"] == ""


def test_versions_table_changes_and_restore(engine, shop):
    engine.remove(shop, [0, 1])
    table = ui.versions_table(engine, shop, FakeRequest("en"))
    assert list(table["change"]) == ["remove 2", "build"] and list(table["current"]) == ["✓", ""]
    text = ui.show_version_changes(engine, shop, 2, FakeRequest("en"))
    assert "2 removed" in text and "#0" in text
    status, after = ui.restore_version(engine, shop, 1, FakeRequest("en"))
    assert "Version 1 restored as version 3" in status and len(engine.index(shop)) == 24
    assert after.iloc[0]["change"] == "restore v1"
    with pytest.raises(gr.Error, match="pick a version first"):
        ui.restore_version(engine, shop, None)
    with pytest.raises(gr.Error, match="no version 9"):
        ui.show_version_changes(engine, shop, 9)


@pytest.mark.slow  # worker processes: seconds each (runs with --full)
def test_a_large_gallery_upload_starts_the_gallery_workers_before_the_build(tmp_path, sample_gallery, monkeypatch):
    """Uploading a gallery big enough for the gallery workers (SHITU_BUILD_WORKERS) starts them in the
    background, so the build finds them up; a small upload starts nothing."""
    import shitu.runtime
    from shitu.config import PipelineConfig
    from shitu.engine import Engine
    from shitu.runtime import Runtime

    from .conftest import make_settings, wait_until

    monkeypatch.setattr(shitu.runtime, "LANE_MIN_IMAGES", 20)
    root, labels = sample_gallery
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    archive = tmp_path / "gallery.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in images:
            zf.write(p, p.relative_to(root).as_posix())
        zf.write(labels, "gallery.txt")
    rt = Runtime(PipelineConfig(), make_settings(tmp_path / "rt", build_workers=2), isolate=False)
    try:
        engine = Engine(make_settings(tmp_path / "data"), runtime=rt)
        ui.expect_gallery(engine, [str(p) for p in images[:3]] + [str(labels)])
        assert not rt._lanes._executors
        ui.expect_gallery(engine, [str(archive)])
        wait_until(lambda: rt._lanes.running and rt._lanes._users == 0, "the gallery workers to start")
    finally:
        rt.close()
