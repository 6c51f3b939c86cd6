"""Per-cell outputs rendered from the manifest alone (so reports never need the .pt state)."""

from __future__ import annotations

from typing import Any

import pandas as pd
from tabulate import tabulate

from .autoquant import NO_QUANT
from .formats import ranking_format

LEGACY_ROW_KEYS = ("layer", "num_bits", "sensitivity", "size_cost")


# The format whose score is a group's headline sensitivity: the one that ranks it everywhere.
primary_format = ranking_format


def cell_inputs(manifest: dict[str, Any]) -> str:
    """What the cell's samples held (``calibration.inputs`` as its scope read it).

    Manifests written before the key existed calibrated lm-only cells on captions alone.
    """
    recorded = manifest["config"].get("inputs")
    if recorded:
        return recorded
    return "image+caption" if manifest["cell"]["scope"] == "all-layers" else "caption-only"


def layer_rows(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per searched group, sorted by sensitivity (descending), legacy keys first."""
    bits = {name: fmt["bits"] for name, fmt in manifest["formats"].items()}
    bits[NO_QUANT] = 16.0
    primary = primary_format(manifest)
    rows = []
    for group in manifest["groups"]:
        selected = group["selected_format"]
        rows.append(
            {
                "layer": group["layer"],
                "num_bits": float(bits.get(selected, float("nan"))),
                "sensitivity": float(group["scores_per_token"][primary]),
                "size_cost": float(group["costs"][selected]),
                "selected_format": selected,
                "quantized": selected != NO_QUANT,
                "tower": group["tower"],
                "block": group["block"],
                "sublayer": group["sublayer"],
                "sensitivity_raw": float(group["scores_raw"][primary]),
                "scores_raw": group["scores_raw"],
                "scores_per_token": group["scores_per_token"],
                "scores_modelopt_clipped": group["scores_modelopt_clipped"],
                "modules": group["modules"],
            }
        )
    rows.sort(key=lambda r: (-r["sensitivity"], r["layer"]))
    for rank, row in enumerate(rows, start=1):
        row["rank"] = rank
    return rows


# Where the keys older per-layer files also carry mean something more precise here (written into
# the file's ``scheme.field_notes``).
FIELD_NOTES = {
    "num_bits": "effective bits of the format the solver selected for the group (16: kept in BF16); "
                "not the search's target",
    "sensitivity": "the ranking format's AutoQuantize score of the group before ModelOpt's monotone clipping, "
                   "divided by the caption tokens scored (per caption token, not a sum over the scoring batches)",
    "size_cost": "ModelOpt's cost of the selected format (weight elements x compression); for rows outside the "
                 "search (searched: false) the group's BF16 weight cost, which the budget does not count",
    "coverage_fraction": "share of the quantizable Linear weight (BF16 cost) inside the search and the budget",
}


def unsearched_rows(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Groups outside the search and the budget (the vision tower in lm-only): kept at 16 bits, sensitivity 0."""
    rows = []
    for group in sorted(manifest.get("excluded_groups", []), key=lambda g: g["layer"]):
        rows.append({
            "layer": group["layer"],
            "num_bits": 16.0,
            "sensitivity": 0.0,
            "size_cost": float(group.get("weight_cost", 0.0)),
            "searched": False,
            "selected_format": NO_QUANT,
            "quantized": False,
            "tower": group["tower"],
            "block": group.get("block"),
            "sublayer": group.get("sublayer"),
            "modules": group["modules"],
        })
    return rows


def coverage_fraction(manifest: dict[str, Any]) -> float:
    """Share of the quantizable weight (BF16 cost) inside the search: 1.0 when nothing is excluded."""
    searched = sum(float(g["uncompressed_cost"]) for g in manifest["groups"])
    outside = sum(float(g.get("weight_cost", 0.0)) for g in manifest.get("excluded_groups", []))
    return searched / (searched + outside) if searched + outside > 0 else 0.0


def sensitivity_json(manifest: dict[str, Any]) -> dict[str, Any]:
    """The per-layer-sensitivity.json payload: every key (and type) older per-layer files carry, and ours.

    The older keys come first in each section: ``scheme.{name, auto_quantize_bits, auto_quantize_method,
    auto_quantize_score_size, coverage_mode, coverage_fraction, quant_formats}``, ``model.id``,
    ``dataset.{name, size, num_calib_samples, batch_size}``, ``autoquant_state.{keys, constraints,
    score, is_satisfied}``, and rows starting ``layer, num_bits, sensitivity, size_cost``.
    """
    cell, search, batches = manifest["cell"], manifest["search"], manifest["batches"]
    searches_vision = not search["disabled_layers"]
    rows = [{**{k: row[k] for k in LEGACY_ROW_KEYS}, "searched": True, **{k: v for k, v in row.items() if k not in LEGACY_ROW_KEYS}}
            for row in layer_rows(manifest)]
    return {
        "scheme": {
            "name": cell["format"],
            "auto_quantize_bits": float(search["effective_bits_target"]),
            "auto_quantize_method": search["method"],
            "auto_quantize_score_size": int(batches["samples"]),
            "coverage_mode": "full" if searches_vision else "lm_only",
            "coverage_fraction": float(coverage_fraction(manifest)),
            "quant_formats": [manifest["formats"][c]["base"] for c in cell["candidates"]],
            "candidates": cell["candidates"],
            "sensitivity_format": primary_format(manifest),
            "sensitivity_unit": "ModelOpt AutoQuantize score before monotone clipping, per caption token",
            "method": search["method"],
            "scope": cell["scope"],
            "inputs": cell_inputs(manifest),
            "field_notes": FIELD_NOTES,
        },
        "model": {"id": cell["checkpoint"], "name": cell["model"], "family": cell["family"], "checkpoint": cell["checkpoint"]},
        "dataset": {
            "name": manifest["dataset"].get("source_dataset", "coco2017"),
            "size": cell["size"],
            "num_calib_samples": int(batches["samples"]),
            "batch_size": int(manifest["config"].get("batch_size_used") or manifest.get("batch_plan", {}).get("batch_size", 0)),
            "num_samples": batches["samples"],
            "tokens": batches["tokens"],
            "loss_tokens": batches["loss_tokens"],
            "padding_fraction": batches["padding_fraction"],
            "inputs": cell_inputs(manifest),
            "calib_db": manifest["dataset"].get("calib_db"),
        },
        "quantization": {
            "formats": {k: {kk: v[kk] for kk in ("base", "bits", "description")} for k, v in manifest["formats"].items()},
            "disabled_layers": search["disabled_layers"],
            "cost_excluded_patterns": search["constraints"].get("cost", {}).get("excluded_module_name_patterns", []),
            "excluded_groups": len(manifest["excluded_groups"]),
        },
        "autoquant_state": {
            "keys": list(search.get("state_keys", [])),
            "constraints": {"effective_bits": search["effective_bits_achieved"]},
            "score": float(search["score"]),
            "is_satisfied": bool(search["is_satisfied"]),
            "effective_bits_target": search["effective_bits_target"],
            "num_calib_steps": search["num_calib_steps"],
            "num_score_steps": search["num_score_steps"],
        },
        "layer_sensitivity": rows + unsearched_rows(manifest),
    }


def _fmt(value: float) -> str:
    return f"{value:.4e}"


def sensitivity_markdown(manifest: dict[str, Any]) -> str:
    cell, search, batches = manifest["cell"], manifest["search"], manifest["batches"]
    rows = layer_rows(manifest)
    quantized = sum(r["quantized"] for r in rows)
    wall = sum(manifest["timings_s"].values())
    summary = [
        ("Model", f"{cell['model']} ({cell['family']})"),
        ("Format", cell["format"] + ("" if cell["candidates"] == [cell["format"]] else f" (candidates: {', '.join(cell['candidates'])})")),
        ("Scope", cell["scope"]),
        ("Calibration size", f"{cell['size']} ({batches['samples']} samples)"),
        ("Calibration inputs", cell_inputs(manifest)),
        ("Method", search["method"]),
        ("Effective bits target", f"{search['effective_bits_target']:.4f}"),
        ("Effective bits achieved", f"{search['effective_bits_achieved']:.4f}"),
        ("Constraint satisfied", "yes" if search["is_satisfied"] else "NO"),
        ("Groups quantized / searched", f"{quantized} / {len(rows)} (excluded from search and budget: {len(manifest['excluded_groups'])})"),
        ("Samples used", f"{batches['samples']} in {batches['batches']} batches"),
        ("Tokens", f"{batches['tokens']} ({batches['loss_tokens']} caption tokens in the loss, padding {batches['padding_fraction']:.1%})"),
        ("Device", f"{manifest['device'].get('name')} ({manifest['dtype']})"),
        ("Wall time", f"{wall:.1f} s (" + ", ".join(f"{k} {v:.1f} s" for k, v in manifest["timings_s"].items()) + ")"),
    ]
    job_wall = manifest.get("provenance", {}).get("job_wall_s")
    if job_wall is not None:
        summary.append(("Job wall time", f"{job_wall:.1f} s (from the job's process start: start-up, GPU wait, the cell, writing)"))
    candidates = cell["candidates"]
    table = pd.DataFrame(
        [
            {
                "Layer": r["layer"],
                "Num Bits": f"{r['num_bits']:g}",
                "Sensitivity": _fmt(r["sensitivity"]),
                "Size Cost": f"{r['size_cost']:.6g}",
                "Selected": r["selected_format"],
                "Tower": r["tower"],
                "Block": "" if r["block"] is None else r["block"],
                **{f"Score/token {c}": _fmt(r["scores_per_token"][c]) for c in candidates},
            }
            for r in rows
        ]
    )
    parts = [
        f"# Per-layer sensitivity: {cell['model']} / {cell['format']} / {cell['scope']} / {cell['size']}",
        "",
        tabulate(summary, headers=["", "Value"], tablefmt="github"),
        "",
        f"Sensitivity is the {primary_format(manifest)} AutoQuantize score of the group before ModelOpt's monotone "
        "clipping, divided by the number of caption tokens scored. `Num Bits` is the format the solver selected "
        f"(16 = kept in {NO_QUANT.upper()}).",
        "",
        tabulate(table, headers="keys", tablefmt="github", showindex=False) if len(table) else "(no searched groups)",
        "",
    ]
    return "\n".join(parts)
