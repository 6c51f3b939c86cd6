"""(g) Validation of one model's rankings: each ablated group's predicted score against its measured damage."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from ..validation import under_predicted_towers
from .frames import CELL_KEYS, TOWERS, ordered
from .plots import TOWER_COLORS, format_scope_grid, legend_towers_sizes, na_figure, save
from .registry import Analysis, Job, Output, register
from .stats import log_floor


def write(job: Job) -> None:
    """Per format × scope: each ablated group's predicted score against its measured damage (log-log)."""
    model, size_order, out_png = job.model, job.size_order, job.outputs["png"]
    docs = [d for d in (json.loads(Path(p).read_text()) for p in job.inputs) if d["cell"]["model"] == model]
    rows = [{**{k: d["cell"][k] for k in CELL_KEYS}, **{k: v for k, v in r.items() if k != "per_sample"},
             "rho": d["ablations"]["correlation"]["kl"]["spearman"]["value"],
             "rho_size": d["ablations"]["size_only"]["kl"]["spearman"]["value"],
             "under": ", ".join(f"{t} ×{d['ablations']['towers'][t]['under_prediction']['factor']:.2g}"
                                for t in under_predicted_towers(d))}
            for d in docs for r in d["ablations"]["rows"]]
    frame = pd.DataFrame(rows)
    if frame.empty:
        na_figure(out_png, f"{model}: validation", "no validated cell")
        return
    sizes = ordered(frame["size"].unique(), size_order)
    markers = dict(zip(sizes, "os^Dv<>p*h", strict=False))
    floor = log_floor(pd.concat([frame["predicted_score_per_token"], frame["kl"]]))
    fig, axes, panels = format_scope_grid(frame, 5.2, 4.2)
    for ax, fmt, scope, sub in panels:
        for size in sizes:
            for tower in TOWERS:
                pts = sub[(sub["size"] == size) & (sub["tower"] == tower)]
                if len(pts):
                    ax.scatter(pts["predicted_score_per_token"].clip(lower=floor), pts["kl"].clip(lower=floor), s=24,
                               alpha=0.75, marker=markers[size], color=TOWER_COLORS[tower], edgecolors="none")
        ax.set_xscale("log")
        ax.set_yscale("log")
        lines = []
        for size in sizes:
            part = sub[sub["size"] == size]
            if len(part):
                first = part.iloc[0]
                lines.append(f"{size} ρ={first['rho']:.2f} (size alone {first['rho_size']:.2f})"
                             + (f"; under-predicted: {first['under']}" if first["under"] else ""))
        ax.set_title(f"{fmt} / {scope}\n" + "\n".join(lines), fontsize=8)
        ax.set_xlabel("predicted score per caption token")
        ax.set_ylabel("measured KL, group quantized alone")
    legend_towers_sizes(fig, axes[0, -1], markers)
    fig.suptitle(f"{model}: does the ranking predict damage? (one-group ablations, held-out data)", fontsize=10)
    save(fig, out_png)


ANALYSIS = register(Analysis(
    name="validation_plot", level="model", reads="validations", subcategory="(g) Validation of the ranking",
    outputs=(Output("png", "{model}/validation.png", "predicted score vs measured damage (scatter)"),),
    requires="validation",
    write=write,
))
