"""Ship this: which groups to keep in BF16 whatever the cell, and which are safe to quantize anywhere.

One model's cells (sizes × formats × scopes) each rank the groups they search. A group every cell
that searches it ranks among its top ``ship_this.top_fraction`` is a consensus keep-BF16 group; one
every cell ranks among its least sensitive ``ship_this.safe_fraction`` is safe everywhere. Each
cell's evidence sits next to it: the group's rank, its rank by score per bit (what the solver
weighs), and whether the cell's own recipe kept it in BF16.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from ..recipes import score_per_cost
from ..render import layer_rows, primary_format
from .doc import Doc
from .frames import CELL_KEYS, SCOPES, load_manifests, ordered, short_name, write_csv
from .recipes import KEPT_VS_SENSITIVE
from .registry import Analysis, Job, Output, register

EVIDENCE_COLUMNS = [
    *CELL_KEYS, "layer", "tower", "rank", "groups", "top", "safe", "score_per_token", "per_bit_rank", "kept_bf16",
]



def groups_in(fraction: float, n_groups: int) -> int:
    """How many of a cell's ``n_groups`` ranked groups make up ``fraction`` of them (at least one)."""
    return max(1, min(n_groups, round(fraction * n_groups)))

def evidence_frame(manifests: list[dict[str, Any]], top_fraction: float, safe_fraction: float) -> pd.DataFrame:
    """One row per (cell, group): its rank, whether it is top or safe in that cell, its per-bit rank."""
    records = []
    for m in manifests:
        cell = m["cell"]
        fmt = primary_format(m)
        rows = layer_rows(m)
        n = len(rows)
        top_k, safe_k = groups_in(top_fraction, n), groups_in(safe_fraction, n)
        groups = {g["layer"]: g for g in m["groups"]}
        per_bit = sorted(groups, key=lambda layer: (-score_per_cost(groups[layer], fmt), layer))
        per_bit_rank = {layer: i for i, layer in enumerate(per_bit, start=1)}
        for row in rows:
            records.append({
                **{k: cell[k] for k in CELL_KEYS},
                "layer": row["layer"], "tower": row["tower"], "rank": row["rank"], "groups": n,
                "top": row["rank"] <= top_k, "safe": row["rank"] > n - safe_k,
                "score_per_token": row["sensitivity"], "per_bit_rank": per_bit_rank[row["layer"]],
                "kept_bf16": not row["quantized"],
            })
    return pd.DataFrame.from_records(records, columns=EVIDENCE_COLUMNS)


def cell_label(fmt: str, scope: str, size: str) -> str:
    return f"{fmt} · {scope} · {size}"


def cell_order(evidence: pd.DataFrame, size_order: list[str], format_order: list[str]) -> list[tuple[str, str, str]]:
    cells = set(map(tuple, evidence[["format", "scope", "size"]].drop_duplicates().to_numpy()))
    return [(f, sc, si) for f in ordered(evidence["format"].unique(), format_order)
            for sc in ordered(evidence["scope"].unique(), list(SCOPES))
            for si in ordered(evidence["size"].unique(), size_order) if (f, sc, si) in cells]


def consensus_frame(evidence: pd.DataFrame) -> pd.DataFrame:
    """Per group: in how many of the cells that search it it is top / safe / kept in BF16."""
    if evidence.empty:
        return pd.DataFrame(columns=["layer", "tower", "cells", "top_in", "safe_in", "kept_bf16_in", "median_rank",
                                     "consensus_top", "safe_everywhere"])
    grouped = evidence.groupby("layer", sort=False)
    frame = pd.DataFrame({
        "tower": grouped["tower"].first(),
        "cells": grouped.size(),
        "top_in": grouped["top"].sum(),
        "safe_in": grouped["safe"].sum(),
        "kept_bf16_in": grouped["kept_bf16"].sum(),
        "median_rank": grouped["rank"].median(),
    }).reset_index()
    frame["consensus_top"] = frame["top_in"] == frame["cells"]
    frame["safe_everywhere"] = frame["safe_in"] == frame["cells"]
    return frame.sort_values(["top_in", "median_rank", "layer"], ascending=[False, True, True]).reset_index(drop=True)


def evidence_table(consensus: pd.DataFrame, evidence: pd.DataFrame, cells: list[tuple[str, str, str]]) -> pd.DataFrame:
    """Consensus rows with one column per cell: 'rank/groups (per-bit rank)', '†' where the cell keeps it in BF16."""
    index = evidence.set_index(["layer", "format", "scope", "size"])
    rows = []
    for _, c in consensus.iterrows():
        row = {"group": short_name(c["layer"]), "tower": c["tower"], "top in": f"{c['top_in']} / {c['cells']}",
               "BF16 in": f"{c['kept_bf16_in']} / {c['cells']}"}
        for fmt, scope, size in cells:
            key = (c["layer"], fmt, scope, size)
            if key in index.index:
                e = index.loc[key]
                row[cell_label(fmt, scope, size)] = (f"{e['rank']}/{e['groups']} ({e['per_bit_rank']})"
                                                     + (" †" if e["kept_bf16"] else ""))
            else:
                row[cell_label(fmt, scope, size)] = "—"
        rows.append(row)
    return pd.DataFrame(rows)


