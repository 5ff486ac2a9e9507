"""Regenerate the screenshots in README.md and docs/ui.md from the running studio.

    python docs/make_screenshots.py                       # the built-in sample gallery only
    python docs/make_screenshots.py --gallery ../shared/data/drink_dataset --limit 1000 \
        --query ../shared/data/drink_dataset/test_images/100.jpeg ../shared/data/drink_dataset/test_images/222.jpeg

Starts the real app (``app.build_app``: HTTP API + Gradio UI) on loopback with a fresh data
dir, drives Debian's ``/usr/bin/chromium`` with Playwright like a person would — build an index
from an uploaded .zip (caught while its progress bar runs), recognise a photo, select rows on
Manage, open Models — and writes desktop (1366 x 900) and phone (390 x 844) screenshots in English
and Chinese to ``docs/screenshots/`` (or ``--out``): ``recognize.png`` and the phone and Chinese ones
for the first ``--query``, ``recognize_<name>.png`` for each further one. Needs the dev requirements
and chromium.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
DESKTOP = {"width": 1366, "height": 900}
PHONE = {"width": 390, "height": 844}
TIMEOUT = 180_000  # ms: a first query may still be loading models on a slow machine


def gallery_zip(root: Path, limit: int, target: Path) -> Path:
    """Every ``step``-th line of ``root/gallery.txt`` (at most ``limit``) and its images as one .zip,
    as a person would upload a gallery."""
    lines = [line for line in (root / "gallery.txt").read_text(encoding="utf-8").splitlines() if line.strip()]
    step = max(1, len(lines) // limit)
    chosen = lines[::step][:limit]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for line in chosen:
            rel = line.replace("\t", " ").split(" ", 1)[0]
            zf.write(root / rel, rel)
        zf.writestr("gallery.txt", "\n".join(chosen) + "\n")
    target.write_bytes(buffer.getvalue())
    return target


def sample_zip(engine, target: Path) -> Path:
    """The built-in sample gallery (generated in the data dir) as an uploadable .zip."""
    from shitu.sample import ensure_sample_files

    gallery, label_file, _ = ensure_sample_files(engine.settings)
    with zipfile.ZipFile(target, "w") as zf:
        for path in sorted(gallery.rglob("*.jpg")):
            zf.write(path, path.relative_to(gallery).as_posix())
        zf.write(label_file, "gallery.txt")
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gallery", type=Path, help="a PaddleX gallery dir with gallery.txt (default: the sample)")
    parser.add_argument("--limit", type=int, default=200, help="at most this many gallery images")
    parser.add_argument("--query", type=Path, nargs="+", help="the photos to recognise (default: a sample query)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "screenshots")
    args = parser.parse_args()

    import os

    work = Path(tempfile.mkdtemp(prefix="shitu-shots-"))
    os.environ["SHITU_DATA_DIR"] = str(work / "data")
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=TIMEOUT)

    from app import build_app
    from shitu.api import serving
    from shitu.engine import Engine

    engine = Engine()
    upload = gallery_zip(args.gallery, args.limit, work / "gallery.zip") if args.gallery else None
    queries = args.query or []
    name = "demo"
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        with serving(build_app(engine)) as url, sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            upload = upload or sample_zip(engine, work / "sample.zip")
            queries = queries or [engine.sample_queries()[0]]
            query = queries[0]

            def shot(page, filename: str, *, full: bool = True) -> None:
                page.wait_for_timeout(400)  # let transitions settle
                page.screenshot(path=str(args.out / filename), full_page=full)
                print("wrote", args.out / filename)

            page = browser.new_page(locale="en-US", viewport=DESKTOP)
            page.set_default_timeout(TIMEOUT)
            page.goto(url)
            # Build: caught while the progress bar runs, then the summary
            page.get_by_role("tab", name="Build").click()
            page.locator("#build-files input[type=file]").set_input_files(str(upload))
            expect(page.locator("#build-files").get_by_role("row", name=upload.name)).to_be_visible()
            page.get_by_label("Index name").fill(name)
            page.get_by_role("button", name="Build index", exact=True).click()
            bar = page.locator("#build-progress [aria-valuenow]")
            try:
                bar.wait_for(timeout=20_000)
                expect(bar).to_be_in_viewport(timeout=5_000)  # the page brings it into view, by the button
                page.wait_for_timeout(1500)  # (a smooth scroll), and the bar has moved on from its first frame
                shot(page, "build.png", full=False)
            except Exception:  # noqa: BLE001 - a tiny gallery may finish before a frame is caught
                print("the build finished before its progress bar could be photographed")
            expect(page.locator("#build-summary")).to_contain_text(name)
            if not (args.out / "build.png").exists():
                shot(page, "build.png")

            # Recognize: the new index, each photo, evidence and table
            page.get_by_role("tab", name="Recognize").click()
            expect(page.locator("#rec-index input")).to_have_value(name)
            for n, photo in enumerate(queries):
                page.locator("#query-image input[type=file]").set_input_files(str(photo))
                expect(page.locator("#query-image img")).to_be_visible()
                before = page.locator("#result-image img").get_attribute("src") if n else None
                page.get_by_role("button", name="Recognize", exact=True).click()
                if n:
                    expect(page.locator("#result-image img")).not_to_have_attribute("src", before or "")
                expect(page.locator("#evidence .thumbnail-item").first).to_be_visible()
                page.wait_for_timeout(800)  # the evidence thumbnails load
                shot(page, "recognize.png" if n == 0 else f"recognize_{photo.stem}.png")

            # Manage: a few rows selected by a typed range
            page.get_by_role("tab", name="Manage").click()
            selected = page.locator("#selected-ids input, #selected-ids textarea")
            expect(page.locator("#entries-table")).to_be_visible()
            page.wait_for_timeout(1500)  # opening the tab reloads the index view and clears the selection
            selected.fill("1-3")
            selected.press("Enter")
            expect(page.locator("#previews .thumbnail-item")).to_have_count(3)
            shot(page, "manage.png")

            # Evaluate: the report of the new index, its curve and map
            page.get_by_role("tab", name="Evaluate").click()
            expect(page.locator("#eval-index input")).to_have_value(name)
            page.get_by_role("button", name="Evaluate", exact=True).click()
            expect(page.locator("#eval-summary")).to_contain_text("recall@1")
            expect(page.locator("#eval-map svg")).to_be_visible()
            # the gallery's thumbnails load lazily: bring them on screen once before the full-page shot
            page.locator("#eval-examples").scroll_into_view_if_needed()
            page.wait_for_timeout(1000)
            page.evaluate("window.scrollTo(0, 0)")
            shot(page, "evaluate.png")

            # Versions: one change, then the list and what that change did
            page.get_by_role("tab", name="Manage").click()
            expect(page.locator("#entries-table")).to_be_visible()
            page.wait_for_timeout(1500)  # opening the tab reloads the index view and clears the selection
            selected.fill("1-3")
            selected.press("Enter")
            expect(page.locator("#previews .thumbnail-item")).to_have_count(3)
            page.get_by_label("New label for the selected ids").fill("relabelled")
            page.get_by_role("button", name="Relabel selected").click()
            expect(page.locator("#manage-status")).to_contain_text("Relabelled 3")
            page.get_by_text("Versions (undo a change)").click()
            expect(page.locator("#versions-table")).to_contain_text("relabel 3")
            page.locator("#versions-table").get_by_text("relabel 3", exact=True).locator("visible=true").first.click()
            expect(page.locator("#version-changes")).to_contain_text("3 relabelled")
            page.locator("#versions").scroll_into_view_if_needed()
            shot(page, "versions.png", full=False)

            page.get_by_role("tab", name="Models").click()
            expect(page.locator("#models-info")).to_contain_text(name)
            shot(page, "models.png")
            page.close()

            # Chinese desktop and a phone in both languages: the Recognize flow
            for locale, viewport, filename in (
                ("zh-CN", DESKTOP, "recognize_zh.png"),
                ("en-US", PHONE, "phone.png"),
                ("zh-CN", PHONE, "phone_zh.png"),
            ):
                page = browser.new_page(
                    locale=locale, viewport=viewport, device_scale_factor=2 if viewport is PHONE else 1
                )
                page.set_default_timeout(TIMEOUT)
                page.goto(url)
                page.locator("#rec-index input").click()
                page.get_by_role("option", name=name).click()
                page.locator("#query-image input[type=file]").set_input_files(str(query))
                expect(page.locator("#query-image img")).to_be_visible()
                page.locator("#recognize-btn").click()
                expect(page.locator("#evidence .thumbnail-item").first).to_be_visible()
                if viewport is PHONE:  # the result as a phone shows it: scrolled to the drawn image
                    page.locator("#result-image").evaluate("e => e.scrollIntoView({block: 'start'})")
                    shot(page, filename, full=False)
                else:
                    shot(page, filename)
                page.close()
            browser.close()
    finally:
        engine.close()


if __name__ == "__main__":
    main()
