"""The report's two charts as inline SVG: the 2-D map of the gallery and the threshold curve.
Here lives the geometry (scales, ticks, where names and legends go); the markup is in
``templates/map.svg`` and ``templates/curve.svg``, rendered with autoescaping, so every label
is text, never markup. The HTML page includes the same templates with :func:`map_chart` and
:func:`curve_chart` as their context."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from shitu.calibrate import Calibration
from shitu.i18n import text
from shitu.report.templating import render, shorten

if TYPE_CHECKING:  # the charts read a finished report; the report's module renders them
    from shitu.report.model import GalleryReport, MapPoint
    from shitu.views import CalibrationView  # the engine's view of an index's curve draws the same

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf", "#393b79", "#e6550d", "#31a354", "#a50f15", "#6b6ecf", "#8c6d31",
           "#ce6dbd", "#3182bd", "#637939", "#d6616b")  # fmt: skip
LEGEND_LABELS = 12  # labels named in the map's legend (the rest: "n more", hover the dots)
NAMED_CLUSTERS = 15  # labels named on the map, largest first, never overlapping
CURVE_SERIES = (  # (attribute of a calibration point, colour, SVG dash, report.* key of its name)
    ("correct_accepted", "#2ca02c", None, "curve_correct"),
    ("unknown_rejected", "#ff7f0e", None, "curve_unknown"),
    ("wrong_accepted", "#d62728", "5 4", "curve_wrong"),
)


def label_colours(labels: Sequence[str]) -> dict[str, str]:
    """A colour per label: the palette for the most frequent, golden-angle hues after that."""
    ranked = [lab for lab, _ in Counter(labels).most_common()]
    return {lab: PALETTE[r] if r < len(PALETTE) else f"hsl({(r * 137.508) % 360:.1f},62%,42%)"
            for r, lab in enumerate(ranked)}  # fmt: skip


def map_svg(report: GalleryReport, *, width: int = 760, height: int = 520, lang: str = "en") -> str:
    """The 2-D map as inline SVG: one ``<circle>`` per mapped entry coloured by label (an outlier
    is a ring), with a ``<title>`` tooltip ``label #id``, the largest labels named at their
    centre, and a legend. A note instead when there is nothing to map."""
    return render("map.svg", lang, chart=map_chart(report, width=width, height=height))


def curve_svg(
    calibration: Calibration | CalibrationView | None, highlight: float | None = None, *, width: int = 760,
    height: int = 340, lang: str = "en",
) -> str:  # fmt: skip
    """The threshold curve as inline SVG: right answers accepted, unknowns rejected and wrong
    answers accepted against the similarity threshold, the calibrated threshold marked (and
    ``highlight``, e.g. the threshold in use, when given). A note instead without a curve."""
    chart = curve_chart(calibration, highlight, width=width, height=height, lang=lang)
    return render("curve.svg", lang, chart=chart)


def map_chart(report: GalleryReport, *, width: int = 760, height: int = 520) -> dict[str, Any]:
    """Everything ``map.svg`` draws, in pixels."""
    pts = report.map_points
    if not pts:
        return {"points": []}
    colours = label_colours([p.label for p in pts])
    pad = 16
    plot_w, plot_h = width - 2 * pad, height - 2 * pad

    def at(p: MapPoint) -> tuple[float, float]:
        return pad + p.x * plot_w, pad + (1.0 - p.y) * plot_h

    points = [
        {"x": at(p)[0], "y": at(p)[1], "colour": colours[p.label], "label": p.label, "id": p.id, "outlier": p.outlier}
        for p in sorted(pts, key=lambda p: p.outlier)
    ]  # rings on top
    names = _cluster_names(pts, at, width)
    shown = list(colours)[:LEGEND_LABELS]
    cells = [(8 + (j % 3) * (width // 3), height + 8 + 22 * (j // 3)) for j in range(len(shown) + 1)]
    return {
        "width": width,
        "height": height,
        "total_height": height + 22 * math.ceil(min(LEGEND_LABELS + 1, len(colours) + 1) / 3) + 8,
        "radius": 3.5 if len(pts) <= 1000 else 2.6,
        "points": points,
        "names": names,
        "legend": [{"x": x, "y": y, "colour": colours[lab], "label": lab} for (x, y), lab in zip(cells, shown)],
        "ring": {"x": cells[-1][0], "y": cells[-1][1], "more": len(colours) - len(shown)},
    }


def _cluster_names(pts: Sequence[MapPoint], at, width: int) -> list[dict[str, Any]]:
    """Names of the largest labels (3+ points), each at its points' median, kept inside the
    frame, and skipped where it would overlap a name already placed."""
    groups: dict[str, list[MapPoint]] = {}
    for p in pts:
        groups.setdefault(p.label, []).append(p)
    placed: list[tuple[float, float, float, float]] = []
    names = []
    for label, members in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        if len(members) < 3 or len(placed) == NAMED_CLUSTERS:
            break
        xy = np.array([at(p) for p in members])
        cx, cy = float(np.median(xy[:, 0])), float(np.median(xy[:, 1])) - 6
        name = shorten(label)
        half = sum(12 if ord(ch) >= 0x2E80 else 7 for ch in name) / 2  # CJK glyphs are about twice as wide
        cx = min(max(cx, half + 2), width - half - 2)
        cy = max(cy, 14.0)
        box = (cx - half, cy - 12, cx + half, cy + 3)
        if any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in placed):
            continue
        placed.append(box)
        names.append({"x": cx, "y": cy, "text": name})
    return names


def curve_chart(calibration: Calibration | CalibrationView | None, highlight: float | None = None, *, width: int = 760,
                height: int = 340, lang: str = "en") -> dict[str, Any]:  # fmt: skip
    """Everything ``curve.svg`` draws, in pixels (the legend's names in ``lang``, as they set
    where each entry starts)."""
    if calibration is None or not calibration.points:
        return {"series": []}
    pts = calibration.points
    marks = [calibration.threshold] + ([highlight] if highlight is not None else [])
    x_lo = min([p.threshold for p in pts] + marks)
    x_hi = max([p.threshold for p in pts] + marks)
    if x_hi - x_lo < 1e-6:
        x_lo, x_hi = x_lo - 0.05, x_hi + 0.05
    left, right, top, bottom = 48, 16, 14, 58
    pw, ph = width - left - right, height - top - bottom

    def sx(v: float) -> float:
        return left + (v - x_lo) / (x_hi - x_lo) * pw

    def sy(v: float) -> float:
        return top + (1.0 - v) * ph

    series = []
    legend_x = left
    for attr, colour, dash, key in CURVE_SERIES:
        line = " ".join(f"{sx(p.threshold):.1f},{sy(getattr(p, attr)):.1f}" for p in pts)
        name = text(lang, f"report.{key}")
        series.append({"points": line, "colour": colour, "dash": dash, "name": name, "legend_x": legend_x})
        legend_x += 54 + 7 * len(name)
    return {
        "width": width,
        "height": height,
        "left": left,
        "top": top,
        "plot_width": pw,
        "plot_height": ph,
        "grid": [{"y": sy(v), "value": v} for v in (0.0, 0.25, 0.5, 0.75, 1.0)],
        "ticks": [{"x": sx(v), "value": v} for v in nice_ticks(x_lo, x_hi)],
        "series": series,
        "chosen": {"x": sx(calibration.threshold), "threshold": calibration.threshold,
                   "correct": calibration.chosen.correct_accepted, "rejected": calibration.chosen.unknown_rejected},
        "highlight": None if highlight is None else {"x": sx(highlight), "threshold": highlight},
    }  # fmt: skip


def nice_ticks(lo: float, hi: float, about: int = 6) -> list[float]:
    """Round tick values from ``lo`` to ``hi``, about ``about`` intervals apart: a step of 1, 2,
    2.5 or 5 times a power of ten."""
    raw = (hi - lo) / about
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(lo / step)
    return [round(j * step, 10) for j in range(first, math.floor(hi / step + 1e-9) + 1)]
