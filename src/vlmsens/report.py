"""Cross-cell reports: summary per cell, rank stability across sizes, sensitivity plots per model."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any, Iterable

import pandas as pd
from tabulate import tabulate

from .io import atomic_path, atomic_write_text
from .render import layer_rows

CELL_KEYS = ["model", "format", "scope", "size"]


def load_manifests(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    return [json.loads(Path(p).read_text()) for p in paths]


def layers_frame(manifests: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per (cell, group) with the headline sensitivity, rank and selection."""
    records = []
    for m in manifests:
        cell = m["cell"]
        for row in layer_rows(m):
            records.append(
                {
                    **{k: cell[k] for k in CELL_KEYS},
                    "layer": row["layer"],
                    "tower": row["tower"],
                    "block": row["block"],
                    "sublayer": row["sublayer"],
                    "sensitivity": row["sensitivity"],
                    "rank": row["rank"],
                    "selected_format": row["selected_format"],
                    "num_bits": row["num_bits"],
                }
            )
    return pd.DataFrame.from_records(records)


def summary_frame(manifests: list[dict[str, Any]]) -> pd.DataFrame:
    records = []
    for m in manifests:
        rows = layer_rows(m)
        search = m["search"]
        records.append(
            {
                **{k: m["cell"][k] for k in CELL_KEYS},
                "samples": m["batches"]["samples"],
                "caption_tokens": m["batches"]["loss_tokens"],
                "bits_target": search["effective_bits_target"],
                "bits_achieved": round(search["effective_bits_achieved"], 4),
                "satisfied": search["is_satisfied"],
                "groups_searched": len(rows),
                "groups_kept_bf16": sum(not r["quantized"] for r in rows),
                "top_layer": rows[0]["layer"] if rows else "",
                "wall_s": round(sum(m["timings_s"].values()), 2),
                "device": m["device"].get("name"),
            }
        )
    return pd.DataFrame.from_records(records).sort_values(CELL_KEYS).reset_index(drop=True)


def top_k_overlap(a: list[str], b: list[str], k: int) -> float:
    """|top-k(a) ∩ top-k(b)| / k for two rankings (best first)."""
    if k <= 0:
        raise ValueError("k must be positive")
    k = min(k, len(a), len(b))
    return len(set(a[:k]) & set(b[:k])) / k if k else float("nan")


def rank_agreement(a: pd.Series, b: pd.Series) -> dict[str, float]:
    """Kendall τ and Spearman ρ between two score vectors on their common index."""
    from scipy.stats import kendalltau, spearmanr

    common = a.index.intersection(b.index)
    if len(common) < 2:
        return {"kendall_tau": float("nan"), "spearman": float("nan"), "n": len(common)}
    x, y = a.loc[common].to_numpy(), b.loc[common].to_numpy()
    return {"kendall_tau": float(kendalltau(x, y).statistic), "spearman": float(spearmanr(x, y).statistic), "n": len(common)}


def rank_stability(layers: pd.DataFrame, size_order: list[str]) -> pd.DataFrame:
    """Agreement of the sensitivity ranking between every pair of sizes, per model × format × scope."""
    records = []
    for (model, fmt, scope), part in layers.groupby(["model", "format", "scope"], sort=True):
        by_size = {s: g.set_index("layer")["sensitivity"] for s, g in part.groupby("size")}
        sizes = [s for s in size_order if s in by_size]
        for s1, s2 in itertools.combinations(sizes, 2):
            a, b = by_size[s1], by_size[s2]
            ranked_a = a.sort_values(ascending=False).index.tolist()
            ranked_b = b.sort_values(ascending=False).index.tolist()
            records.append(
                {
                    "model": model, "format": fmt, "scope": scope, "sizes": f"{s1}↔{s2}",
                    **rank_agreement(a, b),
                    "top10_overlap": top_k_overlap(ranked_a, ranked_b, 10),
                    "top20_overlap": top_k_overlap(ranked_a, ranked_b, 20),
                }
            )
    return pd.DataFrame.from_records(records)


