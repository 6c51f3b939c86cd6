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
from ..recipes import agreement_text, cell_recipes, ignore_yaml, nested_recipes
from .doc import Doc

log = logging.getLogger(__name__)


# Why the groups a recipe keeps in BF16 are not simply the most sensitive ones (recipe pages and Ship this).
KEPT_VS_SENSITIVE = (
    "**Most sensitive is not the same as kept in BF16.** A ranking orders groups by their score; the solver "
    "minimises the summed score under a bit budget, so what decides is a group's score *per bit it would cost* "
    "to keep in BF16. A small group with a moderate score is kept before a large, more sensitive one, and the "
    "optimal recipes of two budgets are separate solutions: a group kept in BF16 at one budget can be quantized "
    "at a larger one. **Nested** recipes keep groups in BF16 in one fixed order, the most score per unit of cost "
    "first (greedy), so a larger budget only ever adds BF16 groups: slightly worse predicted scores than the "
    "optimal ones, but one ladder a deployment can climb without re-deciding what it already kept."
)


def nested_table(nested: list[dict[str, Any]], optimal: list[dict[str, Any]]) -> pd.DataFrame:
    """Nested recipes beside the optimal ones of the same budgets."""
    by_budget = {r["budget_bits"]: r for r in optimal}
    return pd.DataFrame([
        {
            "budget (bits)": f"{n['budget_bits']:g}",
            "feasible": "yes" if n["feasible"] else "NO",
            "nested bits": f"{n['achieved_bits']:.4f}",
            "nested score / token": f"{n['predicted_score_per_token']:.4e}",
            "nested BF16": f"{n['groups_bf16']} / {n['groups']}",
            "optimal bits": f"{by_budget[n['budget_bits']]['achieved_bits']:.4f}" if n["budget_bits"] in by_budget else "",
            "optimal score / token": (f"{by_budget[n['budget_bits']]['predicted_score_per_token']:.4e}"
                                      if n["budget_bits"] in by_budget else ""),
        }
        for n in nested
    ])


def recipes_cell_doc(manifest: dict[str, Any], recipes: list[dict[str, Any]], files: dict[float, dict[str, str]] | None = None,
                     nested: list[dict[str, Any]] | None = None, nested_files: dict[float, dict[str, str]] | None = None):
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
    if nested:
        doc.heading("Nested recipes (greedy by score per cost)")
        doc.para(KEPT_VS_SENSITIVE)
        doc.table(nested_table(nested, recipes))
        for n in nested:
            items = []
            if nested_files and n["budget_bits"] in nested_files:
                items += [f"ModelOpt quant_cfg: `{nested_files[n['budget_bits']]['quant_cfg']}`",
                          f"ignore list: `{nested_files[n['budget_bits']]['ignore']}`"]
            kept = n["kept_bf16"]
            items.append(f"{n['budget_bits']:g} bits, kept in BF16 ({len(kept)}): "
                         + (", ".join(f"`{k}`" for k in kept) if kept else "none"))
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
    nested_quant_cfgs: list[str] | None = None,
    nested_ignores: list[str] | None = None,
    progress: Callable[[str], None] = log.info,
) -> list[dict[str, Any]]:
    """Write every budget's quant_cfg JSON and ignore YAML, optimal and nested, plus the cell's recipes JSON/Markdown."""
    if len(quant_cfgs) != len(budgets) or len(ignores) != len(budgets):
        raise VlmsensError(f"{len(budgets)} budgets but {len(quant_cfgs)} quant_cfg and {len(ignores)} ignore outputs")
    nested_quant_cfgs, nested_ignores = list(nested_quant_cfgs or []), list(nested_ignores or [])
    if len(nested_quant_cfgs) != len(nested_ignores) or (nested_quant_cfgs and len(nested_quant_cfgs) != len(budgets)):
        raise VlmsensError(f"{len(budgets)} budgets but {len(nested_quant_cfgs)} nested quant_cfg and "
                           f"{len(nested_ignores)} nested ignore outputs")
    manifest = json.loads(Path(manifest_path).read_text())
    recipes = cell_recipes(manifest, budgets, state_path, progress)
    files = {}
    for recipe, cfg_path, ignore_path in zip(recipes, quant_cfgs, ignores, strict=False):
        atomic_write_json(cfg_path, recipe["quant_cfg"])
        atomic_write_text(ignore_path, ignore_yaml(recipe))
        files[recipe["budget_bits"]] = {"quant_cfg": str(cfg_path), "ignore": str(ignore_path)}
    summary = [{**{k: v for k, v in r.items() if k != "quant_cfg"}, "files": files[r["budget_bits"]]} for r in recipes]
    # Nested recipes in the order of the configured budgets (the same order as the file lists).
    by_budget = {n["budget_bits"]: n for n in nested_recipes(manifest, budgets)}
    nested = [by_budget[float(b)] for b in budgets]
    nested_files = {}
    for recipe, cfg_path, ignore_path in zip(nested, nested_quant_cfgs, nested_ignores, strict=False):
        atomic_write_json(cfg_path, recipe["quant_cfg"])
        atomic_write_text(ignore_path, ignore_yaml(recipe))
        nested_files[recipe["budget_bits"]] = {"quant_cfg": str(cfg_path), "ignore": str(ignore_path)}
    progress("nested recipes: " + ", ".join(f"{n['budget_bits']:g} bits -> {n['achieved_bits']:.4f} ({n['groups_bf16']} BF16)"
                                            for n in nested))
    nested_summary = [{**{k: v for k, v in n.items() if k != "quant_cfg"}, "files": nested_files.get(n["budget_bits"])}
                      for n in nested]
    recipes_cell_doc(manifest, recipes, files, nested, nested_files).write(summary_md, summary_html)
    atomic_write_json(summary_json, {"manifest": str(manifest_path), "budgets": [float(b) for b in budgets], "recipes": summary,
                                     "nested": nested_summary})
    return recipes
