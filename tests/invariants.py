"""Checks that a cell's validation and recipes are the numbers they claim to be.

Each check recomputes what a file states from the cell's manifest (the ranking, the bits of a
selection, the ratios, the verdict) or tests a property the numbers must have (the exact MILP is
never beaten, a feasible recipe meets its budget), so a wrong number fails whatever the model.
"""

from __future__ import annotations

import math
import re
from typing import Any

import pytest

from vlmsens.recipes import SCORE_RTOL, bits_of, bits_range, is_nested, score_of
from vlmsens.validation import bits_tolerance, by_size, ranked_groups, ratio, stratified_positions, verdict, weight_share

MEASURES = ("kl", "loss_increase")


def is_established(doc: dict[str, Any]) -> bool:
    """What the verdict must say: the ranking predicts damage when ρ's interval excludes 0 from above."""
    rho = doc["ablations"]["correlation"]["kl"]["spearman"]
    return not math.isnan(rho["value"]) and rho["ci95"][0] > 0


VERDICT_LINE = re.compile(
    r"ranking predicts damage: ρ = (?P<rho>-?[\d.]+|nan)(?: \[(?P<lo>-?[\d.]+), (?P<hi>-?[\d.]+)\])?, "
    r"top-k/bottom-k damage ratio = (?:[\d.e+-]+×(?: \[[\d.e+-]+, [\d.e+-]+\])?|undefined \(bottom-k damage is 0\)) "
    r"\(k = \d+% of the weight, (?P<top>\d+) and (?P<bottom>\d+) of (?P<n>\d+) groups\); "
    r"size alone: ρ = (?:-?[\d.]+|nan)(?: \[-?[\d.]+, -?[\d.]+\])?"
    r"(?P<not>; not established: the ρ interval does not exclude 0)?"
    r"(?P<towers>(?:; the score under-predicts the (?:vision|text|head) tower's damage \([^)]*\))*)"
    r"(?P<intervals>\. Intervals: 95% percentile bootstrap over the \d+ held-out samples "
    r"\(ρ: and over the ablated groups within each tower\))?"
)


def check_verdict_line(line: str) -> re.Match:
    """A verdict read alone (where its numbers are not at hand): its outcome follows the ρ it quotes."""
    match = VERDICT_LINE.fullmatch(line)
    assert match, line
    lo = float(match["lo"]) if match["lo"] else math.nan
    if lo != 0.0:  # printed as 0.00: either side of 0
        established = match["rho"] != "nan" and lo > 0
        assert (match["not"] is None) == established, line
    return match


