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


def panel_grid(layers: pd.DataFrame, size_order: list[str], format_order: list[str] | None = None):
    """The panels of a model's heatmaps: rows (format, scope), columns sizes, each (row, col) -> cell or None."""
    cells = cells_of(layers, size_order, format_order)
    rows = list(dict.fromkeys((f, sc) for f, sc, _ in cells))
    cols = list(dict.fromkeys(sz for _, _, sz in cells)) if cells else []
    cols = ordered(cols, size_order)
    present = set(cells)
    grid = {(i, j): (f, sc, sz) if (f, sc, sz) in present else None for i, (f, sc) in enumerate(rows) for j, sz in enumerate(cols)}
    return rows, cols, grid


def plot_heatmaps(layers: pd.DataFrame, model: str, size_order: list[str], out_png: str | Path,
                  format_order: list[str] | None = None) -> None:
    """A panel per cell (rows: format × scope, columns: size), one colour scale, rows and columns of the whole model."""
    plt = pyplot()
    if layers.empty:
        return na_figure(out_png, f"{model}: heatmaps", "no searched groups")
    rows, cols, grid = panel_grid(layers, size_order, format_order)
    index, columns = _axes(layers)
    vmin, vmax = color_range(layers)
    floor = log_floor(layers["sensitivity"])
    n_rows, n_cols = len(index), len(columns)
    panel_w = min(max(3.2, 1.6 + 0.16 * n_cols), 8.0)
    panel_h = 0.7 + 0.16 * n_rows
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(panel_w * len(cols) + 1.6, panel_h * len(rows) + 0.8),
                             squeeze=False, layout="constrained", sharex=True, sharey=True)
    cmap = plt.get_cmap("viridis").with_extremes(bad="#eeeeee")
    image = None
    towers = [t for t, _ in index]
    for (i, j), cell in grid.items():
        ax = axes[i, j]
        if cell is None:
            ax.axis("off")
            continue
        scores, kept = heatmap_frame(_cell(layers, *cell), layers)
        values = np.ma.masked_invalid(np.log10(scores.to_numpy(dtype=float).clip(min=floor)))
        image = ax.imshow(values, aspect="auto", cmap=cmap, interpolation="nearest", vmin=vmin, vmax=vmax)
        ys, xs = np.nonzero(kept.to_numpy())
        ax.scatter(xs, ys, marker="s", s=12, facecolors="none", edgecolors="red", linewidths=0.9)
        for r in range(1, n_rows):
            if towers[r] != towers[r - 1]:
                ax.axhline(r - 0.5, color="white", lw=1.5)
        ax.set_title(" · ".join(cell), fontsize=7, loc="left")
        ax.set_xticks(range(n_cols), columns, fontsize=5, rotation=90)
        ax.set_yticks(range(n_rows), [f"{t}: {s}" for t, s in index], fontsize=6)
    for ax in axes[-1, :]:
        ax.set_xlabel(f"block ({NO_BLOCK}: outside the blocks)", fontsize=7)
    fig.colorbar(image, ax=axes.ravel().tolist(), label="log10 score / caption token (one scale for every panel)",
                 fraction=0.025, pad=0.01, shrink=min(1.0, 0.25 + 0.25 * len(rows)))
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

    rows, cols, grid = panel_grid(layers, size_order, format_order)
    index, columns = _axes(layers)
    vmin, vmax = color_range(layers)
    floor = log_floor(layers["sensitivity"])
    fig = make_subplots(rows=len(rows), cols=len(cols), vertical_spacing=0.3 / max(len(rows), 1),
                        horizontal_spacing=0.02, shared_xaxes=True, shared_yaxes=True,
                        subplot_titles=[" · ".join(grid[(i, j)]) if grid[(i, j)] else "" for i in range(len(rows)) for j in range(len(cols))])
    y_labels = [f"{t}: {s}" for t, s in index]
    where = {(t, s): i for i, (t, s) in enumerate(index)}
    col_of = {c: j for j, c in enumerate(columns)}
    for (i, j), cell in grid.items():
        if cell is None:
            continue
        part = _cell(layers, *cell)
        scores, _ = heatmap_frame(part, layers)
        hover = np.full(scores.shape, "not searched", dtype=object)
        for (tower, sublayer, block), groups in part.groupby(["tower", "sublayer", part["block"].map(_block_label)]):
            hover[where[(tower, sublayer)], col_of[block]] = "<br>".join(
                f"<b>{short_name(g.layer)}</b> score {g.sensitivity:.3g} rank {g.rank} selected {g.selected_format}"
                for g in groups.itertuples())
        fig.add_heatmap(z=np.log10(scores.to_numpy(dtype=float).clip(min=floor)), x=columns, y=y_labels, customdata=hover,
                        coloraxis="coloraxis", row=i + 1, col=j + 1, xgap=1, ygap=1,
                        hovertemplate="%{customdata}<br>" + " · ".join(cell) + "<extra></extra>")
    fig.update_yaxes(autorange="reversed")
    fig.update_xaxes(type="category")
    fig.update_layout(coloraxis={"colorscale": "Viridis", "cmin": vmin, "cmax": vmax,
                                 "colorbar": {"title": {"text": "log10 score / token"}}},
                      title=f"{model}: sensitivity by block and sublayer (one colour scale for every panel)",
                      height=max(400, (70 + 16 * len(index)) * len(rows) + 120))
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
