"""Deployable recipes: re-solve a cell's per-layer format choice for other effective-bits budgets.

AutoQuantize scores every group once; the choice of format per group for a bit budget is a
small knapsack over those stored scores. For each configured budget this module

* asks ModelOpt for the recipe (``mtq.get_auto_quantize_config(search_state, {"effective_bits": b})``
  on the cell's ``autoquant_state.pt``; no model, data or GPU involved),
* solves the same problem from the manifest alone with the cell's own rule, which gives the
  predicted score and achieved bits and cross-checks ModelOpt's solver: for ``gradient`` cells the
  exact minimum-score knapsack (a 0/1 MILP with scipy's HiGHS), for ``kl_div`` cells ModelOpt's
  threshold rule replayed (each group's most compressed choice whose score is under a bisected
  threshold: not a minimum sum, so a kl_div recipe is not "optimal" in the knapsack sense),
* writes a ModelOpt ``quant_cfg`` JSON (ready for ``mtq.quantize``) that keeps the chosen groups
  in BF16, and an ``ignore:`` list of module names for llm-compressor / vLLM users.

Units. ``predicted_score`` is ModelOpt's objective (sum over groups of the selected format's
score, after ModelOpt's monotone clipping; BF16 scores 0), comparable with the manifest's
``search.score``. ``predicted_score_per_token`` sums the raw per-caption-token scores of the
report tables. ``achieved_bits`` = 16 × (selected cost + fixed cost) / (uncompressed cost +
fixed cost), as ModelOpt computes effective bits (groups outside the budget cost 0).
"""

from __future__ import annotations

import copy
import fnmatch
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .autoquant import NO_QUANT, load_search_state

log = logging.getLogger(__name__)

# Relative slack on the budget: ModelOpt's own feasibility check uses 1e-12 of the total cost.
BUDGET_RTOL = 1e-9
# Two solvers agree when their selections are equal or their objectives are this close (relative):
# CBC (ModelOpt) and HiGHS (here) stop at slightly different optima on scores of 1e-10.
SCORE_RTOL = 1e-4


def budget_slug(budget: float) -> str:
    """Path segment of a budget: 8.25 -> 'eb8.25', 9.0 -> 'eb9'."""
    return f"eb{float(budget):g}"


# --------------------------------------------------------------------------------------------
# The problem, from the manifest


@dataclass(frozen=True)
class CostModel:
    """Effective bits = 16 × (selected + fixed) / (denominator + fixed)."""

    denominator: float  # sum of the searched groups' uncompressed (BF16) costs
    fixed_cost: float  # cost of groups outside the search that still count in the budget
    consistent: bool  # the manifest's own selection reproduces its recorded effective bits
    note: str = ""

    def bits(self, selected_cost: float) -> float:
        total = self.denominator + self.fixed_cost
        return 16.0 * (selected_cost + self.fixed_cost) / total if total > 0 else math.nan

    def max_selected_cost(self, budget_bits: float) -> float:
        return budget_bits / 16.0 * (self.denominator + self.fixed_cost) - self.fixed_cost


def choices_of(group: dict[str, Any]) -> list[str]:
    """The formats the solver may pick for a group, BF16 last (as in ModelOpt's candidate list)."""
    names = [name for name in group["costs"] if name != NO_QUANT]
    return names + ([NO_QUANT] if NO_QUANT in group["costs"] else [])


def choice_score(group: dict[str, Any], choice: str, kind: str = "clipped") -> float:
    """Score of one choice: ModelOpt's clipped score ('clipped') or per caption token ('per_token')."""
    if choice == NO_QUANT:
        return 0.0
    table = group["scores_modelopt_clipped"] if kind == "clipped" else group["scores_per_token"]
    if choice in table:
        return float(table[choice])
    return float(group["scores_raw"][choice]) if kind == "clipped" else math.nan


