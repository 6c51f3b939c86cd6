"""(a) Rank stability across calibration sizes: Kendall τ, Spearman ρ and top-k overlap per size pair."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pandas as pd

from .doc import Doc
from .frames import model_layers, ordered, write_csv
from .plots import format_scope_grid, na_figure, save
from .registry import Analysis, Job, Output, register
from .stats import TOP_K, agreement_row


def rank_stability(layers: pd.DataFrame, size_order: list[str]) -> pd.DataFrame:
    """Agreement of the sensitivity ranking between every pair of sizes, per model × format × scope."""
    records = []
    for (model, fmt, scope), part in layers.groupby(["model", "format", "scope"], sort=True):
        by_size = {s: g.set_index("layer")["sensitivity"] for s, g in part.groupby("size")}
        sizes = ordered(by_size, size_order)
        for s1, s2 in itertools.combinations(sizes, 2):
            records.append({"model": model, "format": fmt, "scope": scope, "sizes": f"{s1}↔{s2}", **agreement_row(by_size[s1], by_size[s2])})
    columns = ["model", "format", "scope", "sizes", "kendall_tau", "spearman", "n", *[f"top{k}_overlap" for k in TOP_K]]
    return pd.DataFrame.from_records(records, columns=columns)


def rank_stability_doc(model: str, stability: pd.DataFrame, sizes: list[str]) -> Doc:
    doc = Doc(f"{model}: rank stability across calibration sizes")
    doc.para(
        "Agreement of the per-group sensitivity ranking between calibration sizes, per format × scope: Kendall τ-b, "
        "Spearman ρ and the share of the top-10 / top-20 groups the two sizes have in common (ties split evenly; "
        "with fewer groups than k the whole list is compared). Values near 1 mean the smaller calibration set "
        "already gives the ranking of the larger one."
    )
    if len(sizes) < 2:
        return doc.not_applicable(f"the grid has a single calibration size ({', '.join(sizes) or 'none'}); nothing to compare.")
    return doc.table(stability.drop(columns=["model"]), floatfmt=".3f")


def plot_rank_stability(stability: pd.DataFrame, model: str, out_png: str | Path, reason: str | None = None) -> None:
    if reason or stability.empty:
        return na_figure(out_png, f"{model}: rank stability across sizes", reason or "no size pairs to compare")
    metrics = ["kendall_tau", "spearman", *[f"top{k}_overlap" for k in TOP_K]]
    labels = ["Kendall τ", "Spearman ρ", *[f"top-{k} overlap" for k in TOP_K]]
    low = float(np.nanmin(stability[metrics].to_numpy(dtype=float))) if stability[metrics].notna().any().any() else 0.0
    fig, axes, panels = format_scope_grid(stability, 6.0, 3.2, sharey=True)
    for ax, fmt, scope, sub in panels:
        x = np.arange(len(sub))
        width = 0.8 / len(metrics)
        for i, (metric, label) in enumerate(zip(metrics, labels, strict=True)):
            ax.bar(x + (i - (len(metrics) - 1) / 2) * width, sub[metric].fillna(0), width, label=label)
        ax.set_xticks(x, sub["sizes"], fontsize=8)
        ax.axhline(0, color="black", lw=0.6)
        ax.axhline(1, color="grey", lw=0.6, ls=":")
        ax.set_ylim(min(0.0, low - 0.05), 1.08)
        ax.set_title(f"{fmt} · {scope}", fontsize=9)
        ax.set_ylabel("agreement")
    axes.flat[min(len(panels), axes.size) - 1].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{model}: does a smaller calibration set rank groups like a larger one?", fontsize=10)
    save(fig, out_png)


def write(job: Job) -> None:
    model, size_order, out = job.model, job.size_order, job.outputs
    layers = model_layers(job.inputs, model)
    sizes = ordered(layers["size"].unique(), size_order)
    stability = rank_stability(layers, size_order)
    write_csv(stability, out["csv"])
    rank_stability_doc(model, stability, sizes).write(out["md"], out["html"])
    reason = None if len(sizes) >= 2 else f"a single calibration size ({', '.join(sizes)}): nothing to compare"
    plot_rank_stability(stability, model, out["png"], reason)


ANALYSIS = register(Analysis(
    name="rank_stability", level="model", reads="manifests", subcategory="(a) Rank stability across sizes",
    outputs=(
        Output("png", "{model}/rank_stability.png", "agreement per size pair (plot)"),
        Output("html", "{model}/rank_stability.html", "agreement per size pair (table)"),
        Output("csv", "{model}/rank_stability.csv"),
        Output("md", "{model}/rank_stability.md"),
    ),
    write=write,
))