def check_validation(doc: dict[str, Any], manifest: dict[str, Any]) -> None:
    fmt = doc["ranking_format"]
    ranked = [g["layer"] for g in ranked_groups(manifest, fmt)]
    assert doc["n_groups"] == len(ranked)
    # The verdict line is the numbers' own, and its outcome follows ρ's interval.
    assert doc["verdict"] == verdict(doc)
    assert ("not established" not in doc["verdict"]) == is_established(doc), doc["verdict"]

    share = weight_share(manifest)
    tolerance = min(share.values())
    largest = [g["layer"] for g in by_size(manifest)]
    for row in doc["top_k"]:
        # Every set quantizes the same fraction of the searched weight, within the smallest group's share,
        # and says how many groups, which weight and how many bits it has.
        sets = [row["top"], row["bottom"], row["size_only"]["largest"], row["size_only"]["smallest"], *row["random"]["draws"]]
        for chosen in sets:
            assert chosen["weight_fraction"] == pytest.approx(sum(share[layer] for layer in chosen["groups"]))
            assert chosen["within_tolerance"] == (abs(chosen["weight_fraction"] - row["fraction"]) <= tolerance + 1e-9)
            assert chosen["k"] == len(chosen["groups"]) == chosen["quantized_groups"]
            assert chosen["bits"] == pytest.approx(bits_of(manifest, {layer: fmt if layer in chosen["groups"] else "bf16" for layer in ranked}), abs=1e-9)
        assert row["k"] == row["top"]["k"]
        # top: the most sensitive groups in rank order (a group too large for what is left is skipped)
        assert row["top"]["groups"] == [layer for layer in ranked if layer in set(row["top"]["groups"])]
        assert row["bottom"]["groups"] == [layer for layer in ranked[::-1] if layer in set(row["bottom"]["groups"])]
        assert not set(row["top"]["groups"]) & set(row["bottom"]["groups"])
        assert row["size_only"]["largest"]["groups"] == [layer for layer in largest if layer in set(row["size_only"]["largest"]["groups"])]
        assert len(row["random"]["draws"]) == doc["settings"]["random_draws"]
        for m in MEASURES:
            assert row["ratio_top_bottom"][m] == (ratio(row["top"][m], row["bottom"][m]) if row["top"]["k"] and row["bottom"]["k"] else None)
            assert row["random"]["mean"][m] == pytest.approx(sum(d[m] for d in row["random"]["draws"]) / k_draws(row))
            big, small = row["size_only"]["largest"], row["size_only"]["smallest"]
            assert row["size_only"]["ratio_largest_smallest"][m] == (ratio(big[m], small[m]) if big["k"] and small["k"] else None)
        check_interval(row["ratio_top_bottom"]["kl"], row["ratio_top_bottom_ci95"]["kl"], doc)

    tokens = doc["eval"]["tokens_per_sample"]
    assert len(tokens) == doc["eval"]["samples"] and sum(tokens) == doc["eval"]["loss_tokens"]
    rows = doc["ablations"]["rows"]
    positions = stratified_positions(len(ranked), doc["settings"]["ablation_groups"])
    assert [r["layer"] for r in rows] == [ranked[p] for p in positions]
    assert [r["rank"] for r in rows] == [p + 1 for p in positions]
    by_layer = {g["layer"]: g for g in manifest["groups"]}
    for r in rows:
        assert r["predicted_score"] == by_layer[r["layer"]]["scores_raw"][fmt]
        assert r["predicted_score_per_token"] == by_layer[r["layer"]]["scores_per_token"][fmt]
        assert r["weight_cost"] == by_layer[r["layer"]]["uncompressed_cost"]
        # the per-sample sums are the measurement's own: they add up to its per-token value
        assert sum(r["per_sample"]["kl"]) / sum(tokens) == pytest.approx(r["kl"], rel=1e-9, abs=1e-12)
    for m in MEASURES:
        check_interval(doc["ablations"]["correlation"][m]["spearman"]["value"], doc["ablations"]["correlation"][m]["spearman"]["ci95"], doc)
    # per tower: the rows of that tower, and a ρ of its own where it has 3 rows or more
    towers = doc["ablations"]["towers"]
    assert set(towers) == {r["tower"] for r in rows}
    for tower, entry in towers.items():
        assert entry["n"] == sum(r["tower"] == tower for r in rows)
        assert math.isnan(entry["correlation"]["spearman"]["value"]) == (entry["n"] < 3)
    assert doc["ablations"]["size_only"]["kl"]["n"] == len(rows)

    e2e = doc["end_to_end"]
    assert e2e["budget_bits"] == manifest["search"]["effective_bits_target"]
    selected = {g["layer"]: g["selected_format"] for g in manifest["groups"]}
    assert e2e["recipe"]["bits"] == pytest.approx(bits_of(manifest, selected), abs=1e-9)
    assert e2e["recipe"]["bits"] <= e2e["budget_bits"] + 1e-9
    assert e2e["recipe"]["quantized_groups"] == sum(v != "bf16" for v in selected.values())
    assert e2e["uniform"]["quantized_groups"] == len(ranked)
    assert e2e["uniform"]["bits"] == pytest.approx(bits_of(manifest, dict.fromkeys(ranked, fmt)), abs=1e-9)
    draws = e2e["random_same_budget"]["draws"]
    assert len(draws) == doc["settings"]["random_draws"]
    # random recipes are built to the solver's bits within the smallest group's share, and only those are compared
    assert e2e["bits_tolerance"] == pytest.approx(bits_tolerance(manifest, fmt))
    for d in [*draws, e2e["size_only"]]:
        assert d["within_tolerance"] == (abs(d["bits"] - e2e["recipe"]["bits"]) <= e2e["bits_tolerance"] + 1e-9)
    compared = [d for d in draws if d["within_tolerance"]]
    assert e2e["random_same_budget"]["compared"] == len(compared)
    assert e2e["random_same_budget"]["recipe_beats"] == sum(d["kl"] > e2e["recipe"]["kl"] for d in compared)
    assert e2e["recipe_vs_uniform_kl"] == ratio(e2e["recipe"]["kl"], e2e["uniform"]["kl"])

    # Every configuration the file reports was measured, and nothing else.
    n_draws = doc["settings"]["random_draws"]
    expected = len(doc["top_k"]) * (4 + n_draws) + len(rows) + 3 + n_draws
    assert doc["eval"]["configurations_measured"] == expected
    # Each configuration's batches went through every text layer or skipped a prefix of them; the
    # uniform configuration quantizes text layer 0, so never everything was skipped.
    ev = doc["eval"]
    text_layers = 1 + max(g["block"] for g in manifest["groups"] if g["tower"] == "text")
    assert ev["text_layer_forwards"] == ev["configurations_measured"] * ev["batches"] * text_layers
    assert 0 <= ev["text_layer_forwards_skipped"] < ev["text_layer_forwards"]
    # the BF16 reference recorded each batch's text layers once, on the GPU within its budget or on the host
    recordings = ev["text_layer_recordings"]
    assert recordings["on_device"] + recordings["on_host"] == ev["batches"] * text_layers
    if not doc["device"]["device"].startswith("cuda"):
        assert recordings["on_device"] == 0
    # the vision blocks likewise, where the cell searched vision groups: each recomputed tower ran every
    # block of each batch or skipped a prefix; an lm-only cell records and recomputes none
    blocks = ev["vision_block_recordings"]
    recorded = blocks["on_device"] + blocks["on_host"]
    assert 0 <= ev["vision_block_forwards_skipped"] <= ev["vision_block_forwards"]
    if any(g["tower"] == "vision" for g in manifest["groups"]):
        depth = recorded // ev["batches"]
        assert depth >= 1 and recorded == depth * ev["batches"]
        assert ev["vision_block_forwards"] % recorded == 0 and ev["vision_block_forwards"] > 0  # the uniform recipe recomputes it
    else:
        assert recorded == 0 and ev["vision_block_forwards"] == 0