def cost_model(manifest: dict[str, Any]) -> CostModel:
    """The effective-bits denominator, checked against the bits the search recorded.

    In vlmsens cells every group outside the search is also outside the budget (cost 0), so the
    denominator is the searched groups' BF16 cost. Should a cell record a selection whose bits
    only add up with a fixed extra cost (layers disabled but still counted at 16 bits), that
    cost is inferred from the recorded bits so that re-solved budgets stay comparable.
    """
    groups = manifest["groups"]
    denominator = float(sum(g["uncompressed_cost"] for g in groups))
    selected = float(sum(g["costs"][g["selected_format"]] for g in groups))
    recorded = float(manifest.get("search", {}).get("effective_bits_achieved", math.nan))
    if denominator <= 0:
        return CostModel(denominator, 0.0, False, "no searched group carries a cost")
    own = 16.0 * selected / denominator
    if math.isnan(recorded) or abs(own - recorded) <= 1e-6 * max(1.0, recorded):
        return CostModel(denominator, 0.0, not math.isnan(recorded))
    # recorded = 16 (S + F) / (D + F)  =>  F = (r D / 16 - S) / (1 - r / 16)
    if recorded < 16.0:
        fixed = (recorded * denominator / 16.0 - selected) / (1.0 - recorded / 16.0)
        if fixed >= 0:
            return CostModel(denominator, fixed, True, f"inferred a fixed cost of {fixed:.6g} outside the search")
    return CostModel(
        denominator, 0.0, False,
        f"the manifest's selection gives {own:.4f} bits but the search recorded {recorded:.4f}",
    )


@dataclass
class Solution:
    selection: dict[str, str]  # layer -> chosen format (or 'bf16')
    feasible: bool
    status: str


def bits_of(manifest: dict[str, Any], selection: dict[str, str], model: CostModel | None = None) -> float:
    model = model or cost_model(manifest)
    return model.bits(sum(float(g["costs"][selection[g["layer"]]]) for g in manifest["groups"]))


def score_of(manifest: dict[str, Any], selection: dict[str, str], kind: str = "clipped") -> float:
    return float(sum(choice_score(g, selection[g["layer"]], kind) for g in manifest["groups"]))


def bits_range(manifest: dict[str, Any], model: CostModel | None = None) -> tuple[float, float]:
    """(fewest, most) effective bits any recipe of this cell can reach."""
    model = model or cost_model(manifest)
    groups = manifest["groups"]
    low = sum(min(float(g["costs"][c]) for c in choices_of(g)) for g in groups)
    high = sum(max(float(g["costs"][c]) for c in choices_of(g)) for g in groups)
    return model.bits(low), model.bits(high)


def cheapest_selection(manifest: dict[str, Any]) -> dict[str, str]:
    """The most compressed recipe (lowest cost per group, then lowest score)."""
    return {
        g["layer"]: min(choices_of(g), key=lambda c: (float(g["costs"][c]), choice_score(g, c)))
        for g in manifest["groups"]
    }


def solver_rule(manifest: dict[str, Any]) -> str:
    """How a cell's recipes are chosen from its scores (the rule its ModelOpt searcher uses)."""
    if manifest.get("search", {}).get("method") == "kl_div":
        return "ModelOpt kl_div threshold rule"
    return "exact min-score MILP"


def solve_budget(manifest: dict[str, Any], budget_bits: float, model: CostModel | None = None) -> Solution:
    """The cell's own solver rule re-run for ``budget_bits``: ModelOpt's threshold search for kl_div
    cells (``solve_threshold``), the exact minimum-score knapsack otherwise (``solve_min_score``)."""
    if manifest.get("search", {}).get("method") == "kl_div":
        return solve_threshold(manifest, budget_bits, model)
    return solve_min_score(manifest, budget_bits, model)


def _settled_without_search(manifest: dict[str, Any], budget_bits: float, model: CostModel) -> Solution | None:
    """What either rule answers before it searches: nothing to choose, or a budget below the
    fewest achievable bits (the most compressed recipe, marked infeasible); None otherwise."""
    if not manifest["groups"]:
        return Solution({}, True, "no searched groups")
    low_bits, _ = bits_range(manifest, model)
    if low_bits > budget_bits * (1 + BUDGET_RTOL):
        return Solution(cheapest_selection(manifest), False, f"infeasible: the fewest achievable effective bits are {low_bits:.4f}")
    return None


