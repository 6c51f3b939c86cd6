"""A short report page (headings, paragraphs, bullet lists, tables) rendered as Markdown and as HTML.

Every page the workflow writes (per-cell recipes and validation, the cross-cell analyses) is a
:class:`Doc`: the Markdown copy sits next to the CSV files, the HTML copy goes into
``snakemake --report``.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tabulate import tabulate

from ..io import atomic_write_text


@dataclass
class Doc:
    """A short report page: headings, paragraphs, bullet lists and tables."""

    title: str
    blocks: list[tuple[str, Any]] = field(default_factory=list)

    def heading(self, text: str) -> Doc:
        self.blocks.append(("h2", text))
        return self

    def para(self, text: str) -> Doc:
        self.blocks.append(("p", text))
        return self

    def bullets(self, items: Iterable[str]) -> Doc:
        self.blocks.append(("ul", list(items)))
        return self

    def table(self, frame: pd.DataFrame, floatfmt: str = ".4g", empty: str = "(no rows)") -> Doc:
        self.blocks.append(("table", (frame, floatfmt, empty)))
        return self

    def not_applicable(self, reason: str) -> Doc:
        self.blocks.append(("na", reason))
        return self

    def to_markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for kind, value in self.blocks:
            if kind == "h2":
                out += [f"## {value}", ""]
            elif kind == "p":
                out += [value, ""]
            elif kind == "na":
                out += [f"**Not applicable:** {value}", ""]
            elif kind == "ul":
                out += [f"- {item}" for item in value] + [""]
            elif kind == "table":
                frame, floatfmt, empty = value
                out += [md_table(frame, floatfmt) if len(frame) else empty, ""]
        return "\n".join(out)

    def to_html(self) -> str:
        body = [f"<h1>{_inline(self.title)}</h1>"]
        for kind, value in self.blocks:
            if kind == "h2":
                body.append(f"<h2>{_inline(value)}</h2>")
            elif kind == "p":
                body.append(f"<p>{_inline(value)}</p>")
            elif kind == "na":
                body.append(f'<p class="na"><strong>Not applicable:</strong> {_inline(value)}</p>')
            elif kind == "ul":
                body.append("<ul>" + "".join(f"<li>{_inline(item)}</li>" for item in value) + "</ul>")
            elif kind == "table":
                frame, floatfmt, empty = value
                body.append(_html_table(frame, floatfmt) if len(frame) else f"<p>{_inline(empty)}</p>")
        return HTML_PAGE.format(title=html.escape(self.title), body="\n".join(body))

    def to_rst(self) -> str:
        """reStructuredText (the report's front page: Snakemake renders it with docutils)."""
        out = [self.title, "=" * len(self.title), ""]
        for kind, value in self.blocks:
            if kind == "h2":
                out += [value, "-" * len(value), ""]
            elif kind == "p":
                out += [_rst_inline(value), ""]
            elif kind == "na":
                out += [f"**Not applicable:** {_rst_inline(value)}", ""]
            elif kind == "ul":
                out += [f"- {_rst_inline(item)}" for item in value] + [""]
            elif kind == "table":
                frame, floatfmt, empty = value
                out += [tabulate(frame, headers="keys", tablefmt="rst", showindex=False, floatfmt=floatfmt) if len(frame) else empty, ""]
        return "\n".join(out)

    def write(self, md_path: str | Path | None = None, html_path: str | Path | None = None) -> None:
        if md_path is not None:
            atomic_write_text(md_path, self.to_markdown())
        if html_path is not None:
            atomic_write_text(html_path, self.to_html())


HTML_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, -apple-system, "Segoe UI", sans-serif; font-size: 14px; margin: 1.2em; color: #222; }}
.table-scroll {{ overflow-x: auto; max-width: 100%; margin: 0.6em 0 1.2em 0; }}
table {{ border-collapse: collapse; }}
th, td {{ border: 1px solid #ccc; padding: 2px 8px; text-align: right; }}
th {{ background: #f2f2f2; }}
td.text, th.text {{ text-align: left; white-space: nowrap; }}
code {{ background: #f4f4f4; padding: 0 3px; }}
p.na {{ background: #fff4e0; border-left: 4px solid #e0a040; padding: 6px 10px; }}
</style></head>
<body>
{body}
</body></html>
"""


def _inline(text: str) -> str:
    """Escape, then render `code` and **bold** spans."""
    out = html.escape(str(text))
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)


def _rst_inline(text: str) -> str:
    """Markdown's `code` as reST's ``code``; **bold** is the same in both."""
    return re.sub(r"(?<!`)`([^`]+)`(?!`)", r"``\1``", str(text))


def _fmt_cell(value: Any, floatfmt: str) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (float, np.floating)):
        return "" if math.isnan(value) else format(float(value), floatfmt)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def _html_table(frame: pd.DataFrame, floatfmt: str) -> str:
    numeric = {c: pd.api.types.is_numeric_dtype(frame[c]) and not pd.api.types.is_bool_dtype(frame[c]) for c in frame.columns}
    head = "".join(f'<th class="{"" if numeric[c] else "text"}">{html.escape(str(c))}</th>' for c in frame.columns)
    rows = []
    for record in frame.itertuples(index=False):
        cells = "".join(
            f'<td class="{"" if numeric[c] else "text"}">{_inline(_fmt_cell(v, floatfmt))}</td>' for c, v in zip(frame.columns, record, strict=False)
        )
        rows.append(f"<tr>{cells}</tr>")
    # Wide tables scroll inside their box (the report shows a page in a frame of its own width).
    return f'<div class="table-scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>'


def md_table(frame: pd.DataFrame, floatfmt: str = ".4g") -> str:
    return tabulate(frame, headers="keys", tablefmt="github", showindex=False, floatfmt=floatfmt)
