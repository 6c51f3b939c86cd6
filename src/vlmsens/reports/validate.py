"""The per-cell validation page (validation.md) of rule ``validate``, from validation.json alone."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pandas as pd

from .doc import Doc


def _fmt(value: float | None, spec: str = ".4g") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return format(value, spec)


def with_interval(value: float | None, interval: Sequence[float] | None, spec: str = ".3g") -> str:
    """'12.3 [8.1, 19]', or the value alone where there is no interval."""
    text = _fmt(value, spec)
    if value is None or not interval or any(math.isnan(v) for v in interval):
        return text
    return f"{text} [{_fmt(interval[0], spec)}, {_fmt(interval[1], spec)}]"


def set_rows(row: dict[str, Any]) -> list[dict[str, Any]]:
    """The sets of one weight fraction: what each quantizes (groups, weight, bits) and the damage it does."""
    size = row["size_only"]
    sets = [("top (most sensitive)", row["top"]), ("bottom (least sensitive)", row["bottom"]),
            ("largest (size only)", size["largest"]), ("smallest (size only)", size["smallest"])]
    sets += [(f"random #{i + 1}", d) for i, d in enumerate(row["random"]["draws"])]
    return [{"k (weight)": f"{row['fraction']:.0%}", "set": name, "groups": s["k"], "weight": f"{s['weight_fraction']:.1%}",
             "bits": s["bits"], "KL": s["kl"], "Δloss": s["loss_increase"]} for name, s in sets]


def ratio_rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for row in doc["top_k"]:
        size = row["size_only"]
        rows.append({
            "k (weight)": f"{row['fraction']:.0%}",
            "groups top / bottom": f"{row['top']['k']} / {row['bottom']['k']}",
            "top/bottom": with_interval(row["ratio_top_bottom"]["kl"], row["ratio_top_bottom_ci95"].get("kl")),
            "top/random": with_interval(row["ratio_top_random"]["kl"], row["ratio_top_random_ci95"].get("kl")),
            "largest/smallest (size only)": with_interval(size["ratio_largest_smallest"]["kl"],
                                                          size["ratio_largest_smallest_ci95"].get("kl")),
            "top/bottom (Δloss)": _fmt(row["ratio_top_bottom"]["loss_increase"], ".3g"),
        })
    return rows


def tower_rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """ρ, damage per unit of score and medians per tower, next to the overall figures."""
    corr = doc["ablations"]["correlation"]["kl"]
    rows = [{"tower": "all", "ablated groups": corr["n"],
             "ρ (KL)": with_interval(corr["spearman"]["value"], corr["spearman"]["ci95"], ".2f"),
             "τ (KL)": with_interval(corr["kendall"]["value"], corr["kendall"]["ci95"], ".2f"),
             "damage per unit of score vs other towers": "1", "median KL": _fmt(_median(doc, None)),
             "under-predicted": ""}]
    for tower, entry in doc["ablations"].get("towers", {}).items():
        under = entry["under_prediction"]
        lo = under["ci95"][0]
        rows.append({
            "tower": tower, "ablated groups": entry["n"],
            "ρ (KL)": with_interval(entry["correlation"]["spearman"]["value"], entry["correlation"]["spearman"]["ci95"], ".2f"),
            "τ (KL)": with_interval(entry["correlation"]["kendall"]["value"], entry["correlation"]["kendall"]["ci95"], ".2f"),
            "damage per unit of score vs other towers": with_interval(under["factor"], under["ci95"]),
            "median KL": _fmt(entry["median_kl"]),
            "under-predicted": "yes" if under["factor"] is not None and not math.isnan(lo) and lo > 1 else "",
        })
    return rows


def _median(doc: dict[str, Any], tower: str | None) -> float:
    values = sorted(r["kl"] for r in doc["ablations"]["rows"] if tower is None or r["tower"] == tower)
    if not values:
        return math.nan
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def end_to_end_rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    e2e = doc["end_to_end"]
    keys = ("bits", "quantized_groups", "kl", "loss_increase")
    rows = [{"recipe": "solver's selection", **{k: e2e["recipe"][k] for k in keys}, "compared": "reference"},
            {"recipe": f"uniform {doc['ranking_format']}", **{k: e2e["uniform"][k] for k in keys}, "compared": "no (more bits saved)"},
            {"recipe": "size only (largest kept BF16)", **{k: e2e["size_only"][k] for k in keys},
             "compared": "yes" if e2e["size_only"]["within_tolerance"] else "no (bits out of tolerance)"}]
    rows += [{"recipe": f"random #{i + 1}", **{k: r[k] for k in keys},
              "compared": "yes" if r["within_tolerance"] else "no (bits out of tolerance)"}
             for i, r in enumerate(e2e["random_same_budget"]["draws"])]
    return rows


def validation_doc(doc: dict[str, Any]):
    """The per-cell page (validation.md) from validation.json alone."""
    cell = doc["cell"]
    page = Doc(f"Validation of {cell['model']} / {cell['format']} / {cell['scope']} / {cell['size']}")
    page.para(f"**Verdict:** {doc['verdict']}.")
    ev = doc["eval"]
    inputs = doc.get("dataset", {}).get("inputs")
    page.para(
        f"Held-out evaluation subset: {ev['samples']} samples" + (f" ({inputs})" if inputs else "") +
        f", {ev['loss_tokens']} caption tokens (disjoint from calibration); BF16 caption loss {ev['bf16_loss']:.4f} "
        f"nats/token. Groups ranked by their `{doc['ranking_format']}` score ({doc['n_groups']} groups). Damage = "
        f"{doc['damage_measure']}; loss increase = caption loss of the quantized model minus BF16's. "
        f"{ev['configurations_measured']} quantized configurations measured" + (
            f"; {ev['text_layer_forwards_skipped']} of their {ev['text_layer_forwards']} text-layer forwards reused "
            "from the BF16 reference (the layers before the first quantized one)" if ev.get("text_layer_forwards") else "") + (
            f"; {ev['vision_block_forwards_skipped']} of the {ev['vision_block_forwards']} vision-block forwards of "
            "recomputed towers reused likewise" if ev.get("vision_block_forwards") else "") + "."
    )
    intervals = doc.get("intervals")
    if intervals:
        page.para(
            f"Intervals: {intervals['confidence']:.0%} {intervals['method']}, {intervals['resamples']} resamples, over "
            f"{intervals['covers']}. They do not cover {intervals['not_covered']}."
        )
    page.heading("Top-k vs bottom-k vs random-k at equal weight")
    page.para(
        "k is a fraction of the searched weight (BF16 cost), not of the groups: every set quantizes the same weight "
        "within the smallest group's share, so that a ratio does not measure the size of the groups. The size-only "
        "sets (largest and smallest groups first) are the baseline a ranking must beat."
    )
    page.table(pd.DataFrame(ratio_rows(doc)))
    page.table(pd.DataFrame([r for row in doc["top_k"] for r in set_rows(row)]))
    page.heading("One-group ablations")
    corr = doc["ablations"]["correlation"]
    size_only = doc["ablations"]["size_only"]
    bullets = []
    for measure, label in (("kl", "KL (damage)"), ("loss_increase", "loss increase")):
        c, s = corr[measure], size_only[measure]
        bullets.append(
            f"{label}: Spearman ρ = {with_interval(c['spearman']['value'], c['spearman']['ci95'], '.3f')}, "
            f"Kendall τ = {with_interval(c['kendall']['value'], c['kendall']['ci95'], '.3f')} (n = {c['n']}); "
            f"size alone: ρ = {with_interval(s['spearman']['value'], s['spearman']['ci95'], '.3f')}"
        )
    page.bullets(bullets)
    page.para("Per tower: ρ within the tower, and how much damage the tower's groups do per unit of predicted score "
              "against the other towers' groups (median of log KL/score); a factor whose interval is above 1 means "
              "the score under-predicts that tower's damage.")
    page.table(pd.DataFrame(tower_rows(doc)))
    table = pd.DataFrame(doc["ablations"]["rows"])
    columns = ["rank", "layer", "tower", "predicted_score_per_token", "weight_cost", "kl", "loss_increase"]
    page.table(table[[c for c in columns if c in table]].rename(columns={
        "predicted_score_per_token": "predicted (per token)", "weight_cost": "weight (BF16 cost)", "kl": "KL", "loss_increase": "Δloss"}))
    page.heading("End to end at the cell's budget")
    e2e = doc["end_to_end"]
    rand = e2e["random_same_budget"]
    page.table(pd.DataFrame(end_to_end_rows(doc)).rename(columns={"quantized_groups": "quantized groups", "kl": "KL",
                                                                  "loss_increase": "Δloss"}))
    ratio_text = with_interval(rand["ratio_random_recipe"]["kl"], rand["ratio_random_recipe_ci95"]["kl"])
    size_text = _fmt(e2e["size_only"]["ratio_to_recipe_kl"], ".3g")
    page.para(
        f"Budget {e2e['budget_bits']:g} effective bits; the solver's recipe reaches {e2e['recipe']['bits']:.4f}. Random "
        f"and size-only recipes are built to those bits within the smallest group's share ({e2e['bits_tolerance']:.4f} "
        f"bits), and only those within it are compared: {rand['compared']} of {len(rand['draws'])} random recipes. "
        f"The solver's recipe does less damage than {rand['recipe_beats']} of them; random recipes do {ratio_text}× its "
        f"damage, the size-only recipe {size_text}×, and its KL is {_fmt(e2e['recipe_vs_uniform_kl'], '.3g')} × that "
        "of quantizing every group."
    )
    return page
