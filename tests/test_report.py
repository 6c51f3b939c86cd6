"""Cross-cell statistics and recipes on constructed inputs with known answers."""

from __future__ import annotations

import itertools
import json
import math
import re

import numpy as np
import pandas as pd
import pytest
from invariants import check_recipes

from vlmsens import recipes as rc
from vlmsens.errors import VlmsensError
from vlmsens.reports import depth_profile as depth
from vlmsens.reports import doc, frames, heatmap, recipe_summary, stats, towers
from vlmsens.reports import format_comparison as fmt_cmp
from vlmsens.reports import rank_stability as stability
from vlmsens.reports import report as report_page
from vlmsens.reports import scope_comparison as scope_cmp
from vlmsens.reports.recipes import write_cell_recipes

# =============================================================================================
# Rank statistics


def test_kendall_and_spearman_identical_and_reversed():
    a = pd.Series([5.0, 4.0, 3.0, 2.0, 1.0], index=list("abcde"))
    same = stats.rank_agreement(a, a * 10)  # any monotone transform is the same ranking
    assert same["kendall_tau"] == pytest.approx(1.0) and same["spearman"] == pytest.approx(1.0) and same["n"] == 5
    reversed_ = stats.rank_agreement(a, pd.Series([1.0, 2.0, 3.0, 4.0, 5.0], index=list("abcde")))
    assert reversed_["kendall_tau"] == pytest.approx(-1.0) and reversed_["spearman"] == pytest.approx(-1.0)


def test_rank_agreement_uses_the_common_index_and_is_nan_when_undefined():
    a = pd.Series([3.0, 2.0, 1.0], index=["x", "y", "z"])
    b = pd.Series([30.0, 20.0, 99.0], index=["x", "y", "w"])  # only x, y shared
    assert stats.rank_agreement(a, b)["n"] == 2
    assert stats.rank_agreement(a, b)["kendall_tau"] == pytest.approx(1.0)
    assert math.isnan(stats.rank_agreement(a, pd.Series([1.0], index=["x"]))["kendall_tau"])
    constant = pd.Series([1.0, 1.0, 1.0], index=["x", "y", "z"])
    assert math.isnan(stats.rank_agreement(a, constant)["spearman"])


def test_top_k_overlap_of_rankings():
    a = list("abcdefghij")
    assert stats.top_k_overlap(a, a, 3) == 1.0
    assert stats.top_k_overlap(a, a[::-1], 3) == 0.0
    assert stats.top_k_overlap(list("abcd"), list("abxy"), 4) == 0.5  # {a, b} of 4
    assert stats.top_k_overlap(list("abcd"), list("bade"), 2) == 1.0  # order inside the top-k does not matter
    # Short lists: k shrinks to the shorter list.
    assert stats.top_k_overlap(list("abc"), list("cba"), 10) == 1.0
    assert stats.top_k_overlap(list("ab"), list("abcdef"), 20) == 1.0
    assert math.isnan(stats.top_k_overlap([], list("ab"), 5))
    with pytest.raises(ValueError):
        stats.top_k_overlap(a, a, 0)


def test_top_k_overlap_of_scores_splits_ties():
    idx = list("abcd")
    a = pd.Series([4.0, 3.0, 2.0, 1.0], index=idx)
    assert stats.top_k_overlap(a, a, 2) == 1.0
    assert stats.top_k_overlap(a, -a, 2) == 0.0
    # All tied: every layer is in the top-2 with probability 1/2 -> expected overlap = k/n (chance level).
    flat = pd.Series(1.0, index=idx)
    assert stats.top_k_overlap(flat, flat, 2) == pytest.approx(0.5)
    # In b, layer a is 1st and b, c tie for the 2nd slot.
    b = pd.Series([4.0, 2.0, 2.0, 1.0], index=idx)
    # a's top-2 = {a, b}; b's top-2 = a surely, b or c with 1/2 each -> (1 + 1/2) / 2
    assert stats.top_k_overlap(a, b, 2) == pytest.approx(0.75)
    # Only common layers count; k shrinks to their number.
    c = pd.Series([9.0, 8.0], index=["a", "z"])
    assert stats.top_k_overlap(a, c, 10) == pytest.approx(1.0)  # one common layer, in both top-1
    # NaN scores are dropped, not ranked: the layers compared are b, c, d, whose top-1 is b in both.
    d = pd.Series([np.nan, 3.0, 2.0, 1.0], index=idx)
    assert stats.top_k_overlap(a, d, 1) == 1.0


# =============================================================================================
# Constructed layer frames


def _layers(rows):
    """A layers frame like report.layers_frame from (cell..., layer, tower, block, sublayer, score[, kept, cost, family])."""
    records = []
    for r in rows:
        model, fmt, scope, size, layer, tower, block, sublayer, score, *rest = r
        kept = rest[0] if len(rest) > 0 else False
        cost = rest[1] if len(rest) > 1 else 1.0
        family = rest[2] if len(rest) > 2 else "fam"
        records.append({"model": model, "format": fmt, "scope": scope, "size": size, "family": family, "inputs": "image+caption", "layer": layer,
                        "tower": tower, "block": block, "sublayer": sublayer, "sensitivity": score, "sensitivity_raw": score,
                        "rank": 0, "selected_format": "bf16" if kept else fmt, "num_bits": 16.0 if kept else 8.0,
                        "uncompressed_cost": cost, "kept_bf16": kept})
    frame = pd.DataFrame.from_records(records)
    frame["block"] = frame["block"].astype("Int64")
    return frame


