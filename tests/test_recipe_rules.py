"""Recipes re-solved with the cell's own solver rule: ModelOpt's threshold rule for kl_div cells.

ModelOpt's KL-divergence searcher does not minimise the sum of scores: it bisects a threshold and
gives each group its most compressed choice scoring under it. The replay on the manifest must pick
what ModelOpt's own searcher picks on the same scores and costs, and may differ from the minimum sum.
"""

from __future__ import annotations

import pytest

from vlmsens.recipes import bits_of, score_of, solve_budget, solve_min_score, solver_rule


def _manifest(method: str, scores: list[float], costs: list[float]) -> dict:
    groups = [{"layer": f"l{i}", "tower": "text", "modules": [f"l{i}"], "scores_raw": {"int8": s},
               "scores_per_token": {"int8": s}, "scores_modelopt_clipped": {"int8": s},
               "costs": {"int8": c / 2, "bf16": c}, "uncompressed_cost": c, "selected_format": "int8"}
              for i, (s, c) in enumerate(zip(scores, costs, strict=True))]
    return {"cell": {"candidates": ["int8"]}, "formats": {"int8": {"bits": 8.0}}, "groups": groups,
            "search": {"method": method, "effective_bits_target": 9.0}}


def _modelopt_pick(manifest: dict, budget: float) -> dict[str, str]:
    from modelopt.torch.quantization.algorithms import AutoQuantizeKLDivSearcher

    searcher = AutoQuantizeKLDivSearcher()
    searcher.candidate_stats = {
        g["layer"]: {"formats": ["int8", "bf16"], "scores": [g["scores_modelopt_clipped"]["int8"], 0.0],
                     "costs": [g["costs"]["int8"], g["costs"]["bf16"]]}
        for g in manifest["groups"]
    }
    total = sum(g["uncompressed_cost"] for g in manifest["groups"])
    best, _ = searcher.run_search_with_stats(total * budget / 16.0)
    return {name: info["format"] for name, info in best.items()}


# One large fragile group and several small ones: the minimum sum keeps the large one in BF16 where
# the budget allows, the threshold rule keeps every group above the threshold, small ones first.
SCORES = [5.0, 4.0, 3.0, 2.5, 0.5, 0.1]
COSTS = [8.0, 1.0, 1.0, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("budget", [8.5, 9.0, 10.0, 12.0])
def test_kl_div_recipes_replay_modelopts_threshold_rule(budget):
    manifest = _manifest("kl_div", SCORES, COSTS)
    assert solver_rule(manifest) == "ModelOpt kl_div threshold rule"
    solution = solve_budget(manifest, budget)
    assert solution.selection == _modelopt_pick(manifest, budget)
    assert bits_of(manifest, solution.selection) <= budget + 1e-9


def test_threshold_rule_is_no_minimum_sum_and_gradient_cells_keep_the_milp():
    kl = _manifest("kl_div", SCORES, COSTS)
    threshold = solve_budget(kl, 10.0).selection
    minimum = solve_min_score(kl, 10.0).selection
    assert threshold != minimum and score_of(kl, threshold) > score_of(kl, minimum)
    gradient = _manifest("gradient", SCORES, COSTS)
    assert solver_rule(gradient) == "exact min-score MILP"
    assert solve_budget(gradient, 10.0).selection == minimum
