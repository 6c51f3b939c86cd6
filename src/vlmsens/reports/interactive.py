"""Interactive pages: plotly figures written as one self-contained HTML file (plotly.js inlined once),
which the Snakemake report embeds like any other page; and the colours shared with the PNGs."""

from __future__ import annotations

import html
from collections.abc import Iterable
from pathlib import Path

from ..io import atomic_write_text

# One colour per sublayer, the same in every plot and page (Tableau 10, then 10 more).
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
           "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e6550d", "#31a354", "#756bb1", "#636363")


def sublayer_colors(sublayers: Iterable[str]) -> dict[str, str]:
    """Colour of each sublayer, by its place in ``sublayers`` (network.sublayers_in_order)."""
    return {s: PALETTE[i % len(PALETTE)] for i, s in enumerate(dict.fromkeys(sublayers))}


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>body {{ font-family: system-ui, sans-serif; font-size: 14px; margin: 0.8em; }} .na {{ background: #fff4e0; padding: 6px 10px; }}</style>
</head><body>
<h1 style="font-size: 1.2em">{title}</h1>
{body}
</body></html>
"""


def write_page(path: str | Path, title: str, figures: list, empty_reason: str = "nothing to show") -> None:
    """``figures`` (plotly) on one page that works offline: plotly.js is inlined with the first figure."""
    parts = [fig.to_html(full_html=False, include_plotlyjs=(i == 0), config={"responsive": True})
             for i, fig in enumerate(figures)]
    body = "\n".join(parts) if parts else f'<p class="na"><strong>Not applicable:</strong> {html.escape(empty_reason)}</p>'
    atomic_write_text(path, PAGE.format(title=html.escape(title), body=body))
