"""The summary of every cell: search outcome, rank stability and the most sensitive groups per cell."""

from __future__ import annotations

from typing import Any

import pandas as pd

from ..render import layer_rows
from .doc import Doc
from .frames import CELL_KEYS, layers_frame, load_manifests, short_name, write_csv
from .rank_stability import rank_stability
from .registry import Analysis, Job, Output, register


def job_wall_s(manifest: dict[str, Any]) -> float:
    """The cell job's wall time from its process start (older manifests: the cell's own run, or its phases)."""
    provenance = manifest.get("provenance", {})
    return float(provenance.get("job_wall_s") or provenance.get("wall_time_s") or sum(manifest["timings_s"].values()))


def summary_frame(manifests: list[dict[str, Any]]) -> pd.DataFrame:
    records = []
    for m in manifests:
        rows = layer_rows(m)
        search = m["search"]
        records.append(
            {
                **{k: m["cell"][k] for k in CELL_KEYS},
                "samples": m["batches"]["samples"],
                "caption_tokens": m["batches"]["loss_tokens"],
                "bits_target": search["effective_bits_target"],
                "bits_achieved": round(search["effective_bits_achieved"], 4),
                "satisfied": search["is_satisfied"],
                "groups_searched": len(rows),
                "groups_kept_bf16": sum(not r["quantized"] for r in rows),
                "top_layer": rows[0]["layer"] if rows else "",
                "wall_s": round(job_wall_s(m), 2),
                "search_s": round(sum(m["timings_s"].values()), 2),
                "device": m["device"].get("name"),
            }
        )
    return pd.DataFrame.from_records(records).sort_values(CELL_KEYS).reset_index(drop=True)


def summary_doc(manifests: list[dict[str, Any]], summary: pd.DataFrame, layers: pd.DataFrame, stability: pd.DataFrame) -> Doc:
    doc = Doc("vlmsens summary")
    doc.para(
        f"{len(manifests)} cells. Sensitivity = AutoQuantize score per caption token of each cell's ranking "
        "format (raw, before ModelOpt's monotone clipping): the cell's format, or a candidate set's fewest-bits "
        "member (ties: the first listed), the same format the validation ranks by. `wall_s`: the cell job from its process start "
        "(start-up, waiting for a GPU, loading, search, writing); `search_s`: load, calibrate, score and solve."
    )
    doc.heading("Cells").table(summary)
    doc.heading("Rank stability across calibration sizes")
    if len(stability):
        doc.table(stability, floatfmt=".3f")
    else:
        doc.not_applicable("a single calibration size: nothing to compare.")
    top = (
        layers.sort_values("rank").groupby(CELL_KEYS, sort=True).head(5)
        .groupby(CELL_KEYS, sort=True)["layer"].apply(lambda s: ", ".join(short_name(x) for x in s))
        .reset_index(name="top-5 groups")
    ) if len(layers) else pd.DataFrame(columns=[*CELL_KEYS, "top-5 groups"])
    doc.heading("Most sensitive groups per cell").table(top)
    return doc


def write(job: Job) -> None:
    out = job.outputs
    manifests = load_manifests(job.inputs)
    summary = summary_frame(manifests)
    layers = layers_frame(manifests)
    stability = rank_stability(layers, job.size_order)
    for key, frame in (("summary_csv", summary), ("layers_csv", layers), ("stability_csv", stability)):
        write_csv(frame, out[key])
    summary_doc(manifests, summary, layers, stability).write(out["summary_md"], out["summary_html"])


ANALYSIS = register(Analysis(
    name="report", level="global", reads="manifests", category="Summary", subcategory="Cells",
    outputs=(
        Output("summary_md", "summary.md"),
        Output("summary_html", "summary.html", "summary of every cell (table)"),
        Output("summary_csv", "summary.csv"),
        Output("layers_csv", "layers.csv"),
        Output("stability_csv", "rank_stability.csv"),
    ),
    write=write,
))
