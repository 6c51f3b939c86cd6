"""Does a cell's ranking predict real damage? Measured on held-out samples against BF16.

A sensitivity score is a prediction of how much quantizing one group hurts. This module quantizes
sets of groups chosen from the ranking and measures what happens on the held-out evaluation subset
(disjoint from calibration), on caption tokens, against the unquantized (BF16) model:

* **top / bottom / random / largest / smallest at equal weight**: for each fraction of
  ``validation.k`` of the searched weight, the most sensitive groups, the least sensitive, random
  groups (seeded, several draws), and the size-only baseline (the largest and the smallest groups:
  ranking by size alone: the BF16 weight cost), each set filled to the same quantized weight within the smallest
  group's share. Gradient scores grow with a group's size, so sets of equal *count* would partly
  measure size; the size-only sets show whether the ranking beats "quantize the small layers first".
* **one-group ablations**: a stratified sample of groups across the ranking, each quantized alone;
  Spearman and Kendall between predicted score and measured damage, overall and per tower (vision,
  text, head), next to the size-only ρ, and how much more damage a tower does per unit of predicted
  score than the other towers (the score under-predicts a tower whose ratio's interval is above 1);
* **end to end**: the solver's selected recipe at the cell's budget, against uniform quantization
  of every group, random recipes and the size-only recipe built to the same effective bits as the
  solver's within the smallest group's share (only recipes within that tolerance are compared).

Damage is the KL divergence from the BF16 model's next-token distribution to the quantized one's,
per caption token (never negative, so ratios mean something); the change of the caption loss is
reported next to it. Every measurement keeps its per-sample sums, so intervals come from a
bootstrap over the held-out samples (and, for correlations, over the ablated groups within each
tower, and for random baselines over the draws) without measuring anything twice. The quantized
model is ModelOpt's own AutoQuantize search model with the cell's own calibration (restored from
the cell's search state, not recomputed): each group switches between its calibrated formats and BF16 through ModelOpt's
``QuantRecipeHparam.active``, so one calibration serves every configuration and candidate sets mix
formats per group as deployed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
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
    device_memory_budget,
    inference_batch_size,
    job_device,
    load_spec_model,
    recipes_by_name,
    search,
)
from .batches import IGNORE_INDEX, batch_stats
from .config import ValidationSettings
from .errors import VlmsensError
from .families import TOWERS, VISION_PATTERNS
from .formats import ranking_format
from .prefix_reuse import TextPrefixReuse
from .recipes import CostModel, bits_of, cost_model
from .vision_reuse import VisionFeatures

log = logging.getLogger(__name__)

DAMAGE = "kl"  # the damage measure of ratios, correlations and the verdict
MEASURES = ("kl", "loss_increase")
CONFIDENCE = 0.95
__all__ = ["ranking_format"]  # re-exported: validation.json's ranking_format is the report's


# --------------------------------------------------------------------------------------------
# What to quantize: pure functions of the manifest


def ranked_groups(manifest: dict[str, Any], fmt: str) -> list[dict[str, Any]]:
    """The searched groups, most sensitive first (raw score of ``fmt``; ties by layer name)."""
    return sorted(manifest["groups"], key=lambda g: (-float(g["scores_raw"][fmt]), g["layer"]))


def by_size(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The size-only ranking: largest BF16 weight cost (``uncompressed_cost``, the size ``size_cost`` measures) first, ties by layer name."""
    return sorted(manifest["groups"], key=lambda g: (-float(g["uncompressed_cost"]), g["layer"]))


def stratified_positions(n_groups: int, n_sample: int) -> list[int]:
    """Evenly spaced rank positions from the most to the least sensitive group (all when few)."""
    import numpy as np

    if n_groups <= n_sample:
        return list(range(n_groups))
    return sorted({int(round(x)) for x in np.linspace(0, n_groups - 1, n_sample)})


def uniform_selection(groups: list[dict[str, Any]], fmt: str, quantized: set[str] | None = None) -> dict[str, str]:
    """``fmt`` for the groups in ``quantized`` (all when None), BF16 for the rest."""
    return {g["layer"]: fmt if quantized is None or g["layer"] in quantized else NO_QUANT for g in groups}


def fill(order: Sequence[dict[str, Any]], step, target: float, tolerance: float) -> list[str]:
    """Groups taken in ``order``, each adding ``step(group)``, until the total is within ``tolerance``
    of ``target``; a group that would overshoot ``target + tolerance`` is skipped for the next one.

    Should the order run out below the target (only large groups were left), one chosen group is
    swapped for a larger left-over one, the first pair that lands within the tolerance. The groups
    come back in ``order``.
    """
    chosen, total = [], 0.0
    for group in order:
        if total >= target - tolerance:
            break
        size = step(group)
        if total + size <= target + tolerance:
            chosen.append(group)
            total += size
    if total < target - tolerance:
        # the swap gives up the latest-taken group it can, so the head of the order stays in the set
        taken = {g["layer"] for g in chosen}
        swap = next(((i, u) for u in order if u["layer"] not in taken for i in reversed(range(len(chosen)))
                     if abs(total - step(chosen[i]) + step(u) - target) <= tolerance), None)
        if swap is not None:
            chosen[swap[0]] = swap[1]
    position = {g["layer"]: i for i, g in enumerate(order)}
    return sorted((g["layer"] for g in chosen), key=position.__getitem__)


