"""Assemble the report page: static HTML with inline CSS, figures by relative path, no scripts.

The page has to open from a copied run directory on any machine, offline, so it links
nothing outside RUN_DIR and every image path is relative to report.html.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from onerec.report.tables import Table

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1150px;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }
p.meta { color: #666; margin-top: 0; }
p.note { background: #fff8e1; border-left: 4px solid #f0b400; padding: 0.5em 0.8em; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
th, td { border: 1px solid #ddd; padding: 0.3em 0.6em; text-align: right; }
th { background: #f4f4f4; } td.text, th.text { text-align: left; }
caption { caption-side: top; text-align: left; font-weight: bold; padding-bottom: 0.3em; }
nav ul { padding-left: 1.2em; }
"""


@dataclass
class Section:
    """One heading of the page: its figure and tables, or a one-line note when the inputs are missing."""

    anchor: str
    title: str
    intro: str = ""  # how to read the figure
    image: Optional[str] = None  # path relative to report.html
    tables: list[tuple[str, Table]] = field(default_factory=list)  # (caption, table)
    note: Optional[str] = None


def format_value(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.4f}" if abs(value) < 100 else f"{value:,.1f}"
    return str(value)


def render_table(caption: str, table: Table) -> str:
    columns, rows = table
    text_columns = {i for i, _ in enumerate(columns) if all(isinstance(r[i], str) for r in rows if r[i] is not None)}
    head = "".join(f'<th{_cls(i, text_columns)}>{html.escape(str(c))}</th>' for i, c in enumerate(columns))
    body = "".join(
        "<tr>"
        + "".join(f"<td{_cls(i, text_columns)}>{html.escape(format_value(v))}</td>" for i, v in enumerate(row))
        + "</tr>"
        for row in rows
    )
    return (
        f"<table><caption>{html.escape(caption)}</caption>"
        f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    )


def render_section(section: Section) -> str:
    parts = [f'<section id="{html.escape(section.anchor)}"><h2>{html.escape(section.title)}</h2>']
    if section.note is not None:
        parts.append(f'<p class="note">{html.escape(section.note)}</p>')
    else:
        if section.intro:
            parts.append(f"<p>{html.escape(section.intro)}</p>")
        if section.image is not None:
            parts.append(f'<p><img src="{html.escape(section.image)}" alt="{html.escape(section.title)}"></p>')
        parts.extend(render_table(caption, table) for caption, table in section.tables)
    parts.append("</section>")
    return "\n".join(parts)


def render_page(title: str, meta: str, sections: list[Section]) -> str:
    contents = "".join(
        f'<li><a href="#{html.escape(s.anchor)}">{html.escape(s.title)}</a>{" (not available)" if s.note else ""}</li>'
        for s in sections
    )
    body = "\n".join(render_section(s) for s in sections)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n<body>\n"
        f"<h1>{html.escape(title)}</h1>\n<p class=\"meta\">{html.escape(meta)}</p>\n"
        f"<nav><ul>{contents}</ul></nav>\n{body}\n</body></html>\n"
    )


def _cls(index: int, text_columns: set[int]) -> str:
    return ' class="text"' if index in text_columns else ""
