"""The per-cell validation page (validation.md) of rule ``validate``, from validation.json alone."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from .doc import Doc


def _fmt(value: float | None, spec: str = ".4g") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return format(value, spec)


def validation_doc(doc: dict[str, Any]):
    """The per-cell page (validation.md) from validation.json alone."""
    cell = doc["cell"]
    page = Doc(f"Validation of {cell['model']} / {cell['format']} / {cell['scope']} / {cell['size']}")
    page.para(f"**Verdict:** {doc['verdict']}.")
    ev = doc["eval"]
    page.para(
        f"Held-out evaluation subset: {ev['samples']} samples, {ev['loss_tokens']} caption tokens "
        f"(disjoint from calibration); BF16 caption loss {ev['bf16_loss']:.4f} nats/token. "
        f"Groups ranked by their `{doc['ranking_format']}` score ({doc['n_groups']} groups). Damage = "
        f"{doc['damage_measure']}; loss increase = caption loss of the quantized model minus BF16's. "
        f"{ev['configurations_measured']} quantized configurations measured."
    )
    page.heading("Top-k vs bottom-k vs random-k")
    rows = []
    for row in doc["top_k"]:
        rows.append({
            "k": f"{row['fraction']:.0%} ({row['k']})",
            "KL top-k": row["top"]["kl"], "KL bottom-k": row["bottom"]["kl"],
            "KL random-k (mean)": row["random"]["mean"].get("kl", math.nan),
            "top/bottom": _fmt(row["ratio_top_bottom"]["kl"], ".3g"),
            "top/random": _fmt(row["ratio_top_random"]["kl"], ".3g"),
            "Δloss top-k": row["top"]["loss_increase"], "Δloss bottom-k": row["bottom"]["loss_increase"],
            "Δloss random-k (mean)": row["random"]["mean"].get("loss_increase", math.nan),
        })
    page.table(pd.DataFrame(rows))
    page.heading("One-group ablations")
    corr = doc["ablations"]["correlation"]
    bullets = []
    for measure, label in (("kl", "KL (damage)"), ("loss_increase", "loss increase")):
        c = corr[measure]
        bullets.append(
            f"{label}: Spearman ρ = {_fmt(c['spearman']['value'], '.3f')} "
            f"[{_fmt(c['spearman']['ci95'][0], '.2f')}, {_fmt(c['spearman']['ci95'][1], '.2f')}], "
            f"Kendall τ = {_fmt(c['kendall']['value'], '.3f')} "
            f"[{_fmt(c['kendall']['ci95'][0], '.2f')}, {_fmt(c['kendall']['ci95'][1], '.2f')}] "
            f"(n = {c['n']}, 95 % percentile bootstrap, {doc['settings']['bootstrap_resamples']} resamples)"
        )
    page.bullets(bullets)
    table = pd.DataFrame(doc["ablations"]["rows"])[["rank", "layer", "tower", "predicted_score_per_token", "kl", "loss_increase"]]
    page.table(table.rename(columns={"predicted_score_per_token": "predicted (per token)", "kl": "KL", "loss_increase": "Δloss"}))
    page.heading("End to end at the cell's budget")
    e2e = doc["end_to_end"]
    rand = e2e["random_same_budget"]
    rows = [{"recipe": "solver's selection", **{k: e2e["recipe"][k] for k in ("bits", "quantized_groups", "kl", "loss_increase")}},
            {"recipe": f"uniform {doc['ranking_format']}", **{k: e2e["uniform"][k] for k in ("bits", "quantized_groups", "kl", "loss_increase")}}]
    rows += [{"recipe": f"random, same budget #{i + 1}", **{k: r[k] for k in ("bits", "quantized_groups", "kl", "loss_increase")}}
             for i, r in enumerate(rand["draws"])]
    page.table(pd.DataFrame(rows).rename(columns={"quantized_groups": "quantized groups", "kl": "KL", "loss_increase": "Δloss"}))
    page.para(
        f"Budget {e2e['budget_bits']:g} effective bits. The solver's recipe does less damage than "
        f"{rand['recipe_beats']} of {len(rand['draws'])} random recipes that meet the same budget; its KL is "
        f"{_fmt(e2e['recipe_vs_uniform_kl'], '.3g')} × that of quantizing every group."
    )
    return page
