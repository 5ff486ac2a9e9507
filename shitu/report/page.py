"""The report as one self-contained HTML page: ``templates/page.html`` (autoescaped Jinja2) with
the CSS inline, both charts as inline SVG and thumbnails as ``data:`` URIs — nothing is
fetched and nothing runs, so the page is served under a ``default-src 'none'`` policy."""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING

from shitu import fonts
from shitu.i18n import calibration_evidence, lang_code
from shitu.report.charts import curve_chart, map_chart
from shitu.report.params import (
    DUPLICATE_SIMILARITY,
    FRAGILE_IMAGES,
    HTML_LABEL_ROWS,
    HTML_ROWS,
    MISLABEL_MIN_VOTES,
    NEIGHBOURS,
)
from shitu.report.templating import render

if TYPE_CHECKING:  # the page reads a finished report; the report's module renders it
    from shitu.report.model import GalleryReport

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def render_page(report: GalleryReport, lang: str | None = "en") -> str:
    """The HTML page of ``report`` in ``lang`` (``en``, or ``zh`` for any Chinese locale)."""
    code = lang_code(lang)
    page = render(
        "page.html", code,
        font_stack=fonts.FONT_STACK,
        report=report,
        html_lang="zh-CN" if code == "zh" else "en",
        images={id_: data_uri(data) for id_, data in report.thumbnails.items() if data},
        curve=curve_chart(report.calibration, lang=code),
        evidence=_evidence(report, code),
        map=map_chart(report),
        rows=HTML_ROWS,
        label_rows=HTML_LABEL_ROWS,
        criteria={"votes": MISLABEL_MIN_VOTES, "k": NEIGHBOURS, "similarity": DUPLICATE_SIMILARITY,
                  "fragile": FRAGILE_IMAGES},
    )  # fmt: skip
    # the CJK glyphs the page shows, embedded (a few KB): a saved report reads the same on any machine
    return page.replace("</style>", fonts.embedded_css(page) + "</style>", 1)


def _evidence(report: GalleryReport, lang: str) -> str | None:
    """How sure the index's own calibration is (one computed for the report claims nothing)."""
    cal = report.calibration
    if cal is None or report.calibration_source != "index" or not cal.evidence:
        return None
    return calibration_evidence(lang, cal.threshold, cal.uncertainty, cal.evidence, len(cal.taught))


def data_uri(image: bytes) -> str:
    """A JPEG or PNG thumbnail as a ``data:`` URI."""
    mime = "image/png" if image.startswith(PNG_MAGIC) else "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(image).decode('ascii')}"