# ModelOpt's KL-divergence searcher bisects its threshold a fixed number of times.
THRESHOLD_ITERATIONS = 100


def solve_threshold(manifest: dict[str, Any], budget_bits: float, model: CostModel | None = None) -> Solution:
    """ModelOpt's rule for kl_div cells (``AutoQuantizeKLDivSearcher.run_search_with_stats``), from the manifest.

    Not a minimum sum: each group takes the first of its choices (most compressed first, BF16 last)
    whose score is at most a threshold, and the threshold is bisected between the smallest and the
    largest score for a fixed number of steps so that the total cost meets the budget; the
    selection of the last step is the answer, as ModelOpt's. Scores are ModelOpt's (clipped) ones.
    """
    model = model or cost_model(manifest)
    groups = manifest["groups"]
    if (settled := _settled_without_search(manifest, budget_bits, model)) is not None:
        return settled
    choices = [(g, choices_of(g)) for g in groups]
    scores = [choice_score(g, c) for g, options in choices for c in options]
    max_cost = model.max_selected_cost(budget_bits)
    lower, upper = min(scores), max(scores)
    threshold = (lower + upper) / 2.0
    selection: dict[str, str] = {}
    total = 0.0
    for _ in range(THRESHOLD_ITERATIONS):
        selection, total = {}, 0.0
        for group, options in choices:
            picked = next((c for c in options if choice_score(group, c) <= threshold), options[0])
            selection[group["layer"]] = picked
            total += float(group["costs"][picked])
        if total <= max_cost:
            upper = threshold
        else:
            lower = threshold
        threshold = (lower + upper) / 2.0
    satisfied = total <= max_cost * (1 + BUDGET_RTOL)
    return Solution(selection, True, "threshold (ModelOpt kl_div rule)" if satisfied else
                    "threshold (ModelOpt kl_div rule) ends over the budget")


def solve_min_score(manifest: dict[str, Any], budget_bits: float, model: CostModel | None = None) -> Solution:
    """Minimum-score choice per group whose effective bits stay within ``budget_bits`` (exact MILP).

    One binary per (group, choice), one choice per group, cost ≤ budget. Scores and costs are
    rescaled to O(1) so that HiGHS' absolute tolerances do not swallow scores of 1e-10.
    An infeasible budget returns the most compressed recipe with ``feasible=False``.
    """
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import lil_matrix

    model = model or cost_model(manifest)
    groups = manifest["groups"]
    if (settled := _settled_without_search(manifest, budget_bits, model)) is not None:
        return settled
    index = [(gi, choice) for gi, g in enumerate(groups) for choice in choices_of(g)]
    scores = np.array([choice_score(groups[gi], c) for gi, c in index], dtype=float)
    costs = np.array([float(groups[gi]["costs"][c]) for gi, c in index], dtype=float)
    score_scale = float(np.max(np.abs(scores))) or 1.0
    cost_scale = model.denominator or 1.0
    one_hot = lil_matrix((len(groups), len(index)))
    for j, (gi, _) in enumerate(index):
        one_hot[gi, j] = 1.0
    cap = model.max_selected_cost(budget_bits) / cost_scale
    constraints = [
        LinearConstraint(one_hot.tocsr(), lb=1.0, ub=1.0),
        LinearConstraint(costs[None, :] / cost_scale, lb=-np.inf, ub=cap + BUDGET_RTOL),
    ]
    # A tiny cost term breaks ties between equal scores towards fewer bits.
    objective = scores / score_scale + 1e-9 * costs / cost_scale
    result = milp(
        objective,
        constraints=constraints,
        integrality=np.ones(len(index)),
        bounds=Bounds(0, 1),
        options={"mip_rel_gap": 1e-9, "presolve": True},
    )
    if result.x is None:
        return Solution(cheapest_selection(manifest), False, f"MILP failed: {result.message}")
    selection = {}
    for j, (gi, choice) in enumerate(index):
        if result.x[j] > 0.5:
            selection[groups[gi]["layer"]] = choice
    return Solution(selection, True, "optimal")


