"""The pages and files of rule ``recipes``: every budget's ModelOpt quant_cfg and ignore list, and the
cell's recipes as JSON, Markdown and HTML (solved by :mod:`vlmsens.recipes`)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import VlmsensError
from ..io import atomic_write_json, atomic_write_text
from ..recipes import agreement_text, cell_recipes, ignore_yaml
from .doc import Doc

log = logging.getLogger(__name__)


def recipes_cell_doc(manifest: dict[str, Any], recipes: list[dict[str, Any]], files: dict[float, dict[str, str]] | None = None):
    """The cell's recipes as a :class:`~vlmsens.reports.doc.Doc` (Markdown and HTML)."""
    cell = manifest["cell"]
    doc = Doc(f"Recipes: {cell['model']} / {cell['format']} / {cell['scope']} / {cell['size']}")
    doc.para(
        "Re-solved from the cell's stored AutoQuantize scores for each effective-bits budget (no re-scoring). "
        "`predicted score` is ModelOpt's objective (sum of the selected groups' scores, comparable with the search's "
        "own score); `score / token` the same per caption token. The search itself ran at "
        f"{manifest['search']['effective_bits_target']:g} bits and reached {manifest['search']['effective_bits_achieved']:.4f}."
    )
    rows = pd.DataFrame(
        [
            {
                "budget (bits)": f"{r['budget_bits']:g}",
                "feasible": "yes" if r["feasible"] else "NO",
                "achieved bits": f"{r['achieved_bits']:.4f}",
                "predicted score": f"{r['predicted_score']:.4e}",
                "score / token": f"{r['predicted_score_per_token']:.4e}",
                "groups BF16": f"{r['groups_bf16']} / {r['groups']}",
                "solver": r["source"],
                "cross-check agrees": agreement_text(r["cross_check"]),
            }
            for r in recipes
        ]
    )
    doc.table(rows)
    for r in recipes:
        doc.heading(f"{r['budget_bits']:g} bits" + ("" if r["feasible"] else " (INFEASIBLE)"))
        items = []
        if files and r["budget_bits"] in files:
            items += [f"ModelOpt quant_cfg: `{files[r['budget_bits']]['quant_cfg']}`", f"ignore list: `{files[r['budget_bits']]['ignore']}`"]
        items += [f"note: {n}" for n in r["notes"]]
        kept = r["kept_bf16"]
        items.append(f"kept in BF16 ({len(kept)}): " + (", ".join(f"`{k}`" for k in kept) if kept else "none"))
        doc.bullets(items)
    return doc


def write_cell_recipes(
    manifest_path: str,
    state_path: str | None,
    budgets: list[float],
    *,
    summary_json: str,
    summary_md: str,
    summary_html: str | None = None,
    quant_cfgs: list[str],
    ignores: list[str],
    progress: Callable[[str], None] = log.info,
) -> list[dict[str, Any]]:
    """Write every budget's quant_cfg JSON and ignore YAML, plus the cell's recipes JSON/Markdown."""
    if len(quant_cfgs) != len(budgets) or len(ignores) != len(budgets):
        raise VlmsensError(f"{len(budgets)} budgets but {len(quant_cfgs)} quant_cfg and {len(ignores)} ignore outputs")
    manifest = json.loads(Path(manifest_path).read_text())
    recipes = cell_recipes(manifest, budgets, state_path, progress)
    files = {}
    for recipe, cfg_path, ignore_path in zip(recipes, quant_cfgs, ignores, strict=False):
        atomic_write_json(cfg_path, recipe["quant_cfg"])
        atomic_write_text(ignore_path, ignore_yaml(recipe))
        files[recipe["budget_bits"]] = {"quant_cfg": str(cfg_path), "ignore": str(ignore_path)}
    summary = [{**{k: v for k, v in r.items() if k != "quant_cfg"}, "files": files[r["budget_bits"]]} for r in recipes]
    recipes_cell_doc(manifest, recipes, files).write(summary_md, summary_html)
    atomic_write_json(summary_json, {"manifest": str(manifest_path), "budgets": [float(b) for b in budgets], "recipes": summary})
    return recipes