def _ranked_cells(scores_by_size, model="m", fmt="f", scope="all-layers"):
    rows = []
    for size, scores in scores_by_size.items():
        for i, s in enumerate(scores):
            rows.append((model, fmt, scope, size, f"layers.{i}.mlp.down_proj", "text", i, "down", s))
    return _layers(rows)


def test_rank_stability_known_answers():
    base = [float(x) for x in range(30, 0, -1)]  # 30 layers, strictly decreasing
    layers = _ranked_cells({"small": base, "medium": [x * 3 for x in base], "large": base[::-1]})
    table = stability.rank_stability(layers, ["small", "medium", "large"]).set_index("sizes")
    assert list(table.index) == ["small↔medium", "small↔large", "medium↔large"]
    assert table.loc["small↔medium", "kendall_tau"] == pytest.approx(1.0)
    assert table.loc["small↔medium", "top10_overlap"] == 1.0 and table.loc["small↔medium", "top20_overlap"] == 1.0
    assert table.loc["small↔large", "kendall_tau"] == pytest.approx(-1.0)
    assert table.loc["small↔large", "top10_overlap"] == 0.0
    # top-20 of 30 reversed: layers 10..19 are in both top-20s -> 10 / 20
    assert table.loc["small↔large", "top20_overlap"] == pytest.approx(0.5)
    assert (table["n"] == 30).all()


def test_rank_stability_single_size_is_not_applicable():
    layers = _ranked_cells({"small": [3.0, 2.0, 1.0]})
    assert stability.rank_stability(layers, ["small", "large"]).empty
    doc = stability.rank_stability_doc("m", stability.rank_stability(layers, ["small"]), ["small"])
    assert "Not applicable" in doc.to_markdown() and "single calibration size" in doc.to_markdown()


def _scores(rows):
    records = [{"model": "m", "format": fmt, "scope": scope, "size": size, "family": "fam", "layer": layer, "tower": "text",
                "block": 0, "sublayer": "down", "scored_format": scored, "score": score, "selected_format": fmt}
               for fmt, scope, size, layer, scored, score in rows]
    frame = pd.DataFrame.from_records(records)
    frame["block"] = frame["block"].astype("Int64")
    return frame


def test_format_comparison_log_ratio_and_disagreement_order():
    rows = []
    fp8 = {"a": 1e-6, "b": 1e-5, "c": 1e-4}
    int8 = {"a": 1e-3, "b": 1e-5, "c": 1e-5}  # a: INT8 1000x worse, b: equal, c: INT8 10x better
    for layer in fp8:
        rows.append(("fp8", "all-layers", "large", layer, "fp8", fp8[layer]))
        rows.append(("int8", "all-layers", "large", layer, "int8", int8[layer]))
    cmp_ = fmt_cmp.format_comparison(_scores(rows), ["large"], ["fp8", "int8"])
    assert cmp_.reason is None
    per = cmp_.per_layer.set_index("layer")
    assert per.loc["a", "log10_ratio"] == pytest.approx(3.0)
    assert per.loc["b", "log10_ratio"] == pytest.approx(0.0)
    assert per.loc["c", "log10_ratio"] == pytest.approx(-1.0)
    assert list(cmp_.per_layer["layer"]) == ["a", "c", "b"]  # largest |log ratio| first
    row = cmp_.agreement.iloc[0]
    assert row["format_a"] == "fp8" and row["format_b"] == "int8" and row["n"] == 3
    assert row["share_b_higher"] == pytest.approx(1 / 3)
    table = next(iter(fmt_cmp.disagreement_table(cmp_.per_layer, ["large"]).values()))
    assert list(table["less sensitive"]) == ["fp8", "int8", "tie"]


