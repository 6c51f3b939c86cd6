"""Ship this: measured damage against effective bits (rule ``ladder``), one model's ladder cells.

Each rung's optimal and nested recipe, random recipes of the optimal one's bits (mean and range),
and uniform quantization, measured on the same held-out tokens against BF16: KL per caption token
and the caption-loss change.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from .doc import Doc
from .frames import CELL_KEYS, ordered, write_csv
from .plots import format_scope_grid, na_figure, save
from .registry import Analysis, Job, Output, register
from .stats import log_floor

KINDS = ("optimal", "nested", "random", "uniform")
STYLE = {
    "optimal": {"color": "#1f77b4", "marker": "o", "ls": "-"},
    "nested": {"color": "#2ca02c", "marker": "s", "ls": "--"},
    "random": {"color": "#7f7f7f", "marker": "^", "ls": ":"},
    "uniform": {"color": "#d62728", "marker": "*", "ls": ""},
}
MEASURE_LABELS = {"kl": "KL to BF16 per caption token (nats)", "loss_increase": "caption-loss change per token (nats)"}
COLUMNS = [*CELL_KEYS, "budget_bits", "kind", "bits", "kl", "loss_increase", "kl_min", "kl_max", "loss_increase_min",
           "loss_increase_max", "groups_bf16", "predicted_score_per_token", "draws", "tokens"]


def ladder_frame(ladder_jsons: list[str | Path]) -> pd.DataFrame:
    """One row per measured point: (cell, rung, kind); random rows carry the draws' mean and range."""
    records = []
    for path in ladder_jsons:
        doc = json.loads(Path(path).read_text())
        cell = {k: doc["cell"][k] for k in CELL_KEYS}
        tokens = doc["eval"]["tokens"]
        u = doc["uniform"]
        records.append({**cell, "budget_bits": u["bits"], "kind": "uniform", "bits": u["bits"], "kl": u["kl"],
                        "loss_increase": u["loss_increase"], "groups_bf16": u["groups_bf16"],
                        "predicted_score_per_token": u["predicted_score_per_token"], "draws": 1, "tokens": tokens})
        for rung in doc["rungs"]:
            for kind in ("optimal", "nested"):
                p = rung[kind]
                records.append({**cell, "budget_bits": rung["budget_bits"], "kind": kind, "bits": p["bits"], "kl": p["kl"],
                                "loss_increase": p["loss_increase"], "groups_bf16": p["groups_bf16"],
                                "predicted_score_per_token": p["predicted_score_per_token"], "draws": 1, "tokens": tokens})
            r = rung["random"]
            if r["draws"]:
                records.append({
                    **cell, "budget_bits": rung["budget_bits"], "kind": "random", "bits": r["mean"]["bits"],
                    "kl": r["mean"]["kl"], "loss_increase": r["mean"]["loss_increase"],
                    "kl_min": r["min"]["kl"], "kl_max": r["max"]["kl"],
                    "loss_increase_min": r["min"]["loss_increase"], "loss_increase_max": r["max"]["loss_increase"],
                    "groups_bf16": sum(d["groups_bf16"] for d in r["draws"]) / len(r["draws"]),
                    "predicted_score_per_token": sum(d["predicted_score_per_token"] for d in r["draws"]) / len(r["draws"]),
                    "draws": len(r["draws"]), "tokens": tokens,
                })
    return pd.DataFrame.from_records(records, columns=COLUMNS)