def check_interval(value: float | None, interval: list[float], doc: dict[str, Any]) -> None:
    """An interval is there when resamples are, and holds its point estimate (or is undefined with it)."""
    lo, hi = interval
    if not doc["settings"]["bootstrap_resamples"] or value is None or (isinstance(value, float) and math.isnan(value)):
        return
    assert not math.isnan(lo) and not math.isnan(hi), interval
    assert lo <= hi


def k_draws(row: dict[str, Any]) -> int:
    return len(row["random"]["draws"])


def agreement_line(check: dict[str, Any]) -> str | None:
    """The words the recipes page must carry for a cross-check that disagrees (None when it agrees)."""
    if check["agrees"]:
        return None
    gap = check["score_gap_rel"]
    if check.get("rule") == "ModelOpt kl_div threshold rule":
        return f"no: ModelOpt's pick differs from its threshold rule replayed on the manifest (score {gap:+.3%})"
    if gap > 0:
        return f"no: ModelOpt's pick scores {gap:+.3%} above the exact optimum"
    return f"no: the MILP's pick scores {-gap:+.3%} above ModelOpt's"


def check_recipes(payload: dict[str, Any], manifest: dict[str, Any], page: str) -> list[dict[str, Any]]:
    """Checks one cell's recipes.json against its manifest and its recipes.md; returns the disagreements."""
    assert [r["budget_bits"] for r in payload["recipes"]] == payload["budgets"]
    low, high = bits_range(manifest)
    disagreements = []
    for r in payload["recipes"]:
        selection = r["selection"]
        assert set(selection) == {g["layer"] for g in manifest["groups"]}
        assert r["achieved_bits"] == pytest.approx(bits_of(manifest, selection), abs=1e-9)
        assert r["predicted_score"] == pytest.approx(score_of(manifest, selection), rel=1e-12, abs=0)
        assert r["kept_bf16"] == [layer for layer, fmt in selection.items() if fmt == "bf16"]
        check = r["cross_check"]
        if r["feasible"]:
            assert r["within_budget"] and r["achieved_bits"] <= r["budget_bits"] * (1 + 1e-9), r
            assert check["milp_achieved_bits"] <= r["budget_bits"] * (1 + 1e-9)
        else:
            # Infeasible: the budget is below the fewest bits; the most compressed recipe ships.
            assert r["budget_bits"] < low and r["achieved_bits"] == pytest.approx(low) and not r["within_budget"]
        assert low - 1e-9 <= r["achieved_bits"] <= high + 1e-9
        milp = check["milp_predicted_score"]
        gap = (r["predicted_score"] - milp) / milp if milp else (0.0 if r["predicted_score"] == milp else math.inf)
        assert check["score_gap_rel"] == pytest.approx(gap, rel=1e-9, abs=1e-15)
        # The MILP is exact: no recipe of the same budget scores below it beyond the solvers' tolerance.
        # (kl_div cells replay ModelOpt's threshold rule instead, which is no minimum.)
        if manifest.get("search", {}).get("method") != "kl_div":
            assert check["score_gap_rel"] >= -SCORE_RTOL, check
        assert check["agrees"] == (check["same_selection"] or abs(check["score_gap_rel"]) <= SCORE_RTOL)
        line = agreement_line(check)
        if line is not None:
            assert line in page, f"{r['cell']} at {r['budget_bits']} bits: the page does not say {line!r}"
            disagreements.append(r)
    if "nested" in payload:
        check_nested_recipes(payload, manifest, page)
    return disagreements


def check_nested_recipes(payload: dict[str, Any], manifest: dict[str, Any], page: str) -> None:
    """The nested recipes of a cell: one per budget, within it, each never better than the optimum, nested."""
    nested, optimal = payload["nested"], {r["budget_bits"]: r for r in payload["recipes"]}
    assert [n["budget_bits"] for n in nested] == payload["budgets"]
    low, _ = bits_range(manifest)
    for n in nested:
        selection = n["selection"]
        assert n["achieved_bits"] == pytest.approx(bits_of(manifest, selection), abs=1e-9)
        assert n["predicted_score"] == pytest.approx(score_of(manifest, selection), rel=1e-12, abs=0)
        assert n["kept_bf16"] == [layer for layer, fmt in selection.items() if fmt == "bf16"]
        if n["feasible"]:
            assert n["achieved_bits"] <= n["budget_bits"] * (1 + 1e-9)
            best = optimal[n["budget_bits"]]["cross_check"]["milp_predicted_score"]
            assert n["predicted_score"] >= best * (1 - SCORE_RTOL) - 1e-15
        else:
            assert n["budget_bits"] < low
    by_bits = sorted(nested, key=lambda n: n["budget_bits"])
    assert is_nested([n["selection"] for n in by_bits], manifest)
    assert "Nested recipes (greedy by score per cost)" in page