# --------------------------------------------------------------------------------------------
# ModelOpt's side


def _normal(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_normal(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _normal(v) for k, v in sorted(value.items())}
    return value


def _format_weight_cfg(manifest: dict[str, Any], fmt: str) -> dict[str, Any] | None:
    entries = manifest["formats"].get(fmt, {}).get("modelopt_config", {}).get("quant_cfg", [])
    found = None
    for entry in entries:
        if isinstance(entry, dict) and entry.get("quantizer_name") == "*weight_quantizer":
            found = entry.get("cfg")
    return found


def _cfg_matches(entry_cfg: Any, format_cfg: Any) -> bool:
    """Whether a replayed per-module cfg comes from this format (num_bits and block sizes agree)."""
    if format_cfg is None or entry_cfg is None:
        return False
    a = entry_cfg if isinstance(entry_cfg, list) else [entry_cfg]
    b = format_cfg if isinstance(format_cfg, list) else [format_cfg]
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=False):
        if not isinstance(x, dict) or not isinstance(y, dict):
            return False
        for key in ("num_bits", "block_sizes"):
            if _normal(x.get(key)) != _normal(y.get(key)):
                return False
    return True


def selection_from_quant_cfg(manifest: dict[str, Any], quant_cfg: dict[str, Any], fallback: dict[str, str] | None = None) -> dict[str, str]:
    """Which format a ModelOpt-built quant_cfg gives each group (read from its per-module entries)."""
    enabled: dict[str, Any] = {}
    for entry in quant_cfg.get("quant_cfg", []):
        name = entry.get("quantizer_name", "")
        if name.endswith(".weight_quantizer"):
            enabled[name.removesuffix(".weight_quantizer")] = entry.get("cfg") if entry.get("enable", True) else None
    selection = {}
    for g in manifest["groups"]:
        cfgs = [enabled.get(m) for m in g["modules"]]
        if not any(c is not None for c in cfgs):
            selection[g["layer"]] = NO_QUANT
            continue
        quantized = [c for c in choices_of(g) if c != NO_QUANT]
        if len(quantized) == 1:
            selection[g["layer"]] = quantized[0]
            continue
        cfg = next(c for c in cfgs if c is not None)
        matches = [f for f in quantized if _cfg_matches(cfg, _format_weight_cfg(manifest, f))]
        if len(matches) == 1:
            selection[g["layer"]] = matches[0]
        elif fallback is not None and fallback.get(g["layer"]) in (matches or quantized):
            selection[g["layer"]] = fallback[g["layer"]]
        else:
            selection[g["layer"]] = (matches or quantized)[0]
    return selection


def modelopt_quant_cfg(search_state: dict[str, Any], budget_bits: float) -> dict[str, Any]:
    """ModelOpt's own re-solve: ``mtq.get_auto_quantize_config`` for ``effective_bits``."""
    import warnings

    import modelopt.torch.quantization as mtq

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="get_auto_quantize_config: returned config uses algorithm")
        return mtq.get_auto_quantize_config(search_state, constraints={"effective_bits": float(budget_bits)})


def _json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "model_dump"):
        return _json_ready(value.model_dump(exclude_defaults=True))
    return str(value)


