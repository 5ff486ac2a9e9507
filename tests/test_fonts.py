"""The CJK font the product provides itself (shitu.fonts): fetched from npm once, checked, and used by
the drawn results, the report (embedded, just its glyphs) and the studio's pages (served)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

import app as studio
from shitu import fonts, npm

from .conftest import npm_tarball


def fake_package(font: bytes, licence: bytes) -> bytes:
    return npm_tarball({fonts.LICENSE_MEMBER: licence, fonts.FONT_MEMBER: font})


@pytest.fixture
def registry(monkeypatch):
    """npm answers with an in-memory package whose checksums are pinned; counts the downloads."""
    font, licence = b"not really a font", b"Copyright ... SIL Open Font License"
    tarball = fake_package(font, licence)
    calls = []

    def fetch_tarball(package, version, url, workdir: Path, **_):
        calls.append((package, version))
        path = workdir / "package.tgz"
        path.write_bytes(tarball)
        return path

    def sha(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    monkeypatch.setattr(npm, "fetch_tarball", fetch_tarball)
    monkeypatch.setattr(fonts, "FONT_TARBALL_SHA256", sha(tarball))
    monkeypatch.setattr(fonts, "FONT_SHA256", sha(font))
    monkeypatch.setattr(fonts, "LICENSE_SHA256", sha(licence))
    fonts.forget()
    yield calls, font
    fonts.forget()


def test_the_font_is_fetched_once_checked_and_kept_with_its_licence(registry, tmp_path):
    calls, font = registry
    path = fonts.fetch(tmp_path)
    assert path == tmp_path / "fonts" / fonts.FONT_FILENAME and path.read_bytes() == font
    assert (tmp_path / "fonts" / fonts.LICENSE_FILENAME).read_text().startswith("Copyright")
    assert fonts.fetch(tmp_path) == path and calls == [(fonts.FONT_NPM_PACKAGE, fonts.FONT_NPM_VERSION)]
    assert fonts.provisioned(tmp_path) == path
    assert sorted(p.name for p in (tmp_path / "fonts").iterdir()) == sorted([fonts.FONT_FILENAME, "OFL.txt"])


def test_a_tampered_package_is_refused_and_leaves_nothing(registry, tmp_path, monkeypatch):
    monkeypatch.setattr(fonts, "FONT_SHA256", "0" * 64)
    with pytest.raises(fonts.FontUnavailable, match="checksum mismatch for the font"):
        fonts.fetch(tmp_path)
    assert not (tmp_path / "fonts" / fonts.FONT_FILENAME).exists()
    (tmp_path / "fonts" / fonts.FONT_FILENAME).write_bytes(b"a half-written or foreign file")
    assert fonts.provisioned(tmp_path) is None, "a file that is not the pinned font is never used"


def test_without_the_registry_the_reason_is_one_line(monkeypatch, tmp_path):
    import requests

    def refuse(*args, **kwargs):
        raise requests.ConnectionError("no route to host")

    monkeypatch.setattr(npm.shutil, "which", lambda name: None)
    monkeypatch.setattr(npm.requests, "get", refuse)
    with pytest.raises(fonts.FontUnavailable, match="cannot reach the npm registry") as info:
        fonts.fetch(tmp_path)
    assert "\n" not in str(info.value) and "no route to host" in str(info.value)


def test_system_fonts_and_shitu_font_win(registry, tmp_path, monkeypatch):
    fonts.fetch(tmp_path)
    fonts.use(tmp_path, offline=True)
    monkeypatch.setattr(fonts, "CJK_FONT_CANDIDATES", ())
    monkeypatch.setattr(fonts, "_fc_match", lambda: None)
    fonts.forget()
    assert fonts.cjk_font() == str(tmp_path / "fonts" / fonts.FONT_FILENAME)
    mine = tmp_path / "mine.ttf"
    mine.write_bytes(b"x")
    monkeypatch.setenv("SHITU_FONT", str(mine))
    fonts.forget()
    assert fonts.cjk_font() == str(mine) and fonts.web_font() == mine


def test_the_report_carries_just_the_glyphs_it_shows(cjk_font):
    fonts.use(cjk_font.parent.parent, offline=True)
    css = fonts.embedded_css("<p>元气森林 recall@1</p>")
    assert css.startswith(f'@font-face{{font-family:"{fonts.WEB_FAMILY}";src:url(data:font/')
    assert 200 < len(css) < 60_000, "a subset of a few glyphs, not the 10 MB font"
    assert fonts.embedded_css("<p>only Latin text</p>") == ""


def test_the_studio_serves_the_font_to_browsers_without_one(registry, tmp_path, monkeypatch):
    app = FastAPI()
    studio.add_font_route(app)
    client = TestClient(app)
    monkeypatch.setattr(fonts, "web_font", lambda: None)
    missing = client.get(studio.FONT_ROUTE)
    assert missing.status_code == 404 and missing.headers["cache-control"] == "no-store"  # asked again later
    path = fonts.fetch(tmp_path)
    monkeypatch.setattr(fonts, "web_font", lambda: path)
    served = client.get(studio.FONT_ROUTE)
    assert served.status_code == 200 and served.content == path.read_bytes()
    assert served.headers["content-type"] == "font/ttf" and "max-age" in served.headers["cache-control"]
    from shitu.ui.studio import CSS, FONT_URL

    assert f'url("{FONT_URL}")' in CSS and "unicode-range" in CSS and f"/{FONT_URL}" == studio.FONT_ROUTE