def test_format_comparison_lists_rank_flips_not_a_global_offset():
    # INT8 scores every group about 10x below FP8 (a global offset, no change of order), with
    # noise on the ratio, except "down": FP8's 6th, INT8's 1st. Sorting by |log ratio| would list
    # the noisy offset groups first; the rank flip must lead.
    fp8 = {f"g{i}": 10.0 ** -i for i in range(1, 9)}  # g1 > g2 > ... > g8
    fp8["down"] = 10.0 ** -5.5  # between g5 and g6: FP8 rank 6
    rng = np.random.default_rng(0)
    int8 = {k: v * 10 ** (-1.0 + rng.uniform(-0.3, 0.3)) for k, v in fp8.items()}
    int8["down"] = 1.0  # INT8 rank 1
    rows = [("fp8", "all-layers", "large", k, "fp8", v) for k, v in fp8.items()]
    rows += [("int8", "all-layers", "large", k, "int8", v) for k, v in int8.items()]
    cmp_ = fmt_cmp.format_comparison(_scores(rows), ["large"], ["fp8", "int8"])
    per = cmp_.per_layer.set_index("layer")
    assert (per.loc["down", "rank_a"], per.loc["down", "rank_b"], per.loc["down", "rank_shift"]) == (6, 1, -5)
    assert cmp_.per_layer.iloc[0]["layer"] == "down"
    median = float(np.median(np.log10(pd.Series(int8) / pd.Series(fp8))))
    assert cmp_.agreement.iloc[0]["median_log10_ratio"] == pytest.approx(median)
    assert per.loc["g1", "log10_ratio_vs_median"] == pytest.approx(np.log10(int8["g1"] / fp8["g1"]) - median)
    table = next(iter(fmt_cmp.disagreement_table(cmp_.per_layer, ["large"], top=3).values()))
    assert table.iloc[0]["layer"] == "down" and table.iloc[0]["rank shift large"] == -5
    assert list(table.columns[:6]) == ["layer", "tower", "fp8", "int8", "rank fp8", "rank int8"]
    # The groups after the flip moved by one place at most (they made room for it).
    assert table["rank shift large"].iloc[1:].abs().max() <= 1


def test_format_comparison_prefers_each_formats_own_cell_and_degrades_with_one_format():
    # A candidate-set cell also scores fp8; the fp8 cell's own score wins.
    rows = [("fp8", "lm-only", "small", "a", "fp8", 1.0), ("fp8_or_int8", "lm-only", "small", "a", "fp8", 5.0),
            ("fp8_or_int8", "lm-only", "small", "a", "int8", 10.0)]
    cmp_ = fmt_cmp.format_comparison(_scores(rows), ["small"], ["fp8", "int8"])
    assert cmp_.per_layer.iloc[0]["score_a"] == 1.0 and cmp_.per_layer.iloc[0]["log10_ratio"] == pytest.approx(1.0)
    single = fmt_cmp.format_comparison(_scores([("fp8", "lm-only", "small", "a", "fp8", 1.0)]), ["small"], ["fp8"])
    assert single.reason and "single format" in single.reason and single.per_layer.empty
    assert "Not applicable" in fmt_cmp.format_comparison_doc("m", single, ["small"]).to_markdown()


def test_scope_comparison_text_layers_only_and_not_applicable_with_one_scope():
    rows = []
    for scope, scores in (("lm-only", [3.0, 2.0, 1.0]), ("all-layers", [1.0, 2.0, 3.0])):
        for i, s in enumerate(scores):
            rows.append(("m", "f", scope, "large", f"layers.{i}.o_proj", "text", i, "o", s))
    rows.append(("m", "f", "all-layers", "large", "visual.blocks.0.attn.qkv", "vision", 0, "qkv", 9.0))
    cmp_ = scope_cmp.scope_comparison(_layers(rows), ["large"])
    assert cmp_.agreement.iloc[0]["kendall_tau"] == pytest.approx(-1.0) and cmp_.agreement.iloc[0]["n"] == 3
    assert "visual.blocks.0.attn.qkv" not in set(cmp_.per_layer["layer"])
    shift = cmp_.per_layer.set_index("layer")["rank_shift"]
    assert shift["layers.2.o_proj"] == 2 and shift["layers.0.o_proj"] == -2
    only = scope_cmp.scope_comparison(_layers([r for r in rows if r[2] == "all-layers"]), ["large"])
    assert only.reason and "lm-only" in only.reason


def test_tower_summary_shares():
    rows = [
        ("m", "f", "all-layers", "s", "v0", "vision", 0, "qkv", 1.0, False, 6.0),
        ("m", "f", "all-layers", "s", "v1", "vision", 1, "qkv", 1.0, True, 2.0),
        ("m", "f", "all-layers", "s", "t0", "text", 0, "o", 6.0, True, 2.0),
        ("m", "f", "all-layers", "s", "h", "head", None, "lm_head", 2.0, False, 10.0),
    ]
    summary = towers.tower_summary(_layers(rows)).set_index("tower")
    assert summary.loc["vision", "sensitivity_share"] == pytest.approx(0.2)
    assert summary.loc["text", "sensitivity_share"] == pytest.approx(0.6)
    assert summary.loc["vision", "cost_share"] == pytest.approx(0.4)
    assert summary.loc["head", "cost_share"] == pytest.approx(0.5)
    assert summary.loc["text", "density"] == pytest.approx(0.6 / 0.1)
    assert summary.loc["vision", "bf16_budget_share"] == pytest.approx(0.5) and summary.loc["text", "bf16_budget_share"] == pytest.approx(0.5)
    assert summary.loc["head", "bf16_budget_share"] == 0.0 and summary.loc["vision", "groups_bf16"] == 1
    assert summary["sensitivity_share"].sum() == pytest.approx(1.0) and summary["cost_share"].sum() == pytest.approx(1.0)