def quant_cfg_from_manifest(manifest: dict[str, Any], selection: dict[str, str], disabled_patterns: list[str] | None = None) -> dict[str, Any]:
    """A quant_cfg built like ModelOpt's get_auto_quantize_config, from the manifest alone.

    Everything off, the cell's disabled patterns off, then for each quantized group every
    module's weight and input quantizer set from its format's ModelOpt config. Used when the
    search state cannot be loaded.
    """
    disabled = manifest["search"].get("disabled_layers", []) if disabled_patterns is None else disabled_patterns
    quant_cfg: list[dict[str, Any]] = [{"quantizer_name": "*", "enable": False}]
    quant_cfg += [{"quantizer_name": p, "enable": False} for p in disabled]
    for g in manifest["groups"]:
        fmt = selection[g["layer"]]
        if fmt == NO_QUANT:
            continue
        entries = manifest["formats"][fmt]["modelopt_config"]["quant_cfg"]
        for module in g["modules"]:
            for attr in ("input_quantizer", "weight_quantizer", "output_quantizer"):
                matched = None
                for entry in entries:
                    pattern = entry.get("quantizer_name", "")
                    if entry.get("parent_class"):
                        continue
                    if pattern != "*" and (fnmatch.fnmatch(attr, pattern) or pattern.endswith(attr)):
                        matched = entry
                if matched is None:
                    continue
                out = {"quantizer_name": f"{module}.{attr}", "enable": bool(matched.get("enable", True))}
                if matched.get("cfg") is not None:
                    out["cfg"] = copy.deepcopy(matched["cfg"])
                quant_cfg.append(out)
    return {"quant_cfg": quant_cfg, "algorithm": "max"}


def with_bf16_guards(quant_cfg: dict[str, Any], manifest: dict[str, Any], selection: dict[str, str]) -> dict[str, Any]:
    """Append explicit ``<module>.*`` disables for the groups kept in BF16 (last match wins).

    ModelOpt's config already leaves them off (its first entry disables everything); the
    explicit entries keep them off when the config is merged with another one, and make the
    kept layers readable in the JSON.
    """
    out = copy.deepcopy(quant_cfg)
    out["quant_cfg"] = list(out.get("quant_cfg", []))
    for g in manifest["groups"]:
        if selection[g["layer"]] == NO_QUANT:
            out["quant_cfg"] += [{"quantizer_name": f"{m}.*", "enable": False} for m in g["modules"]]
    return out


def _algorithm(manifest: dict[str, Any], selection: dict[str, str]) -> str | dict | None:
    algos = {
        json.dumps(manifest["formats"][f]["modelopt_config"].get("algorithm", "max"), sort_keys=True)
        for f in set(selection.values()) if f != NO_QUANT and f in manifest["formats"]
    }
    return json.loads(algos.pop()) if len(algos) == 1 else None


# --------------------------------------------------------------------------------------------
# Ignore lists (llm-compressor / vLLM)


def glob_to_regex(pattern: str) -> str:
    """fnmatch glob -> llm-compressor 're:' pattern ('*visual*' -> 're:.*visual.*')."""
    out = []
    for ch in pattern:
        if ch == "*":
            out.append(".*")
        elif ch == "?":
            out.append(".")
        else:
            out.append("\\" + ch if ch in ".^$+{}[]()|\\" else ch)
    return "re:" + "".join(out)


def ignore_list(manifest: dict[str, Any], selection: dict[str, str]) -> list[str]:
    """Module names to leave unquantized: the cell's excluded patterns, then every BF16 group's modules.

    Names are Hugging Face (transformers) module paths, as llm-compressor's ``ignore=`` takes
    them; fused groups (q/k/v, gate/up) are listed whole, which vLLM needs for its fused layers.
    """
    out = [glob_to_regex(p) for p in manifest["search"].get("disabled_layers", [])]
    for g in manifest["groups"]:
        if selection[g["layer"]] == NO_QUANT:
            out += [m for m in g["modules"] if m not in out]
    return out


