"""The Build tab's handler through the real engine and models: uploads as Gradio sends them (file
paths), user errors as ``gr.Error`` toasts that leave every index as it was."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import gradio as gr
import pytest

from shitu.ui import build, uploads

from .conftest import LABELS, ids_of


@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def test_build_from_uploaded_files_reports_skipped_lines(engine, uploads):
    files, labels = uploads
    summary, rec_dropdown, manage_dropdown = build.build_index(
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


@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def test_label_file_may_come_with_the_images(engine, uploads):
    files, labels = uploads
    summary, *_ = build.build_index(engine, [*files, str(labels)], None, "shop", "IVF", "L2", True, False)
    assert "**24** images" in summary
    assert engine.index("shop").summary()["index_type"] == "IVF"


@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def test_build_from_zip_with_its_own_label_file(engine, sample_gallery, tmp_path):
    root, _ = sample_gallery
    archive = tmp_path / "gallery.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                zf.write(path, f"gallery/{path.relative_to(root)}")  # wrapped in a folder, like zipping one
    summary, *_ = build.build_index(engine, [str(archive)], None, "zipped", "HNSW32", "IP", True, False)
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
    build.build_index(engine, str(archive), str(labels), "two", "Flat", "IP", True, False)
    assert engine.index("two").label_counts() == {LABELS[0]: 4, LABELS[1]: 4}


@pytest.mark.parametrize(
    "case, message",
    [
        ("no_files", "no gallery files were uploaded"),
        ("no_label_file", "label file is missing"),
        ("not_utf8", "not UTF-8"),
        ("no_pairs", "no image/label pairs could be used"),
        ("empty_label_file", "the label file empty.txt lists no images: it needs one line per image"),
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
    elif case == "empty_label_file":
        empty = tmp_path / "empty.txt"
        empty.write_text("# just a comment\n\n", encoding="utf-8")
        label_arg = str(empty)
    elif case == "same_names":
        twin = tmp_path / "twin"
        twin.mkdir()
        files = [*files, str(shutil.copy(files[0], twin / Path(files[0]).name))]
    elif case == "zip_and_images":
        files = [*files, str(tmp_path / "x.zip")]
    elif case == "bad_name":
        name = "../escape"
    with pytest.raises(gr.Error, match=message):
        build.build_index(engine, files, label_arg, name, "HNSW32", "IP", True, False)
    assert (engine.index_names(), ids_of(engine, shop)) == before


@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
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
        build.build_index(engine, all_files, str(labels), shop, "Flat", "IP", False, True)
    assert ids_of(engine, shop) == before

    # lenient: the build goes ahead and the summary names the line and the reason
    summary, *_ = build.build_index(engine, all_files, str(labels), "lenient", "Flat", "IP", True, False)
    assert "line 27" in summary and "not a readable image" in summary
    assert "坏 broken" not in engine.index("lenient").label_counts()


@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def test_existing_name_needs_overwrite(engine, shop, uploads):
    files, labels = uploads
    with pytest.raises(gr.Error, match="already exists"):
        build.build_index(engine, files, str(labels), shop, "Flat", "IP", True, False)
    summary, *_ = build.build_index(engine, files[:4], str(labels), shop, "Flat", "IP", True, True)
    assert len(engine.index(shop)) == 4


@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def test_zip_with_numbered_folders_needs_confirmation(engine, sample_gallery, tmp_path):
    root, _ = sample_gallery
    archive = tmp_path / "numbered.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(root.rglob("*.jpg")):
            zf.write(path, path.relative_to(root).as_posix())  # 0/1.jpg ... no label file
    with pytest.raises(gr.Error, match="folders are numbered"):
        build.build_index(engine, [str(archive)], None, "numbered", "Flat", "IP", True, False)
    assert "numbered" not in engine.index_names()
    build.build_index(engine, [str(archive)], None, "numbered", "Flat", "IP", True, False, False, True)
    assert set(engine.index("numbered").label_counts()) == {p.name for p in root.iterdir() if p.is_dir()}


@pytest.mark.slow  # worker processes: seconds each (runs with --full)
def test_a_large_gallery_upload_starts_the_gallery_workers_before_the_build(tmp_path, sample_gallery, monkeypatch):
    """Uploading a gallery big enough for the gallery workers (SHITU_BUILD_WORKERS) starts them in the
    background, so the build finds them up; a small upload starts nothing."""
    import shitu.runtime
    from shitu.config import PipelineConfig
    from shitu.engine import Engine
    from shitu.runtime import Runtime

    from ..conftest import make_settings, wait_until

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
        uploads.expect_gallery(engine, [str(p) for p in images[:3]] + [str(labels)])
        assert not rt._lanes._executors
        uploads.expect_gallery(engine, [str(archive)])
        wait_until(lambda: rt._lanes.running and rt._lanes._users == 0, "the gallery workers to start")
    finally:
        rt.close()