def test_heatmap_frame_rows_columns_sums_and_kept():
    rows = [
        ("m", "f", "all-layers", "s", "lm_head", "head", None, "lm_head", 5.0),
        ("m", "f", "all-layers", "s", "t1.down", "text", 1, "down", 1.0),
        ("m", "f", "all-layers", "s", "t0.qkv", "text", 0, "qkv", 2.0, True),
        ("m", "f", "all-layers", "s", "t0.o", "text", 0, "o", 3.0),
        ("m", "f", "all-layers", "s", "v0.qkv", "vision", 0, "qkv", 0.5),
        ("m", "f", "all-layers", "s", "merger.fc1", "vision", None, "merger_fc1", 0.25),
        ("m", "f", "all-layers", "s", "v10.qkv", "vision", 10, "qkv", 0.125),
        ("m", "f", "all-layers", "s", "v10.qkv.twin", "vision", 10, "qkv", 0.125),  # same row and column: summed
    ]
    scores, kept = heatmap.heatmap_frame(_layers(rows))
    assert list(scores.index) == [("vision", "qkv"), ("vision", "merger_fc1"), ("text", "qkv"), ("text", "o"),
                                  ("text", "down"), ("head", "lm_head")]
    assert list(scores.columns) == ["0", "1", "10", heatmap.NO_BLOCK]
    assert scores.loc[("vision", "qkv"), "10"] == pytest.approx(0.25)
    assert scores.loc[("head", "lm_head"), heatmap.NO_BLOCK] == 5.0
    assert math.isnan(scores.loc[("text", "down"), "0"])
    assert kept.loc[("text", "qkv"), "0"] and not kept.loc[("text", "o"), "0"] and not kept.loc[("text", "down"), "10"]
    empty_scores, _ = heatmap.heatmap_frame(_layers(rows).iloc[0:0])
    assert empty_scores.empty


def test_depth_profile_needs_two_families_and_normalises_depth():
    rows = []
    for model, family, n, peak in (("a", "qwen2_5_vl", 4, 3), ("b", "qwen3_vl", 2, 0)):
        for block in range(n):
            rows.append((model, "f", "all-layers", "s", f"{model}.{block}", "text", block, "o", 1.0 if block == peak else 0.0,
                         False, 1.0, family))
    layers = _layers(rows)
    profile, summary, reason = depth.depth_profile(layers, ["s"])
    assert reason is None
    s = summary.set_index("model")
    assert s.loc["a", "peak_rel_depth"] == pytest.approx(3.5 / 4) and s.loc["a", "share_last_quarter"] == pytest.approx(1.0)
    assert s.loc["b", "centre_rel_depth"] == pytest.approx(0.25) and s.loc["b", "share_first_quarter"] == pytest.approx(1.0)
    assert profile.groupby("model")["share"].sum().to_dict() == pytest.approx({"a": 1.0, "b": 1.0})
    _, _, reason = depth.depth_profile(layers[layers["model"] == "a"], ["s"])
    assert reason and "single model family" in reason


def test_doc_renders_markdown_and_escaped_html():
    page = doc.Doc("T <1>").para("uses `code` & **bold**").table(pd.DataFrame({"x": [1.5], "y": ["<b>"]})).not_applicable("why")
    md, html = page.to_markdown(), page.to_html()
    assert md.startswith("# T <1>") and "| 1.5 | <b> |" in md and "**Not applicable:** why" in md
    assert "T &lt;1&gt;" in html and "<code>code</code>" in html and "&amp;" in html and "&lt;b&gt;" in html
    assert "<strong>bold</strong>" in html and "<table>" in html


def test_plots_degrade_to_a_not_applicable_figure(tmp_path):
    empty = frames.Comparison(pd.DataFrame(), pd.DataFrame(), "the grid scores a single format")
    fmt_cmp.plot_format_comparison(empty, "m", ["small"], tmp_path / "f.png")
    scope_cmp.plot_scope_comparison(empty, "m", ["small"], tmp_path / "s.png")
    stability.plot_rank_stability(pd.DataFrame(), "m", tmp_path / "r.png", "single size")
    depth.plot_depth_profile(pd.DataFrame(), tmp_path / "d.png", "single family")
    for name in ("f", "s", "r", "d"):
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# =============================================================================================
# Recipes on constructed manifests


def _group(layer, modules, tower, costs, scores, selected):
    per_token = {k: v / 100 for k, v in scores.items()}
    return {"layer": layer, "modules": modules, "tower": tower, "block": None, "sublayer": "x", "scores_raw": dict(scores),
            "scores_per_token": per_token, "scores_modelopt_clipped": dict(scores), "costs": dict(costs),
            "uncompressed_cost": costs["bf16"], "cost_weight": 1.0, "selected_format": selected}


INT8_CFG = {"quant_cfg": [{"quantizer_name": "*", "enable": False},
                          {"quantizer_name": "*weight_quantizer", "cfg": {"num_bits": 8, "axis": 0}},
                          {"quantizer_name": "*input_quantizer", "cfg": {"num_bits": 8, "axis": None}},
                          {"quantizer_name": "*lm_head*", "enable": False}], "algorithm": "max"}