def ignore_yaml(recipe: dict[str, Any]) -> str:
    cell = recipe["cell"]
    lines = [
        f"# vlmsens recipe: {cell['model']} / {cell['format']} / {cell['scope']} / {cell['size']}"
        f" at <= {recipe['budget_bits']:g} effective bits",
    ]
    if recipe.get("kind") == "nested":
        lines.append("# nested recipe (greedy by score per cost): every larger budget's nested recipe keeps these groups in BF16 too")
    if recipe["feasible"]:
        lines.append(
            f"# achieved {recipe['achieved_bits']:.4f} bits; predicted score {recipe['predicted_score_per_token']:.4e} per caption token;"
            f" {recipe['groups_bf16']} of {recipe['groups']} groups kept in BF16"
        )
    else:
        lines.append(f"# INFEASIBLE: {recipe['status']}. This is the most compressed recipe ({recipe['achieved_bits']:.4f} bits).")
    lines += [
        "# Paste into llm-compressor (QuantizationModifier(..., ignore=[...])) or a compressed-tensors config.",
        "# Hugging Face module names; 're:' entries are regular expressions. Fused q/k/v and gate/up are listed whole.",
    ]
    if recipe["lm_head_quantized"]:
        lines.append("# lm_head is quantized here; add \"lm_head\" if your runtime keeps the (tied) lm_head in BF16.")
    lines.append("ignore:" if recipe["ignore"] else "ignore: []")
    lines += [f"  - {json.dumps(name)}" for name in recipe["ignore"]]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# One cell, all budgets


def make_recipe(
    manifest: dict[str, Any],
    budget_bits: float,
    search_state: dict[str, Any] | None = None,
    *,
    state_error: str | None = None,
) -> dict[str, Any]:
    """The recipe of one cell for one budget, with its ModelOpt quant_cfg and its checks."""
    model = cost_model(manifest)
    milp = solve_budget(manifest, budget_bits, model)
    rule = solver_rule(manifest)
    low_bits, high_bits = bits_range(manifest, model)
    source, notes, quant_cfg = f"manifest ({rule})", [], None
    selection = milp.selection
    if milp.feasible and search_state is not None:
        try:
            quant_cfg = _json_ready(modelopt_quant_cfg(search_state, budget_bits))
            mo_selection = selection_from_quant_cfg(manifest, quant_cfg, fallback=milp.selection)
            mo_bits = bits_of(manifest, mo_selection, model)
            if mo_bits <= budget_bits * (1 + BUDGET_RTOL):
                selection, source = mo_selection, "modelopt get_auto_quantize_config"
            else:
                notes.append(f"ModelOpt's re-solve reaches {mo_bits:.4f} bits, over the budget; shipping the manifest's ({rule})")
                quant_cfg = None
        except Exception as err:  # noqa: BLE001 - any ModelOpt failure falls back to the manifest path
            notes.append(f"ModelOpt re-solve failed ({type(err).__name__}: {err}); recipe built from the manifest")
            quant_cfg = None
    elif search_state is None and state_error:
        notes.append(f"search state not used ({state_error}); recipe built from the manifest")
    if not milp.feasible:
        notes.append(milp.status + "; shipping the most compressed recipe")
    if quant_cfg is None:
        quant_cfg = quant_cfg_from_manifest(manifest, selection)
    algorithm = _algorithm(manifest, selection)
    if algorithm is not None:
        quant_cfg["algorithm"] = algorithm
    quant_cfg = with_bf16_guards(quant_cfg, manifest, selection)

    score = score_of(manifest, selection)
    milp_score = score_of(manifest, milp.selection)
    gap = (score - milp_score) / milp_score if milp_score else (0.0 if score == milp_score else math.inf)
    achieved = bits_of(manifest, selection, model)
    kept = [g["layer"] for g in manifest["groups"] if selection[g["layer"]] == NO_QUANT]
    cell = {k: manifest["cell"][k] for k in ("model", "family", "format", "scope", "size")}
    by_format: dict[str, int] = {}
    for fmt in selection.values():
        by_format[fmt] = by_format.get(fmt, 0) + 1
    recipe = {
        "cell": cell,
        "budget_bits": float(budget_bits),
        "feasible": bool(milp.feasible),
        "within_budget": bool(achieved <= budget_bits * (1 + BUDGET_RTOL)),
        "status": milp.status,
        "achieved_bits": achieved,
        "bits_range": [low_bits, high_bits],
        "predicted_score": score,
        "predicted_score_per_token": score_of(manifest, selection, "per_token"),
        "groups": len(manifest["groups"]),
        "groups_bf16": len(kept),
        "groups_by_format": dict(sorted(by_format.items())),
        "kept_bf16": kept,
        "lm_head_quantized": any(g["tower"] == "head" and selection[g["layer"]] != NO_QUANT for g in manifest["groups"]),
        "selection": {g["layer"]: selection[g["layer"]] for g in manifest["groups"]},
        "source": source,
        "cross_check": {
            "rule": rule,
            "milp_predicted_score": milp_score,
            "milp_achieved_bits": bits_of(manifest, milp.selection, model),
            "same_selection": selection == milp.selection,
            "score_gap_rel": gap,
            "agrees": selection == milp.selection or abs(gap) <= SCORE_RTOL,
            "cost_model": {"denominator": model.denominator, "fixed_cost": model.fixed_cost, "consistent": model.consistent, "note": model.note},
        },
        "notes": notes,
        "ignore": ignore_list(manifest, selection),
        "quant_cfg": quant_cfg,
    }
    return recipe


