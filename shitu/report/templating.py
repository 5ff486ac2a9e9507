"""The report's Jinja2 environment: templates shipped in ``shitu/report/templates``, every
value autoescaped (labels, file names and index names come from strangers), undefined names
an error rather than an empty string, and the few number formats the pages use."""

from __future__ import annotations

import functools
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined

from shitu.i18n import lang_code, text


def percent(value: float | None, digits: int = 1) -> str:
    """``97.3%``, or ``—`` for a value that could not be measured."""
    return "—" if value is None else f"{value:.{digits}%}"


def fixed(value: float, digits: int = 1) -> str:
    """``value`` with ``digits`` decimals (SVG coordinates, similarities)."""
    return f"{value:.{digits}f}"


def count(value: int) -> str:
    """``12,345``."""
    return f"{value:,}"


def shorten(label: str, limit: int = 18) -> str:
    """``label`` cut to ``limit`` characters with an ellipsis (names drawn inside charts)."""
    return label if len(label) <= limit else label[: limit - 1] + "…"


@functools.cache
def environment() -> Environment:
    env = Environment(
        loader=PackageLoader("shitu.report", "templates"),
        autoescape=True,  # every template is HTML or SVG
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(percent=percent, fixed=fixed, count=count, shorten=shorten)
    return env


def render(template: str, lang: str | None, **context: Any) -> str:
    """``template`` rendered with ``context``, ``t(key, **values)`` (the report's words from
    :mod:`shitu.i18n`, keys without their ``report.`` prefix) and ``lang`` (``en`` or ``zh``)."""
    code = lang_code(lang)

    def t(key: str, **values: Any) -> str:
        return text(code, f"report.{key}", **values)

    return environment().get_template(template).render(t=t, lang=code, **context)