INT4_CFG = {"quant_cfg": [{"quantizer_name": "*", "enable": False},
                          {"quantizer_name": "*weight_quantizer", "cfg": {"num_bits": 4, "block_sizes": {"-1": 128}}},
                          {"quantizer_name": "*input_quantizer", "enable": False}], "algorithm": "awq_lite"}


def _manifest(groups, formats=("int8",), bits_achieved=None, disabled=()):
    cfgs = {"int8": INT8_CFG, "int4": INT4_CFG}
    fmt_bits = {"int8": 8.0, "int4": 4.0}
    manifest = {
        "cell": {"model": "m", "family": "qwen3_vl", "format": formats[0], "candidates": list(formats), "scope": "all-layers", "size": "small"},
        "formats": {f: {"base": "X", "description": f, "bits": fmt_bits[f], "modelopt_config": cfgs[f]} for f in formats},
        "config": {"effective_bits": 8.5, "method": "gradient", "inputs": "image+caption"},
        "search": {"effective_bits_target": 8.5, "effective_bits_achieved": bits_achieved, "disabled_layers": list(disabled), "score": 0.0},
        "groups": groups,
    }
    if bits_achieved is None:
        model = rc.CostModel(sum(g["uncompressed_cost"] for g in groups), 0.0, True)
        manifest["search"]["effective_bits_achieved"] = model.bits(sum(g["costs"][g["selected_format"]] for g in groups))
    return manifest


def _random_manifest(rng, n, formats=("int8",)):
    groups = []
    for i in range(n):
        w = float(rng.integers(1, 50)) * 64
        costs = {"bf16": w}
        scores = {}
        for f in formats:
            costs[f] = w * (0.5 if f == "int8" else 0.25)
            scores[f] = float(10 ** rng.uniform(-9, -3))
        if "int4" in formats and "int8" in formats:
            scores["int4"] = max(scores["int4"], scores["int8"] * 2)
        modules = [f"model.language_model.layers.{i}.self_attn.{p}_proj" for p in "qkv"] if i % 3 == 0 else [f"model.language_model.layers.{i}.mlp.down_proj"]
        groups.append(_group(modules[0], modules, "text", costs, scores, formats[0]))
    groups.append(_group("lm_head", ["lm_head"], "head", {"bf16": 4096.0, **{f: 4096.0 * (0.5 if f == "int8" else 0.25) for f in formats}},
                         {f: 1e-2 for f in formats}, formats[0]))
    return _manifest(groups, formats)


def _brute_force(manifest, budget):
    model = rc.cost_model(manifest)
    groups = manifest["groups"]
    best = None
    for combo in itertools.product(*[rc.choices_of(g) for g in groups]):
        sel = {g["layer"]: c for g, c in zip(groups, combo, strict=False)}
        if rc.bits_of(manifest, sel, model) <= budget + 1e-12:
            score = rc.score_of(manifest, sel)
            if best is None or score < best - 1e-15:
                best = score
    return best


@pytest.mark.parametrize("formats", [("int8",), ("int4", "int8")])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_solver_respects_budgets_and_is_optimal(formats, seed):
    manifest = _random_manifest(np.random.default_rng(seed), 7 if len(formats) == 1 else 5, formats)
    low, high = rc.bits_range(manifest)
    for budget in (low, low + 0.3, (low + high) / 2, high - 0.5, 9.0, 10.0, 16.0):
        if budget < low:
            continue
        sol = rc.solve_budget(manifest, budget)
        assert sol.feasible
        assert rc.bits_of(manifest, sol.selection) <= budget * (1 + rc.BUDGET_RTOL)
        assert rc.score_of(manifest, sol.selection) == pytest.approx(_brute_force(manifest, budget), rel=1e-9, abs=1e-15)


def test_infeasible_budget_says_so_and_ships_the_most_compressed_recipe():
    manifest = _random_manifest(np.random.default_rng(3), 4)
    sol = rc.solve_budget(manifest, 7.0)
    assert not sol.feasible and "infeasible" in sol.status and "8.0000" in sol.status
    assert set(sol.selection.values()) == {"int8"}
    recipe = rc.make_recipe(manifest, 7.0)
    assert recipe["feasible"] is False and recipe["within_budget"] is False and recipe["achieved_bits"] == pytest.approx(8.0)
    assert any("infeasible" in n for n in recipe["notes"])
    assert "INFEASIBLE" in rc.ignore_yaml(recipe)


def test_everything_bf16_at_16_bits_and_everything_quantized_at_the_minimum():
    manifest = _random_manifest(np.random.default_rng(4), 5)
    assert set(rc.solve_budget(manifest, 16.0).selection.values()) == {"bf16"}
    assert set(rc.solve_budget(manifest, 8.0).selection.values()) == {"int8"}