def cell_recipes(
    manifest: dict[str, Any],
    budgets: list[float],
    state_path: str | Path | None = None,
    progress: Callable[[str], None] = log.info,
) -> list[dict[str, Any]]:
    state, state_error = None, None
    if state_path is not None:
        try:
            state = load_search_state(state_path)
        except Exception as err:  # noqa: BLE001
            state_error = f"{type(err).__name__}: {err}"
            progress(f"could not load {state_path}: {state_error}")
    recipes = []
    for budget in budgets:
        recipe = make_recipe(manifest, budget, state, state_error=state_error)
        progress(
            f"budget {budget:g}: {'ok' if recipe['feasible'] else 'INFEASIBLE'}, {recipe['achieved_bits']:.4f} bits, "
            f"{recipe['groups_bf16']}/{recipe['groups']} groups BF16, score/token {recipe['predicted_score_per_token']:.4e}, "
            f"{recipe['source']}, MILP cross-check: {agreement_text(recipe['cross_check'])}"
        )
        recipes.append(recipe)
    return recipes


def agreement_text(check: dict[str, Any]) -> str:
    if check["same_selection"]:
        return "yes"
    if check["agrees"]:
        return f"yes (other layers, equal score within {SCORE_RTOL:g}: gap {check['score_gap_rel']:+.1e})"
    gap = check["score_gap_rel"]
    if check.get("rule") == "ModelOpt kl_div threshold rule":
        return f"no: ModelOpt's pick differs from its threshold rule replayed on the manifest (score {gap:+.3%})"
    if gap > 0:
        return f"no: ModelOpt's pick scores {gap:+.3%} above the exact optimum"
    return f"no: the MILP's pick scores {-gap:+.3%} above ModelOpt's"


# --------------------------------------------------------------------------------------------
# Nested recipes: greedy by score per cost
#
# The optimal recipe of each budget is its own knapsack: a group kept in BF16 at 8.25 bits may be
# quantized at 8.5 bits (the bits go to two cheaper groups instead). A nested recipe spends bits in
# one fixed order, the move that removes the most score per unit of cost first, so that a larger
# budget only ever raises groups' precision: one ladder of recipes, each containing the one below.


def _step_cost(group: dict[str, Any], choice: str) -> float:
    return float(group["costs"][choice])


def greedy_upgrades(manifest: dict[str, Any]) -> list[tuple[str, str]]:
    """The order a nested recipe spends bits in: ``(layer, choice)`` moves from the most compressed recipe.

    Each move switches one group to a costlier choice with a lower (clipped) score, the one with
    the largest score removed per unit of cost first (ties: the cheaper move, then the layer name).
    Moves that remove no score are never made.
    """
    current = cheapest_selection(manifest)
    groups = manifest["groups"]
    moves: list[tuple[str, str]] = []
    while True:
        best = None
        for g in groups:
            now = current[g["layer"]]
            cost_now, score_now = _step_cost(g, now), choice_score(g, now)
            for choice in choices_of(g):
                extra_cost = _step_cost(g, choice) - cost_now
                gain = score_now - choice_score(g, choice)
                if extra_cost <= 0 or gain <= 0:
                    continue
                key = (-gain / extra_cost, extra_cost, g["layer"], choice)
                if best is None or key < best:
                    best = key
        if best is None:
            return moves
        _, _, layer, choice = best
        current[layer] = choice
        moves.append((layer, choice))