def plot_model_sensitivity(layers: pd.DataFrame, model: str, size_order: list[str], out_png: str | Path) -> None:
    """Per-group sensitivity (log scale) in network order, one panel per format × scope, one line per size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    part = layers[layers["model"] == model]
    panels = sorted(part.groupby(["format", "scope"]).groups)
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 2.8 * len(panels)), squeeze=False)
    tower_order = {"vision": 0, "text": 1, "head": 2}
    for ax, (fmt, scope) in zip(axes[:, 0], panels):
        sub = part[(part["format"] == fmt) & (part["scope"] == scope)]
        order = (
            sub.drop_duplicates("layer")
            .assign(t=lambda d: d["tower"].map(tower_order), b=lambda d: d["block"].fillna(-1))
            .sort_values(["t", "b", "layer"])["layer"]
            .tolist()
        )
        x = {layer: i for i, layer in enumerate(order)}
        for size in [s for s in size_order if s in set(sub["size"])]:
            g = sub[sub["size"] == size].assign(x=lambda d: d["layer"].map(x)).sort_values("x")
            ax.plot(g["x"], g["sensitivity"].clip(lower=1e-30), marker=".", lw=0.8, label=size)
        n_vision = sum(1 for layer in order if sub[sub["layer"] == layer]["tower"].iloc[0] == "vision")
        if n_vision:
            ax.axvspan(-0.5, n_vision - 0.5, color="grey", alpha=0.12, label="vision tower")
        ax.set_yscale("log")
        ax.set_title(f"{model} · {fmt} · {scope}", fontsize=9)
        ax.set_ylabel("score / caption token")
        ax.legend(fontsize=7, ncol=4)
    axes[-1, 0].set_xlabel("AutoQuantize group (vision blocks → text layers → lm_head)")
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write_model_plot(manifest_paths: list[str], model: str, size_order: list[str], out_png: str) -> None:
    plot_model_sensitivity(layers_frame(load_manifests(manifest_paths)), model, size_order, out_png)


def _short(layer: str) -> str:
    """'model.language_model.layers.3.mlp.down_proj' -> 'layers.3.mlp.down_proj'."""
    parts = layer.split(".")
    for i, part in enumerate(parts):
        if part in ("layers", "blocks", "deepstack_merger_list", "merger"):
            return ".".join(parts[i:])
    return layer


def _md_table(frame: pd.DataFrame, floatfmt: str = ".4g") -> str:
    return tabulate(frame, headers="keys", tablefmt="github", showindex=False, floatfmt=floatfmt)


def write_reports(
    manifest_paths: list[str],
    size_order: list[str],
    *,
    summary_md: str,
    summary_csv: str,
    layers_csv: str,
    stability_csv: str,
) -> None:
    manifests = load_manifests(manifest_paths)
    summary = summary_frame(manifests)
    layers = layers_frame(manifests)
    stability = rank_stability(layers, size_order)
    for path, frame in ((summary_csv, summary), (layers_csv, layers), (stability_csv, stability)):
        with atomic_path(path) as tmp:
            frame.to_csv(tmp, index=False)
    top = (
        layers.sort_values("rank").groupby(CELL_KEYS, sort=True).head(5)
        .groupby(CELL_KEYS, sort=True)["layer"].apply(lambda s: ", ".join(_short(x) for x in s))
        .reset_index(name="top-5 groups")
    )
    text = [
        "# vlmsens summary",
        "",
        f"{len(manifests)} cells. Sensitivity = AutoQuantize score per caption token of each cell's first candidate format "
        "(raw, before ModelOpt's monotone clipping).",
        "",
        "## Cells",
        "",
        _md_table(summary),
        "",
        "## Rank stability across calibration sizes",
        "",
        _md_table(stability) if len(stability) else "(a single size: nothing to compare)",
        "",
        "## Most sensitive groups per cell",
        "",
        _md_table(top),
        "",
    ]
    atomic_write_text(summary_md, "\n".join(text))