def test_cost_model_matches_recorded_bits_and_infers_a_fixed_cost():
    manifest = _random_manifest(np.random.default_rng(5), 4)
    model = rc.cost_model(manifest)
    assert model.consistent and model.fixed_cost == 0.0
    # The same selection recorded with 1000 extra BF16 cost units outside the search.
    d = model.denominator
    selected = sum(g["costs"][g["selected_format"]] for g in manifest["groups"])
    manifest["search"]["effective_bits_achieved"] = 16 * (selected + 1000.0) / (d + 1000.0)
    inferred = rc.cost_model(manifest)
    assert inferred.consistent and inferred.fixed_cost == pytest.approx(1000.0)
    low, _ = rc.bits_range(manifest, inferred)
    assert low > 8.0  # the fixed BF16 cost keeps the floor above 8 bits
    sol = rc.solve_budget(manifest, low + 0.1, inferred)
    assert rc.bits_of(manifest, sol.selection, inferred) <= low + 0.1


def test_ignore_list_quant_cfg_and_guards():
    groups = [
        _group("model.language_model.layers.0.self_attn.q_proj",
               [f"model.language_model.layers.0.self_attn.{p}_proj" for p in "qkv"], "text", {"int8": 300.0, "bf16": 600.0}, {"int8": 5.0}, "int8"),
        _group("model.language_model.layers.0.mlp.down_proj", ["model.language_model.layers.0.mlp.down_proj"], "text",
               {"int8": 100.0, "bf16": 200.0}, {"int8": 1.0}, "int8"),
        _group("lm_head", ["lm_head"], "head", {"int8": 50.0, "bf16": 100.0}, {"int8": 2.0}, "int8"),
    ]
    manifest = _manifest(groups, disabled=["*visual*"])
    selection = {"model.language_model.layers.0.self_attn.q_proj": "bf16", "model.language_model.layers.0.mlp.down_proj": "int8",
                 "lm_head": "bf16"}
    ignore = rc.ignore_list(manifest, selection)
    assert ignore == ["re:.*visual.*", *[f"model.language_model.layers.0.self_attn.{p}_proj" for p in "qkv"], "lm_head"]
    cfg = rc.with_bf16_guards(rc.quant_cfg_from_manifest(manifest, selection), manifest, selection)
    entries = {e["quantizer_name"]: e for e in cfg["quant_cfg"]}
    assert cfg["quant_cfg"][0] == {"quantizer_name": "*", "enable": False}
    assert entries["*visual*"]["enable"] is False
    assert entries["model.language_model.layers.0.mlp.down_proj.weight_quantizer"] == {
        "quantizer_name": "model.language_model.layers.0.mlp.down_proj.weight_quantizer", "enable": True, "cfg": {"num_bits": 8, "axis": 0}}
    assert not any(n.startswith("model.language_model.layers.0.self_attn.q_proj.") and e["enable"] for n, e in entries.items())
    assert entries["model.language_model.layers.0.self_attn.k_proj.*"]["enable"] is False
    assert entries["lm_head.*"]["enable"] is False
    # The selection read back from the config is the one written.
    assert rc.selection_from_quant_cfg(manifest, cfg) == selection
    assert rc.glob_to_regex("model.visual.blocks.?") == r"re:model\.visual\.blocks\.."


def test_selection_from_quant_cfg_tells_candidate_formats_apart():
    manifest = _random_manifest(np.random.default_rng(6), 3, ("int4", "int8"))
    layers = [g["layer"] for g in manifest["groups"]]
    selection = dict(zip(layers, itertools.cycle(["int4", "int8", "bf16"])))
    cfg = rc.quant_cfg_from_manifest(manifest, selection)
    assert rc.selection_from_quant_cfg(manifest, cfg) == selection
    recipe = rc.make_recipe(manifest, 6.0)
    assert recipe["cross_check"]["same_selection"] and recipe["achieved_bits"] <= 6.0 + 1e-9


