"""(g) Validation of the rankings: the verdict and figures of every validated cell (validation.json)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from ..validation import under_predicted_towers, verdict_row
from .doc import Doc
from .frames import CELL_KEYS, order_key, write_csv
from .registry import Analysis, Job, Output, register


def _lo_hi(interval) -> tuple[float, float]:
    lo, hi = interval if interval else (math.nan, math.nan)
    return lo, hi


def validation_frame(docs: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per validated cell: correlation, damage ratios at equal weight with intervals, the size-only
    baseline, end-to-end figures at equal bits and the verdict."""
    rows = []
    for doc in docs:
        corr = doc["ablations"]["correlation"]
        size_only = doc["ablations"]["size_only"]["kl"]["spearman"]
        chosen = verdict_row(doc)
        e2e = doc["end_to_end"]
        rand = e2e["random_same_budget"]
        ratio_lo, ratio_hi = _lo_hi(chosen["ratio_top_bottom_ci95"].get("kl"))
        random_lo, random_hi = _lo_hi(rand["ratio_random_recipe_ci95"].get("kl"))
        rows.append({
            **{k: doc["cell"][k] for k in CELL_KEYS},
            "inputs": doc.get("dataset", {}).get("inputs", ""),
            "groups": doc["n_groups"],
            "spearman_kl": corr["kl"]["spearman"]["value"],
            "spearman_kl_lo": corr["kl"]["spearman"]["ci95"][0],
            "spearman_kl_hi": corr["kl"]["spearman"]["ci95"][1],
            "kendall_kl": corr["kl"]["kendall"]["value"],
            "spearman_loss": corr["loss_increase"]["spearman"]["value"],
            "spearman_size_only": size_only["value"],
            "spearman_size_only_lo": size_only["ci95"][0],
            "spearman_size_only_hi": size_only["ci95"][1],
            "k_weight": chosen["fraction"],
            "k_top": chosen["top"]["k"],
            "k_bottom": chosen["bottom"]["k"],
            "bits_top": chosen["top"]["bits"],
            "bits_bottom": chosen["bottom"]["bits"],
            "kl_top_k": chosen["top"]["kl"],
            "kl_bottom_k": chosen["bottom"]["kl"],
            "kl_random_k": chosen["random"]["mean"].get("kl", math.nan),
            "ratio_top_bottom": chosen["ratio_top_bottom"]["kl"],
            "ratio_top_bottom_lo": ratio_lo,
            "ratio_top_bottom_hi": ratio_hi,
            "ratio_largest_smallest": chosen["size_only"]["ratio_largest_smallest"]["kl"],
            "recipe_bits": e2e["recipe"]["bits"],
            "bits_tolerance": e2e["bits_tolerance"],
            "kl_recipe": e2e["recipe"]["kl"],
            "kl_uniform": e2e["uniform"]["kl"],
            "kl_random_recipes": rand["mean"].get("kl", math.nan),
            "random_recipes_bits": ", ".join(f"{d['bits']:.3f}" for d in rand["draws"]),
            "ratio_random_recipe": rand["ratio_random_recipe"]["kl"],
            "ratio_random_recipe_lo": random_lo,
            "ratio_random_recipe_hi": random_hi,
            "kl_size_only_recipe": e2e["size_only"]["kl"] if e2e["size_only"]["within_tolerance"] else math.nan,
            "recipe_beats_random": f"{rand['recipe_beats']}/{rand['compared']}",
            "under_predicted": ", ".join(under_predicted_towers(doc)),
            "verdict": doc["verdict"],
        })
    return pd.DataFrame(rows)


