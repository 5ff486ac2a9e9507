"""End to end in a real headless Chromium: build an index from uploads, query it, remove an entry.

The app (``app.build_app``: HTTP API + Gradio UI on one port) runs under uvicorn in a
background thread on loopback; Playwright drives Debian's ``/usr/bin/chromium``. Screenshots
of every tab go to ``$SHITU_TEST_ARTIFACTS`` (default: a folder in the system temp dir; the
tests never write into the checkout); with ``SHITU_UPDATE_SCREENSHOTS=1`` they are also copied to
``docs/screenshots/`` for the user guide.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from shitu.api import serving
from shitu.sample import SAMPLE_SUBJECTS, write_gallery, write_queries

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("SHITU_TEST_ARTIFACTS") or Path(tempfile.gettempdir()) / "shitu-test-artifacts")
DOC_SHOTS = REPO / "docs" / "screenshots"
LABELS = list(SAMPLE_SUBJECTS)[:3]  # 猫 cat, 咖啡 coffee, 火箭 rocket
TIMEOUT = 60_000  # ms; the first query may still be loading models


def flat_upload(tmp_path: Path) -> tuple[list[Path], Path]:
    """A 3 labels x 3 photos gallery as a browser uploads it: files without folders, so each
    gets a unique name, and a tab-separated label file naming them (plus one bad line)."""
    root = tmp_path / "gallery"
    label_file = write_gallery(root, per_class=3, labels=LABELS)
    upload = tmp_path / "upload"
    upload.mkdir()
    files, lines = [], []
    for line in label_file.read_text(encoding="utf-8").splitlines():
        rel, label = line.split("\t")
        flat = upload / rel.replace("/", "_")  # 1/2.jpg -> 1_2.jpg
        shutil.copy(root / rel, flat)
        files.append(flat)
        lines.append(f"{flat.name}\t{label}")
    lines.append(f"missing.jpg\t{LABELS[0]}")  # line 10 names no uploaded file: skipped and reported
    labels = upload / "gallery.txt"
    labels.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return files, labels


def shoot(page, name: str, *, doc: bool = True) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    target = DOC_SHOTS / f"{name}.png"
    if doc and os.environ.get("SHITU_UPDATE_SCREENSHOTS") == "1":
        DOC_SHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)


def test_build_query_remove_in_chromium(engine, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is not installed (Debian package `chromium`)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="python playwright is not installed")
    expect = sync_api.expect
    from app import build_app

    (ARTIFACTS / "failure.png").unlink(missing_ok=True)
    files, labels = flat_upload(tmp_path)
    composite = write_queries(tmp_path / "queries")[0]  # held-out views of the cat and the coffee, side by side

    with serving(build_app(engine)) as url, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(locale="en-US", viewport={"width": 1280, "height": 900})
        page.set_default_timeout(TIMEOUT)
        try:
            page.goto(url)
            expect(page.get_by_role("tab", name="Recognize")).to_be_visible()

            # Build index: upload the images and the label file, name the index, build
            page.get_by_role("tab", name="Build index").click()
            page.locator("#build-files input[type=file]").set_input_files([str(f) for f in files])
            page.locator("#build-labels input[type=file]").set_input_files(str(labels))
            # each uploaded file shows as a row named after it once its upload has finished
            expect(page.locator("#build-files").get_by_role("row", name=files[-1].name)).to_be_visible()
            expect(page.locator("#build-labels").get_by_role("row", name="gallery.txt")).to_be_visible()
            page.get_by_label("Index name").fill("browser_demo")
            page.get_by_role("button", name="Build", exact=True).click()
            summary = page.locator("#build-summary")
            expect(summary).to_contain_text("browser_demo")
            expect(summary).to_contain_text("9 images")
            expect(summary).to_contain_text("Skipped 1 line(s)")
            expect(summary).to_contain_text("line 10 missing.jpg: no uploaded file has this name")
            shoot(page, "build")

            # Recognize: the new index is the active one; query the held-out composite
            page.get_by_role("tab", name="Recognize").click()
            expect(page.locator("#rec-index input")).to_have_value("browser_demo")
            page.locator("#query-image input[type=file]").set_input_files(str(composite))
            expect(page.locator("#query-image img")).to_be_visible()
            page.get_by_role("button", name="Recognize", exact=True).click()
            table = page.locator("#result-table")
            expect(table).to_contain_text(LABELS[0])  # 猫 cat
            expect(table).to_contain_text(LABELS[1])  # 咖啡 coffee
            expect(page.locator("#timings")).to_contain_text("browser_demo")
            shoot(page, "recognize")

            # Manage: select the row of one coffee photo by clicking it, remove it
            page.get_by_role("tab", name="Manage index").click()
            entries = page.locator("#entries-table")
            expect(entries).to_contain_text("1_2.jpg")
            entries.get_by_text("1_2.jpg", exact=True).click()
            expect(page.locator("#selected-ids input, #selected-ids textarea")).to_have_value("5")
            page.get_by_role("button", name="Remove", exact=True).click()
            expect(page.locator("#manage-status")).to_contain_text("Removed 1")
            expect(entries).not_to_contain_text("1_2.jpg")
            expect(entries).to_contain_text("1_1.jpg")
            assert 5 not in [e.id for e in engine.index("browser_demo").entries]
            assert len(engine.index("browser_demo")) == 8
            shoot(page, "manage")

            page.get_by_role("tab", name="Models & about").click()
            expect(page.locator("#models-info")).to_contain_text("PP-ShiTuV2_rec")
            expect(page.locator("#models-info")).to_contain_text("browser_demo")
            shoot(page, "models")

            # The same page in Chinese: UI text follows the browser; an example click runs a query
            zh = browser.new_page(locale="zh-CN", viewport={"width": 1280, "height": 900})
            zh.set_default_timeout(TIMEOUT)
            zh.goto(url)
            expect(zh.get_by_role("tab", name="管理索引")).to_be_visible()
            zh.get_by_role("tab", name="识别").click()
            zh.locator("#rec-index input").click()
            zh.get_by_role("option", name="sample").click()
            zh.get_by_text("示例（点击试用）").wait_for()
            zh.locator(".gallery-item, [data-testid='examples'] button").first.click()
            expect(zh.locator("#result-table")).to_contain_text("咖啡 coffee")
            expect(zh.locator("#result-table")).to_contain_text("标签")
            shoot(zh, "recognize_zh")
        except Exception:
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "failure.png"), full_page=True)
            raise
        finally:
            browser.close()