def plot_damage(frame: pd.DataFrame, model: str, measure: str, size_order: list[str], out_png: str | Path) -> None:
    if frame.empty:
        return na_figure(out_png, f"{model}: damage vs bits", "no ladder cell (ship_this.ladder)")
    panels_frame = frame.copy()
    sizes = ordered(frame["size"].unique(), size_order)
    if len(sizes) > 1:  # one panel per (format, scope, size)
        panels_frame["scope"] = panels_frame["scope"] + " · " + panels_frame["size"]
    log_y = measure == "kl"
    floor = log_floor(frame[[measure, f"{measure}_min"]].stack()) if log_y else None
    fig, _, panels = format_scope_grid(panels_frame, 5.6, 3.8)
    for ax, fmt, scope, sub in panels:
        for kind in KINDS:
            pts = sub[sub["kind"] == kind].sort_values(["budget_bits", "bits"])
            if pts.empty:
                continue
            y = pts[measure].clip(lower=floor) if log_y else pts[measure]
            style = STYLE[kind]
            label = f"{kind} (mean of {int(pts['draws'].max())}, range)" if kind == "random" else kind
            ax.plot(pts["bits"], y, color=style["color"], marker=style["marker"], ls=style["ls"], label=label,
                    markersize=9 if kind == "uniform" else 5)
            if kind == "random":
                low, high = pts[f"{measure}_min"], pts[f"{measure}_max"]
                if log_y:
                    low, high = low.clip(lower=floor), high.clip(lower=floor)
                ax.fill_between(pts["bits"], low, high, color=style["color"], alpha=0.2, lw=0)
        if log_y:
            ax.set_yscale("log")
        else:
            ax.axhline(0.0, color="black", lw=0.6)
        ax.set_xlabel("achieved effective bits")
        ax.set_ylabel(MEASURE_LABELS[measure])
        ax.set_title(f"{fmt} · {scope}", fontsize=9)
        ax.legend(fontsize=7)
    what = "KL to BF16" if measure == "kl" else "caption-loss change"
    fig.suptitle(f"{model}: measured {what} vs bits (held-out)", fontsize=10)
    save(fig, out_png)


def damage_doc(model: str, frame: pd.DataFrame) -> Doc:
    doc = Doc(f"{model}: measured damage vs effective bits")
    doc.para(
        "Each rung of the ladder (`ship_this.ladder.bits_above_uniform` above the cell's fewest achievable bits) applies "
        "the optimal recipe (exact re-solve of the stored scores, as rule recipes ships it), the nested recipe (greedy "
        "by score per cost: each rung keeps the BF16 groups of the one below) and random recipes of the optimal "
        "one's bits, on the cell's calibrated model, and measures them on the same held-out caption tokens against BF16. "
        "Random rows give the draws' mean with their range (min – max)."
    )
    if frame.empty:
        return doc.not_applicable("no ladder cell: enable `ship_this.ladder` (config/README.md).")
    short = random_bits_gaps(frame)
    if len(short):
        doc.para(
            f"**Not a same-bits comparison at {len(short)} rung(s)**: the random recipes there reach fewer bits than the "
            f"optimal one (up to {short['bits_gap'].max():.3f} bits fewer, `bits gap` below), so they are more compressed "
            "than the recipe they are set against, and their damage likely overstates that of random recipes of equal bits."
        )
    table = frame.drop(columns=["model"]).copy()
    doc.table(table, floatfmt=".4g")
    if len(short):
        doc.heading("Rungs where random recipes fall short of the optimal recipe's bits")
        doc.table(short, floatfmt=".4g")
    return doc


# Random recipes count as same-bits when their mean is within this many bits of the optimal recipe's.
SAME_BITS_TOL = 0.01


def random_bits_gaps(frame: pd.DataFrame) -> pd.DataFrame:
    """Per (cell, rung): how many bits the random recipes' mean lacks against the optimal recipe; rungs over the tolerance."""
    keys = [*CELL_KEYS, "budget_bits"]
    optimal = frame[frame["kind"] == "optimal"].set_index(keys)["bits"]
    random = frame[frame["kind"] == "random"].set_index(keys)["bits"]
    gaps = (optimal - random).dropna().rename("bits_gap").reset_index()
    return gaps[gaps["bits_gap"] > SAME_BITS_TOL].drop(columns=["model"]).reset_index(drop=True)


def write(job: Job) -> None:
    model, out = job.model, job.outputs
    frame = ladder_frame(job.inputs)
    frame = frame[frame["model"] == model].reset_index(drop=True)
    write_csv(frame, out["csv"])
    damage_doc(model, frame).write(out["md"], out["html"])
    plot_damage(frame, model, "kl", job.size_order, out["png"])
    plot_damage(frame, model, "loss_increase", job.size_order, out["loss_png"])


ANALYSIS = register(Analysis(
    name="damage_vs_bits", level="model", reads="ladders", category="Ship this", subcategory="{model}",
    outputs=(
        Output("png", "{model}/damage_vs_bits.png", "measured KL vs effective bits (plot)"),
        Output("loss_png", "{model}/loss_vs_bits.png", "measured caption-loss change vs effective bits (plot)"),
        Output("html", "{model}/damage_vs_bits.html", "measured damage per budget and recipe (table)"),
        Output("csv", "{model}/damage_vs_bits.csv"),
        Output("md", "{model}/damage_vs_bits.md"),
    ),
    requires="ladder",
    write=write,
))
