"""Per-group sensitivity of one model in network order: a panel per format × scope, a line per size."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .frames import layers_frame, load_manifests, ordered
from .plots import na_figure, pyplot, save
from .registry import Analysis, Job, Output, register


def plot_model_sensitivity(layers: pd.DataFrame, model: str, size_order: list[str], out_png: str | Path) -> None:
    """Per-group sensitivity (log scale) in network order, one panel per format × scope, one line per size."""
    plt = pyplot()
    part = layers[layers["model"] == model]
    if part.empty:
        return na_figure(out_png, f"{model}: per-group sensitivity", "no cells of this model")
    panels = sorted(part.groupby(["format", "scope"]).groups)
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 2.8 * len(panels)), squeeze=False)
    tower_order = {"vision": 0, "text": 1, "head": 2}
    for ax, (fmt, scope) in zip(axes[:, 0], panels, strict=False):
        sub = part[(part["format"] == fmt) & (part["scope"] == scope)]
        order = (
            sub.drop_duplicates("layer")
            .assign(t=lambda d: d["tower"].map(tower_order), b=lambda d: d["block"].fillna(-1))
            .sort_values(["t", "b", "layer"])["layer"]
            .tolist()
        )
        x = {layer: i for i, layer in enumerate(order)}
        for size in ordered(sub["size"].unique(), size_order):
            g = sub[sub["size"] == size]
            g = g.assign(x=g["layer"].map(x)).sort_values("x")
            ax.plot(g["x"], g["sensitivity"].clip(lower=1e-30), marker=".", lw=0.8, label=size)
        towers = sub.drop_duplicates("layer").set_index("layer")["tower"]
        n_vision = sum(1 for layer in order if towers[layer] == "vision")
        if n_vision:
            ax.axvspan(-0.5, n_vision - 0.5, color="grey", alpha=0.12, label="vision tower")
        kept = sub[sub["kept_bf16"] & (sub["size"] == ordered(sub["size"].unique(), size_order)[-1])]
        if len(kept):
            ax.scatter(kept["layer"].map(x), kept["sensitivity"].clip(lower=1e-30), s=40, facecolors="none", edgecolors="red",
                       zorder=4, label="kept BF16 (largest size)")
        ax.set_yscale("log")
        ax.set_title(f"{model} · {fmt} · {scope}", fontsize=9)
        ax.set_ylabel("score / caption token")
        ax.legend(fontsize=7, ncol=5)
    axes[-1, 0].set_xlabel("AutoQuantize group (vision blocks → text layers → lm_head)")
    save(fig, out_png)


def write(job: Job) -> None:
    plot_model_sensitivity(layers_frame(load_manifests(job.inputs)), job.model, job.size_order, job.outputs["png"])


ANALYSIS = register(Analysis(
    name="sensitivity_plot", level="model", reads="manifests", subcategory="Per-group sensitivity",
    outputs=(Output("png", "{model}/sensitivity.png", "sensitivity by group (plot)"),),
    write=write,
))