def test_write_cell_recipes_without_state(tmp_path):
    manifest = _random_manifest(np.random.default_rng(7), 6)
    path = tmp_path / "quant_manifest.json"
    path.write_text(json.dumps(manifest))
    budgets = [7.5, 8.25, 8.5, 9.0, 10.0]
    cfgs = [str(tmp_path / rc.budget_slug(b) / "modelopt_quant_cfg.json") for b in budgets]
    ignores = [str(tmp_path / rc.budget_slug(b) / "ignore.yaml") for b in budgets]
    nested_cfgs = [str(tmp_path / rc.budget_slug(b) / "nested" / "modelopt_quant_cfg.json") for b in budgets]
    nested_ignores = [str(tmp_path / rc.budget_slug(b) / "nested" / "ignore.yaml") for b in budgets]
    out = write_cell_recipes(str(path), None, budgets, summary_json=str(tmp_path / "recipes.json"),
                                summary_md=str(tmp_path / "recipes.md"), summary_html=str(tmp_path / "recipes.html"),
                                quant_cfgs=cfgs, ignores=ignores, nested_quant_cfgs=nested_cfgs,
                                nested_ignores=nested_ignores, progress=lambda _: None)
    assert [r["feasible"] for r in out] == [False, True, True, True, True]
    for r in out[1:]:
        assert r["within_budget"] and r["achieved_bits"] <= r["budget_bits"] + 1e-9
        assert r["predicted_score"] == pytest.approx(rc.score_of(manifest, r["selection"]))
        assert r["source"] == "manifest (exact min-score MILP)"
    assert rc.budget_slug(9.0) == "eb9" and rc.budget_slug(8.25) == "eb8.25"
    payload = json.loads((tmp_path / "recipes.json").read_text())
    assert [r["budget_bits"] for r in payload["recipes"]] == budgets and "quant_cfg" not in payload["recipes"][0]
    cfg = json.loads((tmp_path / "eb8.5" / "modelopt_quant_cfg.json").read_text())
    assert set(cfg) == {"quant_cfg", "algorithm"}
    import yaml

    parsed = yaml.safe_load((tmp_path / "eb8.5" / "ignore.yaml").read_text())
    assert parsed["ignore"] == out[2]["ignore"]
    assert "INFEASIBLE" in (tmp_path / "recipes.md").read_text()
    check_recipes(payload, manifest, (tmp_path / "recipes.md").read_text())
    # nested recipes ship beside the optimal ones: their own quant_cfg and ignore list per budget
    assert [n["files"]["ignore"] for n in payload["nested"]] == nested_ignores
    nested_yaml = (tmp_path / "eb8.5" / "nested" / "ignore.yaml").read_text()
    assert "nested recipe" in nested_yaml and yaml.safe_load(nested_yaml)["ignore"] == payload["nested"][2]["ignore"]
    assert set(json.loads((tmp_path / "eb8.5" / "nested" / "modelopt_quant_cfg.json").read_text())) == {"quant_cfg", "algorithm"}
    with pytest.raises(VlmsensError, match="nested"):
        write_cell_recipes(str(path), None, budgets, summary_json=str(tmp_path / "r2.json"), summary_md=str(tmp_path / "r2.md"),
                           quant_cfgs=cfgs, ignores=ignores, nested_quant_cfgs=nested_cfgs[:2], nested_ignores=nested_ignores[:2],
                           progress=lambda _: None)
    frame = recipe_summary.recipes_frame([tmp_path / "recipes.json"])
    assert len(frame) == 5 and frame["feasible"].sum() == 4
    assert list(frame["achieved_bits"]) == [r["achieved_bits"] for r in out]
    assert list(frame["groups_bf16"]) == [r["groups_bf16"] for r in out]
    assert list(frame["milp_agrees"]) == [r["cross_check"]["agrees"] for r in out]


def test_layer_and_summary_frames_carry_the_manifests_numbers():
    groups = [
        _group("a", ["a"], "text", {"bf16": 100.0, "int8": 50.0}, {"int8": 3e-4}, "bf16"),
        _group("b", ["b"], "vision", {"bf16": 300.0, "int8": 150.0}, {"int8": 1e-4}, "int8"),
        _group("c", ["c"], "head", {"bf16": 200.0, "int8": 100.0}, {"int8": 2e-4}, "int8"),
    ]
    manifest = _manifest(groups)
    manifest.update(batches={"samples": 8, "loss_tokens": 100}, timings_s={"load": 1.0, "score": 2.5}, device={"name": "cpu"})
    manifest["search"]["is_satisfied"] = True
    layers = frames.layers_frame([manifest])
    assert list(layers["layer"]) == ["a", "c", "b"]  # most sensitive (per caption token) first
    assert list(layers["rank"]) == [1, 2, 3]
    assert list(layers["sensitivity"]) == pytest.approx([3e-6, 2e-6, 1e-6])
    assert list(layers["sensitivity_raw"]) == [3e-4, 2e-4, 1e-4]
    assert list(layers["num_bits"]) == [16.0, 8.0, 8.0]
    assert list(layers["kept_bf16"]) == [True, False, False]
    assert list(layers["uncompressed_cost"]) == [100.0, 200.0, 300.0]
    assert list(layers["tower"]) == ["text", "head", "vision"]
    assert set(layers["model"]) == {"m"} and set(layers["format"]) == {"int8"}
    summary = report_page.summary_frame([manifest])
    assert len(summary) == 1
    row = summary.iloc[0]
    assert row["bits_achieved"] == round(16 * (100 + 100 + 150) / 600, 4)
    assert (row["samples"], row["caption_tokens"], row["groups_searched"], row["groups_kept_bf16"]) == (8, 100, 3, 1)
    assert row["top_layer"] == "a" and row["wall_s"] == 3.5 and row["search_s"] == 3.5 and row["satisfied"]
    # The job's wall from its process start, where the manifest has it, includes start-up.
    manifest["provenance"] = {"wall_time_s": 4.0, "job_wall_s": 9.25}
    assert report_page.summary_frame([manifest]).iloc[0][["wall_s", "search_s"]].tolist() == [9.25, 3.5]


# =============================================================================================
# The ModelOpt path: a real search state of a toy model


