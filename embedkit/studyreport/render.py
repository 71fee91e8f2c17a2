"""Rendering the report with Jinja2 (autoescaped) from templates/report.html.j2."""

from __future__ import annotations

import math

TEMPLATE = "report.html.j2"


def _num(v, digits: int = 3) -> str:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return "n/a"
    return "n/a" if math.isnan(v) else f"{v:.{digits}f}"


def environment():
    """The Jinja2 environment: templates shipped in this package, HTML autoescaping on, undefined names fail."""
    from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

    env = Environment(loader=PackageLoader("embedkit.studyreport", "templates"), autoescape=select_autoescape(["html", "j2"]),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = _num
    return env


def render(context: dict) -> str:
    """The whole page as one string."""
    return environment().get_template(TEMPLATE).render(**context)
