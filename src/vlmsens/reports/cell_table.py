"""The layer table of one cell, in the report: every group with its rank, score, cost and selected format."""

from __future__ import annotations

import pandas as pd

from ..render import layer_rows
from .doc import Doc
from .frames import load_manifests, short_name
from .registry import Analysis, Job, Output, register


def cell_table(manifest: dict) -> pd.DataFrame:
    """One row per searched group, most sensitive first (the rows of per-layer-sensitivity.md)."""
    rows = layer_rows(manifest)
    return pd.DataFrame({
        "rank": [r["rank"] for r in rows],
        "group": [short_name(r["layer"]) for r in rows],
        "tower": [r["tower"] for r in rows],
        "block": pd.array([r["block"] for r in rows], dtype="Int64"),
        "sublayer": [r["sublayer"] for r in rows],
        "score / token": [r["sensitivity"] for r in rows],
        **{f"score {fmt}": [r["scores_per_token"].get(fmt) for r in rows] for fmt in manifest["cell"]["candidates"][1:]},
        "selected": [r["selected_format"] for r in rows],
        "bits": [r["num_bits"] for r in rows],
        "size cost": [r["size_cost"] for r in rows],
    })


def cell_table_doc(manifest: dict) -> Doc:
    cell, search = manifest["cell"], manifest["search"]
    doc = Doc(f"{cell['model']} / {cell['format']} / {cell['scope']} / {cell['size']}: every group")
    doc.para(
        f"{len(manifest['groups'])} groups searched, {manifest['batches']['samples']} calibration samples; effective bits "
        f"{search['effective_bits_achieved']:.3f} (target {search['effective_bits_target']:g}). Score = AutoQuantize score per "
        f"caption token of `{cell['candidates'][0]}` before ModelOpt's monotone clipping; selected = the solver's format "
        "(bf16: kept unquantized). The same rows as the cell's per-layer-sensitivity.md."
    )
    return doc.table(cell_table(manifest), floatfmt=".4g")


def write(job: Job) -> None:
    manifest = load_manifests(job.inputs)[0]
    cell_table_doc(manifest).write(None, job.outputs["html"])


ANALYSIS = register(Analysis(
    name="cell_table", level="cell", reads="manifests", subcategory="Layers per cell", params=(),
    outputs=(Output("html", "{model}/cells/{format}/{scope}/{size}/layers.html", "layer table (table)"),),
    write=write,
))
