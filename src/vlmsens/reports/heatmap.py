"""(e) Heatmaps of one model: block index × sublayer, a panel per cell, one colour scale for all of them.

Every panel has the rows and columns of the model's union of groups, so a group sits at the same
place in ``lm-only`` and ``all-layers``; one colour scale across the panels lets cells be compared
by eye. A PNG, an interactive page (hover: group, score, rank, selected format) and the long CSV.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..io import atomic_path
from .frames import CELL_KEYS, SCOPES, TOWERS, model_layers, ordered, short_name, write_csv
from .interactive import write_page
from .network import SUBLAYER_ORDER
from .plots import na_figure, pyplot
from .registry import Analysis, Job, Output, register
from .stats import log_floor

NO_BLOCK = "none"


def _block_label(block: Any) -> str:
    return NO_BLOCK if block is None or pd.isna(block) else str(int(block))


def _axes(layers: pd.DataFrame) -> tuple[pd.MultiIndex, list[str]]:
    """Rows (tower, sublayer) in :data:`SUBLAYER_ORDER` and columns (blocks ascending, 'none' last) of ``layers``."""
    present = set(zip(layers["tower"], layers["sublayer"], strict=True))
    rows = []
    for tower in [*TOWERS, *sorted({t for t, _ in present} - set(TOWERS))]:
        subs = {s for t, s in present if t == tower}
        order = SUBLAYER_ORDER.get(tower, [])
        rows += [(tower, s) for s in order if s in subs] + [(tower, s) for s in sorted(subs) if s not in order]
    labels = set(layers["block"].map(_block_label))
    columns = sorted((c for c in labels if c != NO_BLOCK), key=int) + ([NO_BLOCK] if NO_BLOCK in labels else [])
    return pd.MultiIndex.from_tuples(rows, names=["tower", "sublayer"]), columns


def heatmap_frame(layers: pd.DataFrame, axes_of: pd.DataFrame | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(scores, kept) pivots of one cell: rows (tower, sublayer), columns block index ('none' = not in a block).

    Scores of groups sharing a row and column are summed; ``kept`` is True where any such group
    stays in BF16. Rows and columns are those of ``axes_of`` (default: ``layers`` itself), so the
    cells of one model share them.
    """
    if layers.empty:
        empty = pd.DataFrame(index=pd.MultiIndex.from_tuples([], names=["tower", "sublayer"]))
        return empty, empty
    index, columns = _axes(layers if axes_of is None else axes_of)
    frame = layers.assign(column=layers["block"].map(_block_label))
    scores = frame.pivot_table(index=["tower", "sublayer"], columns="column", values="sensitivity", aggfunc="sum")
    kept = frame.pivot_table(index=["tower", "sublayer"], columns="column", values="kept_bf16", aggfunc="max")
    scores = scores.reindex(index=index, columns=columns)
    kept = kept.reindex(index=index, columns=columns)
    kept = kept.astype(object).where(kept.notna(), False).astype(bool)
    scores.columns.name = kept.columns.name = "block"
    return scores, kept


def cells_of(layers: pd.DataFrame, size_order: list[str], format_order: list[str] | None = None) -> list[tuple[str, str, str]]:
    """(format, scope, size) of every cell of ``layers``: grid format order, lm-only first, grid size order."""
    present = set(zip(layers["format"], layers["scope"], layers["size"], strict=True))
    return [(f, sc, sz) for f in ordered(layers["format"].unique(), format_order) for sc in ordered(layers["scope"].unique(), SCOPES)
            for sz in ordered(layers["size"].unique(), size_order) if (f, sc, sz) in present]


def color_range(layers: pd.DataFrame) -> tuple[float, float]:
    """log10 limits of the shared colour scale: every score of the model, floored like the plots."""
    floor = log_floor(layers["sensitivity"])
    values = np.log10(layers["sensitivity"].clip(lower=floor).to_numpy(dtype=float))
    return float(values.min()), float(values.max())


def _cell(layers: pd.DataFrame, fmt: str, scope: str, size: str) -> pd.DataFrame:
    return layers[(layers["format"] == fmt) & (layers["scope"] == scope) & (layers["size"] == size)]


def plot_heatmaps(layers: pd.DataFrame, model: str, size_order: list[str], out_png: str | Path,
                  format_order: list[str] | None = None) -> None:
    plt = pyplot()
    if layers.empty:
        return na_figure(out_png, f"{model}: heatmaps", "no searched groups")
    cells = cells_of(layers, size_order, format_order)
    index, columns = _axes(layers)
    vmin, vmax = color_range(layers)
    floor = log_floor(layers["sensitivity"])
    n_rows, n_cols = len(index), len(columns)
    width = min(max(8.0, 3.8 + 0.28 * n_cols), 18)
    fig, axes = plt.subplots(len(cells), 1, figsize=(width, 0.9 + (0.8 + 0.22 * n_rows) * len(cells)), squeeze=False,
                             layout="constrained")
    image = None
    for ax, (fmt, scope, size) in zip(axes[:, 0], cells, strict=True):
        scores, kept = heatmap_frame(_cell(layers, fmt, scope, size), layers)
        values = np.ma.masked_invalid(np.log10(scores.to_numpy(dtype=float).clip(min=floor)))
        image = ax.imshow(values, aspect="auto", cmap=plt.get_cmap("viridis").with_extremes(bad="#eeeeee"),
                          interpolation="nearest", vmin=vmin, vmax=vmax)
        ys, xs = np.nonzero(kept.to_numpy())
        ax.scatter(xs, ys, marker="s", s=22, facecolors="none", edgecolors="red", linewidths=1.1)
        ax.set_xticks(range(n_cols), columns, fontsize=6)
        ax.set_yticks(range(n_rows), [f"{t}: {s}" for t, s in index], fontsize=6)
        towers = [t for t, _ in index]
        for i in range(1, n_rows):
            if towers[i] != towers[i - 1]:
                ax.axhline(i - 0.5, color="white", lw=2)
        ax.set_title(f"{fmt} · {scope} · {size}", fontsize=8, loc="left")
    axes[-1, 0].set_xlabel(f"block index ({NO_BLOCK}: outside the blocks; deepstack rows: merger index)", fontsize=8)
    fig.colorbar(image, ax=axes[:, 0].tolist(), label="log10 score / caption token (one scale for every panel)",
                 fraction=0.03, pad=0.01, shrink=min(1.0, 4 / len(cells)))
    fig.suptitle(f"{model}: sensitivity by block and sublayer; red squares: kept in BF16, grey: not searched", fontsize=9)
    with_colorbar_save(fig, out_png)


