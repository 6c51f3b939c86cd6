"""Manifests shaped like the full-size models' cells: the real module names and architecture numbers.

The groups are those AutoQuantize forms on Qwen2.5-VL-3B (276) and Qwen3-VL-4B (250), built from
``families.FAMILIES`` (depths, deepstack indexes) and classified by the package's own
``tower_of`` / ``block_index`` / ``sublayer_of``; scores are seeded random, so plots and pages can be
checked at the size a user sees, not only at demo size.
"""

from __future__ import annotations

import numpy as np

from vlmsens.families import FAMILIES, block_index, sublayer_of, tower_of

MODELS = {"qwen2_5_vl": "Qwen2.5-VL-3B-Instruct", "qwen3_vl": "Qwen3-VL-4B-Instruct"}
GROUPS = {"qwen2_5_vl": 276, "qwen3_vl": 250}
# The text groups: q/k/v share one decision, as do gate/up.
TEXT_GROUPS = (("self_attn.q_proj", ("q_proj", "k_proj", "v_proj")), ("self_attn.o_proj", ("o_proj",)),
               ("mlp.gate_proj", ("gate_proj", "up_proj")), ("mlp.down_proj", ("down_proj",)))


def group_modules(family: str, scope: str = "all-layers") -> list[tuple[str, list[str]]]:
    """(group name, module names) of every group AutoQuantize searches in a full-size cell, in network order."""
    fam = FAMILIES[family]
    depth, layers = fam.full_vision["depth"], fam.full_text["num_hidden_layers"]
    groups: list[tuple[str, list[str]]] = []
    if scope == "all-layers":
        v = "model.visual"
        groups.append((f"{v}.patch_embed.proj", [f"{v}.patch_embed.proj"]))
        for b in range(depth):
            prefix = f"{v}.blocks.{b}"
            groups += [(f"{prefix}.attn.qkv", [f"{prefix}.attn.qkv"]), (f"{prefix}.attn.proj", [f"{prefix}.attn.proj"])]
            if family == "qwen2_5_vl":
                groups += [(f"{prefix}.mlp.gate_proj", [f"{prefix}.mlp.gate_proj", f"{prefix}.mlp.up_proj"]),
                           (f"{prefix}.mlp.down_proj", [f"{prefix}.mlp.down_proj"])]
            else:
                groups += [(f"{prefix}.mlp.linear_fc1", [f"{prefix}.mlp.linear_fc1"]), (f"{prefix}.mlp.linear_fc2", [f"{prefix}.mlp.linear_fc2"])]
        merger = ("mlp.0", "mlp.2") if family == "qwen2_5_vl" else ("linear_fc1", "linear_fc2")
        groups += [(f"{v}.merger.{m}", [f"{v}.merger.{m}"]) for m in merger]
        for i, _ in enumerate(fam.full_vision.get("deepstack_visual_indexes", [])):
            groups += [(f"{v}.deepstack_merger_list.{i}.{m}", [f"{v}.deepstack_merger_list.{i}.{m}"]) for m in ("linear_fc1", "linear_fc2")]
    for b in range(layers):
        prefix = f"model.language_model.layers.{b}"
        groups += [(f"{prefix}.{name}", [f"{prefix}.{name.split('.')[0]}.{m}" for m in modules]) for name, modules in TEXT_GROUPS]
    groups.append(("lm_head", ["lm_head"]))
    return groups


def manifest(family: str, fmt: str = "wfp8_afp8", scope: str = "all-layers", size: str = "large", seed: int = 0,
             model: str | None = None, formats: tuple[str, ...] = ("wfp8_afp8", "wint8_aint8")) -> dict:
    """A manifest of one full-size cell: every group scored by every format, about 20 % kept in BF16."""
    fam = FAMILIES[family]
    rng = np.random.default_rng(seed)
    groups = []
    for layer, modules in group_modules(family, scope):
        weight = float(rng.integers(1, 40)) * 2**20
        base = 10 ** rng.uniform(-9, -3)
        scores = {f: base * 10 ** rng.normal(0, 0.3) for f in formats}
        selected = "bf16" if rng.random() < 0.2 else fmt
        groups.append({
            "layer": layer, "modules": modules, "tower": tower_of(modules[0], fam.vision_patterns), "block": block_index(modules[0]),
            "sublayer": sublayer_of(layer, modules, fam.sublayer_rules), "scores_raw": {f: s * 1000 for f, s in scores.items()},
            "scores_per_token": scores, "scores_modelopt_clipped": scores,
            "costs": {"bf16": weight, **{f: weight / 2 for f in formats}}, "uncompressed_cost": weight, "cost_weight": 1.0,
            "selected_format": selected,
        })
    return {
        "schema_version": 1,
        "cell": {"model": model or MODELS[family], "family": family, "checkpoint": "", "format": fmt, "candidates": [fmt],
                 "scope": scope, "size": size},
        "config": {"effective_bits": 8.5, "method": "gradient", "batch_size": "auto", "batch_size_used": 32, "seed": 0,
                   "inputs": "image+caption"},
        "formats": {f: {"base": f, "description": f, "bits": 8.0} for f in formats},
        "search": {"effective_bits_target": 8.5, "effective_bits_achieved": 8.5, "is_satisfied": True, "score": 0.0,
                   "disabled_layers": []},
        "batches": {"samples": 128, "loss_tokens": 2000},
        "device": {"device": "cuda:0", "name": "NVIDIA H100 80GB HBM3"},
        "timings_s": {"load": 10.0, "calibrate": 30.0, "score": 60.0, "solve": 1.0},
        "provenance": {"wall_time_s": 110.0, "job_wall_s": 125.0},
        "groups": groups,
        "excluded_groups": [],
    }


def model_manifests(family: str, sizes=("small", "large"), formats=("wfp8_afp8", "wint8_aint8"),
                    scopes=("lm-only", "all-layers")) -> list[dict]:
    """Every cell of one full-size model over a small grid (seeded per cell)."""
    out = []
    for i, (fmt, scope, size) in enumerate((f, sc, sz) for f in formats for sc in scopes for sz in sizes):
        out.append(manifest(family, fmt, scope, size, seed=i, formats=(fmt,)))
    return out