def towers_frame(docs: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per validated cell and tower: ρ with its interval, and damage per unit of score against the other towers."""
    rows = []
    for doc in docs:
        for tower, entry in doc["ablations"].get("towers", {}).items():
            rho, under = entry["correlation"]["spearman"], entry["under_prediction"]
            rows.append({**{k: doc["cell"][k] for k in CELL_KEYS}, "tower": tower, "ablated_groups": entry["n"],
                         "spearman_kl": rho["value"], "spearman_kl_lo": rho["ci95"][0], "spearman_kl_hi": rho["ci95"][1],
                         "damage_per_score_factor": under["factor"], "factor_lo": under["ci95"][0],
                         "factor_hi": under["ci95"][1], "under_predicted": tower in under_predicted_towers(doc)})
    columns = [*CELL_KEYS, "tower", "ablated_groups", "spearman_kl", "spearman_kl_lo", "spearman_kl_hi",
               "damage_per_score_factor", "factor_lo", "factor_hi", "under_predicted"]
    return pd.DataFrame.from_records(rows, columns=columns)


def validation_summary_doc(frame: pd.DataFrame, towers: pd.DataFrame | None = None, covers: str | None = None) -> Doc:
    doc = Doc("Validation of the rankings")
    doc.para(
        "Each cell's ranking is tested on the held-out evaluation subset (disjoint from calibration) "
        "against the BF16 model, on caption tokens. Damage = KL divergence BF16 → quantized per caption "
        "token. ρ: Spearman between a group's predicted score and the damage of quantizing that group "
        "alone; size-only ρ: the same with the group's size (its BF16 weight cost) as the prediction, the baseline a "
        "ranking must beat. top/bottom: damage of quantizing the most sensitive groups over that of the least "
        "sensitive, both sets holding the same share of the weight (k_weight, within the smallest group's share); "
        "largest/smallest: the same for the size-only sets. Recipe: the solver's selection at the cell's budget "
        "against uniform quantization, the size-only recipe and random recipes at the recipe's bits (within the "
        "smallest group's share; only those within it are compared); random/recipe > 1: random recipes do more damage."
    )
    if covers:
        doc.para(f"Intervals (lo, hi): 95 % percentile bootstrap over {covers}.")
    if frame.empty:
        return doc.not_applicable("no validated cell")
    doc.heading("Verdict per cell")
    doc.table(frame[CELL_KEYS + ["verdict"]])
    doc.heading("Figures")
    cols = CELL_KEYS + ["inputs", "groups", "spearman_kl", "spearman_kl_lo", "spearman_kl_hi", "spearman_size_only",
                        "kendall_kl", "spearman_loss", "k_weight", "k_top", "k_bottom", "ratio_top_bottom",
                        "ratio_top_bottom_lo", "ratio_top_bottom_hi", "ratio_largest_smallest", "kl_top_k", "kl_random_k",
                        "kl_bottom_k"]
    doc.table(frame[cols].rename(columns={
        "spearman_kl": "ρ (KL)", "spearman_kl_lo": "ρ lo", "spearman_kl_hi": "ρ hi", "spearman_size_only": "ρ size only",
        "kendall_kl": "τ (KL)", "spearman_loss": "ρ (Δloss)", "k_weight": "k (weight)", "k_top": "groups top",
        "k_bottom": "groups bottom", "ratio_top_bottom": "top/bottom", "ratio_top_bottom_lo": "lo",
        "ratio_top_bottom_hi": "hi", "ratio_largest_smallest": "largest/smallest", "kl_top_k": "KL top",
        "kl_random_k": "KL random", "kl_bottom_k": "KL bottom"}), floatfmt=".3g")
    doc.heading("End to end at equal bits")
    cols = CELL_KEYS + ["recipe_bits", "bits_tolerance", "random_recipes_bits", "kl_recipe", "kl_random_recipes",
                        "ratio_random_recipe", "ratio_random_recipe_lo", "ratio_random_recipe_hi", "kl_size_only_recipe",
                        "kl_uniform", "recipe_beats_random"]
    doc.table(frame[cols].rename(columns={
        "recipe_bits": "recipe bits", "bits_tolerance": "± bits", "random_recipes_bits": "random recipes' bits",
        "kl_recipe": "KL recipe", "kl_random_recipes": "KL random", "ratio_random_recipe": "random/recipe",
        "ratio_random_recipe_lo": "lo", "ratio_random_recipe_hi": "hi", "kl_size_only_recipe": "KL size only",
        "kl_uniform": "KL uniform", "recipe_beats_random": "recipe beats random"}), floatfmt=".3g")
    if towers is not None and not towers.empty:
        doc.heading("Per tower")
        doc.para("ρ within each tower's ablated groups, and the damage its groups do per unit of predicted score "
                 "against the other towers' (10 = the score predicts a tenth of the tower's damage). A tower whose "
                 "factor's interval lies above 1 is named in the verdict.")
        doc.table(towers.rename(columns={"ablated_groups": "ablated groups", "spearman_kl": "ρ (KL)", "spearman_kl_lo": "ρ lo",
                                         "spearman_kl_hi": "ρ hi", "damage_per_score_factor": "damage/score vs others",
                                         "factor_lo": "lo", "factor_hi": "hi", "under_predicted": "under-predicted"}),
                  floatfmt=".3g")
    return doc


def write(job: Job) -> None:
    docs = [json.loads(Path(p).read_text()) for p in job.inputs]
    frame, towers = validation_frame(docs), towers_frame(docs)
    if not frame.empty:
        size_rank = {s: i for i, s in enumerate(job.size_order)}
        frame = frame.sort_values(CELL_KEYS, key=order_key({}, size_rank)).reset_index(drop=True)
        towers = towers.sort_values(CELL_KEYS, key=order_key({}, size_rank), kind="stable").reset_index(drop=True)
    covers = next((d["intervals"]["covers"] for d in docs if "intervals" in d), None)
    write_csv(frame, job.outputs["csv"])
    write_csv(towers, job.outputs["towers_csv"])
    validation_summary_doc(frame, towers, covers).write(job.outputs["md"], job.outputs["html"])


ANALYSIS = register(Analysis(
    name="validation_report", level="global", reads="validations", category="Summary", subcategory="Validation of rankings",
    outputs=(
        Output("html", "validation.html", "verdict per cell (table)"),
        Output("md", "validation.md"),
        Output("csv", "validation.csv"),
        Output("towers_csv", "validation_towers.csv"),
    ),
    requires="validation",
    write=write,
))
