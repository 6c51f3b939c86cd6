"""(b) Format comparison: per-group scores of every pair of formats on the same model, scope and data."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pandas as pd

from .doc import Doc
from .frames import SCOPES, Comparison, load_manifests, order_key, ordered, scores_frame, short_name, write_csv
from .plots import legend_towers_sizes, loglog_scatter, na_figure, pyplot, save
from .registry import Analysis, Job, Output, register
from .stats import TOP_K, agreement_row, log10_ratio, log_floor


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
                  "log10_ratio", "log10_ratio_vs_median", "rank_a", "rank_b", "rank_shift", "selected_a", "selected_b"]
    formats = ordered(scores["scored_format"].unique(), format_order)
    if len(formats) < 2:
        return Comparison(pd.DataFrame(columns=agreement_cols), pd.DataFrame(columns=layer_cols),
                          f"the grid scores a single format ({', '.join(formats) or 'none'}); nothing to compare it with")
    best = _format_scores(scores)
    floor = log_floor(best["score"])
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
            rank_a = sa.rank(ascending=False, method="min").astype(int)
            rank_b = sb.rank(ascending=False, method="min").astype(int)
            agreements.append({"format_a": fmt_a, "format_b": fmt_b, "scope": scope, "size": size, **agreement_row(sa, sb),
                               "median_log10_ratio": float(ratio.median()), "share_b_higher": float((sb > sa).mean())})
            layers.append(pd.DataFrame({
                "format_a": fmt_a, "format_b": fmt_b, "scope": scope, "size": size, "layer": common,
                "tower": a.loc[common, "tower"].to_numpy(), "sublayer": a.loc[common, "sublayer"].to_numpy(),
                "block": a.loc[common, "block"].to_numpy(), "score_a": sa.to_numpy(), "score_b": sb.to_numpy(),
                "log10_ratio": ratio.to_numpy(),
                # One format may score every group ten times higher; what matters is the order within it.
                "log10_ratio_vs_median": (ratio - ratio.median()).to_numpy(),
                "rank_a": rank_a.to_numpy(), "rank_b": rank_b.to_numpy(), "rank_shift": (rank_b - rank_a).to_numpy(),
                "selected_a": a.loc[common, "selected_format"].to_numpy(), "selected_b": b.loc[common, "selected_format"].to_numpy(),
            }))
    if not agreements:
        return Comparison(pd.DataFrame(columns=agreement_cols), pd.DataFrame(columns=layer_cols),
                          f"no scope × size holds scores of two formats ({', '.join(formats)}) for the same groups")
    agreement = pd.DataFrame.from_records(agreements, columns=agreement_cols)
    per_layer = pd.concat(layers, ignore_index=True)[layer_cols]
    size_rank = {s: i for i, s in enumerate(ordered(per_layer["size"].unique(), size_order))}
    scope_rank = {s: i for i, s in enumerate(ordered(per_layer["scope"].unique(), SCOPES))}
    agreement = agreement.sort_values(["format_a", "format_b", "scope", "size"], key=order_key(scope_rank, size_rank)).reset_index(drop=True)
    per_layer = per_layer.sort_values(["format_a", "format_b", "scope", "size"], key=order_key(scope_rank, size_rank), kind="stable")
    per_layer = _flips_first(per_layer).reset_index(drop=True)
    return Comparison(agreement, per_layer)


def _flips_first(per_layer: pd.DataFrame) -> pd.DataFrame:
    """Rows of each (pair, scope, size) by how far the group moves between the two rankings:
    |rank shift|, then |log10 ratio less its median| (groups are compared within each format)."""
    keyed = per_layer.assign(_shift=per_layer["rank_shift"].abs(), _ratio=per_layer["log10_ratio_vs_median"].abs(),
                             _block=per_layer[["format_a", "format_b", "scope", "size"]].astype(str).agg("/".join, axis=1))
    keyed["_block"] = pd.factorize(keyed["_block"])[0]
    keyed = keyed.sort_values(["_block", "_shift", "_ratio"], ascending=[True, False, False], kind="stable")
    return keyed.drop(columns=["_shift", "_ratio", "_block"])


def disagreement_table(per_layer: pd.DataFrame, size_order: list[str], top: int = 15) -> dict[tuple, pd.DataFrame]:
    """Per (pair, scope): the ``top`` largest rank flips at the largest size, with the rank shift at every size.

    A global offset (one format scoring every group ten times higher) moves no rank, so the table
    orders by |rank shift|, then by |log10 ratio − its median|.
    """
    out = {}
    for (fa, fb, scope), part in per_layer.groupby(["format_a", "format_b", "scope"], sort=False):
        sizes = ordered(part["size"].unique(), size_order)
        largest = _flips_first(part[part["size"] == sizes[-1]]).head(top)
        table = pd.DataFrame({
            "layer": largest["layer"].map(short_name), "tower": largest["tower"],
            f"{fa}": largest["score_a"], f"{fb}": largest["score_b"],
            f"rank {fa}": largest["rank_a"].to_numpy(), f"rank {fb}": largest["rank_b"].to_numpy(),
        })
        for size in sizes:
            shifts = part[part["size"] == size].set_index("layer")["rank_shift"]
            table[f"rank shift {size}"] = largest["layer"].map(shifts).to_numpy()
        table["log10 ratio − median"] = largest["log10_ratio_vs_median"].to_numpy()
        table["less sensitive"] = np.where(largest["score_b"] < largest["score_a"], fb,
                                           np.where(largest["score_a"] < largest["score_b"], fa, "tie"))
        out[(fa, fb, scope, sizes[-1])] = table.reset_index(drop=True)
    return out


def format_comparison_doc(model: str, comparison: Comparison, size_order: list[str]) -> Doc:
    doc = Doc(f"{model}: format comparison (FP8 vs INT8)")
    doc.para(
        "Per-group AutoQuantize scores per caption token of two formats on the same model, scope and calibration "
        "data (raw scores, before ModelOpt's monotone clipping, so both are visible even at equal bit cost). "
        "log10 ratio > 0: the group is more sensitive to the second format. One format may score every group "
        "higher (the median ratio); what matters for picking a format per layer is where the **order** changes: "
        "the rank flips below (rank shift = rank under the second format − rank under the first; log10 ratio − "
        "median = the ratio with the global offset removed)."
    )
    if comparison.reason:
        return doc.not_applicable(comparison.reason + ".")
    doc.heading("Agreement between formats")
    doc.table(comparison.agreement, floatfmt=".3f")
    for (_fa, _fb, scope, size), table in disagreement_table(comparison.per_layer, size_order).items():
        doc.heading(f"Largest rank flips, {scope} (ranked at size {size})")
        doc.table(table, floatfmt=".3g")
    return doc


def plot_format_comparison(comparison: Comparison, model: str, size_order: list[str], out_png: str | Path) -> None:
    plt = pyplot()
    if comparison.reason:
        return na_figure(out_png, f"{model}: format comparison", comparison.reason)
    per_layer = comparison.per_layer
    pairs = list(dict.fromkeys(zip(per_layer["format_a"], per_layer["format_b"], strict=False)))
    scopes = ordered(per_layer["scope"].unique(), SCOPES)
    sizes = ordered(per_layer["size"].unique(), size_order)
    markers = dict(zip(sizes, "os^Dv<>p*h", strict=False))
    floor = log_floor(pd.concat([per_layer["score_a"], per_layer["score_b"]]))
    fig, axes = plt.subplots(len(pairs), len(scopes), figsize=(5.2 * len(scopes), 4.8 * len(pairs)), squeeze=False)
    for row, (fa, fb) in enumerate(pairs):
        for col, scope in enumerate(scopes):
            ax = axes[row, col]
            sub = per_layer[(per_layer["format_a"] == fa) & (per_layer["format_b"] == fb) & (per_layer["scope"] == scope)]
            if sub.empty:
                ax.text(0.5, 0.5, "no groups", ha="center", va="center", transform=ax.transAxes)
                continue
            lo, hi = loglog_scatter(ax, sub, "score_a", "score_b", sizes, markers, floor)
            for decade in (10, 0.1):
                ax.plot([lo, hi], [lo * decade, hi * decade], color="grey", lw=0.6, ls=":")
            top = sub[sub["size"] == sizes[-1]]
            top = _flips_first(top).head(4)
            for _, r in top.iterrows():
                ax.annotate(short_name(r["layer"]), (max(r["score_a"], floor), max(r["score_b"], floor)), fontsize=6,
                            xytext=(3, 3), textcoords="offset points")
            ax.set_xlabel(f"{fa}: score / caption token")
            ax.set_ylabel(f"{fb}: score / caption token")
            ax.set_title(f"{scope}", fontsize=9)
    legend_towers_sizes(fig, axes[0, -1], markers)
    fig.suptitle(f"{model}: per-group sensitivity, {' / '.join(f'{a} vs {b}' for a, b in pairs)} "
                 "(solid: equal, dotted: 10× apart)", fontsize=10)
    save(fig, out_png)


def write(job: Job) -> None:
    model, size_order, out = job.model, job.size_order, job.outputs
    scores = scores_frame([m for m in load_manifests(job.inputs) if m["cell"]["model"] == model])
    comparison = format_comparison(scores, size_order, job.format_order)
    write_csv(comparison.agreement, out["agreement_csv"])
    write_csv(comparison.per_layer, out["layers_csv"])
    format_comparison_doc(model, comparison, size_order).write(out["md"], out["html"])
    plot_format_comparison(comparison, model, size_order, out["png"])


ANALYSIS = register(Analysis(
    name="format_comparison", level="model", reads="manifests", subcategory="(b) Format comparison (FP8 vs INT8)",
    params=("size_order", "format_order"),
    outputs=(
        Output("png", "{model}/format_comparison.png", "per-group scores of two formats (scatter)"),
        Output("html", "{model}/format_comparison.html", "agreement and largest rank flips (table)"),
        Output("agreement_csv", "{model}/format_agreement.csv"),
        Output("layers_csv", "{model}/format_layers.csv"),
        Output("md", "{model}/format_comparison.md"),
    ),
    write=write,
))
