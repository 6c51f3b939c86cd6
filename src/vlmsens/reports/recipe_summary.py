"""Recipes of one model across cells: predicted score against achieved bits for every budget."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from .doc import Doc
from .frames import CELL_KEYS, ordered, write_csv
from .plots import format_scope_grid, na_figure, save
from .registry import Analysis, Job, Output, register
from .stats import log_floor


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
        "`get_auto_quantize_config` on the search state, cross-checked on the manifest with the cell's own rule: an "
        "exact min-score MILP for gradient cells, ModelOpt's threshold rule replayed for kl_div cells, whose recipes "
        "are therefore not minimum-score ones). "
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
        return na_figure(out_png, f"{model}: recipes", "no recipes")
    sizes = ordered(frame["size"].unique(), size_order)
    floor = log_floor(frame["score_per_token"])
    fig, axes, panels = format_scope_grid(frame, 5.6, 3.6)
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
    save(fig, out_png)


def write(job: Job) -> None:
    model, out = job.model, job.outputs
    frame = recipes_frame(job.inputs)
    frame = frame[frame["model"] == model].reset_index(drop=True)
    write_csv(frame, out["csv"])
    recipes_doc(model, frame).write(out["md"], out["html"])
    plot_recipes(frame, model, job.size_order, out["png"])


ANALYSIS = register(Analysis(
    name="recipe_summary", level="model", reads="recipes", subcategory="Recipes per effective-bits budget",
    outputs=(
        Output("png", "{model}/recipes.png", "predicted score vs bits (plot)"),
        Output("html", "{model}/recipes.html", "all cells and budgets (table)"),
        Output("csv", "{model}/recipes.csv"),
        Output("md", "{model}/recipes.md"),
    ),
    write=write,
))
