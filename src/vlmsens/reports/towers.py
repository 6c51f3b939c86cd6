"""(d) Towers (vision / text / head): score distribution, and shares of sensitivity, weights and BF16 budget."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from .doc import Doc
from .frames import CELL_KEYS, TOWERS, model_layers, ordered, write_csv
from .plots import TOWER_COLORS, format_scope_grid, na_figure, pyplot, save
from .registry import Analysis, Job, Output, register
from .stats import log_floor


def tower_summary(layers: pd.DataFrame) -> pd.DataFrame:
    """Per cell × tower: how much of the sensitivity, of the weights, and of the BF16 budget it holds.

    ``sensitivity_share``: tower's sum of scores / cell's sum; ``cost_share``: tower's BF16 weight
    cost / cell's; ``bf16_budget_share``: tower's cost kept in BF16 / cell's cost kept in BF16;
    ``density`` = sensitivity_share / cost_share (> 1: more sensitive than its size suggests).
    """
    columns = [*CELL_KEYS, "tower", "groups", "score_sum", "sensitivity_share", "cost", "cost_share", "density",
               "groups_bf16", "bf16_cost", "bf16_budget_share", "median_score"]
    records = []
    for keys, cell in layers.groupby(CELL_KEYS, sort=True):
        total_score = cell["sensitivity"].sum()
        total_cost = cell["uncompressed_cost"].sum()
        total_kept = cell.loc[cell["kept_bf16"], "uncompressed_cost"].sum()
        for tower in TOWERS:
            part = cell[cell["tower"] == tower]
            if part.empty:
                continue
            score = part["sensitivity"].sum()
            cost = part["uncompressed_cost"].sum()
            kept = part.loc[part["kept_bf16"], "uncompressed_cost"].sum()
            s_share = score / total_score if total_score > 0 else float("nan")
            c_share = cost / total_cost if total_cost > 0 else float("nan")
            records.append({
                **dict(zip(CELL_KEYS, keys, strict=False)), "tower": tower, "groups": len(part), "score_sum": score,
                "sensitivity_share": s_share, "cost": cost, "cost_share": c_share,
                "density": s_share / c_share if c_share and not math.isnan(c_share) else float("nan"),
                "groups_bf16": int(part["kept_bf16"].sum()), "bf16_cost": kept,
                "bf16_budget_share": kept / total_kept if total_kept > 0 else 0.0,
                "median_score": float(part["sensitivity"].median()),
            })
    return pd.DataFrame.from_records(records, columns=columns)


def towers_doc(model: str, summary: pd.DataFrame, layers: pd.DataFrame) -> Doc:
    doc = Doc(f"{model}: towers (vision / text / head)")
    doc.para(
        "Per cell and tower: share of the cell's total sensitivity, share of its weight cost (BF16), and share of the "
        "cost the solver kept in BF16 (where the bit budget goes). density = sensitivity share / cost share: above 1 a "
        "tower is more sensitive than its size suggests. In `lm-only` cells the vision tower is outside the search."
    )
    towers = set(layers["tower"].unique())
    if len(towers) < 2:
        doc.not_applicable(f"only the {', '.join(sorted(towers)) or 'no'} tower was searched; shares across towers are trivial.")
    doc.table(summary.drop(columns=["model"]), floatfmt=".3g")
    return doc


def plot_tower_distribution(layers: pd.DataFrame, model: str, size_order: list[str], out_png: str | Path) -> None:
    if layers.empty:
        return na_figure(out_png, f"{model}: score distribution per tower", "no searched groups")
    sizes = ordered(layers["size"].unique(), size_order)
    floor = log_floor(layers["sensitivity"])
    fig, axes, panels = format_scope_grid(layers, 6.2, 3.6, sharey=True)
    for ax, fmt, scope, sub in panels:
        data, positions, colors, ticks = [], [], [], []
        pos = 0.0
        for tower in TOWERS:
            tower_rows = sub[sub["tower"] == tower]
            if tower_rows.empty:
                continue
            start = pos
            for size in sizes:
                values = np.log10(tower_rows.loc[tower_rows["size"] == size, "sensitivity"].clip(lower=floor))
                if len(values):
                    data.append(values.to_numpy())
                    positions.append(pos)
                    colors.append(TOWER_COLORS[tower])
                pos += 1
            ticks.append(((start + pos - 1) / 2, f"{tower}\n({len(tower_rows) // max(len(sizes), 1)} groups)"))
            pos += 0.8
        if data:
            parts = ax.boxplot(data, positions=positions, widths=0.7, patch_artist=True, showfliers=False)
            for patch, color in zip(parts["boxes"], colors, strict=False):
                patch.set_facecolor(color)
                patch.set_alpha(0.45)
            for x, values, color in zip(positions, data, colors, strict=False):
                jitter = (np.random.default_rng(0).random(len(values)) - 0.5) * 0.35
                ax.scatter(x + jitter, values, s=7, color=color, alpha=0.8, zorder=3)
        ax.set_xticks([t for t, _ in ticks], [label for _, label in ticks], fontsize=8)
        ax.set_title(f"{fmt} · {scope}  (boxes left→right: {', '.join(sizes)})", fontsize=9)
        ax.set_ylabel("log10 score / caption token")
    fig.suptitle(f"{model}: sensitivity distribution per tower", fontsize=10)
    save(fig, out_png)


def plot_tower_shares(summary: pd.DataFrame, model: str, size_order: list[str], out_png: str | Path) -> None:
    plt = pyplot()
    if summary.empty:
        return na_figure(out_png, f"{model}: budget share per tower", "no searched groups")
    sizes = ordered(summary["size"].unique(), size_order)
    measures = [("sensitivity_share", "S"), ("cost_share", "W"), ("bf16_budget_share", "B")]
    fig, axes, panels = format_scope_grid(summary, 6.2, 3.4, sharey=True)
    for ax, fmt, scope, sub in panels:
        ticks, labels = [], []
        for i, size in enumerate(sizes):
            cell = sub[sub["size"] == size].set_index("tower")
            for j, (measure, short) in enumerate(measures):
                x = i * (len(measures) + 1) + j
                bottom = 0.0
                for tower in TOWERS:
                    value = float(cell[measure].get(tower, 0.0)) if tower in cell.index else 0.0
                    value = 0.0 if math.isnan(value) else value
                    ax.bar(x, value, bottom=bottom, color=TOWER_COLORS[tower], width=0.85)
                    bottom += value
                ticks.append(x)
                labels.append(short if j != 1 else f"{short}\n{size}")
        ax.set_xticks(ticks, labels, fontsize=7)
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{fmt} · {scope}", fontsize=9)
        ax.set_ylabel("share")
    handles = [plt.Rectangle((0, 0), 1, 1, color=TOWER_COLORS[t]) for t in TOWERS]
    fig.legend(handles, TOWERS, loc="upper right", fontsize=8, ncol=3)
    fig.suptitle(f"{model}: S = share of sensitivity, W = share of weight cost, B = share of the BF16-kept cost", fontsize=10)
    save(fig, out_png)


def write(job: Job) -> None:
    model, size_order, out = job.model, job.size_order, job.outputs
    layers = model_layers(job.inputs, model)
    summary = tower_summary(layers)
    write_csv(summary, out["csv"])
    towers_doc(model, summary, layers).write(out["md"], out["html"])
    plot_tower_distribution(layers, model, size_order, out["distribution_png"])
    plot_tower_shares(summary, model, size_order, out["share_png"])


ANALYSIS = register(Analysis(
    name="towers", level="model", reads="manifests", subcategory="(d) Towers: vision / text / head",
    outputs=(
        Output("distribution_png", "{model}/towers_distribution.png", "score distribution per tower (box plot)"),
        Output("share_png", "{model}/towers_share.png", "sensitivity, weight and BF16-budget share (bars)"),
        Output("html", "{model}/towers.html", "shares per cell and tower (table)"),
        Output("csv", "{model}/towers.csv"),
        Output("md", "{model}/towers.md"),
    ),
    write=write,
))
