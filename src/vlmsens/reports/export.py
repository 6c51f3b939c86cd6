"""The page of one exported checkpoint (rule ``export``), from its vlmsens-export.json alone."""

from __future__ import annotations

from typing import Any

import pandas as pd

from .doc import Doc


def export_doc(doc: dict[str, Any], folder: str):
    """What was exported, where, and how the reloaded export compares with the fake-quantized model."""
    cell, check = doc["cell"], doc["check"]
    page = Doc(f"Export: {cell['model']} / {cell['format']} / {cell['scope']} / {cell['size']} at {doc['budget_bits']:g} bits")
    verdict = "passed" if check["passed"] else "FAILED"
    page.para(
        f"Checkpoint folder: `{folder}` (Hugging Face layout written by ModelOpt's `export_hf_checkpoint`; "
        f"`hf_quant_config.json` and `config.json` list each layer's format and the layers kept in BF16; "
        f"`vlmsens-export.json` holds the recipe, the check and checksums). Effective bits: "
        f"{doc['achieved_bits']:.4f} (budget {doc['budget_bits']:g}; the recipe's {doc['recipe_achieved_bits']:.4f}"
        f"{' before the layers the exporter keeps in BF16' if doc['kept_bf16_by_export'] else ''}); "
        f"{doc['recipe']['groups_bf16'] + len(doc['kept_bf16_by_export'])} of {doc['recipe']['groups']} groups in BF16."
    )
    page.para(
        f"**Check {verdict}:** the folder read back (quantized weights times their scales, inputs quantized with the "
        f"stored input scales) differs from ModelOpt's fake-quantized model of the same recipe by KL "
        f"{check['kl_exported_vs_fake_quant']:.3g} per caption token (limit {check['max_kl']:g}), on "
        f"{check['held_out_samples']} held-out samples ({check['caption_tokens']} caption tokens)."
    )
    loss, kl = check["loss"], check["kl_vs_bf16"]
    page.table(pd.DataFrame([
        {"model": "BF16", "caption loss": loss["bf16"], "KL to BF16": 0.0},
        {"model": "fake-quantized (ModelOpt)", "caption loss": loss["fake_quant"], "KL to BF16": kl["fake_quant"]},
        {"model": "exported, reloaded", "caption loss": loss["exported"], "KL to BF16": kl["exported"]},
    ]))
    page.heading("Formats in the export")
    counts: dict[tuple[str, str], int] = {}
    for row in doc["layers"].values():
        key = (row["recipe_format"], row["modelopt_format"])
        counts[key] = counts.get(key, 0) + 1
    page.table(pd.DataFrame([{"recipe format": fmt, "ModelOpt format": algo, "modules": n}
                             for (fmt, algo), n in sorted(counts.items())]))
    kept = doc["recipe"]["kept_bf16"]
    items = [f"kept in BF16 by the recipe ({len(kept)}): " + (", ".join(f"`{k}`" for k in kept) if kept else "none")]
    items += [f"kept in BF16 by the export: `{row['layer']}` (the recipe says {row['recipe_format']}; {row['reason']})"
              for row in doc["kept_bf16_by_export"]]
    if doc["disabled_patterns"]:
        items.append("outside the search, BF16: " + ", ".join(f"`{p}`" for p in doc["disabled_patterns"]))
    page.bullets(items)
    return page