def solver_vs_ranking(evidence: pd.DataFrame, cells: list[tuple[str, str, str]]) -> pd.DataFrame:
    """Per cell: which ranks the solver kept in BF16, and how many top groups it quantized anyway."""
    rows = []
    for fmt, scope, size in cells:
        sub = evidence[(evidence["format"] == fmt) & (evidence["scope"] == scope) & (evidence["size"] == size)]
        kept = sorted(sub.loc[sub["kept_bf16"], "rank"].tolist())
        top_quantized = int((sub["top"] & ~sub["kept_bf16"]).sum())
        rows.append({
            "cell": cell_label(fmt, scope, size),
            "groups": len(sub),
            "kept in BF16": len(kept),
            "their ranks": ", ".join(map(str, kept[:12])) + (" …" if len(kept) > 12 else "") if kept else "none",
            "top groups quantized": f"{top_quantized} / {int(sub['top'].sum())}",
            "most sensitive quantized": int(sub.loc[~sub["kept_bf16"], "rank"].min()) if (~sub["kept_bf16"]).any() else math.nan,
        })
    return pd.DataFrame(rows)


def ship_this_doc(model: str, evidence: pd.DataFrame, consensus: pd.DataFrame, cells: list[tuple[str, str, str]],
                  top_fraction: float, safe_fraction: float) -> Doc:
    doc = Doc(f"{model}: ship this")
    if evidence.empty:
        return doc.not_applicable("no searched groups.")
    doc.para(
        f"Across {len(cells)} cell(s) (formats × scopes × calibration sizes). A group is **top** in a cell when the "
        f"cell ranks it among its {top_fraction:.0%} most sensitive groups, **safe** when among its {safe_fraction:.0%} "
        "least sensitive. A group counts only in the cells that search it (vision groups only in `all-layers`). "
        "Evidence per cell: `rank/groups (rank by score per bit)`, `†` where that cell's solved recipe keeps it in BF16."
    )
    consensus_top = consensus[consensus["consensus_top"]]
    doc.heading(f"Keep in BF16 first: top {top_fraction:.0%} in every cell ({len(consensus_top)})")
    if consensus_top.empty:
        doc.para("No group is top in every cell; the closest ones follow.")
    else:
        doc.table(evidence_table(consensus_top, evidence, cells))
    near = consensus[~consensus["consensus_top"] & (consensus["top_in"] > 0)]
    doc.heading(f"Top {top_fraction:.0%} in some cells only ({len(near)})")
    doc.table(evidence_table(near, evidence, cells), empty="(none)")
    safe = consensus[consensus["safe_everywhere"]].sort_values(["median_rank", "layer"], ascending=[False, True])
    doc.heading(f"Safe everywhere: least sensitive {safe_fraction:.0%} in every cell ({len(safe)})")
    doc.para(", ".join(f"`{short_name(layer)}`" for layer in safe["layer"]) if len(safe) else "(none)")
    doc.heading("Most sensitive vs kept in BF16 by the solver")
    doc.para(KEPT_VS_SENSITIVE)
    doc.para(
        "Per cell below: the ranks of the groups the cell's recipe keeps in BF16 (at its search budget), and how "
        "many of its top groups it quantizes anyway. Nested recipes (each budget's BF16 groups a superset of the "
        "smaller budget's) ship next to the optimal ones under `recipes/<model>/<format>/<scope>/<size>/eb<budget>/nested/`."
    )
    doc.table(solver_vs_ranking(evidence, cells), floatfmt="g")
    return doc


def write(job: Job) -> None:
    model, out = job.model, job.outputs
    settings = job.params["ship_this"]
    manifests = [m for m in load_manifests(job.inputs) if m["cell"]["model"] == model]
    evidence = evidence_frame(manifests, float(settings["top_fraction"]), float(settings["safe_fraction"]))
    cells = cell_order(evidence, job.size_order, job.format_order)
    consensus = consensus_frame(evidence)
    write_csv(consensus, out["csv"])
    write_csv(evidence, out["evidence_csv"])
    ship_this_doc(model, evidence, consensus, cells, float(settings["top_fraction"]),
                  float(settings["safe_fraction"])).write(out["md"], out["html"])


ANALYSIS = register(Analysis(
    name="ship_this", level="model", reads="manifests", category="Ship this", subcategory="{model}",
    params=("size_order", "format_order", "ship_this"),
    outputs=(
        Output("html", "{model}/ship_this.html", "consensus keep-BF16 and safe groups, with the evidence per cell (table)"),
        Output("csv", "{model}/ship_this.csv"),
        Output("evidence_csv", "{model}/ship_this_evidence.csv"),
        Output("md", "{model}/ship_this.md"),
    ),
    write=write,
))
