"""Matplotlib helpers shared by the analyses: the Agg backend, atomic PNG writes, common panels and legends."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from ..io import atomic_path
from .frames import TOWERS

TOWER_COLORS = {"vision": "#4C72B0", "text": "#DD8452", "head": "#55A868"}


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, out_png: str | Path) -> None:
    plt = pyplot()
    fig.tight_layout(rect=(0, 0, 1, 0.97) if fig.get_suptitle() else None)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def na_figure(out_png: str | Path, title: str, reason: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 2.2))
    ax.axis("off")
    ax.text(0.5, 0.62, title, ha="center", va="center", fontsize=11, weight="bold", transform=ax.transAxes)
    ax.text(0.5, 0.32, f"Not applicable: {reason}", ha="center", va="center", fontsize=9, wrap=True, transform=ax.transAxes)
    save(fig, out_png)


def format_scope_grid(frame: pd.DataFrame, width: float, height: float, **subplots):
    """A figure with one axis per (format, scope) of ``frame``, two per row, spare axes hidden.

    Returns (figure, axes, [(axis, format, scope, rows of that panel), ...]) in sorted order.
    """
    plt = pyplot()
    keys = sorted(frame.groupby(["format", "scope"]).groups)
    ncols = min(2, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False, **subplots)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    panels = [(ax, fmt, scope, frame[(frame["format"] == fmt) & (frame["scope"] == scope)])
              for ax, (fmt, scope) in zip(axes.flat, keys, strict=False)]
    return fig, axes, panels


def loglog_scatter(ax, sub: pd.DataFrame, x: str, y: str, sizes, markers, floor: float) -> tuple[float, float]:
    """Per-group scores of two cells against each other: marker per size, colour per tower, log axes
    with the equality diagonal. Returns the axis limits."""
    for size in sizes:
        for tower in TOWERS:
            pts = sub[(sub["size"] == size) & (sub["tower"] == tower)]
            if len(pts):
                ax.scatter(pts[x].clip(lower=floor), pts[y].clip(lower=floor), s=22, alpha=0.75,
                           marker=markers[size], color=TOWER_COLORS[tower], edgecolors="none")
    lo = min(sub[x].clip(lower=floor).min(), sub[y].clip(lower=floor).min()) / 2
    hi = max(sub[x].max(), sub[y].max(), floor) * 2
    ax.plot([lo, hi], [lo, hi], color="black", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    return lo, hi


def legend_towers_sizes(fig, ax, markers: dict[str, str], towers: Iterable[str] = TOWERS) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], ls="", marker="o", color=TOWER_COLORS[t], label=t) for t in towers]
    handles += [Line2D([], [], ls="", marker=m, color="black", markerfacecolor="none", label=s) for s, m in markers.items()]
    ax.legend(handles=handles, fontsize=7, loc="lower right")
