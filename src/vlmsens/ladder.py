"""Measured damage against effective bits: what each budget's recipe really costs in quality.

Rule ``recipes`` re-solves a cell for other budgets from its stored scores; the scores predict the
damage, nobody measures it. A ladder takes a range of budgets above the cell's fewest achievable
bits (``ship_this.ladder.bits_above_uniform``) and, for each rung, applies to the cell's calibrated
search model

* the **optimal** recipe (the exact MILP of :mod:`vlmsens.recipes`, as rule ``recipes`` ships it),
* the **nested** recipe (greedy by score per cost: each rung keeps the BF16 groups of the one below),
* **random** recipes of the same bits as the optimal one (seeded draws),

and measures, on the held-out evaluation subset, the KL divergence from the BF16 model and the
caption-loss change per caption token, with uniform quantization (the lowest rung's bits) and BF16
(no damage) on the same axes. It reuses the measuring machinery of :mod:`vlmsens.validation`: the
cell's search model with the cell's own calibration, one ``RecipeSwitch`` over its groups, one
``Evaluator`` against the BF16 reference on the same tokens for every point.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from .autoquant import NO_QUANT, CellSpec, PhaseClock
from .batches import batch_stats
from .config import LadderSettings
from .errors import VlmsensError
from .recipes import bits_of, bits_range, cost_model, greedy_upgrades, is_nested, nested_selection, score_of, solve_budget
from .validation import (
    HeldOutModel,
    random_recipe_same_budget,
    ranking_format,
    uniform_selection,
    without_per_sample,
)

log = logging.getLogger(__name__)

MEASURES = ("kl", "loss_increase")


def ladder_budgets(manifest: dict[str, Any], bits_above_uniform: tuple[float, ...] | list[float]) -> list[float]:
    """The rungs: the cell's fewest achievable bits plus each offset, up to its most bits (ascending)."""
    low, high = bits_range(manifest)
    return sorted({round(low + float(b), 6) for b in bits_above_uniform if low + float(b) <= high + 1e-9})


def describe(manifest: dict[str, Any], selection: dict[str, str]) -> dict[str, Any]:
    """What a measured point is, before measuring: its bits, BF16 groups and predicted score."""
    return {
        "bits": bits_of(manifest, selection),
        "groups_bf16": sum(v == NO_QUANT for v in selection.values()),
        "predicted_score_per_token": score_of(manifest, selection, "per_token"),
    }


def ladder_plan(manifest: dict[str, Any], settings: LadderSettings, rng) -> dict[str, Any]:
    """Every selection a ladder measures, from the manifest alone (no model): rungs, uniform, BF16."""
    groups = manifest["groups"]
    if not groups:
        raise VlmsensError("the cell has no searched group to build a ladder from")
    fmt = ranking_format(manifest)
    model = cost_model(manifest)
    moves = greedy_upgrades(manifest)
    rungs = []
    for budget in ladder_budgets(manifest, settings.bits_above_uniform):
        optimal = solve_budget(manifest, budget, model).selection
        nested = nested_selection(manifest, budget, moves, model).selection
        same_bits = bits_of(manifest, optimal, model)
        randoms = [random_recipe_same_budget(manifest, fmt, same_bits, rng) for _ in range(settings.random_draws)]
        rungs.append({"budget_bits": budget, "optimal": optimal, "nested": nested, "random": randoms})
    return {
        "ranking_format": fmt,
        "uniform": uniform_selection(groups, fmt),
        "bf16": uniform_selection(groups, fmt, set()),
        "rungs": rungs,
    }


def _mean(points: list[dict[str, Any]]) -> dict[str, float]:
    import numpy as np

    return {m: float(np.mean([p[m] for p in points])) for m in (*MEASURES, "bits")} if points else {}


def run_ladder(
    spec: CellSpec,
    manifest: dict[str, Any],
    search_state: dict[str, Any],
    eval_samples: list[dict],
    settings: LadderSettings,
    *,
    progress: Callable[[str], None] = log.info,
    cell_model=None,
) -> dict[str, Any]:
    """Measure every point of the cell's ladder on the held-out samples; returns the body of ladder.json.

    ``cell_model``: as ``vlmsens.validation.run_validation``'s."""
    import numpy as np

    clock = PhaseClock(progress)
    plan = ladder_plan(manifest, settings, np.random.default_rng(settings.seed))
    held_out = HeldOutModel(spec, manifest, search_state, eval_samples, clock, cell_model)
    reference_loss = held_out.set_reference(plan["bf16"])

    def measure(selection: dict[str, str]) -> dict[str, Any]:
        return {**without_per_sample(held_out.measure(selection)), **describe(manifest, selection)}

    clock.enter("ladder", f"{len(plan['rungs'])} budgets × (optimal, nested, {settings.random_draws} random) + uniform")
    uniform = measure(plan["uniform"])
    rungs = []
    for rung in plan["rungs"]:
        optimal, nested = measure(rung["optimal"]), measure(rung["nested"])
        draws = [measure(selection) for selection in rung["random"]]
        rungs.append({
            "budget_bits": rung["budget_bits"],
            "optimal": {**optimal, "kept_bf16": sorted(k for k, v in rung["optimal"].items() if v == NO_QUANT)},
            "nested": {**nested, "kept_bf16": sorted(k for k, v in rung["nested"].items() if v == NO_QUANT)},
            "random": {
                "draws": draws,
                "mean": _mean(draws),
                "min": {m: min(d[m] for d in draws) for m in MEASURES} if draws else {},
                "max": {m: max(d[m] for d in draws) for m in MEASURES} if draws else {},
            },
        })
        progress(f"ladder: {rung['budget_bits']:g} bits: KL optimal {optimal['kl']:.4g} ({optimal['bits']:.3f} bits), "
                 f"nested {nested['kl']:.4g} ({nested['bits']:.3f}), random mean {_mean(draws).get('kl', float('nan')):.4g}")
    held_out.switch.apply(plan["bf16"])

    low, high = bits_range(manifest)
    return {
        "ranking_format": plan["ranking_format"],
        "n_groups": len(manifest["groups"]),
        "damage_measure": "KL divergence BF16 → quantized, per caption token (nats)",
        "settings": asdict(settings),
        "bits_range": [low, high],
        "eval": {**batch_stats(held_out.eval_batches), "bf16_loss": reference_loss, "tokens": sum(held_out.evaluator.tokens),
                 "configurations_measured": held_out.measured, **held_out.reuse_record()},
        "uniform": uniform,
        "bf16": {"bits": high, "kl": 0.0, "loss_increase": 0.0},
        "rungs": rungs,
        "nested_is_nested": is_nested([r["nested"] for r in plan["rungs"]], manifest),
        **held_out.run_record(),
    }