def weight_share(manifest: dict[str, Any]) -> dict[str, float]:
    """Each group's share of the searched weight (its BF16 cost over all groups')."""
    total = sum(float(g["uncompressed_cost"]) for g in manifest["groups"])
    return {g["layer"]: float(g["uncompressed_cost"]) / total if total > 0 else 0.0 for g in manifest["groups"]}


def first_half(manifest: dict[str, Any], order: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The longest prefix of ``order`` holding at most half of the searched weight."""
    share = weight_share(manifest)
    half, total = [], 0.0
    for group in order:
        if total + share[group["layer"]] > 0.5 + 1e-12:
            break
        half.append(group)
        total += share[group["layer"]]
    return half


def equal_weight_set(manifest: dict[str, Any], order: Sequence[dict[str, Any]], fraction: float) -> list[str]:
    """Groups from the first half of ``order`` (by weight) adding up to ``fraction`` of the searched
    weight, within the smallest group's share where that half allows it.

    Drawing from the first half keeps a set and its opposite (the same order reversed) disjoint,
    so that filling a bottom set never reaches into the top of the ranking.
    """
    share = weight_share(manifest)
    return fill(first_half(manifest, order), lambda g: share[g["layer"]], fraction, min(share.values()))


# Random sets and recipes are drawn again (a fresh seeded order) until one lands within the
# tolerance; a cell whose groups are too coarse for it keeps the closest draw, flagged.
RANDOM_TRIES = 200


def _closest_draw(draw, distance) -> Any:
    """The first of up to ``RANDOM_TRIES`` draws at distance 0 (within tolerance), else the closest."""
    best, best_distance = None, math.inf
    for _ in range(RANDOM_TRIES):
        candidate = draw()
        gap = distance(candidate)
        if gap < best_distance:
            best, best_distance = candidate, gap
        if gap <= 0:
            break
    return best


def random_weight_set(manifest: dict[str, Any], fraction: float, rng) -> list[str]:
    """Random groups adding up to ``fraction`` of the searched weight, within the smallest group's share."""
    share = weight_share(manifest)
    tolerance = min(share.values())
    groups = manifest["groups"]

    def draw() -> list[str]:
        return fill([groups[int(i)] for i in rng.permutation(len(groups))], lambda g: share[g["layer"]], fraction, tolerance)

    return _closest_draw(draw, lambda chosen: abs(sum(share[x] for x in chosen) - fraction) - tolerance)


def bits_step(manifest: dict[str, Any], fmt: str, model: CostModel | None = None) -> dict[str, float]:
    """How many effective bits quantizing each group to ``fmt`` (from BF16) saves."""
    model = model or cost_model(manifest)
    total = model.denominator + model.fixed_cost
    return {g["layer"]: 16.0 * (float(g["uncompressed_cost"]) - float(g["costs"][fmt])) / total if total > 0 else 0.0
            for g in manifest["groups"]}


def bits_tolerance(manifest: dict[str, Any], fmt: str, model: CostModel | None = None) -> float:
    """The smallest group's share of the effective bits: no recipe of ``fmt`` can be finer than that."""
    steps = [s for s in bits_step(manifest, fmt, model).values() if s > 0]
    return min(steps) if steps else 0.0


def recipe_at_bits(manifest: dict[str, Any], fmt: str, keep_order: Sequence[dict[str, Any]], target_bits: float,
                   model: CostModel | None = None) -> dict[str, str]:
    """Every group in ``fmt`` except those kept in BF16: groups taken in ``keep_order`` (one that would
    overshoot is skipped) until the recipe's effective bits are ``target_bits`` within the smallest
    group's share."""
    model = model or cost_model(manifest)
    steps = bits_step(manifest, fmt, model)
    floor = bits_of(manifest, uniform_selection(manifest["groups"], fmt), model)
    kept = set(fill(keep_order, lambda g: steps[g["layer"]], target_bits - floor, bits_tolerance(manifest, fmt, model)))
    return {g["layer"]: NO_QUANT if g["layer"] in kept else fmt for g in manifest["groups"]}


def random_recipe_same_budget(manifest: dict[str, Any], fmt: str, budget_bits: float, rng) -> dict[str, str]:
    """Random groups kept in BF16, the rest in ``fmt``, at ``budget_bits`` within the smallest group's share
    (redrawn up to ``RANDOM_TRIES`` times; the closest draw when none lands within it)."""
    model = cost_model(manifest)
    groups = manifest["groups"]
    tolerance = bits_tolerance(manifest, fmt, model)

    def draw() -> dict[str, str]:
        return recipe_at_bits(manifest, fmt, [groups[int(i)] for i in rng.permutation(len(groups))], budget_bits, model)

    return _closest_draw(draw, lambda selection: abs(bits_of(manifest, selection, model) - budget_bits) - tolerance - 1e-9)


def size_only_recipe(manifest: dict[str, Any], fmt: str, target_bits: float) -> dict[str, str]:
    """The size-only recipe: the largest groups that fit kept in BF16, the rest in ``fmt``, at ``target_bits``."""
    return recipe_at_bits(manifest, fmt, by_size(manifest), target_bits)


def ratio(numerator: float, denominator: float) -> float | None:
    """numerator / denominator; None when the denominator is not positive (no finite ratio)."""
    if denominator > 0 and math.isfinite(numerator):
        return numerator / denominator
    return None


# --------------------------------------------------------------------------------------------
# Intervals: a bootstrap over the held-out samples (and groups, and random draws)


def _percentile_interval(values) -> list[float]:
    import numpy as np

    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return [math.nan, math.nan]
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return [float(low), float(high)]


class Bootstrap:
    """Resamples of the held-out samples, shared by every interval of one validation.

    ``sums`` arguments are per-sample sums of a measure over caption tokens (one row per
    configuration); a configuration's value under a resample is its resampled sum over the
    resampled tokens, exactly as the point estimate is computed over all samples.
    """

    def __init__(self, tokens: Sequence[int], resamples: int, seed: int):
        import numpy as np

        self.tokens = np.asarray(tokens, dtype=float)
        self.resamples = int(resamples)
        self.rng = np.random.default_rng(seed)
        n = len(self.tokens)
        self.samples = self.rng.integers(0, n, size=(self.resamples, n)) if self.resamples and n else np.zeros((0, n), int)
        self.weights = np.stack([np.bincount(row, minlength=n) for row in self.samples]) if self.resamples else np.zeros((0, n))

    def values(self, sums) -> Any:
        """Per resample, the per-token value of each configuration: array (resamples, configurations)."""
        import numpy as np

        sums = np.atleast_2d(np.asarray(sums, dtype=float))
        return (self.weights @ sums.T) / (self.weights @ self.tokens)[:, None]

    def ratio(self, numerator, denominator_draws) -> list[float]:
        """Interval of numerator / mean(denominator draws) (draws resampled too)."""
        import numpy as np

        if not self.resamples:
            return [math.nan, math.nan]
        num = self.values(numerator)[:, 0]
        den = self.values(denominator_draws)
        if den.shape[1] > 1:
            picks = self.rng.integers(0, den.shape[1], size=den.shape)
            den = np.take_along_axis(den, picks, axis=1)
        den = den.mean(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            out = np.where(den > 0, num / den, np.nan)
        return _percentile_interval(out)


def _rank_rows(values):
    from scipy import stats

    return stats.rankdata(values, axis=-1)


def _spearman_rows(x, y):
    """Spearman ρ of each row pair (resamples × n)."""
    import numpy as np

    rx, ry = _rank_rows(x), _rank_rows(y)
    rx = rx - rx.mean(axis=1, keepdims=True)
    ry = ry - ry.mean(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (rx * ry).sum(axis=1) / np.sqrt((rx**2).sum(axis=1) * (ry**2).sum(axis=1))


def _kendall_rows(x, y, chunk: int = 256):
    """Kendall τ-b of each row pair (resamples × n), as ``scipy.stats.kendalltau`` computes it row by row.

    τ-b = Σ sign(Δx)·sign(Δy) / √(pairs untied in x · pairs untied in y) over all pairs of a row;
    NaN where a row is constant. Rows go in chunks, so memory stays bounded for many groups.
    """
    import numpy as np

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    i, j = np.triu_indices(x.shape[1], k=1)
    out = np.empty(x.shape[0])
    for start in range(0, x.shape[0], chunk):
        dx = np.sign(x[start:start + chunk, i] - x[start:start + chunk, j])
        dy = np.sign(y[start:start + chunk, i] - y[start:start + chunk, j])
        untied = np.count_nonzero(dx, axis=1) * np.count_nonzero(dy, axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            out[start:start + chunk] = np.where(untied > 0, (dx * dy).sum(axis=1) / np.sqrt(untied), np.nan)
    return out


def group_resamples(strata: Sequence[str], resamples: int, rng) -> Any:
    """Row indices of ``resamples`` bootstrap resamples of the groups, drawn within each stratum (tower)."""
    import numpy as np

    strata = np.asarray(strata)
    out = np.zeros((resamples, len(strata)), dtype=int)
    for stratum in dict.fromkeys(strata.tolist()):
        members = np.flatnonzero(strata == stratum)
        out[:, members] = rng.choice(members, size=(resamples, len(members)), replace=True)
    return out


def rank_correlations(predicted: Sequence[float], measured: Sequence[float], resamples: int, seed: int, *,
                      per_sample=None, tokens: Sequence[int] | None = None, strata: Sequence[str] | None = None) -> dict[str, Any]:
    """Spearman ρ and Kendall τ with percentile bootstrap 95 % intervals.

    Groups are resampled (within each of ``strata`` when given) and, when ``per_sample`` sums
    (groups × samples) and ``tokens`` are given, the held-out samples too, jointly.
    """
    import numpy as np
    from scipy import stats

    x, y = np.asarray(predicted, dtype=float), np.asarray(measured, dtype=float)
    out: dict[str, Any] = {"n": len(x)}
    rng = np.random.default_rng(seed)
    usable = len(x) >= 3 and resamples > 0
    if usable:
        rows = group_resamples(strata if strata is not None else ["all"] * len(x), resamples, rng)
        if per_sample is not None:
            sums = np.asarray(per_sample, dtype=float)
            boot = Bootstrap(tokens, resamples, seed + 1)
            measured_b = boot.values(sums)  # resamples × groups
            y_b = np.take_along_axis(measured_b, rows, axis=1)
        else:
            y_b = y[rows]
        x_b = x[rows]
    for name, func in (("spearman", stats.spearmanr), ("kendall", stats.kendalltau)):
        value = float(func(x, y).statistic) if len(x) >= 3 else math.nan
        interval = [math.nan, math.nan]
        if usable and not math.isnan(value):
            draws = _spearman_rows(x_b, y_b) if name == "spearman" else _kendall_rows(x_b, y_b)
            interval = _percentile_interval(draws)
        out[name] = {"value": value, "ci95": interval}
    return out


def _log_floor(values) -> float:
    import numpy as np

    positive = np.asarray(values, dtype=float)
    positive = positive[positive > 0]
    return float(positive.min()) / 10 if len(positive) else 1e-30


def under_prediction(predicted: Sequence[float], per_sample, tokens: Sequence[int], towers: Sequence[str],
                     resamples: int, seed: int) -> dict[str, dict[str, Any]]:
    """Per tower: measured damage per unit of predicted score, over that of the other towers.

    The median of log10(KL / predicted) over a tower's ablated groups minus the same median over
    the other towers' groups, as a factor: 10× means the score predicts a tenth of the tower's
    damage, relative to the rest. Its interval resamples the groups within each tower and the samples.
    """
    import numpy as np

    pred = np.asarray(predicted, dtype=float)
    sums = np.asarray(per_sample, dtype=float)
    tok = np.asarray(tokens, dtype=float)
    measured = sums.sum(axis=1) / tok.sum()
    towers = np.asarray(towers)
    floor_p, floor_m = _log_floor(pred), _log_floor(measured)

    def residuals(kl):
        return np.log10(np.maximum(kl, floor_m)) - np.log10(np.maximum(pred, floor_p))

    point = residuals(measured)
    rng = np.random.default_rng(seed)
    boot = Bootstrap(tokens, resamples, seed + 2)
    rows = group_resamples(towers, resamples, rng) if resamples else np.zeros((0, len(pred)), int)
    res_b = np.take_along_axis(residuals(boot.values(sums)), rows, axis=1) if resamples else None
    out = {}
    for tower in dict.fromkeys(towers.tolist()):
        inside = towers == tower
        if inside.sum() < 2 or (~inside).sum() < 2:
            out[tower] = {"n": int(inside.sum()), "factor": None, "ci95": [math.nan, math.nan]}
            continue
        factor = 10 ** float(np.median(point[inside]) - np.median(point[~inside]))
        interval = [math.nan, math.nan]
        if resamples:
            diffs = np.median(res_b[:, inside], axis=1) - np.median(res_b[:, ~inside], axis=1)
            interval = _percentile_interval(10**diffs)
        out[tower] = {"n": int(inside.sum()), "factor": factor, "ci95": interval}
    return out


# --------------------------------------------------------------------------------------------
# The verdict


def verdict_k(fractions: list[float]) -> float:
    """The k of the verdict line: the middle of the configured list (10 % by default)."""
    ordered = sorted(fractions)
    return ordered[(len(ordered) - 1) // 2]


def verdict_row(result: dict[str, Any]) -> dict[str, Any]:
    """The top-k comparison the verdict line quotes (k = ``verdict_k``)."""
    return next(row for row in result["top_k"] if row["fraction"] == result["verdict_k"])


def interval_text(interval: Sequence[float], spec: str = ".2f") -> str:
    lo, hi = interval
    return "" if math.isnan(lo) or math.isnan(hi) else f" [{lo:{spec}}, {hi:{spec}}]"


def under_predicted_towers(result: dict[str, Any]) -> list[str]:
    """Towers whose damage the score under-predicts: the factor's interval lies above 1."""
    towers = result["ablations"].get("towers", {})
    return [t for t in TOWERS if t in towers and towers[t]["under_prediction"]["factor"] is not None
            and towers[t]["under_prediction"]["ci95"][0] > 1]


def verdict(result: dict[str, Any]) -> str:
    rho = result["ablations"]["correlation"][DAMAGE]["spearman"]
    lo, _ = rho["ci95"]
    chosen = verdict_row(result)
    r = chosen["ratio_top_bottom"][DAMAGE]
    ratio_text = (f"{r:.3g}×" + interval_text(chosen["ratio_top_bottom_ci95"][DAMAGE], ".3g")) if r is not None \
        else "undefined (bottom-k damage is 0)"
    size_rho = result["ablations"]["size_only"][DAMAGE]["spearman"]
    line = (f"ranking predicts damage: ρ = {rho['value']:.2f}{interval_text(rho['ci95'])}, top-k/bottom-k damage ratio = "
            f"{ratio_text} (k = {chosen['fraction']:.0%} of the weight, {chosen['top']['k']} and {chosen['bottom']['k']} of "
            f"{result['n_groups']} groups); size alone: ρ = {size_rho['value']:.2f}{interval_text(size_rho['ci95'])}")
    if math.isnan(rho["value"]) or not lo > 0:
        line += "; not established: the ρ interval does not exclude 0"
    for tower in under_predicted_towers(result):
        under = result["ablations"]["towers"][tower]["under_prediction"]
        line += (f"; the score under-predicts the {tower} tower's damage ({under['factor']:.3g}× the damage per unit "
                 f"of score of the other towers{interval_text(under['ci95'], '.3g')})")
    if result["settings"]["bootstrap_resamples"]:
        line += (f". Intervals: {CONFIDENCE:.0%} percentile bootstrap over the {result['eval']['samples']} held-out samples "
                 "(ρ: and over the ablated groups within each tower)")
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
    """Caption-token loss and KL to the BF16 model on the held-out batches, per sample and in total.

    Per-sample values are sums over the sample's caption tokens (nats), in the order of the
    evaluation batches; ``tokens`` holds each sample's caption tokens in the same order.

    While ``vision_bf16`` is set (the caller's promise that the configuration quantizes no vision
    group), the vision tower's output is reused from the first such forward instead of recomputed
    (``vlmsens.vision_reuse``); off by default, so a caller that does not track towers recomputes.
    With ``record_vision_blocks``, that first forward records the tower's block outputs too, and
    while it is not set a recomputed tower skips its blocks before ``vision_start`` (the caller's
    promise that the configuration quantizes nothing in the tower before that block,
    ``VisionBlockReuse.start_block``; 0 by default: nothing skipped).
    While it is set, text layers before ``text_start`` (the caller's promise that the configuration
    quantizes nothing before that text layer, ``TextPrefixReuse.start_layer``) are not computed:
    the BF16 reference pass recorded their outputs (``vlmsens.prefix_reuse``). ``text_start`` is 0
    by default: nothing skipped. ``text_layer_forwards`` and ``text_layer_forwards_skipped`` count, over
    the measurements, the text-layer forwards a full forward runs and those skipped.
    """

    def __init__(self, model, batches: list[dict], vision_patterns: tuple[str, ...] = VISION_PATTERNS,
                 device_budget_bytes: float | None = None, record_vision_blocks: bool = False):
        self.batches = batches
        self.vision_patterns, self.device_budget_bytes = vision_patterns, device_budget_bytes
        self.record_vision_blocks = record_vision_blocks
        self.model = model
        self.reference = None
        self.tokens: list[int] = []
        self.vision_bf16 = False
        self.text_start = 0
        self.vision_start = 0
        self.text_layer_forwards = self.text_layer_forwards_skipped = 0

    @property
    def model(self):
        return self._model

    @model.setter
    def model(self, model) -> None:
        """The model measured; another one (the export check's reloaded checkpoint) is compared with the
        same reference, but gets its own image features, geometry and text-layer records."""
        self._model = model
        self.vision = VisionFeatures(model, self.device_budget_bytes)
        self.vision.record_blocks = self.record_vision_blocks
        self.prefix = TextPrefixReuse(model, self.vision_patterns, self.device_budget_bytes)

    @model.deleter
    def model(self) -> None:
        """Let the model go (with what holds on to it) until another is set."""
        del self._model, self.vision, self.prefix

    def _forward(self, reference: bool = False):
        import torch

        # with the image features changed, every text layer's input differs from the reference's
        start = self.text_start if self.vision_bf16 and not reference else 0
        with torch.inference_mode():
            for index, batch in enumerate(self.batches):
                inputs = self.vision.inputs(index, batch, reuse=self.vision_bf16, start_block=self.vision_start)
                if reference:
                    with self.prefix.recording(index):
                        logits, targets = caption_logits(self.model, batch, inputs)
                else:
                    with self.prefix.skipping(index, start) as skipped:
                        logits, targets = caption_logits(self.model, batch, inputs)
                    self.text_layer_forwards += self.prefix.n_layers
                    self.text_layer_forwards_skipped += skipped
                # caption_logits keeps the positions whose next token is a caption token, row by row
                rows = (batch["labels"][:, 1:] != IGNORE_INDEX).nonzero()[:, 0]
                yield torch.log_softmax(logits.float(), dim=-1), targets, rows, int(batch["labels"].shape[0])

    @staticmethod
    def _per_sample(values, rows, n_rows: int) -> list[float]:
        import torch

        sums = torch.zeros(n_rows, dtype=torch.float64, device=values.device)
        sums.index_add_(0, rows, values.double())
        return sums.tolist()

    def _nll(self, logp, targets):
        return -logp.gather(1, targets[:, None])[:, 0]

    def set_reference(self) -> float:
        """Run the current (BF16) model once; later measurements compare against it."""
        import torch

        self.reference, self.reference_nll, self.tokens = [], [], []
        self.prefix.clear()
        for logp, targets, rows, n_rows in self._forward(reference=True):
            self.reference.append(logp)
            self.reference_nll += self._per_sample(self._nll(logp, targets), rows, n_rows)
            self.tokens += self._per_sample(torch.ones_like(targets, dtype=torch.float64), rows, n_rows)
        self.tokens = [int(t) for t in self.tokens]
        if sum(self.tokens) == 0:
            raise VlmsensError("the held-out samples hold no caption token to evaluate on")
        self.reference_loss = sum(self.reference_nll) / sum(self.tokens)
        return self.reference_loss

    def measure(self) -> dict[str, Any]:
        """Loss, loss increase and KL per caption token, and their per-sample sums (``per_sample``)."""
        import torch

        nll, kl = [], []
        for (logp, targets, rows, n_rows), ref in zip(self._forward(), self.reference, strict=True):
            nll += self._per_sample(self._nll(logp, targets), rows, n_rows)
            kl += self._per_sample(torch.nn.functional.kl_div(logp, ref, log_target=True, reduction="none").sum(-1), rows, n_rows)
        tokens = sum(self.tokens)
        loss = sum(nll) / tokens
        increase = [a - b for a, b in zip(nll, self.reference_nll, strict=True)]
        return {"loss": loss, "loss_increase": loss - self.reference_loss, "kl": max(sum(kl) / tokens, 0.0),
                "per_sample": {"kl": kl, "loss_increase": increase}}


def without_per_sample(measured: dict[str, Any]) -> dict[str, Any]:
    """A measurement without its per-sample sums (for log lines and comparisons)."""
    return {k: v for k, v in measured.items() if k != "per_sample"}


def _quantized(selection: dict[str, str]) -> int:
    return sum(v != NO_QUANT for v in selection.values())


class HeldOutModel:
    """The cell's search model with the cell's own calibration, its searched groups switchable,
    measured on held-out batches.

    What validate and ladder share: load the cell's checkpoint, restore the calibrated quantizers
    from the cell's saved search state (ModelOpt resumes from it as from its own checkpoint: no
    forward runs), or take ``cell_model``, the very search model the cell's process kept
    (``vlmsens.handoff``), batch the held-out samples for inference, and measure configurations (format per
    group) against the BF16 reference, reusing the vision tower's features while a configuration
    leaves the tower BF16, and then the BF16 outputs of the text layers before its first quantized one.
    """

    def __init__(self, spec: CellSpec, manifest: dict[str, Any], search_state: dict[str, Any] | None, eval_samples: list[dict],
                 clock: PhaseClock, cell_model=None):
        if cell_model is None:
            model, self.device, self.dtype = load_spec_model(spec, clock)
        else:
            clock.enter("handoff", "the cell's search model, kept by the process that ran the cell")
            model, self.device, self.dtype = from_cell_process(spec, cell_model)
            if self.device.startswith("cuda"):
                import torch

                clock.progress(f"handoff: {torch.cuda.memory_allocated() / 2**30:.2f} GiB allocated "
                               "(the model, its quantizers and whatever the cell left)")
        self.model_source = "restored from the cell's search state" if cell_model is None else "kept by the cell's process"
        self.kernels = model.vlmsens_kernels
        batch_size = inference_batch_size(int(manifest["config"]["batch_size_used"]), len(eval_samples), spec.batch_halvings)
        self.eval_batches = device_batches(model, eval_samples, batch_size, self.device, self.dtype)
        if cell_model is None:
            clock.enter("restore", "the cell's calibrated quantizers, from its search state")
            model, _, _, _ = search(model, spec, [], clock, restore=search_state)
        self.switch = RecipeSwitch(model, spec.formats, [g["layer"] for g in manifest["groups"]])
        self.vision_layers = {g["layer"] for g in manifest["groups"] if g["tower"] == "vision"}
        self.evaluator = Evaluator(model, self.eval_batches, spec.family.vision_patterns, device_memory_budget(spec, self.device),
                                   record_vision_blocks=bool(self.vision_layers))
        self.group_modules = {g["layer"]: [g["layer"], *g.get("modules", [])] for g in manifest["groups"]}
        self.measured = 0
        self._clock = clock

    def set_reference(self, selection: dict[str, str]) -> float:
        """Measure the reference configuration (``selection``, all BF16 in effect); returns its loss."""
        self._clock.enter("reference", f"BF16 on {sum(int(b['input_ids'].shape[0]) for b in self.eval_batches)} held-out samples")
        self.switch.apply(selection)
        self.evaluator.vision_bf16 = True  # the reference's image features (and block outputs) are the BF16 ones kept
        loss = self.evaluator.set_reference()
        for what, reuse in (("vision-block", self.evaluator.vision.blocks), ("text-layer", self.evaluator.prefix)):
            counts = reuse.recording_counts()
            if counts["on_device"] + counts["on_host"]:
                self._clock.progress(f"reference: {counts['on_device'] + counts['on_host']} {what} outputs recorded, "
                                     f"{counts['on_device']} on the GPU, {counts['on_host']} on the host")
        return loss

    def measure(self, selection: dict[str, str]) -> dict[str, Any]:
        """KL to the reference and loss of ``selection`` (groups not named stay BF16), per sample too."""
        self.switch.apply(selection)
        self.evaluator.vision_bf16 = all(selection.get(layer, NO_QUANT) == NO_QUANT for layer in self.vision_layers)
        quantized = [module for layer, modules in self.group_modules.items() if selection.get(layer, NO_QUANT) != NO_QUANT
                     for module in modules]
        self.evaluator.text_start = self.evaluator.prefix.start_layer(quantized)
        self.evaluator.vision_start = self.evaluator.vision.blocks.start_block(quantized)
        self.measured += 1
        return self.evaluator.measure()

    def reuse_record(self) -> dict[str, Any]:
        """How many text-layer and vision-block forwards the measured configurations would run in full,
        how many were skipped, and where the reference's recordings went."""
        vision = self.evaluator.vision
        return {"text_layer_forwards": self.evaluator.text_layer_forwards,
                "text_layer_forwards_skipped": self.evaluator.text_layer_forwards_skipped,
                "text_layer_recordings": self.evaluator.prefix.recording_counts(),
                "vision_block_forwards": vision.block_forwards, "vision_block_forwards_skipped": vision.block_forwards_skipped,
                "vision_block_recordings": vision.blocks.recording_counts()}

    def run_record(self) -> dict[str, Any]:
        """Where and how long it ran: device, dtype, the kernels (vlmsens.kernels), the phases' times
        (the clock stops), peak memory."""
        return {"device": _device_info(self.device), "dtype": str(self.dtype).removeprefix("torch."),
                "kernels": self.kernels, "model_source": self.model_source,
                "timings_s": self._clock.stop(), "peak_memory": _peak_memory(self.device)}


def from_cell_process(spec: CellSpec, model):
    """The cell's search model as the held-out jobs use it: (model, device, dtype), in eval mode, the
    cell's leftovers (gradients, cached blocks) released before the job's device set-up
    (``autoquant.job_device``: seeded, peak-memory count restarted), as a loaded model gets it."""
    import gc

    import torch

    model.eval()
    model.zero_grad(set_to_none=True)
    gc.collect()
    torch.cuda.empty_cache()  # a no-op where CUDA never started
    return (model, *job_device(spec))


def run_validation(
    spec: CellSpec,
    manifest: dict[str, Any],
    search_state: dict[str, Any],
    eval_samples: list[dict],
    settings: ValidationSettings,
    *,
    progress: Callable[[str], None] = log.info,
    cell_model=None,
) -> dict[str, Any]:
    """Measure the cell's ranking on held-out samples; returns the body of validation.json.

    ``cell_model``: the cell's search model, kept by the process that ran the cell (``vlmsens.handoff``);
    None: rebuilt from the checkpoint and ``search_state``."""
    import numpy as np

    clock = PhaseClock(progress)
    groups = manifest["groups"]
    if not groups:
        raise VlmsensError("the cell has no searched group to validate")
    fmt = ranking_format(manifest)
    ranked = ranked_groups(manifest, fmt)
    layers = [g["layer"] for g in ranked]
    budget = float(manifest["search"]["effective_bits_target"])
    costs = cost_model(manifest)
    share = weight_share(manifest)
    weight_tolerance = min(share.values())

    held_out = HeldOutModel(spec, manifest, search_state, eval_samples, clock, cell_model)
    reference_loss = held_out.set_reference({})
    evaluator = held_out.evaluator
    boot = Bootstrap(evaluator.tokens, settings.bootstrap_resamples, settings.seed)

    def measure(selection: dict[str, str]) -> dict[str, Any]:
        return {**held_out.measure(selection), "bits": bits_of(manifest, selection, costs), "quantized_groups": _quantized(selection)}

    def measure_set(chosen: list[str], fraction: float) -> dict[str, Any]:
        weight = sum(share[layer] for layer in chosen)
        return {**measure(uniform_selection(groups, fmt, set(chosen))), "k": len(chosen), "weight_fraction": weight,
                "within_tolerance": bool(abs(weight - fraction) <= weight_tolerance + 1e-9), "groups": chosen}

    def sums(measured: dict[str, Any], m: str):
        return measured["per_sample"][m]

    def ratio_row(num: dict[str, Any], den: list[dict[str, Any]]) -> tuple[dict, dict]:
        """num / mean(den) per measure, and its interval over samples (and draws)."""
        values, intervals = {}, {}
        empty = num.get("k") == 0 or any(d.get("k") == 0 for d in den)  # a set no group fits: no ratio
        for m in MEASURES:
            values[m] = None if empty else ratio(num[m], float(np.mean([d[m] for d in den])))
            intervals[m] = boot.ratio(sums(num, m), [sums(d, m) for d in den]) if m == DAMAGE and values[m] is not None \
                else [math.nan, math.nan]
        return values, intervals

    rng = np.random.default_rng(settings.seed)
    clock.enter("top-k", f"{settings.k_fractions} of the weight of {len(layers)} groups (within {weight_tolerance:.2%}), "
                         f"{settings.random_draws} random draws each, size-only sets")
    largest = by_size(manifest)
    top_k = []
    for fraction in settings.k_fractions:
        top = measure_set(equal_weight_set(manifest, ranked, fraction), fraction)
        bottom = measure_set(equal_weight_set(manifest, ranked[::-1], fraction), fraction)
        big = measure_set(equal_weight_set(manifest, largest, fraction), fraction)
        small = measure_set(equal_weight_set(manifest, largest[::-1], fraction), fraction)
        draws = [measure_set(random_weight_set(manifest, fraction, rng), fraction) for _ in range(settings.random_draws)]
        random_mean = {m: float(np.mean([d[m] for d in draws])) for m in MEASURES} if draws else {}
        top_bottom, top_bottom_ci = ratio_row(top, [bottom])
        top_random, top_random_ci = ratio_row(top, draws) if draws else ({m: None for m in MEASURES}, {})
        size_ratio, size_ci = ratio_row(big, [small])
        top_k.append({
            "fraction": fraction, "weight_tolerance": weight_tolerance, "k": top["k"],
            "top": top, "bottom": bottom, "random": {"draws": draws, "mean": random_mean},
            "size_only": {"largest": big, "smallest": small, "ratio_largest_smallest": size_ratio,
                          "ratio_largest_smallest_ci95": size_ci},
            "ratio_top_bottom": top_bottom, "ratio_top_bottom_ci95": top_bottom_ci,
            "ratio_top_random": top_random, "ratio_top_random_ci95": top_random_ci,
        })
        progress(f"top-k: {fraction:.0%} of the weight: KL top {top['kl']:.4g} ({top['k']} groups), bottom {bottom['kl']:.4g} "
                 f"({bottom['k']}), random {random_mean.get('kl', math.nan):.4g}, largest {big['kl']:.4g}, smallest {small['kl']:.4g}")

    positions = stratified_positions(len(layers), settings.ablation_groups)
    clock.enter("ablations", f"{len(positions)} groups, one at a time")
    rows = []
    for position in positions:
        group = ranked[position]
        measured = measure(uniform_selection(groups, fmt, {group["layer"]}))
        rows.append({"layer": group["layer"], "tower": group["tower"], "rank": position + 1,
                     "predicted_score": float(group["scores_raw"][fmt]),
                     "predicted_score_per_token": float(group["scores_per_token"][fmt]),
                     "weight_cost": float(group["uncompressed_cost"]), **measured})
    correlation, size_only, towers = ablation_statistics(rows, evaluator.tokens, settings)

    clock.enter("end-to-end", f"the solver's recipe at {budget:g} bits, uniform {fmt}, {settings.random_draws} random "
                              "recipes and the size-only recipe at the recipe's bits")
    recipe_selection = {g["layer"]: g["selected_format"] for g in groups}
    recipe = measure(recipe_selection)
    uniform = measure(uniform_selection(groups, fmt))
    tolerance = bits_tolerance(manifest, fmt, costs)

    def within(measured: dict[str, Any]) -> dict[str, Any]:
        return {**measured, "within_tolerance": bool(abs(measured["bits"] - recipe["bits"]) <= tolerance + 1e-9)}

    random_recipes = [within(measure(random_recipe_same_budget(manifest, fmt, recipe["bits"], rng)))
                      for _ in range(settings.random_draws)]
    size_recipe = within(measure(size_only_recipe(manifest, fmt, recipe["bits"])))
    held_out.switch.apply({})
    compared = [r for r in random_recipes if r["within_tolerance"]]
    random_over_recipe, random_over_recipe_ci = ({m: None for m in MEASURES}, {m: [math.nan, math.nan] for m in MEASURES})
    if compared:
        random_over_recipe = {m: ratio(float(np.mean([r[m] for r in compared])), recipe[m]) for m in MEASURES}
        random_over_recipe_ci = {m: [math.nan, math.nan] for m in MEASURES}
        if random_over_recipe[DAMAGE] is not None and boot.resamples:
            # mean random damage over recipe damage: the reciprocal of recipe / mean(random), resampled alike
            lo, hi = boot.ratio(sums(recipe, DAMAGE), [sums(r, DAMAGE) for r in compared])
            random_over_recipe_ci[DAMAGE] = [1 / hi if hi > 0 else math.nan, 1 / lo if lo > 0 else math.nan]
    size_vs = ratio(size_recipe["kl"], recipe["kl"]) if size_recipe["within_tolerance"] else None

    result = {
        "ranking_format": fmt,
        "n_groups": len(layers),
        "damage_measure": "KL divergence BF16 → quantized, per caption token (nats)",
        "settings": asdict(settings),
        "eval": {**batch_stats(held_out.eval_batches), "bf16_loss": reference_loss,
                 "configurations_measured": held_out.measured, "tokens_per_sample": evaluator.tokens,
                 **held_out.reuse_record()},
        "intervals": {
            "confidence": CONFIDENCE,
            "method": "percentile bootstrap",
            "resamples": settings.bootstrap_resamples,
            "covers": (f"the {len(evaluator.tokens)} held-out samples (every ratio); the ablated groups too, resampled "
                       "within each tower (ρ, τ, under-prediction factors); the random draws too (ratios to random sets "
                       "or recipes)"),
            "not_covered": "the calibration samples (one calibration per cell) and the choice of groups of each set",
        },
        "verdict_k": verdict_k(settings.k_fractions),
        "top_k": top_k,
        "ablations": {"rows": rows, "correlation": correlation, "size_only": size_only, "towers": towers},
        "end_to_end": {
            "budget_bits": budget,
            "bits_tolerance": tolerance,
            "recipe": recipe,
            "uniform": uniform,
            "random_same_budget": {
                "draws": random_recipes,
                "compared": len(compared),
                "mean": {m: float(np.mean([r[m] for r in compared])) for m in MEASURES} if compared else {},
                "recipe_beats": sum(r["kl"] > recipe["kl"] for r in compared),
                "ratio_random_recipe": random_over_recipe,
                "ratio_random_recipe_ci95": random_over_recipe_ci,
            },
            "size_only": {**size_recipe, "ratio_to_recipe_kl": size_vs},
            "recipe_vs_uniform_kl": ratio(recipe["kl"], uniform["kl"]),
        },
        **held_out.run_record(),
    }
    result["verdict"] = verdict(result)
    progress(result["verdict"])
    return result


def ablation_statistics(rows: list[dict[str, Any]], tokens: list[int], settings: ValidationSettings):
    """Correlations of predicted score (and of size alone) with measured damage, overall and per tower."""
    predicted = [r["predicted_score"] for r in rows]
    strata = [r["tower"] for r in rows]

    def correlations(x, subset, seed_offset=0, measures=MEASURES):
        return {m: rank_correlations(x, [rows[i][m] for i in subset], settings.bootstrap_resamples,
                                     settings.seed + seed_offset, per_sample=[rows[i]["per_sample"][m] for i in subset],
                                     tokens=tokens, strata=[strata[i] for i in subset])
                for m in measures}

    everything = list(range(len(rows)))
    correlation = correlations(predicted, everything)
    size_only = correlations([r["weight_cost"] for r in rows], everything)
    under = under_prediction(predicted, [r["per_sample"][DAMAGE] for r in rows], tokens, strata,
                             settings.bootstrap_resamples, settings.seed)
    towers = {}
    for offset, tower in enumerate(t for t in TOWERS if t in strata):
        subset = [i for i in everything if strata[i] == tower]
        towers[tower] = {
            "n": len(subset),
            "correlation": correlations([predicted[i] for i in subset], subset, offset + 1, (DAMAGE,))[DAMAGE],
            "median_kl": float(_median([rows[i]["kl"] for i in subset])),
            "median_predicted_score_per_token": float(_median([rows[i]["predicted_score_per_token"] for i in subset])),
            "under_prediction": under[tower],
        }
    return correlation, size_only, towers


def _median(values: list[float]) -> float:
    import numpy as np

    return float(np.median(values)) if values else math.nan
