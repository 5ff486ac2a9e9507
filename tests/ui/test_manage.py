"""The Manage tab's handlers: the entries table a page at a time, selecting, removing, relabelling,
adding, renaming, deleting, exporting and importing, and versions."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import gradio as gr
import pytest

from shitu.ui import manage

from .conftest import LABELS, FakeRequest, highlighted_ids, ids_of, row_click


@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def test_manage_table_lists_entries_and_filters_by_label(engine, shop):
    info, table, label_filter, thumbs, selected = manage.open_index(engine, shop)
    assert list(table.columns) == ["id", "label", "source"]
    assert len(table) == 24 and table["id"].tolist() == ids_of(engine, shop)
    assert "photos/0_0.jpg" in table["source"].tolist()
    assert "24 entries" in info and "6 labels" in info and "Flat / IP" in info
    assert [value for _, value in label_filter["choices"]] == sorted(LABELS)
    assert len(thumbs) == 24 and thumbs[0][1] == f"#0 {LABELS[0]}" and max(thumbs[0][0].size) <= 224
    assert selected == ""

    info, table, thumbs = manage.filter_entries(engine, shop, [LABELS[1], LABELS[2]])
    assert sorted(set(table["label"])) == sorted([LABELS[1], LABELS[2]]) and len(table) == 8
    assert "Showing 8 of 24 entries" in info
    assert {caption.split(" ", 1)[1] for _, caption in thumbs} == {LABELS[1], LABELS[2]}


@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def test_the_entries_table_pages_through_the_index_a_page_at_a_time(engine, shop, monkeypatch):
    monkeypatch.setattr(manage, "MAX_TABLE_ROWS", 10)
    info, table, *_ = manage.open_index(engine, shop)
    assert table["id"].tolist() == list(range(10)) and "Rows 1–10 of 24 (page 1 of 3)" in info
    info, table, thumbs, page = manage.page_after(engine, shop, None, "", 1)
    assert (table["id"].tolist(), page) == (list(range(10, 20)), 2) and "Rows 11–20 of 24 (page 2 of 3)" in info
    assert [c for _, c in thumbs][0] == f"#10 {table['label'][0]}"  # the previews follow the page
    info, table, _, page = manage.show_page(engine, shop, None, "", 99)  # past the end: the last page
    assert (table["id"].tolist(), page) == ([20, 21, 22, 23], 3)
    _, table, _, page = manage.page_before(engine, shop, None, "", 1)  # before the first: the first
    assert page == 1 and table["id"].tolist()[0] == 0
    # a click on page 2 keeps page 2 on screen, and selections span pages
    _, table, _, _ = manage.show_page(engine, shop, None, "", 2)
    selected, _, styled = manage.toggle_selection(engine, shop, "3", None, row_click(table.values.tolist()[0]), 2)
    assert selected == "3, 10" and styled.data["id"].tolist() == list(range(10, 20))
    # filtered and paged: only the label's rows, counted
    label = engine.index(shop).label(0)
    info, table, _, page = manage.show_page(engine, shop, [label], "", 1)
    assert set(table["label"]) == {label} and page == 1 and "Showing 4 of 24 entries" in info
    # the filter's own event: a label picked or typed (sent before the dropdown's value follows), or taken out
    other = engine.index(shop).label(23)
    picked = gr.SelectData(None, {"index": -1, "value": other, "selected": True})
    info, table, _ = manage.pick_label(engine, shop, [label], "", picked)
    assert set(table["label"]) == {label, other} and "Showing 8 of 24 entries" in info
    dropped = gr.SelectData(None, {"index": -1, "value": label, "selected": False})
    _, table, _ = manage.pick_label(engine, shop, [label, other], "", dropped)
    assert set(table["label"]) == {other}


@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def test_select_rows_then_remove_them(engine, shop):
    _, table, *_ = manage.open_index(engine, shop)
    rows = table.values.tolist()
    selected, thumbs, _ = manage.toggle_selection(engine, shop, "", None, row_click(rows[3]))
    selected, thumbs, styled = manage.toggle_selection(engine, shop, selected, None, row_click(rows[5]))
    assert selected == "3, 5" and [c for _, c in thumbs] == [f"#3 {rows[3][1]}", f"#5 {rows[5][1]}"]
    assert highlighted_ids(styled) == [3, 5]  # every selected row is marked, not only the last click
    selected, thumbs, _ = manage.toggle_selection(engine, shop, selected, None, row_click(rows[5]))  # deselects
    selected, thumbs, styled = manage.toggle_selection(engine, shop, selected, None, row_click(rows[3]))
    assert selected == "" and len(thumbs) == 24  # nothing selected: previews of the whole table again
    assert highlighted_ids(styled) == []
    selected, *_ = manage.toggle_selection(engine, shop, selected, None, row_click(rows[3]))
    selected, *_ = manage.toggle_selection(engine, shop, selected, None, row_click(rows[7]))
    assert selected == "3, 7"

    status, info, table, thumbs, cleared = manage.remove_entries(engine, shop, selected, None)
    assert "Removed 2" in status and cleared == ""
    assert 3 not in table["id"].tolist() and 7 not in table["id"].tolist() and len(table) == 22
    assert ids_of(engine, shop) == [i for i in range(24) if i not in (3, 7)]
    assert "22 entries" in info


@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def test_relabel_selected_entries_and_select_by_typed_ranges(engine, shop):
    info, styled, thumbs = manage.show_selection(engine, shop, "2-4, 9", None)
    assert highlighted_ids(styled) == [2, 3, 4, 9] and [c.split(" ")[0] for _, c in thumbs] == ["#2", "#3", "#4", "#9"]
    relabelled = manage.relabel_entries(engine, shop, "2-4, 9", "  新标签 new ")
    status, info, table, label_filter, thumbs, selected = relabelled
    assert "Relabelled 4 entries as **新标签 new**: ids 2-4, 9" in status and selected == "2-4, 9"
    labels = {e.id: e.label for e in engine.index(shop).entries}
    assert [labels[i] for i in (2, 3, 4, 9)] == ["新标签 new"] * 4 and labels[5] != "新标签 new"
    assert "新标签 new" in [value for _, value in label_filter["choices"]]
    with pytest.raises(gr.Error, match="type the new label"):
        manage.relabel_entries(engine, shop, "1", "  ")
    with pytest.raises(gr.Error, match="999"):
        manage.relabel_entries(engine, shop, "1, 999", "x")
    assert {e.id: e.label for e in engine.index(shop).entries} == labels  # a refused relabel changes nothing


def test_selected_ids_read_back_as_ranges():
    assert manage.format_ids([7, 1, 2, 3, 9, 10]) == "1-3, 7, 9, 10"
    assert manage.format_ids([]) == ""
    from shitu.ids import parse_ids

    for ids in ([1, 2, 3, 7, 9, 10], [5], list(range(0, 40, 3)) + [41, 42, 43, 44]):
        assert parse_ids(manage.format_ids(ids)) == sorted(ids)


@pytest.mark.parametrize(
    "ids, message",
    [("3, 999", "not in the index: 999"), ("3 x", "'x' is not an entry id"), ("", "select rows")],
)
def test_remove_bad_ids_is_a_toast_and_changes_nothing(engine, shop, ids, message):
    before = ids_of(engine, shop)
    with pytest.raises(gr.Error, match=message):
        manage.remove_entries(engine, shop, ids, None)
    assert ids_of(engine, shop) == before


@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def test_add_entries_to_an_index(engine, shop, sample_gallery, tmp_path):
    root, _ = sample_gallery
    extra = tmp_path / "extra"
    extra.mkdir()
    shutil.copy(root / "0" / "0.jpg", extra / "new_cat.jpg")
    labels = tmp_path / "more.txt"
    labels.write_text("new_cat.jpg 猫 cat\n", encoding="utf-8")
    summary, info, table, label_filter, _ = manage.add_entries(engine, shop, [str(extra / "new_cat.jpg")], str(labels))
    assert "Added 1 entries to `shop`" in summary
    assert table["id"].tolist()[-1] == 24 and table["label"].tolist()[-1] == LABELS[0]
    assert "25 entries" in info

    broken = extra / "broken.png"
    broken.write_bytes(b"not a png")
    labels.write_text("broken.png 坏\n", encoding="utf-8")
    with pytest.raises(gr.Error, match="not a readable image"):
        manage.add_entries(engine, shop, [str(broken)], str(labels), False)
    assert len(engine.index(shop)) == 25


@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def test_rename_delete_export_import_round_trip(engine, shop, tmp_path):
    status, manage_dropdown, rec_dropdown = manage.rename_index(engine, shop, "store")
    assert "Renamed" in status and manage_dropdown["value"] == rec_dropdown["value"] == "store"
    assert engine.index_names() == ["store"]
    with pytest.raises(gr.Error, match="invalid index name"):
        manage.rename_index(engine, "store", "no spaces please")
    assert engine.index_names() == ["store"]

    status, download = manage.export_index(engine, "store")
    exported = Path(download["value"])
    assert download["visible"] and exported.name == "store.zip"
    with zipfile.ZipFile(exported) as zf:
        assert {"store/vector.index", "store/id_map.yaml"} <= set(zf.namelist())

    with pytest.raises(gr.Error, match="tick the confirmation box"):
        manage.delete_index(engine, "store", False)
    assert engine.index_names() == ["store"]
    status, manage_dropdown, _, confirm = manage.delete_index(engine, "store", True)
    assert "Deleted" in status and engine.index_names() == [] and confirm is False
    assert manage_dropdown["value"] is None
    # an empty studio still renders the Manage tab
    info, table, *_ = manage.open_index(engine, None)
    assert len(table) == 0 and "No indices yet" in info

    status, *_ = manage.import_index(engine, str(exported), "", False)
    assert "Imported `store`: 24 entries, 6 labels" in status
    assert engine.index("store").label_counts() == {label: 4 for label in LABELS}
    with pytest.raises(gr.Error, match="already exists"):
        manage.import_index(engine, str(exported), "store", False)
    not_zip = tmp_path / "index.zip"
    not_zip.write_text("hello")
    with pytest.raises(gr.Error, match="not a readable .zip"):
        manage.import_index(engine, str(not_zip), "other", False)
    assert engine.index_names() == ["store"]


@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def test_versions_table_changes_and_restore(engine, shop):
    engine.remove(shop, [0, 1])
    table = manage.versions_table(engine, shop, FakeRequest("en"))
    assert list(table["change"]) == ["remove 2", "build"] and list(table["current"]) == ["✓", ""]
    text = manage.show_version_changes(engine, shop, 2, FakeRequest("en"))
    assert "2 removed" in text and "#0" in text
    status, after = manage.restore_version(engine, shop, 1, FakeRequest("en"))
    assert "Version 1 restored as version 3" in status and len(engine.index(shop)) == 24
    assert after.iloc[0]["change"] == "restore v1"
    with pytest.raises(gr.Error, match="pick a version first"):
        manage.restore_version(engine, shop, None)
    with pytest.raises(gr.Error, match="no version 9"):
        manage.show_version_changes(engine, shop, 9)
