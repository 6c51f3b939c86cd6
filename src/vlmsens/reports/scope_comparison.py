"""(c) LM-only vs all-layers: the text layers scored with the vision tower outside and inside the search."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .doc import Doc
from .frames import SCOPES, Comparison, model_layers, order_key, ordered, short_name, write_csv
from .plots import legend_towers_sizes, loglog_scatter, na_figure, pyplot, save
from .registry import Analysis, Job, Output, register
from .stats import TOP_K, agreement_row, log10_ratio, log_floor


def scope_comparison(layers: pd.DataFrame, size_order: list[str]) -> Comparison:
    """Text and head groups scored in lm-only cells vs all-layers cells (same format and size)."""
    agreement_cols = ["format", "size", "lm_only_inputs", "kendall_tau", "spearman", "n", *[f"top{k}_overlap" for k in TOP_K], "median_log10_ratio"]
    layer_cols = ["format", "size", "layer", "tower", "sublayer", "block", "score_lm_only", "score_all_layers", "log10_ratio",
                  "rank_lm_only", "rank_all_layers", "rank_shift"]
    scopes = set(layers["scope"].unique())
    if not set(SCOPES) <= scopes:
        return Comparison(pd.DataFrame(columns=agreement_cols), pd.DataFrame(columns=layer_cols),
                          f"the grid runs only scope {', '.join(sorted(scopes)) or 'none'}; comparing needs both lm-only and all-layers")
    text = layers[layers["tower"] != "vision"]
    floor = log_floor(text["sensitivity"])
    agreements, per_layer = [], []
    for (fmt, size), part in text.groupby(["format", "size"], sort=True):
        lm = part[part["scope"] == "lm-only"].set_index("layer")
        al = part[part["scope"] == "all-layers"].set_index("layer")
        common = lm.index.intersection(al.index)
        if len(common) == 0:
            continue
        s_lm, s_all = lm.loc[common, "sensitivity"], al.loc[common, "sensitivity"]
        ratio = log10_ratio(s_all, s_lm, floor)
        agreements.append({"format": fmt, "size": size, "lm_only_inputs": "/".join(sorted(set(lm["inputs"]))),
                           **agreement_row(s_lm, s_all), "median_log10_ratio": float(ratio.median())})
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
    agreement = agreement.sort_values(["format", "size"], key=order_key({}, size_rank)).reset_index(drop=True)
    frame = pd.concat(per_layer, ignore_index=True)[layer_cols]
    frame = frame.assign(abs_shift=frame["rank_shift"].abs()).sort_values(
        ["format", "size", "abs_shift"], key=order_key({}, size_rank), ascending=[True, True, False]).drop(columns="abs_shift")
    return Comparison(agreement, frame.reset_index(drop=True))


def lm_only_inputs(comparison: Comparison) -> str:
    """What the lm-only cells of a comparison saw (``calibration.inputs``)."""
    if "lm_only_inputs" not in comparison.agreement or comparison.agreement.empty:
        return "not known"
    return ", ".join(sorted(set(comparison.agreement["lm_only_inputs"])))


def scope_comparison_doc(model: str, comparison: Comparison, size_order: list[str], top: int = 10) -> Doc:
    doc = Doc(f"{model}: LM-only vs all-layers (text layers)")
    doc.para(
        "The text decoder and lm_head scored twice: in `lm-only` cells (vision tower in BF16, outside the search "
        f"and the budget; samples: {lm_only_inputs(comparison)}) and in `all-layers` cells (every Linear searched; "
        "samples: image+caption). With image+caption samples in both, the scopes differ in what is quantized and "
        "nothing else; with caption-only lm-only samples, also in what the model sees. High agreement means the "
        "lm-only ranking of the language model's layers holds in the all-layers search. rank shift > 0: the group "
        "ranks as more sensitive in all-layers."
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
    plt = pyplot()
    if comparison.reason:
        return na_figure(out_png, f"{model}: LM-only vs all-layers", comparison.reason)
    per_layer = comparison.per_layer
    formats = sorted(per_layer["format"].unique())
    sizes = ordered(per_layer["size"].unique(), size_order)
    markers = dict(zip(sizes, "os^Dv<>p*h", strict=False))
    floor = log_floor(pd.concat([per_layer["score_lm_only"], per_layer["score_all_layers"]]))
    fig, axes = plt.subplots(1, len(formats), figsize=(5.2 * len(formats), 4.8), squeeze=False)
    for ax, fmt in zip(axes[0], formats, strict=False):
        sub = per_layer[per_layer["format"] == fmt]
        loglog_scatter(ax, sub, "score_lm_only", "score_all_layers", sizes, markers, floor)
        row = comparison.agreement[(comparison.agreement["format"] == fmt) & (comparison.agreement["size"] == sizes[-1])]
        tau = f"τ = {row['kendall_tau'].iloc[0]:.2f} at {sizes[-1]}" if len(row) else ""
        ax.set_title(f"{fmt}   {tau}", fontsize=9)
        ax.set_xlabel(f"lm-only ({lm_only_inputs(comparison)}): score / caption token")
        ax.set_ylabel("all-layers (image+caption): score / caption token")
    legend_towers_sizes(fig, axes[0, -1], markers, towers=("text", "head"))
    fig.suptitle(f"{model}: text layers scored with the vision tower outside and inside the search", fontsize=10)
    save(fig, out_png)


def write(job: Job) -> None:
    model, size_order, out = job.model, job.size_order, job.outputs
    layers = model_layers(job.inputs, model)
    comparison = scope_comparison(layers, size_order)
    write_csv(comparison.agreement, out["agreement_csv"])
    write_csv(comparison.per_layer, out["layers_csv"])
    scope_comparison_doc(model, comparison, size_order).write(out["md"], out["html"])
    plot_scope_comparison(comparison, model, size_order, out["png"])


ANALYSIS = register(Analysis(
    name="scope_comparison", level="model", reads="manifests", subcategory="(c) LM-only vs all-layers",
    outputs=(
        Output("png", "{model}/scope_comparison.png", "text-layer scores in both scopes (scatter)"),
        Output("html", "{model}/scope_comparison.html", "rank correlation and largest rank shifts (table)"),
        Output("agreement_csv", "{model}/scope_agreement.csv"),
        Output("layers_csv", "{model}/scope_layers.csv"),
        Output("md", "{model}/scope_comparison.md"),
    ),
    write=write,
))
