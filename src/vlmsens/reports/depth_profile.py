"""(f) Model families by relative depth: each block's share of its tower's sensitivity (needs two families)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .doc import Doc
from .frames import layers_frame, load_manifests, ordered, write_csv
from .plots import na_figure, pyplot, save
from .registry import Analysis, Job, Output, register


def depth_profile(layers: pd.DataFrame, size_order: list[str]) -> tuple[pd.DataFrame, pd.DataFrame, str | None]:
    """Per model × format × scope × tower at the largest size: each block's share of the tower's sensitivity.

    Relative depth = (block + 0.5) / blocks in the tower, so towers of different depth line up.
    Deepstack mergers (indexed by merger, not by block) and groups outside blocks are left out.
    Returns (profile, summary, reason-if-not-applicable).
    """
    families = sorted(f for f in layers["family"].unique() if f)
    profile_cols = ["model", "family", "format", "scope", "size", "tower", "block", "blocks", "rel_depth", "score", "share"]
    summary_cols = ["family", "model", "format", "scope", "size", "tower", "blocks", "centre_rel_depth",
                    "share_first_quarter", "share_last_quarter", "peak_rel_depth"]
    if len(families) < 2:
        return (pd.DataFrame(columns=profile_cols), pd.DataFrame(columns=summary_cols),
                f"the grid holds a single model family ({', '.join(families) or 'none'}); the comparison needs two")
    blocks = layers[layers["block"].notna() & ~layers["sublayer"].str.startswith("deepstack")]
    profiles, summaries = [], []
    for (model, fmt, scope), part in blocks.groupby(["model", "format", "scope"], sort=True):
        size = ordered(part["size"].unique(), size_order)[-1]
        part = part[part["size"] == size]
        for tower, tp in part.groupby("tower", sort=True):
            per_block = tp.groupby("block")["sensitivity"].sum().sort_index()
            n_blocks = int(per_block.index.max()) + 1
            total = per_block.sum()
            share = per_block / total if total > 0 else per_block * 0.0
            rel = (per_block.index.to_numpy(dtype=float) + 0.5) / n_blocks
            profiles.append(pd.DataFrame({
                "model": model, "family": tp["family"].iloc[0], "format": fmt, "scope": scope, "size": size, "tower": tower,
                "block": per_block.index.to_numpy(dtype=int), "blocks": n_blocks, "rel_depth": rel,
                "score": per_block.to_numpy(), "share": share.to_numpy(),
            }))
            summaries.append({
                "family": tp["family"].iloc[0], "model": model, "format": fmt, "scope": scope, "size": size, "tower": tower,
                "blocks": n_blocks, "centre_rel_depth": float((rel * share.to_numpy()).sum()),
                "share_first_quarter": float(share.to_numpy()[rel <= 0.25].sum()),
                "share_last_quarter": float(share.to_numpy()[rel > 0.75].sum()),
                "peak_rel_depth": float(rel[int(np.argmax(share.to_numpy()))]),
            })
    profile = pd.concat(profiles, ignore_index=True)[profile_cols] if profiles else pd.DataFrame(columns=profile_cols)
    summary = pd.DataFrame.from_records(summaries, columns=summary_cols)
    return profile, summary, None


def depth_doc(summary: pd.DataFrame, reason: str | None) -> Doc:
    doc = Doc("Model families by relative depth")
    doc.para(
        "Where in the network the sensitivity sits, per family, with depth normalised per tower "
        "(block + 0.5) / blocks, at each model's largest calibration size. centre = share-weighted mean relative depth; "
        "first / last quarter = share of the tower's sensitivity in its first / last 25 % of blocks."
    )
    if reason:
        return doc.not_applicable(reason + ".")
    return doc.table(summary, floatfmt=".3f")


def plot_depth_profile(profile: pd.DataFrame, out_png: str | Path, reason: str | None) -> None:
    plt = pyplot()
    if reason or profile.empty:
        return na_figure(out_png, "Model families by relative depth", reason or "no block-level groups")
    towers = [t for t in ("vision", "text") if t in set(profile["tower"])]
    panels = sorted(profile.groupby(["format", "scope"]).groups)
    fig, axes = plt.subplots(len(towers), len(panels), figsize=(4.4 * len(panels), 3.3 * len(towers)), squeeze=False, sharex=True)
    models = list(dict.fromkeys(profile.sort_values(["family", "model"])["model"]))
    colors = dict(zip(models, ["#4C72B0", "#C44E52", "#55A868", "#8172B2", "#CCB974", "#64B5CD"] * 4, strict=False))
    for r, tower in enumerate(towers):
        for c, (fmt, scope) in enumerate(panels):
            ax = axes[r, c]
            sub = profile[(profile["tower"] == tower) & (profile["format"] == fmt) & (profile["scope"] == scope)]
            if sub.empty:
                ax.text(0.5, 0.5, f"{tower} tower not searched\nin {scope} cells", ha="center", va="center", transform=ax.transAxes, fontsize=8)
            for model, mp in sub.groupby("model", sort=False):
                mp = mp.sort_values("rel_depth")
                ax.plot(mp["rel_depth"], mp["share"], marker=".", color=colors[model], label=f"{model} ({mp['family'].iloc[0]})")
            ax.set_title(f"{tower} · {fmt} · {scope}", fontsize=9)
            ax.set_xlim(0, 1)
            ax.set_ylim(bottom=0)
            if c == 0:
                ax.set_ylabel("share of tower sensitivity")
            if r == len(towers) - 1:
                ax.set_xlabel("relative depth (block / blocks)")
            if len(sub):
                ax.legend(fontsize=6)
    fig.suptitle("Sensitivity by relative depth, per family (largest calibration size)", fontsize=10)
    save(fig, out_png)


def write(job: Job) -> None:
    out = job.outputs
    layers = layers_frame(load_manifests(job.inputs))
    profile, summary, reason = depth_profile(layers, job.size_order)
    write_csv(profile, out["csv"])
    depth_doc(summary, reason).write(out["md"], out["html"])
    plot_depth_profile(profile, out["png"], reason)


ANALYSIS = register(Analysis(
    name="depth_profile", level="global", reads="manifests", category="Model families",
    subcategory="(f) Sensitivity by relative depth",
    outputs=(
        Output("png", "families/depth_profile.png", "share of sensitivity by relative depth (plot)"),
        Output("html", "families/depth_profile.html", "depth summary per family (table)"),
        Output("csv", "families/depth_profile.csv"),
        Output("md", "families/depth_profile.md"),
    ),
    requires="two_families",
    write=write,
))
