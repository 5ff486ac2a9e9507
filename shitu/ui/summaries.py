"""Markdown more than one tab shows: what a build or add did, and what an index's calibration promises."""

from __future__ import annotations

from typing import TYPE_CHECKING

from shitu.gallery import SkippedLine
from shitu.i18n import TEXT, calibration_evidence
from shitu.i18n import text as tr
from shitu.ui.events import md_safe

if TYPE_CHECKING:
    from shitu.engine import ChangeReport, Engine
    from shitu.views import IndexInfo

MAX_LABELS_SHOWN = 40  # labels listed (with their counts) in a change's summary
MAX_SKIPPED_SHOWN = 200  # skipped lines listed in a change's summary


def change_summary(engine: Engine, report: ChangeReport, lang: str = "en", *, built: bool) -> str:
    """Markdown: what a build or add did, with every skipped line and its reason."""
    stats = report.summary
    head = tr(lang, "built" if built else "added", name=report.index, added=len(report.added_ids))
    lines = [
        head,
        tr(lang, "index_stats", **{k: stats.get(k) for k in ("entries", "labels", "index_type", "metric_type")}),
    ]
    counts = engine.label_counts(report.index)
    shown = ", ".join(f"{md_safe(label)} ({n})" for label, n in sorted(counts.items())[:MAX_LABELS_SHOWN])
    lines.append(tr(lang, "labels_line", labels=shown + (" …" if len(counts) > MAX_LABELS_SHOWN else "")))
    if report.skipped:
        lines.append(tr(lang, "skipped", n=len(report.skipped)))
        in_order = sorted(report.skipped, key=lambda s: (s.line_no is None, s.line_no or 0))
        lines.append("\n".join(skipped_item(s) for s in in_order[:MAX_SKIPPED_SHOWN]))
    else:
        lines.append(tr(lang, "no_skipped"))
    lines.append(calibration_markdown(engine.info(report.index), lang))
    if built:
        lines.append(tr(lang, "try_it"))
    return "\n\n".join(lines)


def skipped_item(skipped: SkippedLine) -> str:
    """One skipped line of a gallery as a Markdown list item: where it was and why."""
    plain = skipped.source.replace("`", "'")
    source = f"`{plain}`" if plain else ""
    where = f"line {skipped.line_no} {source}" if skipped.line_no is not None else source
    return f"- {where.strip()}: {md_safe(skipped.reason)}"


def calibration_markdown(info: IndexInfo, lang: str = "en") -> str:
    """Whether the features were adapted to the gallery, what the index's threshold promises, and
    whether its approximate search can be trusted."""
    lines = []
    if info.search_shortfall:
        lines.append(tr(lang, "search_shortfall", index_type=info.index_type,
                        agreement=info.search_params["agreement"]))  # fmt: skip
    if info.adaptation is not None:
        key = "adaptation_on" if info.adaptation.get("applied") else "adaptation_off"
        lines.append(tr(lang, key, reason=md_safe(info.adaptation.get("reason", ""))))
    c = info.calibration
    if c is None:
        lines.append(tr(lang, "no_calibration"))
        return "\n\n".join(lines)
    chosen = tr(lang, "chosen_user" if c.chosen_by == "user" else "chosen_default")
    lines.append(
        tr(lang, "calibration_line", threshold=c.threshold, chosen=chosen, accepted=c.expected.correct_accepted,
           top1=c.top1, rejected=c.expected.unknown_rejected, queries=c.known_queries,
           protocol=TEXT[lang].get(f"protocol_{c.protocol}", c.protocol))
    )  # fmt: skip
    if c.evidence:
        lines.append(calibration_evidence(lang, c.threshold, c.uncertainty, c.evidence, c.confirmed_answers))
    if c.changes_since:
        lines.append(tr(lang, "calibration_stale", n=c.changes_since))
    return "\n\n".join(lines)
