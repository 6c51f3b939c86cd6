"""Per-group sensitivity of one model in network order: a panel per format × scope, a colour per sublayer,
x by tower and block (the same group at the same x in every panel); a PNG and an interactive page."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .frames import SCOPES, layers_frame, load_manifests, ordered, short_name
from .interactive import sublayer_colors, write_page
from .network import Layout, network_layout, sublayers_in_order
from .plots import na_figure, pyplot, save
from .registry import Analysis, Job, Output, register
from .stats import log_floor


def panels_of(part: pd.DataFrame, format_order: list[str] | None = None) -> list[tuple[str, str]]:
    """(format, scope) of every panel, in the grid's format order, then lm-only before all-layers."""
    formats = ordered(part["format"].unique(), format_order)
    scopes = ordered(part["scope"].unique(), SCOPES)
    present = set(zip(part["format"], part["scope"], strict=True))
    return [(f, s) for f in formats for s in scopes if (f, s) in present]


def _lines(sub: pd.DataFrame, layout: Layout):
    """(sublayer, rows sorted by x) per tower of one panel and size: a line never joins two towers;
    rows outside the blocks are drawn as points only."""
    sub = sub.assign(x=layout.x(sub["layer"]), in_block=sub["layer"].map(layout.positions.set_index("layer")["in_block"]))
    for (_tower, sublayer), rows in sub.groupby(["tower", "sublayer"], sort=False):
        yield sublayer, rows.sort_values("x")


def plot_model_sensitivity(layers: pd.DataFrame, model: str, size_order: list[str], out_png: str | Path,
                           format_order: list[str] | None = None) -> None:
    """Per-group sensitivity (log scale), x = tower and block, one colour per sublayer; the largest
    size solid, smaller sizes dotted; circles: kept in BF16 at the largest size."""
    plt = pyplot()
    part = layers[layers["model"] == model]
    if part.empty:
        return na_figure(out_png, f"{model}: per-group sensitivity", "no cells of this model")
    layout = network_layout(part)
    colors = sublayer_colors(sublayers_in_order(part))
    sizes = ordered(part["size"].unique(), size_order)
    floor = log_floor(part["sensitivity"])
    panels = panels_of(part, format_order)
    fig, axes = plt.subplots(len(panels), 1, figsize=(15, 2.9 * len(panels) + 0.6), squeeze=False, sharex=True, sharey=True)
    for ax, (fmt, scope) in zip(axes[:, 0], panels, strict=True):
        sub = part[(part["format"] == fmt) & (part["scope"] == scope)]
        for tower, (lo, hi) in layout.spans.items():
            if tower == "vision":
                ax.axvspan(lo - 0.5, hi + 0.5, color="grey", alpha=0.10, lw=0)
            if not (sub["tower"] == tower).any():
                ax.text((lo + hi) / 2, 0.5, "not searched in this scope", transform=ax.get_xaxis_transform(),
                        ha="center", va="center", fontsize=8, color="grey")
        for size in sizes:
            largest = size == sizes[-1]
            for sublayer, rows in _lines(sub[sub["size"] == size], layout):
                y = rows["sensitivity"].clip(lower=floor)
                blocks = rows["in_block"].astype(bool)
                style = dict(color=colors[sublayer], lw=0.9 if largest else 0.6, alpha=0.95 if largest else 0.45)
                ax.plot(rows.loc[blocks, "x"], y[blocks], ls="-" if largest else ":", marker="." if largest else None, ms=3, **style)
                ax.scatter(rows.loc[~blocks, "x"], y[~blocks], s=18 if largest else 8, color=colors[sublayer],
                           alpha=style["alpha"], zorder=3)
        kept = sub[sub["kept_bf16"] & (sub["size"] == sizes[-1])]
        if len(kept):
            ax.scatter(layout.x(kept["layer"]), kept["sensitivity"].clip(lower=floor), s=36, facecolors="none",
                       edgecolors="red", lw=0.9, zorder=4)
        ax.set_yscale("log")
        ax.set_ylabel("score / caption token", fontsize=8)
        ax.set_title(f"{fmt} · {scope}", fontsize=9, loc="left")
        ax.grid(axis="x", color="#dddddd", lw=0.5)
    bottom = axes[-1, 0]
    bottom.set_xticks([x for x, _ in layout.ticks], [label for _, label in layout.ticks], fontsize=7, rotation=90)
    for tower, (lo, hi) in layout.spans.items():
        axes[0, 0].text((lo + hi) / 2, 1.02, tower, transform=axes[0, 0].get_xaxis_transform(), ha="center", fontsize=8, weight="bold")
    bottom.set_xlabel("vision blocks (v0 …), merger and deepstack mergers (ds) → text layers (t0 …) → lm_head")
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=c, marker=".", label=s) for s, c in colors.items()]
    handles.append(Line2D([], [], color="black", ls="-", label=f"size {sizes[-1]}"))
    if len(sizes) > 1:
        handles.append(Line2D([], [], color="black", ls=":", label=f"size {', '.join(sizes[:-1])}"))
    handles.append(Line2D([], [], ls="", marker="o", markerfacecolor="none", markeredgecolor="red", label=f"kept BF16 ({sizes[-1]})"))
    fig.legend(handles=handles, loc="upper right", fontsize=7, ncol=min(len(handles), 9))
    fig.suptitle(f"{model}: per-group sensitivity by tower and block", fontsize=10, x=0.01, ha="left")
    save(fig, out_png)