def with_colorbar_save(fig, out_png: str | Path) -> None:
    """Save a figure whose colour bar spans several axes (tight_layout cannot place it)."""
    plt = pyplot()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def interactive_figure(layers: pd.DataFrame, model: str, size_order: list[str], format_order: list[str] | None = None):
    """The panels of :func:`plot_heatmaps` as a plotly figure with one colour axis; hover: group, score, rank, selected format."""
    from plotly.subplots import make_subplots

    cells = cells_of(layers, size_order, format_order)
    index, columns = _axes(layers)
    vmin, vmax = color_range(layers)
    floor = log_floor(layers["sensitivity"])
    fig = make_subplots(rows=len(cells), cols=1, vertical_spacing=0.25 / max(len(cells), 1),
                        subplot_titles=[" · ".join(c) for c in cells])
    y_labels = [f"{t}: {s}" for t, s in index]
    for row, (fmt, scope, size) in enumerate(cells, start=1):
        cell = _cell(layers, fmt, scope, size)
        scores, _ = heatmap_frame(cell, layers)
        hover = np.full(scores.shape, "not searched", dtype=object)
        where = {(t, s): i for i, (t, s) in enumerate(index)}
        col_of = {c: j for j, c in enumerate(columns)}
        for (tower, sublayer, block), groups in cell.groupby(["tower", "sublayer", cell["block"].map(_block_label)]):
            hover[where[(tower, sublayer)], col_of[block]] = "<br>".join(
                f"<b>{short_name(g.layer)}</b> score {g.sensitivity:.3g} rank {g.rank} selected {g.selected_format}"
                for g in groups.itertuples())
        fig.add_heatmap(z=np.log10(scores.to_numpy(dtype=float).clip(min=floor)), x=columns, y=y_labels, customdata=hover,
                        coloraxis="coloraxis", row=row, col=1, xgap=1, ygap=1,
                        hovertemplate="%{customdata}<br>" + f"{fmt} · {scope} · {size}<extra></extra>")
        fig.update_yaxes(autorange="reversed", row=row, col=1)
        fig.update_xaxes(type="category", row=row, col=1)
    fig.update_layout(coloraxis={"colorscale": "Viridis", "cmin": vmin, "cmax": vmax,
                                 "colorbar": {"title": {"text": "log10 score / token"}}},
                      title=f"{model}: sensitivity by block and sublayer (one colour scale for every panel)",
                      height=max(400, (60 + 18 * len(index)) * len(cells) + 120))
    return fig


def heatmap_long(layers: pd.DataFrame, size_order: list[str], format_order: list[str] | None = None) -> pd.DataFrame:
    """Every cell's heatmap as rows (cell, tower, sublayer, block, score, kept_bf16)."""
    columns = [*CELL_KEYS, "tower", "sublayer", "block", "score", "kept_bf16"]
    frames = []
    for fmt, scope, size in cells_of(layers, size_order, format_order) if len(layers) else []:
        scores, kept = heatmap_frame(_cell(layers, fmt, scope, size), layers)
        long = scores.stack(future_stack=True).rename("score").reset_index()
        long["kept_bf16"] = kept.stack(future_stack=True).to_numpy()
        frames.append(long.dropna(subset=["score"]).assign(model=layers["model"].iloc[0], format=fmt, scope=scope, size=size))
    return pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)


def write(job: Job) -> None:
    layers = model_layers(job.inputs, job.model)
    write_csv(heatmap_long(layers, job.size_order, job.format_order), job.outputs["csv"])
    plot_heatmaps(layers, job.model, job.size_order, job.outputs["png"], job.format_order)
    figures = [interactive_figure(layers, job.model, job.size_order, job.format_order)] if len(layers) else []
    write_page(job.outputs["html"], f"{job.model}: heatmaps", figures, "no searched groups")


ANALYSIS = register(Analysis(
    name="heatmap", level="model", reads="manifests", subcategory="(e) Heatmaps: block × sublayer",
    params=("size_order", "format_order"),
    outputs=(
        Output("png", "{model}/heatmaps.png", "heatmaps, one colour scale (plot)"),
        Output("html", "{model}/heatmaps.html", "heatmaps (interactive)"),
        Output("csv", "{model}/heatmaps.csv"),
    ),
    write=write,
))
