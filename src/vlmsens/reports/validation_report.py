"""(g) Validation of the rankings: the verdict and figures of every validated cell (validation.json)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from ..validation import verdict_row
from .doc import Doc
from .frames import CELL_KEYS, order_key, write_csv
from .registry import Analysis, Job, Output, register


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


def write(job: Job) -> None:
    docs = [json.loads(Path(p).read_text()) for p in job.inputs]
    frame = validation_frame(docs)
    if not frame.empty:
        size_rank = {s: i for i, s in enumerate(job.size_order)}
        frame = frame.sort_values(CELL_KEYS, key=order_key({}, size_rank)).reset_index(drop=True)
    write_csv(frame, job.outputs["csv"])
    validation_summary_doc(frame).write(job.outputs["md"], job.outputs["html"])


ANALYSIS = register(Analysis(
    name="validation_report", level="global", reads="validations", category="Summary", subcategory="Validation of rankings",
    outputs=(
        Output("html", "validation.html", "verdict per cell (table)"),
        Output("md", "validation.md"),
        Output("csv", "validation.csv"),
    ),
    requires="validation",
    write=write,
))