def interactive_figure(layers: pd.DataFrame, model: str, size_order: list[str], format_order: list[str] | None = None):
    """The same panels as :func:`plot_model_sensitivity` as a plotly figure; hover: group, score, rank, selected format."""
    from plotly.subplots import make_subplots

    part = layers[layers["model"] == model]
    layout = network_layout(part)
    colors = sublayer_colors(sublayers_in_order(part))
    sizes = ordered(part["size"].unique(), size_order)
    floor = log_floor(part["sensitivity"])
    panels = panels_of(part, format_order)
    fig = make_subplots(rows=len(panels), cols=1, shared_xaxes=True, vertical_spacing=0.04,
                        subplot_titles=[f"{fmt} · {scope}" for fmt, scope in panels])
    shown = set()
    for row, (fmt, scope) in enumerate(panels, start=1):
        sub = part[(part["format"] == fmt) & (part["scope"] == scope)]
        for size in sizes:
            largest = size == sizes[-1]
            for sublayer, rows in _lines(sub[sub["size"] == size], layout):
                key = (sublayer, size)
                fig.add_scatter(
                    x=rows["x"], y=rows["sensitivity"].clip(lower=floor), row=row, col=1,
                    mode="lines+markers" if largest else "lines", name=f"{sublayer} · {size}", legendgroup=f"{sublayer} · {size}",
                    showlegend=key not in shown, visible=True if largest else "legendonly",
                    line={"color": colors[sublayer], "width": 1.2 if largest else 0.8, "dash": "solid" if largest else "dot"},
                    marker={"size": 5, "symbol": ["circle-open" if k else "circle" for k in rows["kept_bf16"]]},
                    customdata=list(zip(rows["layer"].map(short_name), rows["rank"], rows["selected_format"],
                                        rows["sensitivity"], strict=True)),
                    hovertemplate=("<b>%{customdata[0]}</b><br>score %{customdata[3]:.3g} / caption token<br>"
                                   "rank %{customdata[1]}<br>selected %{customdata[2]}<br>" + f"{fmt} · {scope} · {size}<extra></extra>"),
                )
                shown.add(key)
        fig.update_yaxes(type="log", title_text="score / token", row=row, col=1)
        for tower, (lo, hi) in layout.spans.items():
            if tower == "vision":
                fig.add_vrect(x0=lo - 0.5, x1=hi + 0.5, fillcolor="grey", opacity=0.1, line_width=0, row=row, col=1)
    fig.update_xaxes(tickvals=[x for x, _ in layout.ticks], ticktext=[label for _, label in layout.ticks], tickangle=-90,
                     row=len(panels), col=1)
    fig.update_layout(title=f"{model}: per-group sensitivity by tower and block (open circles: kept in BF16; "
                            "click the legend for smaller sizes)", height=260 * len(panels) + 160, hovermode="closest")
    return fig


def write(job: Job) -> None:
    layers = layers_frame(load_manifests(job.inputs))
    formats = job.format_order
    plot_model_sensitivity(layers, job.model, job.size_order, job.outputs["png"], formats)
    part = layers[layers["model"] == job.model]
    figures = [] if part.empty else [interactive_figure(layers, job.model, job.size_order, formats)]
    write_page(job.outputs["html"], f"{job.model}: per-group sensitivity", figures, "no cells of this model")


ANALYSIS = register(Analysis(
    name="sensitivity_plot", level="model", reads="manifests", subcategory="Per-group sensitivity",
    params=("size_order", "format_order"),
    outputs=(
        Output("png", "{model}/sensitivity.png", "sensitivity by group (plot)"),
        Output("html", "{model}/sensitivity.html", "sensitivity by group (interactive)"),
    ),
    write=write,
))
