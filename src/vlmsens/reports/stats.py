"""Rank statistics shared by the analyses: Kendall τ, Spearman ρ, top-k overlap with ties split, log ratios."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd

TOP_K = (10, 20)


def top_k_overlap(a: list[str] | pd.Series, b: list[str] | pd.Series, k: int) -> float:
    """Share of the top-k of ``a`` that is also in the top-k of ``b``.

    Lists are rankings (best first, no ties): ``|top_k(a) ∩ top_k(b)| / k'`` with
    ``k' = min(k, len(a), len(b))`` (short lists compare what they have).

    Series are scores (higher = more sensitive) on a layer index; only layers in both count,
    ``k' = min(k, n_common)``. Ties at the k-th score are split evenly: a layer tied with
    ``t`` others for the last ``r`` places is in the top-k with probability ``r / t``, and the
    overlap is the expected value under random tie-breaking (all-equal scores give ``k'/n``,
    the chance level, not 0 or 1).
    """
    if k <= 0:
        raise ValueError("k must be positive")
    if isinstance(a, pd.Series) or isinstance(b, pd.Series):
        a, b = pd.Series(a).dropna(), pd.Series(b).dropna()
        common = a.index.intersection(b.index)
        k_eff = min(k, len(common))
        if k_eff == 0:
            return float("nan")
        pa = _topk_membership(a.loc[common], k_eff)
        pb = _topk_membership(b.loc[common], k_eff)
        return float((pa * pb).sum() / k_eff)
    k_eff = min(k, len(a), len(b))
    return len(set(a[:k_eff]) & set(b[:k_eff])) / k_eff if k_eff else float("nan")


def _topk_membership(scores: pd.Series, k: int) -> np.ndarray:
    values = scores.to_numpy(dtype=float)
    kth = np.sort(values)[::-1][k - 1]
    greater = values > kth
    equal = values == kth
    p = greater.astype(float)
    p[equal] = (k - greater.sum()) / equal.sum()
    return p


def rank_agreement(a: pd.Series, b: pd.Series) -> dict[str, float]:
    """Kendall τ-b and Spearman ρ between two score vectors on their common index (NaN when undefined)."""
    from scipy.stats import kendalltau, spearmanr

    a, b = a.dropna(), b.dropna()
    common = a.index.intersection(b.index)
    out = {"kendall_tau": float("nan"), "spearman": float("nan"), "n": int(len(common))}
    if len(common) < 2:
        return out
    x, y = a.loc[common].to_numpy(dtype=float), b.loc[common].to_numpy(dtype=float)
    if np.all(x == x[0]) or np.all(y == y[0]):
        return out  # a constant ranking has no order to agree with
    out["kendall_tau"] = float(kendalltau(x, y).statistic)
    out["spearman"] = float(spearmanr(x, y).statistic)
    return out


def agreement_row(a: pd.Series, b: pd.Series) -> dict[str, float]:
    return {
        **rank_agreement(a, b),
        **{f"top{k}_overlap": top_k_overlap(a, b, k) for k in TOP_K},
    }


def log_floor(values: Iterable[float]) -> float:
    """A positive floor for log scales: a tenth of the smallest positive value (1e-30 if none)."""
    arr = np.asarray(list(values), dtype=float)
    positive = arr[np.isfinite(arr) & (arr > 0)]
    return float(positive.min() / 10) if positive.size else 1e-30


def log10_ratio(numerator: pd.Series, denominator: pd.Series, floor: float) -> pd.Series:
    return np.log10(numerator.clip(lower=floor)) - np.log10(denominator.clip(lower=floor))
