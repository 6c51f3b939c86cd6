"""Per-cell outputs rendered from the manifest alone (so reports never need the .pt state)."""

from __future__ import annotations

from typing import Any

import pandas as pd
from tabulate import tabulate

from .autoquant import NO_QUANT

LEGACY_ROW_KEYS = ("layer", "num_bits", "sensitivity", "size_cost")


def primary_format(manifest: dict[str, Any]) -> str:
    """The format whose score is a group's headline sensitivity: the first listed candidate."""
    return manifest["cell"]["candidates"][0]


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


def sensitivity_json(manifest: dict[str, Any]) -> dict[str, Any]:
    """The per-layer-sensitivity.json payload (a superset of the legacy shape)."""
    cell, search, batches = manifest["cell"], manifest["search"], manifest["batches"]
    return {
        "scheme": {
            "name": cell["format"],
            "candidates": cell["candidates"],
            "sensitivity_format": primary_format(manifest),
            "sensitivity_unit": "ModelOpt AutoQuantize score before monotone clipping, per caption token",
            "method": search["method"],
            "scope": cell["scope"],
        },
        "model": {"name": cell["model"], "family": cell["family"], "checkpoint": cell["checkpoint"]},
        "dataset": {
            "name": manifest["dataset"].get("source_dataset", "coco2017"),
            "size": cell["size"],
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
            "constraints": {"effective_bits": search["effective_bits_achieved"]},
            "effective_bits_target": search["effective_bits_target"],
            "score": search["score"],
            "is_satisfied": search["is_satisfied"],
            "num_calib_steps": search["num_calib_steps"],
            "num_score_steps": search["num_score_steps"],
        },
        "layer_sensitivity": layer_rows(manifest),
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
