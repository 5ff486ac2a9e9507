"""What the studio's handler tests share: a fake request, the sample gallery uploaded the way a
browser sends it, and an index built through the Build tab's handler."""

from __future__ import annotations

import shutil
from pathlib import Path

import gradio as gr
import pytest

from shitu.engine import Engine
from shitu.sample import SAMPLE_SUBJECTS
from shitu.ui import build

from ..conftest import install_index, make_settings

LABELS = list(SAMPLE_SUBJECTS)  # "猫 cat", "咖啡 coffee", ... (labels with spaces and Chinese)


class FakeRequest:
    """Just what :func:`shitu.ui.events.lang_of` and the sign-in read from a ``gr.Request``."""

    def __init__(self, language: str, session_hash: str = "test"):
        self.headers = {"accept-language": language}
        self.session_hash = session_hash
        self.client = None


def row_click(row: list) -> gr.SelectData:
    """The event Gradio sends when a Dataframe cell of ``row`` is clicked."""
    return gr.SelectData(None, {"index": [0, 1], "value": row[1], "row_value": row, "selected": True})


def highlighted_ids(table) -> list[int]:
    """Ids of the rows a styled entries table highlights (a plain DataFrame highlights none)."""
    if not hasattr(table, "export"):
        return []
    styles = table._compute().ctx  # (row, col) -> [(property, value)] as the browser gets them
    rows = sorted({r for (r, _), props in styles.items() if any("background-color" in k for k, _ in props)})
    return [int(table.data.iloc[r, 0]) for r in rows]


def ids_of(engine, name: str) -> list[int]:
    return [e.id for e in engine.index(name).entries]


def upload_copy(sample_gallery: tuple[Path, Path], tmp_path: Path) -> tuple[list[str], Path]:
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
def uploads(sample_gallery, tmp_path) -> tuple[list[str], Path]:
    """:func:`upload_copy` in the test's own temp dir."""
    return upload_copy(sample_gallery, tmp_path)


def build_shop(engine, uploads: tuple[list[str], Path]) -> None:
    files, labels = uploads
    build.build_index(engine, files, str(labels), "shop", "Flat", "IP", True, False)


@pytest.fixture(scope="session")
def shop_template(tmp_path_factory, runtime, sample_gallery) -> Path:
    """``shop`` built once per session through the Build tab's handler, to copy into a test's data dir."""
    tmp = tmp_path_factory.mktemp("shop-template")
    engine = Engine(make_settings(tmp / "data", vector_store="faiss"), runtime=runtime)
    build_shop(engine, upload_copy(sample_gallery, tmp))
    return engine.settings.indices_dir / "shop"


@pytest.fixture
def shop(engine, uploads, shop_template) -> str:
    """An index named ``shop`` (Flat, IP; 24 entries) as the Build tab's handler builds it from
    ``uploads``: the session's copy where indices are files, else built in the store under test."""
    if engine.settings.vector_store == "faiss":
        install_index(engine, "shop", shop_template)
    else:
        build_shop(engine, uploads)
    return "shop"
