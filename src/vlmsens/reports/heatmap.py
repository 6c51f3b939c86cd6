"""(e) Heatmap of one cell: block index × sublayer type, groups kept in BF16 marked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .frames import TOWERS, layers_frame, load_manifests, write_csv
from .plots import na_figure, pyplot, save
from .registry import Analysis, Job, Output, register
from .stats import log_floor

# Row order of the heatmaps: (tower, sublayer); sublayers not listed follow alphabetically.
SUBLAYER_ORDER = {
    "vision": ["patch_embed", "qkv", "proj", "gate_up", "down", "fc1", "fc2", "merger_fc1", "merger_fc2", "deepstack_fc1", "deepstack_fc2"],
    "text": ["qkv", "o", "gate_up", "down"],
    "head": ["lm_head"],
}
NO_BLOCK = "none"


def _block_label(block: Any) -> str:
    return NO_BLOCK if block is None or pd.isna(block) else str(int(block))


def heatmap_frame(layers: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(scores, kept) pivots of one cell: rows (tower, sublayer), columns block index ('·' = not in a block).

    Scores of groups sharing a row and column are summed; ``kept`` is True where any such group
    stays in BF16. Rows follow :data:`SUBLAYER_ORDER`, columns ascend, '·' last.
    """
    if layers.empty:
        empty = pd.DataFrame(index=pd.MultiIndex.from_tuples([], names=["tower", "sublayer"]))
        return empty, empty
    frame = layers.assign(column=layers["block"].map(_block_label))
    scores = frame.pivot_table(index=["tower", "sublayer"], columns="column", values="sensitivity", aggfunc="sum")
    kept = frame.pivot_table(index=["tower", "sublayer"], columns="column", values="kept_bf16", aggfunc="max")
    rows = []
    for tower in [*TOWERS, *sorted(set(frame["tower"]) - set(TOWERS))]:
        present = [s for (t, s) in scores.index if t == tower]
        order = SUBLAYER_ORDER.get(tower, [])
        rows += [(tower, s) for s in order if s in present] + [(tower, s) for s in sorted(present) if s not in order]
    numeric = sorted((c for c in scores.columns if c != NO_BLOCK), key=int)
    columns = numeric + ([NO_BLOCK] if NO_BLOCK in scores.columns else [])
    scores = scores.reindex(index=pd.MultiIndex.from_tuples(rows, names=["tower", "sublayer"]), columns=columns)
    kept = kept.reindex(index=scores.index, columns=columns)
    kept = kept.astype(object).where(kept.notna(), False).astype(bool)
    scores.columns.name = kept.columns.name = "block"
    return scores, kept


def plot_heatmap(layers: pd.DataFrame, title: str, out_png: str | Path) -> None:
    plt = pyplot()
    scores, kept = heatmap_frame(layers)
    if scores.empty:
        return na_figure(out_png, title, "no searched groups in this cell")
    values = np.log10(scores.to_numpy(dtype=float).clip(min=log_floor(scores.to_numpy().ravel())))
    n_rows, n_cols = values.shape
    fig, ax = plt.subplots(figsize=(min(max(7.5, 3.8 + 0.3 * n_cols), 18), 1.6 + 0.3 * n_rows))
    masked = np.ma.masked_invalid(values)
    image = ax.imshow(masked, aspect="auto", cmap="viridis", interpolation="nearest")
    image.cmap.set_bad("#eeeeee")
    ys, xs = np.nonzero(kept.to_numpy())
    ax.scatter(xs, ys, marker="s", s=36, facecolors="none", edgecolors="red", linewidths=1.3)
    ax.set_xticks(range(n_cols), list(scores.columns), fontsize=7)
    ax.set_yticks(range(n_rows), [f"{t}: {s}" for t, s in scores.index], fontsize=7)
    towers = [t for t, _ in scores.index]
    for i in range(1, n_rows):
        if towers[i] != towers[i - 1]:
            ax.axhline(i - 0.5, color="white", lw=2)
    ax.set_xlabel(f"block index ({NO_BLOCK}: outside the blocks; deepstack rows: merger index)", fontsize=8)
    fig.colorbar(image, ax=ax, label="log10 score / caption token", fraction=0.04, pad=0.02)
    ax.set_title(f"{title}\nsensitivity by block and sublayer; red squares: kept in BF16, grey: not searched", fontsize=9, loc="left")
    save(fig, out_png)


def write(job: Job) -> None:
    manifests = load_manifests(job.inputs)
    cell = manifests[0]["cell"]
    layers = layers_frame(manifests)
    scores, kept = heatmap_frame(layers)
    long = scores.stack(future_stack=True).rename("score").reset_index() if not scores.empty else pd.DataFrame(columns=["tower", "sublayer", "block", "score"])
    if not scores.empty:
        long["kept_bf16"] = kept.stack(future_stack=True).to_numpy()
        long = long.dropna(subset=["score"])
    write_csv(long, job.outputs["csv"])
    plot_heatmap(layers, f"{cell['model']} · {cell['format']} · {cell['scope']} · {cell['size']}", job.outputs["png"])


ANALYSIS = register(Analysis(
    name="heatmap", level="cell", reads="manifests", subcategory="(e) Heatmaps: block × sublayer", params=(),
    outputs=(
        Output("png", "{model}/heatmaps/{format}/{scope}/{size}/heatmap.png", "heatmap"),
        Output("csv", "{model}/heatmaps/{format}/{scope}/{size}/heatmap.csv"),
    ),
    write=write,
))
