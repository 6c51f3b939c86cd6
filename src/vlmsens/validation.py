"""Does a cell's ranking predict real damage? Measured on held-out samples against BF16.

A sensitivity score is a prediction of how much quantizing one group hurts. This module quantizes
sets of groups chosen from the ranking and measures what happens on the held-out evaluation subset
(disjoint from calibration), on caption tokens, against the unquantized (BF16) model:

* **top-k / bottom-k / random-k**: only the k most sensitive groups, only the k least sensitive,
  and k random groups (seeded, several draws); k from ``validation.k`` (fractions of the groups);
* **one-group ablations**: a stratified sample of groups across the ranking, each quantized alone;
  Spearman and Kendall between predicted score and measured damage, with bootstrap intervals;
* **end to end**: the solver's selected recipe at the cell's budget, against uniform quantization
  of every group and against random recipes that meet the same budget.

Damage is the KL divergence from the BF16 model's next-token distribution to the quantized one's,
per caption token (never negative, so ratios mean something); the change of the caption loss is
reported next to it. The quantized model is ModelOpt's own AutoQuantize search model, calibrated
on the cell's samples exactly as the cell was: each group switches between its calibrated formats
and BF16 through ModelOpt's ``QuantRecipeHparam.active``, so one calibration serves every
configuration and candidate sets mix formats per group as deployed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from .autoquant import (
    NO_QUANT,
    CellSpec,
    PhaseClock,
    _device_info,
    _peak_memory,
    caption_logits,
    device_batches,
    inference_batch_size,
    load_cell_model,
    recipes_by_name,
    search,
)
from .batches import batch_stats
from .config import ValidationSettings
from .errors import VlmsensError
from .recipes import bits_of, cost_model
from .vision_reuse import VisionFeatures

log = logging.getLogger(__name__)

DAMAGE = "kl"  # the damage measure of ratios, correlations and the verdict


# --------------------------------------------------------------------------------------------
# What to quantize: pure functions of the manifest


def ranking_format(manifest: dict[str, Any]) -> str:
    """The format whose scores rank the groups: the cell's format, or a candidate set's fewest-bits member."""
    formats = manifest["formats"]
    return min(manifest["cell"]["candidates"], key=lambda name: (float(formats[name]["bits"]), name))


def ranked_groups(manifest: dict[str, Any], fmt: str) -> list[dict[str, Any]]:
    """The searched groups, most sensitive first (raw score of ``fmt``; ties by layer name)."""
    return sorted(manifest["groups"], key=lambda g: (-float(g["scores_raw"][fmt]), g["layer"]))


def k_of(fraction: float, n_groups: int) -> int:
    return max(1, min(n_groups, round(fraction * n_groups)))


def stratified_positions(n_groups: int, n_sample: int) -> list[int]:
    """Evenly spaced rank positions from the most to the least sensitive group (all when few)."""
    import numpy as np

    if n_groups <= n_sample:
        return list(range(n_groups))
    return sorted({int(round(x)) for x in np.linspace(0, n_groups - 1, n_sample)})


def uniform_selection(groups: list[dict[str, Any]], fmt: str, quantized: set[str] | None = None) -> dict[str, str]:
    """``fmt`` for the groups in ``quantized`` (all when None), BF16 for the rest."""
    return {g["layer"]: fmt if quantized is None or g["layer"] in quantized else NO_QUANT for g in groups}


def random_recipe_same_budget(manifest: dict[str, Any], fmt: str, budget_bits: float, rng) -> dict[str, str]:
    """Groups in random order turned to ``fmt`` until the recipe meets ``budget_bits`` (as the solver's must)."""
    model = cost_model(manifest)
    groups = manifest["groups"]
    selection = uniform_selection(groups, fmt, set())
    for index in rng.permutation(len(groups)):
        if bits_of(manifest, selection, model) <= budget_bits + 1e-9:
            break
        selection[groups[int(index)]["layer"]] = fmt
    return selection


def rank_correlations(predicted: list[float], measured: list[float], resamples: int, seed: int) -> dict[str, Any]:
    """Spearman ρ and Kendall τ with percentile bootstrap 95 % intervals (scipy)."""
    import numpy as np
    from scipy import stats

    x, y = np.asarray(predicted, dtype=float), np.asarray(measured, dtype=float)
    out: dict[str, Any] = {"n": len(x)}
    for name, func in (("spearman", stats.spearmanr), ("kendall", stats.kendalltau)):
        value = float(func(x, y).statistic) if len(x) >= 3 else math.nan
        interval = [math.nan, math.nan]
        if len(x) >= 3 and not math.isnan(value) and resamples > 0:
            result = stats.bootstrap(
                (x, y), lambda a, b, f=func: f(a, b).statistic, paired=True, vectorized=False,
                n_resamples=resamples, method="percentile", random_state=np.random.default_rng(seed),
            )
            interval = [float(result.confidence_interval.low), float(result.confidence_interval.high)]
        out[name] = {"value": value, "ci95": interval}
    return out


def ratio(numerator: float, denominator: float) -> float | None:
    """numerator / denominator; None when the denominator is not positive (no finite ratio)."""
    if denominator > 0 and math.isfinite(numerator):
        return numerator / denominator
    return None


def verdict_k(fractions: list[float]) -> float:
    """The k of the verdict line: the middle of the configured list (10 % by default)."""
    ordered = sorted(fractions)
    return ordered[(len(ordered) - 1) // 2]


def verdict_row(result: dict[str, Any]) -> dict[str, Any]:
    """The top-k comparison the verdict line quotes (k = ``verdict_k``)."""
    return next(row for row in result["top_k"] if row["fraction"] == result["verdict_k"])


def verdict(result: dict[str, Any]) -> str:
    rho = result["ablations"]["correlation"][DAMAGE]["spearman"]
    lo, hi = rho["ci95"]
    chosen = verdict_row(result)
    r = chosen["ratio_top_bottom"][DAMAGE]
    ratio_text = f"{r:.3g}×" if r is not None else "undefined (bottom-k damage is 0)"
    interval = f" [{lo:.2f}, {hi:.2f}]" if not (math.isnan(lo) or math.isnan(hi)) else ""
    line = (f"ranking predicts damage: ρ = {rho['value']:.2f}{interval}, top-k/bottom-k damage ratio = {ratio_text} "
            f"(k = {chosen['fraction']:.0%}, {chosen['k']} of {result['n_groups']} groups)")
    if math.isnan(rho["value"]) or not lo > 0:
        line += "; not established: the ρ interval does not exclude 0"
    return line


# --------------------------------------------------------------------------------------------
# Measuring: the search model with its per-group format switch


class RecipeSwitch:
    """Sets every searched group of ModelOpt's AutoQuantize model to a format name or 'bf16'."""

    def __init__(self, model, formats, layers: list[str]):
        from modelopt.torch.opt.utils import named_hparams
        from modelopt.torch.quantization.algorithms import QuantRecipeHparam

        self.recipes = recipes_by_name(formats)
        hparams = {name.removesuffix(".quant_recipe"): hp for name, hp in named_hparams(model, unique=True)
                   if isinstance(hp, QuantRecipeHparam)}
        missing = [layer for layer in layers if layer not in hparams]
        if missing:
            raise VlmsensError(
                f"the manifest names {len(missing)} group(s) the re-built search model lacks (first: {missing[0]}); "
                "the checkpoint or ModelOpt version differs from the cell's: rerun the cell")
        self.hparams = {layer: hparams[layer] for layer in layers}

    def apply(self, selection: dict[str, str]) -> None:
        for layer, hparam in self.hparams.items():
            hparam.active = self.recipes[selection.get(layer, NO_QUANT)]


class Evaluator:
    """Caption-token loss and KL to the BF16 model on the held-out batches.

    While ``vision_bf16`` is set (the caller's promise that the configuration quantizes no vision
    group), the vision tower's output is reused from the first such forward instead of recomputed
    (``vlmsens.vision_reuse``); off by default, so a caller that does not track towers recomputes.
    """

    def __init__(self, model, batches: list[dict]):
        self.model, self.batches = model, batches
        self.reference = None
        self.tokens = 0
        self.vision = VisionFeatures(model)
        self.vision_bf16 = False

    def _forward(self):
        import torch

        with torch.inference_mode():
            for index, batch in enumerate(self.batches):
                inputs = self.vision.inputs(index, batch) if self.vision_bf16 else None
                logits, targets = caption_logits(self.model, batch, inputs)
                yield torch.log_softmax(logits.float(), dim=-1), targets

    def set_reference(self) -> float:
        """Run the current (BF16) model once; later measurements compare against it."""
        import torch

        self.reference, loss, self.tokens = [], 0.0, 0
        for logp, targets in self._forward():
            self.reference.append(logp)
            loss += float(torch.nn.functional.nll_loss(logp, targets, reduction="sum"))
            self.tokens += int(targets.numel())
        if self.tokens == 0:
            raise VlmsensError("the held-out samples hold no caption token to evaluate on")
        self.reference_loss = loss / self.tokens
        return self.reference_loss

    def measure(self) -> dict[str, float]:
        import torch

        loss = kl = 0.0
        for (logp, targets), ref in zip(self._forward(), self.reference, strict=True):
            loss += float(torch.nn.functional.nll_loss(logp, targets, reduction="sum"))
            kl += float(torch.nn.functional.kl_div(logp, ref, log_target=True, reduction="sum"))
        loss /= self.tokens
        return {"loss": loss, "loss_increase": loss - self.reference_loss, "kl": max(kl / self.tokens, 0.0)}


def run_validation(
    spec: CellSpec,
    manifest: dict[str, Any],
    calib_samples: list[dict],
    eval_samples: list[dict],
    settings: ValidationSettings,
    *,
    progress: Callable[[str], None] = log.info,
) -> dict[str, Any]:
    """Measure the cell's ranking on held-out samples; returns the body of validation.json."""
    import numpy as np

    clock = PhaseClock(progress)
    groups = manifest["groups"]
    if not groups:
        raise VlmsensError("the cell has no searched group to validate")
    fmt = ranking_format(manifest)
    ranked = ranked_groups(manifest, fmt)
    layers = [g["layer"] for g in ranked]
    budget = float(manifest["search"]["effective_bits_target"])

    model, calib_batches, device, dtype, plan = load_cell_model(spec, calib_samples, clock)
    eval_batches = device_batches(model, eval_samples, inference_batch_size(plan, len(eval_samples)), device, dtype)
    clock.enter("calibrate", f"{len(calib_samples)} calibration samples, as the cell")
    model, _, _, _ = search(model, spec, calib_batches, clock, num_score_steps=1)
    switch = RecipeSwitch(model, spec.formats, layers)
    evaluator = Evaluator(model, eval_batches)
    vision_layers = {g["layer"] for g in groups if g["tower"] == "vision"}

    clock.enter("reference", f"BF16 on {len(eval_samples)} held-out samples")
    switch.apply({})
    reference_loss = evaluator.set_reference()
    n_measured = 0

    def measure(selection: dict[str, str]) -> dict[str, float]:
        nonlocal n_measured
        switch.apply(selection)
        evaluator.vision_bf16 = all(selection.get(layer, NO_QUANT) == NO_QUANT for layer in vision_layers)
        n_measured += 1
        return evaluator.measure()

    rng = np.random.default_rng(settings.seed)
    clock.enter("top-k", f"k = {settings.k_fractions} of {len(layers)} groups, {settings.random_draws} random draws each")
    top_k = []
    for fraction in settings.k_fractions:
        k = k_of(fraction, len(layers))
        top = measure(uniform_selection(groups, fmt, set(layers[:k])))
        bottom = measure(uniform_selection(groups, fmt, set(layers[-k:])))
        draws = [measure(uniform_selection(groups, fmt, set(rng.choice(layers, size=k, replace=False).tolist())))
                 for _ in range(settings.random_draws)]
        random_mean = {m: float(np.mean([d[m] for d in draws])) for m in ("kl", "loss_increase")} if draws else {}
        top_k.append({
            "fraction": fraction, "k": k, "top": {**top, "groups": layers[:k]}, "bottom": {**bottom, "groups": layers[-k:]},
            "random": {"draws": draws, "mean": random_mean},
            "ratio_top_bottom": {m: ratio(top[m], bottom[m]) for m in ("kl", "loss_increase")},
            "ratio_top_random": {m: ratio(top[m], random_mean.get(m, math.nan)) for m in ("kl", "loss_increase")},
        })
        progress(f"top-k: k = {k}: KL top {top['kl']:.4g}, bottom {bottom['kl']:.4g}, random {random_mean.get('kl', math.nan):.4g}")

    positions = stratified_positions(len(layers), settings.ablation_groups)
    clock.enter("ablations", f"{len(positions)} groups, one at a time")
    rows = []
    for position in positions:
        group = ranked[position]
        measured = measure(uniform_selection(groups, fmt, {group["layer"]}))
        rows.append({"layer": group["layer"], "tower": group["tower"], "rank": position + 1,
                     "predicted_score": float(group["scores_raw"][fmt]),
                     "predicted_score_per_token": float(group["scores_per_token"][fmt]), **measured})
    predicted = [r["predicted_score"] for r in rows]
    correlation = {m: rank_correlations(predicted, [r[m] for r in rows], settings.bootstrap_resamples, settings.seed)
                   for m in ("kl", "loss_increase")}

    clock.enter("end-to-end", f"the solver's recipe at {budget:g} bits, uniform {fmt}, {settings.random_draws} random recipes")
    recipe_selection = {g["layer"]: g["selected_format"] for g in groups}
    recipe = {**measure(recipe_selection), "bits": bits_of(manifest, recipe_selection),
              "quantized_groups": sum(v != NO_QUANT for v in recipe_selection.values())}
    uniform_sel = uniform_selection(groups, fmt)
    uniform = {**measure(uniform_sel), "bits": bits_of(manifest, uniform_sel), "quantized_groups": len(groups)}
    random_recipes = []
    for _ in range(settings.random_draws):
        selection = random_recipe_same_budget(manifest, fmt, recipe["bits"], rng)
        random_recipes.append({**measure(selection), "bits": bits_of(manifest, selection),
                               "quantized_groups": sum(v != NO_QUANT for v in selection.values())})
    switch.apply({})
    beaten = [r for r in random_recipes if r["kl"] > recipe["kl"]]

    peak = _peak_memory(device)
    result = {
        "ranking_format": fmt,
        "n_groups": len(layers),
        "damage_measure": "KL divergence BF16 → quantized, per caption token (nats)",
        "settings": asdict(settings),
        "eval": {**batch_stats(eval_batches), "bf16_loss": reference_loss, "configurations_measured": n_measured},
        "verdict_k": verdict_k(settings.k_fractions),
        "top_k": top_k,
        "ablations": {"rows": rows, "correlation": correlation},
        "end_to_end": {
            "budget_bits": budget,
            "recipe": recipe,
            "uniform": uniform,
            "random_same_budget": {
                "draws": random_recipes,
                "mean": {m: float(np.mean([r[m] for r in random_recipes])) for m in ("kl", "loss_increase")} if random_recipes else {},
                "recipe_beats": len(beaten),
            },
            "recipe_vs_uniform_kl": ratio(recipe["kl"], uniform["kl"]),
        },
        "device": _device_info(device),
        "dtype": str(dtype).removeprefix("torch."),
        "timings_s": clock.stop(),
        "peak_memory": peak,
    }
    result["verdict"] = verdict(result)
    progress(result["verdict"])
    return result