def nested_selection(
    manifest: dict[str, Any], budget_bits: float, moves: list[tuple[str, str]] | None = None, model: CostModel | None = None,
) -> Solution:
    """The longest prefix of :func:`greedy_upgrades` that stays within ``budget_bits``.

    A prefix, not a fill: skipping a move that does not fit to take a later one would break the
    nesting (a larger budget takes the skipped move and may then lack room for the later one).
    """
    model = model or cost_model(manifest)
    moves = greedy_upgrades(manifest) if moves is None else moves
    selection = cheapest_selection(manifest)
    low_bits = bits_of(manifest, selection, model)
    if low_bits > budget_bits * (1 + BUDGET_RTOL):
        return Solution(selection, False, f"infeasible: the fewest achievable effective bits are {low_bits:.4f}")
    for layer, choice in moves:
        trial = {**selection, layer: choice}
        if bits_of(manifest, trial, model) > budget_bits * (1 + BUDGET_RTOL):
            break
        selection = trial
    return Solution(selection, True, "greedy prefix")


def nested_recipes(manifest: dict[str, Any], budgets: list[float]) -> list[dict[str, Any]]:
    """The nested recipe of every budget (lowest budget first), with the fields of :func:`make_recipe`
    that describe a selection, its ModelOpt quant_cfg built from the manifest, and its ignore list."""
    model = cost_model(manifest)
    moves = greedy_upgrades(manifest)
    cell = {k: manifest["cell"][k] for k in ("model", "family", "format", "scope", "size")}
    out = []
    for budget in sorted(float(b) for b in budgets):
        solution = nested_selection(manifest, budget, moves, model)
        selection = solution.selection
        kept = [g["layer"] for g in manifest["groups"] if selection[g["layer"]] == NO_QUANT]
        quant_cfg = with_bf16_guards(quant_cfg_from_manifest(manifest, selection), manifest, selection)
        algorithm = _algorithm(manifest, selection)
        if algorithm is not None:
            quant_cfg["algorithm"] = algorithm
        out.append({
            "kind": "nested",
            "cell": cell,
            "budget_bits": budget,
            "feasible": solution.feasible,
            "status": solution.status,
            "achieved_bits": bits_of(manifest, selection, model),
            "predicted_score": score_of(manifest, selection),
            "predicted_score_per_token": score_of(manifest, selection, "per_token"),
            "groups": len(manifest["groups"]),
            "groups_bf16": len(kept),
            "kept_bf16": kept,
            "lm_head_quantized": any(g["tower"] == "head" and selection[g["layer"]] != NO_QUANT for g in manifest["groups"]),
            "selection": {g["layer"]: selection[g["layer"]] for g in manifest["groups"]},
            "ignore": ignore_list(manifest, selection),
            "quant_cfg": quant_cfg,
        })
    return out


def is_nested(selections: list[dict[str, str]], manifest: dict[str, Any]) -> bool:
    """Whether each selection (lowest budget first) gives every group a cost at least its cost in the one before."""
    groups = manifest["groups"]
    return all(
        _step_cost(g, later[g["layer"]]) >= _step_cost(g, earlier[g["layer"]])
        for earlier, later in zip(selections, selections[1:], strict=False) for g in groups
    )


def score_per_cost(group: dict[str, Any], fmt: str) -> float:
    """Score removed per unit of cost saved by keeping ``group`` in BF16 instead of ``fmt``: what the
    solver weighs, where a ranking weighs the score alone."""
    saved = float(group["costs"].get(NO_QUANT, group["uncompressed_cost"])) - float(group["costs"][fmt])
    return choice_score(group, fmt) / saved if saved > 0 else math.inf