@pytest.fixture(scope="module")
def toy_search():
    torch = pytest.importorskip("torch")
    mtq = pytest.importorskip("modelopt.torch.quantization")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    with torch.no_grad():
        model[2].weight[:, 3] *= 50  # make one layer fragile
    data = [torch.randn(8, 16) for _ in range(2)]
    model, state = mtq.auto_quantize(
        model, constraints={"effective_bits": 11.0}, quantization_formats=[mtq.INT8_DEFAULT_CFG], data_loader=data,
        forward_step=lambda m, b: m(b), loss_func=lambda out, b: out.float().pow(2).sum(), num_calib_steps=2,
        num_score_steps=2, verbose=False,
    )
    groups = []
    for name, stat in state["candidate_stats"].items():
        names = ["int8" if r.num_bits < 16 else "bf16" for r in stat["formats"]]
        scores = dict(zip(names, (float(s) for s in stat["scores"]), strict=False))
        costs = dict(zip(names, (float(c) for c in stat["costs"]), strict=False))
        best = "bf16" if state["best"]["recipe"][name].num_bits >= 16 else "int8"
        groups.append({"layer": name.removesuffix(".quant_recipe"), "modules": list(stat["module_names"]), "tower": "text",
                       "block": None, "sublayer": "x", "scores_raw": {"int8": scores["int8"]},
                       "scores_per_token": {"int8": scores["int8"] / 16}, "scores_modelopt_clipped": {"int8": scores["int8"]},
                       "costs": costs, "uncompressed_cost": float(stat["uncompressed_cost"]), "cost_weight": 1.0, "selected_format": best})
    manifest = _manifest(groups, bits_achieved=float(state["best"]["constraints"]["effective_bits"]))
    return model, state, manifest


def test_modelopt_recipe_agrees_with_the_milp_and_applies(toy_search):
    import copy

    import modelopt.torch.quantization as mtq
    import torch

    _, state, manifest = toy_search
    assert rc.cost_model(manifest).consistent
    for budget in (8.25, 9.0, 10.0, 12.0):
        recipe = rc.make_recipe(manifest, budget, state)
        assert recipe["source"].startswith("modelopt"), recipe["notes"]
        assert recipe["feasible"] and recipe["achieved_bits"] <= budget + 1e-9
        assert recipe["cross_check"]["agrees"], recipe["cross_check"]
        # The JSON config, applied to a fresh copy, quantizes exactly the selected groups.
        fresh = torch.nn.Sequential(*[copy.deepcopy(m) for m in (torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64),
                                                                 torch.nn.ReLU(), torch.nn.Linear(64, 32), torch.nn.ReLU(),
                                                                 torch.nn.Linear(32, 8))])
        cfg = json.loads(json.dumps(recipe["quant_cfg"]))
        fresh = mtq.quantize(fresh, cfg, forward_loop=lambda m: m(torch.randn(4, 16)))
        enabled = {name.removesuffix(".weight_quantizer"): q.is_enabled for name, q in fresh.named_modules() if name.endswith("weight_quantizer")}
        for g in manifest["groups"]:
            for module in g["modules"]:
                assert enabled[module] == (recipe["selection"][g["layer"]] != "bf16"), (budget, module)


# =============================================================================================
# The registry of analyses: one name across module, rule and caption


def test_every_analysis_is_its_own_module_with_a_caption_of_its_name():
    from pathlib import Path

    from vlmsens.reports.registry import analyses

    registry = analyses()
    assert {"report", "sensitivity_plot", "heatmap", "validation_report"} <= set(registry)
    captions = {p.stem for p in (Path(__file__).resolve().parents[1] / "docs" / "report").glob("*.rst")}
    # workflow.rst is the report's front page; recipes.rst and export.rst caption rules recipes and export (per cell).
    assert captions - {"workflow", "recipes", "export"} == set(registry)
    for name, analysis in registry.items():
        assert analysis.write.__module__ == f"vlmsens.reports.{name}"
        keys = [o.key for o in analysis.outputs]
        assert len(keys) == len(set(keys)) and any(o.item for o in analysis.outputs), name
        wildcards = {"global": set(), "model": {"model"}, "cell": {"model", "format", "scope", "size"}}[analysis.level]
        for out in analysis.outputs:
            assert set(re.findall(r"{(\w+)}", out.path)) == wildcards, f"{name}: {out.path}"


def test_report_order_numbers_categories_and_sections_for_the_report_to_sort():
    from vlmsens.reports.registry import category_labels, subcategory_labels

    labels = category_labels(["m_b", "m_a"], {"Summary", "{model}", "Model families", "Extra"})
    assert labels == {"Summary": "1 Summary", "m_b": "2 m_b", "m_a": "3 m_a", "Model families": "4 Model families",
                      "Extra": "5 Extra"}
    # The report sorts by name: the numbers must give the intended order, also past nine.
    many = category_labels([f"model{i}" for i in range(12)], {"Summary", "{model}"})
    assert sorted(many.values()) == list(many.values()) and many["Summary"] == "01 Summary"
    sections = subcategory_labels(["(b) Format comparison (FP8 vs INT8)", "Per-group sensitivity", "Zeta", "Layers per cell"])
    assert sections == {"Per-group sensitivity": "1 Per-group sensitivity", "Layers per cell": "2 Layers per cell",
                        "(b) Format comparison (FP8 vs INT8)": "3 Format comparison (FP8 vs INT8)", "Zeta": "4 Zeta"}
