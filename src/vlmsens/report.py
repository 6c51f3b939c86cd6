"""Cross-cell reports: tables and plots a quantization engineer acts on.

Everything here reads ``quant_manifest.json`` files only (never the model or the .pt state):

* summary of every cell, most sensitive groups per cell;
* (a) rank stability across calibration sizes (Kendall τ, Spearman ρ, top-k overlap);
* (b) format comparison (FP8 vs INT8): per-group scores of two formats on the same data;
* (c) LM-only vs all-layers on the text layers;
* (d) towers (vision / text / head): score distribution and budget shares;
* (e) heatmap block index × sublayer type, per cell;
* (f) model families by relative depth (only when the grid holds two families);
* (g) validation of the rankings: verdict per cell and predicted score vs measured damage
  (reads ``validation.json``).

Each analysis returns data frames (written as CSV) and a :class:`Doc` (written as Markdown and
as a small HTML page for ``snakemake --report``), and says "not applicable" with the reason when
the grid lacks what it compares, instead of failing.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .io import atomic_path
from .render import layer_rows
from .reports.doc import Doc
from .validation import verdict_row

CELL_KEYS = ["model", "format", "scope", "size"]
TOWERS = ("vision", "text", "head")
TOWER_COLORS = {"vision": "#4C72B0", "text": "#DD8452", "head": "#55A868"}
SCOPES = ("lm-only", "all-layers")
TOP_K = (10, 20)
# Row order of the heatmaps: (tower, sublayer); sublayers not listed follow alphabetically.
SUBLAYER_ORDER = {
    "vision": ["patch_embed", "qkv", "proj", "gate_up", "down", "fc1", "fc2", "merger_fc1", "merger_fc2", "deepstack_fc1", "deepstack_fc2"],
    "text": ["qkv", "o", "gate_up", "down"],
    "head": ["lm_head"],
}
NO_BLOCK = "none"


def write_csv(frame: pd.DataFrame, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


# =============================================================================================
# Frames


def load_manifests(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    return [json.loads(Path(p).read_text()) for p in paths]


def layers_frame(manifests: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per (cell, group) with the headline sensitivity (per caption token), rank and selection."""
    records = []
    for m in manifests:
        cell = m["cell"]
        costs = {g["layer"]: float(g["uncompressed_cost"]) for g in m["groups"]}
        for row in layer_rows(m):
            records.append(
                {
                    **{k: cell[k] for k in CELL_KEYS},
                    "family": cell.get("family", ""),
                    "layer": row["layer"],
                    "tower": row["tower"],
                    "block": row["block"],
                    "sublayer": row["sublayer"],
                    "sensitivity": row["sensitivity"],
                    "sensitivity_raw": row["sensitivity_raw"],
                    "rank": row["rank"],
                    "selected_format": row["selected_format"],
                    "num_bits": row["num_bits"],
                    "uncompressed_cost": costs[row["layer"]],
                    "kept_bf16": not row["quantized"],
                }
            )
    frame = pd.DataFrame.from_records(records, columns=_LAYER_COLUMNS)
    frame["block"] = frame["block"].astype("Int64")
    return frame


_LAYER_COLUMNS = [
    *CELL_KEYS, "family", "layer", "tower", "block", "sublayer", "sensitivity", "sensitivity_raw", "rank",
    "selected_format", "num_bits", "uncompressed_cost", "kept_bf16",
]


def scores_frame(manifests: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per (cell, group, scored format): every candidate's per-token score, not only the first."""
    records = []
    for m in manifests:
        cell = m["cell"]
        for g in m["groups"]:
            for fmt, score in g["scores_per_token"].items():
                records.append(
                    {
                        **{k: cell[k] for k in CELL_KEYS},
                        "family": cell.get("family", ""),
                        "layer": g["layer"],
                        "tower": g["tower"],
                        "block": g["block"],
                        "sublayer": g["sublayer"],
                        "scored_format": fmt,
                        "score": float(score),
                        "selected_format": g["selected_format"],
                    }
                )
    columns = [*CELL_KEYS, "family", "layer", "tower", "block", "sublayer", "scored_format", "score", "selected_format"]
    frame = pd.DataFrame.from_records(records, columns=columns)
    frame["block"] = frame["block"].astype("Int64")
    return frame


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


def ordered(values: Iterable[str], order: Iterable[str] | None) -> list[str]:
    """``values`` in ``order`` first, then the rest sorted."""
    values = list(dict.fromkeys(values))
    order = list(order or [])
    return [v for v in order if v in values] + sorted(v for v in values if v not in order)


def short_name(layer: str) -> str:
    """'model.language_model.layers.3.mlp.down_proj' -> 'layers.3.mlp.down_proj'; visual -> 'visual.blocks...'."""
    parts = layer.split(".")
    for i, part in enumerate(parts):
        if part in ("layers", "blocks", "deepstack_merger_list", "merger", "patch_embed"):
            prefix = "visual." if "visual" in parts[:i] else ""
            return prefix + ".".join(parts[i:])
    return layer


_short = short_name


# =============================================================================================
# Statistics


def top_k_overlap(a: list[str] | pd.Series, b: list[str] | pd.Series, k: int) -> float:
    """Share of the top-k of ``a`` that is also in the top-k of ``b``.

    Lists are rankings (best first, no ties): ``|top_k(a) ∩ top_k(b)| / k'`` with
    ``k' = min(k, len(a), len(b))`` (short lists compare what they have).

    Series are scores (higher = more sensitive) on a layer index; only layers in both count,
    ``k' = min(k, n_common)``. Ties at the k-th score are split evenly: a layer tied with
    ``t`` others for the last ``r`` places is in the top-k with probability ``r / t``, and the
    overlap is the expected value under random tie-breaking (all-equal scores give ``k'/n``,
    the chance level, not 0 or 1).
    """
    if k <= 0:
        raise ValueError("k must be positive")
    if isinstance(a, pd.Series) or isinstance(b, pd.Series):
        a, b = pd.Series(a).dropna(), pd.Series(b).dropna()
        common = a.index.intersection(b.index)
        k_eff = min(k, len(common))
        if k_eff == 0:
            return float("nan")
        pa = _topk_membership(a.loc[common], k_eff)
        pb = _topk_membership(b.loc[common], k_eff)
        return float((pa * pb).sum() / k_eff)
    k_eff = min(k, len(a), len(b))
    return len(set(a[:k_eff]) & set(b[:k_eff])) / k_eff if k_eff else float("nan")


def _topk_membership(scores: pd.Series, k: int) -> np.ndarray:
    values = scores.to_numpy(dtype=float)
    kth = np.sort(values)[::-1][k - 1]
    greater = values > kth
    equal = values == kth
    p = greater.astype(float)
    p[equal] = (k - greater.sum()) / equal.sum()
    return p


def rank_agreement(a: pd.Series, b: pd.Series) -> dict[str, float]:
    """Kendall τ-b and Spearman ρ between two score vectors on their common index (NaN when undefined)."""
    from scipy.stats import kendalltau, spearmanr

    a, b = a.dropna(), b.dropna()
    common = a.index.intersection(b.index)
    out = {"kendall_tau": float("nan"), "spearman": float("nan"), "n": int(len(common))}
    if len(common) < 2:
        return out
    x, y = a.loc[common].to_numpy(dtype=float), b.loc[common].to_numpy(dtype=float)
    if np.all(x == x[0]) or np.all(y == y[0]):
        return out  # a constant ranking has no order to agree with
    out["kendall_tau"] = float(kendalltau(x, y).statistic)
    out["spearman"] = float(spearmanr(x, y).statistic)
    return out


def agreement_row(a: pd.Series, b: pd.Series) -> dict[str, float]:
    return {
        **rank_agreement(a, b),
        **{f"top{k}_overlap": top_k_overlap(a, b, k) for k in TOP_K},
    }


def _floor(values: Iterable[float]) -> float:
    """A positive floor for log scales: a tenth of the smallest positive value (1e-30 if none)."""
    arr = np.asarray(list(values), dtype=float)
    positive = arr[np.isfinite(arr) & (arr > 0)]
    return float(positive.min() / 10) if positive.size else 1e-30


def log10_ratio(numerator: pd.Series, denominator: pd.Series, floor: float) -> pd.Series:
    return np.log10(numerator.clip(lower=floor)) - np.log10(denominator.clip(lower=floor))


# =============================================================================================
# (a) Rank stability across sizes


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
        return _na_figure(out_png, f"{model}: rank stability across sizes", reason or "no size pairs to compare")
    metrics = ["kendall_tau", "spearman", *[f"top{k}_overlap" for k in TOP_K]]
    labels = ["Kendall τ", "Spearman ρ", *[f"top-{k} overlap" for k in TOP_K]]
    low = float(np.nanmin(stability[metrics].to_numpy(dtype=float))) if stability[metrics].notna().any().any() else 0.0
    fig, axes, panels = _format_scope_grid(stability, 6.0, 3.2, sharey=True)
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
    _save(fig, out_png)


def write_rank_stability(manifest_paths: list[str], model: str, size_order: list[str], *, png: str, csv: str, md: str, html: str) -> None:
    layers = _model_layers(manifest_paths, model)
    sizes = ordered(layers["size"].unique(), size_order)
    stability = rank_stability(layers, size_order)
    write_csv(stability, csv)
    rank_stability_doc(model, stability, sizes).write(md, html)
    reason = None if len(sizes) >= 2 else f"a single calibration size ({', '.join(sizes)}): nothing to compare"
    plot_rank_stability(stability, model, png, reason)


# =============================================================================================
# (b) Format comparison (FP8 vs INT8)


@dataclass
class Comparison:
    agreement: pd.DataFrame
    per_layer: pd.DataFrame
    reason: str | None = None


def _format_scores(scores: pd.DataFrame) -> pd.DataFrame:
    """(scope, size, layer) × scored_format, preferring the cell whose format is the scored one."""
    scores = scores.assign(own=(scores["format"] == scores["scored_format"]).astype(int))
    best = scores.sort_values("own", ascending=False).drop_duplicates(["scope", "size", "layer", "scored_format"])
    return best


def format_comparison(scores: pd.DataFrame, size_order: list[str], format_order: list[str] | None = None) -> Comparison:
    """Per-group scores of every pair of formats on the same model, scope and calibration data."""
    agreement_cols = ["format_a", "format_b", "scope", "size", "kendall_tau", "spearman", "n",
                      *[f"top{k}_overlap" for k in TOP_K], "median_log10_ratio", "share_b_higher"]
    layer_cols = ["format_a", "format_b", "scope", "size", "layer", "tower", "sublayer", "block", "score_a", "score_b",
                  "log10_ratio", "rank_a", "rank_b", "selected_a", "selected_b"]
    formats = ordered(scores["scored_format"].unique(), format_order)
    if len(formats) < 2:
        return Comparison(pd.DataFrame(columns=agreement_cols), pd.DataFrame(columns=layer_cols),
                          f"the grid scores a single format ({', '.join(formats) or 'none'}); nothing to compare it with")
    best = _format_scores(scores)
    floor = _floor(best["score"])
    agreements, layers = [], []
    for fmt_a, fmt_b in itertools.combinations(formats, 2):
        for (scope, size), part in best.groupby(["scope", "size"], sort=False):
            a = part[part["scored_format"] == fmt_a].set_index("layer")
            b = part[part["scored_format"] == fmt_b].set_index("layer")
            common = a.index.intersection(b.index)
            if len(common) == 0:
                continue
            sa, sb = a.loc[common, "score"], b.loc[common, "score"]
            ratio = log10_ratio(sb, sa, floor)
            agreements.append({"format_a": fmt_a, "format_b": fmt_b, "scope": scope, "size": size, **agreement_row(sa, sb),
                               "median_log10_ratio": float(ratio.median()), "share_b_higher": float((sb > sa).mean())})
            layers.append(pd.DataFrame({
                "format_a": fmt_a, "format_b": fmt_b, "scope": scope, "size": size, "layer": common,
                "tower": a.loc[common, "tower"].to_numpy(), "sublayer": a.loc[common, "sublayer"].to_numpy(),
                "block": a.loc[common, "block"].to_numpy(), "score_a": sa.to_numpy(), "score_b": sb.to_numpy(),
                "log10_ratio": ratio.to_numpy(),
                "rank_a": sa.rank(ascending=False, method="min").astype(int).to_numpy(),
                "rank_b": sb.rank(ascending=False, method="min").astype(int).to_numpy(),
                "selected_a": a.loc[common, "selected_format"].to_numpy(), "selected_b": b.loc[common, "selected_format"].to_numpy(),
            }))
    if not agreements:
        return Comparison(pd.DataFrame(columns=agreement_cols), pd.DataFrame(columns=layer_cols),
                          f"no scope × size holds scores of two formats ({', '.join(formats)}) for the same groups")
    agreement = pd.DataFrame.from_records(agreements, columns=agreement_cols)
    per_layer = pd.concat(layers, ignore_index=True)[layer_cols]
    size_rank = {s: i for i, s in enumerate(ordered(per_layer["size"].unique(), size_order))}
    scope_rank = {s: i for i, s in enumerate(ordered(per_layer["scope"].unique(), SCOPES))}
    agreement = agreement.sort_values(["format_a", "format_b", "scope", "size"], key=_order_key(scope_rank, size_rank)).reset_index(drop=True)
    per_layer = per_layer.assign(abs_ratio=per_layer["log10_ratio"].abs())
    per_layer = per_layer.sort_values(["format_a", "format_b", "scope", "size", "abs_ratio"], key=_order_key(scope_rank, size_rank),
                                      ascending=[True, True, True, True, False]).drop(columns="abs_ratio").reset_index(drop=True)
    return Comparison(agreement, per_layer)


def _order_key(scope_rank: dict[str, int], size_rank: dict[str, int]):
    def key(col: pd.Series) -> pd.Series:
        if col.name == "scope" and scope_rank:
            return col.map(scope_rank)
        if col.name == "size":
            return col.map(size_rank)
        return col
    return key


def disagreement_table(per_layer: pd.DataFrame, size_order: list[str], top: int = 15, a: str = "a", b: str = "b") -> dict[tuple, pd.DataFrame]:
    """Per (pair, scope): the ``top`` groups with the largest |log10 ratio| at the largest size, with the ratio at every size."""
    out = {}
    for (fa, fb, scope), part in per_layer.groupby(["format_a", "format_b", "scope"], sort=False):
        sizes = ordered(part["size"].unique(), size_order)
        largest = part[part["size"] == sizes[-1]].copy()
        largest = largest.reindex(largest["log10_ratio"].abs().sort_values(ascending=False).index).head(top)
        table = pd.DataFrame({
            "layer": largest["layer"].map(short_name), "tower": largest["tower"],
            f"{fa}": largest["score_a"], f"{fb}": largest["score_b"],
        })
        for size in sizes:
            ratios = part[part["size"] == size].set_index("layer")["log10_ratio"]
            table[f"log10({fb}/{fa}) {size}"] = largest["layer"].map(ratios).to_numpy()
        table[f"rank {fa}"] = largest["rank_a"].to_numpy()
        table[f"rank {fb}"] = largest["rank_b"].to_numpy()
        table["less sensitive"] = np.where(largest["score_b"] < largest["score_a"], fb,
                                           np.where(largest["score_a"] < largest["score_b"], fa, "tie"))
        out[(fa, fb, scope, sizes[-1])] = table.reset_index(drop=True)
    return out


def format_comparison_doc(model: str, comparison: Comparison, size_order: list[str]) -> Doc:
    doc = Doc(f"{model}: format comparison (FP8 vs INT8)")
    doc.para(
        "Per-group AutoQuantize scores per caption token of two formats on the same model, scope and calibration "
        "data (raw scores, before ModelOpt's monotone clipping, so both are visible even at equal bit cost). "
        "log10 ratio > 0: the group is more sensitive to the second format. Groups where the formats disagree by "
        "orders of magnitude are where picking the format per layer pays off."
    )
    if comparison.reason:
        return doc.not_applicable(comparison.reason + ".")
    doc.heading("Agreement between formats")
    doc.table(comparison.agreement, floatfmt=".3f")
    for (_fa, _fb, scope, size), table in disagreement_table(comparison.per_layer, size_order).items():
        doc.heading(f"Largest disagreements, {scope} (ranked at size {size})")
        doc.table(table, floatfmt=".3g")
    return doc


def plot_format_comparison(comparison: Comparison, model: str, size_order: list[str], out_png: str | Path) -> None:
    plt = _pyplot()
    if comparison.reason:
        return _na_figure(out_png, f"{model}: format comparison", comparison.reason)
    per_layer = comparison.per_layer
    pairs = list(dict.fromkeys(zip(per_layer["format_a"], per_layer["format_b"], strict=False)))
    scopes = ordered(per_layer["scope"].unique(), SCOPES)
    sizes = ordered(per_layer["size"].unique(), size_order)
    markers = dict(zip(sizes, "os^Dv<>p*h", strict=False))
    floor = _floor(pd.concat([per_layer["score_a"], per_layer["score_b"]]))
    fig, axes = plt.subplots(len(pairs), len(scopes), figsize=(5.2 * len(scopes), 4.8 * len(pairs)), squeeze=False)
    for row, (fa, fb) in enumerate(pairs):
        for col, scope in enumerate(scopes):
            ax = axes[row, col]
            sub = per_layer[(per_layer["format_a"] == fa) & (per_layer["format_b"] == fb) & (per_layer["scope"] == scope)]
            if sub.empty:
                ax.text(0.5, 0.5, "no groups", ha="center", va="center", transform=ax.transAxes)
                continue
            lo, hi = _loglog_scatter(ax, sub, "score_a", "score_b", sizes, markers, floor)
            for decade in (10, 0.1):
                ax.plot([lo, hi], [lo * decade, hi * decade], color="grey", lw=0.6, ls=":")
            top = sub[sub["size"] == sizes[-1]]
            top = top.reindex(top["log10_ratio"].abs().sort_values(ascending=False).index).head(4)
            for _, r in top.iterrows():
                ax.annotate(short_name(r["layer"]), (max(r["score_a"], floor), max(r["score_b"], floor)), fontsize=6,
                            xytext=(3, 3), textcoords="offset points")
            ax.set_xlabel(f"{fa}: score / caption token")
            ax.set_ylabel(f"{fb}: score / caption token")
            ax.set_title(f"{scope}", fontsize=9)
    _legend_towers_sizes(fig, axes[0, -1], markers)
    fig.suptitle(f"{model}: per-group sensitivity, {' / '.join(f'{a} vs {b}' for a, b in pairs)} "
                 "(solid: equal, dotted: 10× apart)", fontsize=10)
    _save(fig, out_png)


def _format_scope_grid(frame: pd.DataFrame, width: float, height: float, **subplots):
    """A figure with one axis per (format, scope) of ``frame``, two per row, spare axes hidden.

    Returns (figure, axes, [(axis, format, scope, rows of that panel), ...]) in sorted order.
    """
    plt = _pyplot()
    keys = sorted(frame.groupby(["format", "scope"]).groups)
    ncols = min(2, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False, **subplots)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    panels = [(ax, fmt, scope, frame[(frame["format"] == fmt) & (frame["scope"] == scope)])
              for ax, (fmt, scope) in zip(axes.flat, keys, strict=False)]
    return fig, axes, panels


def _loglog_scatter(ax, sub: pd.DataFrame, x: str, y: str, sizes, markers, floor: float) -> tuple[float, float]:
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


def write_format_comparison(manifest_paths: list[str], model: str, size_order: list[str], format_order: list[str], *,
                            png: str, agreement_csv: str, layers_csv: str, md: str, html: str) -> None:
    scores = scores_frame([m for m in load_manifests(manifest_paths) if m["cell"]["model"] == model])
    comparison = format_comparison(scores, size_order, format_order)
    write_csv(comparison.agreement, agreement_csv)
    write_csv(comparison.per_layer, layers_csv)
    format_comparison_doc(model, comparison, size_order).write(md, html)
    plot_format_comparison(comparison, model, size_order, png)


# =============================================================================================
# (c) LM-only vs all-layers (text layers)


def scope_comparison(layers: pd.DataFrame, size_order: list[str]) -> Comparison:
    """Text and head groups scored with caption-only data (lm-only) vs image+caption data (all-layers)."""
    agreement_cols = ["format", "size", "kendall_tau", "spearman", "n", *[f"top{k}_overlap" for k in TOP_K], "median_log10_ratio"]
    layer_cols = ["format", "size", "layer", "tower", "sublayer", "block", "score_lm_only", "score_all_layers", "log10_ratio",
                  "rank_lm_only", "rank_all_layers", "rank_shift"]
    scopes = set(layers["scope"].unique())
    if not set(SCOPES) <= scopes:
        return Comparison(pd.DataFrame(columns=agreement_cols), pd.DataFrame(columns=layer_cols),
                          f"the grid runs only scope {', '.join(sorted(scopes)) or 'none'}; comparing needs both lm-only and all-layers")
    text = layers[layers["tower"] != "vision"]
    floor = _floor(text["sensitivity"])
    agreements, per_layer = [], []
    for (fmt, size), part in text.groupby(["format", "size"], sort=True):
        lm = part[part["scope"] == "lm-only"].set_index("layer")
        al = part[part["scope"] == "all-layers"].set_index("layer")
        common = lm.index.intersection(al.index)
        if len(common) == 0:
            continue
        s_lm, s_all = lm.loc[common, "sensitivity"], al.loc[common, "sensitivity"]
        ratio = log10_ratio(s_all, s_lm, floor)
        agreements.append({"format": fmt, "size": size, **agreement_row(s_lm, s_all), "median_log10_ratio": float(ratio.median())})
        r_lm = s_lm.rank(ascending=False, method="min").astype(int)
        r_all = s_all.rank(ascending=False, method="min").astype(int)
        per_layer.append(pd.DataFrame({
            "format": fmt, "size": size, "layer": common, "tower": lm.loc[common, "tower"].to_numpy(),
            "sublayer": lm.loc[common, "sublayer"].to_numpy(), "block": lm.loc[common, "block"].to_numpy(),
            "score_lm_only": s_lm.to_numpy(), "score_all_layers": s_all.to_numpy(), "log10_ratio": ratio.to_numpy(),
            "rank_lm_only": r_lm.to_numpy(), "rank_all_layers": r_all.to_numpy(), "rank_shift": (r_lm - r_all).to_numpy(),
        }))
    if not agreements:
        return Comparison(pd.DataFrame(columns=agreement_cols), pd.DataFrame(columns=layer_cols),
                          "no format × size has text groups in both scopes")
    size_rank = {s: i for i, s in enumerate(ordered(layers["size"].unique(), size_order))}
    agreement = pd.DataFrame.from_records(agreements, columns=agreement_cols)
    agreement = agreement.sort_values(["format", "size"], key=_order_key({}, size_rank)).reset_index(drop=True)
    frame = pd.concat(per_layer, ignore_index=True)[layer_cols]
    frame = frame.assign(abs_shift=frame["rank_shift"].abs()).sort_values(
        ["format", "size", "abs_shift"], key=_order_key({}, size_rank), ascending=[True, True, False]).drop(columns="abs_shift")
    return Comparison(agreement, frame.reset_index(drop=True))


def scope_comparison_doc(model: str, comparison: Comparison, size_order: list[str], top: int = 10) -> Doc:
    doc = Doc(f"{model}: LM-only vs all-layers (text layers)")
    doc.para(
        "The text decoder and lm_head scored twice: with caption-only samples (`lm-only`, vision tower outside the "
        "search) and with image+caption samples (`all-layers`). High agreement means the cheaper text-only "
        "calibration ranks the language model's layers like the multimodal one. rank shift > 0: the group ranks "
        "as more sensitive once images are in the prompt."
    )
    if comparison.reason:
        return doc.not_applicable(comparison.reason + ".")
    doc.heading("Agreement per format and size")
    doc.table(comparison.agreement, floatfmt=".3f")
    per_layer = comparison.per_layer
    for fmt, part in per_layer.groupby("format", sort=True):
        size = ordered(part["size"].unique(), size_order)[-1]
        rows = part[part["size"] == size].head(top)
        doc.heading(f"Largest rank shifts, {fmt} (size {size})")
        doc.table(rows.assign(layer=rows["layer"].map(short_name))[
            ["layer", "tower", "score_lm_only", "score_all_layers", "log10_ratio", "rank_lm_only", "rank_all_layers", "rank_shift"]
        ], floatfmt=".3g")
    return doc


def plot_scope_comparison(comparison: Comparison, model: str, size_order: list[str], out_png: str | Path) -> None:
    plt = _pyplot()
    if comparison.reason:
        return _na_figure(out_png, f"{model}: LM-only vs all-layers", comparison.reason)
    per_layer = comparison.per_layer
    formats = sorted(per_layer["format"].unique())
    sizes = ordered(per_layer["size"].unique(), size_order)
    markers = dict(zip(sizes, "os^Dv<>p*h", strict=False))
    floor = _floor(pd.concat([per_layer["score_lm_only"], per_layer["score_all_layers"]]))
    fig, axes = plt.subplots(1, len(formats), figsize=(5.2 * len(formats), 4.8), squeeze=False)
    for ax, fmt in zip(axes[0], formats, strict=False):
        sub = per_layer[per_layer["format"] == fmt]
        _loglog_scatter(ax, sub, "score_lm_only", "score_all_layers", sizes, markers, floor)
        row = comparison.agreement[(comparison.agreement["format"] == fmt) & (comparison.agreement["size"] == sizes[-1])]
        tau = f"τ = {row['kendall_tau'].iloc[0]:.2f} at {sizes[-1]}" if len(row) else ""
        ax.set_title(f"{fmt}   {tau}", fontsize=9)
        ax.set_xlabel("lm-only (captions): score / caption token")
        ax.set_ylabel("all-layers (image+caption): score / caption token")
    _legend_towers_sizes(fig, axes[0, -1], markers, towers=("text", "head"))
    fig.suptitle(f"{model}: text layers scored with and without images", fontsize=10)
    _save(fig, out_png)


def write_scope_comparison(manifest_paths: list[str], model: str, size_order: list[str], *,
                           png: str, agreement_csv: str, layers_csv: str, md: str, html: str) -> None:
    layers = _model_layers(manifest_paths, model)
    comparison = scope_comparison(layers, size_order)
    write_csv(comparison.agreement, agreement_csv)
    write_csv(comparison.per_layer, layers_csv)
    scope_comparison_doc(model, comparison, size_order).write(md, html)
    plot_scope_comparison(comparison, model, size_order, png)


# =============================================================================================
# (d) Towers


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
        return _na_figure(out_png, f"{model}: score distribution per tower", "no searched groups")
    sizes = ordered(layers["size"].unique(), size_order)
    floor = _floor(layers["sensitivity"])
    fig, axes, panels = _format_scope_grid(layers, 6.2, 3.6, sharey=True)
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
    _save(fig, out_png)


def plot_tower_shares(summary: pd.DataFrame, model: str, size_order: list[str], out_png: str | Path) -> None:
    plt = _pyplot()
    if summary.empty:
        return _na_figure(out_png, f"{model}: budget share per tower", "no searched groups")
    sizes = ordered(summary["size"].unique(), size_order)
    measures = [("sensitivity_share", "S"), ("cost_share", "W"), ("bf16_budget_share", "B")]
    fig, axes, panels = _format_scope_grid(summary, 6.2, 3.4, sharey=True)
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
    _save(fig, out_png)


def write_towers(manifest_paths: list[str], model: str, size_order: list[str], *,
                 distribution_png: str, share_png: str, csv: str, md: str, html: str) -> None:
    layers = _model_layers(manifest_paths, model)
    summary = tower_summary(layers)
    write_csv(summary, csv)
    towers_doc(model, summary, layers).write(md, html)
    plot_tower_distribution(layers, model, size_order, distribution_png)
    plot_tower_shares(summary, model, size_order, share_png)


# =============================================================================================
# (e) Heatmap block × sublayer


def _block_label(block: Any) -> str:
    return NO_BLOCK if block is None or pd.isna(block) else str(int(block))


def heatmap_frame(layers: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(scores, kept) pivots of one cell: rows (tower, sublayer), columns block index ('·' = not in a block).

    Scores of groups sharing a row and column are summed; ``kept`` is True where any such group
    stays in BF16. Rows follow :data:`SUBLAYER_ORDER`, columns ascend, '·' last.
    """
    if layers.empty:
        empty = pd.DataFrame(index=pd.MultiIndex.from_tuples([], names=["tower", "sublayer"]))
        return empty, empty
    frame = layers.assign(column=layers["block"].map(_block_label))
    scores = frame.pivot_table(index=["tower", "sublayer"], columns="column", values="sensitivity", aggfunc="sum")
    kept = frame.pivot_table(index=["tower", "sublayer"], columns="column", values="kept_bf16", aggfunc="max")
    rows = []
    for tower in [*TOWERS, *sorted(set(frame["tower"]) - set(TOWERS))]:
        present = [s for (t, s) in scores.index if t == tower]
        order = SUBLAYER_ORDER.get(tower, [])
        rows += [(tower, s) for s in order if s in present] + [(tower, s) for s in sorted(present) if s not in order]
    numeric = sorted((c for c in scores.columns if c != NO_BLOCK), key=int)
    columns = numeric + ([NO_BLOCK] if NO_BLOCK in scores.columns else [])
    scores = scores.reindex(index=pd.MultiIndex.from_tuples(rows, names=["tower", "sublayer"]), columns=columns)
    kept = kept.reindex(index=scores.index, columns=columns)
    kept = kept.astype(object).where(kept.notna(), False).astype(bool)
    scores.columns.name = kept.columns.name = "block"
    return scores, kept


def plot_heatmap(layers: pd.DataFrame, title: str, out_png: str | Path) -> None:
    plt = _pyplot()
    scores, kept = heatmap_frame(layers)
    if scores.empty:
        return _na_figure(out_png, title, "no searched groups in this cell")
    values = np.log10(scores.to_numpy(dtype=float).clip(min=_floor(scores.to_numpy().ravel())))
    n_rows, n_cols = values.shape
    fig, ax = plt.subplots(figsize=(min(max(7.5, 3.8 + 0.3 * n_cols), 18), 1.6 + 0.3 * n_rows))
    masked = np.ma.masked_invalid(values)
    image = ax.imshow(masked, aspect="auto", cmap="viridis", interpolation="nearest")
    image.cmap.set_bad("#eeeeee")
    ys, xs = np.nonzero(kept.to_numpy())
    ax.scatter(xs, ys, marker="s", s=36, facecolors="none", edgecolors="red", linewidths=1.3)
    ax.set_xticks(range(n_cols), list(scores.columns), fontsize=7)
    ax.set_yticks(range(n_rows), [f"{t}: {s}" for t, s in scores.index], fontsize=7)
    towers = [t for t, _ in scores.index]
    for i in range(1, n_rows):
        if towers[i] != towers[i - 1]:
            ax.axhline(i - 0.5, color="white", lw=2)
    ax.set_xlabel(f"block index ({NO_BLOCK}: outside the blocks; deepstack rows: merger index)", fontsize=8)
    fig.colorbar(image, ax=ax, label="log10 score / caption token", fraction=0.04, pad=0.02)
    ax.set_title(f"{title}\nsensitivity by block and sublayer; red squares: kept in BF16, grey: not searched", fontsize=9, loc="left")
    _save(fig, out_png)


def write_heatmap(manifest_path: str, *, png: str, csv: str) -> None:
    manifests = load_manifests([manifest_path])
    cell = manifests[0]["cell"]
    layers = layers_frame(manifests)
    scores, kept = heatmap_frame(layers)
    long = scores.stack(future_stack=True).rename("score").reset_index() if not scores.empty else pd.DataFrame(columns=["tower", "sublayer", "block", "score"])
    if not scores.empty:
        long["kept_bf16"] = kept.stack(future_stack=True).to_numpy()
        long = long.dropna(subset=["score"])
    write_csv(long, csv)
    plot_heatmap(layers, f"{cell['model']} · {cell['format']} · {cell['scope']} · {cell['size']}", png)


# =============================================================================================
# (f) Families by relative depth


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
    plt = _pyplot()
    if reason or profile.empty:
        return _na_figure(out_png, "Model families by relative depth", reason or "no block-level groups")
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
    _save(fig, out_png)


def write_depth_profile(manifest_paths: list[str], size_order: list[str], *, png: str, csv: str, md: str, html: str) -> None:
    layers = layers_frame(load_manifests(manifest_paths))
    profile, summary, reason = depth_profile(layers, size_order)
    write_csv(profile, csv)
    depth_doc(summary, reason).write(md, html)
    plot_depth_profile(profile, png, reason)


# =============================================================================================
# Recipes across cells


def recipes_frame(recipe_jsons: list[str | Path]) -> pd.DataFrame:
    records = []
    for path in recipe_jsons:
        payload = json.loads(Path(path).read_text())
        for r in payload["recipes"]:
            records.append({
                **{k: r["cell"][k] for k in CELL_KEYS}, "budget_bits": r["budget_bits"], "feasible": r["feasible"],
                "achieved_bits": r["achieved_bits"], "predicted_score": r["predicted_score"],
                "score_per_token": r["predicted_score_per_token"], "groups_bf16": r["groups_bf16"], "groups": r["groups"],
                "solver": r["source"], "milp_agrees": r["cross_check"]["agrees"],
                "quant_cfg": r["files"]["quant_cfg"], "ignore": r["files"]["ignore"],
            })
    columns = [*CELL_KEYS, "budget_bits", "feasible", "achieved_bits", "predicted_score", "score_per_token", "groups_bf16",
               "groups", "solver", "milp_agrees", "quant_cfg", "ignore"]
    return pd.DataFrame.from_records(records, columns=columns)


def recipes_doc(model: str, frame: pd.DataFrame) -> Doc:
    doc = Doc(f"{model}: recipes per effective-bits budget")
    doc.para(
        "Each cell's format choice re-solved for every configured budget from its stored scores (ModelOpt "
        "`get_auto_quantize_config` on the search state, cross-checked with an exact MILP on the manifest). "
        "score / token is the predicted loss increase per caption token (sum of the selected groups' scores); "
        "each recipe ships a ModelOpt quant_cfg JSON and an `ignore:` list (paths below)."
    )
    if frame.empty:
        return doc.not_applicable("no recipes.")
    infeasible = frame[~frame["feasible"]]
    if len(infeasible):
        doc.para(f"**{len(infeasible)} recipe(s) infeasible**: the budget is below the fewest bits the cell's formats reach; "
                 "they ship the most compressed recipe instead.")
    over = frame[frame["feasible"] & (frame["achieved_bits"] > frame["budget_bits"] * (1 + 1e-9))]
    if len(over):
        doc.para(f"**{len(over)} feasible recipe(s) exceed their budget** (a bug: please report).")
    doc.table(frame.drop(columns=["model", "quant_cfg", "ignore"]), floatfmt=".4g")
    doc.heading("Files")
    doc.table(frame[["format", "scope", "size", "budget_bits", "quant_cfg", "ignore"]], floatfmt="g")
    return doc


def plot_recipes(frame: pd.DataFrame, model: str, size_order: list[str], out_png: str | Path) -> None:
    if frame.empty:
        return _na_figure(out_png, f"{model}: recipes", "no recipes")
    sizes = ordered(frame["size"].unique(), size_order)
    floor = _floor(frame["score_per_token"])
    fig, axes, panels = _format_scope_grid(frame, 5.6, 3.6)
    for ax, fmt, scope, sub in panels:
        for size in sizes:
            pts = sub[sub["size"] == size].sort_values("budget_bits")
            if pts.empty:
                continue
            line, = ax.plot(pts["achieved_bits"], pts["score_per_token"].clip(lower=floor), marker="o", label=size)
            bad = pts[~pts["feasible"]]
            if len(bad):
                ax.scatter(bad["achieved_bits"], bad["score_per_token"].clip(lower=floor), marker="x", s=60, color="red", zorder=4)
        for budget in sorted(sub["budget_bits"].unique()):
            ax.axvline(budget, color="grey", lw=0.5, ls=":")
        ax.set_yscale("log")
        ax.set_xlabel("achieved effective bits (dotted: budgets)")
        ax.set_ylabel("predicted score / caption token")
        ax.set_title(f"{fmt} · {scope}", fontsize=9)
        ax.legend(fontsize=7, title="size", title_fontsize=7)
    fig.suptitle(f"{model}: predicted sensitivity of the re-solved recipe vs bits (red ×: infeasible budget)", fontsize=10)
    _save(fig, out_png)


def write_recipe_summary(recipe_jsons: list[str], model: str, size_order: list[str], *, png: str, csv: str, md: str, html: str) -> None:
    frame = recipes_frame(recipe_jsons)
    frame = frame[frame["model"] == model].reset_index(drop=True)
    write_csv(frame, csv)
    recipes_doc(model, frame).write(md, html)
    plot_recipes(frame, model, size_order, png)


# =============================================================================================
# Per-model sensitivity overview (all cells)


def plot_model_sensitivity(layers: pd.DataFrame, model: str, size_order: list[str], out_png: str | Path) -> None:
    """Per-group sensitivity (log scale) in network order, one panel per format × scope, one line per size."""
    plt = _pyplot()
    part = layers[layers["model"] == model]
    if part.empty:
        return _na_figure(out_png, f"{model}: per-group sensitivity", "no cells of this model")
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
    _save(fig, out_png)


def write_model_plot(manifest_paths: list[str], model: str, size_order: list[str], out_png: str) -> None:
    plot_model_sensitivity(layers_frame(load_manifests(manifest_paths)), model, size_order, out_png)


# =============================================================================================
# Summary of every cell


def summary_doc(manifests: list[dict[str, Any]], summary: pd.DataFrame, layers: pd.DataFrame, stability: pd.DataFrame) -> Doc:
    doc = Doc("vlmsens summary")
    doc.para(
        f"{len(manifests)} cells. Sensitivity = AutoQuantize score per caption token of each cell's first candidate "
        "format (raw, before ModelOpt's monotone clipping)."
    )
    doc.heading("Cells").table(summary)
    doc.heading("Rank stability across calibration sizes")
    if len(stability):
        doc.table(stability, floatfmt=".3f")
    else:
        doc.not_applicable("a single calibration size: nothing to compare.")
    top = (
        layers.sort_values("rank").groupby(CELL_KEYS, sort=True).head(5)
        .groupby(CELL_KEYS, sort=True)["layer"].apply(lambda s: ", ".join(short_name(x) for x in s))
        .reset_index(name="top-5 groups")
    ) if len(layers) else pd.DataFrame(columns=[*CELL_KEYS, "top-5 groups"])
    doc.heading("Most sensitive groups per cell").table(top)
    return doc


def write_reports(
    manifest_paths: list[str],
    size_order: list[str],
    *,
    summary_md: str,
    summary_csv: str,
    layers_csv: str,
    stability_csv: str,
    summary_html: str | None = None,
) -> None:
    manifests = load_manifests(manifest_paths)
    summary = summary_frame(manifests)
    layers = layers_frame(manifests)
    stability = rank_stability(layers, size_order)
    for path, frame in ((summary_csv, summary), (layers_csv, layers), (stability_csv, stability)):
        write_csv(frame, path)
    summary_doc(manifests, summary, layers, stability).write(summary_md, summary_html)


# =============================================================================================
# (g) Validation of the rankings (validation.json of rule validate)


def validation_frame(docs: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per validated cell: correlation, damage ratios, end-to-end figures and the verdict."""
    rows = []
    for doc in docs:
        corr = doc["ablations"]["correlation"]
        chosen = verdict_row(doc)
        e2e = doc["end_to_end"]
        rows.append({
            **{k: doc["cell"][k] for k in CELL_KEYS},
            "groups": doc["n_groups"],
            "spearman_kl": corr["kl"]["spearman"]["value"],
            "spearman_kl_lo": corr["kl"]["spearman"]["ci95"][0],
            "spearman_kl_hi": corr["kl"]["spearman"]["ci95"][1],
            "kendall_kl": corr["kl"]["kendall"]["value"],
            "spearman_loss": corr["loss_increase"]["spearman"]["value"],
            "k": chosen["k"],
            "kl_top_k": chosen["top"]["kl"],
            "kl_bottom_k": chosen["bottom"]["kl"],
            "kl_random_k": chosen["random"]["mean"].get("kl", math.nan),
            "ratio_top_bottom": chosen["ratio_top_bottom"]["kl"],
            "recipe_bits": e2e["recipe"]["bits"],
            "kl_recipe": e2e["recipe"]["kl"],
            "kl_uniform": e2e["uniform"]["kl"],
            "kl_random_recipes": e2e["random_same_budget"]["mean"].get("kl", math.nan),
            "recipe_beats_random": f"{e2e['random_same_budget']['recipe_beats']}/{len(e2e['random_same_budget']['draws'])}",
            "verdict": doc["verdict"],
        })
    return pd.DataFrame(rows)


def validation_summary_doc(frame: pd.DataFrame) -> Doc:
    doc = Doc("Validation of the rankings")
    doc.para(
        "Each cell's ranking is tested on the held-out evaluation subset (disjoint from calibration) "
        "against the BF16 model, on caption tokens. Damage = KL divergence BF16 → quantized per caption "
        "token. ρ: Spearman between a group's predicted score and the damage of quantizing that group "
        "alone (95 % bootstrap interval). top/bottom: damage of quantizing the k most sensitive groups "
        "over that of the k least sensitive. Recipe: the solver's selection at the cell's budget against "
        "uniform quantization and random recipes meeting the same budget."
    )
    if frame.empty:
        return doc.not_applicable("no validated cell")
    doc.heading("Verdict per cell")
    doc.table(frame[CELL_KEYS + ["verdict"]])
    doc.heading("Figures")
    cols = CELL_KEYS + ["groups", "spearman_kl", "spearman_kl_lo", "spearman_kl_hi", "kendall_kl", "spearman_loss", "k",
                        "ratio_top_bottom", "kl_top_k", "kl_random_k", "kl_bottom_k", "recipe_bits", "kl_recipe",
                        "kl_random_recipes", "kl_uniform", "recipe_beats_random"]
    doc.table(frame[cols].rename(columns={
        "spearman_kl": "ρ (KL)", "spearman_kl_lo": "ρ lo", "spearman_kl_hi": "ρ hi", "kendall_kl": "τ (KL)",
        "spearman_loss": "ρ (Δloss)", "ratio_top_bottom": "top/bottom", "kl_top_k": "KL top-k", "kl_random_k": "KL random-k",
        "kl_bottom_k": "KL bottom-k", "recipe_bits": "recipe bits", "kl_recipe": "KL recipe",
        "kl_random_recipes": "KL random recipes", "kl_uniform": "KL uniform", "recipe_beats_random": "recipe beats random"}),
        floatfmt=".3g")
    return doc


def write_validation_summary(validation_paths: list[str], size_order: list[str], *, md: str, html: str, csv: str) -> None:
    docs = [json.loads(Path(p).read_text()) for p in validation_paths]
    frame = validation_frame(docs)
    if not frame.empty:
        size_rank = {s: i for i, s in enumerate(size_order)}
        frame = frame.sort_values(CELL_KEYS, key=_order_key({}, size_rank)).reset_index(drop=True)
    write_csv(frame, csv)
    validation_summary_doc(frame).write(md, html)


def plot_validation(validation_paths: list[str], model: str, size_order: list[str], out_png: str | Path) -> None:
    """Per format × scope: each ablated group's predicted score against its measured damage (log-log)."""
    docs = [d for d in (json.loads(Path(p).read_text()) for p in validation_paths) if d["cell"]["model"] == model]
    rows = [{**{k: d["cell"][k] for k in CELL_KEYS}, **r, "rho": d["ablations"]["correlation"]["kl"]["spearman"]["value"]}
            for d in docs for r in d["ablations"]["rows"]]
    frame = pd.DataFrame(rows)
    if frame.empty:
        _na_figure(out_png, f"{model}: validation", "no validated cell")
        return
    sizes = ordered(frame["size"].unique(), size_order)
    markers = dict(zip(sizes, "os^Dv<>p*h", strict=False))
    floor = _floor(pd.concat([frame["predicted_score_per_token"], frame["kl"]]))
    fig, axes, panels = _format_scope_grid(frame, 5.2, 4.2)
    for ax, fmt, scope, sub in panels:
        for size in sizes:
            for tower in TOWERS:
                pts = sub[(sub["size"] == size) & (sub["tower"] == tower)]
                if len(pts):
                    ax.scatter(pts["predicted_score_per_token"].clip(lower=floor), pts["kl"].clip(lower=floor), s=24,
                               alpha=0.75, marker=markers[size], color=TOWER_COLORS[tower], edgecolors="none")
        ax.set_xscale("log")
        ax.set_yscale("log")
        rhos = ", ".join(f"{size} ρ={sub[sub['size'] == size]['rho'].iloc[0]:.2f}" for size in sizes if (sub["size"] == size).any())
        ax.set_title(f"{fmt} / {scope}\n{rhos}", fontsize=9)
        ax.set_xlabel("predicted score per caption token")
        ax.set_ylabel("measured KL, group quantized alone")
    _legend_towers_sizes(fig, axes[0, -1], markers)
    fig.suptitle(f"{model}: does the ranking predict damage? (one-group ablations, held-out data)", fontsize=10)
    _save(fig, out_png)


# =============================================================================================
# Helpers


def _model_layers(manifest_paths: list[str], model: str) -> pd.DataFrame:
    layers = layers_frame(load_manifests(manifest_paths))
    return layers[layers["model"] == model].reset_index(drop=True)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out_png: str | Path) -> None:
    plt = _pyplot()
    fig.tight_layout(rect=(0, 0, 1, 0.97) if fig.get_suptitle() else None)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def _na_figure(out_png: str | Path, title: str, reason: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 2.2))
    ax.axis("off")
    ax.text(0.5, 0.62, title, ha="center", va="center", fontsize=11, weight="bold", transform=ax.transAxes)
    ax.text(0.5, 0.32, f"Not applicable: {reason}", ha="center", va="center", fontsize=9, wrap=True, transform=ax.transAxes)
    _save(fig, out_png)


def _legend_towers_sizes(fig, ax, markers: dict[str, str], towers: Iterable[str] = TOWERS) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], ls="", marker="o", color=TOWER_COLORS[t], label=t) for t in towers]
    handles += [Line2D([], [], ls="", marker=m, color="black", markerfacecolor="none", label=s) for s, m in markers.items()]
    ax.legend(handles=handles, fontsize=7, loc="lower right")
